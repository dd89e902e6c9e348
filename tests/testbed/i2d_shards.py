"""img2dataset-shaped output shards (NNNNN.parquet + NNNNN_stats.json) made without a download.

The schema is what img2dataset 1.47 writes with `output_format parquet`, `disable_all_reencoding`,
`compute_hash md5` and the additional columns of DOWNLOAD_ARGS (tests/test_download.py checks it
against the download scripts' real img2dataset runs): the saved input columns, caption, url, then key, status,
error_message, width, height, original_width, original_height, exif, jpg, with md5 before url
(full set, verified) or after exif (aesthetic set, computed only). Without re-encoding,
img2dataset leaves the four size columns null; `sizes=True` fills them as a resizing run would.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .corpus import CorpusItem, good_items

# img2dataset arguments our download scripts use, per input flavour (the builder mirrors them).
DOWNLOAD_ARGS = {
    'full': dict(url_col='url', caption_col='caption', compute_hash='md5', verify_hash=['md5', 'md5'],
                 save_additional_columns=['punsafe', 'pwatermark', 'similarity', 'hash']),
    'aesthetic': dict(url_col='URL', caption_col='TEXT', compute_hash='md5',
                      save_additional_columns=['punsafe', 'pwatermark', 'similarity', 'hash',
                                               'AESTHETIC_SCORE']),
}

_INPUT_TYPES = {'punsafe': pa.float32(), 'pwatermark': pa.float32(), 'similarity': pa.float64(),
                'hash': pa.int64(), 'AESTHETIC_SCORE': pa.float32()}
_SIZE_COLS = ('width', 'height', 'original_width', 'original_height')


def i2d_schema(flavour: str = 'full') -> pa.Schema:
    """The parquet schema img2dataset writes for our download scripts' flags."""
    extra = DOWNLOAD_ARGS[flavour]['save_additional_columns']
    fields = [pa.field(c, _INPUT_TYPES[c]) for c in extra]
    # A verified hash column is read with the input (before url); a computed one comes after exif.
    verified = 'verify_hash' in DOWNLOAD_ARGS[flavour]
    md5 = [pa.field('md5', pa.string())]
    fields += [pa.field('caption', pa.string())] + (md5 if verified else [])
    fields += [pa.field('url', pa.string()), pa.field('key', pa.string()),
               pa.field('status', pa.string()), pa.field('error_message', pa.string())]
    fields += [pa.field(c, pa.int32()) for c in _SIZE_COLS]
    fields += [pa.field('exif', pa.string())] + ([] if verified else md5)
    return pa.schema(fields + [pa.field('jpg', pa.binary())])


def shard_rows(shard: int, items: list[CorpusItem], failures: int = 1, sizes: bool = False,
               flavour: str = 'full') -> list[dict]:
    """Rows of one shard: one success per item, then `failures` failed downloads (404s)."""
    rows = []
    for i, it in enumerate(items):
        n = shard * 10_000 + i
        row = {'punsafe': 0.01 * (n % 10), 'pwatermark': 0.02 * (n % 5), 'similarity': 0.3 + 1e-4 * n,
               'hash': 1_000_003 * n - 7, 'caption': f'caption {n} of {it.name}',
               'md5': hashlib.md5(it.data).hexdigest(), 'url': f'http://127.0.0.1/img/{n}/{it.name}',
               'key': f'{shard:05d}{i:04d}', 'status': 'success', 'error_message': None,
               'exif': '{}', 'jpg': it.data}
        for c in _SIZE_COLS:
            row[c] = (it.width if 'width' in c else it.height) if sizes else None
        if flavour == 'aesthetic':
            row['AESTHETIC_SCORE'] = 4.5 + 1e-3 * (n % 1000)
        rows.append(row)
    for j in range(failures):
        i = len(items) + j
        rows.append({'caption': f'missing {i}', 'url': f'http://127.0.0.1/404/{shard}/{i}',
                     'key': f'{shard:05d}{i:04d}', 'status': 'failed_to_download',
                     'error_message': 'HTTP Error 404: Not Found', 'similarity': 0.3,
                     'hash': i, 'punsafe': 0.0, 'pwatermark': 0.0})
    return rows


def write_shard(folder: Path, shard: int, rows: list[dict], flavour: str = 'full',
                row_group_size: int = 100, stats: bool = True) -> Path:
    """Write one shard's parquet (row groups of 100, as img2dataset buffers) and, when `stats`,
    its `_stats.json` afterwards, which is what marks the shard finished."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    schema = i2d_schema(flavour)
    table = pa.Table.from_pylist(rows, schema=schema)
    path = folder / f'{shard:05d}.parquet'
    pq.write_table(table, path, row_group_size=row_group_size)
    if stats:
        write_stats(folder, shard, rows)
    return path


def write_stats(folder: Path, shard: int, rows: list[dict]) -> Path:
    """The `NNNNN_stats.json` img2dataset writes when a shard is finished."""
    status: dict[str, int] = {}
    for r in rows:
        reason = 'success' if r['status'] == 'success' else r['error_message']
        status[reason] = status.get(reason, 0) + 1
    ok = sum(r['status'] == 'success' for r in rows)
    now = time.time()
    stats = {'count': len(rows), 'successes': ok, 'failed_to_download': len(rows) - ok,
             'failed_to_resize': 0, 'duration': 0.0, 'start_time': now, 'end_time': now,
             'status_dict': status}
    path = Path(folder) / f'{shard:05d}_stats.json'
    path.write_text(json.dumps(stats, indent=4))
    return path


def write_i2d_output(folder: Path, shards: int, items: list[CorpusItem] | None = None,
                     flavour: str = 'full', failures: int = 1, sizes: bool = False,
                     done: bool = True) -> list[Path]:
    """A whole finished download: `shards` shards of `items` (default: the decodable corpus) and,
    when `done`, the `done` file the download scripts leave."""
    items = list(good_items() if items is None else items)
    paths = [write_shard(folder, s, shard_rows(s, items, failures, sizes, flavour), flavour)
             for s in range(shards)]
    if done:
        (Path(folder) / 'done').touch()
    return paths
