"""The test bed itself, where a mistake would hide bugs in every other test."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import botocore.exceptions
import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter
from testbed.corpus import BUCKET_EDGES, bucket_of, build_corpus
from testbed.readback import read_mds

CAPTIONS = [
    'a photo of a cat',
    # No '!': SD-2's tokenizer uses '!' as its pad token, so transformers splits it out as id 0
    # where open_clip would merge it ('!!' -> 748): a quirk of the real SD-2 tokenizer we keep.
    'A Painting of   the Eiffel Tower at night, trending on ArtStation??',
    "Café crème & croissants — 100% délicieux :)",
    'word ' * 120,  # longer than 77 tokens: truncation
    '',
]


def test_corpus_covers_every_bucket_and_format(corpus):
    names = {it.name for it in corpus}
    buckets = {bucket_of(it.min_side) for it in corpus if it.decodable}
    assert len(buckets) == len(BUCKET_EDGES) - 1
    assert {'alpha.png', 'gray.jpg', 'cmyk.jpg', 'exif_rotated.jpg', 'image.webp'} <= names
    modes = {it.name: Image.open(io.BytesIO(it.data)).mode
             for it in corpus if it.decodable}
    assert modes['alpha.png'] == 'RGBA' and modes['gray.jpg'] == 'L' and modes['cmyk.jpg'] == 'CMYK'
    for it in corpus:
        if it.decodable:
            assert Image.open(io.BytesIO(it.data)).size == (it.width, it.height)
    assert build_corpus() == corpus  # deterministic


def test_tokenizer_ids_equal_reference_clip(tiny_model):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(tiny_model, subfolder='tokenizer')
    ref = SimpleTokenizer(context_length=77)
    got = ours(CAPTIONS, padding='max_length', max_length=77, truncation=True,
               return_tensors='pt').input_ids
    want = ref(CAPTIONS)
    assert got.shape == want.shape == (len(CAPTIONS), 77)
    assert torch.equal(got, want)
    assert got[3, -1] == 49407 and got[4, 2] == 0  # truncated ends in EOT; padding is id 0


def test_tiny_models_have_sd2_shapes(tiny_model):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder='vae').eval()
    te = CLIPTextModel.from_pretrained(tiny_model, subfolder='text_encoder').eval()
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    with torch.inference_mode():
        lat = vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist.mean
        hid = te(torch.zeros(2, 77, dtype=torch.long)).last_hidden_state
    assert lat.shape == (1, 4, 32, 32)
    assert hid.shape == (2, 77, 1024)


def test_mds_round_trips_through_s3(s3, tmp_path):
    remote = f's3://{s3.bucket}/roundtrip'
    samples = [{'x': i, 'blob': np.random.default_rng(i).bytes(1000)} for i in range(50)]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env.items():
            mp.setenv(k, v)
        with MDSWriter(out=(str(tmp_path / 'cache'), remote), columns={'x': 'int', 'blob': 'bytes'},
                       size_limit=10_000) as w:
            for s in samples:
                w.write(s)
    assert 'roundtrip/index.json' in s3.list_keys(s3.bucket)
    back = read_mds(remote, env=s3.env)
    assert [(b['x'], b['blob']) for b in back] == [(s['x'], s['blob']) for s in samples]


def test_s3_server_can_go_down_and_come_back(s3):
    s3.client().put_object(Bucket=s3.bucket, Key='k', Body=b'v')
    s3.stop()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        s3.client().get_object(Bucket=s3.bucket, Key='k')
    s3.start()
    assert s3.client().get_object(Bucket=s3.bucket, Key='k')['Body'].read() == b'v'


# The builder of img2dataset-shaped shards (testbed/i2d_shards.py) is checked against real img2dataset
# output by test_download.py: the full and the aesthetic download, each written by img2dataset as the
# download scripts run it, have the schema the builder writes (one download each, not two).


def script_constant(script: str, name: str):
    """The value of a top-level `name = <expression>` in one of the scripts, read without running it."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / script).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, 'id', None) for t in node.targets] == [name]:
            return eval(compile(ast.Expression(node.value), script, 'eval'), {})
    raise AssertionError(f'{script} has no top-level {name}')


def test_bucket_edges_agree_across_the_scripts_and_the_test_bed():
    # The cloudwriter names its output folders by these edges, precompute_latents' --bucket names one of them,
    # and the test bed decides from them which bucket each corpus image must land in.
    for script in ('laion_cloudwriter.py', 'precompute_latents.py'):
        assert script_constant(script, 'BUCKET_EDGES') == BUCKET_EDGES, script
