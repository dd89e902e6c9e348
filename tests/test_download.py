"""laion_download_all.sh and laion_download_aesthetic.sh, run as a user would against the loopback server.

Each img2dataset run costs ~20-40 s here (every process imports img2dataset), so the full-set download
is one module fixture that several tests read, and the kill/resume test compares against it.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testbed.corpus import build_corpus, good_items
from testbed.i2d_shards import i2d_schema, write_i2d_output
from testbed.laion_meta import entries_for, full_table, write_metadata
from testbed.real import real_items

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {'full': ROOT / 'laion_download_all.sh', 'aesthetic': ROOT / 'laion_download_aesthetic.sh'}
PER_SHARD = 5
CORRUPT = 'corrupt: downloaded but does not decode'
REASONS = {'404': 'HTTP Error 404: Not Found', '500': 'HTTP Error 500: Internal Server Error',
           'decode': CORRUPT, 'mismatch': 'hash mismatch'}


def script_env(meta: Path, out: Path, **knobs: str) -> dict[str, str]:
    """The environment a user sets: the venv's bin on PATH (img2dataset, python3) and the knobs."""
    path = f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}'
    return {**os.environ, 'PATH': path, 'URL_LIST': str(meta), 'OUTPUT_FOLDER': str(out),
            'PROCESSES_COUNT': '1', 'THREAD_COUNT': '8', 'NUMBER_SAMPLE_PER_SHARD': str(PER_SHARD),
            'TIMEOUT': '10', **knobs}


def run(flavour: str, meta: Path, out: Path, *args: str, **knobs: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS[flavour]), *args], env=script_env(meta, out, **knobs),
                          capture_output=True, text=True, timeout=300)


def summary(stdout: str) -> dict[str, int]:
    """The counts of the end-of-run summary: its labelled lines and one entry per failure reason."""
    counts = {}
    text = stdout.split('== laion_download summary')[1]
    for label in ('shards finished', 'rows', 'images ok', 'failures', 'no hash, unchecked'):
        found = re.search(rf'^  {label} +([\d,]+)', text, re.M)
        if found or label != 'no hash, unchecked':  # printed where there is one
            counts[label] = int(found.group(1).replace(',', ''))
    for n, reason in re.findall(r'^    +([\d,]+)  (.+)$', text, re.M):
        counts[reason] = int(n.replace(',', ''))
    return counts


def read_output(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob('*.parquet'))])


# Real broken files (testbed/real.py) in the full download, in place of as many generated JPEGs (the
# same rows, so no extra shard): the decode check counts each corrupt, the bombs included, by the
# cloudwriter's rule.
REAL_BROKEN = ('gif_bomb.gif', 'bmp_bomb.bmp', 'truncated.png', 'broken_stream.png', 'ultrahdr.jpg')


def full_entries(server, slow: bool = True) -> tuple[list, pa.Table]:
    """Every corpus file but five generated JPEGs, five real broken files (REAL_BROKEN), a 404, a 500,
    a redirect and, last in a shard of its own, a slow URL (which only a kill needs: `slow` False leaves
    it out); one row carries a wrong md5 and two none (null, as in metadata a user joins from sources
    with and without hashes). Returns the entries (expect 'mismatch' for the wrong one, 'unhashed' for
    those without) and the metadata."""
    broken = [it for it in real_items() if it.name in REAL_BROKEN]
    server.files.update({it.name: it.data for it in broken})
    corpus = list(build_corpus())
    generated = [it for i, it in enumerate(corpus) if i % 2 == 0 or i > 9]  # portraits of 5 sizes out
    entries = entries_for(server, [*generated, *broken], slow=slow)
    table = full_table(entries)
    named = {e.item.name: i for i, e in enumerate(entries) if e.item is not None}
    md5 = table.column('md5').to_pylist()
    expect = [e.expect for e in entries]
    md5[named['gray.jpg']] = hashlib.md5(b'not these bytes').hexdigest()
    expect[named['gray.jpg']] = 'mismatch'
    for name in ('cmyk.jpg', 'image.webp'):
        md5[named[name]] = None
        expect[named[name]] = 'unhashed'
    table = table.set_column(table.schema.get_field_index('md5'), 'md5', pa.array(md5, pa.string()))
    assert not slow or len(entries) % PER_SHARD == 1  # the slow URL is alone in the last shard
    return list(zip(entries, expect, strict=True)), table


@pytest.fixture(scope='module')
def full_meta(image_server, tmp_path_factory):
    entries, table = full_entries(image_server)
    meta = tmp_path_factory.mktemp('laion2b-raw')
    pq.write_table(table, meta / 'part-00000.parquet')
    return meta, entries


@pytest.fixture(scope='module')
def full_download(full_meta, tmp_path_factory):
    meta, entries = full_meta
    out = tmp_path_factory.mktemp('dl') / 'laion2b-processed'
    proc = run('full', meta, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, entries


def check_rows(table: pa.Table, entries: list, extra: list[str]) -> None:
    """Every metadata row once; success rows hold exactly the server's bytes and their md5."""
    by_url = {e.url: (e, exp) for e, exp in entries}
    rows = table.to_pylist()
    assert sorted(r['url'] for r in rows) == sorted(by_url)
    for r in rows:
        entry, expect = by_url[r['url']]
        assert r['caption'] == entry.caption
        if expect in ('success', 'decode', 'unhashed'):  # img2dataset decodes nothing: corrupt files too
            assert r['status'] == 'success', r
            assert r['jpg'] == entry.item.data, entry.url
            assert r['md5'] == hashlib.md5(entry.item.data).hexdigest()
            assert r['width'] is None  # no decode, no size: the cloudwriter reads it from the header
        else:
            assert r['status'] == 'failed_to_download' and r['jpg'] is None
            assert r['error_message'] == REASONS[expect]
        assert all(c in r for c in extra)


def expected_summary(entries: list) -> dict[str, int]:
    want = {'rows': len(entries)}
    for _, expect in entries:
        if expect not in ('success', 'unhashed'):
            want[REASONS[expect]] = want.get(REASONS[expect], 0) + 1
    want['failures'] = sum(v for k, v in want.items() if k != 'rows')
    unhashed = sum(expect == 'unhashed' for _, expect in entries)
    if unhashed:  # downloaded without the check, and counted so: a row without a hash is no failure
        want['no hash, unchecked'] = unhashed
    want['images ok'] = len(entries) - want['failures']
    return want


def built_schema(flavour: str, folder: Path) -> pa.Schema:
    """The schema of a shard the test bed's builder (testbed/i2d_shards.py) writes: what the other tests
    take for img2dataset's output, so it must equal the real one's."""
    write_i2d_output(folder, 1, flavour=flavour)
    return pq.read_schema(folder / '00000.parquet').remove_metadata()


def test_full_set_downloads_exact_bytes_and_counts_failures(full_download, tmp_path):
    out, proc, entries = full_download
    assert (out / 'done').exists()
    shards = -(-len(entries) // PER_SHARD)
    assert sorted(p.name for p in out.glob('*_stats.json')) == [f'{s:05d}_stats.json' for s in range(shards)]
    real = pq.read_schema(out / '00000.parquet').remove_metadata()
    assert real == i2d_schema('full') == built_schema('full', tmp_path / 'built')
    table = read_output(out)
    check_rows(table, entries, ['punsafe', 'pwatermark', 'similarity', 'hash'])
    assert len(set(table.column('key').to_pylist())) == len(entries)
    got = summary(proc.stdout)
    assert got.pop('shards finished') == shards
    assert got == expected_summary(entries)


def test_aesthetic_set_downloads_exact_bytes_with_its_columns(image_server, tmp_path):
    entries = [(e, e.expect) for e in entries_for(image_server)]
    write_metadata(tmp_path / 'laion2b-4.5-raw', [e for e, _ in entries], 'aesthetic', files=2)
    out = tmp_path / 'laion2b-processed'
    proc = run('aesthetic', tmp_path / 'laion2b-4.5-raw', out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / 'done').exists()
    real = pq.read_schema(out / '00000.parquet').remove_metadata()
    assert real == i2d_schema('aesthetic') == built_schema('aesthetic', tmp_path / 'built')
    table = read_output(out)
    check_rows(table, entries, ['AESTHETIC_SCORE', 'punsafe', 'hash'])
    scores = {r['url']: r['AESTHETIC_SCORE'] for r in table.select(['url', 'AESTHETIC_SCORE']).to_pylist()}
    meta = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / 'laion2b-4.5-raw').glob('*'))])
    assert scores == dict(zip(meta.column('URL').to_pylist(), meta.column('AESTHETIC_SCORE').to_pylist()))
    got = summary(proc.stdout)
    got.pop('shards finished')
    assert got == expected_summary(entries)


def test_killed_download_resumes_without_downloading_finished_shards(full_download, full_meta,
                                                                     image_server, tmp_path):
    meta, entries = full_meta
    out = tmp_path / 'laion2b-processed'
    last = f'{len(entries) // PER_SHARD - 1:05d}_stats.json'  # the shard before the slow one
    proc = subprocess.Popen([str(SCRIPTS['full'])], env=script_env(meta, out), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / last).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-way through the slow shard
    assert proc.wait(timeout=30) != 0
    assert (out / last).exists() and not (out / 'done').exists()
    stats = sorted(out.glob('*_stats.json'))
    assert len(stats) == len(entries) // PER_SHARD
    finished = pa.concat_tables([pq.read_table(out / f"{p.name.split('_')[0]}.parquet") for p in stats])
    paths = {urlparse(u).path for u in finished.column('url').to_pylist()}
    assert len(finished) == len(entries) - 1
    before = dict(image_server.hits)

    again = run('full', meta, out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (out / 'done').exists()
    assert {p: image_server.hits[p] - before.get(p, 0) for p in paths} == dict.fromkeys(paths, 0)
    assert image_server.hits[urlparse(entries[-1][0].url).path] > before.get(
        urlparse(entries[-1][0].url).path, 0)  # the cut-off shard was downloaded again
    resumed, reference = read_output(out), read_output(full_download[0])
    keys = resumed.column('key').to_pylist()
    assert len(keys) == len(set(keys)) == len(entries)

    def successes(t: pa.Table) -> set:
        return {(r['key'], r['url'], r['md5']) for r in t.to_pylist() if r['status'] == 'success'}

    assert successes(resumed) == successes(reference)


def test_failed_shard_leaves_no_done_and_exits_nonzero(image_server, tmp_path):
    # Shard 0 cannot be written (as on a full disk): img2dataset retries it, gives up and exits 0 all
    # the same. Shard 1 holds a row whose md5 disagrees with its bytes, kept with VERIFY_HASH=False.
    items = good_items()[:PER_SHARD + 1]
    entries = entries_for(image_server, items, failures=False, redirect=False)
    table = full_table(entries)
    md5 = table.column('md5').to_pylist()
    md5[-1] = hashlib.md5(b'not these bytes').hexdigest()
    (tmp_path / 'raw').mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index('md5'), 'md5', pa.array(md5)),
                   tmp_path / 'raw' / 'part-00000.parquet')
    out = tmp_path / 'out'
    (out / '00000.parquet').mkdir(parents=True)
    proc = run('full', tmp_path / 'raw', out, VERIFY_HASH='False')
    assert proc.returncode != 0
    assert not (out / 'done').exists()
    assert 'no done file' in proc.stderr
    assert re.search(r'shards unfinished +1 .*00000', proc.stdout)
    row = pq.read_table(out / '00001.parquet').to_pylist()[0]
    assert row['status'] == 'success' and row['jpg'] == items[-1].data


def bad_inputs(tmp_path: Path, server) -> dict[str, tuple]:
    """name -> (script, URL_LIST, extra args, the message expected[, OUTPUT_FOLDER])."""
    entries = entries_for(server, good_items()[:2], failures=False, redirect=False)
    write_metadata(tmp_path / 'full', entries, 'full')
    write_metadata(tmp_path / 'aesthetic', entries, 'aesthetic')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'nocaption').mkdir()
    pq.write_table(full_table(entries).drop_columns(['caption']), tmp_path / 'nocaption' / 'a.parquet')
    (tmp_path / 'garbage').mkdir()
    (tmp_path / 'garbage' / 'a.parquet').write_bytes(b'this is not parquet')
    return {
        'missing folder': ('full', tmp_path / 'nowhere', [], 'nowhere: no such folder or file'),
        'empty folder': ('full', tmp_path / 'empty', [], 'holds no *.parquet metadata files'),
        'no caption': ('full', tmp_path / 'nocaption', [],
                       "a.parquet: no column 'caption' (CAPTION_COL); its columns: url, similarity"),
        'full metadata, aesthetic script': ('aesthetic', tmp_path / 'full', [],
                                            "part-00000.parquet: no column 'URL' (URL_COL); its columns: u"),
        'aesthetic metadata, full script': ('full', tmp_path / 'aesthetic', [], "no column 'url' (URL_COL)"),
        'not parquet': ('full', tmp_path / 'garbage', [], 'a.parquet: not a readable parquet file'),
        'flag the script sets': ('full', tmp_path / 'full', ['--resize_mode=border'],
                                 'this script sets --resize_mode itself'),
        'bad number': ('full', tmp_path / 'full', [], 'PROCESSES_COUNT=two: expected a positive'),
        'bad storage env': ('full', tmp_path / 'full', [], 'STORAGE_ENV=both: expected forward or cluster'),
        'output is a file': ('full', tmp_path / 'full', [], 'out.txt exists and is not a folder',
                             tmp_path / 'out.txt'),
        'output under a file': ('full', tmp_path / 'full', [], 'out.txt exists and is not a folder',
                                tmp_path / 'out.txt' / 'shards'),
        # the metadata folder under another spelling: the shards would mix with the metadata files
        'output is the metadata folder': ('aesthetic', tmp_path / 'aesthetic', [], 'is the metadata folder',
                                          f'{tmp_path}/link/./aesthetic/'),
    }


BAD = ['missing folder', 'empty folder', 'no caption', 'full metadata, aesthetic script',
       'aesthetic metadata, full script', 'not parquet', 'flag the script sets', 'bad number',
       'bad storage env', 'output is a file', 'output under a file', 'output is the metadata folder']
KNOBS = {'bad number': {'PROCESSES_COUNT': 'two'}, 'bad storage env': {'STORAGE_ENV': 'both'}}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('case', BAD)
def test_bad_input_gets_one_line_before_any_download(case, image_server, tmp_path):
    flavour, meta, args, message, *output = bad_inputs(tmp_path, image_server)[case]
    out = output[0] if output else tmp_path / 'out'
    (tmp_path / 'out.txt').write_text('my notes')
    (tmp_path / 'link').symlink_to(tmp_path)
    before = snapshot(tmp_path)
    knobs = KNOBS.get(case, {})
    proc = subprocess.run([str(SCRIPTS[flavour]), *args], env={**script_env(meta, out), **knobs},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith('laion_download: error: '), proc.stderr
    assert message in errors[0]
    assert snapshot(tmp_path) == before  # nothing started, nothing written, the metadata intact
    assert not (tmp_path / 'out').exists()


# A rerun into the full download's folder with a setting that moves rows between shard ids or changes
# the shards' columns: (knobs, a change to the metadata folder, the setting the refusal names; {rows}:
# the metadata's rows).
CHANGED = {
    'rows per shard': ({'NUMBER_SAMPLE_PER_SHARD': '3'}, None, 'NUMBER_SAMPLE_PER_SHARD=5, not 3'),
    'a metadata file added': ({}, 'add', 'metadata=1 files, {rows} rows, sha256 '),
    'a metadata file replaced': ({}, 'replace', 'metadata=1 files, {rows} rows, sha256 '),
    'kept columns': ({'SAVE_ADDITIONAL_COLUMNS': 'punsafe'}, None,
                     'SAVE_ADDITIONAL_COLUMNS=punsafe,pwatermark,similarity,hash, not punsafe'),
}


@pytest.mark.parametrize('case', CHANGED)
def test_rerun_with_other_shard_settings_is_refused_touching_nothing(case, full_download, full_meta,
                                                                      image_server, tmp_path):
    knobs, meta_change, message = CHANGED[case]
    meta, entries = full_meta
    out = full_download[0]
    rows = [e for e, _ in entries]
    if meta_change:  # a second file beside the first, or the same name and rows with other URLs
        meta = tmp_path / 'raw'
        others = [replace(e, url=e.url + '?v=2') for e in rows]
        write_metadata(meta, rows + others[:2] if meta_change == 'add' else others, 'full',
                       files=2 if meta_change == 'add' else 1)
    before = snapshot(out)
    proc = subprocess.run([str(SCRIPTS['full'])], env=script_env(meta, out, **knobs),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if 'error' in line]
    assert len(errors) == 1 and errors[0].startswith(
        f'laion_download: error: OUTPUT_FOLDER={out} holds shards made with '), proc.stderr
    assert message.format(rows=len(rows)) in errors[0]
    assert errors[0].endswith('rerun with those settings, or pick a new OUTPUT_FOLDER')
    assert snapshot(out) == before  # `done` still there, nothing downloaded
    assert (out / 'done').exists()
    check_rows(read_output(out), entries, ['punsafe'])
