"""A tiny model folder in the Stable Diffusion 2 layout, loaded only through `from_pretrained`.

- `vae/`: an AutoencoderKL with SD's structure (4 blocks, so 8x downsampling; 4 latent channels;
  scaling_factor 0.18215) but few channels.
- `text_encoder/`: a CLIPTextModel with SD-2's output shape (hidden size 1024, 77 positions, the
  49,408-token vocabulary) but one layer.
- `tokenizer/`: the real CLIP BPE tokenizer, built from the vocabulary that open_clip ships, with
  SD-2's settings (pad token '!' = id 0, max length 77), so ids equal the reference tokenizer's.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

HIDDEN_SIZE = 1024
MAX_LENGTH = 77
VAE_SCALING = 0.18215


def bpe_path() -> Path:
    import open_clip
    return Path(open_clip.__file__).with_name('bpe_simple_vocab_16e6.txt.gz')


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (the GPT-2 construction)."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) \
        + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: Path, pad_token: str = '!') -> Path:
    """vocab.json + merges.txt + configs for transformers' CLIPTokenizer, from open_clip's BPE file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path()).read().decode('utf-8').split('\n')
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + '</w>' for v in vocab]
    vocab += [''.join(m.split()) for m in merges]
    vocab += ['<|startoftext|>', '<|endoftext|>']
    (folder / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(str(folder / 'vocab.json'), str(folder / 'merges.txt'), pad_token=pad_token,
                        model_max_length=MAX_LENGTH)
    tok.save_pretrained(folder)
    return folder


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """Write vae/, text_encoder/ and tokenizer/ under `folder` (deterministic for a seed)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8, scaling_factor=VAE_SCALING,
        down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4)
    vae.save_pretrained(folder / 'vae')
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=HIDDEN_SIZE, intermediate_size=256,
                         num_hidden_layers=1, num_attention_heads=16,
                         max_position_embeddings=MAX_LENGTH, hidden_act='gelu', projection_dim=512,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    CLIPTextModel(cfg).save_pretrained(folder / 'text_encoder')
    write_clip_tokenizer(folder / 'tokenizer')
    return folder
