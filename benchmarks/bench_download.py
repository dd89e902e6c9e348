"""Download speed against the loopback server: our settings (bytes as downloaded) vs img2dataset's default
re-encoding (decode, resize to 256 with borders, encode JPEG), measured in the same run.

Example:
    .venv/bin/python benchmarks/bench_download.py          # 2,000 photo-like JPEGs (~170 KB), ~2-4 min
    .venv/bin/python benchmarks/bench_download.py --rows 20000 --processes 2 --all

Runs (each once on --small rows and once on --rows rows, so that start-up cancels out):
  ours: laion_download_all.sh        the script as users run it, its end-of-run image check included
  ours: CHECK_IMAGES=False           (--all) the script without that check
  img2dataset, default re-encoding   the img2dataset CLI with our flags minus `--resize_mode no
                                     --disable_all_reencoding True` (so its defaults: border, 256)
Columns: 'wall s' the full run's command; 'img/s' marginal (extra rows / extra wall time: start-up,
~10-40 s as every process imports img2dataset, cancels out); 'img/s shards' rows over the span from
the first shard's start to the last shard's end in the full run's _stats.json files; 'CPU ms/img'
marginal CPU time of the command's whole process tree per image, which says how many images a core
sustains where the network is the limit, as on a real LAION download. The server is Python's
ThreadingHTTPServer in this process (not in the CPU column): on 2 cores it limits every run alike.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))

from testbed.corpus import CorpusItem, make_jpeg  # noqa: E402
from testbed.http_server import ImageServer  # noqa: E402
from testbed.laion_meta import Entry, write_metadata  # noqa: E402

# Photo-like JPEGs at quality 90: ~60-250 KB each, around LAION's typical sizes.
SIZES = [(640, 480), (480, 640), (512, 512), (800, 533), (400, 300), (1024, 683), (333, 500), (720, 405)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rows', type=int, default=2000, help='Metadata rows (one image each).')
    p.add_argument('--distinct', type=int, default=64, help='Distinct JPEGs served under the row URLs.')
    p.add_argument('--per_shard', type=int, default=500, help='NUMBER_SAMPLE_PER_SHARD.')
    p.add_argument('--processes', type=int, default=1, help='PROCESSES_COUNT for every row.')
    p.add_argument('--threads', type=int, default=32, help='THREAD_COUNT for every row.')
    p.add_argument('--small', type=int, default=100,
                   help='Rows of the start-up run subtracted from the full one (marginal rates).')
    p.add_argument('--all', action='store_true', help='Also time the script with CHECK_IMAGES=False.')
    p.add_argument('--local', default=None, help='Work folder (default: a temporary one, removed after).')
    return p.parse_args()


def build_input(server: ImageServer, names: list[str], folder: Path) -> Path:
    """LAION-2B-en metadata (with the files' md5, which both runs verify) with one row per file in `names`."""
    entries = [Entry(server.url(n), f'a photo number {i}', 'success', CorpusItem(n, server.files[n], 0, 0))
               for i, n in enumerate(names)]
    write_metadata(folder, entries, 'full')
    return folder


def shard_rate(out: Path, rows: int) -> float:
    """Rows per second from the first shard's start to the last shard's end; every row must succeed."""
    stats = [json.loads(Path(p).read_text()) for p in glob.glob(str(out / '*_stats.json'))]
    ok = sum(s['successes'] for s in stats)
    if ok != rows:
        sys.exit(f'only {ok} of {rows} rows downloaded in {out}: {[s["status_dict"] for s in stats][:3]}')
    span = max(s['end_time'] for s in stats) - min(s['start_time'] for s in stats)
    return sum(s['count'] for s in stats) / max(span, 1e-9)


def children_cpu() -> float:
    """CPU seconds of every finished child process tree (the server runs in this process: not counted)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str], out: Path, rows: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the command's processes, shard rate) of one run writing to `out`."""
    shutil.rmtree(out, ignore_errors=True)
    t, cpu = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, children_cpu() - cpu
    if proc.returncode != 0:
        sys.exit(f'failed: {" ".join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}')
    return wall, cpu, shard_rate(out, rows)


def commands(meta: Path, out: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, tuple]:
    """Run name -> (command, environment) for one metadata folder."""
    knobs = dict(URL_LIST=str(meta), OUTPUT_FOLDER=str(out), PROCESSES_COUNT=str(args.processes),
                 THREAD_COUNT=str(args.threads), NUMBER_SAMPLE_PER_SHARD=str(args.per_shard))
    script = [str(ROOT / 'laion_download_all.sh')]
    runs = {'ours: laion_download_all.sh': (script, {**env, **knobs})}
    if args.all:
        runs['ours: CHECK_IMAGES=False'] = (script, {**env, **knobs, 'CHECK_IMAGES': 'False'})
    runs['img2dataset, default re-encoding'] = (
        ['img2dataset', f'--url_list={meta}', f'--output_folder={out}', '--input_format=parquet',
         '--output_format=parquet', '--url_col=url', '--caption_col=caption', '--compute_hash=md5',
         '--verify_hash=["md5","md5"]',
         '--save_additional_columns=["punsafe","pwatermark","similarity","hash"]',
         f'--processes_count={args.processes}', f'--thread_count={args.threads}',
         f'--number_sample_per_shard={args.per_shard}', '--enable_wandb=False'], env)
    return runs


def main() -> None:
    args = parse_args()
    work = Path(args.local or tempfile.mkdtemp(prefix='bench_download_'))
    work.mkdir(parents=True, exist_ok=True)
    pool = [make_jpeg(*SIZES[i % len(SIZES)], seed=i) for i in range(args.distinct)]
    files = {f'img{i:07d}.jpg': pool[i % len(pool)] for i in range(args.rows)}
    names = sorted(files)
    mb = sum(len(b) for b in files.values()) / 1e6
    env = dict(os.environ, PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}',
               NO_ALBUMENTATIONS_UPDATE='1', WANDB_MODE='disabled')
    load = os.getloadavg()[0]
    results = {}  # name -> (small run, full run)
    try:
        with ImageServer(files) as server:
            small = build_input(server, names[:args.small], work / 'small-raw')
            full = build_input(server, names, work / 'laion2b-raw')
            out = work / 'out'
            for name, (cmd, run_env) in commands(small, out, args, env).items():
                results[name] = [timed(cmd, run_env, out, args.small)]
            for name, (cmd, run_env) in commands(full, out, args, env).items():
                results[name].append(timed(cmd, run_env, out, args.rows))
    finally:
        if args.local is None:
            shutil.rmtree(work, ignore_errors=True)

    extra = args.rows - args.small
    table = []
    for name, ((wall0, cpu0, _), (wall1, cpu1, rate)) in results.items():
        table.append((name, wall1, extra / max(wall1 - wall0, 1e-9), rate, (cpu1 - cpu0) / extra * 1000))
    base = table[-1]
    print(f'\n{args.rows:,} images ({mb / args.rows * 1000:.0f} KB mean, {mb:,.0f} MB), marginal over a '
          f'{args.small}-row run; {args.processes} process(es) x {args.threads} threads, {args.per_shard} '
          f'rows/shard; load average {load:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores')
    print(f"{'run':<34}{'wall s':>7}{'img/s':>7}{'img/s shards':>13}{'CPU ms/img':>11}"
          f"{'ratio img/s':>12}{'shards':>7}{'CPU':>6}")
    for name, wall, rate, shards, cpu in table:
        print(f'{name:<34}{wall:>7.1f}{rate:>7.0f}{shards:>13.0f}{cpu:>11.1f}'
              f'{rate / base[2]:>12.2f}{shards / base[3]:>7.2f}{base[4] / cpu:>6.2f}')
    print('ratios against default re-encoding, higher is better (CPU: its CPU per image / this one)')

if __name__ == '__main__':
    main()
