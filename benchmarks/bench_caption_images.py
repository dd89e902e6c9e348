"""Benchmark caption_images.py: images/s and generated tokens/s, end to end.

Input: an MDS dataset of photo-like JPEGs whose shorter side is 256-511 px (the '256-512' bucket),
as laion_cloudwriter.py would write it. Each run is caption_images.py as a user runs it; the rates
are the script's own (all ranks, from its summary JSON: reading, decoding, generating and writing, after
the model has loaded).

--engine transformers (default; CPU, the test bed's tiny LLaVA, Qwen2-VL and Idefics3, ~1 min):
    .venv/bin/python benchmarks/bench_caption_images.py
On a GPU host, a randomly initialised model of Qwen2-VL-2B's sizes (its config written out in
tests/testbed/vlms.py, no hub) in bfloat16, every caption exactly --max_new_tokens long:
    python benchmarks/bench_caption_images.py --device cuda --full_size --samples 512 \\
        --batch_size 32 --max_new_tokens 128

--engine openai: caption_images.py --engine openai against a server, beside the floor: a bare client loop
(httpx, asyncio) that sends the same requests (the same PNG bodies, built up front) with the same number
in flight, and a loop that waits for each batch of that many before it sends the next (what a client
that works batch by batch gets). Without --endpoint the server is the test bed's stand-in for a batching
engine (tests/testbed/openai_server.py, BatchingServer: 16..48 decode steps per request, --step s each,
256 requests per step): its throughput grows with the requests in flight, and it needs little CPU, so
the ratio measures the client. With a GPU, a real engine (one `vllm serve` per GPU):
    vllm serve Qwen/Qwen2-VL-2B-Instruct --port 8000 --max-model-len 4096 --generation-config vllm &
    python benchmarks/bench_caption_images.py --engine openai --endpoint http://127.0.0.1:8000/v1 \\
        --samples 2048 --concurrency 128 --max_new_tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))

from testbed.corpus import make_jpeg  # noqa: E402
from testbed.mds_input import UNBUCKETED, make_row, write_mds_input  # noqa: E402
from testbed.openai_server import free_port  # noqa: E402
from testbed.scripts import load_script  # noqa: E402
from testbed.vlms import KINDS, build_qwen2_vl, build_vlm  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--engine', choices=('transformers', 'openai'), default='transformers', help='to time')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu', help='transformers: where it runs')
    p.add_argument('--full_size', action='store_true',
                   help="transformers: a random model of Qwen2-VL-2B's sizes (else the tiny test bed models)")
    p.add_argument('--samples', type=int, default=0, help='images in the dataset (0: 48, openai 768)')
    p.add_argument('--batch_size', type=int, default=8, help='images per generate call, or per read')
    p.add_argument('--max_new_tokens', type=int, default=32, help='generated tokens per caption (at most)')
    p.add_argument('--endpoint', nargs='*', default=[], help='openai: the server(s); none: the stand-in')
    p.add_argument('--model_name', default='', help='openai: the served model (empty: the one listed)')
    p.add_argument('--concurrency', type=int, default=32, help='openai: requests in flight')
    p.add_argument('--step', type=float, default=0.05, help="openai: the stand-in's seconds per decode step")
    p.add_argument('--work_dir', default='', help='where inputs and outputs go (default: a temp dir)')
    args = p.parse_args()
    args.samples = args.samples or (768 if args.engine == 'openai' else 48)
    return args


def build_input(folder: Path, n: int) -> tuple[Path, list[dict]]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        short = int(rng.integers(256, 512))
        long = int(short * rng.uniform(1.0, 4 / 3))
        w, h = (long, short) if i % 2 else (short, long)
        rows.append(make_row(i, make_jpeg(w, h, seed=i, quality=90), f'bench_{i}.jpg'))
    write_mds_input(str(folder), rows, bucketed=False, size_limit=1 << 26)
    return folder, rows


def run(data: Path, out: Path, *flags) -> dict:
    """caption_images.py on `data` with `flags`; its summary."""
    summary = out / 'summary.json'
    cmd = [sys.executable, str(ROOT / 'caption_images.py'), '--local', str(data), '--bucket', UNBUCKETED,
           '--remote_upload', str(out), '--summary', str(summary), *map(str, flags)]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'NO_ALBUMENTATIONS_UPDATE': '1'}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def bench_transformers(args: argparse.Namespace, work: Path, data: Path) -> None:
    if args.full_size:
        models = {'qwen2-vl-2b sizes (random)': build_qwen2_vl(work / 'qwen2-vl-2b', full_size=True)}
    else:
        models = {f'tiny {kind}': build_vlm(kind, work / kind) for kind in KINDS}
    print(f'{args.samples} images of 256-511 px (shorter side), batch {args.batch_size}, at most '
          f'{args.max_new_tokens} new tokens, device {args.device}')
    print(f'{"model":<28} {"images/s":>9} {"tokens/s":>9} {"tokens/caption":>15} {"dtype":>9} '
          f'{"attention":>18}')
    for name, folder in models.items():
        s = run(data, work / f'out-{folder.name}', '--model_name', folder, '--device', args.device,
                '--batch-size', args.batch_size, '--max_new_tokens', args.max_new_tokens,
                '--part_size', args.samples)
        speed, settings = s['speed'], s['settings']
        print(f'{name:<28} {speed["images_per_s"]:>9.2f} {speed["tokens_per_s"]:>9.1f} '
              f'{s["tokens"] / max(s["written"], 1):>15.1f} {settings["dtype"]:>9} '
              f'{settings["attention"]:>18}')


async def bare_loop(urls: list[str], bodies: list[bytes], concurrency: int, batchwise: bool) -> float:
    """images/s of a client that only sends the prepared bodies, `concurrency` in flight (or batch by
    batch of that many), round-robin over the endpoints."""
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int, body: bytes) -> None:
            async with slots:
                r = await client.post(f'{urls[i % len(urls)]}/chat/completions', content=body,
                                      headers={'content-type': 'application/json'})
                r.raise_for_status()

        start = time.time()
        groups = [bodies[i:i + concurrency] for i in range(0, len(bodies), concurrency)] if batchwise \
            else [bodies]
        for k, group in enumerate(groups):
            await asyncio.gather(*(one(k * concurrency + i, b) for i, b in enumerate(group)))
        return len(bodies) / (time.time() - start)


def bench_openai(args: argparse.Namespace, work: Path, data: Path, rows: list[dict]) -> None:
    import httpx

    urls, server = args.endpoint, None
    if not urls:
        port = free_port()
        stand_in = ROOT / 'tests' / 'testbed' / 'openai_server.py'
        server = subprocess.Popen([sys.executable, str(stand_in), str(port), str(args.step)])
        urls = [f'http://127.0.0.1:{port}/v1']
        for _ in range(300):
            try:
                httpx.get(f'{urls[0]}/models', timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
    try:
        script = load_script('caption_images.py')
        model = args.model_name or httpx.get(f'{urls[0]}/models', timeout=30).json()['data'][0]['id']
        png, bodies = script.parse_args(['--remote_upload', 'x']), []
        for row in rows:  # the requests caption_images.py sends: a PNG of the decoded picture, the prompt
            url = script.data_url(script.decode(row['jpg']), png)
            image = {'type': 'image_url', 'image_url': {'url': url}}
            turn = {'role': 'user', 'content': [image, {'type': 'text', 'text': script.DEFAULT_PROMPT}]}
            bodies.append(json.dumps({'model': model, 'max_tokens': args.max_new_tokens, 'temperature': 0,
                                      'messages': [turn]}).encode())
        floor = asyncio.run(bare_loop(urls, bodies, args.concurrency, batchwise=False))
        batchwise = asyncio.run(bare_loop(urls, bodies, args.concurrency, batchwise=True))
        s = run(data, work / 'out-openai', '--engine', 'openai', '--endpoint', *urls, '--model_name', model,
                '--concurrency', args.concurrency, '--batch-size', args.batch_size, '--max_new_tokens',
                args.max_new_tokens, '--part_size', max(args.samples // 4, 1))
    finally:
        if server:
            server.terminate()
            server.wait(30)
    ours = s['speed']['images_per_s']
    where = ', '.join(urls) if args.endpoint else f'the stand-in batching server ({args.step} s per step)'
    print(f'{args.samples} images of 256-511 px, {args.concurrency} requests in flight, {where}')
    print(f'{"client":<48} {"images/s":>9} {"x floor":>8}')
    for name, rate in ((f'bare loop, {args.concurrency} in flight (the floor)', floor),
                       (f'bare loop, batch by batch of {args.concurrency}', batchwise),
                       (f'caption_images.py --concurrency {args.concurrency}', ours)):
        print(f'{name:<48} {rate:>9.2f} {rate / floor:>8.2f}')


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix='bench-captions-'))
    data, rows = build_input(work / 'input', args.samples)
    if args.engine == 'openai':
        bench_openai(args, work, data, rows)
    else:
        bench_transformers(args, work, data)


if __name__ == '__main__':
    main()
