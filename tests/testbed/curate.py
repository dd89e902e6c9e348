"""Tiny image-text models of real transformers classes for curate_images.py, its score heads, and a
corpus with planted duplicates.

- `build_clip(folder)`: a CLIPModel (2-layer towers, 32 px images, 16-dim projection) with the real
  CLIP BPE tokenizer (testbed.models) and a CLIPImageProcessor; `build_siglip(folder)`: a SiglipModel
  with the same tokenizer (SigLIP's own is a SentencePiece model we cannot build offline) and a
  SiglipImageProcessor. Both load with AutoModel / AutoImageProcessor / AutoTokenizer.
- `write_aesthetic_head(path, dim, width)`: a torch state_dict in the exact key layout of LAION's
  improved aesthetic predictor (layers.0 Linear(dim, 1024), .1 Dropout, .2 Linear(1024, 128), .3 Dropout,
  .4 Linear(128, 64), .5 Dropout, .6 Linear(64, 16), .7 Linear(16, 1)); `width` scales 1024/128/64/16
  down for tests (width=1024: the published sizes).
- `LAION_HEADS`: LAION's two published improved-aesthetic-predictor heads, copied byte for byte with their
  licence and source note (laion_heads/SOURCE): `linear` (sac+logos+ava1-l14-linearMSE.pth) and `relu`
  (ava+logos-l14-reluMSE.pth), both over CLIP ViT-L/14's 768-dim embedding.
- `planted_corpus()`: distinct photo-like images and four planted groups: re-encoded at another JPEG
  quality, resized into another bucket, slightly cropped, the exact same bytes under another key.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .corpus import encode, photo_like
from .models import write_clip_tokenizer
from .real import real_items

SIZE = 32  # px the tiny towers see
LAION_HEADS = {'linear': Path(__file__).parent / 'laion_heads' / 'sac+logos+ava1-l14-linearMSE.pth',
               'relu': Path(__file__).parent / 'laion_heads' / 'ava+logos-l14-reluMSE.pth'}
UNDECODABLE = ('truncated.jpg', 'broken.png', 'gif_bomb.gif')  # from testbed.real: skipped, named


def _save(model, processor, folder: Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def build_clip(folder: Path, seed: int = 0, dims: dict | None = None, projection_dim: int = 16) -> Path:
    """projection_dim 768: the embedding size of CLIP ViT-L/14, which LAION's published heads read."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    d = dims or {'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 2}
    cfg = CLIPConfig(text_config={**d, 'vocab_size': 49408, 'max_position_embeddings': 77},
                     vision_config={**d, 'image_size': SIZE, 'patch_size': 8}, projection_dim=projection_dim)
    torch.manual_seed(seed)
    return _save(CLIPModel(cfg).eval(), CLIPImageProcessor(size={'shortest_edge': SIZE},
                                                           crop_size={'height': SIZE, 'width': SIZE}), folder)


def build_siglip(folder: Path, seed: int = 0) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel
    d = {'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 2}
    cfg = SiglipConfig(text_config={**d, 'vocab_size': 49408, 'max_position_embeddings': 16},
                       vision_config={**d, 'image_size': SIZE, 'patch_size': 8})
    torch.manual_seed(seed)
    return _save(SiglipModel(cfg).eval(), SiglipImageProcessor(size={'height': SIZE, 'width': SIZE}), folder)


def write_aesthetic_head(path: Path, dim: int, width: int = 16, seed: int = 0) -> Path:
    """LAION's improved-aesthetic-predictor state_dict layout; width 1024 gives its published sizes."""
    torch.manual_seed(seed)
    w = [width, max(width // 8, 1), max(width // 16, 1), max(width // 64, 1)]
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, w[0]), torch.nn.Dropout(0.2), torch.nn.Linear(w[0], w[1]),
                              torch.nn.Dropout(0.2), torch.nn.Linear(w[1], w[2]), torch.nn.Dropout(0.1),
                              torch.nn.Linear(w[2], w[3]), torch.nn.Linear(w[3], 1))
    torch.save({f'layers.{k}': v for k, v in mlp.state_dict().items()}, path)
    return Path(path)


def write_linear_head(path: Path, dim: int, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    torch.save(torch.nn.Linear(dim, 1).state_dict(), path)
    return Path(path)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    return encode(img, 'JPEG', quality=quality)


def planted_corpus(distinct: int = 8) -> tuple[list[tuple[str, bytes]], list[set[str]]]:
    """([(name, bytes)], the planted groups as sets of names). Sizes 64..110 px (bucket '64-128'), the
    resized copy 48 px (bucket '0-64'); last, UNDECODABLE real files (truncated.jpg's header says
    100 x 100: bucket '64-128'; the others' headers do not open: '256-512', as the cloudwriter puts them)."""
    items, groups = [], []
    for i in range(distinct):
        items.append((f'distinct{i}', jpeg(photo_like(72 + 4 * i, 80, seed=100 + i))))
    a = photo_like(96, 96, seed=1)
    items += [('a', jpeg(a, 90)), ('a-q60', jpeg(a, 60))]
    b = photo_like(110, 100, seed=2)
    items += [('b', jpeg(b)), ('b-small', jpeg(b.resize((53, 48), Image.Resampling.LANCZOS)))]
    c = photo_like(100, 100, seed=3)
    items += [('c', jpeg(c)), ('c-crop', jpeg(c.crop((2, 2, 98, 98))))]
    d = jpeg(photo_like(90, 84, seed=4))
    items += [('d', d), ('d-same', d)]
    groups = [{'a', 'a-q60'}, {'b', 'b-small'}, {'c', 'c-crop'}, {'d', 'd-same'}]
    broken = {it.name: it.data for it in real_items() if it.name in UNDECODABLE}
    items += [(name, broken[name]) for name in UNDECODABLE]
    return items, groups


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def plain_pictures() -> dict[str, Image.Image]:
    """The dullest pictures a data set holds, each distinct from the others: solid colours, gradients, a
    page of text under uneven light, two vertical tricolour flags. Each has a dHash without detail (all
    bits equal, or one row repeated), shared with the others of its kind."""
    w, h = 100, 80
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)

    def grey(a: np.ndarray) -> Image.Image:
        return Image.fromarray(a.astype(np.uint8)).convert('RGB')

    def flag(*colours) -> Image.Image:
        a = np.zeros((h, w, 3), np.uint8)
        for i, c in enumerate(colours):
            a[:, i * w // 3:(i + 1) * w // 3] = c
        return Image.fromarray(a)

    page = Image.new('L', (300, 400), 235)
    draw = ImageDraw.Draw(page)
    for top in range(20, 380, 12):
        draw.text((20, top), 'The quick brown fox jumps over the lazy dog', fill=30)
    lit = np.asarray(page, np.float32) * np.linspace(0.8, 1.0, page.width)[None, :]  # light from the right
    return {'red': Image.new('RGB', (w, h), (200, 30, 30)), 'blue': Image.new('RGB', (w, h), (30, 60, 200)),
            'white': Image.new('RGB', (w, h), 'white'), 'h-gradient': grey(x), 'v-gradient': grey(y),
            'diagonal': grey((x + y) / 2), 'page': grey(lit),
            'france': flag((0, 85, 164), (255, 255, 255), (239, 65, 53)),
            'italy': flag((0, 146, 70), (255, 255, 255), (206, 43, 55))}


def copies(name: str, img: Image.Image) -> list[tuple[str, bytes]]:
    """`img` as a JPEG, re-encoded at quality 60, and resized to 2/3."""
    small = img.resize((img.width * 2 // 3, img.height * 2 // 3), Image.Resampling.LANCZOS)
    return [(name, jpeg(img)), (f'{name}-q60', jpeg(img, 60)), (f'{name}-small', jpeg(small))]


def plain_corpus() -> tuple[list[tuple[str, bytes]], list[set[str]]]:
    """([(name, bytes)], the groups of copies): every plain picture (the flags without copies: the tiny
    CLIP cannot tell their copies from each other), each with its re-encoded and resized copy, and a real
    photo (Pillow's hopper, from testbed.real) with its copies, whose dHash they keep."""
    items, groups = [], []
    for name, img in plain_pictures().items():
        items += copies(name, img) if name not in ('france', 'italy') else [(name, jpeg(img))]
    hopper = next(it.data for it in real_items() if it.name == 'plain.webp')
    items += copies('hopper', Image.open(io.BytesIO(hopper)).convert('RGB'))
    for name, _ in items:
        if name.endswith('-q60'):
            groups.append({name.removesuffix('-q60'), name, name.replace('-q60', '-small')})
    return items, groups
