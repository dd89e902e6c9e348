"""Scale on paper: what laion_cloudwriter.py's records, merged index.json and left-out names cost at
1k-230k input shards.

    .venv/bin/python benchmarks/bench_scale.py                          # 1k and 10k input shards (~2 min)
    .venv/bin/python benchmarks/bench_scale.py --shards 1000 10000 100000  # 100k: ~4 GB of RAM (the reader)
    .venv/bin/python benchmarks/bench_scale.py --size_limit 1gb --shards_per_task 1 16
    .venv/bin/python benchmarks/bench_scale.py --shards 0 --left_out 10000 1000000 10000000

Tails (--shards, --shards_per_task). For N input shards it writes what the cloudwriter leaves at a folder
remote after converting them in tasks of --shards_per_task input shards (1: one task per input shard, as
before tasks carried a bucket's open MDS shard from one input shard to the next): one
`_cloudwriter/NNNNN.record` per task, built by the cloudwriter's own shard_record() and mds_config(),
each input shard a LAION-2B-like mix (SHARD_MIX below: 10,000 rows, ~8,000 images, ~1.2 GB) and each
bucket's part of a task as PartWriter writes it: full MDS shards of --size_limit, then one partly filled.
Then, each in a fresh process whose peak RSS is reported, it times the cloudwriter's own functions:
  read   read_records(): what the driver does at start-up (and holds for the rest of the run);
  merge  bucket_parts() + publish_index() for every bucket, as merge_run() does at each
         --merge_interval and at the end; the biggest bucket's index.json size and time are shown;
  open   streaming's StreamingDataset(local=<bucket>), its CPU time (a shared machine's wall clock
         swings 2x) and peak RSS: what every reader rank does first (the index
         only: the shard files are not there, and nothing asks for them), for the biggest bucket (the
         most MDS shards, ties broken by samples) and for the one with the most samples: streaming 0.13
         also builds an array of 8 bytes per sample as it opens (Spanner's sample-to-shard map), so
         that one may cost a reader the most memory whatever its shards.
The last rows extrapolate linearly (all three are linear in shards) from the two largest sizes to
230,000 input shards: LAION-2B-en at 10,000 rows per shard. `floor` is the biggest bucket's bytes /
--size_limit: the fewest MDS shards that hold it.

Left-outs (--left_out). For each count, 1,000 input shards' records (one task each) whose shards left
that many images out in all, evenly, as the script under test writes its records (--script: another
version of laion_cloudwriter.py, e.g. an older one, `git show REV:laion_cloudwriter.py > /tmp/cw.py`;
its record format is told by whether prior_records() folds the first names). A fresh process does what
the driver does with them at start and at the end of a run: prior_records(), then the summary (summarize()
and its JSON text); its peak RSS is reported. The names themselves (the .left_out.jsonl files) are never
read by the driver; each record gets a one-line file so that the listing holds them.

Curation groups (`--curate_groups`; curate_images.py's dedup, no images needed): for G duplicate groups
(90% pairs, the rest 3-8 images; a third of the run's rows in a group) it writes the pair files the
compare step leaves (64 files of edges with each member's run id, area and key), then, each in a fresh
process whose peak RSS is reported, times the script's own functions:
  groups  decide_groups(): rank 0 joins the pairs into groups and writes them;
  write   what rank 0 of 8 does with the groups in the write pass: for each of its parts (5,000 rows),
          the groups of the part's rows (dup_columns), as write_part() does before it writes.
`--before REV` measures curate_images.py at git revision REV too. The last row extrapolates to 1e9
pairs, linearly in pairs from the two largest rows.
    .venv/bin/python benchmarks/bench_scale.py --curate_groups 10000 1000000          # ~1 min
    .venv/bin/python benchmarks/bench_scale.py --curate_groups 10000 1000000 10000000 --before 877e40a
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))

FULL_RUN = 230_000  # input shards of LAION-2B-en at img2dataset's 10,000 rows per shard
ROWS = 10_000
SUCCESS = 0.8       # images that download; the rest are failures and have no bytes
# An assumed LAION-2B-en mix by shorter side: bucket -> (share of images, mean image bytes). With
# these, a 10,000-row shard holds ~1.2 GB of images (the cloudwriter's docstring: ~1 GB).
SHARD_MIX = {
    '0-64': (0.03, 5_000), '64-128': (0.10, 15_000), '128-256': (0.25, 40_000),
    '256-512': (0.35, 100_000), '512-768': (0.13, 200_000), '768-1024': (0.06, 350_000),
    '1024-1048576': (0.08, 700_000),
}
LEFT_OUT_SHARDS = 1_000
REASONS = ('success but does not decode with PIL', 'success but no readable image header')


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shards', type=int, nargs='+', default=[1000, 10_000],
                   help='Input shard counts to simulate, one row each (0: no tails table).')
    p.add_argument('--size_limit', type=str, default='256mb',
                   help="The cloudwriter's --size_limit the synthetic parts were written with.")
    p.add_argument('--shards_per_task', type=int, nargs='+', default=[1, 16],
                   help="The cloudwriter's --shards_per_task, one table each (1: as before tasks carried).")
    p.add_argument('--left_out', type=int, nargs='*', default=[],
                   help='Left-out image counts, one row each, for the driver-memory table.')
    p.add_argument('--script', type=str, default=str(ROOT / 'laion_cloudwriter.py'),
                   help='The laion_cloudwriter.py whose driver the left-out rows run.')
    p.add_argument('--work', type=str, default='/tmp/bench_scale',
                   help='Scratch folder for the records and indexes (emptied after each size).')
    p.add_argument('--phase', nargs=3, metavar=('PHASE', 'REMOTE', 'SCRIPT'), default=None,
                   help=argparse.SUPPRESS)
    p.add_argument('--curate_groups', type=int, nargs='+', default=[],
                   help="curate_images.py's duplicate groups to simulate, one row each (not the shards)")
    p.add_argument('--before', default='', help='with --curate_groups: curate_images.py at this revision too')
    p.add_argument('--curate_phase', nargs=3, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def cloudwriter(script: str = str(ROOT / 'laion_cloudwriter.py')):
    spec = importlib.util.spec_from_file_location('laion_cloudwriter', script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


# ---- the synthetic remote ------------------------------------------------------------------------

def part(samples: int, nbytes: int, size_limit: int) -> dict[str, list[int]]:
    """What PartWriter.finish() returns for one bucket's part of `samples` images of `nbytes`: full
    shards of `size_limit`, then the rest (per-sample bytes taken as equal)."""
    full, rest = divmod(nbytes, size_limit)
    sizes = [size_limit] * full + ([rest] if rest or not full else [])
    per = np.diff(np.round(np.cumsum([0] + sizes) / max(nbytes, 1) * samples).astype(int))
    return {'bytes': sizes, 'samples': per.tolist()}


def shard_mix(rng: np.random.Generator) -> tuple[dict[str, int], dict[str, int], int]:
    """(samples, bytes) per bucket of one input shard, and its images."""
    images = rng.binomial(ROWS, SUCCESS)
    counts = dict(zip(SHARD_MIX, rng.multinomial(images, [f for f, _ in SHARD_MIX.values()]).tolist()))
    nbytes = {b: int(counts[b] * mean * rng.uniform(0.8, 1.2)) for b, (_, mean) in SHARD_MIX.items()}
    return counts, nbytes, images


def build_remote(cw, remote: Path, n: int, size_limit: int,
                 per_task: int) -> tuple[int, dict[str, int], dict[str, int]]:
    """The records of `n` input shards converted in tasks of `per_task` at `remote`/_cloudwriter, as
    convert_group() leaves them (shard_record() put as <NNNNN>.record); returns their total size in bytes
    and each bucket's bytes and samples."""
    config = cw.mds_config(size_limit)
    rng = np.random.default_rng(0)
    total, bucket_bytes, bucket_samples = 0, dict.fromkeys(SHARD_MIX, 0), dict.fromkeys(SHARD_MIX, 0)
    (remote / cw.RECORDS).mkdir(parents=True)
    for first in range(0, n, per_task):
        sids = [f'{s:05d}' for s in range(first, min(first + per_task, n))]
        counts, nbytes, images = dict.fromkeys(SHARD_MIX, 0), dict.fromkeys(SHARD_MIX, 0), 0
        for _ in sids:
            c, b, i = shard_mix(rng)
            images += i
            for bucket in SHARD_MIX:
                counts[bucket] += c[bucket]
                nbytes[bucket] += b[bucket]
        record = cw.shard_record(sids, True, ROWS * len(sids), counts,
                                 {'failed_to_download': ROWS * len(sids) - images}, 0, {},
                                 sum(nbytes.values()), config,
                                 {b: part(counts[b], nbytes[b], size_limit) for b in SHARD_MIX})
        total += (remote / cw.RECORDS / f'{sids[0]}.record').write_text(json.dumps(record))  # no fsync
        for bucket in SHARD_MIX:
            bucket_bytes[bucket] += nbytes[bucket]
            bucket_samples[bucket] += counts[bucket]
    return total, bucket_bytes, bucket_samples


def build_left_out(cw, remote: Path, left_out: int) -> None:
    """LEFT_OUT_SHARDS records (one input shard each, one MDS shard per bucket) naming `left_out` images
    in all, in the format `cw` writes: each name in the record (before), or the count and the first 20
    per reason in it and the names in <NNNNN>.left_out.jsonl beside it (here one line: never read)."""
    folds = 'first' in inspect.signature(cw.prior_records).parameters
    config = cw.mds_config(cw.parse_size('256mb'))
    (remote / cw.RECORDS).mkdir(parents=True)
    per = np.diff(np.linspace(0, left_out, LEFT_OUT_SHARDS + 1).round().astype(int)).tolist()
    parts = {b: {'bytes': [1 << 20], 'samples': [100]} for b in SHARD_MIX}
    for s, n in enumerate(per):
        sid = f'{s:05d}'
        names = [{'key': f'{sid}{i:04d}', 'url': f'https://example.com/images/{sid}/{i}.jpg',
                  'reason': REASONS[i % 2], 'error': 'OSError: image file is truncated (8 bytes not read)'}
                 for i in range(n)]
        record = {'shard': sid, 'bucketed': True, 'verify': 'full', 'rows': ROWS,
                  'samples': {b: 100 for b in SHARD_MIX}, 'skipped': {r: n // 2 + (i < n % 2) for i, r in
                                                                     enumerate(REASONS)},
                  'bytes': 7 << 20, 'config': config, 'parts': parts}
        if folds:
            first = {r: [x for x in names if x['reason'] == r][:cw.FIRST_NAMED] for r in REASONS}
            record.update(shards=[sid], left_out=n, left_out_first=first)
            (remote / cw.RECORDS / f'{sid}{cw.LEFT_OUT}').write_text(json.dumps(names[0]) + '\n' if n else '')
        else:
            record.update(parquet=f'{sid}.parquet', left_out=names)
        (remote / cw.RECORDS / f'{sid}.record').write_text(json.dumps(record))


# ---- the phases, each in its own process -------------------------------------------------------------

def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: its own; getrusage's ru_maxrss keeps the parent's from before exec)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def driver_summary(cw, remote: str) -> dict:
    """What the driver of `cw` does with a remote's records at the start of a run and at its end."""
    args = argparse.Namespace(remote=remote, remote_kind='folder', staging=os.path.join(remote, '_staging'),
                              retry=1, subfolder='', keep_parquet=True, bucketed=True)
    import pyarrow.fs as pafs
    fs, stats = pafs.LocalFileSystem(), {'shards': 0, 'samples': 0, 'bytes': 0, 'bad': [], 'errors': [],
                                         'ignored': []}
    t0 = time.perf_counter()
    if 'first' in inspect.signature(cw.prior_records).parameters:
        first: dict = {}
        work = cw.Work(fs, remote, cw.prior_records(args, fs, remote, first), stats, {}, [], set(), first)
        summary = cw.summarize(work, 'names', 0.0)
    else:
        records = cw.prior_records(args, fs, remote)
        summary = cw.summarize(records, stats, 0.0)
    text = json.dumps(summary, indent=2)
    return {'driver_s': time.perf_counter() - t0, 'driver_rss_mb': peak_rss_mb(),
            'summary_mb': len(text) / 1e6}


def phase(name: str, remote: str, script: str) -> dict:
    """Run one phase here; returns its figures."""
    cw = cloudwriter(script)
    if name == 'open':
        from streaming import StreamingDataset
        bucket = json.loads(Path(remote, 'open').read_text())
        rss0 = peak_rss_mb()
        t0 = time.process_time()  # CPU seconds: the wall clock of a shared machine swings 2x
        ds = StreamingDataset(local=os.path.join(remote, bucket), shuffle=False, batch_size=1)
        return {'open_s': time.process_time() - t0, 'open_samples': ds.num_samples,
                'open_shards': len(ds.shards), 'open_rss_mb': peak_rss_mb() - rss0}
    if name == 'driver':
        return driver_summary(cw, remote)
    t0 = time.perf_counter()
    args = argparse.Namespace(remote=remote, remote_kind='folder', staging=os.path.join(remote, '_staging'),
                              retry=1, subfolder='')
    records = cw.read_records(args, '').get('', {})
    out = {'read_s': time.perf_counter() - t0, 'read_rss_mb': peak_rss_mb()}
    if name == 'merge':
        out['merge'] = {}
        for bucket in SHARD_MIX:
            t0 = time.perf_counter()
            parts = cw.bucket_parts(records, bucket)
            cw.publish_index(parts, args, bucket, '')
            out['merge'][bucket] = {'s': time.perf_counter() - t0,
                                    'mb': os.path.getsize(os.path.join(remote, bucket, 'index.json')) / 1e6,
                                    'shards': sum(len(p['samples']) for _, _, p in parts)}
        out['merge_rss_mb'] = peak_rss_mb()
    return out


def run_phase(name: str, remote: Path, script: str = str(ROOT / 'laion_cloudwriter.py')) -> dict:
    proc = subprocess.run([sys.executable, __file__, '--phase', name, str(remote), script],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f'phase {name} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the tables --------------------------------------------------------------------------------------

def measure(n: int, size_limit: int, per_task: int, work: Path) -> dict:
    remote = work / f'remote-{n}-{per_task}'
    shutil.rmtree(remote, ignore_errors=True)
    t0 = time.perf_counter()
    records_bytes, bucket_bytes, bucket_samples = build_remote(cloudwriter(), remote, n, size_limit, per_task)
    print(f'  {n:,} input shards in tasks of {per_task}: records built in {time.perf_counter() - t0:.0f} s',
          file=sys.stderr, flush=True)
    read = run_phase('read', remote)
    merge = run_phase('merge', remote)
    m = merge['merge']
    biggest = max(m, key=lambda b: (m[b]['shards'], bucket_samples[b]))
    heaviest = max(m, key=lambda b: bucket_samples[b])
    opened = {}
    for bucket in dict.fromkeys((biggest, heaviest)):
        Path(remote, 'open').write_text(json.dumps(bucket))
        opened[bucket] = run_phase('open', remote)
    shutil.rmtree(remote)
    return {'n': n, 'records_mb': records_bytes / 1e6, 'read_s': read['read_s'],
            'read_rss_gb': read['read_rss_mb'] / 1024,
            'merge_all_s': sum(v['s'] for v in m.values()), 'merge_rss_gb': merge['merge_rss_mb'] / 1024,
            'bucket': biggest, 'big_shards': m[biggest]['shards'],
            'big_floor': bucket_bytes[biggest] / size_limit, 'big_mb': m[biggest]['mb'],
            'big_merge_s': m[biggest]['s'], 'all_mb': sum(v['mb'] for v in m.values()),
            'mds_shards': sum(v['shards'] for v in m.values()),
            'floor': sum(-(-b // size_limit) for b in bucket_bytes.values()),
            'open_s': opened[biggest]['open_s'], 'open_rss_gb': opened[biggest]['open_rss_mb'] / 1024,
            'heavy': heaviest, 'heavy_shards': m[heaviest]['shards'],
            'heavy_samples': bucket_samples[heaviest], 'heavy_open_s': opened[heaviest]['open_s'],
            'heavy_open_rss_gb': opened[heaviest]['open_rss_mb'] / 1024}


def extrapolate(rows: list[dict], n: int) -> dict:
    """Each figure on the line through the two largest measured rows (all are linear in shards; the
    intercept is the interpreter and its imports)."""
    a, b = rows[-2] if len(rows) > 1 else {k: 0 for k in rows[-1]}, rows[-1]
    k = (n - a['n']) / (b['n'] - a['n'])
    return {key: a[key] + k * (v - a[key]) if isinstance(v, float | int) else v for key, v in b.items()} | {
        'n': n, 'extrapolated': True}


def print_table(rows: list[dict], size_limit: str, per_task: int) -> None:
    print(f'\nsize_limit {size_limit}, shards_per_task {per_task}; biggest bucket = most MDS shards (then '
          'samples), heaviest = most samples; times on this machine, one process')
    print('| input shards | MDS shards (all buckets) / floor | records MB | driver reads records: s / peak '
          'GB | merge + write every index.json: s / peak GB | biggest bucket: MDS shards / floor / '
          'index.json MB / merge s | all index.json MB | StreamingDataset opens biggest: CPU s / GB | '
          'heaviest bucket: MDS shards / M samples; StreamingDataset opens it: CPU s / GB |')
    print('|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        tag = ' (extrapolated)' if r.get('extrapolated') else ''
        print(f"| {r['n']:,}{tag} | {r['mds_shards']:,.0f} / {r['floor']:,.0f} | {r['records_mb']:,.0f} | "
              f"{r['read_s']:,.1f} / {r['read_rss_gb']:.2f} | "
              f"{r['merge_all_s']:,.1f} / {r['merge_rss_gb']:.2f} | {r['bucket']}: {r['big_shards']:,.0f} / "
              f"{r['big_floor']:,.0f} / {r['big_mb']:,.0f} / {r['big_merge_s']:,.1f} | {r['all_mb']:,.0f} | "
              f"{r['open_s']:,.1f} / {r['open_rss_gb']:.2f} | {r['heavy']}: {r['heavy_shards']:,.0f} / "
              f"{r['heavy_samples'] / 1e6:,.1f}; {r['heavy_open_s']:,.1f} / {r['heavy_open_rss_gb']:.2f} |")


def left_out_table(counts: list[int], script: str, work: Path) -> None:
    rows = []
    for n in counts:
        remote = work / f'left-out-{n}'
        shutil.rmtree(remote, ignore_errors=True)
        build_left_out(cloudwriter(script), remote, n)
        rows.append((n, run_phase('driver', remote, script)))
        shutil.rmtree(remote)
        print(f'\nleft-outs, {LEFT_OUT_SHARDS:,} records, driver of {script}')
        print('| images left out | driver: prior_records + summary s | driver peak RSS MB | summary MB |')
        print('|---:|---:|---:|---:|')
        for k, r in rows:
            print(f"| {k:,} | {r['driver_s']:,.1f} | {r['driver_rss_mb']:,.0f} | {r['summary_mb']:,.2f} |")


# ---- curate_images.py's duplicate groups ----------------------------------------------------------

CURATE_PART = 5_000  # curate_images.py's default --part_size: rows per part
CURATE_PAIR_FILES = 64  # its default --dedup_parts: the compare step writes one pair file each
WORLD = 8  # ranks of the write pass (one 8-GPU node); rank 0's share is measured


def curate_script(rev: str):
    """curate_images.py as it is, or as it was at git revision `rev`."""
    if not rev:
        from testbed.scripts import load_script
        return load_script('curate_images.py')
    path = Path(tempfile.mkdtemp(prefix='curate-before-')) / 'curate_images.py'
    path.write_bytes(subprocess.run(['git', '-C', str(ROOT), 'show', f'{rev}:curate_images.py'],
                                    capture_output=True, check=True).stdout)
    spec = importlib.util.spec_from_file_location('curate_images_before', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_pairs(work: Path, groups: int) -> dict:
    """The compare step's pair files for `groups` groups: each group's members chained in a random order,
    the edges spread over the files at random; returns the sizes."""
    rng = np.random.default_rng(0)
    sizes = np.where(rng.random(groups) < 0.9, 2, rng.integers(3, 9, groups))
    members = int(sizes.sum())
    gid = np.arange(members, dtype=np.int64) * 3 + rng.integers(0, 3, members)  # a third of the rows
    chain = gid[rng.permutation(members)]
    same = np.diff(np.repeat(np.arange(groups), sizes)) == 0
    edges = np.sort(np.stack([chain[:-1][same], chain[1:][same]], 1), axis=1)
    area = rng.integers(1, 4, members) * 65536
    where = rng.integers(0, CURATE_PAIR_FILES, len(edges))
    (work / 'dedup' / 'pairs').mkdir(parents=True)
    for g in range(CURATE_PAIR_FILES):
        mine = np.unique(edges[where == g], axis=0)  # sorted, as the compare step writes them
        ids = np.unique(mine)
        np.savez(work / 'dedup' / 'pairs' / f'{g:05d}.npz', edges=mine, gid=ids,
                 area=area[np.searchsorted(gid, ids)], key=np.char.zfill(ids.astype(str), 9))
    return {'groups': groups, 'pairs': len(edges), 'grouped': members, 'rows': 3 * members}


def vm_hwm_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). ru_maxrss would count the parent's too: Linux
    carries the high-water mark of the forked parent's memory across exec."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


def curate_phase(name: str, work: str, rev: str) -> dict:
    """One phase (groups, write) of curate_images.py at `rev` ('' as it is) on the pair files in `work`."""
    script = curate_script(rev)
    rows = json.loads(Path(work, 'sizes.json').read_text())['rows']
    parts = [script.Part(f'{n:05d}', (), first, min(rows, first + CURATE_PART))
             for n, first in enumerate(range(0, rows, CURATE_PART))]
    bucket = script.Bucket('', None, [], {}, parts, 0)
    plan = script.Plan([bucket], work, os.path.join(work, 'staging'), [], {}, 1, {})
    args = argparse.Namespace(download_timeout=600, dedup_parts=CURATE_PAIR_FILES)
    t0 = time.perf_counter()
    if name == 'groups':
        script.decide_groups(plan, args)
    else:
        per_part = hasattr(script, 'groups_file')  # before: one groups.npz that every rank loads whole
        groups = None if per_part else script.get_arrays(os.path.join(work, script.GROUPS), 600)
        for p in parts[0::WORLD]:
            if per_part:
                groups = script.get_arrays(os.path.join(work, script.groups_file(bucket, p)), 600)
            script.dup_columns(groups, np.arange(p.first, p.last))
    return {'s': time.perf_counter() - t0, 'rss_mb': vm_hwm_mb()}


def curation_row(groups: int, rev: str, work: Path) -> dict:
    folder = work / f'curate-{groups}'
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sizes = build_pairs(folder, groups)
    (folder / 'sizes.json').write_text(json.dumps(sizes))
    row = dict(sizes)
    for tag, r in (('after', ''), ('before', rev)) if rev else (('after', ''),):
        shutil.rmtree(folder / 'dedup' / 'groups', ignore_errors=True)
        for name in ('groups', 'write'):
            proc = subprocess.run([sys.executable, __file__, '--curate_phase', name, str(folder), r],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f'curate phase {name} ({tag}) failed:\n{proc.stderr[-3000:]}')
            row[f'{tag}_{name}'] = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(folder)
    return row


def print_curation(rows: list[dict], rev: str) -> None:
    tags = ('before', 'after') if rev else ('after',)
    print(f'\ncurate_images.py duplicate groups ({f"{rev} -> " if rev else ""}this tree); this machine, '
          'one process per phase')
    print('| groups | pairs | images in groups | run rows | groups pass (rank 0): s / peak GB | '
          f'write pass, rank 0 of {WORLD}: peak MB with the groups |')
    print('|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        tag = ' (extrapolated)' if r.get('extrapolated') else ''
        passes = [(r[f'{t}_groups'], r[f'{t}_write']) for t in tags]
        groups = ' -> '.join(f"{g['s']:,.1f} / {g['rss_mb'] / 1024:.2f}" for g, _ in passes)
        write = ' -> '.join(f"{w['rss_mb']:,.0f}" for _, w in passes)
        print(f"| {r['groups']:,.0f}{tag} | {r['pairs']:,.0f} | {r['grouped']:,.0f} | {r['rows']:,.0f} | "
              f"{groups} | {write} |")


def curation_on_paper(rows: list[dict], pairs: float = 1e9) -> dict:
    """The after figures at `pairs` pairs, on the line through the two largest rows (the write pass's
    memory stays the largest row's: a part's groups do not grow with the run)."""
    a, b = rows[-2], rows[-1]
    k = (pairs - a['pairs']) / (b['pairs'] - a['pairs'])
    line = {key: a[key] + k * (b[key] - a[key]) for key in ('groups', 'pairs', 'grouped', 'rows')}
    ga, gb = a['after_groups'], b['after_groups']
    groups = {m: ga[m] + k * (gb[m] - ga[m]) for m in ('s', 'rss_mb')}
    return {**line, 'after_groups': groups, 'after_write': b['after_write'], 'extrapolated': True}


def curation_table(args: argparse.Namespace) -> None:
    work = Path(args.work)
    rows = []
    for groups in sorted(args.curate_groups):
        rows.append(curation_row(groups, args.before, work))
        print_curation(rows, args.before)
    if len(rows) > 1:
        print_curation([{k: v for k, v in r.items() if not k.startswith('before')} for r in rows]
                       + [curation_on_paper(rows)], '')


def main() -> None:
    args = parse_args()
    if args.curate_phase:
        print(json.dumps(curate_phase(*args.curate_phase)))
        return
    if args.curate_groups:
        curation_table(args)
        return
    if args.phase:
        print(json.dumps(phase(*args.phase)))
        return
    size_limit = cloudwriter().parse_size(args.size_limit)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for per_task in args.shards_per_task if any(args.shards) else []:
        rows = []
        for n in sorted(args.shards):
            rows.append(measure(n, size_limit, per_task, work))
            print_table(rows, args.size_limit, per_task)
        print_table(rows + [extrapolate(rows, FULL_RUN)], args.size_limit, per_task)
    if args.left_out:
        left_out_table(args.left_out, args.script, work)


if __name__ == '__main__':
    main()
