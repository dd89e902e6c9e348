# make test  — create .venv (once), install requirements (only when they change), run the tests.
# make demo  — the whole pipeline on a small bundled offline sample.
# make bench — every benchmark under benchmarks/.   make lint — ruff.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled

.PHONY: test lint bench demo setup

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when a requirements file is newer than the stamp.
$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

# Two workers by default (this machine and CI have 2 cores); JOBS=0 runs them in one process.
JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

demo: $(STAMP)
	$(PY) tests/demo.py
