"""Every structure a step keeps whole in one process or one file, at 1x, 10x and 100x a size.

    .venv/bin/python benchmarks/bench_structures.py                 # 1x and 10x of each (~2 min)
    .venv/bin/python benchmarks/bench_structures.py --scales 1 10 100   # 100x too (~15 min, ~8 GB)
    .venv/bin/python benchmarks/bench_structures.py --only dedup plan

Synthetic metadata only (no image is made). Each row runs the step's own function, from the script
itself, in a fresh process, and reports its wall time and peak RSS, and the size of the structure
where it is a file. 1x is the size its own benchmark or test bed works at, or 1% of LAION-2B-en (2.3B
rows, ~230k input shards of 10,000 rows; the biggest bucket's index ~470k MDS shards before tasks carried
their tails, ~391k after) where that benchmark is too small to say anything:

  listing     laion_cloudwriter's look at --local (list_input + finished_shards) over N input shards'
              NNNNN_converted.json (1x: 2,300 shards, 1% of LAION-2B); a tmpfs folder.
  summary     laion_download_all.sh's summarize() over N shards' NNNNN_stats.json (1x: 2,300).
  dedup       filter_metadata's Seen (the URL dedup) fed N URL hashes in its batches (1x: 4M rows,
              bench_filter_metadata's 4 files x 1M).
  blocklist   filter_metadata's read_blocklist + the Polars list it matches against (1x: 100k URLs,
              bench_filter_metadata's).
  coco        convert_coco's load_annotations over N images x 5 captions (1x: 4,000 images,
              bench_convert_coco's larger size).
  plan        precompute_latents' (and caption_images', the same twin) plan on rank 0: the input's
              index.json read whole, plan_parts, index_digest, and the pickled plan every rank receives
              (1x: 4,700 MDS shards, 1% of the biggest bucket's before tasks carried tails).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))

BASE = {'listing': 2_300, 'summary': 2_300, 'dedup': 4_000_000, 'blocklist': 100_000, 'coco': 4_000,
        'plan': 4_700}
UNIT = {'listing': 'input shards', 'summary': 'shards', 'dedup': 'rows', 'blocklist': 'URLs',
        'coco': 'images', 'plan': 'MDS shards'}


def script(name: str):
    from testbed.scripts import load_script
    return load_script(name)


def peak_mb() -> float:
    """This process's peak RSS (VmHWM: its own; getrusage's ru_maxrss keeps the parent's from before exec)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- builders (in the parent; not timed) and measures (in a child) ------------------------------------

def build(name: str, n: int, work: Path) -> None:
    work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    if name == 'listing':
        for s in range(n):
            (work / f'{s:06d}_converted.json').touch()
    elif name == 'summary':
        reasons = [f'<urlopen error [Errno {i}] a failure of kind {i}>' for i in range(40)]
        for s in range(n):
            counts = {reasons[i]: int(rng.integers(1, 30)) for i in rng.choice(40, 25, replace=False)}
            ok = 10_000 - sum(counts.values())
            stats = {'count': 10_000, 'successes': ok, 'failed_to_download': 10_000 - ok,
                     'failed_to_resize': 0, 'duration': 100.0, 'start_time': 1000.0 + s,
                     'end_time': 1100.0 + s, 'status_dict': {'success': ok, **counts}}
            (work / f'{s:06d}_stats.json').write_text(json.dumps(stats, indent=4))
            (work / f'{s:06d}.parquet').touch()
    elif name == 'blocklist':
        (work / 'block.txt').write_text(''.join(f'https://example.com/images/{i:012d}/photo.jpg\n'
                                                for i in range(n)))
    elif name == 'coco':
        images = [{'id': i, 'file_name': f'COCO_val2014_{i:012d}.jpg', 'width': 640, 'height': 480}
                  for i in range(n)]
        notes = [{'id': 5 * i + k, 'image_id': i, 'caption': f'A photo number {i} of a thing, take {k}.'}
                 for i in range(n) for k in range(5)]
        (work / 'captions.json').write_text(json.dumps({'images': images, 'annotations': notes}))
    elif name == 'plan':
        cw = script('laion_cloudwriter.py')
        config = cw.mds_config(256 << 20)
        shards = [{**config, 'samples': 360, 'zip_data': None,
                   'raw_data': {'basename': f'{i // 2:06d}/shard.{i % 2:05d}.mds', 'bytes': 256 << 20,
                                'hashes': {}}} for i in range(n)]
        (work / 'index.json').write_text(json.dumps({'version': 2, 'shards': shards}))


def measure(name: str, n: int, work: Path) -> dict:
    """Wall time, peak RSS above the process's after its imports (the structure's own), and size."""
    t0 = time.perf_counter()
    size = 0.0
    base = 0.0
    if name == 'listing':
        cw = script('laion_cloudwriter.py')
        fs, root = cw.input_fs(str(work))
        t0, base = time.perf_counter(), peak_mb()
        cw.finished_shards(cw.list_input(fs, root))
    elif name == 'summary':
        body = re.search(r"summarize\(\) \{\n  \"\$PYTHON\" - \"\$@\" <<'EOF'\n(.*?)\nEOF\n",
                         (ROOT / 'laion_download_all.sh').read_text(), re.S).group(1)
        (work.parent / 'summarize.py').write_text(body)
        proc = subprocess.run(['/usr/bin/time', '-f', '%M', sys.executable, str(work.parent / 'summarize.py'),
                               str(work), str(n), '0', '0', 'False'], capture_output=True, text=True)
        empty = work.parent / 'empty'  # the same interpreter and imports over no shard: the base
        empty.mkdir(exist_ok=True)
        none = subprocess.run(['/usr/bin/time', '-f', '%M', sys.executable, str(work.parent / 'summarize.py'),
                               str(empty), '0', '0', '0', 'False'], capture_output=True, text=True)
        return {'s': time.perf_counter() - t0, 'size_mb': 0.0,
                'peak_mb': (int(proc.stderr.split()[-1]) - int(none.stderr.split()[-1])) / 1024}
    elif name == 'dedup':
        fm = script('filter_metadata.py')
        seen, rng, batch = fm.Seen(), np.random.default_rng(0), 256 * 1024
        t0, base = time.perf_counter(), peak_mb()
        for start in range(0, n, batch):
            seen.first_time(rng.integers(0, 2**63, min(batch, n - start), dtype=np.int64).astype(np.uint64))
        size = sum(r.nbytes for r in seen.runs) / 1e6
    elif name == 'blocklist':
        import polars as pl
        fm = script('filter_metadata.py')
        t0, base = time.perf_counter(), peak_mb()
        blocked, _ = fm.read_blocklist([str(work / 'block.txt')], 'url')
        pl.Series(sorted(blocked), dtype=pl.String).implode()
        size = (work / 'block.txt').stat().st_size / 1e6
    elif name == 'coco':
        cc = script('convert_coco.py')
        t0, base = time.perf_counter(), peak_mb()
        cc.load_annotations(work / 'captions.json')
        size = (work / 'captions.json').stat().st_size / 1e6
    elif name == 'plan':
        pl = script('precompute_latents.py')
        t0, base = time.perf_counter(), peak_mb()
        shards = pl.read_input_index(str(work), str(work / 'cache'), 60.0)
        parts = pl.plan_parts(shards, 10_000)
        pl.index_digest(shards)
        size = len(pickle.dumps((shards, parts))) / 1e6  # what broadcast_object_list sends every rank
    return {'s': time.perf_counter() - t0, 'peak_mb': peak_mb() - base, 'size_mb': size}


def run(name: str, n: int, work: Path) -> dict:
    folder = work / f'{name}-{n}'
    shutil.rmtree(folder, ignore_errors=True)
    build(name, n, folder)
    proc = subprocess.run([sys.executable, __file__, '--child', name, str(n), str(folder)],
                          capture_output=True, text=True)
    shutil.rmtree(folder, ignore_errors=True)
    if proc.returncode:
        sys.exit(f'{name} at {n} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--scales', type=int, nargs='+', default=[1, 10], help='multiples of each 1x size')
    p.add_argument('--only', nargs='*', default=list(BASE), choices=list(BASE), help='structures to measure')
    p.add_argument('--work', default='/dev/shm/bench_structures', help='scratch folder (tmpfs: no disk)')
    p.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, n, folder = args.child
        print(json.dumps(measure(name, int(n), Path(folder))))
        return
    work = Path(args.work)
    print('| structure | scale | size | wall s | peak RSS MB above imports | file / structure MB |')
    print('|---|---:|---:|---:|---:|---:|')
    for name in args.only:
        for scale in args.scales:
            n = BASE[name] * scale
            r = run(name, n, work)
            print(f"| {name} | {scale}x | {n:,} {UNIT[name]} | {r['s']:,.2f} | {r['peak_mb']:,.0f} | "
                  f"{r['size_mb']:,.1f} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
