"""precompute_latents.py as a user runs it: MDS in (as laion_cloudwriter.py writes it), MDS with latents out.

Inputs are built with streaming's MDSWriter from the test bed corpus (tests/testbed/mds_input.py); the
output is read back with StreamingDataset and checked against direct calls of the same tiny models.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from testbed.corpus import build_corpus, encode, make_jpeg, photo_like
from testbed.families import CLIP_L, build_tiny_family, write_clip
from testbed.llm_families import build_llm_family
from testbed.mds_input import (
    COLUMNS,
    ENDPOINT_VARIABLES,
    UNBUCKETED,
    endpoint_only_in,
    make_row,
    rows_for,
    write_mds_input,
)
from testbed.readback import read_mds
from testbed.scripts import load_script, one_torch_thread, run_main, run_script

HIDDEN = 1024
BROKEN = {'truncated.jpg', 'random.bin', 'empty.jpg'}


def run(root: Path, *args, env: dict | None = None, timeout: float = 300, torchrun: int = 0,
        own_process: bool = False) -> subprocess.CompletedProcess:
    """The script's command line as a user types it: in processes of its own under torchrun or with
    `own_process`; else in this process as its own process would run it (testbed.scripts.run_script:
    no interpreter, torch and model-library start-up per run)."""
    if not (torchrun or own_process):
        return run_script('precompute_latents.py', *args, env=env)
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                '--nproc_per_node', str(torchrun), '--'] if torchrun else [sys.executable]
    cmd = launcher + [str(root / 'precompute_latents.py'), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def refused(*args) -> str:
    """The error line of a command line the script refuses, run through its main() in this process
    (no interpreter and torch start-up per case): exit 2, one `error:` line (the script's, or argparse's
    `<prog>: error: argument ...` for a flag its `type=` or `choices=` refuses), no traceback."""
    script = load_script('precompute_latents.py')
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # main() installs its own
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                pytest.raises(SystemExit) as stop:
            script.main([str(a) for a in args])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert stop.value.code == 2 and 'Traceback' not in err.getvalue(), err.getvalue()[-3000:]
    lines = err.getvalue().splitlines()
    errors = [ln for ln in lines if ln.startswith('error:') or ': error: argument ' in ln]
    assert len(errors) == 1, err.getvalue()[-3000:]
    return errors[0]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error a user sees: exit code 2, one `error:` line, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith('error:')]
    assert len(errors) >= 1, proc.stderr[-3000:]
    return errors[-1]


# ---- an independent reading of the documented preprocessing -------------------------------------

def reference_pixels(data: bytes, res: int, resolutions: list[int]) -> torch.Tensor:
    """Decode (JPEG at the DCT scale the largest usable resolution allows), apply EXIF orientation,
    alpha over white, RGB, the largest centered square resized bilinear to res x res, to [-1, 1]."""
    img = Image.open(io.BytesIO(data))
    if img.format == 'JPEG':
        need = max(r for r in resolutions if r <= min(img.size))
        img.draft(img.mode, (need, need))
    img = ImageOps.exif_transpose(img)
    if img.mode == 'RGBA':
        white = Image.new('RGBA', img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    img = img.convert('RGB')
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    img = img.resize((res, res), Image.Resampling.BILINEAR, box=box)  # the square region, resized
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    return (x / 127.5 - 1).unsqueeze(0)


def as_array(blob: bytes, *shape: int) -> np.ndarray:
    return np.frombuffer(blob, np.float16).reshape(shape).astype(np.float32)


def shorter_side(data: bytes) -> int:
    return min(Image.open(io.BytesIO(data)).size)


@pytest.fixture(scope='module')
def models(tiny_model):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder='vae', low_cpu_mem_usage=False).eval()
    te = CLIPTextModel.from_pretrained(tiny_model, subfolder='text_encoder').eval()
    tok = CLIPTokenizer.from_pretrained(tiny_model, subfolder='tokenizer')
    return vae, te, tok


# ---- the main story -----------------------------------------------------------------------------

def test_mean_mode_output_is_the_input_plus_latents_training_can_read(root, corpus, tiny_model, models,
                                                                       tmp_path):
    rows = rows_for(list(corpus))
    write_mds_input(str(tmp_path / 'mds'), rows, bucketed=False, size_limit=1 << 18)
    summary_path = tmp_path / 'summary.json'
    proc = ok(run(root, '--remote_download', tmp_path / 'mds', '--bucket', UNBUCKETED,
                  '--local', tmp_path / 'cache', '--remote_upload', tmp_path / 'latents',
                  '--model_name', tiny_model, '--latent_mode', 'mean', '--batch-size', 4,
                  '--part_size', 8, '--num_workers', 2, '--summary', summary_path))
    out = read_mds(str(tmp_path / 'latents' / UNBUCKETED))

    # Every decodable sample exactly once, in input order, every input column unchanged.
    names = [it.name for it in corpus]
    good = [r for r, name in zip(rows, names) if name not in BROKEN]
    assert [o['key'] for o in out] == [r['key'] for r in good]
    for o, r in zip(out, good):
        for col in COLUMNS:
            assert o[col] == r[col], col

    # The broken images are counted and named.
    summary = json.loads(summary_path.read_text())
    broken_keys = {r['key'] for r, name in zip(rows, names) if name in BROKEN}
    assert summary['skipped'] == 3 and summary['written'] == len(good)
    named = [s['key'] for m in markers(tmp_path / 'latents' / UNBUCKETED) for s in json.loads(
        Path(m).read_text())['skipped']]  # each in its part's marker; the summary: the first by reason
    first = {s['key'] for f in summary['skipped_names']['first'].values() for s in f}
    assert set(named) == broken_keys == first
    assert all(k in proc.stdout for k in broken_keys)

    # Read as training code does; b'' below each resolution.
    vae, te, tok = models
    by_name = dict(zip([n for n in names if n not in BROKEN], out))
    for name, o in by_name.items():
        assert np.frombuffer(o['caption_latents'], np.float16).reshape(77, HIDDEN).shape == (77, HIDDEN)
        short = shorter_side(o['jpg'])
        for res in (256, 512):
            blob = o[f'latents_{res}']
            if short < res:
                assert blob == b'', (name, res)
            else:
                lat = np.frombuffer(blob, np.float16).reshape(4, res // 8, res // 8)
                assert np.isfinite(lat).all() and lat.astype(np.float32).std() > 0
    assert summary['encoded'] == {'256': sum(shorter_side(o['jpg']) >= 256 for o in out),
                                  '512': sum(shorter_side(o['jpg']) >= 512 for o in out)}

    # Latents equal a direct encode of the documented preprocessing (awkward formats included);
    # caption latents equal a direct text-encoder call.
    check = ['exif_rotated.jpg', 'cmyk.jpg', 'gray.jpg', 'alpha.png', 'image.webp',
             'portrait_300_progressive.jpg', 'landscape_600_baseline.jpg', 'portrait_1030_baseline.jpg']
    with torch.inference_mode(), one_torch_thread():
        for name in check:
            o = by_name[name]
            for res in [r for r in (256, 512) if r <= shorter_side(o['jpg'])]:
                x = reference_pixels(o['jpg'], res, [256, 512])
                want = vae.encode(x).latent_dist.mean[0].numpy() * vae.config.scaling_factor
                got = np.frombuffer(o[f'latents_{res}'], np.float16).reshape(want.shape).astype(np.float32)
                np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3, err_msg=f'{name} {res}')
            ids = tok(o['caption'], padding='max_length', max_length=77, truncation=True,
                      return_tensors='pt').input_ids
            want = te(ids).last_hidden_state[0].numpy()
            got = np.frombuffer(o['caption_latents'], np.float16).reshape(77, HIDDEN).astype(np.float32)
            np.testing.assert_allclose(got, want, atol=2e-2, rtol=1e-2, err_msg=name)

    # Orientation matters: the rotated image's latents are not those of its stored pixels.
    o = by_name['exif_rotated.jpg']
    with torch.inference_mode(), one_torch_thread():
        raw = Image.open(io.BytesIO(o['jpg'])).convert('RGB')  # no EXIF transpose
        x = torch.from_numpy(np.asarray(raw.crop((50, 0, 350, 300)).resize((256, 256),
                                                                       Image.Resampling.BILINEAR)).copy())
        unrotated = vae.encode(x.permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1).latent_dist.mean[0]
    got = np.frombuffer(o['latents_256'], np.float16).reshape(4, 32, 32).astype(np.float32)
    assert np.abs(got - unrotated.numpy() * vae.config.scaling_factor).max() > 0.05


# ---- resume and torchrun ------------------------------------------------------------------------

def small_rows(n: int = 30) -> list[dict]:
    """Small photo-like JPEGs (shorter sides 40-150 px: some below 64 and 128) and one bad file."""
    rows = []
    for i in range(n):
        s = (40, 70, 100, 130, 150)[i % 5]
        data = make_jpeg(s + 10 * (i % 3), s, seed=1000 + i) if i % 2 else make_jpeg(s, s + 17, seed=1000 + i)
        rows.append(make_row(i, data, f'small_{i}.jpg', caption=f'small photo {i}' + ' word' * (i % 4)))
    rows[7] = make_row(7, b'\xff\xd8\xff\xe0 not really a jpeg', 'broken_7.jpg')
    return rows


def markers(out: Path) -> list[str]:
    return sorted(glob.glob(str(out / '*' / '_done')))


def kill9_after_first_part(root: Path, common: list, local: Path, upload: Path, out: Path,
                           env: dict) -> None:
    """Run the script with `common` flags into `upload`; kill -9 its process group as soon as the
    first part of `out` has its _done marker (or the run ends)."""
    cmd = [sys.executable, str(root / 'precompute_latents.py'), *map(str, common),
           '--local', str(local), '--remote_upload', str(upload)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not markers(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_run_resumed_on_two_ranks_equals_an_uninterrupted_run(root, tiny_model, tmp_path):
    rows = small_rows()
    write_mds_input(str(tmp_path / 'mds'), rows, bucketed=False, size_limit=1 << 14)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # bitwise-equal float math in every process
    common = ['--remote_download', tmp_path / 'mds', '--bucket', UNBUCKETED, '--model_name', tiny_model,
              '--resolutions', 64, 128, '--latent_mode', 'sample', '--batch-size', 2, '--part_size', 3,
              '--num_workers', 1, '--seed', 7]

    ok(run(root, *common, '--local', tmp_path / 'c1', '--remote_upload', tmp_path / 'ref', env=env))
    ref_out = tmp_path / 'ref' / UNBUCKETED
    total_parts = len(glob.glob(str(ref_out / '0*')))
    assert total_parts >= 6

    # Kill -9 once the first parts are finished, then resume with two ranks.
    out = tmp_path / 'out' / UNBUCKETED
    kill9_after_first_part(root, common, tmp_path / 'c2', tmp_path / 'out', out, env)
    done_before = len(markers(out))
    assert 1 <= done_before < total_parts, done_before
    assert not (out / 'index.json').exists()

    res = ok(run(root, *common, '--local', tmp_path / 'c2', '--remote_upload', tmp_path / 'out',
                 '--summary', tmp_path / 's.json', env=env, torchrun=2))
    summary = json.loads((tmp_path / 's.json').read_text())
    assert summary['parts_before'] == done_before and summary['world_size'] == 2, res.stdout
    ranks = {json.loads(Path(m).read_text())['rank'] for m in markers(out)}
    assert ranks == {0, 1}  # both ranks took parts

    ref, got = read_mds(str(ref_out)), read_mds(str(out))
    keys = [o['key'] for o in got]
    assert len(keys) == len(set(keys))  # no duplicates
    assert keys == [r['key'] for r in rows if r['key'] != '000000007']  # union equals the input
    for a, b in zip(ref, got):
        assert a == b  # same columns, same bytes: same latents, noise included
    assert summary['skipped'] == 1
    assert [s['key'] for f in summary['skipped_names']['first'].values() for s in f] == ['000000007']
    # Resuming into that output with other settings would mix two kinds of latents: refused.
    rerun = [*common, '--local', tmp_path / 'c2', '--remote_upload', tmp_path / 'out']
    assert 'latent_mode' in refused(*rerun, '--latent_mode', 'mean')
    # So would another --batch-size (float results depend on it) or another input dataset.
    assert 'written with batch_size=2, this run has 3' in refused(*rerun, '--batch-size', 3)
    other = tmp_path / 'other'
    write_mds_input(str(other), [{**rows[0], 'caption': 'another caption'}] + rows[1:], bucketed=False,
                    size_limit=1 << 14)
    assert 'written with input_index=' in refused(*rerun, '--remote_download', other)
    sample = got[0]
    assert sample['latents_64'] == b'' and len(sample['latents_128']) == 0  # 40 px: below both
    big = next(o for o in got if shorter_side(o['jpg']) >= 128)
    assert as_array(big['latents_128'], 4, 16, 16).std() > 0


# ---- S3 ----------------------------------------------------------------------------------------

def test_s3_in_and_out_by_bucket_index_and_unreachable_remote(root, s3, corpus, tiny_model, tmp_path):
    rows = rows_for(list(corpus))
    buckets = write_mds_input(f's3://{s3.bucket}/mds', rows, env=s3.env, cache=str(tmp_path / 'w'),
                              size_limit=1 << 18)
    env = s3.child_env()
    cache = tmp_path / 'cache'
    ok(run(root, '--remote_download', f's3://{s3.bucket}/mds', '--bucket', 3, '--local', cache,
           '--remote_upload', f's3://{s3.bucket}/latents', '--model_name', tiny_model,
           '--resolutions', 256, '--batch-size', 4, '--num_workers', 1, '--part_size', 4, env=env))

    # --bucket 3 is '256-512': its decodable samples, once each, with 256 px latents.
    want = [r for r in buckets['256-512'] if r['key'] not in
            {rows[i]['key'] for i, it in enumerate(corpus) if not it.decodable}]
    got = read_mds(f's3://{s3.bucket}/latents/256-512', env=s3.env)
    assert [o['key'] for o in got] == [r['key'] for r in want] and len(want) >= 6
    for o in got:
        assert as_array(o['latents_256'], 4, 32, 32).std() > 0
        assert as_array(o['caption_latents'], 77, HIDDEN).std() > 0
    keys = s3.list_keys(s3.bucket, 'latents/')
    assert 'latents/256-512/index.json' in keys and 'latents/256-512/00000/_done' in keys
    assert not glob.glob(str(cache / '**' / '*.mds'), recursive=True)  # downloaded shards evicted

    # The remote goes down: one clear line and a non-zero exit.
    s3.stop()
    with pytest.MonkeyPatch.context() as mp:  # in this process, as the run above saw S3
        for k, v in s3.env.items():
            mp.setenv(k, v)
        assert 'cannot read the input dataset index' in refused(
            '--remote_download', f's3://{s3.bucket}/mds', '--bucket', 3, '--local', tmp_path / 'cache2',
            '--remote_upload', f's3://{s3.bucket}/latents2', '--model_name', tiny_model)


@pytest.mark.parametrize('variable', ENDPOINT_VARIABLES)
def test_an_s3_compatible_endpoint_named_by_either_variable_is_read_and_written(variable, root, s3,
                                                                                 tiny_model, tmp_path):
    """The endpoint in streaming's S3_ENDPOINT_URL or in botocore's AWS_ENDPOINT_URL alone: the input
    is read from it, and the output (its listing, parts, markers, index) written to it."""
    rows = [make_row(i, encode(photo_like(80, 70, i), 'JPEG'), f'{i}.jpg') for i in range(3)]
    src, out = f's3://{s3.bucket}/in', f's3://{s3.bucket}/out'
    write_mds_input(src, rows, bucketed=False, env=s3.env, cache=str(tmp_path / 'w'))
    ok(run(root, '--remote_download', src, '--bucket', UNBUCKETED, '--local', tmp_path / 'c',
           '--remote_upload', out, '--model_name', tiny_model, '--resolutions', 64, '--num_workers', 0,
           env=endpoint_only_in(s3, variable)))
    got = read_mds(f'{out}/{UNBUCKETED}', env=s3.env)
    assert [o['key'] for o in got] == [r['key'] for r in rows] and all(o['latents_64'] for o in got)


# ---- clear errors -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_input(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('tiny-input')
    rows = [make_row(i, encode(photo_like(80, 70, i), 'JPEG'), f'{i}.jpg') for i in range(2)]
    write_mds_input(str(folder / 'ok'), rows, bucketed=False)
    for missing in ('jpg', 'caption'):
        cols = {k: v for k, v in COLUMNS.items() if k != missing}
        write_mds_input(str(folder / f'no_{missing}'), rows, bucketed=False, columns=cols)
    return folder


def partial_model(tiny_model: Path, tmp_path: Path, without: str) -> Path:
    folder = tmp_path / f'model-without-{without}'
    folder.mkdir()
    for sub in ('vae', 'text_encoder', 'tokenizer'):
        if sub != without:
            (folder / sub).symlink_to(tiny_model / sub)
    return folder


@pytest.mark.parametrize('case, phrase', [
    ('resolution', 'multiple of 8'),
    ('no_vae', 'has no vae/'),
    ('no_text_encoder', 'has no text_encoder/'),
    ('no_jpg', 'no `jpg` column'),
    ('no_caption', 'no `caption` column'),
    ('no_vlm_caption', 'no `vlm_caption` column'),
])
def test_clear_one_line_errors(case, phrase, root, tiny_model, tiny_input, tmp_path):
    data, model, extra = 'ok', tiny_model, []
    if case == 'resolution':
        extra = ['--resolutions', 256, 100]
    elif case == 'no_vlm_caption':
        extra = ['--caption_keys', 'caption', 'vlm_caption']
    elif case.startswith('no_') and case[3:] in ('vae', 'text_encoder'):
        model = partial_model(tiny_model, tmp_path, case[3:])
    else:
        data = case
    assert phrase in refused('--remote_download', tiny_input / data, '--bucket', UNBUCKETED,
                             '--local', tmp_path / 'cache', '--remote_upload', tmp_path / 'out',
                             '--model_name', model, *extra)
    assert not (tmp_path / 'out').exists()


def test_corpus_helpers_are_what_the_tests_assume(corpus):
    """Guards the assumptions above: three broken files, and the awkward formats present."""
    assert {it.name for it in corpus if not it.decodable} == BROKEN
    assert build_corpus() == corpus


# ---- ordinary mistakes: places that coincide, stale caches, signals, bad flags ------------------

def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: to show an input is intact."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def group_alive(pgid: int) -> set[int]:
    """Live (not zombie) processes of process group `pgid`, read from /proc."""
    alive = set()
    for stat in glob.glob('/proc/[0-9]*/stat'):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(stat).read_text().rsplit(')', 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != 'Z':
                alive.add(int(stat.split('/')[2]))
    return alive


def start(root: Path, *args, env: dict | None = None) -> subprocess.Popen:
    """The script in its own process group (so its workers can be found), output to files."""
    cmd = [sys.executable, str(root / 'precompute_latents.py'), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert condition(), f'never happened; exit {proc.poll()}'


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.mark.parametrize('case', [
    'issue example: --local is --remote_upload', 'output is the input through a symlink',
    '--local is the input folder', 'remote output is the remote input'])
def test_input_cache_and_output_in_one_place_are_refused(case, root, tiny_model, tiny_input, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_input / 'ok', data)
    (tmp_path / 'link').symlink_to(data)
    before = tree(data)
    flags = {
        'issue example: --local is --remote_upload':
            ['--remote_download', data, '--local', tmp_path / 'x', '--remote_upload', tmp_path / 'x/'],
        'output is the input through a symlink':
            ['--remote_download', data, '--local', tmp_path / 'cache', '--remote_upload', tmp_path / 'link'],
        '--local is the input folder':
            ['--remote_download', data, '--local', './link/.', '--remote_upload', tmp_path / 'out'],
        'remote output is the remote input':
            ['--remote_download', 's3://bucket/laion', '--local', tmp_path / 'cache',
             '--remote_upload', 's3://bucket//laion/'],
    }[case]
    proc = run_script('precompute_latents.py', *flags, '--bucket', UNBUCKETED, '--model_name', tiny_model,
                      cwd=tmp_path)
    line = one_line_error(proc)
    assert 'places of their own' in line and ('same place' in line or 'inside' in line or 'holds' in line)
    assert tree(data) == before  # nothing deleted, nothing added
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'x').exists()


@pytest.mark.parametrize('bucket', [UNBUCKETED, ''])
def test_an_output_place_holding_another_dataset_is_refused_and_left_alone(bucket, root, tiny_model,
                                                                            tiny_input, tmp_path):
    """The issue's victim: a copy of a dataset (by bucket, or the root itself with --bucket '') given as
    --remote_upload is refused in one line, every file as it was; this script's own output is not."""
    data = tiny_input / 'ok' / (UNBUCKETED if not bucket else '')  # --bucket '': the root is a dataset
    victim = tmp_path / 'victim'
    shutil.copytree(data, victim)
    before = tree(victim)
    flags = ['--remote_download', data, '--local', tmp_path / 'cache', '--bucket', bucket,
             '--model_name', tiny_model, '--resolutions', 64, '--num_workers', 0]
    line = refused(*flags, '--remote_upload', victim)
    assert '--remote_upload' in line and 'did not write' in line
    assert tree(victim) == before  # nothing replaced, nothing added
    if bucket:  # its own output, finished, is rerun (resumed) without a word
        ok(run(root, *flags, '--remote_upload', tmp_path / 'mine'))
        ok(run(root, *flags, '--remote_upload', tmp_path / 'mine'))


def test_caption_dropout_is_recorded_in_the_convention_and_per_sample(root, tiny_model, tmp_path):
    """--caption_drop_prob: convention.json states the probability, and `caption_dropped` says which
    samples' caption latents encode '' (what the pipeline computes for ''), while `caption` keeps its text."""
    from testbed.families import pipeline_of

    rows = small_rows(12)
    del rows[7]  # no broken file here
    write_mds_input(str(tmp_path / 'mds'), rows, bucketed=False)
    ok(run(root, '--remote_download', tmp_path / 'mds', '--bucket', UNBUCKETED, '--local', tmp_path / 'c',
           '--remote_upload', tmp_path / 'out', '--model_name', tiny_model, '--resolutions', 64,
           '--num_workers', 0, '--dtype', 'float32', '--caption_drop_prob', 0.5))
    convention = json.loads((tmp_path / 'out' / UNBUCKETED / 'convention.json').read_text())
    assert convention['caption_drop_prob'] == 0.5
    assert convention['columns']['caption_dropped']['dtype'] == 'int32'
    got = read_mds(str(tmp_path / 'out' / UNBUCKETED))
    assert [s['caption'] for s in got] == [r['caption'] for r in rows]  # the text stays
    assert {s['caption_dropped'] for s in got} == {0, 1}
    with torch.inference_mode():
        empty = pipeline_of(tiny_model, 'sd').encode_prompt([''], 'cpu', 1, False)[0][0].numpy()
    for s in got:
        stored = np.frombuffer(s['caption_latents'], np.float16).reshape(empty.shape).astype(np.float32)
        assert np.allclose(stored, empty, atol=2e-3) == bool(s['caption_dropped']), s['key']


def twin_rows(prefix: str, first: int) -> list[dict]:
    """30 rows whose MDS shards have the same names and sizes for every `prefix` of one length."""
    rows = small_rows()
    return [make_row(first + i, r['jpg'], f'small_{i}.jpg', caption=f'{prefix} {r["caption"][6:]}')
            for i, r in enumerate(rows)]


def test_a_cache_left_by_another_dataset_or_an_earlier_input_is_never_reused(root, tiny_model, tmp_path):
    rows_a, rows_b = twin_rows('AAAAA', 100), twin_rows('BBBBB', 500)
    write_mds_input(str(tmp_path / 'a'), rows_a, bucketed=False, size_limit=1 << 14)
    write_mds_input(str(tmp_path / 'b'), rows_b, bucketed=False, size_limit=1 << 14)
    shards_a, shards_b = (json.loads((tmp_path / d / UNBUCKETED / 'index.json').read_text())['shards']
                          for d in 'ab')
    assert [(s['raw_data']['basename'], s['raw_data']['bytes']) for s in shards_a] == \
        [(s['raw_data']['basename'], s['raw_data']['bytes']) for s in shards_b]  # same names and sizes
    common = ['--bucket', UNBUCKETED, '--model_name', tiny_model, '--resolutions', 64, '--batch-size', 2,
              '--part_size', 3, '--num_workers', 1, '--local', tmp_path / 'cache']
    want_b = [r['key'] for r in rows_b if r['key'] != '000000507']

    # A run on A is killed once its first part is done: A's shards stay in the cache.
    out_a = tmp_path / 'out_a' / UNBUCKETED
    proc = start(root, *common, '--remote_download', tmp_path / 'a', '--remote_upload', tmp_path / 'out_a')
    try:
        wait_for(lambda: markers(out_a), proc)
    finally:
        kill_group(proc.pid)
        proc.wait()
    assert glob.glob(str(tmp_path / 'cache' / '**' / 'shard.*.mds'), recursive=True)

    # B, with the same --local: B's samples only.
    ok(run(root, *common, '--remote_download', tmp_path / 'b', '--remote_upload', tmp_path / 'out_b'))
    got = read_mds(str(tmp_path / 'out_b' / UNBUCKETED))
    assert [o['key'] for o in got] == want_b and all(o['caption'].startswith('BBBBB') for o in got)

    # A's folder rewritten with B's data (same shard names and sizes), A's output deleted, A's command
    # run again: again B's samples only, though A's shards are still in A's cache.
    for name in os.listdir(tmp_path / 'b' / UNBUCKETED):
        (tmp_path / 'a' / UNBUCKETED / name).write_bytes((tmp_path / 'b' / UNBUCKETED / name).read_bytes())
    subprocess.run(['rm', '-r', str(out_a)], check=True)
    ok(run(root, *common, '--remote_download', tmp_path / 'a', '--remote_upload', tmp_path / 'out_a'))
    got = read_mds(str(out_a))
    assert [o['key'] for o in got] == want_b and all(o['caption'].startswith('BBBBB') for o in got)


def test_workers_die_with_the_main_process(root, tiny_model, tmp_path):
    write_mds_input(str(tmp_path / 'mds'), small_rows(), bucketed=False, size_limit=1 << 14)
    proc = start(root, '--remote_download', tmp_path / 'mds', '--bucket', UNBUCKETED, '--local',
                 tmp_path / 'cache', '--remote_upload', tmp_path / 'out', '--model_name', tiny_model,
                 '--resolutions', 64, 128, '--batch-size', 2, '--part_size', 3, '--num_workers', 2)
    try:
        wait_for(lambda: markers(tmp_path / 'out' / UNBUCKETED) and len(group_alive(proc.pid)) >= 3, proc)
        workers = group_alive(proc.pid) - {proc.pid}
        os.kill(proc.pid, signal.SIGKILL)  # a preempted node: no clean-up in the main process
        proc.wait()
        deadline = time.time() + 2  # torch's own check would take up to 5 s, or forever when blocked
        while group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not group_alive(proc.pid), f'workers {workers} outlived the main process'
    finally:
        kill_group(proc.pid)


def test_sigterm_stops_with_a_summary_and_the_rerun_completes(root, tiny_model, tmp_path):
    # The input is read in place from <local>/<bucket> (no --remote_download), the output elsewhere.
    rows = small_rows()
    write_mds_input(str(tmp_path / 'local'), rows, bucketed=False, size_limit=1 << 14)
    before = tree(tmp_path / 'local' / UNBUCKETED)
    out = tmp_path / 'out' / UNBUCKETED
    flags = ['--bucket', UNBUCKETED, '--local', tmp_path / 'local', '--remote_upload', tmp_path / 'out',
             '--model_name', tiny_model, '--resolutions', 64, '--batch-size', 2, '--part_size', 3,
             '--num_workers', 1, '--summary', tmp_path / 's.json']
    proc = start(root, *flags)
    try:
        wait_for(lambda: markers(out), proc)
        os.kill(proc.pid, signal.SIGTERM)  # how a platform stops a job
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        kill_group(proc.pid)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert 'Traceback' not in stderr
    assert [ln for ln in stderr.splitlines() if ln.startswith('error:')] == [
        'error: stopped by SIGTERM: finished parts are kept, the part in progress is not; rerun the same '
        'command to resume']
    summary = json.loads((tmp_path / 's.json').read_text())
    assert summary['interrupted'] == 'SIGTERM' and summary['parts_missing']
    done, total = len(markers(out)), summary['parts']  # the summary counts the parts finished, not planned
    assert (summary['parts_this_run'], summary['parts_before'], len(summary['parts_missing'])) == \
        (done, 0, total - done)
    assert f'parts   {total}: {done} done this run, 0 before, {total - done} left; world size 1' in stdout
    assert not (out / 'index.json').exists()  # no index a reader would take for the whole set
    time.sleep(0.5)
    assert not group_alive(proc.pid)  # no worker left behind

    ok(run(root, *flags))
    got = read_mds(str(out))
    assert [o['key'] for o in got] == [r['key'] for r in rows if r['key'] != '000000007']
    summary = json.loads((tmp_path / 's.json').read_text())
    assert summary['interrupted'] is None and summary['parts_before'] >= 1
    assert before.items() <= tree(tmp_path / 'local' / UNBUCKETED).items()  # every input file intact


HANDOFF_DROPPED = """
import os, socket, sys, time
sys.path.insert(0, sys.argv[1])
import precompute_latents
if sys.argv[2] == 'worker':
    precompute_latents.die_with_parent(os.getppid(), 0)  # as a DataLoader worker starts
from multiprocessing import resource_sharer
resource_sharer.DupFd(os.open(os.devnull, os.O_RDONLY))  # a tensor's fd offered to the main process
client = socket.socket(socket.AF_UNIX)
client.connect(resource_sharer._resource_sharer._address)
client.close()  # the main process stops mid-handoff
time.sleep(1)
"""


@pytest.mark.parametrize('as_worker', [False, True])
def test_a_worker_whose_handoff_the_stopping_main_drops_prints_no_traceback(as_worker, root):
    """multiprocessing prints a traceback from its handoff thread when the receiver goes away, as a
    SIGTERM'd main process does; a DataLoader worker of ours keeps quiet about it."""
    role = 'worker' if as_worker else 'plain'
    proc = subprocess.run([sys.executable, '-c', HANDOFF_DROPPED, str(root), role], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if as_worker:
        assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    else:  # the case is real: without the worker's hook the traceback appears
        assert 'resource_sharer.py' in proc.stderr and 'Traceback' in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize('flags, phrase', [
    (['--size_limit', 'banana'], '--size_limit banana: must be a shard size'),
    (['--compression', 'foo'], '--compression foo: streaming knows'),
    (['--resolutions', 256, 256], '256 is given twice'),
    (['--caption_drop_prob', 1.5], 'argument --caption_drop_prob: 1.5: must be a probability in [0, 1]'),
    (['--batch-size', 0], 'argument --batch-size: 0: must be a positive integer'),
    (['--bucket', 9], 'argument --bucket: 9: the bucket index must be 0..6'),
])
def test_bad_flags_are_refused_before_anything_loads(flags, phrase, root, tiny_input, tmp_path):
    model = tmp_path / 'model'  # a model that cannot load: the flag must be reported first
    for sub in ('vae', 'text_encoder', 'tokenizer'):
        (model / sub).mkdir(parents=True)
    assert phrase in refused('--remote_download', tiny_input / 'ok', '--bucket', UNBUCKETED, '--local',
                             tmp_path / 'cache', '--remote_upload', tmp_path / 'out', '--model_name', model,
                             *flags)
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'cache').exists()


def test_a_bad_flag_fails_before_torch_is_imported(root, tmp_path):
    """The user's typo is reported by the command line before the seconds torch takes to import."""
    code = ('import runpy, sys\n'
            f'sys.argv = ["precompute_latents.py", "--remote_upload", {str(tmp_path / "out")!r}, '
            '"--resolutions", "100"]\n'
            'try:\n'
            f'    runpy.run_path({str(root / "precompute_latents.py")!r}, run_name="__main__")\n'
            'except SystemExit as stop:\n'
            '    print("exit", stop.code, "torch" in sys.modules)\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ['exit', '2', 'False'], proc.stdout + proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == ('precompute_latents.py: error: argument --resolutions: 100: '
                                            'must be a positive multiple of 8 (the VAE downsamples 8x)')


@pytest.mark.parametrize('name, env, phrase', [
    ('not a/model name', {}, 'not a hub model name'),
    ('someone/sd-2-typo', {'HF_HUB_OFFLINE': '1'}, 'HF_HUB_OFFLINE is set but the hub cache'),
    ('someone/sd-2-typo', {'HF_HUB_OFFLINE': '0', 'HF_ENDPOINT': 'http://127.0.0.1:9'}, 'cannot be reached'),
])
def test_a_model_name_that_cannot_load_fails_fast(name, env, phrase, root, tiny_input, tmp_path):
    """Run in this process where its hub settings are the case's (conftest sets HF_HUB_OFFLINE=1), else
    in a process of its own with the case's environment."""
    from huggingface_hub import constants

    flags = ['--remote_download', tiny_input / 'ok', '--bucket', UNBUCKETED, '--local', tmp_path / 'cache',
             '--remote_upload', tmp_path / 'out', '--model_name', name]
    began = time.time()
    if env.get('HF_HUB_OFFLINE', '1') == '1' and 'HF_ENDPOINT' not in env and constants.HF_HUB_OFFLINE:
        line = refused(*flags)
    else:
        line = one_line_error(run(root, *flags, env={**os.environ, 'HF_HOME': str(tmp_path / 'hf'), **env},
                                  own_process=True))  # huggingface_hub reads them as it is imported
    assert phrase in line
    assert time.time() - began < 120  # no minutes of hub retries
    assert not (tmp_path / 'out').exists()


def test_input_read_in_place_from_local_is_not_taken_for_an_overlap(tmp_path):
    """Without --bucket and --remote_download the dataset at --local is the input, read in place, and
    the run's own staging folder below it is harmless; an output inside it is still refused."""
    script = load_script('precompute_latents.py')
    local, out = tmp_path / 'mds', tmp_path / 'out'
    args = script.parse_args(['--local', str(local), '--remote_upload', str(out)])
    script.check_places(args, script.places(args))
    args = script.parse_args(['--local', str(local), '--remote_upload', str(local / 'out')])
    with pytest.raises(script.UserError, match=r'the output .* is inside the input'):
        script.check_places(args, script.places(args))

# ---- images in streaming's own encodings; a run that writes nothing ----------------------------------------

@pytest.mark.parametrize('encoding', ['jpeg', 'pil'])
def test_images_in_streamings_jpeg_or_pil_encoding_are_encoded_and_kept_as_they_are(encoding, models,
                                                                                     tiny_model, tmp_path):
    """MDS datasets often store images with streaming's `jpeg` (or `png`, `pil`) encoding, which its reader
    hands out as a PIL image: every sample was skipped ('a bytes-like object is required') and an empty
    index written with exit 0. Now each image is encoded as its bytes would be, and the output's `jpg`
    keeps its encoding and the stored picture (a JPEG as stored: never re-encoded, nor left at the
    smaller DCT scale it was decoded at)."""
    files = []
    for i in range(3):
        files.append(tmp_path / f'{i}.jpg')
        files[-1].write_bytes(make_jpeg(150 + 9 * i, 140, seed=i))  # decoded at 1/2 scale for 64 px
    # jpeg: an image opened from its file is stored as the file's bytes; pil: as its pixels
    images = [Image.open(f) if encoding == 'jpeg' else Image.open(f).convert('RGB') for f in files]
    rows = [{**make_row(i, f.read_bytes(), f.name), 'jpg': img}
            for i, (f, img) in enumerate(zip(files, images))]
    write_mds_input(str(tmp_path / 'mds'), rows, bucketed=False, columns={**COLUMNS, 'jpg': encoding})
    code, _, err = run_main('precompute_latents.py', '--local', tmp_path / 'mds', '--bucket', UNBUCKETED,
                            '--remote_upload', tmp_path / 'out', '--model_name', tiny_model, '--resolutions',
                            64, '--latent_mode', 'mean', '--storage_dtype', 'float32', '--num_workers', 0)
    assert code == 0, err[-3000:]
    out = tmp_path / 'out' / UNBUCKETED
    index = json.loads((out / 'index.json').read_text())['shards'][0]
    assert dict(zip(index['column_names'], index['column_encodings']))['jpg'] == encoding
    got = read_mds(str(out))
    assert [o['key'] for o in got] == [r['key'] for r in rows]
    vae = models[0]
    for o, f in zip(got, files):
        assert np.array_equal(np.asarray(o['jpg']), np.asarray(Image.open(f).convert('RGB'))), f.name
        stored = f.read_bytes() if encoding == 'jpeg' else encode(Image.open(f).convert('RGB'), 'PNG')
        with torch.inference_mode(), one_torch_thread():  # a JPEG's at its DCT scale, the pixels' as they are
            want = vae.encode(reference_pixels(stored, 64, [64])).latent_dist.mean[0].numpy()
        np.testing.assert_allclose(np.frombuffer(o['latents_64'], np.float32).reshape(want.shape),
                                   want * vae.config.scaling_factor, atol=1e-4, rtol=1e-3, err_msg=f.name)


def test_a_run_that_skips_every_image_fails_and_writes_no_index(tiny_model, tmp_path):
    """Every image undecodable: exit 2 with one line, each sample named in its part's marker, and no
    index.json (which a reader would take for an empty dataset, or refuse: 'Stream contains no samples').
    The summary counts them by reason and names the first 20 (issue 36: ~20M at LAION-2B's 1%)."""
    rows = [make_row(i, b'no image at all', f'broken_{i}.jpg') for i in range(25)]
    write_mds_input(str(tmp_path / 'mds'), rows, bucketed=False, size_limit=1 << 11)
    code, out, err = run_main('precompute_latents.py', '--local', tmp_path / 'mds', '--bucket', UNBUCKETED,
                              '--remote_upload', tmp_path / 'out', '--model_name', tiny_model, '--part_size',
                              10, '--resolutions', 64, '--num_workers', 0, '--summary', tmp_path / 's.json')
    assert code == 2 and 'Traceback' not in err, err[-3000:]
    where = f'{tmp_path / "out" / UNBUCKETED}/NNNNN/_done, under "skipped"'
    assert [ln for ln in err.splitlines() if ln.startswith('error:')] == [
        'error: no sample written: each of the 25 input images was skipped (25 x not an image format PIL can '
        f"read), so no index.json either; each is named in {where}: check the input's `jpg` column"]
    assert not (tmp_path / 'out' / UNBUCKETED / 'index.json').exists()
    summary = json.loads((tmp_path / 's.json').read_text())
    parts = markers(tmp_path / 'out' / UNBUCKETED)
    assert summary['written'] == 0 and len(parts) > 1
    assert [s['key'] for m in parts for s in json.loads(Path(m).read_text())['skipped']] == \
        [r['key'] for r in rows]
    reason = 'not an image format PIL can read'
    assert summary['skipped_names'] == {'by_reason': {reason: 25}, 'in': where, 'first': {reason: [
        {'id': i, 'key': r['key'], 'reason': reason} for i, r in enumerate(rows[:20])]}}
    assert f"skipped 25 x {reason}: sample 0 key='000000000', sample 1 key='000000001', sample 2 " \
           "key='000000002', ..." in out.splitlines() and f'skipped (each named in {where})' in out


# ---- mistakes the index, the columns or a config tell: one line each, before a model loads ---------------

@pytest.fixture(scope='module')
def mistakes(tmp_path_factory, tiny_model, tiny_input) -> Path:
    """Inputs and model folders, each with one mistake a new user makes (issue 34), beside tiny_input's."""
    from diffusers import AutoencoderKL

    bed = tmp_path_factory.mktemp('mistakes')
    rows = [make_row(i, encode(photo_like(80, 70, i), 'JPEG'), f'{i}.jpg') for i in range(2)]
    no_jpg = {k: v for k, v in COLUMNS.items() if k != 'jpg'}
    write_mds_input(str(bed / 'png'), [{**r, 'png': Image.open(io.BytesIO(r['jpg']))} for r in rows],
                    bucketed=False, columns={**no_jpg, 'png': 'png'})  # images, but in `png`
    write_mds_input(str(bed / 'none_caption'), [{**r, 'caption': None} for r in rows], bucketed=False,
                    columns={**COLUMNS, 'caption': 'json'})
    write_mds_input(str(bed / 'sub'), rows, bucketed=False, subfolder='train')  # needs --subfolder train
    shutil.copytree(tiny_input / 'ok', bed / 'missing')
    for shard in (bed / 'missing' / UNBUCKETED).glob('*.mds'):
        shard.unlink()  # listed in its index.json, not there
    for name, index in (('empty', {'version': 2, 'shards': []}), ('garbage', [1, 2]),
                        ('garbage_shard', {'version': 2, 'shards': [{'format': 'mds', 'samples': 2}]})):
        (bed / name / UNBUCKETED).mkdir(parents=True)
        (bed / name / UNBUCKETED / 'index.json').write_text(json.dumps(index))
    build_tiny_family(bed / 'flux', 'flux')  # text_encoder/ CLIP-L, text_encoder_2/ T5, tokenizer_2/ T5's
    build_llm_family(bed / 'qwen', 'qwenimage')  # text_encoder/ Qwen2.5-VL (config.json: no architectures)
    write_clip(bed / 'clip', CLIP_L, projection=False)  # a CLIP text model without its tokenizer
    (bed / 't5_tokenizer').mkdir()  # a CLIP text_encoder/ beside a T5 tokenizer/
    (bed / 't5_tokenizer' / 'text_encoder').symlink_to(tiny_model / 'text_encoder')
    (bed / 't5_tokenizer' / 'tokenizer').symlink_to(bed / 'flux' / 'tokenizer_2')
    AutoencoderKL(in_channels=4, out_channels=4, latent_channels=4, block_out_channels=(8,),
                  layers_per_block=1, norm_num_groups=8).save_pretrained(bed / 'vae4')  # of 4-channel inputs
    return bed


def test_mistakes_the_input_or_a_config_tells_are_one_line_each_before_a_model_loads(
        mistakes, tiny_model, tiny_input, tmp_path, monkeypatch):
    """Each case once was a traceback, a message about None or 'rerun the same command to resume' (which
    cannot help), or a run that wrote an empty index with exit 0. Now: exit 2, one line that names the
    thing and says what to do, nothing written, and no model loaded to find out."""
    import diffusers
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError('a model was loaded')

    monkeypatch.setattr(transformers.PreTrainedModel, 'from_pretrained', classmethod(no_model))
    monkeypatch.setattr(diffusers.ModelMixin, 'from_pretrained', classmethod(no_model))
    bed, flux, qwen = mistakes, mistakes / 'flux', mistakes / 'qwen'

    def given(*flags) -> list:  # the good input and these flags
        return ['--remote_download', tiny_input / 'ok', *flags]

    cases = {  # name: (flags, what the line says)
        'an index with "shards": []': (['--remote_download', bed / 'empty'], [
            f'{bed}/empty/{UNBUCKETED}/index.json lists no shards: the input dataset is empty']),
        'an index that is a list': (['--remote_download', bed / 'garbage'], ['is not an MDS index']),
        'a shard record without columns': (['--remote_download', bed / 'garbage_shard'], [
            'is not an MDS index (a "shards" list of records with version, format, column_names']),
        'shard files missing': (['--remote_download', bed / 'missing'], [
            '1 of the 1 shard files its index.json lists are not there (shard.00000.mds): the dataset is '
            'incomplete']),
        'a forgotten --subfolder': (['--remote_download', bed / 'sub'], [
            f'no input dataset at {bed}/sub/{UNBUCKETED}: it has no index.json, but '
            f'{bed}/sub/{UNBUCKETED}/train/index.json exists: pass --subfolder train']),
        'images in a png column': (['--remote_download', bed / 'png'], [
            'the input has no `jpg` column of images', 'png (png)',
            'write the dataset with its images there']),
        'an int caption column': (given('--caption_keys', 'width'), [
            "--caption_keys width: the input's `width` column holds int32, not text (str); name text "
            "columns (the input's: caption, "]),
        'a bytes caption column': (given('--caption_keys', 'jpg'), ['`jpg` column holds bytes, not text']),
        'a caption column of None': (['--remote_download', bed / 'none_caption'], [
            '`caption` column holds json, not text (str)']),
        'a column dropped twice': (given('--drop_columns', 'jpg', 'jpg'), [
            '--drop_columns jpg jpg: jpg is given twice; list each once']),
        'a VAE of 4-channel inputs': (given('--vae', bed / 'vae4'), [
            f'{bed}/vae4/config.json: AutoencoderKL with in_channels 4, but the images are RGB (3 channels)',
            'give --vae one whose config.json says 3']),
        'a CLIP without its tokenizer': (given('--text_encoder', f'clip-l={bed / "clip"}'), [
            f'{bed}/clip holds no CLIPTokenizer files (vocab.json + merges.txt): the clip-l recipe reads']),
        'a pipeline root as a text encoder': (given('--text_encoder', f'clip-l={flux}'), [
            f'{flux} holds a pipeline (model_index.json), not a text encoder: the clip-l recipe reads a '
            f'CLIPTextModel; e.g. clip-l={flux}:text_encoder']),
        'a vae subfolder as a text encoder': (given('--text_encoder', f'clip-l={flux}:vae'), [
            f'{flux}/vae holds a diffusers AutoencoderKL, not a text encoder',
            f'e.g. clip-l={flux}:text_encoder']),
        'a T5 tokenizer beside a CLIP': (given('--text_encoder', f'clip-l={bed}/t5_tokenizer:text_encoder'), [
            f'{bed}/t5_tokenizer/tokenizer holds no CLIPTokenizer files (vocab.json + merges.txt), but a '
            'T5Tokenizer']),
        'a T5 for the clip-l recipe': (given('--text_encoder', f'clip-l={flux}:text_encoder_2'), [
            f'{flux}/text_encoder_2 holds T5EncoderModel, but the clip-l recipe reads CLIPTextModel; give '
            'that folder with the recipe of its encoder (t5, t5-masked)']),
        'mistral3-stack on a Qwen2.5-VL': (given('--text_encoder', f'mistral3-stack={qwen}:text_encoder'), [
            f'{qwen}/text_encoder holds a qwen2_5_vl model, but the mistral3-stack recipe reads '
            'Mistral3ForConditionalGeneration; give that folder with the recipe of its encoder '
            '(qwen2.5-vl)']),
    }
    for name, (flags, phrases) in cases.items():
        out = tmp_path / name.replace(' ', '_')
        line = refused(*flags, '--bucket', UNBUCKETED, '--local', tmp_path / 'cache', '--remote_upload', out,
                       '--model_name', tiny_model, '--resolutions', 64)
        for phrase in phrases:
            assert phrase in line, (name, line)
        assert 'rerun' not in line and '--family' not in line and 'NoneType' not in line, (name, line)
        assert not out.exists(), name


def test_a_rerun_with_other_text_encoders_or_another_vae_names_them(mistakes, tiny_model, tiny_input,
                                                                    tmp_path):
    """A finished output written with three --text_encoder and the model's VAE: a rerun with two, or with
    another --vae, is refused naming both sides as the flags give them (not a cut repr of a record)."""
    flux, out = mistakes / 'flux', tmp_path / 'out'
    three = [f'clip-l={tiny_model}:text_encoder', f't5={flux}:text_encoder_2',
             f'clip-penultimate={flux}:text_encoder']
    flags = ['--remote_download', tiny_input / 'ok', '--bucket', UNBUCKETED, '--local', tmp_path / 'cache',
             '--remote_upload', out, '--model_name', tiny_model, '--resolutions', 64, '--num_workers', 0]
    encoders = [a for t in three for a in ('--text_encoder', t)]
    code, _, err = run_main('precompute_latents.py', *flags, *encoders)
    assert code == 0, err[-3000:]
    assert refused(*flags, *encoders[:4]) == (
        f'error: {out}/{UNBUCKETED}/00000 was written with --text_encoder {" ".join(three)}, this run has '
        f'{" ".join(three[:2])}: rerun with the same flags or write to a new --remote_upload')
    assert refused(*flags, *encoders, '--vae', flux) == (
        f'error: {out}/{UNBUCKETED}/00000 was written with the VAE {tiny_model}:vae (AutoencoderKL), this '
        f'run has {flux} (AutoencoderKL): rerun with the same flags or write to a new --remote_upload')
