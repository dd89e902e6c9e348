"""Throughput of convert_coco.py beside the I/O limit: `cp -r` + `sync` of the same files.

    .venv/bin/python benchmarks/bench_convert_coco.py    # 500 and 3000 images, twice each: ~2-3 minutes
    .venv/bin/python benchmarks/bench_convert_coco.py --sizes 1000 5000 --repeats 2

Builds COCO-shaped folders (640x480 JPEGs of ~130 KB, as COCO's average; tests/testbed/coco.py) of two
sizes, then times, for each size, `convert_coco.py --num_samples 0` to a local folder and `cp -r` of
the image folder, each followed by `sync` so both pay for putting the bytes on disk. Start-up (Python
and torch imports, reading the annotation) is excluded by taking the difference between the two sizes:
rate = (n2 - n1) / (t2 - t1). The goal is a ratio of at least 0.25 on 2 cores. Other work on the
machine makes timings noisy: the load average is printed beside the figures; prefer the ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))

from testbed.coco import write_coco_sample  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sizes', type=int, nargs=2, default=[500, 3000], help='the two image counts')
    p.add_argument('--repeats', type=int, default=2, help='runs per measurement; the fastest counts')
    p.add_argument('--workers', type=int, default=16, help='convert_coco.py --workers')
    p.add_argument('--workdir', type=str, default='', help='scratch folder (default: a temp folder)')
    return p.parse_args()


def timed(cmd: list[str], out: Path) -> tuple[float, float]:
    """Wall seconds for `cmd` plus a `sync` (from an absent `out`), and the same less the interpreter
    start-up: the script's own reading-and-writing time (if it prints one) plus the sync."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(['sync'], check=True)
    start = time.perf_counter()
    run = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    synced = time.perf_counter()
    subprocess.run(['sync'], check=True)
    end = time.perf_counter()
    own = re.search(r'time reading and writing\s+([\d.,]+) s', run.stdout)
    return end - start, (float(own[1].replace(',', '')) if own else synced - start) + end - synced


def measure(work: Path, n: int, repeats: int, workers: int) -> dict[str, float]:
    """Best-of-`repeats` seconds for convert and for cp, on a folder of `n` images."""
    data, ann = write_coco_sample(work / f'coco{n}', n, seed=0, image_size=(640, 480), distinct_images=24)
    convert = [sys.executable, str(ROOT / 'convert_coco.py'), '--data_path', str(data),
               '--annotation_path', str(ann), '--remote', str(work / 'mds'), '--num_samples', '0',
               '--workers', str(workers)]
    copy = ['cp', '-r', str(data), str(work / 'copy')]
    runs = [timed(convert, work / 'mds') for _ in range(repeats)]
    times = {'convert': min(r[0] for r in runs), 'convert*': min(r[1] for r in runs),
             'cp -r': min(timed(copy, work / 'copy')[0] for _ in range(repeats))}
    times['mb'] = sum(p.stat().st_size for p in data.iterdir()) / 2**20  # + 1 unannotated file
    return times


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix='bench-coco-'))
    n1, n2 = args.sizes
    load = os.getloadavg()
    try:
        small, big = (measure(work, n, args.repeats, args.workers) for n in (n1, n2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    mb = big['mb'] - small['mb']
    print(f'\nconvert_coco vs cp -r + sync   sizes {n1} / {n2} images ({big["mb"] / n2 * 1024:.0f} KB avg)'
          f'   cores {os.cpu_count()}   load before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}')
    print(f'{"method":<10} {f"t({n1})":>9} {f"t({n2})":>9} {"samples/s":>10} {"MB/s":>8} {"ratio":>6}')
    rates = {}
    for name in ('cp -r', 'convert', 'convert*'):
        dt = max(big[name] - small[name], 1e-9)
        rates[name] = (n2 - n1) / dt
        print(f'{name:<10} {small[name]:>8.2f}s {big[name]:>8.2f}s {rates[name]:>10,.0f} {mb / dt:>8,.1f} '
              f'{rates[name] / rates["cp -r"]:>6.2f}')
    verdict = 'meets' if rates['convert'] >= 0.25 * rates['cp -r'] else 'MISSES'
    print("convert*: the script's own clock (after Python/torch start-up) plus the sync")
    print(f'goal: convert >= 0.25 x cp -r ({verdict} it)')


if __name__ == '__main__':
    main()
