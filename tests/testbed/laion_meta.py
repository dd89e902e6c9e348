"""LAION metadata parquet in the two real input schemas, with rows pointing at the test HTTP server.

Full LAION-2B-en (with md5): url, caption, similarity, punsafe, pwatermark, hash, md5.
Aesthetic 4.5+ subset: URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark, hash, AESTHETIC_SCORE.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .corpus import CorpusItem, build_corpus
from .http_server import ImageServer


@dataclass(frozen=True)
class Entry:
    """One metadata row and what a download of it should give.

    `expect` is 'success' or the failure a downloader should record: '404', '500' or 'decode'
    (a file that downloads but is no image). `item` is the corpus file behind the URL, if any.
    """

    url: str
    caption: str
    expect: str
    item: CorpusItem | None = None


def entries_for(server: ImageServer, items: list[CorpusItem] | None = None,
                failures: bool = True, redirect: bool = True, slow: bool = False) -> list[Entry]:
    """One entry per corpus item (broken files expect 'decode'), then a 404, a 500, a redirect
    to the first item and, when asked, one slow URL."""
    items = list(build_corpus() if items is None else items)
    out = [Entry(server.url(it.name), f'a photo number {i} named {it.name}',
                 'success' if it.decodable else 'decode', it) for i, it in enumerate(items)]
    if failures:
        out.append(Entry(server.url_404, 'a missing image', '404'))
        out.append(Entry(server.url_500, 'a server error', '500'))
    if redirect:
        first = next(it for it in items if it.decodable)
        out.append(Entry(server.url(first.name, 'redirect'), 'a redirected photo', 'success', first))
    if slow:
        first = next(it for it in items if it.decodable)
        out.append(Entry(server.url(first.name, 'slow'), 'a slow photo', 'success', first))
    return out


def _md5(entry: Entry) -> str | None:
    return hashlib.md5(entry.item.data).hexdigest() if entry.item is not None else None


def full_table(entries: list[Entry]) -> pa.Table:
    """LAION-2B-en rows with an md5 column (null where the source has none)."""
    n = len(entries)
    return pa.table({
        'url': pa.array([e.url for e in entries], pa.string()),
        'caption': pa.array([e.caption for e in entries], pa.string()),
        'similarity': pa.array([0.30 + 0.001 * i for i in range(n)], pa.float64()),
        'punsafe': pa.array([0.01 * (i % 10) for i in range(n)], pa.float32()),
        'pwatermark': pa.array([0.02 * (i % 5) for i in range(n)], pa.float32()),
        'hash': pa.array([1_000_003 * i - 7 for i in range(n)], pa.int64()),
        'md5': pa.array([_md5(e) for e in entries], pa.string()),
    })


def aesthetic_table(entries: list[Entry]) -> pa.Table:
    """LAION-2B-en aesthetic 4.5+ rows (WIDTH/HEIGHT as the crawler saw them, as doubles)."""
    n = len(entries)
    return pa.table({
        'URL': pa.array([e.url for e in entries], pa.string()),
        'TEXT': pa.array([e.caption for e in entries], pa.string()),
        'WIDTH': pa.array([float(e.item.width) if e.item and e.item.width else None
                           for e in entries], pa.float64()),
        'HEIGHT': pa.array([float(e.item.height) if e.item and e.item.height else None
                            for e in entries], pa.float64()),
        'similarity': pa.array([0.30 + 0.001 * i for i in range(n)], pa.float64()),
        'punsafe': pa.array([0.01 * (i % 10) for i in range(n)], pa.float32()),
        'pwatermark': pa.array([0.02 * (i % 5) for i in range(n)], pa.float32()),
        'hash': pa.array([1_000_003 * i - 7 for i in range(n)], pa.int64()),
        'AESTHETIC_SCORE': pa.array([4.5 + 0.01 * i for i in range(n)], pa.float32()),
    })


def write_metadata(folder: Path, entries: list[Entry], flavour: str = 'full',
                   files: int = 1) -> list[Path]:
    """Write `entries` as `files` parquet files `part-NNNNN.parquet` in `folder`.

    flavour: 'full' (LAION-2B-en with md5) or 'aesthetic' (the 4.5+ subset).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = full_table(entries) if flavour == 'full' else aesthetic_table(entries)
    step = -(-len(entries) // files)
    paths = []
    for f in range(files):
        path = folder / f'part-{f:05d}.parquet'
        pq.write_table(table.slice(f * step, step), path)
        paths.append(path)
    return paths
