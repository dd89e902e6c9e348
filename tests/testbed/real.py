"""Real image files from the wild (tests/testbed/real_images, Pillow's own test images): every awkward
mode and format a web crawl brings, and the broken files that a header-only check lets through.

`real_items()` returns them as corpus items: the pixel size from the header (None where even the header
does not open) and whether Pillow's defaults decode them (`Image.open(...).load()`, the bomb limit
included). `KINDS` says what each one is, for test ids and messages. `shown(data)` is the picture
docs/decoding.md states, computed apart from the scripts' `to_rgb`.
"""

from __future__ import annotations

import io
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .corpus import CorpusItem

FOLDER = Path(__file__).resolve().parent / 'real_images'

# name: (what it is, its file in Pillow 13.0.0's Tests/images/, decodes with PIL's defaults)
KINDS: dict[str, tuple[str, str, bool]] = {
    'cmyk.jpg': ('CMYK JPEG (Adobe APP14)', 'pil_sample_cmyk.jpg', True),
    'exif_orientation_5.jpg': ('EXIF orientation 5 (transpose)', 'hopper_orientation_5.jpg', True),
    'exif_orientation_6.jpg': ('EXIF orientation 6 (rotate 270)', 'hopper_orientation_6.jpg', True),
    'bad_exif.jpg': ('grayscale JPEG with a broken EXIF block', 'hopper_bad_exif.jpg', True),
    'gray16_le.tif': ('16-bit grayscale TIFF, little-endian (I;16)', '16bit.cropped.tif', True),
    'gray16_be.tif': ('16-bit grayscale TIFF, big-endian (I;16B)', '16bit.MM.cropped.tif', True),
    'gray16.png': ('16-bit grayscale PNG (I;16), built from gray16_be.tif', '16bit.MM.cropped.tif', True),
    'gray16_trns.png': ('16-bit grayscale PNG with a tRNS transparency key', 'i_trns.png', True),
    'rgb48.tiff': ('48-bit RGB TIFF', 'tiff_16bit_RGB.tiff', True),
    'palette_trns.png': ('palette PNG with a tRNS transparency chunk', 'p_trns_single.png', True),
    'rgba.png': ('RGBA PNG', 'transparent.png', True),
    'rgba.webp': ('RGBA WebP', 'transparent.webp', True),
    'plain.webp': ('RGB WebP', 'hopper.webp', True),
    'transparent.gif': ('GIF with a transparent palette index', 'transparent.gif', True),
    'animated.gif': ('animated GIF, 10 frames, background disposal', 'dispose_bgnd_transparency.gif', True),
    'animated_apng.png': ('animated PNG (APNG), 3 frames', 'apng/num_plays.png', True),
    'stereo.mpo': ('MPO (two JPEG frames, a stereo camera)', 'frame_size.mpo', True),
    'lab.tif': ('CIE LAB TIFF', 'lab.tif', True),
    'tiled_jpeg.tif': ('tiled TIFF with JPEG (YCbCr 2x2) tiles', 'tiff_tiled_ycbcr_jpeg_2x2_sampling.tif',
                       True),
    'truncated.jpg': ('truncated JPEG', 'truncated_jpeg.jpg', False),
    'truncated.png': ('truncated PNG', 'truncated_image.png', False),
    'truncated_end_chunk.png': ('PNG cut inside its last chunk', 'truncated_end_chunk.png', False),
    'broken.png': ('80 bytes that are no image', 'broken.png', False),
    'broken_stream.png': ('PNG with a broken zlib data stream, built from hopper.png', 'hopper.png', False),
    'ultrahdr.jpg': ('UltraHDR JPEG (gain map), truncated', 'ultrahdr.jpg', False),
    'webp_compressed.tif': ("TIFF with WebP compression, which Pillow's libtiff cannot decode (it prints so)",
                            'hopper_webp.tif', False),
    'tiled_jpeg_oob.tif': ('tiled-JPEG TIFF whose tiles lie out of bounds', 'tiff_tiled_jpeg_oob_read.tif',
                           False),
    'bmp_bomb.bmp': ('57-byte BMP that declares 3,158,064 x 48 pixels', 'l2rgb_read.bmp', False),
    'gif_bomb.gif': ('44-byte GIF that declares 65,535 x 66,601 pixels (a decompression bomb)',
                     'decompression_bomb.gif', False),
}


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the header declares it, bomb limit lifted; None where no header opens."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def decodes(data: bytes) -> bool:
    """Whether PIL's defaults decode the bytes (`Image.open(...).load()`, the bomb limit included)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data)).load()
        return True
    except Exception:
        return False


@lru_cache(maxsize=1)
def real_items() -> tuple[CorpusItem, ...]:
    """Every real file as a corpus item, in KINDS' order."""
    items = []
    for name, (_, _, ok) in KINDS.items():
        data = (FOLDER / name).read_bytes()
        assert decodes(data) == ok, f'{name}: decodes() says {not ok}, KINDS says {ok}'
        size = header_size(data)
        items.append(CorpusItem(name, data, *(size or (None, None)), decodable=ok))
    return tuple(items)


# EXIF orientation -> the transpose that shows the picture upright (the EXIF 2.3 standard's table)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def shown(data: bytes, draft: tuple[int, int] | None = None) -> Image.Image:
    """docs/decoding.md's rule, written apart from the scripts: the first frame (a JPEG at the DCT
    scale of `draft`, as precompute_latents.py asks), 16-bit grayscale / 257 rounded (its tRNS key's
    pixels white), transparency over white in integer arithmetic, then upright by the EXIF orientation
    (1 when unreadable)."""
    img = Image.open(io.BytesIO(data))
    if draft and img.format == 'JPEG':
        img.draft(img.mode, draft)
    img.load()
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    if img.mode.startswith('I;16'):
        gray = np.rint(np.asarray(img, np.float64) / 257).astype(np.uint8)
        if 'transparency' in img.info:  # a tRNS key: those pixels fully transparent, over white
            gray[np.asarray(img) == img.info['transparency']] = 255
        rgb = np.repeat(gray[..., None], 3, axis=2)
    elif 'A' in img.getbands() or 'transparency' in img.info:
        rgba = np.asarray(img.convert('RGBA'), np.int64)
        alpha = rgba[..., 3:]
        rgb = np.rint((rgba[..., :3] * alpha + 255 * (255 - alpha)) / 255).astype(np.uint8)
    else:
        rgb = np.asarray(img.convert('RGB'))
    out = Image.fromarray(rgb, 'RGB')
    return out.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else out
