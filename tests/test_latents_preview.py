"""precompute_latents.py --preview: a user looks at the stored latents decoded back into pictures.

One small run (10 images, 64 and 128 px, the tiny SD-2-shaped model) writes the preview; the tests
read the PNG, decode the stored latents themselves as docs/precompute_latents.md documents, and compare tiles.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from test_precompute_latents import refused
from testbed.corpus import make_jpeg
from testbed.mds_input import UNBUCKETED, make_row, write_mds_input
from testbed.readback import read_mds
from testbed.scripts import load_script, run_script

RESOLUTIONS = (64, 128)
N = 3
G = load_script('precompute_latents.py')  # the grid's geometry constants
TILE, GAP, LINE, LINES = G.PREVIEW_TILE, G.PREVIEW_GAP, G.PREVIEW_LINE, G.PREVIEW_CAPTION_LINES


def run(root: Path, *args) -> subprocess.CompletedProcess:
    """The command line, run in this process as its own would run it (testbed.scripts.run_script)."""
    return run_script('precompute_latents.py', *args)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def tile(png: np.ndarray, row: int, col: int) -> np.ndarray:
    """Tile (row, col) of the grid: a header line on top, then rows of tiles with two caption lines."""
    x = GAP + col * (TILE + GAP)
    y = GAP + LINE + GAP + row * (TILE + GAP + LINES * LINE + GAP)
    return png[y:y + TILE, x:x + TILE].astype(np.float32)


def source_tile(jpg: bytes, res: int) -> np.ndarray:
    """The documented crop, independently: EXIF-oriented RGB, largest centered square, res x res, then
    the grid's resize to TILE (both bilinear)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(jpg))).convert('RGB')
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    img = img.resize((res, res), Image.Resampling.BILINEAR, box=box)
    return np.asarray(img.resize((TILE, TILE), Image.Resampling.BILINEAR)).astype(np.float32)


def decoded_tile(vae, blob: bytes, res: int) -> np.ndarray:
    """The stored float16 latent converted back as docs/precompute_latents.md says
    (z = stored / scaling_factor + shift_factor), vae.decode, to 8 bits as diffusers' image processor does,
    resized to TILE."""
    stored = np.frombuffer(blob, np.float16).reshape(4, res // 8, res // 8).astype(np.float32)
    z = stored / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    with torch.inference_mode():
        x = vae.decode(torch.from_numpy(z)[None]).sample[0]
    px = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.asarray(Image.fromarray(px).resize((TILE, TILE), Image.Resampling.BILINEAR)).astype(np.float32)


@pytest.fixture(scope='module')
def finished(root, tiny_model, tmp_path_factory) -> dict:
    """Ten photo-like JPEGs (shorter sides 70-200 px, so some have no 128 px latent) in three parts,
    encoded at 64 and 128 px with `--preview 3`."""
    tmp = tmp_path_factory.mktemp('preview')
    rows = []
    for i in range(10):
        s = (70, 100, 130, 150, 200)[i % 5]
        data = make_jpeg(s + 13 * (i % 3), s, seed=2000 + i) if i % 2 else make_jpeg(s, s + 21, seed=2000 + i)
        rows.append(make_row(i, data, f'p_{i}.jpg', caption=f'a small photo number {i}' + ' with words' * i))
    write_mds_input(str(tmp / 'mds'), rows, bucketed=False, size_limit=1 << 14)
    summary = tmp / 'summary.json'
    proc = ok(run(root, '--remote_download', tmp / 'mds', '--bucket', UNBUCKETED, '--local', tmp / 'cache',
                  '--remote_upload', tmp / 'latents', '--model_name', tiny_model, '--latent_mode', 'mean',
                  '--resolutions', *RESOLUTIONS, '--batch-size', 4, '--part_size', 4, '--num_workers', 1,
                  '--summary', summary, '--preview', N))
    return {'tmp': tmp, 'proc': proc, 'summary': json.loads(summary.read_text()),
            'png': tmp / 'summary_preview.png', 'out': read_mds(str(tmp / 'latents' / UNBUCKETED))}


@pytest.fixture(scope='module')
def vae(tiny_model):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model, subfolder='vae', low_cpu_mem_usage=False).eval()


def test_preview_shows_each_stored_latent_decoded_beside_its_source_crop(finished, vae):
    png_path, out = finished['png'], finished['out']
    # The PNG sits beside the summary, which names it (printed and in the JSON).
    assert f'preview {png_path}' in finished['proc'].stdout
    assert finished['summary']['preview']['path'] == str(png_path)
    with Image.open(png_path) as img:
        img.verify()
    img = Image.open(png_path)
    assert img.format == 'PNG'
    # A header line, then N rows of (source, decoded) per resolution, each row with two caption lines.
    cols = 2 * len(RESOLUTIONS)
    assert img.size == (GAP + cols * (TILE + GAP), GAP + LINE + GAP + N * (TILE + GAP + LINES * LINE + GAP))
    png = np.asarray(img.convert('RGB'))

    # The samples are spread over the output, the first and the last included.
    ids = finished['summary']['preview']['samples']
    assert ids == [0, 4, 9] and len(out) == 10

    for row, i in enumerate(ids):
        for k, res in enumerate(RESOLUTIONS):
            blob = out[i][f'latents_{res}']
            src, dec = tile(png, row, 2 * k), tile(png, row, 2 * k + 1)
            if not blob:  # shorter side below res: two grey tiles
                assert min(Image.open(io.BytesIO(out[i]['jpg'])).size) < res
                assert np.median(src) == np.median(dec) == 128
                continue
            # The decoded tile is vae.decode of the stored latent converted back as documented.
            want = decoded_tile(vae, blob, res)
            assert np.abs(dec - want).max() <= 2, (i, res, np.abs(dec - want).max())
            # The source tile is this sample's crop, not another shown sample's (pixel statistics).
            diffs = {j: np.abs(src - source_tile(out[j]['jpg'], res)).mean() for j in ids
                     if min(Image.open(io.BytesIO(out[j]['jpg'])).size) >= res}
            assert diffs[i] < 3 and diffs[i] == min(diffs.values()), (i, res, diffs)
    assert sum(bool(out[i]['latents_128']) for i in ids) == 2  # both kinds of tile were checked


def test_a_wrong_scaling_factor_in_the_convention_shows_in_the_preview(root, finished, tiny_model):
    """The preview decodes through convention.json, so a wrong record there is plain to see."""
    tmp = finished['tmp']
    copy = tmp / 'tampered'
    shutil.copytree(tmp / 'latents', copy)
    conv_path = copy / UNBUCKETED / 'convention.json'
    conv = json.loads(conv_path.read_text())
    conv['image_latents']['scaling_factor'] = 1.0  # the classic mistake: the scaling never undone
    conv_path.write_text(json.dumps(conv))
    wrong = tmp / 'wrong.png'
    proc = ok(run(root, '--remote_upload', copy, '--bucket', UNBUCKETED, '--local', tmp / 'cache2',
                  '--model_name', tiny_model, '--preview', N, '--preview_only', '--preview_path', wrong))
    assert f'preview {wrong}' in proc.stdout
    good, bad = (np.asarray(Image.open(p).convert('RGB')) for p in (finished['png'], wrong))
    assert good.shape == bad.shape
    shown = [(row, k) for row, i in enumerate(finished['summary']['preview']['samples'])
             for k, res in enumerate(RESOLUTIONS) if finished['out'][i][f'latents_{res}']]
    for row, k in shown:
        assert np.array_equal(tile(good, row, 2 * k), tile(bad, row, 2 * k))  # same source crop
        assert np.abs(tile(good, row, 2 * k + 1) - tile(bad, row, 2 * k + 1)).mean() > 15  # ~26 measured


def test_preview_only_that_cannot_decode_exits_non_zero(root, finished, tiny_model, tmp_path):
    """--preview_only with a VAE that cannot decode the stored latents (16 channels for 4) draws nothing
    and says so with exit 2: the step asked for did not happen."""
    from testbed.families import write_vae

    model = tmp_path / 'wrong-model'
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns('vae'))
    write_vae(model / 'vae', 16, 0.3611, 0.1159)
    png = tmp_path / 'p.png'
    proc = run(root, '--remote_upload', finished['tmp'] / 'latents', '--bucket', UNBUCKETED, '--local',
               tmp_path / 'cache', '--model_name', model, '--preview', N, '--preview_only',
               '--preview_path', png)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith('error:')]
    assert errors and '--preview_only: no preview drawn' in errors[-1] and not png.exists()


@pytest.mark.parametrize('flags, phrase', [
    (['--preview', 3], 'cannot read convention.json and index.json of the output'),
    ([], '--preview_only: give --preview N'),
    (['--preview', -1], 'argument --preview: -1: must be 0 or more'),
])
def test_preview_flag_refusals(flags, phrase, root, tiny_model, tmp_path):
    assert phrase in refused('--remote_upload', tmp_path / 'nothing', '--bucket', UNBUCKETED, '--local',
                             tmp_path / 'cache', '--model_name', tiny_model, '--preview_only', *flags)
