"""DATASET presets and the metadata filter (filter_metadata.py), run as a user would: the filter step by
its command line and through laion_download_all.sh against the loopback image server."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from testbed.corpus import good_items
from testbed.laion_meta import entries_for
from testbed.presets import PRESET_TABLES, preset_table
from testbed.readback import read_mds
from testbed.scripts import run_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'laion_download_all.sh'
FILTER_PY = ROOT / 'filter_metadata.py'
PER_SHARD = 4
I2D_OWN = {'key', 'status', 'error_message', 'width', 'height', 'original_width', 'original_height', 'exif',
           'md5', 'jpg'}
# Preset columns laion_cloudwriter.py's ALIASES map to its own names (MDS column -> metadata column).
MDS_NAMES = {'laion-aesthetics': {'aesthetic_score': 'AESTHETIC_SCORE', 'similarity': 'similarity'},
             'datacomp': {'similarity': 'clip_b32_similarity_score'},
             'coyo': {'similarity': 'clip_similarity_vitb32', 'aesthetic_score': 'aesthetic_score_laion_v2'}}
FILTER = 'punsafe < 0.065 AND pwatermark < 0.35 AND similarity >= 0.255'  # no value sits on a bound


def script_env(meta: Path, out: Path, **knobs: str) -> dict[str, str]:
    path = f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}'
    return {**os.environ, 'PATH': path, 'URL_LIST': str(meta), 'OUTPUT_FOLDER': str(out),
            'PROCESSES_COUNT': '1', 'THREAD_COUNT': '8', 'NUMBER_SAMPLE_PER_SHARD': str(PER_SHARD),
            'TIMEOUT': '10', **knobs}


def download(meta: Path, out: Path, **knobs: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT)], env=script_env(meta, out, **knobs), capture_output=True, text=True,
                          timeout=300)


def filter_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """filter_metadata.py's command line, run in this process as its own would run it (run_script)."""
    return run_script('filter_metadata.py', *args, env=env)


def read_shards(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob('[0-9]*.parquet'))])


def expected_keep(table: pa.Table) -> tuple[list[bool], list[int]]:
    """FILTER evaluated directly with pyarrow (nulls count as not kept), and each clause's removals in
    order: the independent statement the filter step is checked against."""
    clauses = [pc.less(table['punsafe'], 0.065), pc.less(table['pwatermark'], 0.35),
               pc.greater_equal(table['similarity'], 0.255)]
    alive = [True] * len(table)
    removed = []
    for c in clauses:
        ok = [bool(v) if v is not None else False for v in c.to_pylist()]
        removed.append(sum(a and not k for a, k in zip(alive, ok)))
        alive = [a and k for a, k in zip(alive, ok)]
    return alive, removed


@pytest.fixture(scope='module')
def entries(image_server):
    """Decodable corpus files, a 404 and a slow URL last (the kill test cuts it off)."""
    items = good_items()[:9]
    es = entries_for(image_server, items, failures=False, redirect=False)
    es.append(entries_for(image_server, items[:1], failures=True, redirect=False)[1])  # the 404
    es += entries_for(image_server, items[:1], failures=False, redirect=False, slow=True)[1:]
    return es


def summary_counts(text: str) -> dict[str, int]:
    """label -> count of filter_summary.txt's lines; a clause's label carries its text."""
    counts = {}
    pattern = r'^  (rows in|rows out|removed by \w+|removed as repeated) +([\d,]+)(.*)$'
    for label, n, rest in re.findall(pattern, text, re.M):
        name = f'{label}: {rest.strip()}' if label == 'removed by clause' else label
        counts[name] = int(n.replace(',', ''))
    return counts


def test_filter_blocklist_dedup_remove_exactly_what_pyarrow_says(entries, tmp_path):
    table = preset_table('relaion2b-en-research', entries)  # punsafe has nulls
    table = pa.concat_tables([table, table.slice(0, 3)])  # three repeated URLs at the end
    (tmp_path / 'raw').mkdir()
    pq.write_table(table.slice(0, 6), tmp_path / 'raw' / 'a.parquet')
    pq.write_table(table.slice(6), tmp_path / 'raw' / 'b.parquet')
    urls = table['url'].to_pylist()
    (tmp_path / 'block.txt').write_text(f'# removal list\n{urls[1]}\n\nhttp://elsewhere/x.jpg\n')
    pq.write_table(pa.table({'url': [urls[6]]}), tmp_path / 'block.parquet')
    proc = filter_cli('--url_list', str(tmp_path / 'raw'), '--output_folder', str(tmp_path / 'out'),
                      '--filter', FILTER, '--blocklist', f'{tmp_path}/block.txt,{tmp_path}/block.parquet',
                      '--dedup', '--batch_rows', '2')
    assert proc.returncode == 0, proc.stderr
    meta = tmp_path / 'out' / '_metadata'
    assert proc.stdout.strip() == str(meta)

    keep, removed = expected_keep(table)
    blocked = [keep[i] and urls[i] in (urls[1], urls[6]) for i in range(len(urls))]
    keep = [k and not b for k, b in zip(keep, blocked)]
    first = {}
    dup = [k and first.setdefault(u, i) != i for i, (k, u) in enumerate(zip(keep, urls))]
    keep = [k and not d for k, d in zip(keep, dup)]
    got = pa.concat_tables([pq.read_table(p) for p in sorted(meta.glob('*.parquet'))])
    assert got == table.filter(pa.array(keep))  # same rows, order, columns and types
    counts = summary_counts((meta / 'filter_summary.txt').read_text())
    assert counts == {'rows in': len(table), 'rows out': sum(keep),
                      'removed by clause: punsafe < 0.065': removed[0],
                      'removed by clause: pwatermark < 0.35': removed[1],
                      'removed by clause: similarity >= 0.255': removed[2],
                      'removed by blocklist': sum(blocked), 'removed as repeated': sum(dup)}
    assert sum(blocked) and sum(dup) and all(removed)  # each step had something to remove
    with Image.open(meta / 'filter_histograms.png') as im:
        assert im.format == 'PNG' and im.width > 100
    assert 'FILTER=' + FILTER in (meta / 'settings').read_text()


# laion2b-en, the default DATASET, is test_download.py's full-set download (its columns, exact bytes and a
# hash mismatch): not downloaded a second time here.
@pytest.mark.parametrize('preset', [p for p in PRESET_TABLES if p != 'laion2b-en'])
def test_each_preset_downloads_its_columns_and_exact_bytes(preset, entries, tmp_path):
    build, url_col, caption_col, kept, verified = PRESET_TABLES[preset]
    rows = entries[:-1]  # not the slow one
    table = build(rows)
    if verified:  # one wrong hash: the preset checks it
        digests = table[verified].to_pylist()
        digests[0] = hashlib.new('sha256' if verified == 'sha256' else 'md5', b'x').hexdigest()
        table = table.set_column(table.schema.get_field_index(verified), verified, pa.array(digests))
    (tmp_path / 'raw').mkdir()
    pq.write_table(table, tmp_path / 'raw' / 'part-00000.parquet')
    out = tmp_path / 'out'
    proc = download(tmp_path / 'raw', out, DATASET=preset)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = read_shards(out)
    own = I2D_OWN - {'md5'} | {'sha256' if verified == 'sha256' else 'md5'}  # the hash img2dataset computes
    assert set(got.column_names) == own | {'url', 'caption'} | set(kept)
    by_url = {r['url']: r for r in got.to_pylist()}
    assert sorted(by_url) == sorted(e.url for e in rows)
    meta = {r[url_col]: r for r in table.to_pylist()}
    for i, e in enumerate(rows):
        r = by_url[e.url]
        assert r['caption'] == meta[e.url][caption_col]
        assert {c: r[c] for c in kept} == {c: meta[e.url][c] for c in kept}
        if e.item is None:
            assert r['status'] == 'failed_to_download'
        elif verified and i == 0:
            assert r['status'] == 'failed_to_download' and r['error_message'] == 'hash mismatch'
        else:
            assert r['status'] == 'success' and r['jpg'] == e.item.data
    assert not (out / '_metadata').exists()  # no filter asked: img2dataset read URL_LIST itself
    if preset in MDS_NAMES:  # the cloudwriter's MDS keeps them under its one spelling
        proc = run_script('laion_cloudwriter.py', '--local', out, '--remote', tmp_path / 'mds',
                          '--keep_parquet', '--processes', '1')
        assert proc.returncode == 0, proc.stderr[-2000:]
        samples = read_mds(str(tmp_path / 'mds' / '0-1048576'))  # unbucketed: the one dataset
        assert len(samples) == sum(r['status'] == 'success' for r in by_url.values())
        for sample in samples:
            for name, col in MDS_NAMES[preset].items():
                assert sample[name] == pytest.approx(meta[sample['url']][col]), (name, col)


def test_filtered_download_killed_then_rerun_gives_the_same_shards(entries, image_server, tmp_path):
    table = preset_table('laion-aesthetics', entries)
    (tmp_path / 'raw').mkdir()
    pq.write_table(table, tmp_path / 'raw' / 'part-00000.parquet')
    urls = table['URL'].to_pylist()
    marks = table['pwatermark'].to_pylist()
    keep = [(w is not None and w < 0.35) or '/slow/' in u for w, u in zip(marks, urls)]
    want = table.filter(pa.array(keep))
    per = (len(want) - 1) // 2 if (len(want) - 1) % 2 == 0 else len(want) - 1
    assert len(want) < len(table) and per > 1  # the slow URL, kept and last, is alone in the last shard
    knobs = {'DATASET': 'laion-aesthetics', 'FILTER': "pwatermark < 0.35 OR URL LIKE '%/slow/%'",
             'NUMBER_SAMPLE_PER_SHARD': str(per)}
    out = tmp_path / 'out'
    last = f'{len(want) // per - 1:05d}_stats.json'
    proc = subprocess.Popen([str(SCRIPT)], env=script_env(tmp_path / 'raw', out, **knobs),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / last).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / last).exists() and not (out / 'done').exists()
    before = {p.name: p.read_bytes() for p in out.glob('*_stats.json')}

    again = download(tmp_path / 'raw', out, **knobs)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert 'reusing the filtered metadata' in again.stderr
    assert {n: (out / n).read_bytes() for n in before} == before  # finished shards untouched
    got = read_shards(out)
    assert sorted(got['url'].to_pylist()) == sorted(want['URL'].to_pylist())  # each kept row once
    keys = got['key'].to_pylist()
    assert len(keys) == len(set(keys))

    other = download(tmp_path / 'raw', out, **{**knobs, 'FILTER': 'pwatermark < 0.5'})
    unfiltered = download(tmp_path / 'raw', out, **{**knobs, 'FILTER': ''})
    for refused in (other, unfiltered):
        lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert 'shard ids would mean other rows' in lines[0]
    assert (out / 'done').exists()


def test_filtering_into_shards_made_without_a_filter_is_refused(tmp_path):
    (tmp_path / 'raw').mkdir()
    pq.write_table(pa.table({'url': ['http://127.0.0.1:9/a'], 'caption': ['a'], 'punsafe': [0.0]}),
                   tmp_path / 'raw' / 'a.parquet')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / '00000_stats.json').write_text('{}')
    proc = filter_cli('--url_list', str(tmp_path / 'raw'), '--output_folder', str(tmp_path / 'out'),
                      '--filter', 'punsafe < 0.1')
    assert proc.returncode == 2 and 'downloaded without FILTER' in proc.stderr
    assert not (tmp_path / 'out' / '_metadata').exists()


BAD = {
    'unknown column': ({'FILTER': 'nsfw < 0.1'}, "no column 'nsfw' (FILTER); its columns: url, caption"),
    'does not parse': ({'FILTER': 'punsafe <<< 0.1 AND'}, 'does not parse as a Polars SQL condition'),
    'wrong type': ({'FILTER': "caption > 3"}, 'does not evaluate on the columns'),
    'empty result': ({'FILTER': 'punsafe > 5'}, 'no metadata row is left of'),
    'blocklist missing': ({'BLOCKLIST': '/nowhere/list.txt'}, 'BLOCKLIST /nowhere/list.txt: cannot read it'),
    'unknown dataset': ({'DATASET': 'laion5b'}, 'DATASET=laion5b: expected one of'),
    'keeps an img2dataset column': ({'SAVE_ADDITIONAL_COLUMNS': 'punsafe,width'}, "names 'width'"),
    'bad dedup': ({'DEDUP': 'maybe'}, 'DEDUP=maybe: expected True or False'),
}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_filter_settings_get_one_line_and_nothing_is_downloaded(case, entries, image_server, tmp_path):
    knobs, message = BAD[case]
    (tmp_path / 'raw').mkdir()
    pq.write_table(preset_table('laion2b-en', entries[:3]), tmp_path / 'raw' / 'a.parquet')
    out = tmp_path / 'out'
    hits = sum(image_server.hits.values())
    proc = subprocess.run([str(SCRIPT)], env=script_env(tmp_path / 'raw', out, **knobs), capture_output=True,
                          text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert message in lines[0] and ': error: ' in lines[0]
    assert not out.exists() and sum(image_server.hits.values()) == hits


def many_files(folder: Path, files: int, rows: int) -> pa.Table:
    """`files` metadata files of `rows` rows each (LAION-2B-en columns, no server behind the URLs)."""
    folder.mkdir(parents=True)
    parts = []
    for f in range(files):
        t = pa.table({'url': [f'http://127.0.0.1:9/{f}/{i}.jpg' for i in range(rows)],
                      'caption': [f'photo {f} {i}' for i in range(rows)],
                      'punsafe': pa.array([(i % 10) / 10 for i in range(rows)], pa.float32())})
        pq.write_table(t, folder / f'part-{f:05d}.parquet')
        parts.append(t)
    return pa.concat_tables(parts)


def read_filtered(meta: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(meta.glob('*.parquet'))])


def test_filter_killed_while_writing_is_not_trusted_by_the_rerun(tmp_path):
    table = many_files(tmp_path / 'raw', 60, 400)
    args = ['--url_list', str(tmp_path / 'raw'), '--output_folder', str(tmp_path / 'out'),
            '--filter', 'punsafe < 0.35', '--batch_rows', '5', '--no_plot']
    meta = tmp_path / 'out' / '_metadata'
    proc = subprocess.Popen([sys.executable, str(FILTER_PY), *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (meta / 'part-00002.parquet').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (meta / 'part-00002.parquet').exists() and not (meta / 'settings').exists()  # cut off mid-way

    again = filter_cli(*args)
    assert again.returncode == 0, again.stderr
    assert 'filtering again' in again.stderr
    assert read_filtered(meta) == table.filter(pc.less(table['punsafe'], 0.35))
    pq.write_table(table.slice(0, 10), tmp_path / 'raw' / 'part-99999.parquet')  # the input changed
    changed = filter_cli(*args)
    assert changed.returncode == 2 and "other settings (FILES '60 sha256:" in changed.stderr


def test_a_file_whose_column_types_differ_gets_one_line_and_leaves_no_output(tmp_path):
    many_files(tmp_path / 'raw', 2, 20)
    pq.write_table(pa.table({'url': ['http://127.0.0.1:9/x.jpg'], 'caption': ['x'], 'punsafe': ['low']}),
                   tmp_path / 'raw' / 'part-00002.parquet')
    proc = filter_cli('--url_list', str(tmp_path / 'raw'), '--output_folder', str(tmp_path / 'out'),
                      '--filter', 'punsafe < 0.5')
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith('filter_metadata: error: ')
    assert 'part-00002.parquet: cannot filter it' in lines[0]
    assert not (tmp_path / 'out').exists()


def test_filter_reads_and_writes_object_storage(s3, tmp_path):
    table = many_files(tmp_path / 'raw', 2, 50)
    for p in sorted((tmp_path / 'raw').iterdir()):
        s3.client().upload_file(str(p), s3.bucket, f'raw/{p.name}')
    env = s3.child_env(AWS_ENDPOINT_URL=s3.endpoint)  # botocore's endpoint variable, which s3fs reads
    args = ['--url_list', f's3://{s3.bucket}/raw', '--output_folder', f's3://{s3.bucket}/out',
            '--filter', 'punsafe >= 0.5']
    proc = filter_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f's3://{s3.bucket}/out/_metadata'
    keys = s3.list_keys(s3.bucket, 'out/')
    assert keys == [f'out/_metadata/{n}' for n in ('filter_histograms.png', 'filter_summary.txt',
                                                   'part-00000.parquet', 'part-00001.parquet', 'settings')]
    got = []
    for k in keys[2:4]:
        s3.client().download_file(s3.bucket, k, str(tmp_path / 'got.parquet'))
        got.append(pq.read_table(tmp_path / 'got.parquet'))
    assert pa.concat_tables(got) == table.filter(pc.greater_equal(table['punsafe'], 0.5))
    rerun = filter_cli(*args, env=env)
    assert rerun.returncode == 0 and 'reusing the filtered metadata' in rerun.stderr
    other = filter_cli(*args[:-1], 'punsafe >= 0.6', env=env)
    assert other.returncode == 2 and 'shard ids would mean other rows' in other.stderr
