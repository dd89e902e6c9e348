"""Metadata parquet shaped like each DATASET preset of laion_download_all.sh (column names and types as
the sets publish them), with rows pointing at the test HTTP server.

Each row's scores are a function of its position, so a test can state a filter's effect independently.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from .laion_meta import Entry


def _scores(n: int) -> dict[str, list]:
    return {'punsafe': [None if i % 7 == 3 else 0.01 * (i % 10) for i in range(n)],
            'pwatermark': [0.1 * (i % 5) for i in range(n)],
            'similarity': [0.25 + 0.01 * i for i in range(n)]}


def _digest(e: Entry, kind: str) -> str | None:
    return getattr(hashlib, kind)(e.item.data).hexdigest() if e.item is not None else None


def _size(e: Entry, side: str) -> int | None:
    return getattr(e.item, side) if e.item is not None else None


def _relaion(entries: list[Entry]) -> pa.Table:
    """Re-LAION 2B-en research (and -safe): LAION's columns plus those of LAION's own img2dataset run."""
    n, s = len(entries), _scores(len(entries))
    return pa.table({
        'url': pa.array([e.url for e in entries], pa.string()),
        'caption': pa.array([e.caption for e in entries], pa.string()),
        'similarity': pa.array(s['similarity'], pa.float64()),
        'punsafe': pa.array(s['punsafe'], pa.float32()),
        'pwatermark': pa.array(s['pwatermark'], pa.float32()),
        'hash': pa.array([1_000_003 * i - 7 for i in range(n)], pa.int64()),
        'key': pa.array([f'{i:09d}' for i in range(n)], pa.string()),
        'status': pa.array(['success'] * n, pa.string()),
        'error_message': pa.array([None] * n, pa.string()),
        'width': pa.array([_size(e, 'width') for e in entries], pa.int64()),
        'height': pa.array([_size(e, 'height') for e in entries], pa.int64()),
        'original_width': pa.array([_size(e, 'width') for e in entries], pa.int64()),
        'original_height': pa.array([_size(e, 'height') for e in entries], pa.int64()),
        'exif': pa.array(['{}'] * n, pa.string()),
        'md5': pa.array([f'{i:032x}' for i in range(n)], pa.string()),  # of LAION's resized copy
    })


def _aesthetics(entries: list[Entry]) -> pa.Table:
    n, s = len(entries), _scores(len(entries))
    return pa.table({
        'URL': pa.array([e.url for e in entries], pa.string()),
        'TEXT': pa.array([e.caption for e in entries], pa.string()),
        'WIDTH': pa.array([None if _size(e, 'width') is None else float(_size(e, 'width')) for e in entries]),
        'HEIGHT': pa.array([None if _size(e, 'height') is None else float(_size(e, 'height'))
                            for e in entries]),
        'similarity': pa.array(s['similarity'], pa.float64()),
        'punsafe': pa.array(s['punsafe'], pa.float32()),
        'pwatermark': pa.array(s['pwatermark'], pa.float32()),
        'hash': pa.array([1_000_003 * i - 7 for i in range(n)], pa.int64()),
        'AESTHETIC_SCORE': pa.array([4.5 + 0.1 * i for i in range(n)], pa.float32()),
    })


def _datacomp(entries: list[Entry]) -> pa.Table:
    n, s = len(entries), _scores(len(entries))
    return pa.table({
        'uid': pa.array([hashlib.md5(str(i).encode()).hexdigest() for i in range(n)], pa.string()),
        'url': pa.array([e.url for e in entries], pa.string()),
        'text': pa.array([e.caption for e in entries], pa.string()),
        'original_width': pa.array([_size(e, 'width') for e in entries], pa.int64()),
        'original_height': pa.array([_size(e, 'height') for e in entries], pa.int64()),
        'clip_b32_similarity_score': pa.array(s['similarity'], pa.float32()),
        'clip_l14_similarity_score': pa.array([x - 0.05 for x in s['similarity']], pa.float32()),
        'face_bboxes': pa.array([[] for _ in range(n)], pa.list_(pa.list_(pa.float64()))),
        'sha256': pa.array([_digest(e, 'sha256') for e in entries], pa.string()),
    })


def _coyo(entries: list[Entry]) -> pa.Table:
    n, s = len(entries), _scores(len(entries))
    return pa.table({
        'id': pa.array([10_000_000 + i for i in range(n)], pa.int64()),
        'url': pa.array([e.url for e in entries], pa.string()),
        'text': pa.array([e.caption for e in entries], pa.string()),
        'width': pa.array([_size(e, 'width') for e in entries], pa.int32()),
        'height': pa.array([_size(e, 'height') for e in entries], pa.int32()),
        'image_phash': pa.array([f'{i:016x}' for i in range(n)], pa.string()),
        'text_length': pa.array([len(e.caption) for e in entries], pa.int32()),
        'clip_similarity_vitb32': pa.array(s['similarity'], pa.float32()),
        'clip_similarity_vitl14': pa.array([x - 0.05 for x in s['similarity']], pa.float32()),
        'nsfw_score_opennsfw2': pa.array([0.0 if x is None else x for x in s['punsafe']], pa.float32()),
        'watermark_score': pa.array(s['pwatermark'], pa.float32()),
        'aesthetic_score_laion_v2': pa.array([4.0 + 0.1 * i for i in range(n)], pa.float32()),
    })


def _cc12m(entries: list[Entry]) -> pa.Table:
    """CC12M's TSV (url, caption) as docs/download.md tells to convert it to parquet."""
    return pa.table({'url': pa.array([e.url for e in entries], pa.string()),
                     'caption': pa.array([e.caption for e in entries], pa.string())})


def _pd12m(entries: list[Entry]) -> pa.Table:
    n = len(entries)
    return pa.table({
        'id': pa.array([f'id-{i}' for i in range(n)], pa.string()),
        'url': pa.array([e.url for e in entries], pa.string()),
        's3_key': pa.array([f'images/{i}.jpg' for i in range(n)], pa.string()),
        'caption': pa.array([e.caption for e in entries], pa.string()),
        'hash': pa.array([_digest(e, 'md5') for e in entries], pa.string()),
        'width': pa.array([_size(e, 'width') for e in entries], pa.int64()),
        'height': pa.array([_size(e, 'height') for e in entries], pa.int64()),
        'mime_type': pa.array(['image/jpeg'] * n, pa.string()),
        'license': pa.array(['https://creativecommons.org/publicdomain/zero/1.0/'] * n, pa.string()),
        'source': pa.array(['testbed'] * n, pa.string()),
    })


def _laion2b(entries: list[Entry]) -> pa.Table:
    from .laion_meta import full_table
    return full_table(entries)


# preset -> (builder, URL column, caption column, columns the download keeps, hash column verified)
PRESET_TABLES = {
    'laion2b-en': (_laion2b, 'url', 'caption', ['punsafe', 'pwatermark', 'similarity', 'hash'], 'md5'),
    'relaion2b-en-research': (_relaion, 'url', 'caption', ['punsafe', 'pwatermark', 'similarity', 'hash'],
                              None),
    'relaion2b-en-research-safe': (_relaion, 'url', 'caption',
                                   ['punsafe', 'pwatermark', 'similarity', 'hash'], None),
    'laion-aesthetics': (_aesthetics, 'URL', 'TEXT',
                         ['punsafe', 'pwatermark', 'similarity', 'hash', 'AESTHETIC_SCORE'], None),
    'datacomp': (_datacomp, 'url', 'text', ['uid', 'clip_b32_similarity_score', 'clip_l14_similarity_score'],
                 'sha256'),
    'coyo': (_coyo, 'url', 'text', ['id', 'clip_similarity_vitb32', 'clip_similarity_vitl14',
                                    'watermark_score', 'aesthetic_score_laion_v2',
                                    'nsfw_score_opennsfw2'], None),
    'cc12m': (_cc12m, 'url', 'caption', [], None),
    'pd12m': (_pd12m, 'url', 'caption', ['id', 'license', 'source'], 'hash'),
}


def preset_table(preset: str, entries: list[Entry]) -> pa.Table:
    return PRESET_TABLES[preset][0](entries)
