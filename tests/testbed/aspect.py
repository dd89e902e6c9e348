"""Images for --crop aspect: wide, tall, beyond the largest bucket ratio, EXIF-turned, too small.

`aspect_items()` returns CorpusItems (deterministic bytes); with the main corpus (4:3 landscapes and
portraits of every size, grayscale, CMYK, alpha, WebP) they cover every bucket shape at 64-256 px.
"""

from __future__ import annotations

from functools import lru_cache

from .corpus import CorpusItem, encode, make_jpeg, photo_like


def _turned_jpeg(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, displayed tall (rotate 90 CW)
    return encode(photo_like(width, height, seed), 'JPEG', quality=90, exif=exif.tobytes())


@lru_cache(maxsize=1)
def aspect_items() -> tuple[CorpusItem, ...]:
    """(name, bytes, stored width, stored height) of images with unusual aspect ratios."""
    jpeg = [('wide_4to1.jpg', 480, 120), ('wide_5to1_beyond_max.jpg', 650, 130), ('tall_1to3.jpg', 110, 330),
            ('tall_1to2.jpg', 140, 290), ('wide_12to5_large.jpg', 1200, 500), ('square_70.jpg', 70, 70),
            ('thin_200x50_too_small.jpg', 200, 50), ('wide_3to2.jpg', 270, 180)]
    items = [CorpusItem(name, make_jpeg(w, h, seed=200 + i, progressive=i % 2 == 1), w, h)
             for i, (name, w, h) in enumerate(jpeg)]
    items.append(CorpusItem('exif_turned_wide_to_tall.jpg', _turned_jpeg(360, 120, 230), 360, 120))
    items.append(CorpusItem('tall.png', encode(photo_like(130, 250, 231), 'PNG'), 130, 250))
    return tuple(items)
