"""laion_cloudwriter.py as its users run it: img2dataset shards in, bucketed MDS out, read back with
StreamingDataset; polling beside a download, kill -9 and rerun, a remote that goes down, bad input,
and many machines merged into one dataset."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from streaming import MDSWriter
from streaming.base.util import merge_index
from testbed.corpus import BUCKET_EDGES, CorpusItem, bucket_of, build_corpus, good_items
from testbed.i2d_shards import shard_rows, write_shard, write_stats
from testbed.loaded import exit_race_env
from testbed.readback import read_mds
from testbed.real import FOLDER, decodes, real_items
from testbed.scripts import load_script

BUCKETS = [f'{lo}-{hi}' for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:])]
ALL = f'{BUCKET_EDGES[0]}-{BUCKET_EDGES[-1]}'
FLOATS = ('punsafe', 'pwatermark', 'similarity')


def header_size(data: bytes) -> tuple[int, int] | None:
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:
        return None


def make_input(folder: Path, shards, items=None, flavour: str = 'full', sizes: bool = False,
               done: bool = True, key_offset: int = 0) -> dict[str, dict]:
    """Write img2dataset shards; return the rows a user expects out, by key (success, and PIL's defaults
    decode it: --verify full)."""
    items = list(build_corpus() if items is None else items)
    want = {}
    for s in shards:
        rows = shard_rows(s + key_offset, items, failures=1, sizes=sizes, flavour=flavour)
        write_shard(folder, s, rows, flavour)
        for r in rows:
            if r['status'] == 'success' and decodes(r['jpg']):
                want[r['key']] = dict(r, shard=s)
    if done:
        (folder / 'done').touch()
    return want


def cloudwriter(root: Path, *args: str, env=None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(root / 'laion_cloudwriter.py'), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def start(root: Path, *args: str, env=None) -> subprocess.Popen:
    """Start a run in its own process group, so a kill takes it down like a dying machine."""
    cmd = [sys.executable, str(root / 'laion_cloudwriter.py'), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def wait_for(cond, timeout: float = 120, what: str = '', interval: float = 0.01) -> None:
    """Poll `cond` every `interval` s (0.2 for a look at the S3 server: it shares the cores)."""
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f'timed out waiting for {what}'
        time.sleep(interval)


def read_buckets(remote: str, buckets, env=None) -> dict[str, list[dict]]:
    out = {}
    for b in buckets:
        path = f'{remote}/{b}'
        exists = Path(path, 'index.json').exists() if '://' not in remote else True
        if exists:
            out[b] = read_mds(path, env=env)
    return out


def assert_dataset(got: dict[str, list[dict]], want: dict[str, dict], bucketed: bool = True,
                   flavour: str = 'full') -> None:
    """Each expected row exactly once, in its bucket, with its bytes and metadata; nothing else."""
    keys = [s['key'] for rows in got.values() for s in rows]
    assert len(keys) == len(set(keys)), 'a sample appears twice'
    assert set(keys) == set(want)
    for bucket, rows in got.items():
        for s in rows:
            r = want[s['key']]
            w, h = header_size(r['jpg']) if r['width'] is None else (r['width'], r['height'])
            assert bucket == (bucket_of(min(w, h)) if bucketed else ALL)
            assert s['jpg'] == r['jpg']
            assert (s['width'], s['height'], s['original_width'], s['original_height']) == (w, h, w, h)
            assert isinstance(s['width'], np.int32) and isinstance(s['hash'], np.int64)
            assert (s['caption'], s['url'], s['status'], s['error_message'], s['exif']) == \
                   (r['caption'], r['url'], 'success', '', '{}')
            assert s['hash'] == r['hash']
            for c in FLOATS:
                assert isinstance(s[c], np.float64) and s[c] == pytest.approx(r[c], rel=1e-6)
            if flavour == 'aesthetic':
                assert s['aesthetic_score'] == pytest.approx(r['AESTHETIC_SCORE'], rel=1e-6)
            else:
                assert np.isnan(s['aesthetic_score'])


def records(remote: Path, sub: str = '') -> set[str]:
    """The input shards recorded at `remote`: each record holds its task's (an older one, its own)."""
    folder = remote / '_cloudwriter' / sub
    return {sid for p in folder.glob('*.record') for sid in json.loads(p.read_text()).get('shards', [p.stem])}


def s3_records(s3, prefix: str) -> set[str]:
    """The input shards recorded under s3://<s3.bucket>/<prefix>/_cloudwriter/ (as records() does)."""
    keys = [k for k in s3.list_keys(s3.bucket, f'{prefix}/_cloudwriter/') if k.endswith('.record')]
    return {sid for k in keys for sid in json.loads(
        s3.client().get_object(Bucket=s3.bucket, Key=k)['Body'].read())['shards']}


def test_local_bucketed_download_with_broken_files_and_a_corrupt_shard(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, range(3))  # the whole corpus: broken images included, sizes null
    (local / '00003.parquet').write_bytes(np.random.default_rng(0).bytes(3000))
    write_stats(local, 3, [])

    r = cloudwriter(root, '--local', str(local), '--remote', str(remote), '--bucketed',
                    '--processes', '2')

    assert r.returncode == 1, r.stderr  # a shard was unreadable: named, kept, non-zero exit
    assert '00003.parquet' in r.stdout and 'Traceback' not in r.stderr
    assert (local / '00003.parquet').exists() and (local / '00003_stats.json').exists()
    # converted shards are deleted; their stats become NNNNN_converted.json, which img2dataset still
    # counts as a finished shard, and no other *.json is left where img2dataset would parse it
    assert sorted(p.name for p in local.glob('0000[012]*')) == [f'0000{i}_converted.json' for i in range(3)]
    assert sorted(p.name for p in local.glob('*.json')) == [
        '00000_converted.json', '00001_converted.json', '00002_converted.json', '00003_stats.json']
    got = read_buckets(str(remote), BUCKETS)
    assert set(got) == set(BUCKETS)  # the corpus has an image in every bucket
    assert_dataset(got, want)
    summary = json.loads((local / '_cloudwriter' / 'summary.json').read_text())
    assert summary['shards_done'] == 3 and summary['samples'] == len(want)
    assert summary['samples_per_bucket'] == {b: len(rows) for b, rows in got.items()}
    # random bytes and an empty file say success but have no header; the truncated JPEG does not decode
    assert summary['skipped_by_reason'] == {'HTTP Error 404: Not Found': 3,
                                            'success but no readable image header': 6,
                                            'success but does not decode with PIL': 3}
    assert not any('truncated' in s['url'] for rows in got.values() for s in rows)
    assert summary["skipped_shards"] and summary['exit_code'] == 1
    # without --preview nothing of it is written anywhere
    assert 'preview' not in summary and not [p for p in tmp_path.rglob('*preview*')]


def test_s3_unbucketed_aesthetic_keeps_parquet_and_trusts_parquet_sizes(root, tmp_path, s3):
    local = tmp_path / 'parquet'
    want = make_input(local, range(2), items=good_items(), flavour='aesthetic', sizes=True)
    remote = f's3://{s3.bucket}/laion'

    r = cloudwriter(root, '--local', str(local), '--remote', remote, '--keep_parquet',
                    '--processes', '2', '--preview', '2', env=s3.child_env())

    assert r.returncode == 0, r.stderr
    assert len(list(local.glob('*.parquet'))) == 2 and len(list(local.glob('*_stats.json'))) == 2
    assert_dataset(read_buckets(remote, [ALL], env=s3.env), want, bucketed=False, flavour='aesthetic')
    keys = s3.list_keys(s3.bucket, 'laion/')
    assert f'laion/{ALL}/index.json' in keys
    assert {'laion/_cloudwriter/00000.record', 'laion/_cloudwriter/00001.record'} <= set(keys)
    # the preview's candidates went to the remote beside the records; one sample of each shard is drawn
    assert {'laion/_cloudwriter/00000.preview', 'laion/_cloudwriter/00001.preview'} <= set(keys)
    preview = json.loads((local / '_cloudwriter' / 'summary.json').read_text())['preview']
    assert preview == {ALL: {'png': str(local / '_cloudwriter' / f'preview_{ALL}.png'),
                             'keys': ['000000000', '000010000']}}
    assert_tiles(Path(preview[ALL]['png']), 2, [good_items()[0]] * 2, good_items())


def test_shards_appearing_over_time_then_done_end_the_run(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, [0], items=good_items(), done=False)
    proc = start(root, '--local', str(local), '--remote', str(remote), '--bucketed',
                 '--poll_interval', '0.3', '--processes', '1', '--merge_interval', '0')
    try:
        wait_for(lambda: records(remote) == {'00000'}, what='shard 0')
        # img2dataset writes the parquet first and its _stats.json when the shard is finished.
        rows = shard_rows(1, good_items())
        write_shard(local, 1, rows, stats=False)
        time.sleep(1.5)
        assert records(remote) == {'00000'} and (local / '00001.parquet').exists()
        write_stats(local, 1, rows)
        want.update({r['key']: r for r in rows if r['status'] == 'success'})
        wait_for(lambda: records(remote) == {'00000', '00001'}, what='shard 1')
        assert proc.poll() is None, 'no done file yet: the run keeps polling'
        (local / 'done').touch()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == 0, proc.stderr.read()
    assert_dataset(read_buckets(str(remote), BUCKETS), want)


def mds_keys(path: Path) -> list[str] | None:
    """The keys of the samples in one MDS shard file, as streaming's MDSReader finds them (a sample count,
    its offsets, each sample's columns in name order); None while the file is not whole yet."""
    data = path.read_bytes()
    n = int.from_bytes(data[:4], 'little') if len(data) >= 4 else 0
    head = data[4:4 + 4 * (n + 1)]
    offsets = np.frombuffer(head, '<u4') if n and len(head) == 4 * (n + 1) else []
    if not len(offsets) or offsets[-1] != len(data):
        return None
    return [cloudwriter_module().mds_sample(data[a:b])['key'] for a, b in zip(offsets[:-1], offsets[1:])]


@functools.cache
def cloudwriter_module():
    return load_script('laion_cloudwriter.py')


def carried_shards(remote: Path) -> dict[Path, set[str]]:
    """The MDS shards at `remote` that hold rows of several input shards (a bucket's open MDS shard carried
    from one input shard to the next), with those shards' ids."""
    out = {}
    for f in remote.glob('*/0000?/shard.*.mds'):
        sids = {k[:5] for k in mds_keys(f) or []}
        if len(sids) > 1:
            out[f] = sids
    return out


def test_kill9_at_several_points_then_rerun_equals_an_uninterrupted_run(root, tmp_path):
    """kill -9 once an MDS file is written, once a shard carried across input shards is (before their
    task's record), and once records are up (while their sources are deleted); then the moments between
    the deletions of a task's sources, which a kill leaves as they are: each rerun equals an uninterrupted
    run, and no source is gone before its record is up."""
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, range(10), items=good_items())
    # 1 MB MDS shards: one of 256-512 or 512-768 fills over two input shards; merge after every task, so
    # a reader sees every state
    args = ('--local', str(local), '--remote', str(remote), '--bucketed', '--processes', '2',
            '--size_limit', '1mb', '--merge_interval', '0')
    by_part = {}  # (shard, bucket) -> keys
    for k, r in want.items():
        by_part.setdefault((r['shard'], bucket_of(min(header_size(r['jpg'])))), set()).add(k)
    parts_written = lambda: any(remote.glob('*/0000?/shard.00000.mds'))  # noqa: E731
    carried = lambda: any(not sids <= records(remote) for sids in carried_shards(remote).values())  # noqa: E731
    for trigger in (parts_written, carried, lambda: len(records(remote)) >= 4):
        proc = start(root, *args)
        wait_for(lambda: trigger() or proc.poll() is not None, what='the kill point')  # noqa: B023
        kill9(proc)
        done = records(remote)
        assert len(done) < 10, 'killed too late to test anything'
        for s in range(10):  # a parquet is never gone before its shard is recorded at the remote
            assert (local / f'{s:05d}.parquet').exists() or f'{s:05d}' in done
        # A reader of a bucket sees whole shards only: each shard's samples all in, or none.
        seen = {(b, s['key']) for b, rows in read_buckets(str(remote), BUCKETS).items() for s in rows}
        for (s, b), keys in by_part.items():
            found = {k for k in keys if (b, k) in seen}
            assert found in (set(), keys), f'shard {s} partly visible in {b}'
    # four more shards come; one process converts them (and what is left) in tasks of two or more, whose
    # sources all stay (--keep_parquet)
    want.update(make_input(local, range(10, 14), items=good_items()))
    r = cloudwriter(root, *args, '--keep_parquet', '--processes', '1')
    assert r.returncode == 0, r.stderr
    # A kill between the deletions of a task's sources leaves them as delete_input() does one by one:
    # the first's parquet gone and its _stats.json renamed, the second's parquet gone, the rest there.
    tasks = [json.loads(p.read_text()) for p in (remote / '_cloudwriter').glob('*.record')]
    task = next(t for t in tasks if len(t['shards']) > 1 and all((local / f'{s}.parquet').exists()
                                                                  for s in t['shards']))
    first, second = task['shards'][:2]
    (local / f'{first}.parquet').unlink()
    (local / f'{first}_stats.json').rename(local / f'{first}_converted.json')
    (local / f'{second}.parquet').unlink()
    r = cloudwriter(root, *args)
    assert r.returncode == 0, r.stderr
    assert json.loads((local / '_cloudwriter' / 'summary.json').read_text())['shards_this_run'] == 0
    assert_dataset(read_buckets(str(remote), BUCKETS), want)
    assert sorted(p.name for p in local.glob('0*')) == [f'{s:05d}_converted.json' for s in range(14)]


def test_s3_down_mid_run_stops_clearly_deletes_nothing_and_rerun_completes(root, tmp_path, s3):
    local = tmp_path / 'parquet'
    want = make_input(local, range(8), items=good_items())
    remote = f's3://{s3.bucket}/laion'
    args = ('--local', str(local), '--remote', remote, '--processes', '1')
    proc = start(root, *args, env=s3.child_env(AWS_MAX_ATTEMPTS='1'))  # a store that is down fails at once
    try:
        wait_for(lambda: any(k.endswith('.record') for k in s3.list_keys(s3.bucket)), what='a record',
                 interval=0.2)
        s3.stop()
        t0 = time.time()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == 2 and time.time() - t0 < 120
    assert err.strip().splitlines()[-1].startswith('error:') and remote in err
    s3.start()
    done = s3_records(s3, 'laion')
    assert 1 <= len(done) < 8
    for s in range(8):  # a source is gone only once its record is up (the rerun deletes any left over)
        assert (local / f'{s:05d}.parquet').exists() or f'{s:05d}' in done

    r = cloudwriter(root, *args, '--processes', '2', env=s3.child_env())
    assert r.returncode == 0, r.stderr
    assert_dataset(read_buckets(remote, [ALL], env=s3.env), want, bucketed=False)
    assert not list(local.glob('*.parquet'))


def test_missing_required_column_stops_with_one_line(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    make_input(local, [0], items=good_items()[:3])
    table = pq.read_table(local / '00000.parquet').drop_columns(['jpg'])
    pq.write_table(table, local / '00000.parquet')

    # as on a loaded machine: the worker pool's thread is still closing as the interpreter exits
    r = cloudwriter(root, '--local', str(local), '--remote', str(remote),
                    env=exit_race_env(tmp_path / 'loaded'))

    assert r.returncode == 2
    assert 'Traceback' not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"error: {local / '00000.parquet'}: missing required column 'jpg'"
    assert (local / '00000.parquet').exists()


def test_many_machines_write_subfolders_and_merge_into_one_dataset(root, tmp_path):
    remote = str(tmp_path / 'mds')
    want = {}
    for i, sub in enumerate(('machine-a', 'machine-b')):
        local = tmp_path / sub
        # Both machines number their shards from 0; their rows differ.
        part = make_input(local, range(2), items=good_items(), key_offset=100 * i)
        want[sub] = part
        r = cloudwriter(root, '--local', str(local), '--remote', remote, '--bucketed', '--subfolder', sub,
                        '--processes', '2')
        assert r.returncode == 0, r.stderr

    r = cloudwriter(root, '--remote', remote, '--merge_only')

    assert r.returncode == 0, r.stderr
    assert_dataset(read_buckets(remote, BUCKETS), want['machine-a'] | want['machine-b'])
    # Each machine's own dataset stays readable on its own.
    a = read_mds(f'{remote}/256-512/machine-a')
    assert {s['key'] for s in a} == {k for k, r in want['machine-a'].items()
                                     if 256 <= min(header_size(r['jpg'])) < 512}

    # The published index never loses what it listed: a later run without --subfolder on this remote
    # (its index.json would hold its own shards only) refuses, and so does --merge_only while a live
    # run.lease says a subfolder is still being written; neither touches an index.
    published = {p: p.read_bytes() for p in Path(remote).rglob('index.json')}
    later = tmp_path / 'later'
    make_input(later, range(1), items=good_items(), key_offset=300)
    r = cloudwriter(root, '--local', str(later), '--remote', remote, '--bucketed')
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert last_line(r.stderr) == (
        f'error: {remote} holds the runs of --subfolder machine-a, machine-b: a run without --subfolder '
        'would replace <remote>/<bucket>/index.json with its own shards only; give this run its own '
        '--subfolder, then --merge_only')
    assert (later / '00000.parquet').exists()
    lease = Path(remote, '_cloudwriter', 'machine-b', 'run.lease')
    lease.write_text(json.dumps({'token': 'x', 'host': 'elsewhere', 'pid': 1, 'seen': time.time()}))
    r = cloudwriter(root, '--remote', remote, '--merge_only')
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    line = last_line(r.stderr)
    assert line.startswith(f'error: --merge_only: {remote} (--subfolder machine-b) is being written by '
                           'another laion_cloudwriter run (host elsewhere, pid 1,')
    assert 'run --merge_only once it has ended' in line
    assert {p: p.read_bytes() for p in Path(remote).rglob('index.json')} == published


def thumb(item) -> np.ndarray:
    """The item's image as the preview shows it: RGB, at most 128 px on its longer side."""
    im = Image.open(io.BytesIO(item.data)).convert('RGB')
    im.thumbnail((128, 128), Image.Resampling.LANCZOS)
    return np.asarray(im, np.float32)


def assert_tiles(png: Path, n: int, shown: list, others: list) -> None:
    """`png` is a valid PNG grid of n tiles whose i-th image is `shown[i]`: closer to it, pixel by
    pixel, than to any other image of `others`."""
    cw = load_script('laion_cloudwriter.py')
    cell, lines = cw.PREVIEW_THUMB, cw.PREVIEW_LINES
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    with Image.open(png) as im:
        im.verify()
    sheet = Image.open(png)
    assert sheet.format == 'PNG'
    assert sheet.size == (cols * (cell + 8), 20 + rows * (cell + 8 + 12 * lines))
    pixels = np.asarray(sheet.convert('RGB'), np.float32)
    for i, item in enumerate(shown):
        want = thumb(item)
        h, w = want.shape[:2]
        x = (i % cols) * (cell + 8) + 4 + (cell - w) // 2
        y = 20 + (i // cols) * (cell + 8 + 12 * lines) + 4 + (cell - h) // 2
        tile = pixels[y:y + h, x:x + w]
        diff = {o.name: np.abs(tile - thumb(o)).mean() for o in others if thumb(o).shape == want.shape}
        assert diff[item.name] < 8, f'tile {i} is not {item.name}: mean difference {diff[item.name]:.1f}'
        assert min(diff, key=diff.get) == item.name


def test_preview_draws_samples_spread_over_the_shards_and_a_rerun_reuses_earlier_candidates(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    by_name = {it.name: it for it in good_items()}
    small = [by_name['landscape_40_baseline.jpg'], by_name['portrait_40_baseline.jpg']]  # bucket 0-64
    mid = [by_name['landscape_100_progressive.jpg'], by_name['portrait_100_progressive.jpg']]  # 64-128
    args = ('--local', str(local), '--remote', str(remote), '--bucketed', '--processes', '2',
            '--preview', '3')
    summary = local / '_cloudwriter' / 'summary.json'
    # shards 0-4 each hold both 0-64 images; only shards 1 and 3 hold the 64-128 ones (keys: shard, row)
    make_input(local, [0, 2], items=small)
    make_input(local, [1], items=small + mid)

    r = cloudwriter(root, *args)
    assert r.returncode == 0, r.stderr
    assert json.loads(summary.read_text())['preview']['0-64']['keys'] == ['000000000', '000010000',
                                                                         '000020000']
    make_input(local, [4], items=small)
    make_input(local, [3], items=small + mid)

    r = cloudwriter(root, *args)  # resumes: converts 3 and 4; 0-2 are gone from --local

    assert r.returncode == 0, r.stderr
    assert not list(local.glob('*.parquet'))
    preview = json.loads(summary.read_text())['preview']
    assert set(preview) == {'0-64', '64-128'}
    for bucket, p in preview.items():
        assert p['png'] == str(local / '_cloudwriter' / f'preview_{bucket}.png')
        assert f"preview {bucket}: {p['png']}" in r.stdout
    # 5 shards, 3 tiles: the first, middle and last shard; 2 shards, 3 tiles: two of one, one of the other
    assert preview['0-64']['keys'] == ['000000000', '000020000', '000040000']
    assert preview['64-128']['keys'] == ['000010002', '000010003', '000030002']
    assert_tiles(Path(preview['0-64']['png']), 3, [small[0]] * 3, small + mid)
    assert_tiles(Path(preview['64-128']['png']), 3, [mid[0], mid[1], mid[0]], small + mid)
    assert sorted(p.name for p in (remote / '_cloudwriter').glob('*.preview')) == [
        f'0000{s}.preview' for s in range(5)]


def test_preview_larger_than_the_candidates_draws_a_sheet_of_the_candidates(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    by_name = {it.name: it for it in good_items()}
    small = [by_name['landscape_40_baseline.jpg'], by_name['portrait_40_baseline.jpg']]  # bucket 0-64
    make_input(local, [0, 1], items=small)

    r = cloudwriter(root, '--local', str(local), '--remote', str(remote), '--preview', '3000')

    assert r.returncode == 0, r.stderr  # 4 candidates: a sheet of 4 tiles, not of 3000 empty cells
    preview = json.loads((local / '_cloudwriter' / 'summary.json').read_text())['preview']
    assert preview[ALL]['keys'] == ['000000000', '000000001', '000010000', '000010001']
    assert_tiles(Path(preview[ALL]['png']), 4, [small[0], small[1]] * 2, small)


def test_a_done_download_with_parquet_files_lacking_stats_names_them_and_exits_1(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, [0], items=good_items()[:3])
    for s in (1, 2):  # a shard img2dataset never finished, a parquet from elsewhere: no _stats.json
        write_shard(local, s, shard_rows(s, good_items()[:3], failures=0), stats=False)

    r = cloudwriter(root, '--local', str(local), '--remote', str(remote))

    assert r.returncode == 1, r.stderr
    ignored = [str(local / '00001.parquet'), str(local / '00002.parquet')]
    assert ('IGNORED (not converted): 2 parquet file(s) without the _stats.json img2dataset writes once a '
            f'shard is finished: {ignored[0]}, {ignored[1]}; finish them') in r.stdout
    summary = json.loads((local / '_cloudwriter' / 'summary.json').read_text())
    assert summary['ignored_parquet'] == ignored
    assert summary['exit_code'] == 1 and summary['shards_done'] == 1
    assert_dataset(read_buckets(str(remote), [ALL]), want, bucketed=False)
    assert (local / '00001.parquet').exists() and (local / '00002.parquet').exists()


def test_the_output_reads_as_mosaicml_diffusions_streaming_laion_dataset_reads_it(root, tmp_path):
    """The contract of StreamingLAIONDataset.__getitem__, restated from mosaicml/diffusion's
    diffusion/datasets/laion/laion.py at 8d89acef209fdf7d574996ad71bcc240965175e2: a StreamingDataset
    sample; `Image.open(BytesIO(sample['jpg']))`, `.convert('RGB')` unless mode is RGB; `sample['caption']`
    handed to a CLIP tokenizer as text. (Its `caption_latents` / `latents_256|512` are precompute's.)"""
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, [0], items=good_items())
    r = cloudwriter(root, '--local', str(local), '--remote', str(remote), '--bucketed')
    assert r.returncode == 0, r.stderr
    got = [s for b in BUCKETS if (remote / b / 'index.json').exists() for s in read_mds(str(remote / b))]
    assert {s['key'] for s in got} == set(want)
    for sample in got:
        img = Image.open(io.BytesIO(sample['jpg']))
        if img.mode != 'RGB':
            img = img.convert('RGB')
        img.load()  # what its transform (crop, ToTensor) forces
        assert img.mode == 'RGB' and img.size == (sample['width'], sample['height'])
        assert type(sample['caption']) is str and sample['caption'] == want[sample['key']]['caption']


def test_mds_files_are_byte_equal_to_streamings_mdswriter(tmp_path):
    """The script writes MDS files and merges indexes itself (for speed); for the same rows they
    must be what streaming's MDSWriter and merge_index write: shards byte for byte, their
    boundaries, index.json. A task of two input shards writes what one MDSWriter writes for the rows of
    both in turn: each bucket's open shard is carried from one to the next, no partly filled shard
    between them."""
    cw = load_script('laion_cloudwriter.py')
    want = make_input(tmp_path / 'in', [0, 1], items=list(build_corpus()) * 3)
    parquets = [tmp_path / 'in' / '00000.parquet', tmp_path / 'in' / '00001.parquet']
    limit = 2 * max(len(r['jpg']) for r in want.values()) + 4096  # no sample alone over the limit
    args = cw.parse_args(['--local', str(tmp_path / 'in'), '--remote', str(tmp_path / 'out'), '--bucketed',
                          '--size_limit', str(limit)])
    record = cw.write_parts(list(map(str, parquets)), str(tmp_path / 'out'), '', args, land=lambda path: None)

    writers = {}
    for r in pq.read_table(parquets[0]).to_pylist() + pq.read_table(parquets[1]).to_pylist():
        if r['key'] not in want:
            continue
        w, h = header_size(r['jpg'])
        sample = {c: r[c] for c in ('punsafe', 'pwatermark', 'similarity', 'caption', 'url', 'key', 'status',
                                    'jpg', 'hash')}
        sample.update(aesthetic_score=float('nan'), error_message=r['error_message'] or '',
                      exif=r['exif'] or '', width=w, height=h, original_width=w, original_height=h)
        bucket = bucket_of(min(w, h))
        if bucket not in writers:
            writers[bucket] = MDSWriter(out=str(tmp_path / 'ref' / bucket), columns=cw.COLUMNS,
                                        size_limit=limit)
        writers[bucket].write(sample)
    for writer in writers.values():
        writer.finish()

    assert set(record['parts']) == set(writers) and record['shards'] == ['00000', '00001']
    assert max(len(part['samples']) for part in record['parts'].values()) >= 3
    carried = [f for f in (tmp_path / 'out').glob('*/00000/*.mds') if {k[:5] for k in mds_keys(f)} == {
        '00000', '00001'}]
    assert carried, 'no MDS shard holds rows of both input shards'
    for bucket in writers:
        ours, ref = tmp_path / 'out' / bucket / '00000', tmp_path / 'ref' / bucket
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in ref.iterdir())
        for f in ref.iterdir():
            assert (ours / f.name).read_bytes() == f.read_bytes(), f'{bucket}/{f.name} differs'
        merge_index([str(ours / 'index.json')], str(tmp_path / 'merged' / bucket))
        # the merged index.json the run publishes, rebuilt from the shard's compact record
        published = b''.join(cw.index_chunks(cw.bucket_parts({'00000': record}, bucket)))
        assert json.loads(published) == json.loads((tmp_path / 'merged' / bucket / 'index.json').read_text())


def test_a_sample_over_the_size_limit_gets_a_shard_of_its_own(tmp_path):
    cw = load_script('laion_cloudwriter.py')
    want = make_input(tmp_path / 'in', [0])
    args = cw.parse_args(['--local', str(tmp_path / 'in'), '--remote', str(tmp_path / 'out'),
                          '--size_limit', '1kb'])
    record = cw.write_parts([str(tmp_path / 'in' / '00000.parquet')], str(tmp_path / 'out'), '', args,
                            land=lambda path: None)
    assert record['parts'][ALL]['samples'] == [1] * len(want)
    got = read_mds(str(tmp_path / 'out' / ALL / '00000'))
    assert [s['jpg'] for s in got] == [want[s['key']]['jpg'] for s in got]
    assert {s['key'] for s in got} == set(want)


def test_a_run_resumes_over_records_of_the_older_full_format(root, tmp_path):
    """Records used to hold each part's full index.json; a run resumed over such an output reads
    them: the dataset is whole and every index.json is byte for byte an all-new run's."""
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, range(3), items=list(build_corpus()) * 2)
    args = ('--local', str(local), '--remote', str(remote), '--bucketed', '--keep_parquet',
            '--size_limit', '40kb', '--processes', '1', '--shards_per_task', '1')
    assert cloudwriter(root, *args).returncode == 0
    all_new = {b: (remote / b / 'index.json').read_bytes() for b in BUCKETS if (remote / b).is_dir()}
    assert max(len(json.loads(index)['shards']) for index in all_new.values()) >= 6  # several per part

    # Shard 0's record as the older version wrote it (its parts' own index.json in full), shard 2
    # not converted yet, no merged index: a run of the older version killed after shard 1.
    old = remote / '_cloudwriter' / '00000.record'
    record = json.loads(old.read_text())
    del record['config'], record['parts']
    record['index'] = {b: json.loads((remote / b / '00000' / 'index.json').read_text())
                       for b in record['samples']}
    old.write_text(json.dumps(record))
    (remote / '_cloudwriter' / '00002.record').unlink()
    for b in all_new:
        (remote / b / 'index.json').unlink()

    r = cloudwriter(root, *args)

    assert r.returncode == 0, r.stderr
    assert json.loads((local / '_cloudwriter' / 'summary.json').read_text())['shards_this_run'] == 1
    assert json.loads(old.read_text()) == record  # read as it is, not converted again
    assert {b: (remote / b / 'index.json').read_bytes() for b in all_new} == all_new
    assert_dataset(read_buckets(str(remote), BUCKETS), want)


def test_jpeg_sizes_are_read_from_arrow_buffers_without_pil():
    """The fast header reader must work on the views the converter hands it (arrow's buffers are
    signed bytes); PIL would give the same answer, so only this test sees a fallback."""
    cw = load_script('laion_cloudwriter.py')
    jpegs = [it for it in good_items() if it.data[:2] == b'\xff\xd8']
    offsets, data = cw.binary_buffers(pa.array([it.data for it in jpegs]))
    assert len(jpegs) >= 10
    for i, it in enumerate(jpegs):
        assert cw.jpeg_size(data[offsets[i]:offsets[i + 1]]) == (it.width, it.height), it.name


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_two_runs_at_once_the_second_refuses_and_the_first_ends_complete(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, range(3), items=good_items()[:4], done=False)
    other = tmp_path / 'other-machine'  # a second machine's download, pointed at the same remote
    make_input(other, range(2), items=good_items()[:2], key_offset=50)
    args = ('--remote', str(remote), '--bucketed', '--poll_interval', '0.3', '--processes', '1',
            '--merge_interval', '0')
    first = start(root, '--local', str(local), *args)
    try:
        wait_for(lambda: records(remote) == {'00000', '00001', '00002'} or first.poll() is not None,
                 what='the first run to convert its shards')
        assert first.poll() is None, 'no done file: the first run keeps polling'

        same_local = cloudwriter(root, '--local', str(local), *args)
        same_remote = cloudwriter(root, '--local', str(other), *args)

        assert same_local.returncode == 2 and same_remote.returncode == 2
        assert last_line(same_local.stderr) == (
            f'error: --local {local}/_cloudwriter is in use by another laion_cloudwriter run '
            f'(pid {first.pid}); wait for it to end (the lock ends with that process)')
        line = last_line(same_remote.stderr)
        assert line.startswith(f'error: {remote} (--subfolder none) is being written by another '
                               f'laion_cloudwriter run (') and f'pid {first.pid}, --local {local}' in line
        assert f'delete {remote}/_cloudwriter/run.lease if you know it is dead' in line
        assert 'Traceback' not in same_local.stderr + same_remote.stderr
        assert sorted(p.name for p in other.glob('*.parquet')) == ['00000.parquet', '00001.parquet']
        (local / 'done').touch()
        first.wait(60)
    finally:
        if first.poll() is None:
            kill9(first)
    assert first.returncode == 0, first.stderr.read()
    assert_dataset(read_buckets(str(remote), BUCKETS), want)
    assert 'UNREADABLE' not in first.stdout.read()

    # A lease left by a run on another machine blocks while fresh; once stale it is taken over.
    lease = remote / '_cloudwriter' / 'm2' / 'run.lease'
    lease.parent.mkdir(parents=True)
    for age, code in ((5, 2), (61, 0)):
        lease.write_text(json.dumps({'token': 'x', 'host': 'elsewhere', 'pid': 1, 'seen': time.time() - age}))
        r = cloudwriter(root, '--local', str(other), *args, '--subfolder', 'm2')
        assert r.returncode == code, r.stderr
        assert ('(host elsewhere, pid 1,' in r.stderr) == (code == 2)
    assert records(remote, 'm2') == {'00000', '00001'}


BAD_FLAGS = [
    (['--batch_size', '0'], "argument --batch_size: '0': give an integer >= 1"),
    (['--retry', '0'], "argument --retry: '0': give an integer >= 1"),
    (['--preview', '-1'], "argument --preview: '-1': give an integer >= 0"),
    (['--processes', '-1'], "argument --processes: '-1': give an integer >= 1"),
    (['--poll_interval', '0'], "argument --poll_interval: '0': give a number > 0"),
    (['--size_limit', 'banana'], "argument --size_limit: 'banana': give bytes or a size like 64mb"),
    (['--subfolder', '..'], "argument --subfolder: '..': give one plain folder name"),
    (['--subfolder', '/abs'], "argument --subfolder: '/abs': give one plain folder name"),
    (['--subfolder', 'a//b'], "argument --subfolder: 'a//b': give one plain folder name"),
]


@pytest.mark.parametrize('flags, says', BAD_FLAGS[1:])
def test_bad_flags_fail_in_the_parser_with_argparses_message(tmp_path, capsys, flags, says):
    """The parser the command line runs first (in-process: one case runs the whole command below)."""
    cw = load_script('laion_cloudwriter.py')
    with pytest.raises(SystemExit) as stop:
        cw.parse_args(['--local', str(tmp_path), '--remote', str(tmp_path / 'mds'), *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in last_line(err) and 'Traceback' not in err


@pytest.mark.parametrize('flags, says', BAD_FLAGS[:1] + [
    (['--local', '{missing}'], 'error: --local {missing} does not exist; give the download'),
    (['--local', '{file}'], 'error: --local {file} is a file; give the folder of img2dataset parquet shards'),
])
def test_bad_flags_and_a_missing_local_refuse_in_one_line(root, tmp_path, flags, says):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    make_input(local, [0], items=good_items()[:2])
    (tmp_path / 'a-file').write_text('not a folder')
    paths = {'missing': str(tmp_path / 'no-such-folder'), 'file': str(tmp_path / 'a-file')}
    flags = [f.format(**paths) for f in flags]
    r = cloudwriter(root, '--local', str(local), '--remote', str(remote), *flags, timeout=60)
    assert r.returncode == 2
    assert says.format(**paths) in last_line(r.stderr) and 'Traceback' not in r.stderr
    assert not remote.exists() and not (tmp_path / 'no-such-folder').exists()
    assert (local / '00000.parquet').exists()


def test_a_bad_value_in_one_shard_skips_that_shard_and_the_others_go_on(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, range(4), items=good_items()[:4])
    # shard 1: its caption column is binary, one caption not UTF-8; shard 2: a float column of text
    t = pq.read_table(local / '00001.parquet')
    captions = [c.encode() for c in t['caption'].to_pylist()]
    captions[2] = b'caf\xe9 \xff'
    pq.write_table(t.set_column(t.schema.get_field_index('caption'), 'caption', pa.array(captions)),
                   local / '00001.parquet')
    t = pq.read_table(local / '00002.parquet')
    punsafe = [str(v) for v in t['punsafe'].to_pylist()]
    punsafe[3] = 'n/a'
    pq.write_table(t.set_column(t.schema.get_field_index('punsafe'), 'punsafe', pa.array(punsafe)),
                   local / '00002.parquet')
    bad = {'00001', '00002'}

    # one process: tasks of two shards ([0, 1], [2, 3]), each meeting its bad shard after or before a good one
    r = cloudwriter(root, '--local', str(local), '--remote', str(remote), '--processes', '1')

    assert r.returncode == 1, r.stderr  # input skipped, kept, named: not a remote failure
    assert 'writing to' not in r.stderr + r.stdout and 'Traceback' not in r.stderr
    summary = json.loads((local / '_cloudwriter' / 'summary.json').read_text())
    caption, punsafe = sorted(summary['skipped_shards'])
    assert caption.startswith(f"{local}/00001.parquet: bad value in column 'caption' at row 2, not string (")
    assert punsafe.startswith(f"{local}/00002.parquet: bad value in column 'punsafe' at row 3, not double (")
    assert 'UTF8' in caption and "'n/a'" in punsafe  # arrow's reason
    assert f"SKIPPED (parquet kept): {local / '00001.parquet'}: bad value in column 'caption'" in r.stdout
    for s in bad:
        assert (local / f'{s}.parquet').exists() and (local / f'{s}_stats.json').exists()
        assert not list(remote.glob(f'*/{s}'))  # no half-written part left at the remote
    assert records(remote) == {'00000', '00003'} and not (local / '00000.parquet').exists()
    assert_dataset(read_buckets(str(remote), [ALL]), {k: v for k, v in want.items()
                                                      if f"{v['shard']:05d}" not in bad}, bucketed=False)


def test_sigterm_publishes_the_recorded_shards_then_a_rerun_completes(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, range(12), items=good_items())
    # tasks of 2 shards (each carrying its open MDS shards): 6 tasks, so that the signal lands mid-run; with
    # the default 16, one process gets two tasks of 6 and a loaded machine may finish both before it lands
    args = ('--local', str(local), '--remote', str(remote), '--processes', '1', '--merge_interval', '3600',
            '--shards_per_task', '2')
    proc = start(root, *args)
    try:
        wait_for(lambda: len(records(remote)) >= 2 or proc.poll() is not None, what='two records')
        os.killpg(proc.pid, signal.SIGTERM)  # the platform's stop, to the whole process group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == 143, err
    assert 'SIGTERM: stopping' in err and 'Traceback' not in err
    done = records(remote)
    assert 2 <= len(done) < 12, 'stopped too late to test anything'
    assert f'INTERRUPTED by SIGTERM: the index covers the {len(done)} recorded shards' in out
    # The published index holds exactly the recorded shards, whole; the others' parquets are kept.
    got = read_buckets(str(remote), [ALL])
    assert_dataset(got, {k: v for k, v in want.items() if f"{v['shard']:05d}" in done}, bucketed=False)
    for s in range(12):
        assert (local / f'{s:05d}.parquet').exists() == (f'{s:05d}' not in done)
    assert json.loads((local / '_cloudwriter' / 'summary.json').read_text())['interrupted'] == 'SIGTERM'

    r = cloudwriter(root, *args)
    assert r.returncode == 0, r.stderr
    assert_dataset(read_buckets(str(remote), [ALL]), want, bucketed=False)


def test_remote_mistakes_refuse_naming_the_remote_and_file_urls_are_folders(root, tmp_path, s3):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, [0], items=good_items()[:3])

    typo = tmp_path / 'mdss'
    r = cloudwriter(root, '--remote', str(typo), '--merge_only')
    assert r.returncode == 2 and r.stdout == ''
    assert last_line(r.stderr) == (f'error: {typo}: no converted shards recorded under {typo}/_cloudwriter; '
                                   'give the --remote the cloudwriter runs wrote to')

    missing = 's3://no-such-bucket-here/laion'
    r = cloudwriter(root, '--local', str(local), '--remote', missing, env=s3.child_env())
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert last_line(r.stderr).startswith(f'error: {missing}: cannot be read or written (')
    assert 'no-such-bucket-here' in last_line(r.stderr) and (local / '00000.parquet').exists()

    r = cloudwriter(root, '--local', str(local), '--remote', f'file://{remote}')
    assert r.returncode == 0, r.stderr
    assert_dataset(read_buckets(str(remote), [ALL]), want, bucketed=False)


# ---- Real files from the web (tests/testbed/real.py): what a trainer's loader decodes, and nothing else ----

def many_samples_tiff() -> CorpusItem:
    """lab.tif with its SamplesPerPixel tag set to 200: PIL refuses to open it and logs
    `ERROR PIL.TiffImagePlugin: More samples per pixel than can be decoded` on the way."""
    data = bytearray((FOLDER / 'lab.tif').read_bytes())
    assert data[:2] == b'II'
    ifd = struct.unpack('<I', data[4:8])[0]
    for i in range(struct.unpack('<H', data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack('<H', data[entry:entry + 2])[0] == 277:  # SamplesPerPixel, one SHORT
            data[entry + 8:entry + 10] = struct.pack('<H', 200)
    return CorpusItem('samples_per_pixel_200.tif', bytes(data), None, None, decodable=False)


# more of one reason than the summary names (FIRST_NAMED, 20): the rest are named in the files only
JUNK = [CorpusItem(f'not_an_image_{i:02d}.jpg', b'<html>%d</html>' % i, None, None, decodable=False)
        for i in range(25)]
REAL = [*real_items(), many_samples_tiff(), *JUNK]
REAL_BY_KEY = {f'00000{i:04d}': it for i, it in enumerate(REAL)}  # shard_rows' keys of shard 0
NO_HEADER = {'broken.png', 'samples_per_pixel_200.tif', *(it.name for it in JUNK)}
BOMBS = {'bmp_bomb.bmp', 'gif_bomb.gif'}
PEAK_RSS = ('import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); '
            'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)')


def expected_reason(name: str) -> str:
    return ('success but no readable image header' if name in NO_HEADER else
            "success but over PIL's pixel limit (89,478,485 pixels: a decompression bomb)" if name in BOMBS
            else 'success but does not decode with PIL')


@pytest.fixture(scope='module')
def real_runs(root, tmp_path_factory) -> dict[str, tuple]:
    """One shard of every real file (and a 404), converted twice: as the default (--verify full), and
    with --verify header --preview (its peak memory measured: the children's peak RSS in kB)."""
    out = {}
    for mode, flags in (('full', []), ('header', ['--verify', 'header', '--preview', '32'])):
        base = tmp_path_factory.mktemp(f'real-{mode}')
        local, remote = base / 'parquet', base / 'mds'
        write_shard(local, 0, shard_rows(0, REAL))
        (local / 'done').touch()
        cmd = [sys.executable, '-c', PEAK_RSS, sys.executable, str(root / 'laion_cloudwriter.py'), '--local',
               str(local), '--remote', str(remote), '--bucketed', '--processes', '1', *flags]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        peak_kb = int(r.stderr.strip().splitlines()[-1])
        out[mode] = (r, peak_kb, local, remote)
    return out


def test_every_stored_sample_decodes_and_each_image_left_out_is_counted_and_named(real_runs):
    r, _, local, remote = real_runs['full']
    assert r.returncode == 0, r.stderr
    assert 'ERROR' not in r.stderr and 'PIL' not in r.stderr and 'Traceback' not in r.stderr
    stored = {s['key']: s for rows in read_buckets(str(remote), BUCKETS).values() for s in rows}
    # what mosaicml/diffusion's StreamingLAIONDataset and any loader of the raw MDS do to each sample
    # (`Image.open(BytesIO(sample['jpg']))` then decode), under PIL's defaults: testbed/real.py decodes()
    assert stored and all(decodes(s['jpg']) for s in stored.values())
    assert set(stored) == {k for k, it in REAL_BY_KEY.items() if it.decodable}
    assert all(s['jpg'] == REAL_BY_KEY[k].data for k, s in stored.items())

    summary = json.loads((local / '_cloudwriter' / 'summary.json').read_text())
    # every image left out is named, one JSON line each, in a file beside its shard's record
    names = (remote / '_cloudwriter' / '00000.left_out.jsonl').read_text().splitlines()
    left_out = {x['key']: x for x in map(json.loads, names)}
    assert len(names) == len(left_out) == sum(not it.decodable for it in REAL)
    assert set(left_out) == {k for k, it in REAL_BY_KEY.items() if not it.decodable}
    for key, x in left_out.items():
        name = REAL_BY_KEY[key].name
        assert x['reason'] == expected_reason(name), name
        assert x['url'].endswith(f'/{name}') and x['error'], x
    reasons = Counter(x['reason'] for x in left_out.values())
    assert summary['skipped_by_reason'] == {**reasons, 'HTTP Error 404: Not Found': 1}
    # the summary and the record keep the count, where the names are, and the first 20 of each reason
    assert summary['left_out']['images'] == len(left_out) and max(reasons.values()) > 20
    assert summary['left_out']['names'].startswith(f'{remote}/_cloudwriter/NNNNN.left_out.jsonl: ')
    assert summary['left_out']['first'] == {
        reason: sorted((x for x in left_out.values() if x['reason'] == reason), key=lambda x: x['key'])[:20]
        for reason in reasons}
    record = json.loads((remote / '_cloudwriter' / '00000.record').read_text())
    assert record['left_out'] == len(left_out) and record['left_out_first'] == summary['left_out']['first']
    assert (summary['rows'], summary['samples'], summary['rows_skipped']) == \
           (len(REAL) + 1, len(stored), len(left_out) + 1)  # rows in == written + skipped
    written, skipped = sum(record['samples'].values()), sum(record['skipped'].values())
    assert record['rows'] == written + skipped == len(REAL) + 1
    assert f'rows: {len(REAL) + 1} in = {len(stored)} written + {len(left_out) + 1} skipped (verify: full ' \
           '1 shards)' in r.stdout and summary['verify'] == {'full': 1}
    for reason, n in reasons.items():  # the printed summary counts each reason and names its first files
        line = next(ln for ln in r.stdout.splitlines() if f'{n}  {reason}: ' in ln)
        assert min(k for k, x in left_out.items() if x['reason'] == reason) in line


def test_verify_header_stores_undecodable_files_and_the_preview_refuses_the_bomb_in_little_memory(real_runs):
    r, peak_kb, local, remote = real_runs['header']
    assert r.returncode == 0, r.stderr
    assert 'ERROR' not in r.stderr and 'PIL' not in r.stderr and 'Traceback' not in r.stderr
    stored = {s['key'] for rows in read_buckets(str(remote), BUCKETS).values() for s in rows}
    # documented: only files without a readable header are left out; the rest are stored unopened
    assert stored == {k for k, it in REAL_BY_KEY.items() if it.name not in NO_HEADER}
    bomb = next(k for k, it in REAL_BY_KEY.items() if it.name == 'gif_bomb.gif')
    candidates = json.loads((remote / '_cloudwriter' / '00000.preview').read_text())['shards']['00000']
    tile = next(c for cands in candidates.values() for c in cands if c['key'] == bomb)
    assert tile['thumb'] == ''  # refused under PIL's pixel limit: drawn as a grey tile
    # the issue measured 4.5 GB: the preview decoded a thumbnail of the 4.36-gigapixel GIF
    assert peak_kb < 1_000_000, f'peak RSS {peak_kb / 1e6:.1f} GB'
    assert 'NOTE: 1 shard(s) were converted with --verify header' in r.stdout  # the output says so


def test_the_metadata_folder_is_refused_and_an_empty_folder_is_waited_on_without_a_write(root, tmp_path):
    meta = tmp_path / 'laion2b-raw'
    meta.mkdir()
    for i in range(2):
        pq.write_table(pa.table({'url': ['http://x/a.jpg'], 'caption': ['a']}),
                       meta / f'part-0000{i}.parquet')
    before = sorted(p.name for p in meta.iterdir())
    r = cloudwriter(root, '--local', str(meta), '--remote', str(tmp_path / 'mds'), timeout=60)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert last_line(r.stderr) == (
        f'error: --local {meta} holds 2 parquet files that are not img2dataset shards: no _stats.json (e.g. '
        'part-00000.parquet; img2dataset writes NNNNN.parquet, then NNNNN_stats.json); is it the metadata '
        "folder? give the download's OUTPUT_FOLDER")
    assert sorted(p.name for p in meta.iterdir()) == before and not (tmp_path / 'mds').exists()

    # A download that is starting: its folder is empty; the run says what it waits for, writes nothing
    # there until the first shard comes, then converts as usual.
    local, remote = tmp_path / 'parquet', tmp_path / 'mds2'
    local.mkdir()
    proc = start(root, '--local', str(local), '--remote', str(remote), '--poll_interval', '0.2',
                 '--processes', '1')
    try:
        time.sleep(1.5)
        assert proc.poll() is None and not list(local.iterdir()) and not remote.exists()
        want = make_input(local, [0], items=good_items()[:2])
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == 0, err
    assert (f'--local {local}: no img2dataset shard yet; waiting for the download to write its first '
            'NNNNN.parquet, looking every 0.2 s') in err
    assert_dataset(read_buckets(str(remote), [ALL]), want, bucketed=False)


def test_local_and_remote_in_one_place_are_refused_under_any_spelling(root, tmp_path):
    local = tmp_path / 'parquet'
    make_input(local, [0], items=good_items()[:1])
    (tmp_path / 'link').symlink_to(local)
    before = sorted(str(p) for p in tmp_path.rglob('*'))
    for remote in (f'{local}/', 'parquet', str(tmp_path / 'link'), f'file://{local}', f'{local}/mds'):
        r = subprocess.run([sys.executable, str(root / 'laion_cloudwriter.py'), '--local', str(local),
                            '--remote', remote], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, remote
        assert r.stdout == '' and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f'error: --local {local} ') and 'give the MDS output a place of its own' \
            in r.stderr, r.stderr
        assert sorted(str(p) for p in tmp_path.rglob('*')) == before, remote  # nothing written
