"""Every script that decodes images, on real files of every kind (tests/testbed/real.py: Pillow's own
test images), through its command line: what it uses is the picture docs/decoding.md states (`shown`,
written apart from the scripts' `to_rgb`), and the undecodable files are skipped and named. One run
per script over the whole real set.

- caption_images.py: the captions equal the tiny LLaVA's on `shown` pictures (what the model sees), and
  the preview's tiles are those pictures;
- precompute_latents.py: the stored latents equal the tiny VAE's on `shown` crops (what is encoded);
- laion_cloudwriter.py: the preview's thumbnails are `shown` pictures (the undecodable ones grey).

What PIL warns and libtiff prints on the way is named in the summaries, never printed (libtiff writes
to file descriptor 2, past sys.stderr: the runs capture it). The decode's peak memory on a 16-bit image
is measured in a process of its own.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testbed.i2d_shards import shard_rows, write_shard
from testbed.mds_input import UNBUCKETED, rows_for, write_mds_input
from testbed.readback import read_mds
from testbed.real import KINDS, real_items, shown
from testbed.scripts import ROOT, c_stderr, load_script, one_torch_thread, run_main
from testbed.vlms import build_vlm, direct_captions

GOOD = [it for it in real_items() if it.decodable]
BAD = [it for it in real_items() if not it.decodable]
RESOLUTIONS = (8, 32, 512)  # every good file reaches 8 px, all but the 10 px LAB TIFF 32, none 512


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r['url'].rsplit('/', 1)[1]: r for r in rows}


def test_the_reference_is_the_stated_rule_and_not_what_the_scripts_did_before():
    """`shown` itself, on the kinds the issue names: a reference that agreed with the old decodes would
    let every test below pass on the bugs."""
    files = {it.name: it.data for it in GOOD}
    raw = np.asarray(Image.open(io.BytesIO(files['gray16_be.tif'])), np.float64)
    gray = np.asarray(shown(files['gray16_be.tif']), np.float64)
    assert abs(gray.mean() - raw.mean() / 257) < 0.5 and abs(gray.std() - raw.std() / 257) < 0.5
    assert gray.mean() < 3  # a dark picture, not solid white (caption_images' old decode)
    for name in ('rgba.webp', 'rgba.png', 'transparent.gif', 'palette_trns.png'):
        rgba = np.asarray(Image.open(io.BytesIO(files[name])).convert('RGBA'))
        clear = rgba[..., 3] == 0
        assert clear.any() and (np.asarray(shown(files[name]))[clear] == 255).all(), name  # not black
    keyed = Image.open(io.BytesIO(files['gray16_trns.png']))  # 16-bit, values 0..255: dark but for the key
    clear = np.asarray(keyed) == keyed.info['transparency']
    picture = np.asarray(shown(files['gray16_trns.png']))
    assert clear.any() and (picture[clear] == 255).all() and (picture[~clear] <= 1).all()
    stored = Image.open(io.BytesIO(files['exif_orientation_6.jpg'])).convert('RGB')
    assert np.array_equal(np.asarray(shown(files['exif_orientation_6.jpg'])),
                          np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))


# ---- caption_images.py --------------------------------------------------------------------------

NEW_TOKENS = 8
PROMPT = 'Describe this image.'


@pytest.fixture(scope='module')
def llava(tmp_path_factory) -> Path:
    return build_vlm('llava', tmp_path_factory.mktemp('llava'))


@pytest.fixture(scope='module')
def captioned(llava, tmp_path_factory) -> dict:
    """One caption_images.py run over every real file, with a preview of everything it wrote."""
    tmp = tmp_path_factory.mktemp('captions')
    rows = rows_for(list(real_items()))
    write_mds_input(str(tmp / 'local'), rows, bucketed=False)
    with one_torch_thread():  # the run and the reference generate calls: the same float math
        with c_stderr() as printed:
            code, out, err = run_main(
                'caption_images.py', '--local', tmp / 'local', '--bucket', UNBUCKETED, '--remote_upload',
                tmp / 'out', '--model_name', llava, '--prompt', PROMPT, '--max_new_tokens', NEW_TOKENS,
                '--batch-size', 4, '--keep_raw', '--summary', tmp / 's.json', '--preview', 100)
        assert code == 0, err[-3000:]
        got = read_mds(str(tmp / 'out' / UNBUCKETED))
        reference = direct_captions(llava, [shown(r['jpg']) for r in got], PROMPT, NEW_TOKENS)
    parts = [json.loads(m.read_text()) for m in sorted((tmp / 'out' / UNBUCKETED).glob('*/_done'))]
    return {'rows': rows, 'got': got, 'stdout': out, 'summary': json.loads((tmp / 's.json').read_text()),
            'reference': reference, 'printed': printed[0] + err, 'markers': parts}



def test_captions_see_each_real_file_as_the_rule_decodes_it(captioned):
    got = captioned['got']
    assert sorted(by_name(got)) == sorted(it.name for it in GOOD)  # each decodable file once
    assert [o['vlm_caption_raw'] for o in got] == captioned['reference']
    assert len(set(captioned['reference'])) > len(GOOD) // 2  # the pictures, not the prompt, shape them


def test_captions_skip_and_name_each_undecodable_real_file(captioned):
    """Each undecodable file named in its part's marker, with what PIL and libtiff said; the summary counts
    them by reason and names the first of each; the JPEG with a broken EXIF block is captioned, and PIL's
    warning about it is counted and named (issue 34's "count and name, do not print"), not printed."""
    keys = {r['url'].rsplit('/', 1)[1]: r['key'] for r in captioned['rows']}
    summary, parts = captioned['summary'], captioned['markers']
    skipped = {s['key']: s['reason'] for m in parts for s in m['skipped']}
    assert set(skipped) == {keys[it.name] for it in BAD} and summary['skipped'] == len(BAD)
    assert skipped[keys['webp_compressed.tif']] == ('OSError: decoder error -2; libtiff: WEBP compression '
                                                    'support is not configured')
    assert 'DecompressionBombWarning: Image size (151587072 pixels)' in skipped[keys['bmp_bomb.bmp']]
    by_reason = summary['skipped_names']['by_reason']
    assert sum(by_reason.values()) == len(BAD) and 'DecompressionBombError' in by_reason
    for reason, first in summary['skipped_names']['first'].items():
        assert f"key={first[0]['key']!r}" in captioned['stdout'], reason
    noted = {s['key']: s['notes'] for m in parts for s in m['noted']}
    assert set(noted) == {keys['bad_exif.jpg']} and summary['noted'] == 1
    assert noted[keys['bad_exif.jpg']][0].startswith('UserWarning: Corrupt EXIF data.')
    assert f"noted    1 x UserWarning: sample {summary['noted_names']['first']['UserWarning'][0]['id']} " \
           f"key={keys['bad_exif.jpg']!r} (first: UserWarning: Corrupt EXIF data." in captioned['stdout']
    assert 'WEBP' not in captioned['printed'] and 'Warning' not in captioned['printed']  # libtiff, PIL


def test_caption_preview_tiles_are_the_rule_and_its_path_is_printed(captioned):
    script = load_script('caption_images.py')
    path = captioned['summary']['preview']['path']
    assert f'preview  {path}' in captioned['stdout'].splitlines()
    assert captioned['summary']['preview']['samples'] == list(range(len(GOOD)))
    sheet = np.asarray(Image.open(path).convert('RGB'), np.int64)
    row_h = max(script.PREVIEW_TILE, 14 * (2 * script.PREVIEW_LINES + 2)) + 8  # as write_preview lays out
    for row, o in enumerate(captioned['got']):
        want = shown(o['jpg'])
        want.thumbnail((script.PREVIEW_TILE, script.PREVIEW_TILE))
        want = np.asarray(want, np.int64)
        top = 22 + row * row_h
        tile = sheet[top:top + want.shape[0], 8:8 + want.shape[1]]
        assert np.abs(tile - want).max() <= 1, o['url']


# ---- precompute_latents.py ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def encoded(tiny_model, tmp_path_factory) -> dict:
    """One precompute_latents.py run over every real file: latents in float32, the VAE's mean."""
    tmp = tmp_path_factory.mktemp('latents')
    rows = rows_for(list(real_items()))
    write_mds_input(str(tmp / 'local'), rows, bucketed=False)
    with c_stderr() as printed:
        code, out, err = run_main(
            'precompute_latents.py', '--local', tmp / 'local', '--bucket', UNBUCKETED, '--remote_upload',
            tmp / 'out', '--model_name', tiny_model, '--resolutions', *RESOLUTIONS, '--latent_mode', 'mean',
            '--storage_dtype', 'float32', '--num_workers', 0, '--threads', 1, '--batch-size', 8,
            '--summary', tmp / 's.json')
    assert code == 0, err[-3000:]
    parts = [json.loads(m.read_text()) for m in sorted((tmp / 'out' / UNBUCKETED).glob('*/_done'))]
    return {'rows': rows, 'got': read_mds(str(tmp / 'out' / UNBUCKETED)), 'stdout': out,
            'summary': json.loads((tmp / 's.json').read_text()), 'printed': printed[0] + err,
            'markers': parts}


def shown_crop(data: bytes, res: int) -> torch.Tensor | None:
    """The rule's picture (a JPEG at the DCT scale of the largest resolution it reaches), its largest
    centred square resized (bilinear) to res x res, in [-1, 1]; None when it is smaller than res."""
    short = min(shown(data).size)
    if short < res:
        return None
    need = max(r for r in RESOLUTIONS if r <= short)
    img = shown(data, draft=(need, need))
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.resize((res, res), Image.Resampling.BILINEAR, box=(left, top, left + s, top + s))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_latents_encode_each_real_file_as_the_rule_decodes_it(encoded, tiny_model):
    from diffusers import AutoencoderKL

    got = by_name(encoded['got'])
    assert sorted(got) == sorted(it.name for it in GOOD)
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder='vae').eval()
    with one_torch_thread():
        for it in GOOD:
            for res in RESOLUTIONS:
                stored = got[it.name][f'latents_{res}']
                x = shown_crop(it.data, res)
                if x is None:
                    assert stored == b'', (it.name, res)
                    continue
                with torch.inference_mode():
                    want = vae.encode(x).latent_dist.mean[0].numpy() * vae.config.scaling_factor
                have = np.frombuffer(stored, np.float32).reshape(want.shape)
                np.testing.assert_allclose(have, want, atol=1e-4, rtol=1e-3,
                                           err_msg=f'{it.name} ({KINDS[it.name][0]}) at {res} px')
    assert encoded['summary']['encoded'] == {'8': len(GOOD), '32': len(GOOD) - 1, '512': 0}


def test_latents_skip_and_name_each_undecodable_real_file_and_warn_of_an_empty_resolution(encoded):
    keys = {r['url'].rsplit('/', 1)[1]: r['key'] for r in encoded['rows']}
    summary = encoded['summary']
    assert {s['key'] for m in encoded['markers'] for s in m['skipped']} == {keys[it.name] for it in BAD}
    for reason, first in summary['skipped_names']['first'].items():  # the first of each, on the screen
        assert f"key={first[0]['key']!r}" in encoded['stdout'], reason
    assert ("warning no image is large enough for 512 px (images are not upscaled): latents_512 is b'' "
            'in every sample') in encoded['stdout'].splitlines()


def test_latents_name_what_pil_and_libtiff_said_and_print_none_of_it(encoded):
    """libtiff's complaint about the WebP-compressed TIFF, PIL's DecompressionBombWarning about the BMP that
    declares 151 M pixels and its "Corrupt EXIF data" about a kept JPEG: each named with its sample in the
    summary (the reason of a skip, a note of a kept image), none printed into the progress bar."""
    keys = {r['url'].rsplit('/', 1)[1]: r['key'] for r in encoded['rows']}
    summary = encoded['summary']
    reasons = {s['key']: s['reason'] for m in encoded['markers'] for s in m['skipped']}
    assert reasons[keys['webp_compressed.tif']] == ('OSError: decoder error -2; libtiff: WEBP compression '
                                                    'support is not configured')
    assert 'DecompressionBombWarning: Image size (151587072 pixels) exceeds limit' in \
        reasons[keys['bmp_bomb.bmp']]
    noted = {s['key']: s['notes'] for m in encoded['markers'] for s in m['noted']}
    assert summary['noted'] == len(noted) and set(noted) == {keys['bad_exif.jpg']}
    assert noted[keys['bad_exif.jpg']][0].startswith('UserWarning: Corrupt EXIF data.')
    assert 'noted   1 image(s) decoded with a warning from PIL or libtiff (kept)' in encoded['stdout']
    assert f"noted   1 x UserWarning: sample {summary['noted_names']['first']['UserWarning'][0]['id']} key=" \
           f"{keys['bad_exif.jpg']!r} (first: UserWarning: Corrupt EXIF data." in encoded['stdout']
    assert 'WEBP' not in encoded['printed'] and 'Warning' not in encoded['printed'], encoded['printed']


def test_latents_of_a_bucket_below_every_resolution_exit_2_and_say_why(tiny_model, tmp_path):
    """--bucket 1 (64-128 px) with the default --resolutions 256 512: no latent at all is an error."""
    write_mds_input(str(tmp_path / 'local'), rows_for(list(real_items())))  # bucketed by header size
    code, out, err = run_main(
        'precompute_latents.py', '--local', tmp_path / 'local', '--bucket', 1, '--remote_upload',
        tmp_path / 'out', '--model_name', tiny_model, '--num_workers', 0, '--threads', 1,
        '--summary', tmp_path / 's.json')
    assert code == 2 and 'Traceback' not in err, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith('error:')] == [
        'error: no latent written: no image is large enough for --resolutions 256 512 (--bucket 64-128: '
        'shorter sides below 128 px), and images are not upscaled; rerun with smaller --resolutions and a '
        'new --remote_upload']
    summary = json.loads((tmp_path / 's.json').read_text())
    assert summary['written'] > 0 and summary['encoded'] == {'256': 0, '512': 0}
    assert 'warning no image is large enough for 256, 512 px' in out


# ---- the decode's memory -------------------------------------------------------------------------

PEAK = textwrap.dedent("""
    import importlib.util, sys
    def kb(field):  # of this process, from /proc/self/status
        return int(next(ln for ln in open('/proc/self/status') if ln.startswith(field)).split()[1])
    spec = importlib.util.spec_from_file_location('script', sys.argv[1])
    script = importlib.util.module_from_spec(spec)
    sys.modules['script'] = script
    spec.loader.exec_module(script)
    data = open(sys.argv[2], 'rb').read()
    before = kb('VmRSS')
    open('/proc/self/clear_refs', 'w').write('5')  # VmHWM, the peak, starts again from here
    img = script.decode(data)
    print((kb('VmHWM') - before) * 1024 / (img.width * img.height))
""")


def test_a_16_bit_image_decodes_in_about_the_memory_of_an_rgb_one(tmp_path):
    """The issue's 13,000 x 13,000 16-bit PNG took 4.8 GB in precompute_latents.py (RGB: 1.2 GB): the
    decode rule's 16-bit path worked in float64. Here a 2,000 x 2,000 one and its RGB twin are each decoded
    by the decode twin in a process of its own: the peak memory the decode adds, in bytes per pixel."""
    side = 2000
    ramp = (np.add.outer(np.arange(side) * 7, np.arange(side) * 3) % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / 'gray16.png')  # I;16, every value
    Image.fromarray((ramp >> 8).astype(np.uint8)).convert('RGB').save(tmp_path / 'rgb.png')
    per_pixel = {}
    for name in ('gray16.png', 'rgb.png'):
        cmd = [sys.executable, '-c', PEAK, str(ROOT / 'caption_images.py'), str(tmp_path / name)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        per_pixel[name] = float(proc.stdout.split()[-1])
    # the 16-bit image (2 bytes), its 32-bit copy for PIL's table, the 8-bit result, then RGB (3): ~7 bytes
    # a pixel, where the float64 copies took ~26; an RGB PNG takes ~4
    assert per_pixel['gray16.png'] < 10 and per_pixel['gray16.png'] < 2.5 * per_pixel['rgb.png'], per_pixel


# ---- laion_cloudwriter.py --preview -------------------------------------------------------------

def test_cloudwriter_preview_shows_each_real_file_as_the_rule_decodes_it(root, tmp_path):
    cw = load_script('laion_cloudwriter.py')
    items = list(real_items())
    per = cw.PREVIEW_PER_SHARD  # every sample a candidate: each shard keeps its first PREVIEW_PER_SHARD
    shards = [items[i:i + per] for i in range(0, len(items), per)]
    named = {}
    for s, chunk in enumerate(shards):
        rows = shard_rows(s, chunk, failures=0)
        write_shard(tmp_path / 'parquet', s, rows)
        named.update({r['key']: it for r, it in zip(rows, chunk)})
    (tmp_path / 'parquet' / 'done').touch()
    args = ['--local', tmp_path / 'parquet', '--remote', tmp_path / 'mds', '--preview', len(items) + 1]
    proc = subprocess.run([sys.executable, str(root / 'laion_cloudwriter.py'), *map(str, args)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: files left out, counted
    assert 'WEBP' not in proc.stderr and 'Warning' not in proc.stderr, proc.stderr[-3000:]  # libtiff, PIL
    preview = json.loads((tmp_path / 'parquet' / '_cloudwriter' / 'summary.json').read_text())['preview']
    (sheet_info,) = preview.values()
    keys = sheet_info['keys']
    assert {named[k].name for k in keys} >= {it.name for it in GOOD}  # every decodable file drawn
    sheet = np.asarray(Image.open(sheet_info['png']).convert('RGB'), np.float64)
    cell, lines = cw.PREVIEW_THUMB, cw.PREVIEW_LINES
    cols = int(np.ceil(np.sqrt(len(keys))))
    for i, key in enumerate(keys):
        it = named[key]
        x0, y0 = (i % cols) * (cell + 8) + 4, 20 + (i // cols) * (cell + 8 + 12 * lines) + 4
        if not it.decodable:  # a grey tile: no thumbnail, and no bomb decoded
            assert (sheet[y0:y0 + cell, x0:x0 + cell] == 200).all(), it.name
            continue
        want = shown(it.data, draft=(cell, cell))  # a JPEG is decoded at the DCT scale of the thumbnail
        want.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        want = np.asarray(want, np.float64)
        h, w = want.shape[:2]
        x, y = x0 + (cell - w) // 2, y0 + (cell - h) // 2
        # The thumbnail is stored as a JPEG (quality 90): up to ~6 levels off on these files; a wrong
        # decode (orientation, 16-bit, a background, the first frame) is 35 to 250 levels off.
        diff = np.abs(sheet[y:y + h, x:x + w] - want).mean()
        assert diff < 10, f'{it.name} ({KINDS[it.name][0]}): mean difference {diff:.1f}'
