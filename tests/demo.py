"""`make demo`: the whole pipeline on a small offline sample, run exactly as a user runs it.

1. Generates a few hundred images of many sizes, serves them from an HTTP server on 127.0.0.1 and
   writes LAION-2B-en-shaped metadata pointing at it.
2. laion_download_all.sh downloads them with img2dataset into parquet shards.
3. laion_cloudwriter.py converts the shards to resolution-bucketed MDS datasets, with a contact
   sheet of PREVIEW samples per bucket (--preview).
4. curate_images.py reads every bucket, adds an aesthetic score (a head in LAION's layout), a CLIP score
   of the alt-text and the duplicate columns, and drops duplicates (`--filter 'dup_keep = 1'`): the
   planted copy, and the metadata's redirect row (the first image again); its preview shows them. The
   tiny random CLIP cannot tell pictures apart, so the demo's cosine threshold is 1 (off) and copies
   are found by their bytes; a real CLIP at 0.95 also finds re-encoded, resized and cropped copies.
5. caption_images.py writes a `vlm_caption` column beside the alt-text of one curated bucket (a tiny
   random LLaVA, CPU: its captions are noise; a real model's are dense descriptions).
6. precompute_latents.py attaches VAE latents and the CLIP latents of both captions (`--caption_keys
   caption vlm_caption`) to that captioned bucket (a tiny SD-2-shaped model).
7. convert_coco.py converts a small COCO-shaped sample.
Then it reads every output back with StreamingDataset and prints one table.

Usage: .venv/bin/python tests/demo.py [--out demo-output] [--images 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testbed.coco import write_coco_sample  # noqa: E402
from testbed.corpus import BUCKET_EDGES, CorpusItem, make_jpeg  # noqa: E402
from testbed.curate import build_clip, write_aesthetic_head  # noqa: E402
from testbed.http_server import ImageServer  # noqa: E402
from testbed.laion_meta import entries_for, write_metadata  # noqa: E402
from testbed.models import build_tiny_sd  # noqa: E402
from testbed.readback import read_mds  # noqa: E402
from testbed.scripts import run_script  # noqa: E402
from testbed.vlms import build_vlm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LATENT_BUCKET = 3  # index of 256-512 in BUCKET_EDGES: the bucket the demo captions and attaches latents to
RESOLUTION = 256  # the one latent resolution: 512 would be b'' for every sample of 256-512
CAPTIONS_SHOWN = 3  # new captions printed in the table
PLANTED = 'demo_copy.jpg'  # the planted duplicate
PREVIEW = 6  # samples per bucket on the cloudwriter's contact sheets (3 x 2; the PNG stays < 200 KB)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=str(ROOT / 'demo-output'), help='Folder for every output (wiped).')
    p.add_argument('--images', type=int, default=300, help='How many images the sample holds.')
    p.add_argument('--coco_images', type=int, default=40, help='Images in the COCO-shaped sample.')
    return p.parse_args(argv)


def sample_images(n: int, seed: int = 0) -> list[CorpusItem]:
    """n JPEGs whose shorter sides spread over the buckets up to 768 px (small, so the demo is fast), and
    last a copy of the first 256-512 one under another name (the same bytes at another URL)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        short = int(rng.choice([48, 96, 180, 300, 520]))  # one size per bucket up to 768
        long = int(short * rng.uniform(1.0, 1.6))
        w, h = (long, short) if i % 2 else (short, long)
        items.append(CorpusItem(f'demo_{i:05d}.jpg', make_jpeg(w, h, seed=i, quality=85), w, h))
    original = next(it for it in items if 256 <= min(it.width, it.height) < 512)
    return items + [CorpusItem(PLANTED, original.data, original.width, original.height)]


def run(step: str, cmd: list[str], env: dict[str, str], timings: dict[str, float],
        in_process: bool = False) -> None:
    """Run one pipeline step as a user would; stop the demo if it fails. `in_process` (the test's): a
    Python step runs in this process as its own would (testbed.scripts.run_script), without the
    interpreter and library start-up."""
    print(f'\n=== {step}: {" ".join(cmd)}', flush=True)
    t = time.time()
    if in_process and cmd[0] == sys.executable:
        done = run_script(cmd[1], *cmd[2:], env=env, cwd=ROOT)
        print(done.stdout + done.stderr, end='', flush=True)
        done.check_returncode()
    else:
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    timings[step] = time.time() - t


def main(argv: list[str] | None = None, in_process: bool = False) -> dict:
    """The demo on this command line; `in_process` runs its Python steps in this process (see run)."""
    args = parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, 'PATH': f'{bindir}:{os.environ["PATH"]}', 'NO_ALBUMENTATIONS_UPDATE': '1',
           'HF_HUB_OFFLINE': '1', 'WANDB_MODE': 'disabled'}
    timings: dict[str, float] = {}
    py = sys.executable

    items = sample_images(args.images)
    model = build_tiny_sd(out / 'tiny-sd')
    vlm = build_vlm('llava', out / 'tiny-llava')
    clip = build_clip(out / 'tiny-clip')
    head = write_aesthetic_head(out / 'aesthetic.pth', 16)
    coco_data, coco_ann = write_coco_sample(out / 'coco', args.coco_images, seed=0)
    with ImageServer(items) as server:
        write_metadata(out / 'metadata', entries_for(server, items), 'full', files=2)
        run('download', ['bash', 'laion_download_all.sh'],
            {**env, 'URL_LIST': str(out / 'metadata'), 'OUTPUT_FOLDER': str(out / 'parquet'),
             'PROCESSES_COUNT': '1', 'THREAD_COUNT': '16', 'NUMBER_SAMPLE_PER_SHARD': '100'},
            timings, in_process)
    run('cloudwriter', [py, 'laion_cloudwriter.py', '--local', str(out / 'parquet'),
                        '--remote', str(out / 'mds'), '--bucketed', '--keep_parquet',
                        '--poll_interval', '1', '--preview', str(PREVIEW)], env, timings, in_process)
    bucket = f'{BUCKET_EDGES[LATENT_BUCKET]}-{BUCKET_EDGES[LATENT_BUCKET + 1]}'
    run('curate', [py, 'curate_images.py', '--remote_download', str(out / 'mds'), '--bucket', 'all',
                   '--remote_upload', str(out / 'curated'), '--local', str(out / 'curate-cache'),
                   '--model_name', str(clip), '--heads', f'aesthetic={head}', '--caption_keys', 'caption',
                   '--dup_threshold', '1', '--filter', 'dup_keep = 1', '--num_workers', '0',
                   '--batch-size', '32', '--preview', '1'], env, timings, in_process)
    run('captions', [py, 'caption_images.py', '--remote_download', str(out / 'curated'),
                     '--remote_upload', str(out / 'captioned'), '--local', str(out / 'captions-cache'),
                     '--bucket', str(LATENT_BUCKET), '--model_name', str(vlm), '--batch-size', '16',
                     '--max_new_tokens', '12', '--preview', '3'], env, timings, in_process)
    run('latents', [py, 'precompute_latents.py', '--remote_download', str(out / 'captioned'),
                    '--remote_upload', str(out / 'latents'), '--local', str(out / 'latents-cache'),
                    '--bucket', str(LATENT_BUCKET), '--model_name', str(model), '--batch-size', '16',
                    '--resolutions', str(RESOLUTION), '--caption_keys', 'caption', 'vlm_caption',
                    '--num_workers', '1', '--preview', '3'], env, timings, in_process)
    run('coco', [py, 'convert_coco.py', '--data_path', str(coco_data), '--annotation_path',
                 str(coco_ann), '--remote', str(out / 'coco-mds'), '--num_samples', '0'],
        env, timings, in_process)
    return report(out, bucket, timings, args.images)


def report(out: Path, latent_bucket: str, timings: dict[str, float], n_images: int) -> dict:
    """Read every output back with StreamingDataset and print one table."""
    counts = {}
    for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:]):
        if (out / 'mds' / f'{lo}-{hi}' / 'index.json').exists():
            counts[f'{lo}-{hi}'] = len(read_mds(str(out / 'mds' / f'{lo}-{hi}')))
    latents = read_mds(str(out / 'latents' / latent_bucket))
    captioned = read_mds(str(out / 'captioned' / latent_bucket))
    side = RESOLUTION // 8
    encoded = [np.frombuffer(s[f'latents_{RESOLUTION}'], np.float16).reshape(4, side, side) for s in latents]
    text_latents = {key: [np.frombuffer(s[f'{key}_latents'], np.float16).reshape(77, -1) for s in latents]
                    for key in ('caption', 'vlm_caption')}

    coco = read_mds(str(out / 'coco-mds'))
    curated = json.loads((out / 'curate-cache' / 'curate_summary.json').read_text())
    rows = [('metadata rows (images + 404 + 500 + redirect)', str(n_images + 3))]
    rows += [(f'bucket {name}', f'{n} samples') for name, n in counts.items()]
    rows += [('samples in all buckets', str(sum(counts.values())))]
    rows += [('curated: duplicates found / dropped', f'{curated["in_groups"]} / '
              f'{curated["in_groups"] - curated["kept_of_groups"]} (--filter dup_keep = 1)')]
    rows += [('curated: rows written', str(curated['written']))]
    rows += [('curate preview', curated['preview']['path'])]
    rows += [(f'captions {latent_bucket}: vlm_caption', f'{len(captioned)} samples (a tiny random model: '
              'the captions are noise)')]
    rows += [(f'  {s["key"]} {s["caption"][:30]!r} ->', repr(s['vlm_caption'][:60]))
             for s in captioned[:CAPTIONS_SHOWN]]
    caption_preview = out / 'captions-cache' / f'captions_summary_{latent_bucket}_preview.png'
    rows += [('captions preview', str(caption_preview))]
    rows += [(f'latents {latent_bucket}: {key}_latents', f'{len(t)} x {t[0].shape} fp16' if t else '0')
             for key, t in text_latents.items()]
    rows += [(f'latents {latent_bucket}: latents_{RESOLUTION}', f'{len(encoded)} x {encoded[0].shape} fp16'
              if encoded else '0')]
    rows += [('latents preview', str(out / 'latents-cache' / f'latents_summary_{latent_bucket}_preview.png'))]
    rows += [('coco samples', f'{len(coco)} ({sum(len(s["captions"]) for s in coco)} captions)')]
    summary = json.loads((out / 'parquet' / '_cloudwriter' / 'summary.json').read_text())
    previews = {bucket: p['png'] for bucket, p in summary['preview'].items()}
    rows += [(f'preview {bucket}', png) for bucket, png in previews.items()]
    rows += [(f'seconds: {step}', f'{t:.1f}') for step, t in timings.items()]
    width = max(len(k) for k, _ in rows)
    print('\n' + '=' * (width + 30))
    for k, v in rows:
        print(f'{k:<{width}}  {v}')
    print('=' * (width + 30))
    return {'buckets': counts, 'latents': len(latents), 'captions': [s['vlm_caption'] for s in captioned],
            'latents_keys': [s['key'] for s in latents], 'captioned_keys': [s['key'] for s in captioned],
            'latents_have_vlm_caption': all('vlm_caption' in s for s in latents),
            'vlm_caption_latents': len(text_latents['vlm_caption']),
            'coco': len(coco), 'previews': previews, 'curated': curated,
            'timings': timings}


if __name__ == '__main__':
    main()
