"""filter_metadata.py's rate over LAION-sized metadata parquet, against a plain pyarrow.parquet read of the
same files, measured in one run.

Example:
    .venv/bin/python benchmarks/bench_filter_metadata.py                 # 4 files x 1M rows, ~1-2 min
    .venv/bin/python benchmarks/bench_filter_metadata.py --files 2 --rows 250000

The files are generated here with LAION-2B-en's columns and shapes (url ~100 chars, caption ~60 chars,
similarity, punsafe, pwatermark, hash, md5; one real file holds ~18M rows, ~1.9 GB, all 128 ~250 GB).
Runs, each the command a user types, over the first file and over all (so start-up, ~1-2 s with the
imports and the histogram PNG, cancels out); the fastest of --repeat runs counts (other jobs share
the cores):
  pyarrow read            every column of every file read batch by batch, nothing else
  filter (3 clauses)      FILTER="punsafe < 0.1 AND pwatermark < 0.5 AND similarity >= 0.28"
  filter + blocklist + dedup   the same with a 100k-URL blocklist and --dedup
Columns: wall s (all files), then marginal rows/s and MB/s (parquet bytes on disk) over the extra files,
and 'vs read', the run's marginal rate over the pyarrow read's. A download fetches ~100-1,000 images/s per
machine; a filter that passes hundreds of thousands of rows a second is not what limits it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
FILTER = 'punsafe < 0.1 AND pwatermark < 0.5 AND similarity >= 0.28'


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--files', type=int, default=4, help='metadata parquet files generated')
    p.add_argument('--rows', type=int, default=1_000_000, help='rows per file')
    p.add_argument('--repeat', type=int, default=3, help='runs of each command; the fastest counts')
    return p.parse_args()


def laion_file(path: Path, rows: int, seed: int) -> None:
    """One metadata file with LAION-2B-en's columns, random but realistic values."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**62, rows)
    urls = pa.array([f'https://images.example-{i % 9973}.com/wp-content/uploads/2021/{i:x}/photo-{i}.jpg'
                     for i in ids.tolist()])
    captions = pa.array([f'a photo of item {i % 100000} on a table, high quality stock image {i % 7}'
                         for i in ids.tolist()])
    pq.write_table(pa.table({
        'url': urls, 'caption': captions,
        'similarity': pa.array(rng.normal(0.31, 0.03, rows)),
        'punsafe': pa.array(rng.beta(0.5, 8, rows).astype(np.float32)),
        'pwatermark': pa.array(rng.beta(0.7, 2, rows).astype(np.float32)),
        'hash': pa.array(ids.astype(np.int64)),
        'md5': pa.array([f'{i:032x}' for i in ids.tolist()]),
    }), path)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / 'raw'
        raw.mkdir()
        for f in range(args.files):
            laion_file(raw / f'part-{f:05d}.parquet', args.rows, f)
        first = pq.read_table(raw / 'part-00000.parquet', columns=['url'])['url'].to_pylist()
        (Path(tmp) / 'block.txt').write_text('\n'.join(first[::max(1, len(first) // 100_000)]) + '\n')
        small = Path(tmp) / 'small'
        small.mkdir()
        (small / 'part-00000.parquet').symlink_to(raw / 'part-00000.parquet')
        sizes = [os.path.getsize(p) for p in sorted(raw.glob('*.parquet'))]
        extra_rows, extra_bytes = (args.files - 1) * args.rows, sum(sizes[1:])
        read = ('import sys, pyarrow.parquet as pq, glob\n'
                'for f in sorted(glob.glob(sys.argv[1] + "/*.parquet")):\n'
                '    for b in pq.ParquetFile(f).iter_batches(batch_size=262144): pass\n')
        def flt(*extra: str):
            return lambda src, o: [sys.executable, str(ROOT / 'filter_metadata.py'), '--url_list', str(src),
                                   '--output_folder', o, '--filter', FILTER, *extra]

        runs = {'pyarrow read': lambda src, o: [sys.executable, '-c', read, str(src)],
                'filter (3 clauses)': flt(),
                'filter + blocklist + dedup': flt('--blocklist', f'{tmp}/block.txt', '--dedup')}
        secs = {}
        for i, (name, cmd) in enumerate(runs.items()):
            secs[name] = tuple(min(timed(cmd(src, f'{tmp}/{i}-{src.name}-{r}')) for r in range(args.repeat))
                               for src in (small, raw))
    print(f'{args.files * args.rows:,} rows in {args.files} files, {sum(sizes) / 2**20:,.0f} MiB of parquet')
    print(f"{'run':<28} {'wall s':>8} {'rows/s':>12} {'MB/s':>8} {'vs read':>7}")
    base = secs['pyarrow read'][1] - secs['pyarrow read'][0]
    for name, (one, every) in secs.items():
        extra = max(every - one, 1e-9)
        print(f'{name:<28} {every:8.1f} {extra_rows / extra:12,.0f} {extra_bytes / 1e6 / extra:8.1f} '
              f'{base / extra:7.2f}')

if __name__ == '__main__':
    main()
