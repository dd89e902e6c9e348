"""MDS datasets shaped like laion_cloudwriter.py's output, written directly with streaming's MDSWriter.

Layout: one dataset per bucket at `<root>/<lo>-<hi>[/<subfolder>]` (or one `0-1048576` dataset when
not bucketed), with exactly the cloudwriter's columns and types. Undecodable corpus files go where a
header-only bucketing would put them (the truncated JPEG's header says 320x300); files without a
readable header get 300x300, so they land in '256-512' too.

`rows_for(items)` gives the rows; `write_mds_input(root, rows)` writes them and returns
{bucket name: rows in index order}. Both are deterministic.
"""

from __future__ import annotations

import io
import os
import socket

from PIL import Image
from streaming import MDSWriter

from .corpus import CorpusItem, bucket_of
from .readback import environ

COLUMNS = {
    'punsafe': 'float64', 'pwatermark': 'float64', 'similarity': 'float64', 'aesthetic_score': 'float64',
    'caption': 'str', 'url': 'str', 'key': 'str', 'status': 'str', 'error_message': 'str', 'exif': 'str',
    'width': 'int32', 'height': 'int32', 'original_width': 'int32', 'original_height': 'int32',
    'jpg': 'bytes', 'hash': 'int64',
}
UNBUCKETED = '0-1048576'
VLM_COLUMNS = {**COLUMNS, 'vlm_caption': 'str'}  # a second caption column, as caption_images.py adds one


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, as the cloudwriter reads it; 300x300 when unreadable."""
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:
        return 300, 300


def make_row(n: int, data: bytes, name: str, caption: str | None = None) -> dict:
    w, h = header_size(data)
    return {
        'punsafe': 0.01 * (n % 10), 'pwatermark': 0.02 * (n % 5), 'similarity': 0.3 + 1e-4 * n,
        'aesthetic_score': 4.5 + 0.01 * n, 'caption': caption if caption is not None else
        f'a photo number {n} named {name}', 'url': f'http://127.0.0.1/img/{n}/{name}',
        'key': f'{n:09d}', 'status': 'success', 'error_message': '', 'exif': '{}',
        'width': w, 'height': h, 'original_width': w, 'original_height': h, 'jpg': data,
        'hash': 1_000_003 * n - 7,
    }


def with_vlm_captions(rows: list[dict], texts: list[str]) -> list[dict]:
    """`rows` with a `vlm_caption` column (texts[i % len(texts)]): write them with columns=VLM_COLUMNS."""
    return [{**row, 'vlm_caption': texts[i % len(texts)]} for i, row in enumerate(rows)]


def rows_for(items: list[CorpusItem], repeat: int = 1) -> list[dict]:
    """One row per item (`repeat` times over), keys '000000000', '000000001', ..."""
    rows = []
    for r in range(repeat):
        for i, it in enumerate(items):
            rows.append(make_row(r * len(items) + i, it.data, it.name))
    return rows


def write_mds_input(root: str, rows: list[dict], bucketed: bool = True, subfolder: str = '',
                    size_limit: int = 1 << 16, columns: dict[str, str] | None = None,
                    env: dict[str, str] | None = None, cache: str | None = None) -> dict[str, list[dict]]:
    """Write `rows` as per-bucket MDS datasets under `root` (a folder or s3://...; `env` for S3,
    `cache` a local staging folder for a remote). Small `size_limit`: several shards per bucket."""
    columns = columns or COLUMNS
    buckets: dict[str, list[dict]] = {}
    for row in rows:
        name = bucket_of(min(row['width'], row['height'])) if bucketed else UNBUCKETED
        buckets.setdefault(name, []).append(row)
    with environ(env):
        for name, bucket_rows in buckets.items():
            target = '/'.join(p for p in (root.rstrip('/'), name, subfolder) if p)
            out = (os.path.join(cache, name), target) if cache else target
            with MDSWriter(out=out, columns=columns, size_limit=size_limit) as writer:
                for row in bucket_rows:
                    writer.write({k: row[k] for k in columns})
    return buckets


# The documented ways to name an S3-compatible endpoint (MinIO, R2, on-prem) that the scripts honour:
# streaming's own variable, and botocore's (boto3 >= 1.28 reads it when no endpoint_url is passed).
ENDPOINT_VARIABLES = ('S3_ENDPOINT_URL', 'AWS_ENDPOINT_URL')


def endpoint_only_in(s3, variable: str) -> dict[str, str]:
    """A child environment for the moto server `s3` that names its endpoint in `variable` alone. Any
    request that ignored it would go to AWS through HTTPS_PROXY, a dead port on 127.0.0.1: it fails
    at once and never leaves the machine."""
    env = {k: v for k, v in s3.child_env().items() if k not in ENDPOINT_VARIABLES}
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        dead = f'http://127.0.0.1:{s.getsockname()[1]}'
    return {**env, variable: s3.endpoint, 'HTTPS_PROXY': dead, 'HTTP_PROXY': dead, 'NO_PROXY': '127.0.0.1'}
