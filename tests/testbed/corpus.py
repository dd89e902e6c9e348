"""A deterministic image corpus: every resolution bucket, every awkward format, and broken files.

`build_corpus()` returns the same bytes on every call and machine (seeded numpy noise, fixed encoder
settings). `make_jpeg()` makes photo-like JPEGs of a chosen size for benchmarks.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

# Bucket edges on the shorter side, as laion_cloudwriter.py buckets them.
BUCKET_EDGES = (0, 64, 128, 256, 512, 768, 1024, 2**20)


@dataclass(frozen=True)
class CorpusItem:
    """One file of the corpus.

    `width`/`height` are the stored pixel size (before any EXIF rotation); None for broken files.
    `decodable` is False for files no decoder can read (truncated, random, empty).
    """

    name: str
    data: bytes
    width: int | None
    height: int | None
    decodable: bool = True

    @property
    def min_side(self) -> int | None:
        return None if self.width is None else min(self.width, self.height)


def photo_like(width: int, height: int, seed: int, mode: str = 'RGB') -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo (~1-2 bits/pixel at quality 90)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        127 + 100 * np.sin(xs / (7 + 13 * rng.random()) + c) * np.cos(ys / (11 + 17 * rng.random()))
        for c in range(3)
    ], axis=-1)
    noise = rng.normal(0, 18, size=(height, width, 3))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, 'RGB').convert(mode)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def make_jpeg(width: int, height: int, seed: int = 0, quality: int = 90,
              progressive: bool = False) -> bytes:
    """A photo-like baseline (or progressive) JPEG of exactly `width` x `height`."""
    return encode(photo_like(width, height, seed), 'JPEG', quality=quality, progressive=progressive)


def _exif_rotated_jpeg(width: int, height: int, seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return encode(photo_like(width, height, seed), 'JPEG', quality=90, exif=exif.tobytes())


@lru_cache(maxsize=1)
def build_corpus() -> tuple[CorpusItem, ...]:
    """All corpus files, in a fixed order. Names are unique and URL-safe."""
    items: list[CorpusItem] = []
    # One landscape and one portrait JPEG whose shorter side lies in each bucket.
    shorter_sides = (40, 100, 200, 300, 600, 800, 1030)
    for i, s in enumerate(shorter_sides):
        long = s * 4 // 3
        prog = i % 2 == 1
        kind = 'progressive' if prog else 'baseline'
        items.append(CorpusItem(f'landscape_{s}_{kind}.jpg',
                                make_jpeg(long, s, seed=i, progressive=prog), long, s))
        items.append(CorpusItem(f'portrait_{s}_{kind}.jpg',
                                make_jpeg(s, long, seed=100 + i, progressive=prog), s, long))
    items.append(CorpusItem('alpha.png', encode(photo_like(300, 260, 7, 'RGBA'), 'PNG'), 300, 260))
    items.append(CorpusItem('gray.jpg', encode(photo_like(280, 320, 8, 'L'), 'JPEG', quality=90),
                            280, 320))
    items.append(CorpusItem('cmyk.jpg', encode(photo_like(330, 270, 9, 'CMYK'), 'JPEG', quality=90),
                            330, 270))
    items.append(CorpusItem('exif_rotated.jpg', _exif_rotated_jpeg(400, 300, 10), 400, 300))
    items.append(CorpusItem('image.webp', encode(photo_like(350, 290, 11), 'WEBP', quality=80),
                            350, 290))
    whole = make_jpeg(320, 300, seed=12)
    items.append(CorpusItem('truncated.jpg', whole[: len(whole) // 3], None, None, decodable=False))
    items.append(CorpusItem('random.bin', np.random.default_rng(13).bytes(5000), None, None,
                            decodable=False))
    items.append(CorpusItem('empty.jpg', b'', None, None, decodable=False))
    return tuple(items)


def good_items() -> list[CorpusItem]:
    return [it for it in build_corpus() if it.decodable]


def bucket_of(min_side: int) -> str:
    """The `<lo>-<hi>` bucket name a shorter side falls in."""
    for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:]):
        if lo <= min_side < hi:
            return f'{lo}-{hi}'
    raise ValueError(min_side)
