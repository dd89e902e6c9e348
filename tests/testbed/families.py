"""Tiny model folders of each family precompute_latents.py knows, loaded only through `from_pretrained`.

Each folder is a diffusers pipeline layout with a model_index.json naming its pipeline class, and
the real component classes at toy sizes (two layers, so the penultimate hidden state differs from
the last):

- sdxl: text_encoder/ CLIPTextModel (CLIP-L), text_encoder_2/ CLIPTextModelWithProjection (CLIP-G),
  two CLIP tokenizers (pad '<|endoftext|>' and '!', as SDXL's), vae/ 4 channels x 0.13025.
- sd3:  text_encoder/ and text_encoder_2/ CLIPTextModelWithProjection, text_encoder_3/ T5EncoderModel,
  tokenizer_3/ T5TokenizerFast, vae/ 16 channels, scaling 1.5305, shift 0.0609.
- flux: text_encoder/ CLIPTextModel, text_encoder_2/ T5EncoderModel, tokenizer_2/ T5TokenizerFast,
  vae/ 16 channels, scaling 0.3611, shift 0.1159 (also the mosaicml recipe's folder, with --family).

The T5 tokenizer is real: a Unigram model trained offline with `tokenizers` on a few hundred words,
with T5's special tokens (<pad> 0, </s> 1, <unk> 2), Metaspace pre-tokenizer and '</s>' appended.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import write_clip_tokenizer

CLIP_L = dict(hidden_size=32, projection_dim=24, intermediate_size=37, num_attention_heads=4,
              num_hidden_layers=2)
CLIP_G = dict(hidden_size=40, projection_dim=36, intermediate_size=45, num_attention_heads=4,
              num_hidden_layers=2)
# T5 wider than CLIP-L + CLIP-G, as in SD3 (4096 > 768 + 1280): SD3 pads the CLIP states to T5's width.
T5 = dict(d_model=80, d_kv=20, d_ff=64, num_heads=4, num_layers=2, feed_forward_proj='gated-gelu')
VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
# Full size (benchmarks/bench_precompute_latents.py --full_size, random weights): OpenAI CLIP ViT-L/14,
# OpenCLIP ViT-bigG/14, T5 v1.1 XXL (4.7B parameters), the SD/SDXL/SD3/FLUX VAE encoder widths.
FULL = {
    'clip_l': dict(hidden_size=768, projection_dim=768, intermediate_size=3072, num_attention_heads=12,
                   num_hidden_layers=12),
    'clip_g': dict(hidden_size=1280, projection_dim=1280, intermediate_size=5120, num_attention_heads=20,
                   num_hidden_layers=32),
    't5': dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24,
               feed_forward_proj='gated-gelu'),
    'vae': dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
}
VAES = {'sdxl': (4, 0.13025, None), 'sd3': (16, 1.5305, 0.0609), 'flux': (16, 0.3611, 0.1159)}
PIPELINES = {'sdxl': 'StableDiffusionXLPipeline', 'sd3': 'StableDiffusion3Pipeline', 'flux': 'FluxPipeline'}
WORDS = ('a photo of the small red cat dog house tree sky sunset on beach with people street night '
         'painting portrait landscape city car blue green yellow number named word big old new').split()


def save(model: torch.nn.Module, folder: Path, half: bool) -> None:
    """save_pretrained, in float16 when `half` (full size: a T5-XXL is 19 GB in float32)."""
    (model.half() if half else model).save_pretrained(folder)


def write_vae(folder: Path, channels: int, scaling: float, shift: float | None, dims: dict = VAE,
              half: bool = False) -> None:
    from diffusers import AutoencoderKL

    save(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=channels, sample_size=256, scaling_factor=scaling,
        shift_factor=shift, use_quant_conv=channels == 4, use_post_quant_conv=channels == 4,
        down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4, **dims,
    ), folder, half)


def write_clip(folder: Path, dims: dict, projection: bool, half: bool = False) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                         hidden_act='gelu', bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **dims)
    save((CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg), folder, half)


def write_t5_tokenizer(folder: Path, vocab_size: int = 160) -> int:
    """A real T5TokenizerFast from a Unigram model trained here; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(' {2,}', ' ')])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    lines = [' '.join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8)) + f' {i}' for i in range(300)]
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=['<pad>', '</s>', '<unk>'],
                                      unk_token='<unk>')
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single='$A </s>', pair='$A </s> $B </s>', special_tokens=[('</s>', tok.token_to_id('</s>'))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / 'raw.json'))
    fast = T5TokenizerFast(tokenizer_file=str(folder / 'raw.json'), extra_ids=0, model_max_length=512)
    (folder / 'raw.json').unlink()
    fast.save_pretrained(folder)
    return len(fast)


def write_t5(folder: Path, vocab_size: int, dims: dict = T5, half: bool = False) -> None:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, **dims)
    save(T5EncoderModel(cfg), folder, half)


def build_tiny_family(folder: Path, family: str, seed: int = 0, full_size: bool = False) -> Path:
    """A pipeline folder of `family` ('sdxl', 'sd3' or 'flux') under `folder` (deterministic for a seed);
    `full_size`: the real models' shapes with random weights, saved in float16 (GPU benchmarks)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    clip_l, clip_g, t5, vae = (FULL['clip_l'], FULL['clip_g'], FULL['t5'], FULL['vae']) if full_size \
        else (CLIP_L, CLIP_G, T5, VAE)
    t5_vocab = 32128 if full_size else 0  # T5 v1.1's embedding rows; tiny: the tokenizer's size
    write_vae(folder / 'vae', *VAES[family], dims=vae, half=full_size)
    write_clip_tokenizer(folder / 'tokenizer', pad_token='<|endoftext|>' if family != 'sd3' else '!')
    if family == 'flux':
        write_clip(folder / 'text_encoder', clip_l, projection=False, half=full_size)
        t5_vocab = max(t5_vocab, write_t5_tokenizer(folder / 'tokenizer_2'))
        write_t5(folder / 'text_encoder_2', t5_vocab, t5, full_size)
    else:
        write_clip(folder / 'text_encoder', clip_l, projection=family == 'sd3', half=full_size)
        write_clip(folder / 'text_encoder_2', clip_g, projection=True, half=full_size)
        write_clip_tokenizer(folder / 'tokenizer_2', pad_token='!')
    if family == 'sd3':
        t5_vocab = max(t5_vocab, write_t5_tokenizer(folder / 'tokenizer_3'))
        write_t5(folder / 'text_encoder_3', t5_vocab, t5, full_size)
    (folder / 'model_index.json').write_text(json.dumps({'_class_name': PIPELINES[family],
                                                         '_diffusers_version': '0.39.0'}))
    return folder


def pipeline_of(folder: Path, family: str):
    """diffusers' own pipeline class of `family` over the folder's components, without a denoiser or
    scheduler: the reference whose `encode_prompt` the stored text columns must equal."""
    import diffusers
    import transformers

    def load(cls: str, sub: str):
        return getattr(transformers, cls).from_pretrained(folder, subfolder=sub)

    parts = {'vae': diffusers.AutoencoderKL.from_pretrained(folder, subfolder='vae'),
             'tokenizer': load('CLIPTokenizer', 'tokenizer'), 'scheduler': None}
    if family == 'sd':
        return diffusers.StableDiffusionPipeline(
            **parts, text_encoder=load('CLIPTextModel', 'text_encoder'), unet=None, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    if family == 'sdxl':
        return diffusers.StableDiffusionXLPipeline(
            **parts, text_encoder=load('CLIPTextModel', 'text_encoder'), unet=None, add_watermarker=False,
            text_encoder_2=load('CLIPTextModelWithProjection', 'text_encoder_2'),
            tokenizer_2=load('CLIPTokenizer', 'tokenizer_2'))
    if family == 'sd3':
        return diffusers.StableDiffusion3Pipeline(
            **parts, transformer=None, text_encoder=load('CLIPTextModelWithProjection', 'text_encoder'),
            text_encoder_2=load('CLIPTextModelWithProjection', 'text_encoder_2'),
            tokenizer_2=load('CLIPTokenizer', 'tokenizer_2'),
            text_encoder_3=load('T5EncoderModel', 'text_encoder_3'),
            tokenizer_3=load('T5TokenizerFast', 'tokenizer_3'))
    return diffusers.FluxPipeline(
        **parts, transformer=None, text_encoder=load('CLIPTextModel', 'text_encoder'),
        text_encoder_2=load('T5EncoderModel', 'text_encoder_2'),
        tokenizer_2=load('T5TokenizerFast', 'tokenizer_2'))
