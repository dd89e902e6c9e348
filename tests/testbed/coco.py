"""A COCO-2014-val-shaped folder and captions file, as the COCO website ships them, built offline.

`write_coco_sample(folder, n_images, seed)` writes `folder/val2014/COCO_val2014_<12-digit id>.jpg` and
`folder/annotations/captions_val2014.json` (keys info, images, licenses, annotations) and returns
`(data_path, annotation_path)`. Like the real set:
- image ids are sparse 6-digit numbers; the `images` list is in a different order from the
  `annotations` list, whose entries for one image are spread out (so "first appearance" matters);
- every image has 5 to 7 captions, some with stray spaces, newlines and tabs
  (`normalize_caption` gives the cleaned text a converter should store);
- one image is grayscale (as ~1% of COCO) and one is a progressive JPEG;
- one more JPEG lies in `val2014/` without any annotation (converters ignore it).

Everything is deterministic for a seed. `image_size=(w, h)` and `distinct_images=k` (reuse k encoded
files) make benchmark-sized folders quickly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .corpus import encode, make_jpeg, photo_like

FILE_PATTERN = 'COCO_val2014_{:012d}.jpg'
_PHRASES = ('A man riding a horse on a beach', 'two dogs playing with a red frisbee',
            'a plate of food with broccoli and rice', 'A kitchen with a stove and a sink',
            'people waiting at a bus stop in the rain', 'A cat sleeping on top of a laptop',
            'a train pulling into a station', 'A bowl of fruit on a wooden table')
# Stray whitespace as it occurs in captions_val2014.json (trailing newline, double spaces, ...).
_DECORATIONS = ('{}', '{}.', ' {}\n', '{} ', '{}.\n', '  {}  ', '{}\t', '{}\nat  noon')


def normalize_caption(text: str) -> str:
    """The caption a converter stores: whitespace runs (newlines too) become one space, ends trimmed."""
    return ' '.join(text.split())


def _image_bytes(i: int, rng: np.random.Generator, seed: int, image_size: tuple[int, int] | None,
                 cache: dict[int, tuple[bytes, int, int]],
                 distinct_images: int | None) -> tuple[bytes, int, int]:
    """The i-th image's JPEG bytes and size (image 1 grayscale, image 2 progressive)."""
    if distinct_images and i >= distinct_images:
        data, w, h = cache[i % distinct_images]
        return data, w, h
    w, h = image_size or (int(rng.integers(48, 160)), int(rng.integers(48, 160)))
    if i == 1:
        data = encode(photo_like(w, h, seed * 1000 + i, 'L'), 'JPEG', quality=90)  # grayscale
    else:
        data = make_jpeg(w, h, seed=seed * 1000 + i, quality=85, progressive=(i == 2))
    if distinct_images:
        cache[i] = (data, w, h)
    return data, w, h


def write_coco_sample(folder: Path, n_images: int = 12, seed: int = 0,
                      image_size: tuple[int, int] | None = None,
                      distinct_images: int | None = None) -> tuple[Path, Path]:
    """Write a COCO-shaped image folder and captions JSON under `folder`.

    Returns (data_path, annotation_path): `folder/val2014` and
    `folder/annotations/captions_val2014.json`.
    """
    folder = Path(folder)
    data_path, annotation_path = folder / 'val2014', folder / 'annotations' / 'captions_val2014.json'
    data_path.mkdir(parents=True, exist_ok=True)
    annotation_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [int(x) for x in rng.choice(np.arange(1, 600_000), n_images + 1, replace=False)]
    ids, stray_id = ids[:n_images], ids[n_images]
    images, cache = [], {}
    for i, image_id in enumerate(ids):
        data, w, h = _image_bytes(i, rng, seed, image_size, cache, distinct_images)
        name = FILE_PATTERN.format(image_id)
        (data_path / name).write_bytes(data)
        images.append({'license': 1 + i % 6, 'file_name': name, 'coco_url': f'http://x/{name}',
                       'height': h, 'width': w, 'date_captured': '2013-11-14 16:28:13',
                       'flickr_url': f'http://y/{name}', 'id': image_id})
    stray = _image_bytes(0, np.random.default_rng(seed + 1), seed + 1, image_size, {}, None)[0]
    (data_path / FILE_PATTERN.format(stray_id)).write_bytes(stray)

    annotations = []
    for i, image_id in enumerate(ids):
        for k in range(5 + int(rng.integers(0, 3))):
            phrase = _PHRASES[(i + k) % len(_PHRASES)] + f' number {i}-{k}'
            caption = _DECORATIONS[int(rng.integers(0, len(_DECORATIONS)))].format(phrase)
            annotations.append({'image_id': image_id, 'caption': caption})
    order = rng.permutation(len(annotations))  # captions of one image are spread through the list
    annotations = [{**annotations[j], 'id': 10_000 + n} for n, j in enumerate(order)]
    rng.shuffle(images)  # the images list follows neither id nor caption order
    doc = {'info': {'description': 'COCO-shaped test sample', 'year': 2014, 'version': '1.0'},
           'images': images, 'licenses': [{'id': n, 'name': f'license {n}'} for n in range(1, 7)],
           'type': 'captions', 'annotations': annotations}
    annotation_path.write_text(json.dumps(doc))
    return data_path, annotation_path
