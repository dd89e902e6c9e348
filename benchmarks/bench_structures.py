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

caption_images.py and precompute_latents.py (each row for both, `--scripts`; `--before REV` measures them
at git revision REV too, as they were). 1x is 1% of LAION-2B's biggest bucket: 4,700 input MDS shards
(~470k before the cloudwriter's tasks carried their tails), or 3,220 parts (its ~644M samples at the
default --part_size 2000), each naming 20 skipped images (~1%):

  plan        share_plan() in a gloo world of --world ranks on 127.0.0.1: rank 0 reads the input's
              index.json, plans the parts and digests the index, and every rank receives the plan (before:
              all of it, broadcast; now: what all need broadcast, each rank's share scattered). Wall time
              and peak RSS are rank 0's; `size` is what rank 1 holds of the plan (pickled), its peak in the
              last column. precompute's make_plan() is its own index reading (read_input_index,
              plan_parts, index_digest) without a model: the model's share is the same in both versions.
  resume      the start of a rerun over an output whose N parts are all finished (caption's make_plan:
              the output listed, each part's marker read and its settings compared; precompute's
              output_names + done_markers over the listing, as its make_plan does).
  names       rank 0's summarize() over N parts' _done markers, each naming 20 skipped images; `size` is
              the summary JSON.
  merge       rank 0's merge_parts(): the output's index.json over N parts of 2 MDS shards each.
"""

from __future__ import annotations

import argparse
import argparse as ap
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import json
import os
import pickle
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))

BASE = {'listing': 2_300, 'summary': 2_300, 'dedup': 4_000_000, 'blocklist': 100_000, 'coco': 4_000,
        'plan': 4_700, 'resume': 3_220, 'names': 3_220, 'merge': 3_220}
UNIT = {'listing': 'input shards', 'summary': 'shards', 'dedup': 'rows', 'blocklist': 'URLs',
        'coco': 'images', 'plan': 'MDS shards', 'resume': 'parts', 'names': 'parts', 'merge': 'parts'}
PER_SCRIPT = ('plan', 'resume', 'names', 'merge')  # measured for caption_images and precompute_latents
SCRIPTS = {'caption': 'caption_images.py', 'precompute': 'precompute_latents.py'}
PART_SIZE, SHARD_SAMPLES, NAMED = 2_000, 360, 20  # samples per part and per input shard; skipped per part
ENGINE = {'model_name': 'Qwen/Qwen2-VL-2B-Instruct', 'do_sample': False, 'num_beams': 1}  # its settings


def script(name: str, rev: str = ''):
    """The script `name` as it is, or as it was at git revision `rev`."""
    if not rev:
        from testbed.scripts import load_script
        return load_script(name)
    path = Path(tempfile.mkdtemp(prefix='before-')) / name
    path.write_bytes(subprocess.run(['git', '-C', str(ROOT), 'show', f'{rev}:{name}'], capture_output=True,
                                    check=True).stdout)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
    elif name == 'plan':  # every record names one file (the input is read in place: it must exist)
        cw = script('laion_cloudwriter.py')
        config = cw.mds_config(256 << 20)
        shards = [{**config, 'samples': SHARD_SAMPLES, 'zip_data': None,
                   'raw_data': {'basename': '000000/shard.00000.mds', 'bytes': 256 << 20, 'hashes': {}}}
                  for _ in range(n)]
        (work / 'in' / '000000').mkdir(parents=True)
        (work / 'in' / '000000' / 'shard.00000.mds').touch()
        (work / 'in' / 'index.json').write_text(json.dumps({'version': 2, 'shards': shards}))
    elif name in PER_SCRIPT:  # an output of n finished parts, as either script leaves it
        build_output(n, work)


def build_output(n: int, work: Path) -> None:
    """n parts, each with 2 MDS shard files (empty: nothing reads them), their index.json and a _done
    marker in both scripts' formats (caption's fields and precompute's), naming NAMED skipped images."""
    cw = script('laion_cloudwriter.py')
    config = cw.mds_config(256 << 20)
    args, _ = caption_args(work)
    settings = {'engine': args.engine, **ENGINE, 'prompts': args.prompts, 'keep_raw': args.keep_raw,
                'rules': args.rules, 'max_new_tokens': args.max_new_tokens, 'part_size': args.part_size}
    captions = {'vlm_caption': {'cut_off': 0, 'empty': 0, 'rules': {'collapse_whitespace': 3}}}
    settings.update(input_samples=n * PART_SIZE, input_index=input_index(n))
    for p in range(n):
        part = work / 'out' / f'{p:05d}'
        part.mkdir(parents=True)
        shards = [{**config, 'samples': PART_SIZE // 2, 'zip_data': None,
                   'raw_data': {'basename': f'shard.{k:05d}.mds', 'bytes': 150 << 20, 'hashes': {}}}
                  for k in range(2)]
        for s in shards:
            (part / s['raw_data']['basename']).touch()
        (part / 'index.json').write_text(json.dumps({'version': 2, 'shards': shards}))
        ids = [p * PART_SIZE + 97 * i for i in range(NAMED)]
        skipped = [{'id': i, 'key': f'{i:09d}', 'reason': 'OSError: image file is truncated (3 bytes not '
                    'processed)'} for i in ids]
        written = PART_SIZE - NAMED
        marker = {'part': f'{p:05d}', 'rank': 0, 'written': written, 'skipped': skipped, 'noted': [],
                  'failed': [], 'tokens': 300_000, 'prompt_tokens': 2_000_000, 'no_usage': 0,
                  'captions': captions, 'seconds': 600.0, 'about': {'device': 'cuda:0'},
                  'settings': settings,
                  'encoded': {'256': written}, 'groups': {'': written}, 'latent_bytes': 16_384 * written,
                  'truncated': {'caption': [3]}}
        (part / '_done').write_text(json.dumps(marker))


def input_shards(n: int) -> list[dict]:
    """The input of an output of n parts: one shard record of PART_SIZE samples per part."""
    cw = script('laion_cloudwriter.py')
    config = cw.mds_config(256 << 20)
    return [{**config, 'samples': PART_SIZE, 'zip_data': None, 'raw_data': {
        'basename': f'{i // 2:06d}/shard.{i % 2:05d}.mds', 'bytes': 256 << 20, 'hashes': {}}}
        for i in range(n)]


def input_index(n: int) -> str:
    """input_shards(n)'s identity, as either version of caption's make_plan digests it."""
    return hashlib.sha1(json.dumps(input_shards(n), sort_keys=True).encode()).hexdigest()[:16]


def made(cls, **fields):
    """A dataclass of the script's (either version) from the fields it has."""
    return cls(**{f.name: fields.get(f.name) for f in dataclasses.fields(cls)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


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
    return {'s': time.perf_counter() - t0, 'peak_mb': peak_mb() - base, 'size_mb': size}


def caption_args(work: Path):
    args = ap.Namespace(prompts={'vlm_caption': 'Describe this image in detail.'}, keep_raw=False, engine='x',
                        rules=['collapse_whitespace'], max_new_tokens=256, part_size=PART_SIZE,
                        download_timeout=60.0, price=None, resolutions=[256], caption_keys=['caption'])
    places = ap.Namespace(remote_upload=str(work / 'out'), bucket='', subfolder='', local=str(work / 'in'),
                          remote_download='')
    return args, places


def measure_script(name: str, which: str, n: int, work: Path, rev: str, rank: int, world: int) -> dict:
    """A PER_SCRIPT row of `which` ('caption' or 'precompute', at revision `rev`)."""
    import streaming.base.util  # noqa: F401  (what the scripts import on the way: not the structure's)
    import torch.distributed  # noqa: F401

    sc = script(SCRIPTS[which], rev)
    args, flags = caption_args(work)
    pl = sc.places(flags)
    parts = [sc.Part(f'{p:05d}', (2 * p, 2 * p + 1), p * PART_SIZE, (p + 1) * PART_SIZE) for p in range(n)]
    plan = made(sc.Plan, places=pl, parts=parts, pending=[], finished=n, columns={}, shards=[], tokenizers=[],
                settings={'prompts': args.prompts, 'input_samples': n * PART_SIZE, 'dtype': 'float32',
                          'convention': {'family': 'sd2', 'text_encoders': [{'subfolder': 'text_encoder',
                                                                             'tokens': 77}]}})
    t0, base, size, more = time.perf_counter(), peak_mb(), 0.0, {}
    if name == 'plan':
        import torch
        import torch.distributed as dist

        if which == 'precompute':  # its own index reading, without a model
            def make_plan(args, pl, dtype):
                shards = sc.read_input_index(pl.src, pl.cache, 60.0)
                parts = sc.plan_parts(shards, PART_SIZE)
                settings = {'input_index': sc.index_digest(shards)[:16], 'input_samples': parts[-1].last}
                return made(sc.Plan, places=pl, shards=shards, parts=parts, pending=parts, finished=0,
                            settings=settings, columns={}, tokenizers=[])
            sc.make_plan = make_plan
        dist.init_process_group('gloo', rank=rank, world_size=world)
        t0, base = time.perf_counter(), peak_mb()
        extra = [sc.Engine(lambda a: ENGINE, None, None) if which == 'caption' else torch.float32]
        if 'world' in inspect.signature(sc.share_plan).parameters:
            extra.append(world)
        got = sc.share_plan(args, pl, extra[0], rank, *extra[1:])
        size = len(pickle.dumps(got)) / 1e6  # what this rank holds of the plan
        dist.destroy_process_group()
    elif name == 'resume' and which == 'caption':  # the input's shard list in memory (its reading: 'plan')
        shards = input_shards(n)
        sc.read_input = lambda pl, new, timeout: (shards, {'jpg': 'bytes'})
        t0, base = time.perf_counter(), peak_mb()
        assert not sc.make_plan(args, pl, ENGINE).pending
    elif name == 'resume':
        names = sc.output_names(pl.out)
        sum(1 for _ in sc.done_markers(pl.out, parts, names, 60.0))  # a dict then, an iterator now
    elif name == 'names':
        with contextlib.redirect_stdout(io.StringIO()):
            if which == 'caption':
                failed = sc.named() if hasattr(sc, 'named') else []
                idle = {'images': 0, 'tokens': 0, 'seconds': 1.0, 'failed': failed, 'stopped': None}
                summary = sc.summarize(args, plan, [idle], 1)
            else:
                summary = sc.summarize(args, plan, {'samples': 0, 'seconds': 1.0, 'steady': 0.0}, 1, None)[0]
        size = len(json.dumps(summary, indent=2)) / 1e6
    elif name == 'merge' and which == 'caption':
        os.makedirs(pl.staging, exist_ok=True)
        timeout = [60.0] if 'timeout' in inspect.signature(sc.merge_parts).parameters else []  # now
        sc.merge_parts(plan, pl.staging, *timeout)
    elif name == 'merge':  # one group, as a centre crop writes
        old = 'markers' in inspect.signature(sc.merge_parts).parameters  # each part's marker, then
        sc.merge_parts(made(sc.Plan, **{**vars(plan), 'crop': ap.Namespace(grouped=False)}),
                       {p.name: {'groups': {'': 1}} if old else [''] for p in parts}, 60.0)
    return {'s': time.perf_counter() - t0, 'peak_mb': peak_mb() - base, 'size_mb': size, **more}


def run(name: str, n: int, work: Path, which: str = '', rev: str = '', world: int = 1,
        keep: bool = False) -> dict:
    """The row `name` at size n, measured in a fresh process (a world of them for 'plan': rank 0's
    figures, and rank 1's peak); `keep`: its input stays for the next version or script."""
    folder = work / f'{"output" if name in PER_SCRIPT[1:] else name}-{n}'
    if not (folder / 'built').exists():
        shutil.rmtree(folder, ignore_errors=True)
        build(name, n, folder)
        (folder / 'built').touch()
    env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port()),
           'NO_ALBUMENTATIONS_UPDATE': '1', 'OMP_NUM_THREADS': '1'}
    child = [sys.executable, __file__, '--child', name, str(n), str(folder), which, rev or '-']
    procs = [subprocess.Popen(child + [str(rank), str(world)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for rank in range(world if name == 'plan' else 1)]
    outs = [p.communicate() for p in procs]
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            sys.exit(f'{name} {which} at {n} failed:\n{err[-3000:]}')
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return {**rows[0], 'rank1_peak_mb': rows[1]['peak_mb'], 'rank1_mb': rows[1]['size_mb']} \
        if len(rows) > 1 else rows[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--scales', type=int, nargs='+', default=[1, 10], help='multiples of each 1x size')
    p.add_argument('--only', nargs='*', default=list(BASE), choices=list(BASE), help='structures to measure')
    p.add_argument('--work', default='/dev/shm/bench_structures',
                   help='scratch folder (tmpfs: no disk; at 100x a disk folder: ~1.3M files)')
    p.add_argument('--scripts', nargs='+', default=list(SCRIPTS), choices=list(SCRIPTS),
                   help='whose plan, resume, names and merge rows to measure')
    p.add_argument('--before', default='', help='also measure the scripts at this git revision')
    p.add_argument('--world', type=int, default=2, help="ranks of the 'plan' rows")
    p.add_argument('--child', nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, n, folder, which, rev, rank, world = args.child
        if name in PER_SCRIPT:
            result = measure_script(name, which, int(n), Path(folder), rev.strip('-'), int(rank), int(world))
        else:
            result = measure(name, int(n), Path(folder))
        print(json.dumps(result))
        return
    work = Path(args.work)
    print('| structure | scale | size | wall s | peak RSS MB above imports | file / structure MB |')
    print('|---|---:|---:|---:|---:|---:|')
    for name in args.only:
        versions = [(w, rev) for w in args.scripts for rev in ([args.before] if args.before else []) + ['']] \
            if name in PER_SCRIPT else [('', '')]
        for scale in args.scales:
            n = BASE[name] * scale
            for k, (which, rev) in enumerate(versions):
                later = k + 1 < len(versions) or name in PER_SCRIPT[1:] and name != args.only[-1]
                r = run(name, n, work, which, rev, args.world, keep=later)
                label = f'{name} {which} ({rev or "now"})' if which else name
                rank1 = f" (rank 1: {r['rank1_mb']:,.1f} MB held, {r['rank1_peak_mb']:,.0f} MB peak)" \
                    if 'rank1_mb' in r else ''
                print(f"| {label} | {scale}x | {n:,} {UNIT[name]} | {r['s']:,.2f} | {r['peak_mb']:,.0f} | "
                      f"{r['size_mb']:,.1f}{rank1} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
