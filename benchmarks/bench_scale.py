"""Scale on paper: what laion_cloudwriter.py's records and merged index.json cost at 1k-230k input shards.

    .venv/bin/python benchmarks/bench_scale.py                          # 1k and 10k input shards (~1 min)
    .venv/bin/python benchmarks/bench_scale.py --shards 1000 10000 100000  # 100k: ~4 GB of RAM (the reader)
    .venv/bin/python benchmarks/bench_scale.py --size_limit 256mb       # the cloudwriter's default size

For N input shards it writes what the cloudwriter leaves at a folder remote after converting them:
one `_cloudwriter/NNNNN.record` per input shard, built by the cloudwriter's own shard_record() and
mds_config() (as write_parts() builds it once PartWriter has written the parts), each input shard a
LAION-2B-like mix (SHARD_MIX below: 10,000 rows, ~8,000 images, ~1.1 GB). Then, each in a fresh
process whose peak RSS is reported, it times the cloudwriter's own functions:
  read   read_records(): what the driver does at start-up (and holds for the rest of the run);
  merge  bucket_parts() + publish_index() for every bucket, as merge_run() does at each
         --merge_interval and at the end; the biggest bucket's index.json size and time are shown;
  open   streaming's StreamingDataset(local=<biggest bucket>): what every reader rank does first
         (the index only: the shard files are not there, and nothing asks for them).
The last row extrapolates linearly (all three are linear in shards) from the two largest sizes to
230,000 input shards: LAION-2B-en at 10,000 rows per shard.

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
# these, a 10,000-row shard holds ~1.1 GB of images (the cloudwriter's docstring: ~1 GB).
SHARD_MIX = {
    '0-64': (0.03, 5_000), '64-128': (0.10, 15_000), '128-256': (0.25, 40_000),
    '256-512': (0.35, 100_000), '512-768': (0.13, 200_000), '768-1024': (0.06, 350_000),
    '1024-1048576': (0.08, 700_000),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shards', type=int, nargs='+', default=[1000, 10_000],
                   help='Input shard counts to simulate, one row each.')
    p.add_argument('--size_limit', type=str, default='64mb',
                   help="The cloudwriter's --size_limit the synthetic parts were written with.")
    p.add_argument('--work', type=str, default='/tmp/bench_scale',
                   help='Scratch folder for the records and indexes (emptied after each size).')
    p.add_argument('--phase', nargs=2, metavar=('PHASE', 'REMOTE'), default=None, help=argparse.SUPPRESS)
    p.add_argument('--curate_groups', type=int, nargs='+', default=[],
                   help="curate_images.py's duplicate groups to simulate, one row each (not the shards)")
    p.add_argument('--before', default='', help='with --curate_groups: curate_images.py at this revision too')
    p.add_argument('--curate_phase', nargs=3, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def cloudwriter():
    from testbed.scripts import load_script
    return load_script('laion_cloudwriter.py')


# ---- the synthetic remote ------------------------------------------------------------------------

def part(samples: int, nbytes: int, size_limit: int) -> dict[str, list[int]]:
    """What PartWriter.finish() returns for one bucket's part of `samples` images of `nbytes`: full
    shards of `size_limit`, then the rest."""
    n_shards = max(1, -(-nbytes // size_limit))
    per = np.diff(np.linspace(0, samples, n_shards + 1).round().astype(int))
    size = np.diff(np.linspace(0, nbytes, n_shards + 1).round().astype(int))
    return {'bytes': size.tolist(), 'samples': per.tolist()}


def build_remote(cw, remote: Path, n: int, size_limit: int) -> int:
    """`n` records at `remote`/_cloudwriter as convert_shard() leaves them (shard_record() put as
    <NNNNN>.record); returns their total size in bytes."""
    config = cw.mds_config(size_limit)
    rng = np.random.default_rng(0)
    total = 0
    (remote / cw.RECORDS).mkdir(parents=True)
    for s in range(n):
        images = rng.binomial(ROWS, SUCCESS)
        counts = dict(zip(SHARD_MIX, rng.multinomial(images, [f for f, _ in SHARD_MIX.values()]).tolist()))
        nbytes = {b: int(counts[b] * mean * rng.uniform(0.8, 1.2)) for b, (_, mean) in SHARD_MIX.items()}
        sid = f'{s:05d}'
        record = cw.shard_record(sid, f'{sid}.parquet', True, ROWS, counts,
                                 {'failed_to_download': ROWS - images}, [], sum(nbytes.values()), config,
                                 {b: part(counts[b], nbytes[b], size_limit) for b in SHARD_MIX})
        total += (remote / cw.RECORDS / f'{sid}.record').write_text(json.dumps(record))  # no fsync: set-up
    return total


# ---- the phases, each in its own process -------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(name: str, remote: str) -> dict:
    """Run one phase here; returns its figures."""
    cw = cloudwriter()
    if name == 'open':
        from streaming import StreamingDataset
        bucket = json.loads(Path(remote, 'biggest').read_text())
        rss0 = peak_rss_mb()
        t0 = time.perf_counter()
        ds = StreamingDataset(local=os.path.join(remote, bucket), shuffle=False, batch_size=1)
        return {'open_s': time.perf_counter() - t0, 'open_samples': ds.num_samples,
                'open_shards': len(ds.shards), 'open_rss_mb': peak_rss_mb() - rss0}
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


def run_phase(name: str, remote: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, '--phase', name, str(remote)], capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f'phase {name} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the table ---------------------------------------------------------------------------------------

def measure(n: int, size_limit: int, work: Path) -> dict:
    remote = work / f'remote-{n}'
    shutil.rmtree(remote, ignore_errors=True)
    t0 = time.perf_counter()
    records_bytes = build_remote(cloudwriter(), remote, n, size_limit)
    print(f'  {n:,} records built in {time.perf_counter() - t0:.0f} s', file=sys.stderr, flush=True)
    read = run_phase('read', remote)
    merge = run_phase('merge', remote)
    biggest = max(merge['merge'], key=lambda b: merge['merge'][b]['shards'])
    Path(remote, 'biggest').write_text(json.dumps(biggest))
    opened = run_phase('open', remote)
    shutil.rmtree(remote)
    m = merge['merge']
    return {'n': n, 'records_mb': records_bytes / 1e6, 'read_s': read['read_s'],
            'read_rss_gb': read['read_rss_mb'] / 1024,
            'merge_all_s': sum(v['s'] for v in m.values()), 'merge_rss_gb': merge['merge_rss_mb'] / 1024,
            'bucket': biggest, 'big_shards': m[biggest]['shards'], 'big_mb': m[biggest]['mb'],
            'big_merge_s': m[biggest]['s'], 'all_mb': sum(v['mb'] for v in m.values()),
            'mds_shards': sum(v['shards'] for v in m.values()),
            'open_s': opened['open_s'], 'open_rss_gb': opened['open_rss_mb'] / 1024}


def extrapolate(rows: list[dict], n: int) -> dict:
    """Each figure on the line through the two largest measured rows (all are linear in shards; the
    intercept is the interpreter and its imports)."""
    a, b = rows[-2] if len(rows) > 1 else {k: 0 for k in rows[-1]}, rows[-1]
    k = (n - a['n']) / (b['n'] - a['n'])
    return {key: a[key] + k * (v - a[key]) if isinstance(v, float | int) else v for key, v in b.items()} | {
        'n': n, 'extrapolated': True}


def print_table(rows: list[dict], size_limit: str) -> None:
    print(f'\nsize_limit {size_limit}; biggest bucket = most MDS shards; times on this machine, one process')
    print('| input shards | MDS shards (all buckets) | records MB | driver reads records: s / peak GB '
          '| merge + write every index.json: s / peak GB | biggest bucket: MDS shards / index.json MB / '
          'merge s | all index.json MB | StreamingDataset opens biggest: s / GB |')
    print('|---:|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        tag = ' (extrapolated)' if r.get('extrapolated') else ''
        print(f"| {r['n']:,}{tag} | {r['mds_shards']:,.0f} | {r['records_mb']:,.0f} | "
              f"{r['read_s']:,.1f} / {r['read_rss_gb']:.2f} | "
              f"{r['merge_all_s']:,.1f} / {r['merge_rss_gb']:.2f} | {r['bucket']}: {r['big_shards']:,.0f} / "
              f"{r['big_mb']:,.0f} / {r['big_merge_s']:,.1f} | {r['all_mb']:,.0f} | "
              f"{r['open_s']:,.1f} / {r['open_rss_gb']:.2f} |")


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
    rows = []
    for n in sorted(args.shards):
        rows.append(measure(n, size_limit, work))
        print_table(rows, args.size_limit)
    print_table(rows + [extrapolate(rows, FULL_RUN)], args.size_limit)


if __name__ == '__main__':
    main()
