"""Benchmark caption_images.py: images/s and generated tokens/s, end to end, per model.

Input: an MDS dataset of photo-like JPEGs whose shorter side is 256-511 px (the '256-512' bucket),
as laion_cloudwriter.py would write it. Each model runs caption_images.py as a user runs it; the rates
are the script's own (rank 0, from its summary JSON: reading, decoding, generating and writing, after
the model has loaded).

Default (CPU, the test bed's tiny LLaVA and Qwen2-VL, ~1 min):
    .venv/bin/python benchmarks/bench_caption_images.py
On a GPU host, a randomly initialised model of Qwen2-VL-2B's sizes (its config written out in
tests/testbed/vlms.py, no hub) in bfloat16, every caption exactly --max_new_tokens long:
    python benchmarks/bench_caption_images.py --device cuda --full_size --samples 512 \\
        --batch_size 32 --max_new_tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))

from testbed.corpus import make_jpeg  # noqa: E402
from testbed.mds_input import UNBUCKETED, make_row, write_mds_input  # noqa: E402
from testbed.vlms import KINDS, build_qwen2_vl, build_vlm  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu', help='where the model runs')
    p.add_argument('--full_size', action='store_true',
                   help="a random model of Qwen2-VL-2B's sizes (else the tiny test bed models)")
    p.add_argument('--samples', type=int, default=48, help='images in the dataset')
    p.add_argument('--batch_size', type=int, default=8, help='images per generate call')
    p.add_argument('--max_new_tokens', type=int, default=32, help='generated tokens per caption (at most)')
    p.add_argument('--work_dir', default='', help='where inputs and outputs go (default: a temp dir)')
    return p.parse_args()


def build_input(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        short = int(rng.integers(256, 512))
        long = int(short * rng.uniform(1.0, 4 / 3))
        w, h = (long, short) if i % 2 else (short, long)
        rows.append(make_row(i, make_jpeg(w, h, seed=i, quality=90), f'bench_{i}.jpg'))
    write_mds_input(str(folder), rows, bucketed=False, size_limit=1 << 26)
    return folder


def run(model: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """caption_images.py on `data` with `model`; its summary."""
    summary = out / 'summary.json'
    cmd = [sys.executable, str(ROOT / 'caption_images.py'), '--local', str(data), '--bucket', UNBUCKETED,
           '--remote_upload', str(out), '--model_name', str(model), '--device', args.device,
           '--batch-size', str(args.batch_size), '--max_new_tokens', str(args.max_new_tokens),
           '--part_size', str(args.samples), '--summary', str(summary)]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'NO_ALBUMENTATIONS_UPDATE': '1'}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix='bench-captions-'))
    data = build_input(work / 'input', args.samples)
    if args.full_size:
        models = {'qwen2-vl-2b sizes (random)': build_qwen2_vl(work / 'qwen2-vl-2b', full_size=True)}
    else:
        models = {f'tiny {kind}': build_vlm(kind, work / kind) for kind in KINDS}
    print(f'{args.samples} images of 256-511 px (shorter side), batch {args.batch_size}, at most '
          f'{args.max_new_tokens} new tokens, device {args.device}')
    print(f'{"model":<28} {"images/s":>9} {"tokens/s":>9} {"tokens/caption":>15} {"dtype":>9} '
          f'{"attention":>18}')
    for name, folder in models.items():
        s = run(folder, data, work / f'out-{folder.name}', args)
        speed, settings = s['rank0'], s['settings']
        print(f'{name:<28} {speed["images_per_s"]:>9.2f} {speed["tokens_per_s"]:>9.1f} '
              f'{s["tokens"] / max(s["written"], 1):>15.1f} {settings["dtype"]:>9} '
              f'{settings["attention"]:>18}')


if __name__ == '__main__':
    main()
