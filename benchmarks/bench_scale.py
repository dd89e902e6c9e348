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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
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
                                 {'failed_to_download': ROWS - images}, 0, {}, sum(nbytes.values()), config,
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


def main() -> None:
    args = parse_args()
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
