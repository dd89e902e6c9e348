"""precompute_latents.py --crop aspect as a trainer of SDXL-era models uses it: every image in the
bucket nearest its aspect ratio, SDXL size conditioning beside the latent, one dataset per bucket, and
same-shaped batches from StreamingDataset.

The rule is restated here independently of the script (bucket list, nearest aspect, cover + crop),
and the stored latents are checked against direct encodes of the tiny VAE.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from test_precompute_latents import (
    kill9_after_first_part,
    markers,
    models,  # noqa: F401 (a fixture: the tiny model's VAE, text encoder)
    ok,
    refused,
    run,
)
from testbed.aspect import aspect_items
from testbed.corpus import make_jpeg
from testbed.mds_input import UNBUCKETED, make_row, rows_for, write_mds_input
from testbed.readback import one_opening_at_a_time, read_mds
from testbed.scripts import ROOT, one_torch_thread

STEP = 64  # the tiny VAE downsamples 8x: buckets in steps of 8 x 8


# ---- the rule, stated independently ---------------------------------------------------------------

def expected_buckets(res: int, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """Every (w, h), both multiples of 64, where h (or w) is a multiple of 64 up to res and the other
    side is the largest multiple of 64 keeping the area at most res^2, within 1:max..max:1."""
    sides = range(STEP, res * res // STEP + 1, STEP)
    found = []
    for w in sides:
        for h in sides:
            short, long = min(w, h), max(w, h)
            if short <= res and long == max(x for x in sides if x * short <= res * res) \
                    and long / short <= max_aspect:
                found.append((w, h))
    return sorted(found, key=lambda b: b[0] / b[1])


def expected_bucket(size: tuple[int, int], table: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose w/h differs from the image's by the smallest factor."""
    w, h = size
    factor = [max((bw / bh) / (w / h), (w / h) / (bw / bh)) for bw, bh in table]
    return table[factor.index(min(factor))]


def displayed(data: bytes) -> tuple[int, int]:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size


def expected_crop(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], int, int] | None:
    """((resized w, h), left, top) of a centred cover crop; None when covering would enlarge."""
    (w, h), (bw, bh) = size, bucket
    s = max(bw / w, bh / h)
    if s > 1:
        return None
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    return (rw, rh), (rw - bw) // 2, (rh - bh) // 2


def pixels_as_recorded(data: bytes, time_ids: list[int], resolutions_placed: list[tuple[int, int, int, int]],
                       mirrored: bool = False) -> torch.Tensor:
    """The image decoded as documented (a JPEG at the DCT scale that covers every resolution's resized
    size), resized to cover the bucket in `time_ids` and cropped at the recorded top-left, as the
    manual states it (docs/precompute_latents.md: one resize of the crop's box); [-1, 1]."""
    oh, ow, top, left, bh, bw = time_ids
    img = Image.open(io.BytesIO(data))
    if img.format == 'JPEG':
        scale = max(max(rw / ow, rh / oh) for rw, rh, _, _ in resolutions_placed)
        img.draft(img.mode, (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
    img = ImageOps.exif_transpose(img)
    if img.mode == 'RGBA':
        img = Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)), img)
    img = img.convert('RGB')
    s = max(bw / ow, bh / oh)
    rw, rh = max(bw, round(ow * s)), max(bh, round(oh * s))
    sx, sy = img.width / rw, img.height / rh  # the documented box: the crop mapped into the decode
    crop = img.resize((bw, bh), Image.Resampling.BILINEAR,
                      box=(left * sx, top * sy, (left + bw) * sx, (top + bh) * sy))
    if mirrored:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float()
    return (x / 127.5 - 1).unsqueeze(0)


def time_ids(blob: bytes) -> list[int]:
    return np.frombuffer(blob, np.int32).tolist()


def test_the_documented_box_resize_is_resize_to_cover_then_crop(corpus):
    """The manual's exact rule (one resize of the crop's box mapped into the image) takes the same
    samples as resizing the whole image to cover the bucket and cropping: within one level per pixel
    for every image, bucket and crop offset (a box off by one resized pixel is tens of levels)."""
    checked = 0
    for item in [it for it in list(corpus) + list(aspect_items()) if it.decodable]:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(item.data))).convert('RGB')
        for r in (64, 128, 256):
            table = expected_buckets(r)
            bw, bh = expected_bucket(img.size, table)
            placed = expected_crop(img.size, (bw, bh))
            if placed is None:
                continue
            (rw, rh), cleft, ctop = placed
            whole = np.asarray(img.resize((rw, rh), Image.Resampling.BILINEAR), dtype=np.int16)
            for left, top in {(cleft, ctop), (0, 0), (rw - bw, rh - bh)}:
                sx, sy = img.width / rw, img.height / rh
                box = np.asarray(img.resize((bw, bh), Image.Resampling.BILINEAR, box=(
                    left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)), dtype=np.int16)
                diff = np.abs(box - whole[top:top + bh, left:left + bw])
                assert diff.max() <= 1, (item.name, r, left, top, diff.max())
                checked += 1
    assert checked > 50


# ---- the main story ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def aspect_out(tmp_path_factory, root, corpus, tiny_model):
    """One --crop aspect --flip run over the whole corpus plus the unusual aspect ratios (mean mode)."""
    tmp = tmp_path_factory.mktemp('aspect')
    items = [it for it in list(corpus) + list(aspect_items()) if it.decodable]
    rows = rows_for(items)
    write_mds_input(str(tmp / 'mds'), rows, bucketed=False, size_limit=1 << 18)
    ok(run(root, '--remote_download', tmp / 'mds', '--bucket', UNBUCKETED, '--local', tmp / 'cache',
           '--remote_upload', tmp / 'out', '--model_name', tiny_model, '--crop', 'aspect', '--flip',
           '--resolutions', 64, 128, 256, '--latent_mode', 'mean', '--batch-size', 6, '--part_size', 12,
           '--num_workers', 1, '--summary', tmp / 'summary.json', '--preview', 8))
    return tmp / 'out' / UNBUCKETED, {r['key']: it for r, it in zip(rows, items)}, tmp


def test_the_preview_decodes_aspect_latents_at_their_bucket_shapes(aspect_out):
    """--preview on an aspect output: every latent is read at its sample's recorded bucket shape (a
    square reading would fail and leave the summary without a preview)."""
    out, _, tmp = aspect_out
    drawn = json.loads((tmp / 'summary.json').read_text())['preview']
    assert len(drawn['samples']) == 8
    with Image.open(drawn['path']) as png:
        assert png.format == 'PNG' and png.width > png.height / 8 > 0


def test_every_image_gets_its_nearest_bucket_with_sdxl_conditioning_and_matching_latents(aspect_out,
                                                                                         models):  # noqa: F811
    out, by_key, tmp = aspect_out
    conv = json.loads((out / 'convention.json').read_text())
    tables = {r: [tuple(b) for b in conv['crop']['buckets'][str(r)]] for r in (64, 128, 256)}
    for r, table in tables.items():
        assert table == expected_buckets(r), r
    assert tables[128] == [(64, 256), (128, 128), (256, 64)]
    assert conv['columns']['latents_128']['shape'] == [4, 'H/8', 'W/8']  # varies per sample, and says so
    assert 'per sample' in conv['columns']['latents_128']['shape_varies']
    assert conv['columns']['add_time_ids_128'] == {**conv['columns']['add_time_ids_128'], 'dtype': 'int32',
                                                   'shape': [6]}

    got = read_mds(str(out))
    assert sorted(o['key'] for o in got) == sorted(by_key)  # every decodable image once
    vae = models[0]
    seen_buckets: dict[int, set] = {r: set() for r in tables}
    with torch.inference_mode(), one_torch_thread():
        for o in got:
            size = displayed(o['jpg'])
            placed = []
            for r, table in tables.items():
                bucket = expected_bucket(size, table)
                crop = expected_crop(size, bucket)
                name = by_key[o['key']].name
                if crop is None:  # too small for this resolution: nothing stored, as in center mode
                    assert o[f'latents_{r}'] == b'' and o[f'aspect_bucket_{r}'] == -1, (name, r)
                    assert o[f'add_time_ids_{r}'] == b'' and o[f'latents_{r}_flipped'] == b''
                    continue
                (rw, rh), left, top = crop
                ids = time_ids(o[f'add_time_ids_{r}'])
                # SDXL's reader: diffusers' StableDiffusionXLPipeline._get_add_time_ids (pipelines/
                # stable_diffusion_xl/pipeline_stable_diffusion_xl.py) is
                # list(original_size + crops_coords_top_left + target_size), each (h, w) / (top, left),
                # as its training script (examples/text_to_image/train_text_to_image_sdxl.py) fills them.
                original_size, crops_coords_top_left = (size[1], size[0]), (top, left)
                target_size = (bucket[1], bucket[0])
                assert ids == list(original_size + crops_coords_top_left + target_size), (name, r)
                mirrored_left = rw - left - bucket[0]
                assert time_ids(o[f'add_time_ids_{r}_flipped']) == [*ids[:3], mirrored_left, *ids[4:]]
                assert table[o[f'aspect_bucket_{r}']] == bucket, (name, r)
                seen_buckets[r].add(bucket)
                placed.append((rw, rh, r, ids))
            for _, _, r, ids in placed:
                for column, mirrored in ((f'latents_{r}', False), (f'latents_{r}_flipped', True)):
                    x = pixels_as_recorded(o['jpg'], ids, placed, mirrored)
                    want = vae.encode(x).latent_dist.mean[0].numpy() * vae.config.scaling_factor
                    lat = np.frombuffer(o[column], np.float16).reshape(4, ids[4] // 8, ids[5] // 8)
                    np.testing.assert_allclose(lat.astype(np.float32), want, atol=2e-3, rtol=2e-3,
                                               err_msg=f'{name} {column}')
    assert seen_buckets[128] == set(tables[128])  # wide, tall and square all occur
    assert len(seen_buckets[256]) >= 4
    # The EXIF-turned image is stored wide but shown tall: it lands in a tall bucket.
    turned = next(o for o in got if by_key[o['key']].name == 'exif_turned_wide_to_tall.jpg')
    assert tables[128][turned['aspect_bucket_128']] == (64, 256)
    summary = json.loads((tmp / 'summary.json').read_text())
    assert summary['encoded']['128'] == sum(o['latents_128'] != b'' for o in got)


def manual_col(out: Path) -> Callable:
    """docs/precompute_latents.md's read-back helper `col()` (its "Read it back" block up to the end of the
    function), run as a user pastes it, over the output at `out`."""
    blocks = re.findall(r'```python\n(.*?)```', (ROOT / 'docs' / 'precompute_latents.md').read_text(), re.S)
    (block,) = [textwrap.dedent(b) for b in blocks if 'def col(' in b]
    lines = block.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('def col('))
    end = next(i for i, ln in enumerate(lines) if i > start and ln and not ln[0].isspace())
    scope = {'json': json, 'np': np, 'out': str(out)}
    exec('\n'.join(lines[:end]), scope)
    return scope['col']


def test_the_manuals_col_reads_every_new_column_of_an_aspect_output(aspect_out):
    """`col()` reads latents whose shape varies per sample ([4, 'H/8', 'W/8']) at the sample's bucket, b''
    as None, ints as they are, and the fixed shapes as recorded; each equal to a direct reading."""
    out, _, _ = aspect_out
    col = manual_col(out)
    conv = json.loads((out / 'convention.json').read_text())
    read = 0
    for o in read_mds(str(out)):
        for name, spec in conv['columns'].items():
            got = col(o, name)
            if spec['dtype'] == 'int32' and spec['shape'] == []:
                assert got == o[name], name
            elif o[name] == b'':
                assert got is None, name
            elif name.startswith('latents_'):
                h, w = time_ids(o[f'add_time_ids_{name.split("_")[1]}'])[4:6]
                want = np.frombuffer(o[name], np.float16).reshape(4, h // 8, w // 8)
                np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=name)
                read += 1
            else:
                want = np.frombuffer(o[name], np.dtype(spec['dtype'])).reshape(spec['shape'])
                np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=name)
    assert read > 20


def test_one_dataset_per_bucket_group_and_same_shaped_batches_from_the_manuals_recipe(aspect_out, tmp_path):
    out, by_key, _ = aspect_out
    groups = json.loads((out / 'aspect_groups.json').read_text())
    whole = read_mds(str(out))
    assert sum(g['samples'] for g in groups.values()) == len(whole)
    keys = []
    for name, info in groups.items():
        members = read_mds(str(out / name))
        keys += [o['key'] for o in members]
        for r, bucket in info['buckets'].items():  # one shape per column in a group
            shapes = {len(o[f'latents_{r}']) for o in members}
            assert shapes == ({0} if bucket is None else {4 * bucket[0] * bucket[1] // 64 * 2}), (name, r)
    assert sorted(keys) == sorted(o['key'] for o in whole)  # each sample in exactly one group

    # The manual's recipe (docs/precompute_latents.md): one Stream per group with a bucket at the training
    # resolution, per_stream batching. Every batch has one latent shape, and the epoch covers each group's
    # full batches.
    from streaming import Stream, StreamingDataLoader, StreamingDataset

    res, batch_size = 128, 2
    usable = [g for g, info in groups.items() if info['buckets'][str(res)] and info['samples'] >= batch_size]
    expected = sum(groups[g]['samples'] // batch_size * batch_size for g in usable)

    def loader(state=None):
        streams = [Stream(local=str(out / g)) for g in usable]
        with one_opening_at_a_time():
            ds = StreamingDataset(streams=streams, batch_size=batch_size, batching_method='per_stream',
                                  shuffle=True, shuffle_seed=3, num_canonical_nodes=1)
        dl = StreamingDataLoader(ds, batch_size=batch_size, num_workers=0)
        if state:
            dl.load_state_dict(state)
        return dl

    def shape(blob: bytes, sample_ids: bytes) -> tuple[int, ...]:
        oh, ow, top, left, bh, bw = time_ids(sample_ids)
        return np.frombuffer(blob, np.float16).reshape(4, bh // 8, bw // 8).shape

    dl = loader()
    epoch, seen = [], set()
    for batch in dl:
        shapes = {shape(b, t) for b, t in zip(batch[f'latents_{res}'], batch[f'add_time_ids_{res}'])}
        assert len(shapes) == 1, shapes
        seen |= shapes
        epoch.append(list(batch['key']))
    flat = [k for b in epoch for k in b]
    assert len(flat) == len(set(flat)) == expected and len(epoch) >= 4
    assert len(seen) >= 2  # batches of several shapes come, each of one shape
    # Resumable: stop after 3 batches, restore the loader's state, the rest of the epoch follows.
    dl = loader()
    it = iter(dl)
    for _ in range(3):
        next(it)
    state = dl.state_dict()
    del it, dl
    rest = [list(b['key']) for b in loader(state)]
    assert rest == epoch[3:]


# ---- resume, torchrun, random crops -------------------------------------------------------------------

def aspect_rows(n: int = 24) -> list[dict]:
    """Small JPEGs of many aspect ratios (some too small for 128 px), one broken file."""
    rows = []
    for i in range(n):
        w, h = [(150, 150), (300, 80), (80, 300), (200, 130), (140, 220), (60, 60)][i % 6]
        rows.append(make_row(i, make_jpeg(w + 7 * (i % 4), h + 5 * (i % 3), seed=3000 + i), f'a_{i}.jpg',
                             caption=f'aspect photo {i}'))
    if n > 5:
        rows[5] = make_row(5, b'\xff\xd8\xff\xe0 not a jpeg', 'broken_5.jpg')
    return rows


def test_random_crops_killed_run_resumed_equals_an_uninterrupted_run(root, tiny_model, tmp_path):
    """Random crops and bucket groups survive kill -9 and resume (two ranks are test_precompute_latents')."""
    rows = aspect_rows()
    write_mds_input(str(tmp_path / 'mds'), rows, bucketed=False, size_limit=1 << 13)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    common = ['--remote_download', tmp_path / 'mds', '--bucket', UNBUCKETED, '--model_name', tiny_model,
              '--crop', 'aspect', '--random_crop', '--resolutions', 64, 128, '--latent_mode', 'sample',
              '--batch-size', 2, '--part_size', 3, '--num_workers', 1, '--seed', 5]
    ok(run(root, *common, '--local', tmp_path / 'c1', '--remote_upload', tmp_path / 'ref', env=env))
    ref_out = tmp_path / 'ref' / UNBUCKETED

    out = tmp_path / 'out' / UNBUCKETED
    kill9_after_first_part(root, common, tmp_path / 'c2', tmp_path / 'out', out, env)
    done_before = len(markers(out))
    assert 1 <= done_before < len(markers(ref_out))
    ok(run(root, *common, '--local', tmp_path / 'c2', '--remote_upload', tmp_path / 'out',
           '--summary', tmp_path / 's.json', env=env))
    summary = json.loads((tmp_path / 's.json').read_text())
    total = len(markers(out))
    assert (summary['parts_before'], summary['parts_this_run']) == (done_before, total - done_before)

    ref, got = read_mds(str(ref_out)), read_mds(str(out))
    keys = [o['key'] for o in got]
    assert len(keys) == len(set(keys))  # no duplicates
    assert sorted(keys) == [r['key'] for r in rows if r['key'] != '000000005']
    assert ref == got  # same order, same bytes: same buckets, crops, noise and latents
    for name in json.loads((out / 'aspect_groups.json').read_text()):
        assert read_mds(str(out / name)) == read_mds(str(ref_out / name))
    # The crops are random (not all centred) and within the resized image.
    offsets = set()
    for o in got:
        for r in (64, 128):
            if o[f'add_time_ids_{r}']:
                oh, ow, top, left, bh, bw = time_ids(o[f'add_time_ids_{r}'])
                s = max(bw / ow, bh / oh)
                rw, rh = max(bw, round(ow * s)), max(bh, round(oh * s))
                assert 0 <= left <= rw - bw and 0 <= top <= rh - bh
                offsets.add((left == (rw - bw) // 2 and top == (rh - bh) // 2, (rw, rh) != (bw, bh)))
    assert (False, True) in offsets  # some crop with room to move is off centre

    # Resuming with center crops into this output is refused in one line.
    where = ['--local', tmp_path / 'c2', '--remote_upload', tmp_path / 'out']
    assert 'written with convention.crop.position=' in refused(*[c for c in common if c != '--random_crop'],
                                                               *where)
    assert "written with crop='aspect', this run has None" in refused(
        *common[:6], '--resolutions', 64, 128, '--latent_mode', 'sample', '--batch-size', 2, '--part_size', 3,
        '--num_workers', 1, '--seed', 5, *where)


@pytest.mark.parametrize('flags, phrase', [
    (['--random_crop'], '--random_crop: only with --crop aspect'),
    (['--max_aspect', 2], '--max_aspect: only with --crop aspect'),
    (['--crop', 'aspect', '--max_aspect', 0.5], 'argument --max_aspect: 0.5: must be at least 1'),
    (['--crop', 'aspect', '--resolutions', 32], '--crop aspect --resolutions 32: below the bucket step 64'),
])
def test_aspect_flags_are_refused_in_one_line(flags, phrase, root, tiny_model, tmp_path):
    write_mds_input(str(tmp_path / 'mds'), aspect_rows(2), bucketed=False)
    assert phrase in refused('--remote_download', tmp_path / 'mds', '--bucket', UNBUCKETED, '--local',
                             tmp_path / 'cache', '--remote_upload', tmp_path / 'out', '--model_name',
                             tiny_model, *flags)
    assert not glob.glob(str(tmp_path / 'out' / '**' / '*.mds'), recursive=True)
