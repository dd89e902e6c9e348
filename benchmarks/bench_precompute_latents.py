"""Benchmark precompute_latents.py: loader alone, model alone, end to end, and the loader per core.

Input: an MDS dataset of photo-like JPEGs (testbed.corpus.make_jpeg) of 300-900 px, quality tuned to
~100 KB each, as laion_cloudwriter.py would write it. Measured in one run, samples/s:

- loader per core: one process, one thread, over the same JPEGs: the script's decode (once per sample,
  every resolution from that decode) beside the published preprocessing (decode once per resolution,
  resize + center crop + ToTensor + Normalize to 256 and 512 for every image); goal >= 1.5x; and the
  script's --crop aspect preprocessing (nearest bucket, resize to cover, crop) beside center; goal >= 0.9x;
- loader alone: the script's DataLoader (read MDS, decode, tokenize) with --workers workers, no model;
- model alone: the script's encode step on batches the loader made beforehand (held in memory);
- end to end: the script run as a user runs it (its rate excludes start-up); goal >= 0.9 x the slower
  of loader alone and model alone.

Default (CPU, the test bed's tiny model, ~2-3 min):
    .venv/bin/python benchmarks/bench_precompute_latents.py
On a GPU host, full-size randomly initialised SD-2 VAE + ViT-H text encoder in fp16, with MFU:
    python benchmarks/bench_precompute_latents.py --device cuda --full_size --bucket 256-512 \\
        --samples 20000 --batch_size 128 --workers 15
    python benchmarks/bench_precompute_latents.py --device cuda --full_size --bucket 512+ ...
Per VAE (--vaes: FLUX.2, Qwen-Image, SANA's DC-AE through --vae beside the SD-2 text side; samples/s,
bytes/sample, FLOPs, MFU and the VAE's peak GPU memory per batch), on a GPU at the published sizes:
    python benchmarks/bench_precompute_latents.py --device cuda --full_size --vaes --bucket 1024+ \
        --resolutions 512 1024 --samples 2048 --batch_size 32 --workers 15
Per language-model family (the script's encode step in this process over batches its loader made, one
resolution at a time: samples/s and peak GPU memory; --full_size builds the text encoder at its published
config's sizes with random weights directly on the GPU in bfloat16, e.g. FLUX.2's 23.3 B-parameter
Mistral backbone, 47 GB, and never on the CPU):
    python benchmarks/bench_precompute_latents.py --device cuda --full_size --family flux2 --bucket 1024+ \
        --resolutions 512 1024 --samples 128 --batch_size 32
    .venv/bin/python benchmarks/bench_precompute_latents.py --family zimage --samples 8 --distinct 8 \
        --per_core_images 8 --batch_size 4 --min_seconds 1       # tiny, on the CPU: the code path
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
sys.path.insert(0, str(ROOT))

from llm_family_sizes import LLMS, VISION  # noqa: E402
from testbed.corpus import make_jpeg  # noqa: E402
from testbed.families import FULL, VAES, build_tiny_family, write_vae  # noqa: E402
from testbed.llm_families import OWN_VAES, build_llm_family  # noqa: E402
from testbed.mds_input import UNBUCKETED, make_row, write_mds_input  # noqa: E402
from testbed.models import build_tiny_sd, write_clip_tokenizer  # noqa: E402
from testbed.vae_families import build_vae  # noqa: E402

import precompute_latents as pl  # noqa: E402

SD = pl.FAMILIES['sd']
LLM_FAMILIES = ('zimage', 'lumina2', 'chroma', 'qwenimage', 'sana', 'flux2')

# Shorter-side ranges of the generated images per --bucket (the longer side is up to 4/3 of it).
SIDES = {'mixed': (300, 900), '256-512': (256, 511), '512+': (512, 900), '1024+': (1024, 1300)}
# Dense fp16/bf16 tensor-core peak, FLOP/s, for the MFU column.
PEAK = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10': 125e12}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu', help='where the models run')
    p.add_argument('--full_size', action='store_true',
                   help='randomly initialised full-size SD-2 VAE + ViT-H text encoder (else the tiny one)')
    p.add_argument('--bucket', choices=tuple(SIDES), default='mixed',
                   help="image sizes: 'mixed' 300-900 px, '256-512' (256 px latents only), '512+' (both)")
    p.add_argument('--samples', type=int, default=32, help='samples in the dataset for loader/model/e2e')
    p.add_argument('--distinct', type=int, default=32, help='distinct JPEGs (the dataset repeats them)')
    p.add_argument('--per_core_images', type=int, default=60, help='JPEGs for the per-core comparison')
    p.add_argument('--target_kb', type=float, default=100, help='mean JPEG size to tune quality for')
    p.add_argument('--batch_size', type=int, default=8, help='samples per batch')
    p.add_argument('--workers', type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help='DataLoader workers for loader alone and end to end')
    p.add_argument('--resolutions', type=int, nargs='+', default=[256, 512], help='resolutions')
    p.add_argument('--min_seconds', type=float, default=5.0, help='per measurement of the encode step')
    p.add_argument('--peak_tflops', type=float, default=0, help='peak for MFU; 0: from the GPU name')
    p.add_argument('--work_dir', default='', help='where inputs and outputs go (default: a temp dir)')
    p.add_argument('--families', '--family', nargs='*', default=None,
                   help="per family instead of the SD-2 breakdown: e.g. 'sd sdxl sd3 flux mosaicml' end "
                        "to end, or none listed for all; a language-model family (zimage, lumina2, chroma, "
                        "qwenimage, sana, flux2) runs the script's encode step in this process per "
                        "resolution (--full_size: its published sizes, random weights built on the device)")
    p.add_argument('--vaes', nargs='*', default=None, choices=('flux2', 'qwenimage', 'sana'),
                   help='per VAE end to end through --vae (beside the SD-2 text side) instead of the SD-2 '
                        'breakdown: flux2, qwenimage, sana, or none listed for all')
    return p.parse_args()


# ---- input -------------------------------------------------------------------------------------

def image_sizes(n: int, bucket: str, seed: int = 0) -> list[tuple[int, int]]:
    lo, hi = SIDES[bucket]
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(n):
        short = int(rng.integers(lo, hi + 1))
        long = int(short * rng.uniform(1.0, 4 / 3))
        sizes.append((long, short) if rng.random() < 0.5 else (short, long))
    return sizes


def tuned_quality(sizes: list[tuple[int, int]], target_kb: float) -> int:
    """The JPEG quality whose mean size over a few of `sizes` is closest to target_kb."""
    probe = sizes[:8]
    best = (float('inf'), 90)
    for q in (97, 95, 92, 90, 87, 85, 80, 75, 70, 60, 50):
        kb = np.mean([len(make_jpeg(w, h, seed=i, quality=q)) for i, (w, h) in enumerate(probe)]) / 1e3
        best = min(best, (abs(kb - target_kb), q))
    return best[1]


def make_images(n: int, bucket: str, target_kb: float) -> list[bytes]:
    sizes = image_sizes(n, bucket)
    q = tuned_quality(sizes, target_kb)
    return [make_jpeg(w, h, seed=i, quality=q) for i, (w, h) in enumerate(sizes)]


def build_input(folder: Path, images: list[bytes], samples: int) -> Path:
    rows = [make_row(i, images[i % len(images)], f'bench_{i}.jpg',
                     caption=f'a photo-like picture number {i} of smooth colours and some noise')
            for i in range(samples)]
    write_mds_input(str(folder), rows, bucketed=False, size_limit=1 << 27)
    return folder


# ---- models ------------------------------------------------------------------------------------

def build_full_size_sd2(folder: Path) -> Path:
    """SD-2's VAE and OpenCLIP ViT-H text encoder configs, randomly initialised, saved in fp16."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=768,
                        down_block_types=('DownEncoderBlock2D',) * 4,
                        up_block_types=('UpDecoderBlock2D',) * 4, scaling_factor=0.18215)
    vae.half().save_pretrained(folder / 'vae')
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act='gelu',
                         projection_dim=1024, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    CLIPTextModel(cfg).half().save_pretrained(folder / 'text_encoder')
    write_clip_tokenizer(folder / 'tokenizer')
    return folder


def forward_flops(text_calls, vae, device: torch.device, dtype: torch.dtype,
                  shares: dict[int, float], frames: bool = False) -> float:
    """Forward FLOPs per sample: each (text encoder, token length) in `text_calls`, plus the VAE encoder
    at each resolution weighted by the share of samples whose shorter side reaches it (torch's FLOP
    counter, batch of 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    def counted(fn, x: torch.Tensor) -> float:
        with FlopCounterMode(display=False) as counter:
            fn(x)
        return counter.get_total_flops()

    with torch.inference_mode():
        total = sum(counted(enc, torch.zeros(1, n, dtype=torch.long, device=device)) for enc, n in text_calls)
        total += sum(share * counted(vae.encode, torch.zeros(1, 3, *[1] * frames, res, res, device=device,
                                                             dtype=dtype))
                     for res, share in shares.items() if share)
    return total


def flops_per_sample(vae, text_encoder, device: torch.device, dtype: torch.dtype,
                     shares: dict[int, float]) -> float:
    """Forward FLOPs per sample of SD-2: the text encoder at 77 tokens and the VAE encoder."""
    return forward_flops([(text_encoder, 77)], vae, device, dtype, shares)


# ---- measurements ------------------------------------------------------------------------------

def published_preprocess(data: bytes) -> list[torch.Tensor]:
    """What the published script does per sample: one decode per resolution, resize + crop each."""
    from PIL import Image
    from torchvision import transforms

    out = []
    for res in (256, 512):
        img = Image.open(io.BytesIO(data))
        if img.mode != 'RGB':
            img = img.convert('RGB')
        img = transforms.functional.resize(img, res, antialias=True)
        img = transforms.functional.center_crop(img, res)
        out.append(transforms.functional.normalize(transforms.functional.to_tensor(img), [0.5] * 3,
                                                   [0.5] * 3))
    return out


def published_item(reader: pl.BatchReader, sample_id: int) -> None:
    """The published dataset's __getitem__: read the sample, tokenize its caption alone, preprocess."""
    sample = reader.cache.get(sample_id)
    tokenizer = reader.tokenizers[0]
    torch.tensor(tokenizer(sample['caption'], padding='max_length', truncation=True,
                           max_length=tokenizer.model_max_length)['input_ids'])
    published_preprocess(sample['jpg'])


CENTER = pl.make_crop('center', [256, 512], 64, 4.0, False)
ASPECT = pl.make_crop('aspect', [256, 512], 64, 4.0, False)


def ours_preprocess(data: bytes, crop: pl.CenterCrop = CENTER) -> list[np.ndarray]:
    """Decode once, place each resolution's crop (its centred square or nearest bucket), resize it once."""
    img, _, placed = crop.decode(data, dict.fromkeys(crop.tables))
    return [p.pixels(img) for p in placed.values()]


def interleaved_rates(fns: dict, items: list, count, rounds: int = 2) -> dict[str, float]:
    """samples/s of each fn over `items`, one thread, the fns taking turns item by item so that
    load from other processes hits all of them alike. `count(item)` is the samples in an item."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for fn in fns.values():  # warm-up: imports, caches
        fn(items[0])
    spent = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for item in items:
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(item)
                spent[name] += time.perf_counter() - t
    torch.set_num_threads(threads)
    n = rounds * sum(count(item) for item in items)
    return {name: n / spent[name] for name in fns}


def make_reader(mds: Path, model: Path, args, vae, mode: str = 'center') -> pl.BatchReader:
    shards = pl.read_input_index(str(mds), str(mds), 60)
    parts = pl.plan_parts(shards, 10**9)
    cache = pl.ShardCache(pl.numbered(parts, shards), None, str(mds), 60, 1)
    tokenizers = pl.load_tokenizers(str(model), SD)
    crop = pl.make_crop(mode, args.resolutions, 64, 4.0, False)
    latent_shape = (vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1))
    return pl.BatchReader(pl.make_jobs(parts, args.batch_size), cache, tokenizers,
                          pl.token_lengths(SD, tokenizers, 0), crop, latent_shape, 'sample', 0, 0.0,
                          encoders=SD.encoders)


def loader_alone(reader: pl.BatchReader, workers: int, keep: int = 64) -> tuple[float, list[dict]]:
    """samples/s of the script's DataLoader over the whole input; returns the first `keep` batches."""
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers,
                                         collate_fn=pl.no_collate, prefetch_factor=4 if workers else None)
    t = time.perf_counter()
    it = iter(loader)
    batches = [next(it)]  # worker start-up is not the loader's rate: time from the first batch on
    t1, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch['samples'])
        if len(batches) < keep:
            batches.append(batch)
    rate = n / (time.perf_counter() - t1) if n else len(batches[0]['samples']) / (t1 - t)
    return rate, batches


def model_alone(batches: list[dict], vae, te, device, dtype, resolutions, model: Path,
                min_seconds: float = 5.0) -> float:
    """Encode pre-made batches (pinned on a GPU) until min_seconds have passed; samples/s."""
    if device.type == 'cuda':
        batches = [{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                   for b in batches]
    image = pl.find_vae(str(model), '')
    fallback = pl.Fallback(str(model), SD, device, image)

    def encode(b: dict) -> None:
        with torch.inference_mode():
            pl.encode_batch(b, (vae, [te]), SD, resolutions, device, torch.float16, len(b['samples']),
                            fallback, image)

    encode(batches[0])  # warm-up
    if device.type == 'cuda':
        torch.cuda.synchronize()
    n, t = 0, time.perf_counter()
    while True:
        for b in batches:
            encode(b)
            n += len(b['samples'])
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if time.perf_counter() - t >= min_seconds:
            return n / (time.perf_counter() - t)


def end_to_end(mds: Path, model: Path, work: Path, args, *extra: str) -> dict:
    """The script as a user runs it; its own rate excludes start-up (model loading, workers)."""
    summary = work / 'e2e_summary.json'
    cmd = [sys.executable, str(ROOT / 'precompute_latents.py'), '--remote_download', str(mds.parent),
           '--bucket', mds.name, '--local', str(work / 'e2e_cache'), '--remote_upload', str(work / 'e2e_out'),
           '--model_name', str(model), '--batch-size', str(args.batch_size), '--device', args.device,
           '--num_workers', str(args.workers), '--resolutions', *map(str, args.resolutions),
           '--summary', str(summary), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f'end-to-end run failed:\n{proc.stderr[-3000:]}')
    out = json.loads(summary.read_text())
    out['wall'] = wall
    return out


def peak_flops(args, device: torch.device) -> float:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != 'cuda':
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK.items() if k in name), 0.0)


def family_model(work: Path, family: str, full_size: bool) -> Path:
    """A model folder of the family: the test bed's tiny one, or full-size shapes with random weights."""
    if family == 'sd':
        return build_full_size_sd2(work / 'sd-model') if full_size else build_tiny_sd(work / 'sd-model')
    layout = 'flux' if family == 'mosaicml' else family  # the mosaicml recipe reads a FLUX-layout folder
    return build_tiny_family(work / f'{family}-model', layout, full_size=full_size)


def family_flops(model: Path, family: pl.Family, device: torch.device, dtype: torch.dtype,
                 shares: dict[int, float]) -> float:
    """Forward FLOPs per sample of every text encoder at its token length, plus the VAE encoder."""
    vae, encoders = pl.load_models(str(model), family, device, dtype, pl.find_vae(str(model), ''))
    lengths = pl.token_lengths(family, pl.load_tokenizers(str(model), family), 0)
    return forward_flops(zip(encoders, lengths), vae, device, dtype, shares)


def bench_families(args, work: Path, mds: Path, device: torch.device, dtype: torch.dtype) -> None:
    """End to end per family: samples/s after the first batch, bytes stored per sample, MFU on a GPU."""
    names = args.families or list(pl.FAMILIES)
    if any(n in LLM_FAMILIES for n in names):
        print(f'{"family":<10} {"px":>5} {"samples/s":>10} {"peak GPU":>10}  (bytes per sample at full size: '
              'benchmarks/llm_family_sizes.py)')
        for name in [n for n in names if n in LLM_FAMILIES]:
            bench_llm_family(args, work, mds, name, device,
                             torch.bfloat16 if device.type == 'cuda' else dtype)
        names = [n for n in names if n not in LLM_FAMILIES]
        if not names:
            return
    peak = peak_flops(args, device)
    print(f'{"family":<10} {"samples/s":>10} {"bytes/sample":>13} {"GFLOP/sample":>13} {"MFU":>7}  wall')
    for name in names:
        model = family_model(work, name, args.full_size)
        run_dir = work / f'run-{name}'
        run_dir.mkdir(exist_ok=True)
        e2e = end_to_end(mds, model, run_dir, args, '--family', name)
        rate = e2e['steady_samples_per_s_rank0'] or e2e['samples_per_s_rank0']
        shares = {int(r): n / max(e2e['written'], 1) for r, n in e2e['encoded'].items()}
        flops = family_flops(model, pl.FAMILIES[name], device, dtype, shares)
        mfu = f'{flops * rate / peak:.1%}' if peak else 'n/a'
        print(f'{name:<10} {rate:>10.1f} {e2e["latent_bytes_per_sample"]:>13.0f} {flops / 1e9:>13.1f} '
              f'{mfu:>7}  {e2e["wall"]:.0f} s', flush=True)
        if device.type == 'cuda':
            torch.cuda.empty_cache()


# The language-model families at full size: the backbone the script puts on the GPU, as (its language model
# in llm_family_sizes.py's LLMS, whose sizes it takes; transformers class; config class; the text config's
# other fields; the config's other fields: a vision tower's, from the published config.json).
FULL_LLM = {
    'zimage': ('qwen3-4b', 'Qwen3Model', 'Qwen3Config', {}, {}),
    'lumina2': ('gemma2-2b', 'Gemma2Model', 'Gemma2Config', {}, {}),
    'sana': ('gemma2-2b', 'Gemma2Model', 'Gemma2Config', {}, {}),
    'qwenimage': ('qwen2.5-vl-7b', 'Qwen2_5_VLModel', 'Qwen2_5_VLConfig',
                  {'rope_scaling': {'type': 'mrope', 'mrope_section': [16, 24, 24]}},
                  {'vision_config': dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                         out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31])}),
    'flux2': ('mistral-small-3.1', 'Mistral3Model', 'Mistral3Config', {'model_type': 'mistral'},
              {'vision_config': dict(model_type='pixtral', hidden_size=1024, intermediate_size=4096,
                                     num_hidden_layers=24, num_attention_heads=16, head_dim=64,
                                     patch_size=14, image_size=1540)}),
}


def full_size_text_encoder(family: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The family's text encoder at its published sizes with random weights, built directly on `device` in
    `dtype` (no CPU copy: FLUX.2's Mistral backbone is 48 GB in bfloat16). Chroma: T5-XXL's encoder."""
    import transformers

    if family == 'chroma':
        cls, cfg = transformers.T5EncoderModel, transformers.T5Config(vocab_size=32128, **FULL['t5'])
    else:
        lm, model, config, text_extra, extra = FULL_LLM[family]
        c = LLMS[lm]
        text = dict(vocab_size=c['vocab'], hidden_size=c['hidden'], num_hidden_layers=c['layers'],
                    intermediate_size=c['inter'], num_attention_heads=c['heads'],
                    num_key_value_heads=c['kv'], head_dim=c['head_dim'], **text_extra)
        nested = lm in VISION  # a vision-language model: the language part is its text_config
        cfg = getattr(transformers, config)(**({'text_config': text, **extra} if nested else text))
        cls = getattr(transformers, model)
    with torch.device(device):
        return cls._from_config(cfg, dtype=dtype).eval()


def llm_family_models(work: Path, name: str, full_size: bool, device: torch.device, dtype: torch.dtype):
    """(folder with the tokenizer, its ImageLatents, VAE, [text encoder]): the test bed's tiny pipeline
    folder; --full_size swaps in the published VAE's sizes (a folder, random weights, through --vae's path)
    and the text encoder above (its tokenizer stays the test bed's: token counts of padded families are
    exact, variable-length ones differ)."""
    folder = build_llm_family(work / f'{name}-model', name)
    family = pl.FAMILIES[name]
    vae_folder = ''
    if full_size:
        vae_folder = work / f'{name}-vae'
        if name in OWN_VAES:
            build_vae(vae_folder, name, full_size=True)
        else:
            write_vae(vae_folder, *VAES['flux'], dims=FULL['vae'], half=True)
    image = pl.find_vae(str(folder), str(vae_folder))
    vae = pl.load_vae(image, device, dtype)
    encoders = [full_size_text_encoder(name, device, dtype)] if full_size else \
        [pl.load_encoder(e, str(folder), device, dtype) for e in family.encoders]
    return folder, image, vae, encoders


def bench_llm_family(args, work: Path, mds: Path, name: str, device: torch.device,
                     dtype: torch.dtype) -> None:
    """The script's encode step (text and latents) over batches its loader made, one resolution at a
    time: samples/s and peak GPU memory (weights included)."""
    family = pl.FAMILIES[name]
    folder, image, vae, encoders = llm_family_models(work, name, args.full_size, device, dtype)
    tokenizers = pl.load_tokenizers(str(folder), family)
    shards = pl.read_input_index(str(mds), str(mds), 60)
    def no_fallback(_name, model, fn, _used):  # random weights: no float32 copy to reload
        return fn(model)

    def encode(b: dict, res: int) -> dict:
        with torch.inference_mode():
            return pl.encode_batch(b, (vae, encoders), family, [res], device, torch.float16,
                                   len(b['samples']), no_fallback, image)

    for res in args.resolutions:
        parts = pl.plan_parts(shards, 10**9)
        reader = pl.BatchReader(pl.make_jobs(parts, args.batch_size),
                                pl.ShardCache(pl.numbered(parts, shards), None, str(mds), 60, 1), tokenizers,
                                pl.token_lengths(family, tokenizers, 0),
                                pl.make_crop('center', [res], 64, 4.0, False), (image.channels, image.factor),
                                'mean', 0, 0.0, encoders=family.encoders)
        batches = [reader[j] for j in range(min(len(reader.jobs), 4))]
        if device.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        encode(batches[0], res)  # warm-up
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < args.min_seconds or not n:
            for b in batches:
                encode(b, res)
                n += len(b['samples'])
            if device.type == 'cuda':
                torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t)
        peak = f'{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB' if device.type == 'cuda' \
            else 'n/a'
        shown = len(batches[0][f'rows_{res}'])
        print(f'{name:<10} {res:>5} {rate:>10.2f} {peak:>10}  '
              f'({shown}/{len(batches[0]["samples"])} of a batch reach {res} px)', flush=True)


def vae_peak_memory(image: pl.ImageLatents, device: torch.device, dtype: torch.dtype, res: int,
                    batch: int) -> str:
    """The VAE's peak GPU memory encoding one batch of res x res images (weights included), as the script
    encodes them; 'n/a' on the CPU."""
    if device.type != 'cuda':
        return 'n/a'
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    vae = pl.load_module(image.folder, image.subfolder, image.vae.class_name, device, dtype)
    x = torch.zeros(batch, 3, *[1] * image.vae.frames, res, res, device=device, dtype=dtype)
    with torch.inference_mode():
        vae.encode(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    del vae, x
    torch.cuda.empty_cache()
    return f'{peak:.1f} GiB'


def bench_vaes(args, work: Path, mds: Path, device: torch.device, dtype: torch.dtype) -> None:
    """End to end per VAE (--vae FOLDER beside the SD-2 text side): samples/s after the first batch,
    bytes stored per sample, FLOPs and MFU, and the VAE's peak memory per batch at each resolution."""
    text = family_model(work, 'sd', args.full_size)
    te = pl.load_module(str(text), 'text_encoder', 'CLIPTextModel', device, dtype)
    peak = peak_flops(args, device)
    print(f'{"vae":<10} {"samples/s":>10} {"bytes/sample":>13} {"GFLOP/sample":>13} {"MFU":>7}  '
          + '  '.join(f'peak {r}px x{args.batch_size}' for r in args.resolutions) + '  wall')
    for kind in args.vaes or ('flux2', 'qwenimage', 'sana'):
        folder = build_vae(work / f'vae-{kind}', kind, full_size=args.full_size)
        run_dir = work / f'run-vae-{kind}'
        run_dir.mkdir(exist_ok=True)
        e2e = end_to_end(mds, text, run_dir, args, '--vae', str(folder))
        rate = e2e['steady_samples_per_s_rank0'] or e2e['samples_per_s_rank0']
        shares = {int(r): n / max(e2e['written'], 1) for r, n in e2e['encoded'].items()}
        image = pl.find_vae(str(text), str(folder))
        vae = pl.load_module(image.folder, image.subfolder, image.vae.class_name, device, dtype)
        flops = forward_flops([(te, 77)], vae, device, dtype, shares, image.vae.frames)
        del vae
        mfu = f'{flops * rate / peak:.1%}' if peak else 'n/a'
        memory = [vae_peak_memory(image, device, dtype, r, args.batch_size) for r in args.resolutions]
        print(f'{kind:<10} {rate:>10.1f} {e2e["latent_bytes_per_sample"]:>13.0f} {flops / 1e9:>13.1f} '
              f'{mfu:>7}  ' + '  '.join(f'{m:>{len(f"peak {r}px x{args.batch_size}")}}'
                                        for m, r in zip(memory, args.resolutions))
              + f'  {e2e["wall"]:.0f} s', flush=True)


def main() -> None:
    args = parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: --device cuda: no GPU is visible to torch; run on a GPU host, or drop the flag '
                 'for the tiny CPU run')
    os.environ.update({'NO_ALBUMENTATIONS_UPDATE': '1', 'HF_HUB_OFFLINE': '1', 'WANDB_MODE': 'disabled'})
    work = Path(args.work_dir or tempfile.mkdtemp(prefix='bench-latents-'))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device('cuda' if args.device == 'cuda' else 'cpu')
    dtype = torch.float16 if device.type == 'cuda' else torch.float32
    load0 = os.getloadavg()[0]

    print(f'building {args.distinct} JPEGs ({args.bucket}) and a {args.samples}-sample MDS input ...',
          flush=True)
    images = make_images(max(args.distinct, args.per_core_images), args.bucket, args.target_kb)
    mean_kb = np.mean([len(d) for d in images]) / 1e3
    mds = build_input(work / 'mds', images[:args.distinct], args.samples) / UNBUCKETED
    if args.families is not None:
        print(f'device {device}, {"full-size random" if args.full_size else "tiny test bed"} models, '
              f'batch {args.batch_size}, {args.samples} samples, resolutions {args.resolutions}')
        bench_families(args, work, mds, device, dtype)
        return
    if args.vaes is not None:
        print(f'device {device}, {"full-size random" if args.full_size else "tiny test bed"} VAEs, '
              f'batch {args.batch_size}, {args.samples} samples, resolutions {args.resolutions}')
        bench_vaes(args, work, mds, device, dtype)
        return
    if args.full_size:
        model = build_full_size_sd2(work / 'sd2-random')
    else:
        model = build_tiny_sd(work / 'tiny-sd')
    vae, (te,) = pl.load_models(str(model), SD, device, dtype, pl.find_vae(str(model), ''))

    image_rates = interleaved_rates({'ours': ours_preprocess, 'published': published_preprocess,
                                     'aspect': functools.partial(ours_preprocess, crop=ASPECT)},
                                    images[:args.per_core_images], count=lambda _: 1)
    ours, published, aspect = image_rates['ours'], image_rates['published'], image_rates['aspect']
    reader = make_reader(mds, model, args, vae)
    aspect_reader = make_reader(mds, model, args, vae, 'aspect')
    jobs = reader.jobs
    item_rates = interleaved_rates(
        {'ours': lambda j: reader[j],
         'published': lambda j: [published_item(reader, i) for i in range(jobs[j].start, jobs[j].stop)],
         'aspect': lambda j: aspect_reader[j]},
        list(range(min(len(jobs), max(1, 128 // args.batch_size)))),  # <= ~128 samples: one core is slow
        count=lambda j: jobs[j].stop - jobs[j].start, rounds=1)
    ours_item, pub_item, aspect_item = item_rates['ours'], item_rates['published'], item_rates['aspect']
    loader_rate, batches = loader_alone(reader, args.workers)
    if device.type == 'cpu':  # the threads the script gives its model beside --workers workers
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.workers))
    model_before = model_alone(batches, vae, te, device, dtype, args.resolutions, model)
    if device.type == 'cuda':
        torch.cuda.empty_cache()  # leave the GPU's memory to the script's own process
    e2e = end_to_end(mds, model, work, args)
    model_rate = (model_before + model_alone(batches, vae, te, device, dtype, args.resolutions, model)) / 2
    e2e_rate = e2e['steady_samples_per_s_rank0']

    n = sum(len(b['samples']) for b in batches)
    shares = {r: sum(len(b[f'rows_{r}']) for b in batches) / max(n, 1) for r in args.resolutions}
    flops = flops_per_sample(vae, te, device, dtype, shares)
    peak = peak_flops(args, device)
    device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU x{os.cpu_count()}'

    slower = min(loader_rate, model_rate)
    rows = [
        ('per core: published image preprocessing', published, 'decode + resize + crop per resolution'),
        ('per core: ours image preprocessing', ours, f'{ours / published:.2f}x published (goal >= 1.5x)'),
        ('per core: ours image preprocessing, --crop aspect', aspect,
         f'{aspect / ours:.2f}x center (goal >= 0.9x)'),
        ('per core: published item (MDS, tokens, images)', pub_item, ''),
        ('per core: ours item (MDS, tokens, images, noise)', ours_item,
         f'{ours_item / pub_item:.2f}x published'),
        ('per core: ours item, --crop aspect', aspect_item,
         f'{aspect_item / ours_item:.2f}x center (goal >= 0.9x)'),
        (f'loader alone ({args.workers} workers)', loader_rate, ''),
        ('model alone (pre-decoded batches)', model_rate, 'mean of a run before and one after e2e'),
        ('end to end (script, after its first batch)', e2e_rate,
         f'{e2e_rate / slower:.2f}x the slower of the two (goal >= 0.9x)'),
    ]
    model_kind = 'full-size SD-2 (random init)' if args.full_size else 'tiny test bed'
    print(f'\ndevice {device_name}, model {model_kind}, '
          f'dtype {str(dtype).replace("torch.", "")}, batch {args.batch_size}, bucket {args.bucket}, '
          f'{args.samples} samples, JPEGs {mean_kb:.0f} KB mean')
    print('latent share per resolution: ' + ', '.join(f'{r}px {s:.2f}' for r, s in shares.items()))
    print(f'{"measurement":<48} {"samples/s":>10}  note')
    for name, rate, note in rows:
        print(f'{name:<48} {rate:>10.1f}  {note}')
    def mfu(rate: float) -> str:
        return f'{flops * rate / peak:.1%}' if peak else 'n/a (unknown peak: --peak_tflops)'

    print(f'FLOPs per sample {flops / 1e9:.1f} GFLOP (forward, FlopCounterMode); '
          f'end to end {flops * e2e_rate / 1e12:.2f} TFLOP/s, MFU {mfu(e2e_rate)}; '
          f'model alone MFU {mfu(model_rate)}')
    print(f'end-to-end wall incl. start-up {e2e["wall"]:.1f} s; load average {load0:.2f} -> '
          f'{os.getloadavg()[0]:.2f} (uptime)')


if __name__ == '__main__':
    main()
