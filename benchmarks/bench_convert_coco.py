"""Throughput of convert_coco.py beside the I/O limit: `cp -r` + `sync` of the same files.

    .venv/bin/python benchmarks/bench_convert_coco.py    # 500 and 4000 images, 3 times each: ~1-2 minutes
    .venv/bin/python benchmarks/bench_convert_coco.py --sizes 1000 10000 --repeats 5

Builds COCO-shaped folders (640x480 JPEGs of ~120 KB, near COCO's average; tests/testbed/coco.py) of
two sizes, then times, for each size, convert_coco's pipeline (`--num_samples 0`, to a local folder; run
in this process after a warm-up run, since its imports alone take 10-20 s on a busy 2-core machine and
vary by seconds) and `cp -r` of the image folder, each followed by `sync` so both pay for putting the
bytes on disk. The remaining start-up (reading the annotation, opening the writer) is excluded by
taking the difference between the two sizes: rate = (n2 - n1) / (t2 - t1). The goal is a ratio of at
least 0.25 on 2 cores. Other work on the machine makes timings noisy: the load average is printed
beside the figures; prefer the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / 'tests'), str(ROOT)]

from testbed.coco import write_coco_sample  # noqa: E402

import convert_coco  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sizes', type=int, nargs=2, default=[500, 4000], help='the two image counts')
    p.add_argument('--repeats', type=int, default=3, help='runs per measurement; the fastest counts')
    p.add_argument('--workers', type=int, default=16, help='convert_coco.py --workers')
    p.add_argument('--workdir', type=str, default='', help='scratch folder (default: a temp folder)')
    return p.parse_args()


def sync_timed(work: Callable[[], object], out: Path) -> float:
    """Seconds for `work()` plus a `sync`, starting from an absent `out`."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(['sync'], check=True)
    start = time.perf_counter()
    work()
    subprocess.run(['sync'], check=True)
    return time.perf_counter() - start


def run_convert(data: Path, ann: Path, remote: Path, workers: int) -> None:
    """convert_coco.py's pipeline in this process (its imports already paid), output silenced."""
    argv = ['convert_coco.py', '--data_path', str(data), '--annotation_path', str(ann),
            '--remote', str(remote), '--num_samples', '0', '--workers', str(workers)]
    with mock_argv(argv), contextlib.redirect_stderr(io.StringIO()):
        convert_coco.convert(convert_coco.parse_args())


@contextlib.contextmanager
def mock_argv(argv: list[str]):
    old, sys.argv = sys.argv, argv
    try:
        yield
    finally:
        sys.argv = old


def measure(work: Path, sizes: list[int], repeats: int, workers: int) -> list[dict[str, float]]:
    """Best-of-`repeats` seconds for convert and for cp per size; sizes alternate within a repeat so
    that load from other work on the machine touches both alike."""
    folders = [write_coco_sample(work / f'coco{n}', n, seed=0, image_size=(640, 480), distinct_images=24)
               for n in sizes]
    run_convert(*folders[0], work / 'mds', workers)  # warm-up: imports streaming (and torch)
    times = [{'convert': [], 'cp -r': []} for _ in sizes]
    for _ in range(repeats):
        for (data, ann), t in zip(folders, times):
            t['convert'].append(sync_timed(lambda d=data, a=ann: run_convert(d, a, work / 'mds', workers),
                                           work / 'mds'))
            copy = ['cp', '-r', str(data), str(work / 'copy')]
            t['cp -r'].append(sync_timed(lambda c=copy: subprocess.run(c, check=True), work / 'copy'))
    best = [{k: min(v) for k, v in t.items()} for t in times]
    for (data, _), b in zip(folders, best):
        b['mb'] = sum(p.stat().st_size for p in data.iterdir()) / 2**20  # + 1 unannotated file
    return best


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix='bench-coco-'))
    n1, n2 = args.sizes
    load = os.getloadavg()
    try:
        small, big = measure(work, [n1, n2], args.repeats, args.workers)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    mb = big['mb'] - small['mb']
    print(f'\nconvert_coco vs cp -r + sync   sizes {n1} / {n2} images ({big["mb"] / n2 * 1024:.0f} KB avg)'
          f'   cores {os.cpu_count()}   load before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}')
    print(f'{"method":<10} {f"t({n1})":>9} {f"t({n2})":>9} {"samples/s":>10} {"MB/s":>8} {"ratio":>6}')
    rates = {}
    for name in ('cp -r', 'convert'):
        dt = max(big[name] - small[name], 1e-9)
        rates[name] = (n2 - n1) / dt
        print(f'{name:<10} {small[name]:>8.2f}s {big[name]:>8.2f}s {rates[name]:>10,.0f} {mb / dt:>8,.1f} '
              f'{rates[name] / rates["cp -r"]:>6.2f}')
    verdict = 'meets' if rates['convert'] >= 0.25 * rates['cp -r'] else 'MISSES'
    print(f'goal: convert >= 0.25 x cp -r ({verdict} it)')


if __name__ == '__main__':
    main()
