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

# The longest test modules, longest first (each run alone on this shared machine: from 530 s of wall
# clock down to 45 s; the engine and cloudwriter modules spend much of theirs waiting on JVMs, Ray and
# polls): `make test` (pytest -n 2 --dist loadfile --no-loadscope-reorder) hands out a module at a time
# in this order, so that the short ones fill the gaps at the end. A module stays on one worker with its
# module fixtures.
LONGEST = ('test_cloudwriter_engines', 'test_cloudwriter', 'test_download_engines', 'test_filter_metadata',
           'test_precompute_latents', 'test_download', 'test_curate_images', 'test_caption_images',
           'test_llm_families', 'test_latent_families', 'test_demo', 'test_caption_endpoint',
           'test_vae_families')


def pytest_collection_modifyitems(items):
    """The LONGEST modules first, the rest in their order."""
    def rank(item) -> int:
        name = item.module.__name__
        return LONGEST.index(name) if name in LONGEST else len(LONGEST)
    items.sort(key=rank)


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
