"""Fixtures over the test bed (tests/testbed): servers and models are built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'disabled')
# Engines stay on loopback in every test process and its children: Ray otherwise takes the machine's
# own non-loopback address even when told 127.0.0.1; Spark binds where SPARK_LOCAL_IP says.
os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
os.environ.setdefault('SPARK_LOCAL_IP', '127.0.0.1')

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from testbed.corpus import build_corpus  # noqa: E402
from testbed.http_server import ImageServer  # noqa: E402
from testbed.models import build_tiny_sd  # noqa: E402
from testbed.s3 import S3Server  # noqa: E402


def pytest_collection_modifyitems(items):
    """`make test` runs two workers (pytest -n 2 --dist loadgroup): a module's tests stay on one worker
    with its module fixtures, and the two engine modules share one, so that one Spark and one Ray
    cluster run at a time."""
    for item in items:
        name = item.module.__name__
        item.add_marker(pytest.mark.xdist_group('engines' if name.endswith('_engines') else name))


@pytest.fixture(scope='session')
def root() -> Path:
    """The repository root, where the scripts live."""
    return ROOT


@pytest.fixture(scope='session')
def corpus():
    return build_corpus()


@pytest.fixture(scope='session')
def image_server(corpus):
    with ImageServer(corpus) as server:
        yield server


@pytest.fixture(scope='session')
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server):
    """The S3 server, up, with a fresh bucket in `s3.bucket` for this test."""
    s3_server.start()
    s3_server.bucket = s3_server.new_bucket()
    yield s3_server
    s3_server.start()


@pytest.fixture(scope='session')
def tiny_model(tmp_path_factory) -> Path:
    """A folder with vae/, text_encoder/, tokenizer/ in the SD-2 layout."""
    return build_tiny_sd(tmp_path_factory.mktemp('tiny-sd'))
