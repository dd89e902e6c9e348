"""Benchmark curate_images.py: the embedding pass against a bare decode + model loop, and the dedup pass
against a plain faiss search of the same vectors.

Embedding (`--what embed`): an MDS bucket of photo-like JPEGs whose shorter side is 256-511 px, as
laion_cloudwriter.py writes it. curate_images.py runs as a user runs it (one aesthetic head in LAION's
layout, one CLIP score); its rate is its own (rank 0's embedding pass: reading, decoding in DataLoader
workers, the model, the heads, the text tower and the part files, after the model has loaded). The
limit: the same images' bytes already in memory, decoded and preprocessed by a DataLoader with as many
workers, and get_image_features on each batch; nothing read, scored or written.

Dedup (`--what dedup`): random unit vectors (1M, `--big` 10M; 768 dims as CLIP ViT-L/14's) stored as
the embedding pass stores them (float16 part files, 1% planted near-copies), then the script's dedup
pass (k-means on the sample, nearest 2 centroids, within-cluster products, connected components), each in a
fresh process for its peak memory. The floor: faiss IndexIVFFlat with as many lists, trained on the
same sample, all vectors in memory, every vector searched in its 2 nearest lists for its 8 nearest.

Default (CPU: the tiny test bed CLIP, ~1 min; then 1M vectors, ~25 min and ~8 GB of memory for the
floor on 2 cores):
    .venv/bin/python benchmarks/bench_curate_images.py
    .venv/bin/python benchmarks/bench_curate_images.py --what dedup --rows 100000   (~2 min)
On a GPU host, CLIP ViT-L/14's sizes with random weights (no hub), bfloat16, batch 256 at 224 px:
    python benchmarks/bench_curate_images.py --what embed --full_size --device cuda --samples 4096
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))

from testbed.corpus import make_jpeg  # noqa: E402
from testbed.curate import build_clip, write_aesthetic_head  # noqa: E402
from testbed.mds_input import UNBUCKETED, make_row, write_mds_input  # noqa: E402
from testbed.scripts import load_script  # noqa: E402

VIT_L14 = {'vision': {'hidden_size': 1024, 'intermediate_size': 4096, 'num_hidden_layers': 24,
                      'num_attention_heads': 16, 'image_size': 224, 'patch_size': 14},
           'text': {'hidden_size': 768, 'intermediate_size': 3072, 'num_hidden_layers': 12,
                    'num_attention_heads': 12, 'max_position_embeddings': 77, 'vocab_size': 49408},
           'projection_dim': 768}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--what', choices=('embed', 'dedup', 'both'), default='both', help='which pass to measure')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu', help='where the model runs')
    p.add_argument('--full_size', action='store_true', help="CLIP ViT-L/14's sizes, random weights")
    p.add_argument('--samples', type=int, default=256, help='images in the embedding benchmark')
    p.add_argument('--batch_size', type=int, default=0, help='images per batch (0: 256 full size, else 64)')
    p.add_argument('--num_workers', type=int, default=2, help='decoding workers (both sides)')
    p.add_argument('--rows', type=int, default=1_000_000, help='vectors in the dedup benchmark')
    p.add_argument('--big', action='store_true', help='--rows 10,000,000')
    p.add_argument('--dim', type=int, default=768, help='vector size in the dedup benchmark')
    p.add_argument('--work_dir', default='', help='where inputs and outputs go (default: a temp dir)')
    return p.parse_args()


# ---- the embedding pass --------------------------------------------------------------------------

def build_full_size_clip(folder: Path) -> Path:
    """CLIPModel with ViT-L/14's sizes, random weights, saved with the test bed's processor and tokenizer."""
    import torch
    from testbed.models import write_clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=VIT_L14['text'], vision_config=VIT_L14['vision'],
                                 projection_dim=VIT_L14['projection_dim']))
    model.save_pretrained(folder)
    processor = CLIPImageProcessor(size={'shortest_edge': 224}, crop_size={'height': 224, 'width': 224})
    processor.save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def build_input(folder: Path, n: int) -> tuple[Path, list[bytes]]:
    rng = np.random.default_rng(0)
    rows, data = [], []
    for i in range(n):
        short = int(rng.integers(256, 512))
        long = int(short * rng.uniform(1.0, 4 / 3))
        w, h = (long, short) if i % 2 else (short, long)
        data.append(make_jpeg(w, h, seed=i, quality=90))
        rows.append(make_row(i, data[-1], f'bench_{i}.jpg'))
    write_mds_input(str(folder), rows, bucketed=False, size_limit=1 << 26)
    return folder, data


def run_script(model: Path, head: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    summary = out / 'summary.json'
    cmd = [sys.executable, str(ROOT / 'curate_images.py'), '--local', str(data), '--bucket', UNBUCKETED,
           '--remote_upload', str(out), '--model_name', str(model), '--device', args.device,
           '--heads', f'aesthetic={head}', '--caption_keys', 'caption',
           '--batch-size', str(args.batch_size), '--num_workers', str(args.num_workers),
           '--part_size', str(args.samples), '--summary', str(summary)]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'NO_ALBUMENTATIONS_UPDATE': '1'}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(summary.read_text())


class Decoded:
    """The limit's dataset: bytes in memory -> PIL decode -> the model's image processor."""

    def __init__(self, data: list[bytes], processor):
        self.data, self.processor = data, processor

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from PIL import Image
        img = Image.open(io.BytesIO(self.data[i])).convert('RGB')
        return self.processor(images=img, return_tensors='pt')['pixel_values'][0]


def bare_loop(model_dir: Path, data: list[bytes], args: argparse.Namespace) -> float:
    """images/s of decode + preprocess (DataLoader workers) + get_image_features, after the model loads."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == 'cuda' else torch.float32
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    loader = torch.utils.data.DataLoader(Decoded(data, AutoImageProcessor.from_pretrained(model_dir)),
                                         batch_size=args.batch_size, num_workers=args.num_workers)
    start = time.time()
    with torch.inference_mode():
        for px in loader:
            model.get_image_features(pixel_values=px.to(device, dtype)).float().cpu()
    return len(data) / (time.time() - start)


def bench_embed(args: argparse.Namespace, work: Path) -> None:
    args.batch_size = args.batch_size or (256 if args.full_size else 64)
    if args.full_size:
        model, dim, width = build_full_size_clip(work / 'vit-l14'), 768, 1024
        name = 'CLIP ViT-L/14 sizes (random)'
    else:
        model, dim, width, name = build_clip(work / 'tiny-clip'), 16, 16, 'tiny CLIP (test bed)'
    head = write_aesthetic_head(work / 'aesthetic.pth', dim, width)  # width 1024: LAION's published sizes
    data_dir, data = build_input(work / 'input', args.samples)
    ours = run_script(model, head, data_dir, work / 'out', args)['rank0']['images_per_s']
    limit = bare_loop(model, data, args)
    print(f'{args.samples} images of 256-511 px (shorter side), batch {args.batch_size}, '
          f'{args.num_workers} decoding workers, {args.device}, {name}')
    print(f'{"":38}{"images/s":>10}')
    print(f'{"curate_images.py embedding pass":38}{ours:>10.1f}')
    print(f'{"bare decode + get_image_features":38}{limit:>10.1f}')
    print(f'{"ratio (ours / bare)":38}{ours / limit:>10.2f}')


# ---- the dedup pass ------------------------------------------------------------------------------

PART_ROWS = 50_000


def write_parts(script, work: Path, rows: int, dim: int) -> tuple[list, int]:
    """Random unit vectors in the embedding pass's part files (1% near-copies of their neighbour)."""
    clusters = script.auto_clusters(rows)
    rate = min(1.0, clusters * script.SAMPLE_PER_CLUSTER / rows)
    rng = np.random.default_rng(0)
    parts = []
    for n, first in enumerate(range(0, rows, PART_ROWS)):
        last = min(rows, first + PART_ROWS)
        emb = rng.standard_normal((last - first, dim), np.float32)
        copy = rng.random(last - first) < 0.01
        copy[0] = False
        noise = 0.05 * rng.standard_normal((int(copy.sum()), dim), np.float32)
        emb[copy] = emb[np.flatnonzero(copy) - 1] + noise
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ids = np.arange(first, last, dtype=np.int64)
        part = script.Part(f'{n:05d}', (), first, last)
        folder = work / 'embed' / '_' / part.name
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / 'rows.npz', id=ids, key=np.array([f'{i:09d}' for i in ids]),
                 emb=emb.astype(np.float16),
                 sha=rng.integers(0, 2**62, len(ids)), dhash=rng.integers(0, 2**62, len(ids)),
                 area=np.full(len(ids), 65536))
        np.savez(folder / 'sample.npz', emb=emb[script.sampled(ids, rate)].astype(np.float16))
        parts.append(part)
    return parts, clusters


def ours(work: str, rows: int, dim: int, out) -> None:
    import argparse as ap
    script = load_script('curate_images.py')
    parts, clusters = write_parts(script, Path(work), rows, dim)
    bucket = script.Bucket('', None, [], {}, parts, 0)
    plan = script.Plan([bucket], work, os.path.join(work, 'staging'), [], {}, clusters, {})
    args = ap.Namespace(download_timeout=600, dedup_parts=16, dup_threshold=0.95)
    start = time.time()
    script.dedup_pass(args, plan, 0, 1, lambda: None)
    seconds = time.time() - start
    grouped = sum(len(np.load(f)['gid']) for f in Path(work, script.GROUPS).glob('*/*.npz'))
    out.send((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, f'{grouped:,} in groups'))


def floor(work: str, rows: int, dim: int, out) -> None:
    import faiss
    script = load_script('curate_images.py')
    parts, clusters = write_parts(script, Path(work), rows, dim)
    start = time.time()
    folders = [Path(work) / 'embed' / '_' / p.name for p in parts]
    x = np.concatenate([np.load(f / 'rows.npz')['emb'] for f in folders]).astype(np.float32)
    sample = np.concatenate([np.load(f / 'sample.npz')['emb'] for f in folders])
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, clusters, faiss.METRIC_INNER_PRODUCT)
    index.train(sample.astype(np.float32))
    index.add(x)
    index.nprobe = 2
    sims, _ = index.search(x, 8)
    seconds = time.time() - start
    out.send((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              f'{int((sims[:, 1] > 0.95).sum()):,} with a neighbour'))


def measured(fn, rows: int, dim: int) -> tuple[float, float, str]:
    """fn in a fresh process (its own peak memory), in a fresh folder; (seconds, peak GiB, note)."""
    ctx = mp.get_context('spawn')
    here, there = ctx.Pipe()
    with tempfile.TemporaryDirectory(prefix='bench-dedup-') as work:
        proc = ctx.Process(target=fn, args=(work, rows, dim, there))
        proc.start()
        result = here.recv()
        proc.join()
    return result


def bench_dedup(args: argparse.Namespace) -> None:
    rows = 10_000_000 if args.big else args.rows
    print(f'{rows:,} random unit vectors of {args.dim} dims (float16 parts of {PART_ROWS:,}), '
          f'1% near-copies, cosine > 0.95, {load_script("curate_images.py").auto_clusters(rows):,} clusters')
    print(f'{"":44}{"seconds":>10}{"peak GiB":>10}  found')
    for name, fn in (('curate_images.py dedup pass', ours), ('faiss IVFFlat, nprobe 2, k 8 (floor)', floor)):
        seconds, peak, note = measured(fn, rows, args.dim)
        print(f'{name:44}{seconds:>10.1f}{peak:>10.2f}  {note}')


def main() -> None:
    args = parse_args()
    if args.device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            print('error: --device cuda: no GPU is visible to torch; run on a GPU host or leave --device out',
                  file=sys.stderr)
            sys.exit(2)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix='bench-curate-'))
    if args.what in ('embed', 'both'):
        bench_embed(args, work)
    if args.what in ('dedup', 'both'):
        bench_dedup(args)


if __name__ == '__main__':
    main()
