"""Convert img2dataset parquet shards into resolution-bucketed MDS datasets on any remote, resumably.

Example (beside a running download, or after it):

    python laion_cloudwriter.py --local /data/laion/parquet --remote s3://my-bucket/laion \\
        --bucketed --subfolder machine-00 --processes 16

Reads `--local` (a folder or object storage): img2dataset's `NNNNN.parquet` shards, each once its
`NNNNN_stats.json` exists; it polls every `--poll_interval` s until a `done` file is there and every
finished shard is converted. A LAION-2B shard of 10,000 rows is ~1 GB; memory is about
processes x (one parquet row batch + buckets x `--size_limit`), whatever the number of shards.

Writes to `--remote` (a folder or any remote streaming uploads to) one StreamingDataset per bucket
of min(width, height) (edges 0, 64, 128, 256, 512, 768, 1024, 2**20; `0-1048576` without --bucketed):

    <remote>/<lo>-<hi>[/<subfolder>]/index.json          merged over the recorded tasks
    <remote>/<lo>-<hi>[/<subfolder>]/<NNNNN>/...         the part a task wrote (NNNNN: its first shard)
    <remote>/_cloudwriter[/<subfolder>]/<NNNNN>.record   written once all parts of the task are up

and a summary, printed and in `--summary` (default `<local>/_cloudwriter/summary[_<subfolder>].json`).
A task converts up to `--shards_per_task` (16) input shards one after another, each bucket's open MDS
shard carried from one to the next: a bucket holds about its bytes / `--size_limit` MDS shards plus one
per task, not one partly filled shard per input shard.
Every stored image decodes with PIL's defaults, its pixel limit included (`--verify full`); the others
are left out, counted by reason and named in `<remote>/_cloudwriter[/<subfolder>]/<NNNNN>.left_out.jsonl`
(the summary keeps their count and the first 20 per reason). `--verify header` reads headers only.

Resume: a shard is done once its task's `.record` is at the remote, and each `index.json` lists only
recorded tasks, so a reader sees all of a shard or none of it. After a crash, kill -9 or SIGTERM, rerun
the same command (on any machine): done shards are skipped, the others redone in new tasks. A parquet is
deleted (without --keep_parquet) only after its task's record is up. One run at a time per
`--local` and per remote (sub)folder: a second one refuses in one line.

Exit code: 0 ok; 1 some shards skipped as bad input (kept, named) or parquet files without a
_stats.json left unconverted (named); 2 fatal (remote failing, missing required column, refused to
start); 128 + signal when stopped (143 SIGTERM, 130 SIGINT).

The long form (engines: --distributor pyspark|ray; --merge_only; --preview; the schema; storage
settings): docs/laion_cloudwriter.md; errors and what to do: docs/errors.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import functools
import hashlib
import heapq
import importlib.util
import io
import json
import logging
import math
import mmap
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

# Every decode here honours PIL's pixel limit (Image.MAX_IMAGE_PIXELS, 89,478,485): an image over it is
# refused like one over twice it (PIL's default only warns between the two), as the test bed's decodes() does.
warnings.simplefilter('error', Image.DecompressionBombWarning)
# PIL logs what a broken file makes its decoders say (`ERROR PIL.TiffImagePlugin: ...`); such a file is
# left out, counted and named in the summary instead.
logging.getLogger('PIL').setLevel(logging.CRITICAL)
warnings.filterwarnings('ignore', category=UserWarning, module=r'PIL\.')  # e.g. 'Corrupt EXIF data'

# Shorter-side bucket edges; each bucket is its own dataset `<lo>-<hi>`.
BUCKET_EDGES = (0, 64, 128, 256, 512, 768, 1024, 2**20)
BUCKETS = [f'{lo}-{hi}' for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:])]
UNBUCKETED = f'{BUCKET_EDGES[0]}-{BUCKET_EDGES[-1]}'

# Output schema (MDS encodings), and the value of a missing column or a null.
FLOAT_COLUMNS = ('punsafe', 'pwatermark', 'similarity', 'aesthetic_score')
STR_COLUMNS = ('caption', 'url', 'key', 'status', 'error_message', 'exif')
SIZE_COLUMNS = ('width', 'height', 'original_width', 'original_height')
COLUMNS = {**{c: 'float64' for c in FLOAT_COLUMNS}, **{c: 'str' for c in STR_COLUMNS},
           **{c: 'int32' for c in SIZE_COLUMNS}, 'jpg': 'bytes', 'hash': 'int64'}
DEFAULTS = {'float64': math.nan, 'str': '', 'int64': 0}
REQUIRED = ('jpg', 'caption', 'width', 'height', 'status')
MDS_COLUMNS = sorted(COLUMNS)  # MDS stores a sample's columns in name order
FIXED_DTYPES = {'float64': '<f8', 'int32': '<i4', 'int64': '<i8'}
MDS_SIZES = {'float64': 8, 'int32': 4, 'int64': 8, 'str': None, 'bytes': None}
VAR_COLUMNS = [c for c in MDS_COLUMNS if MDS_SIZES[COLUMNS[c]] is None]
# Input names that differ from the output name, tried in order (laion_download_all.sh's DATASET presets:
# the aesthetic set's metadata is upper case; COYO and DataComp name their CLIP ViT-B/32 similarity and
# COYO its LAION aesthetic v2 score their own way).
ALIASES = {'aesthetic_score': ('aesthetic_score', 'AESTHETIC_SCORE', 'aesthetic_score_laion_v2'),
           'similarity': ('similarity', 'clip_b32_similarity_score', 'clip_similarity_vitb32')}

# A merge while running (so readers can start early) of t seconds waits at least t / MERGE_SHARE
# after it: the driver spends at most this share of its time merging (docs/scale.md: merge cadence).
MERGE_SHARE = 0.1
# A look at --local of t seconds is followed by the next at least t / SCAN_SHARE later (and --poll_interval):
# the listing grows with every shard converted (their NNNNN_converted.json stay): 1.1-1.5 s for 230k files
# in a local folder here, ~1 s per 5,000 in the test bed's S3 (~50 s at 230k). Without this a run's listing
# grew as shards x looks; the driver spends at most this share of its time listing.
SCAN_SHARE = 0.1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # the platform's stop, Ctrl-C
RECORDS = '_cloudwriter'  # record area under --remote; not *.json so merge_index never sees it
# Summary folder under --local: img2dataset parses a shard number from every *.json directly in it.
SUMMARY_DIR = '_cloudwriter'
UNREADABLE_HEADER = 'success but no readable image header'
# Why an image that downloaded (status success) is left out (--verify header: UNREADABLE_HEADER only).
DOES_NOT_DECODE = 'success but does not decode with PIL'
BOMB = f"success but over PIL's pixel limit ({Image.MAX_IMAGE_PIXELS:,} pixels: a decompression bomb)"
# Each image left out is named (key, url, reason, what PIL said) in one JSON line of
# <remote>/_cloudwriter[/<subfolder>]/<NNNNN>.left_out.jsonl beside its record; the record and the
# summary keep its count and the first FIRST_NAMED names per reason (by key), so the driver's memory and
# the summary stay the same size whatever the number left out (~20M at LAION-2B's ~1%).
LEFT_OUT = '.left_out.jsonl'
FIRST_NAMED = 20
EXIT_OK, EXIT_BAD_INPUT, EXIT_FATAL = 0, 1, 2  # a signal ends a run with 128 + its number (SIGTERM: 143)
SUBFOLDER_RE = re.compile(r'(?!\.{1,2}$)(?!\d+$)[A-Za-z0-9._-]+')  # not a shard id: those are digits

# One run at a time: a flock on <local>/_cloudwriter/LOCK (and an own --staging's), which the kernel
# drops when the run dies; a lease at <remote>/_cloudwriter[/<subfolder>]/LEASE, refreshed by the run.
LOCK, LEASE = 'lock', 'run.lease'
LEASE_HEARTBEAT_S = 10.0
LEASE_STALE_S = 60.0  # not refreshed for this long: its run is gone (at once if it ran on this host)
STOP_GRACE_S = 2.0  # a stopping run waits this long for a record written just before its lease said so
HOST = socket.gethostname()
# An S3-compatible endpoint under any of these names (the first set wins) becomes S3_ENDPOINT_URL, the
# one endpoint of reads (pyarrow), writes (streaming) and every engine task.
S3_ENDPOINT_VARS = ('S3_ENDPOINT_URL', 'AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'FSSPEC_S3_ENDPOINT_URL')
# Storage settings (names starting so) carried to every pyspark / ray task with --storage_env forward.
STORAGE_ENV = ('S3_', 'AWS_', 'FSSPEC_', 'GOOGLE_APPLICATION_CREDENTIALS', 'GCS_', 'OCI_', 'AZURE_')
# Input columns are cast to these before encoding; a value that does not cast skips its shard.
ARROW_TYPES = {'float64': pa.float64(), 'str': pa.string(), 'int32': pa.int32(), 'int64': pa.int64(),
               'bytes': pa.binary()}

# --preview: each shard keeps its first PREVIEW_PER_SHARD samples of each bucket as thumbnails (each
# ~2.5 ms and ~5 KB) in <remote>/_cloudwriter[/<subfolder>]/<NNNNN>.preview; sheets are drawn from them.
PREVIEW_PER_SHARD = 4
PREVIEW_THUMB = 128  # px, longer side of a thumbnail (its grid cell is square)
PREVIEW_LINES = 3  # text lines under a tile: size + key, then the caption's start

log = logging.getLogger('laion_cloudwriter')


# ---------------------------------------------------------------------------------------------
# Flags: each checked by its argparse type= / choices= before anything heavy is imported.
# ---------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'67108864', '64mb', '512kb', '1gb' (binary units, as streaming's size_limit) -> bytes."""
    text = text.strip().lower()
    for suffix, scale in (('kb', 2**10), ('mb', 2**20), ('gb', 2**30), ('b', 1), ('', 1)):
        if text.endswith(suffix) and text[:len(text) - len(suffix)].strip().isdigit():
            size = int(text[:len(text) - len(suffix)]) * scale
            if 0 < size < 2**32:
                return size
    raise argparse.ArgumentTypeError(f'{text!r}: give bytes or a size like 64mb, between 1b and 4gb')


def at_least(kind: type, low: float, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: a `kind` number >= `low` (> `low` when `strict`)."""
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f'{text!r}: give a{"n integer" if kind is int else " number"} '
                                             f'{">" if strict else ">="} {low}')
        return value
    return check


def subfolder_name(text: str) -> str:
    """A plain folder name: letters, digits, '.', '_', '-', not '.', '..' nor only digits."""
    if text and not SUBFOLDER_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f'{text!r}: give one plain folder name (letters, digits, ".", "_", '
                                         '"-"; not "..", not only digits, no "/")')
    return text


def plain_remote(text: str) -> str:
    """`file:///path` -> `/path` (a folder, like the other scripts take it); other remotes unchanged."""
    url = urlparse(text)
    if url.scheme != 'file':
        return text.rstrip('/') or text
    if url.netloc not in ('', 'localhost') or not url.path:
        raise argparse.ArgumentTypeError(f'{text!r}: a file:// remote is file:///absolute/path')
    return url.path.rstrip('/') or '/'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--local', default='',
                   help='Folder or URL (s3://, gs://, hdfs://...) of img2dataset NNNNN.parquet shards.')
    p.add_argument('--remote', type=plain_remote, default='',
                   help='Folder or URL (file://, s3://, gs://, oci://...) to write the MDS datasets to.')
    p.add_argument('--subfolder', type=subfolder_name, default='',
                   help='Write <remote>/<bucket>/<subfolder>: one per machine, joined by --merge_only.')
    p.add_argument('--bucketed', action='store_true',
                   help='One dataset per shorter-side bucket (else one dataset 0-1048576).')
    p.add_argument('--keep_parquet', action='store_true',
                   help='Keep parquet shards and their _stats.json after conversion.')
    p.add_argument('--distributor', choices=sorted(ENGINES), default='multiprocessing',
                   help='Where the shard tasks run: here (--processes), or the pyspark / ray cluster.')
    p.add_argument('--storage_env', choices=('forward', 'cluster'), default='forward',
                   help='forward: carry this shell\'s storage settings (S3_*, AWS_*, GCS_*...) to every '
                        'pyspark / ray task; cluster: the workers use their own.')
    p.add_argument('--connect_timeout', type=at_least(float, 0, strict=True), default=10.0,
                   help='Seconds to wait for the cluster (RAY_ADDRESS, a spark:// master) to answer.')
    p.add_argument('--processes', type=at_least(int, 1), default=os.cpu_count() or 1,
                   help='Worker processes (multiprocessing), each converting one parquet shard at a time.')
    p.add_argument('--poll_interval', type=at_least(float, 0, strict=True), default=10.0,
                   help='Seconds between looks at --local for newly finished shards.')
    p.add_argument('--wait_before_start', type=at_least(float, 0), default=0.0,
                   help='Seconds to sleep before starting (e.g. while the download creates --local).')
    p.add_argument('--merge_interval', type=at_least(float, 0), default=600.0,
                   help='Least seconds between rewrites of each bucket\'s index.json while running.')
    p.add_argument('--size_limit', type=parse_size, default='256mb',
                   help='MDS shard size limit, bytes or e.g. 64mb (64mb when RAM < 2 GB x --processes).')
    p.add_argument('--shards_per_task', type=at_least(int, 1), default=16,
                   help='Input shards one task converts one after another into one MDS part per bucket, each '
                        'bucket\'s open MDS shard carried from one to the next: one partly filled MDS shard '
                        'per bucket and task, not per input shard, so readers open a bucket faster. Its '
                        'parquets are deleted once its record is up; beside a running download a finished '
                        'shard waits at most --merge_interval s for its task to fill.')
    p.add_argument('--batch_size', type=at_least(int, 1), default=256,
                   help='Parquet rows read at a time per worker (bounds memory).')
    p.add_argument('--upload_threads', type=at_least(int, 1), default=8,
                   help='Parallel uploads per worker for a cloud remote.')
    p.add_argument('--retry', type=at_least(int, 1), default=2,
                   help='Attempts per upload (1: no second try) before the run stops.')
    p.add_argument('--staging', default='',
                   help='Local scratch for parts before upload (default <local>/_cloudwriter_staging).')
    p.add_argument('--summary', default='',
                   help='Summary JSON path or URL (default <local>/_cloudwriter/summary[_<subfolder>].json).')
    p.add_argument('--merge_only', action='store_true',
                   help='Only write <remote>/<bucket>/index.json over every subfolder\'s done shards.')
    p.add_argument('--verify', choices=sorted(CHECKS), default='full',
                   help='full: store only images that PIL\'s defaults decode whole, as a trainer\'s loader '
                        'does (Image.open(...).load(), its pixel limit included); the others are left out, '
                        'counted and named. header: read headers only, storing files that may not decode: '
                        'for data verified elsewhere.')
    p.add_argument('--preview', type=at_least(int, 0), default=0,
                   help='Draw N samples of each bucket into preview[_<subfolder>]_<bucket>.png (0: off).')
    p.add_argument('--wandb_project', default='',
                   help='Log progress to this wandb project (only if wandb is installed).')
    args = p.parse_args(argv)
    if not args.remote:
        p.error('--remote is required')
    if not args.merge_only and not args.local:
        p.error('--local is required (unless --merge_only)')
    if args.distributor != 'multiprocessing' and importlib.util.find_spec(args.distributor) is None:
        p.error(f'--distributor {args.distributor}: the {args.distributor} package is not installed; '
                f'pip install {args.distributor} (on every machine of the cluster)')
    args.remote_kind = 'cloud' if '://' in args.remote else 'folder'
    if args.local and '://' not in args.local:
        args.local = os.path.abspath(args.local)  # engine workers do not share our working directory
    return args


# >>> twin: address (verbatim in caption_images.py, curate_images.py, laion_cloudwriter.py,
# precompute_latents.py; test_twins.py)
def address(path: str) -> tuple[str, ...]:
    """Where `path` points, comparable across spellings: ('s3://bucket', 'a', 'b') for a remote;
    ('', 'tmp', 'x') for a folder, after resolving relative paths, `.`, `..`, `~` and symlinks."""
    url = urllib.parse.urlparse(path)
    if url.scheme in ('', 'file'):
        real = os.path.realpath(os.path.expanduser(url.path if url.scheme else path))
        return ('',) + tuple(p for p in real.split('/') if p)
    return (f'{url.scheme.lower()}://{url.netloc.lower()}',) + tuple(p for p in url.path.split('/') if p)
# <<< twin: address


def same_place(args: argparse.Namespace) -> str:
    """'' unless --local and --remote are one place or one holds the other (the parts would be written
    among the parquet shards, and a run deletes those): then the line that says so."""
    x, y = address(args.local), address(args.remote)
    relation = ('is the same place as' if x == y else 'is inside' if x[:len(y)] == y
                else 'holds' if y[:len(x)] == x else '')
    return (f'--local {args.local} {relation} --remote {args.remote}: give the MDS output a place of its '
            'own, outside the download\'s folder') if relation else ''


# ---------------------------------------------------------------------------------------------
# Where things live: --local on a filesystem pyarrow (else fsspec) reaches; the remote as a row of its
# kind (a folder: written in place; anything else: streaming's CloudUploader / CloudDownloader),
# picked once from --remote (args.remote_kind), like the engines.
# ---------------------------------------------------------------------------------------------

def input_fs(url: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem `url` (a --local folder or a file in it) lives on, and its path there: a local
    path (memory-mapped reads); s3://, gs://, hdfs://... through pyarrow (S3_ENDPOINT_URL, as streaming
    takes it and main() sets it from S3_ENDPOINT_VARS, for S3-compatible stores); any other scheme
    through fsspec."""
    if '://' not in url:
        return pafs.LocalFileSystem(use_mmap=True), os.path.abspath(url)
    parsed = urlparse(url)
    endpoint = os.environ.get('S3_ENDPOINT_URL')
    if parsed.scheme == 's3' and endpoint:
        fs = pafs.S3FileSystem(endpoint_override=urlparse(endpoint).netloc or endpoint,
                               scheme=urlparse(endpoint).scheme or 'https')
        return fs, (parsed.netloc + parsed.path).rstrip('/')
    try:
        return pafs.FileSystem.from_uri(url)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec  # not a pyarrow scheme: fsspec's (its package for the scheme must be installed)
        fs, path = fsspec.core.url_to_fs(url)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip('/')


def write_file(url: str, data: bytes) -> None:
    """`data` to a local path or a URL on --local's kind of filesystem (summary, preview sheets)."""
    fs, where = input_fs(url)
    fs.create_dir(os.path.dirname(where), recursive=True)
    with fs.open_output_stream(where) as f:
        f.write(data)


def join(*parts: str) -> str:
    return '/'.join(p.strip('/') if i else p.rstrip('/') for i, p in enumerate(parts) if p)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def uploader(staging: str, remote: str, retry: int):
    """streaming's uploader from a local staging root to a remote root (keeps nothing local)."""
    os.makedirs(staging, exist_ok=True)
    from streaming.base.storage.upload import CloudUploader  # imports torch: only for a cloud remote
    return CloudUploader.get((staging, remote), keep_local=False, retry=retry, exist_ok=True)


def put_folder(args: argparse.Namespace, rel: str, chunks: Iterable[bytes]) -> None:
    path = os.path.join(args.remote, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        f.writelines(chunks)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def put_cloud(args: argparse.Namespace, rel: str, chunks: Iterable[bytes]) -> None:
    root = os.path.join(args.staging, f'publish{os.getpid()}')
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    with open(os.path.join(root, rel), 'wb') as f:
        f.writelines(chunks)
    uploader(root, args.remote, args.retry).upload_file(rel)  # removes the local copy


def list_folder(remote: str, prefix: str, suffix: str) -> list[str]:
    base = Path(remote, prefix)
    return sorted(str(p.relative_to(remote)) for p in base.rglob(f'*{suffix}')) if base.is_dir() else []


def list_cloud(remote: str, prefix: str, suffix: str) -> list[str]:
    from streaming.base.storage.upload import CloudUploader
    with tempfile.TemporaryDirectory() as tmp:
        keys = CloudUploader.get((tmp, remote), exist_ok=True).list_objects(prefix.strip('/') + '/') or []
    root = urlparse(remote).path.strip('/')
    return sorted(k[len(root):].strip('/') if root else k for k in keys if k.endswith(suffix))


def read_cloud(url: str) -> bytes:
    from streaming.base.storage.download import CloudDownloader
    with tempfile.TemporaryDirectory() as tmp:
        dest = os.path.join(tmp, 'f')
        try:
            CloudDownloader.direct_download(url, dest)
        except Exception as e:  # streaming raises a missing S3 object as it is (a 404 ClientError)
            if getattr(e, 'response', {}).get('Error', {}).get('Code') in ('404', 'NoSuchKey'):
                raise FileNotFoundError(url) from e
            raise
        return Path(dest).read_bytes()


def settle_folder(record: dict, parts: str, args: argparse.Namespace) -> None:
    """Every file is fsynced as it lands; then the new folders' entries too."""
    for bucket in record['parts']:
        part = Path(parts, bucket, args.subfolder, record['shard'])
        fsync_file(str(part))
        fsync_file(str(part.parent))


def check_listed(record: dict, staging: str, args: argparse.Namespace) -> None:
    """Check that every file of a shard's parts is listed at the remote."""
    sid, sub = record['shard'], args.subfolder
    files, listed = [], set()
    up = uploader(staging, args.remote, args.retry)
    for bucket, part in record['parts'].items():
        rel = join(bucket, sub, sid)
        files += [join(rel, mds_name(i)) for i in range(len(part['bytes']))] + [join(rel, 'index.json')]
        listed.update(up.list_objects(rel + '/') or [])
    root = urlparse(args.remote).path.strip('/')
    missing = [f for f in files if join(root, f).strip('/') not in listed]
    if missing:
        raise RuntimeError(f'uploaded but not listed at the remote: {missing[:3]}')


def land_cloud(parts: str, args: argparse.Namespace) -> Callable[[str], Any]:
    up = uploader(parts, args.remote, args.retry)
    return lambda path: up.upload_file(os.path.relpath(path, parts))


@dataclass(frozen=True)
class RemoteKind:
    """One kind of --remote: how a file is put (whole or not at all), read and listed there, and how
    a worker lands a shard's parts, each MDS file as soon as it is written."""
    put: Callable[[argparse.Namespace, str, Iterable[bytes]], None]  # (args, rel, chunks)
    read: Callable[[str], bytes]  # a file's URL -> its bytes; FileNotFoundError if there is none
    list: Callable[[str, str, str], list[str]]  # (remote, prefix, suffix) -> keys relative to remote
    parts: Callable[[argparse.Namespace], str]  # the root this worker writes a shard's parts below
    land: Callable[[str, argparse.Namespace], Callable[[str], Any]]  # (parts, args) -> land(file)
    settle: Callable[[dict, str, argparse.Namespace], None]  # (record, parts, args): all files landed
    staged: bool  # the parts are a local copy (removed once up); else they are the remote's own files


REMOTES = {
    # written in place: fsync + rename; a task run twice writes the same bytes under the shard's id
    'folder': RemoteKind(put_folder, lambda url: Path(url).read_bytes(), list_folder,
                         lambda args: args.remote, lambda parts, args: fsync_file, settle_folder, False),
    # streaming's CloudUploader / CloudDownloader; parts staged per process, so two runs of one
    # shard (an engine's retry beside a slow first try) never share files
    'cloud': RemoteKind(put_cloud, read_cloud, list_cloud,
                        lambda args: os.path.join(args.staging, 'parts', str(os.getpid())),
                        land_cloud, check_listed, True),
}


def put(args: argparse.Namespace, rel: str, data: bytes | Iterable[bytes]) -> None:
    """Write `<remote>/<rel>` whole or not at all (a rename, or one PUT), from its bytes or from chunks
    of them (never all in memory at once)."""
    REMOTES[args.remote_kind].put(args, rel, [data] if isinstance(data, bytes) else data)


def read(args: argparse.Namespace, rel: str) -> bytes:
    """The bytes of `<remote>/<rel>`; FileNotFoundError if there is none."""
    return REMOTES[args.remote_kind].read(join(args.remote, rel))


# ---------------------------------------------------------------------------------------------
# Checks before any work: --local exists; one run at a time (a flock on --local, a lease at the remote).
# ---------------------------------------------------------------------------------------------

class RunError(Exception):
    """A reason not to start: printed as one `error:` line, exit 2."""


def lock_folder(folder: str, flag: str) -> int:
    """Hold an exclusive flock on `folder`/lock until this process ends (the kernel drops it even
    after kill -9, so it never goes stale); refuse if another run holds it. Returns the fd."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f'{flag} {folder}: cannot be used ({e})') from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors='replace').strip() or '?'
        os.close(fd)
        raise RunError(f'{flag} {folder} is in use by another laion_cloudwriter run (pid {owner}); wait for '
                       'it to end (the lock ends with that process)') from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def proc_start(pid: int) -> str | None:
    """When process `pid` of this machine started (tells it from a later one with its pid); None if
    there is none."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):  # no such process (or no /proc: then only the lease's age counts)
        return None


class Lease:
    """This run's claim on `<remote>/_cloudwriter[/<subfolder>]/run.lease`: taken at start, refreshed
    every LEASE_HEARTBEAT_S by a thread, released at the end. It is stale once its run is gone (same
    host: at once; another host: LEASE_STALE_S after its last refresh), and then taken over."""

    def __init__(self, args: argparse.Namespace, subfolder: str | None = None):
        self.args = args
        self.subfolder = args.subfolder if subfolder is None else subfolder
        self.rel = join(RECORDS, self.subfolder, LEASE)
        self.url = join(args.remote, self.rel)
        self.mine = {'token': uuid.uuid4().hex, 'host': HOST, 'pid': os.getpid(),
                     'start': proc_start(os.getpid()), 'local': args.local}
        self.lost = ''  # why this run no longer holds the lease (another took it over)
        self.stopping = False  # set by halt_tasks: its tasks record nothing more
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def read(self) -> dict | None:
        try:
            return json.loads(read(self.args, self.rel))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {}

    def write(self, released: bool = False) -> None:
        lease = {**self.mine, 'seen': time.time(), 'released': released, 'stopping': self.stopping}
        put(self.args, self.rel, json.dumps(lease).encode())

    def held_by_other(self, lease: dict | None,
                      advice: str = 'wait for it to end or use another --subfolder') -> str:
        """'' if `lease` is ours, absent, released or stale; else a line saying who holds it."""
        if not lease or lease.get('released') or lease.get('token') == self.mine['token']:
            return ''
        age = time.time() - lease.get('seen', 0)
        gone = lease.get('host') == HOST and proc_start(lease.get('pid', 0)) != lease.get('start')
        if gone or age > LEASE_STALE_S:
            return ''
        who = f"host {lease.get('host')}, pid {lease.get('pid')}, --local {lease.get('local')}"
        return (f'{self.args.remote} (--subfolder {self.subfolder or "none"}) is being written by '
                f'another laion_cloudwriter run ({who}, seen {age:.0f} s ago); {advice}; its lease goes '
                f'stale {LEASE_STALE_S:.0f} s after that run dies, or delete {self.url} if you know it is '
                'dead')

    def acquire(self) -> None:
        """Take the lease or refuse. Written, then read back after a while longer than a write: of
        two runs starting at once, the earlier writer sees the later one's lease and refuses."""
        other = self.held_by_other(self.read())
        if other:
            raise RunError(other)
        t0 = time.time()
        self.write()
        time.sleep(min(max(10 * (time.time() - t0), 0.2), 5.0))
        other = self.held_by_other(self.read())
        if other:
            raise RunError(other)

    def start_refreshing(self) -> None:
        def refresh() -> None:
            while not self.stop.wait(LEASE_HEARTBEAT_S):
                with contextlib.suppress(Exception):  # a failing remote stops the run through its writes
                    current = self.read()
                    if current and current.get('token') != self.mine['token']:
                        self.lost = (f'{self.url}: another run took over this remote (host '
                                     f'{current.get("host")}, pid {current.get("pid")}); this run stops, '
                                     'nothing unrecorded was deleted')
                        return
                    self.write()
        self.thread = threading.Thread(target=refresh, daemon=True, name='lease')
        self.thread.start()

    def halt_tasks(self) -> None:
        """Mark the lease `stopping` (this run still holds it): a task that has not recorded its shard
        yet abandons it (see still_ours)."""
        self.stopping = True
        with contextlib.suppress(Exception):
            self.write()

    def release(self, remote_ok: bool = True) -> None:
        """Mark the lease released (when it is still ours): the next run starts at once. After a
        remote failure nothing is written (it would only retry against the failing remote): the lease
        goes stale on its own, at once for a rerun on this host."""
        self.stop.set()
        if not remote_ok:
            return
        if self.thread is not None:
            self.thread.join()
        with contextlib.suppress(Exception):
            if not self.lost and self.read().get('token') == self.mine['token']:
                self.write(released=True)


I2D_FILE = re.compile(r'\d+(\.parquet|_stats\.json|_converted\.json)|done')  # what img2dataset (and we) leave


def wait_for_shards(fs: pafs.FileSystem, root: str, args: argparse.Namespace) -> bool:
    """Wait until --local holds a file of an img2dataset output (a shard, its _stats.json, `done`),
    saying so once; refuse a folder of other parquet files (e.g. the metadata) at once. Nothing is
    written there before. False if a stop signal came first."""
    said = False
    while not _STOP['signal']:
        names = list_input(fs, root)
        if any(I2D_FILE.fullmatch(n) for n in names):
            return True
        others = sorted(n for n in names if n.endswith('.parquet'))
        if others:
            raise RunError(f'--local {args.local} holds {len(others)} parquet files that are not '
                           f'img2dataset shards: no _stats.json (e.g. {others[0]}; img2dataset writes '
                           'NNNNN.parquet, then NNNNN_stats.json); is it the metadata folder? give the '
                           'download\'s OUTPUT_FOLDER')
        if not said:
            print(f'--local {args.local}: no img2dataset shard yet; waiting for the download to write its '
                  f'first NNNNN.parquet, looking every {args.poll_interval:g} s', file=sys.stderr, flush=True)
            said = True
        sleep_unless_stopped(args.poll_interval)
    return False


def take_ownership(args: argparse.Namespace) -> Lease | None:
    """Check that --local is an existing folder (the download's output), here or remote, and wait for its
    first shard; lock it (a folder here; a remote one is guarded by the lease alone) and an own --staging
    for this process, take the remote's lease. None if a stop signal came while waiting."""
    try:
        fs, root = input_fs(args.local)
        kind = fs.get_file_info(root).type
    except Exception as e:  # a bucket that does not exist, no credentials, a scheme nothing reads
        raise RunError(f'--local {args.local}: cannot be read ({type(e).__name__}: {headline(e)})') from None
    if kind == pafs.FileType.NotFound:
        raise RunError(f'--local {args.local} does not exist; give the download\'s output folder (with '
                       '--wait_before_start if the download creates it)')
    if kind != pafs.FileType.Directory:
        raise RunError(f'--local {args.local} is a file; give the folder of img2dataset parquet shards')
    if not wait_for_shards(fs, root, args):
        return None
    here = isinstance(fs, pafs.LocalFileSystem)
    if here:
        lock_folder(os.path.join(args.local, SUMMARY_DIR), '--local')
    if args.staging:
        lock_folder(args.staging, '--staging')
    elif here:
        args.staging = os.path.join(args.local, '_cloudwriter_staging')
    else:  # scratch of this run alone, removed at its end
        args.staging = tempfile.mkdtemp(prefix='cloudwriter-staging-')
    os.makedirs(args.staging, exist_ok=True)
    lease = Lease(args)
    try:
        lease.acquire()
    except RunError:
        raise
    except Exception as e:  # e.g. a bucket that does not exist, no credentials
        raise RunError(f'{args.remote}: cannot be read or written ({type(e).__name__}: {e})') from e
    args.run_token = lease.mine['token']  # the tasks' way to tell that this run still runs
    return lease


# ---------------------------------------------------------------------------------------------
# The plan: what the remote has recorded, what --local holds finished.
# ---------------------------------------------------------------------------------------------

_CONFIGS: dict[str, dict] = {}  # one object per distinct config: the driver holds 230k records


def load_record(data: bytes) -> dict[str, Any]:
    """A record in the current form (an older one held each part's index.json in full as `index`, one
    version named every image left out in it as `left_out`, and before tasks of several input shards a
    record held one, without `shards`)."""
    rec = json.loads(data)
    if isinstance(rec.get('left_out'), list):
        names, rec['left_out'], rec['left_out_first'] = rec['left_out'], len(rec['left_out']), {}
        for x in sorted(names, key=lambda x: x['key']):
            first = rec['left_out_first'].setdefault(x['reason'], [])
            if len(first) < FIRST_NAMED:
                first.append(x)
    if 'index' in rec:
        shards = {bucket: index['shards'] for bucket, index in rec.pop('index').items()}
        rec['parts'] = {b: {'bytes': [e['raw_data']['bytes'] for e in entries],
                            'samples': [e['samples'] for e in entries]} for b, entries in shards.items()}
        own = ('samples', 'zip_data', 'raw_data')  # an entry's own facts; the rest is the config
        rec['config'] = next(({k: v for k, v in entries[0].items() if k not in own}
                              for entries in shards.values() if entries), {})
    if 'shards' not in rec:  # a record of one input shard, before tasks converted several
        rec['shards'] = [rec['shard']]
        if 'preview' in rec:
            rec['preview'] = {rec['shard']: rec['preview']}
    return shared_config(rec)


def shared_config(rec: dict[str, Any]) -> dict[str, Any]:
    """`rec` with its config replaced by the equal one other records hold (memory, at 230k records)."""
    rec['config'] = _CONFIGS.setdefault(json.dumps(rec['config']), rec['config'])
    return rec


def fold_left_out(rec: dict[str, Any], first: dict[str, list[dict]]) -> dict[str, Any]:
    """`rec` without its first names left out, which join `first` (the FIRST_NAMED smallest keys per
    reason over every record folded): what the driver keeps of them, whatever their number."""
    for reason, names in rec.pop('left_out_first', {}).items():
        first[reason] = heapq.nsmallest(FIRST_NAMED, first.get(reason, []) + names, key=lambda x: x['key'])
    return rec


def record_subfolder(rel: str) -> str:
    """The --subfolder ('' = none) of a file `<RECORDS>[/<subfolder>]/<name>`."""
    return os.path.dirname(rel)[len(RECORDS):].strip('/')


def read_records(args: argparse.Namespace, subfolder: str | None, others: set[str] | None = None,
                 first: dict[str, list[dict]] | None = None) -> dict[str, dict[str, dict]]:
    """Done shards' records, by subfolder ('' = none) then shard id. `subfolder=None`: every one.
    The other subfolders with records that the listing saw are added to `others`; the records' first
    names left out are folded into `first`."""
    wanted: dict[str, str] = {}  # rel -> its subfolder
    for rel in REMOTES[args.remote_kind].list(args.remote, join(RECORDS, subfolder or ''), '.record'):
        sub = record_subfolder(rel)
        if subfolder is None or sub == subfolder:  # not a record of another subfolder below ours
            wanted[rel] = sub
        elif others is not None:
            others.add(sub)
    out: dict[str, dict[str, dict]] = {}
    with ThreadPoolExecutor(16) as pool:  # one small GET each: in parallel
        for sub, data in zip(wanted.values(), pool.map(functools.partial(read, args), wanted)):
            rec = fold_left_out(load_record(data), {} if first is None else first)
            out.setdefault(sub, {})[rec['shard']] = rec
    return out


def shard_path(local: str, sid: str) -> str:
    """How messages name a shard's parquet: `--local` as given (a folder is made absolute) + its name."""
    return join(local, f'{sid}.parquet')


def list_input(fs: pafs.FileSystem, root: str) -> set[str]:
    return {info.base_name for info in fs.get_file_info(pafs.FileSelector(root))}


def finished_shards(names: set[str]) -> list[str]:
    """Ids of the shards whose parquet and _stats.json are both there, in order."""
    return sorted(n[:-len('_stats.json')] for n in names
                  if n.endswith('_stats.json') and f"{n[:-len('_stats.json')]}.parquet" in names)


def unfinished_shards(names: set[str], done: set[str]) -> list[str]:
    """Ids of the parquet files without a _stats.json (img2dataset writes it once a shard is finished)
    that are not converted either: what a finished run leaves unconverted."""
    sids = (n[:-len('.parquet')] for n in names if n.endswith('.parquet'))
    return sorted(sid for sid in sids if f'{sid}_stats.json' not in names and sid not in done)


def delete_input(fs: pafs.FileSystem, root: str, sid: str) -> None:
    """Remove a converted shard's parquet, then turn its _stats.json into `NNNNN_converted.json`.

    img2dataset takes every `NNNNN_*.json` in its output folder for a finished shard, so a download
    resumed beside us does not fetch converted shards again; we only look at `*_stats.json`.
    """
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(join(root, f'{sid}.parquet'))
    with contextlib.suppress(FileNotFoundError):
        fs.move(join(root, f'{sid}_stats.json'), join(root, f'{sid}_converted.json'))


def prior_records(args: argparse.Namespace, fs: pafs.FileSystem, root: str,
                  first: dict[str, list[dict]]) -> dict[str, dict]:
    """This (sub)folder's recorded shards (their first names left out folded into `first`), or RunError
    where this run must not write there. Deletes the input of shards recorded by a run that died before
    deleting it."""
    others: set[str] = set()
    records = read_records(args, args.subfolder, others, first).get(args.subfolder, {})
    if not args.subfolder and others:  # --merge_only publishes their shards in <remote>/<bucket>
        raise RunError(f'{args.remote} holds the runs of --subfolder {", ".join(sorted(others))}: a run '
                       'without --subfolder would replace <remote>/<bucket>/index.json with its own shards '
                       'only; give this run its own --subfolder, then --merge_only')
    mixed = [sid for sid, r in records.items() if r.get('bucketed') != args.bucketed]
    if mixed:
        raise RunError(f'{args.remote} holds shards written {"without" if args.bucketed else "with"} '
                       f'--bucketed (e.g. {mixed[0]}); use the same setting or another --remote/--subfolder')
    if not args.keep_parquet:
        names = list_input(fs, root)
        for sid in (sid for rec in records.values() for sid in rec['shards']):
            if {f'{sid}.parquet', f'{sid}_stats.json'} & names:
                delete_input(fs, root, sid)
    return records


# ---------------------------------------------------------------------------------------------
# Engines (--distributor): one function per engine with the same signature, picked by name
# (img2dataset's distributor.py). A task converts, uploads and records a group of shards (convert_task).
# ---------------------------------------------------------------------------------------------

RAY_TASK_RETRIES = 3  # a ray task whose worker dies is run again this often (spark: its maxFailures)
QUEUED_PER_SLOT = 2  # the driver keeps this many tasks submitted per engine slot: the queue stays short


@dataclass(frozen=True)
class Engine:
    submit: Callable[[list[str]], Future]  # a task's shard ids -> the future of its convert_task result
    slots: int  # tasks it runs at once; the driver keeps at most QUEUED_PER_SLOT x slots submitted
    stop: Callable[[bool], None]  # stop(now): now = drop the tasks in flight, else let them end
    progress: Any = None  # live (samples, bytes) counters, where the workers share memory with us


def storage_env(args: argparse.Namespace) -> dict[str, str]:
    """The driver's storage settings that its engine tasks take over (none with --storage_env cluster)."""
    if args.storage_env == 'cluster':
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV)}


def in_worker(source: str, args: argparse.Namespace, env: dict[str, str], sids: list[str]) -> dict[str, Any]:
    """convert_task in a pyspark or ray worker process, with the driver's storage settings `env` set
    first (they travel in the task's arguments: docs/laion_cloudwriter.md). This script travels as
    `source` and is loaded once per worker process (kept with its buffers for the next task)."""
    os.environ.update(env)
    name = f'laion_cloudwriter_{hashlib.sha1(source.encode()).hexdigest()[:12]}'
    if name not in sys.modules:
        module = types.ModuleType(name)
        sys.modules[name] = module  # dataclasses look their module up here
        exec(compile(source, 'laion_cloudwriter.py', 'exec'), module.__dict__)
    state = sys.modules[name]._WORKER
    if state.get('args') != args:
        state.clear()
        state['args'] = args
    return sys.modules[name].convert_task(sids)


def multiprocessing_engine(args: argparse.Namespace) -> Engine:
    """--processes forked workers on this machine."""
    ctx = mp.get_context('fork')
    progress = ctx.Array('q', 2)
    executor = ProcessPoolExecutor(args.processes, mp_context=ctx, initializer=init_worker,
                                   initargs=(progress, args))
    executor.submit(int).result()  # forks every worker now, before the lease thread starts

    def stop(now: bool) -> None:
        for proc in list(getattr(executor, '_processes', {}).values()) if now else []:
            with contextlib.suppress(Exception):  # a failing remote must not keep them busy
                proc.kill()
        # wait even after the kill: the executor's manager thread then closes its wakeup pipe before
        # we return, not while the interpreter exits (CPython 3.11's _python_exit writes to that pipe
        # unlocked: "OSError: handle is closed" printed after our last line on a loaded machine)
        executor.shutdown(wait=True, cancel_futures=True)
    return Engine(lambda sids: executor.submit(convert_task, sids), args.processes, stop, progress)


def pyspark_engine(args: argparse.Namespace) -> Engine:
    """One Spark job of one task per group of shards, on the session that spark-submit configures (e.g.
    `--master spark://host:7077`, `--conf spark.task.maxFailures=4`) or one already running, else
    Spark's default local[*] (which retries no task: give `--master local[N,4]` for that)."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession
    if SparkContext._active_spark_context is None:  # a new session: its master must answer first
        SparkContext._ensure_initialized()  # the JVM that spark-submit (or PYSPARK_SUBMIT_ARGS) set up
        master = SparkConf().get('spark.master', '')
        if master.startswith('spark://'):  # standalone (a dead one: ~60 s of retries, then a stack)
            for address in master[len('spark://'):].split(','):
                reachable(address, f'Spark master {master}', args.connect_timeout)
    sc = SparkSession.builder.appName('laion_cloudwriter').config('spark.ui.showConsoleProgress', 'false') \
        .getOrCreate().sparkContext
    sc.setLogLevel('ERROR')
    server = getattr(sc, '_accumulatorServer', None)  # we use no accumulators; a SIGTERM to our process
    if server is not None:  # group ends the JVM too, and socketserver prints the broken link's traceback
        server.handle_error = lambda request, client_address: None
    task = functools.partial(in_worker, Path(__file__).read_text(), args, storage_env(args))
    # every task the driver keeps submitted is a job in flight: a slot that frees takes the next
    # queued task at once, instead of idling while its job returns and the next is built
    jobs = ThreadPoolExecutor(QUEUED_PER_SLOT * sc.defaultParallelism, thread_name_prefix='spark-job')

    def stop(now: bool) -> None:
        if now:
            with contextlib.suppress(Exception):  # its JVM may be gone already (a SIGTERM to the group)
                sc.cancelAllJobs()
        jobs.shutdown(wait=not now, cancel_futures=True)
    return Engine(lambda sids: jobs.submit(lambda: sc.parallelize([sids], 1).map(task).collect()[0]),
                  sc.defaultParallelism, stop)


def ray_engine(args: argparse.Namespace) -> Engine:
    """One Ray task per group of shards (1 CPU), on the cluster ray.init finds (RAY_ADDRESS, or one that
    `ray start` began on this machine), else a new one on this machine."""
    import ray
    address = os.environ.get('RAY_ADDRESS', '')
    if address not in ('', 'auto', 'local') and not ray.is_initialized():  # a dead one: minutes of retries
        reachable(address.split('://')[-1], 'RAY_ADDRESS', args.connect_timeout)
    if not ray.is_initialized():
        ray.init(logging_level=logging.ERROR, log_to_driver=False)
    source, env = ray.put(Path(__file__).read_text()), ray.put(storage_env(args))
    task = ray.remote(num_cpus=1, max_retries=RAY_TASK_RETRIES)(in_worker)

    def stop(now: bool) -> None:
        if now:  # ends this job: the cluster kills its tasks
            with contextlib.suppress(Exception):
                ray.shutdown()
    return Engine(lambda sids: task.remote(source, args, env, sids).future(),
                  max(int(ray.cluster_resources().get('CPU', 1)), 1), stop)


def reachable(address: str, what: str, timeout: float) -> None:
    """Raise RunError unless something listens at `address` (host:port) within `timeout` s."""
    host, _, port = address.rpartition(':')
    try:
        socket.create_connection((host.strip('[]'), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RunError(f'{what} {address}: nothing answers there within {timeout:g} s '
                       f'({type(e).__name__}: {e}); start the cluster or fix the address '
                       '(--connect_timeout waits longer)') from None


ENGINES = {'multiprocessing': multiprocessing_engine, 'pyspark': pyspark_engine, 'ray': ray_engine}


def headline(e: BaseException) -> str:
    """The first line of an exception's message (a Spark job's: its Java exception's, which says why)."""
    text = str(getattr(e, 'java_exception', None) or e).strip()
    return text.splitlines()[0][:300] if text else ''


def start_engine(args: argparse.Namespace) -> Engine:
    """The --distributor's engine, with our stop-signal handlers back; RunError if it does not start."""
    try:
        engine = ENGINES[args.distributor](args)
    except RunError as e:
        raise RunError(f'--distributor {args.distributor}: {e}') from None
    except Exception as e:
        raise RunError(f'--distributor {args.distributor}: the engine did not start ({type(e).__name__}: '
                       f'{headline(e)})') from None
    for sig in STOP_SIGNALS:  # ours again: ray.init takes SIGTERM (sys.exit), SparkContext SIGINT
        signal.signal(sig, on_signal)
    return engine


# ---------------------------------------------------------------------------------------------
# The driver loop: scan --local, submit finished shards, collect their records, merge while running.
# ---------------------------------------------------------------------------------------------

_STOP = {'signal': 0}  # set by on_signal; the main loop then takes no new shard


def on_signal(signum: int, frame: Any) -> None:
    if not _STOP['signal']:
        _STOP['signal'] = signum
        print(f'{signal.Signals(signum).name}: stopping; shards in flight are abandoned (rerun redoes them), '
              'the index of the recorded ones is published', file=sys.stderr, flush=True)


def sleep_unless_stopped(seconds: float) -> None:
    end = time.time() + seconds
    while not _STOP['signal'] and time.time() < end:
        time.sleep(min(0.2, max(end - time.time(), 0)))


def wandb_run(args: argparse.Namespace):
    if not args.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        log.warning('wandb is not installed; not logging to wandb')
        return None
    return wandb.init(project=args.wandb_project, config=vars(args))


@dataclass
class Work:
    """What the driver loop knows: recorded tasks, tasks in flight, shards waiting or skipped."""
    fs: pafs.FileSystem
    root: str
    records: dict[str, dict]  # by the first shard of the task that wrote them
    stats: dict[str, Any]
    futures: dict[Future, list[str]]  # a task in flight -> its shards
    todo: list[str]  # finished at the last look, not yet submitted
    bad: set[str]
    first_left_out: dict[str, list[dict]]  # the first names per reason over every record
    done: set[str] = field(default_factory=set)  # the shards the records hold
    done_flag: bool = False  # the download's `done` file was seen: no shard comes after the last look
    waiting_since: float = math.inf  # when the shards in `todo` began to wait for a task
    next_scan: float = -math.inf  # no look at --local before this time
    said_waiting: str = ''

    def __post_init__(self) -> None:
        self.done = {sid for rec in self.records.values() for sid in rec['shards']}

    def add(self, rec: dict) -> None:
        self.records[rec['shard']] = shared_config(fold_left_out(rec, self.first_left_out))
        self.done.update(rec['shards'])
        self.stats['shards'] += len(rec['shards'])
        self.stats['samples'] += sum(rec['samples'].values())
        self.stats['bytes'] += rec['bytes']

    def wait_in_todo(self, sids: Iterable[str]) -> None:
        """Put shards (back) among those waiting, in order."""
        self.todo = sorted(set(self.todo) | set(sids))
        self.waiting_since = min(self.waiting_since, time.time()) if self.todo else math.inf


def scan(work: Work, args: argparse.Namespace) -> None:
    """Look at --local for newly finished shards, unless a task's worth waits already or the last look
    was less than max(--poll_interval, its own time / SCAN_SHARE) ago; note when the download's `done`
    file is there."""
    start = time.time()
    if len(work.todo) >= args.shards_per_task or start < work.next_scan:
        return
    # `done` before the listing: no shard missed
    work.done_flag = work.done_flag or \
        work.fs.get_file_info(join(work.root, 'done')).type != pafs.FileType.NotFound
    busy = {sid for sids in work.futures.values() for sid in sids}
    work.wait_in_todo(sid for sid in finished_shards(list_input(work.fs, work.root))
                      if sid not in work.done and sid not in work.bad and sid not in busy)
    work.next_scan = start + max(args.poll_interval, (time.time() - start) / SCAN_SHARE)


def next_task(work: Work, engine: Engine, args: argparse.Namespace) -> list[str]:
    """The shards of the next task: --shards_per_task of those waiting; fewer only once no more can come
    (`done`) or the first has waited --merge_interval s (no longer than a merge would keep it from
    readers), then spread over the engine's free slots. [] while they wait."""
    k, waiting = args.shards_per_task, len(work.todo)
    if waiting < k and not (work.done_flag or time.time() - work.waiting_since >= args.merge_interval):
        return []
    free = max(QUEUED_PER_SLOT * engine.slots - len(work.futures), 1)
    n = min(k, -(-waiting // free))
    sids, work.todo = work.todo[:n], work.todo[n:]
    return sids


def submit(work: Work, engine: Engine, args: argparse.Namespace) -> None:
    """Hand waiting shards to the engine as tasks, keeping QUEUED_PER_SLOT tasks per slot submitted."""
    while work.todo and len(work.futures) < QUEUED_PER_SLOT * engine.slots:
        sids = next_task(work, engine, args)
        if not sids:
            break
        work.futures[engine.submit(sids)] = sids
    if not work.todo:
        work.waiting_since = math.inf


def task_name(local: str, sids: list[str]) -> str:
    """How messages name a task: its first shard's parquet, and how many more it converts."""
    more = f' (and the {len(sids) - 1} shards after it in its task)' if len(sids) > 1 else ''
    return f'{shard_path(local, sids[0])}{more}'


def collect(work: Work, finished: set[Future], args: argparse.Namespace, bar: tqdm) -> None:
    """Record the finished tasks' shards; a bad shard is skipped (kept, named) and the others of its
    task wait for another, a fatal error raises. A task the engine gave up on (its worker died more often
    than the engine retries) is fatal: nothing unrecorded was deleted."""
    for fut in finished:
        sids = work.futures.pop(fut)
        try:
            out = fut.result()
        except Exception as e:
            out = {'error': f'{task_name(args.local, sids)}: its {args.distributor} task failed '
                            f'({type(e).__name__}: {headline(e)}); rerun to resume', 'fatal': True}
        if 'error' not in out:
            work.add(out)
            bar.update(len(out['shards']))
            work.wait_in_todo(set(sids) - work.done)  # none, unless an earlier record held others
        elif out['fatal']:
            work.stats['errors'].append(out['error'])
            raise ShardError(out['error'], fatal=True)
        else:
            if out.get('shard'):
                work.bad.add(out['shard'])
                work.stats['bad'].append(out['error'])
                tqdm.write(f'skipped, parquet kept: {out["error"]}', file=sys.stderr)
            work.wait_in_todo(set(sids) - work.bad)


def error(line: str) -> str:
    print(f'error: {line}', file=sys.stderr, flush=True)
    return line


def say_waiting(work: Work, args: argparse.Namespace) -> None:
    """Say once what the run waits for (again only when that changes)."""
    what = (f'{len(work.todo)} finished shard(s) wait for a task of --shards_per_task '
            f'{args.shards_per_task} to fill (at most --merge_interval {args.merge_interval:g} s, or until '
            'the `done` file)' if work.todo else
            'every finished shard is converted; waiting for more (img2dataset writes NNNNN_stats.json when a '
            'shard is finished) and for the `done` file the download writes at its end')
    kind = 'task' if work.todo else 'more'
    if kind != work.said_waiting:
        tqdm.write(f'{what}, looking every {args.poll_interval:g} s', file=sys.stderr)
        work.said_waiting = kind


def convert(work: Work, engine: Engine, args: argparse.Namespace, lease: Lease, start: float) -> str:
    """The driver loop: scan, submit, collect, and merge while running (at most every
    --merge_interval, and never more than MERGE_SHARE of the time), until done or a stop signal.
    Returns '' or the fatal error that ended it."""
    wb = wandb_run(args)
    bar = tqdm(desc='shards', unit='shard', dynamic_ncols=True, file=sys.stderr)
    last_merge, merged_n, merge_s, fatal = time.time(), len(work.records), 0.0, ''
    try:
        while not _STOP['signal']:
            if lease.lost:
                raise ShardError(lease.lost, fatal=True)
            scan(work, args)
            if not work.futures and not work.todo and work.done_flag:
                break
            submit(work, engine, args)
            if not work.futures:  # nothing finished to convert, or too few shards for a task yet
                say_waiting(work, args)
                sleep_unless_stopped(max(min(work.next_scan, work.waiting_since + args.merge_interval)
                                         - time.time(), 0.05))
                continue
            bar.total = len(work.done) + sum(map(len, work.futures.values())) + len(work.todo)
            finished, _ = wait(list(work.futures), timeout=0.5, return_when=FIRST_COMPLETED)
            if _STOP['signal']:  # tasks that failed as the engine stopped: abandoned, not fatal
                break
            collect(work, finished, args, bar)
            el = max(time.time() - start, 1e-9)
            samples, nbytes = engine.progress or (work.stats['samples'], work.stats['bytes'])
            bar.set_postfix_str(f'{samples / el:,.0f} samples/s, {nbytes / el / 1e6:,.1f} MB/s')
            if wb is not None and finished:
                wb.log({'samples': samples, 'bytes': nbytes, 'shards': len(work.done)})
            if len(work.records) > merged_n and \
                    time.time() - last_merge > max(args.merge_interval, merge_s / MERGE_SHARE):
                merge_s = time.time()
                merge_run(work.records, args)
                last_merge, merged_n = time.time(), len(work.records)
                merge_s = last_merge - merge_s
    except ShardError as e:
        fatal = e.message
    finally:
        bar.close()
        if wb is not None:
            wb.finish()
    return error(fatal) if fatal else ''


# ---------------------------------------------------------------------------------------------
# A task: a group of input shards read one after another, written as one MDS part per bucket, landed,
# then recorded once (the commit point of every shard in it).
# ---------------------------------------------------------------------------------------------

class ShardError(Exception):
    """A shard that cannot be converted; `fatal` stops the run, else `shard` is skipped (its task's
    other shards wait for another task; none when the task was abandoned)."""

    def __init__(self, message: str, fatal: bool, shard: str = ''):
        super().__init__(message, fatal)
        self.message, self.fatal, self.shard = message, fatal, shard


_WORKER: dict[str, Any] = {}


def init_worker(progress: Any, args: argparse.Namespace) -> None:
    """Per-process state; workers die with the parent (a killed run leaves no writer behind)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    for sig in STOP_SIGNALS:  # the main process decides what a signal stops
        signal.signal(sig, signal.SIG_IGN)
    _WORKER.update(progress=progress, args=args)


def still_ours(args: argparse.Namespace) -> bool:
    """Whether the run that gave this task is still running on (its lease neither stopping nor taken
    over); a task asks this before it records its shard."""
    try:
        lease = json.loads(read(args, join(RECORDS, args.subfolder, LEASE)))
    except FileNotFoundError:
        return True
    return lease.get('token') == args.run_token and not lease.get('stopping')


def remove_parts(out_root: str, sub: str, sid: str) -> None:
    for bucket in BUCKETS + [UNBUCKETED]:
        shutil.rmtree(join(out_root, bucket, sub, sid), ignore_errors=True)


def convert_group(sids: list[str]) -> dict[str, Any]:
    """Convert a task's input shards into one part per bucket, `<bucket>[/<sub>]/<first shard>`; returns
    its record once that is written at the remote.

    Each MDS file is fsynced (folder remote) or uploaded (cloud) by a thread of the worker as soon
    as it is written, beside the conversion of the rest; the record waits for all of them.
    """
    args = _WORKER['args']
    name = task_name(args.local, sids)
    kind = REMOTES[args.remote_kind]
    out_root = kind.parts(args)
    if 'io' not in _WORKER:
        _WORKER['io'] = ThreadPoolExecutor(args.upload_threads)
    io_threads = _WORKER['io']
    landing: list[Future] = []
    bad_input = False
    preview: dict[str, dict[str, list[dict]]] | None = {} if args.preview else None
    left_out = LeftOutNames()
    land_file = kind.land(out_root, args)
    land = lambda path: landing.append(io_threads.submit(land_file, path))  # noqa: E731
    records = join(RECORDS, args.subfolder, sids[0])
    try:
        try:
            record = write_parts([shard_path(args.local, sid) for sid in sids], out_root, args.subfolder,
                                 args, land, preview, left_out)
        except ShardError:
            raise
        except Exception as e:  # our own writes: the folder remote, or staging for a cloud one
            raise ShardError(f'{name}: writing to {out_root} failed ({type(e).__name__}: {e})',
                             fatal=True) from e
        for fut in landing:
            fut.result()
        kind.settle(record, out_root, args)
        if left_out.count:  # before the record, as the preview: a recorded shard has its names
            put(args, f'{records}{LEFT_OUT}', left_out.chunks())
        if preview is not None:  # before the record: a recorded shard has its candidates (their count
            # per shard and bucket is in the record, so the driver never lists these files)
            put(args, f'{records}.preview', json.dumps({'shard': sids[0], 'shards': preview}).encode())
            record['preview'] = {sid: {bucket: len(kept) for bucket, kept in buckets.items()}
                                 for sid, buckets in preview.items()}
        if not still_ours(args):  # its parts are removed below; a rerun converts the shards
            raise ShardError(f'{name}: abandoned, the run is stopping', fatal=False)
        put(args, f'{records}.record', json.dumps(record).encode())  # done
    except ShardError as e:
        bad_input = not e.fatal
        raise
    except Exception as e:
        raise ShardError(f'{name}: writing to {args.remote} failed ({type(e).__name__}: {e})',
                         fatal=True) from e
    finally:
        left_out.file.close()
        for fut in landing:
            fut.cancel()
        wait(landing)  # nothing still reads the files removed below
        if kind.staged or bad_input:  # staging, or the unindexed start of a skipped task
            remove_parts(out_root, args.subfolder, sids[0])
    return record


def convert_task(sids: list[str]) -> dict[str, Any]:
    """A group of input shards as a task of any engine: its record, or {'error': line, 'fatal': bool,
    'shard': the bad one} (a result, not an exception: an engine retries exceptions, and bad input would
    fail the same way). Its parquets are deleted, one after another, only once its record is up.

    Idempotent: a task already recorded (an engine runs a task again after its worker died past the
    record) returns that record, so the driver counts it once and no part is written twice.
    """
    args = _WORKER['args']
    try:
        record = load_record(read(args, join(RECORDS, args.subfolder, f'{sids[0]}.record')))
    except FileNotFoundError:
        record = None
    except Exception as e:
        return {'error': f'{task_name(args.local, sids)}: reading its record at {args.remote} failed '
                         f'({type(e).__name__}: {e})', 'fatal': True}
    try:
        if record is None:
            record = convert_group(sids)
        if not args.keep_parquet:  # only once the record is up
            fs, root = input_fs(args.local)
            for sid in record['shards']:
                delete_input(fs, root, sid)
        return record
    except ShardError as e:
        return {'error': e.message, 'fatal': e.fatal, 'shard': e.shard}


# ---------------------------------------------------------------------------------------------
# Reading a shard: parquet row batches to MDS samples (in the worker processes).
# ---------------------------------------------------------------------------------------------

def input_columns(names: list[str], parquet: str) -> dict[str, str]:
    """Output column -> input column present in the file; stops on a missing required column."""
    for col in REQUIRED:
        if col not in names:
            raise ShardError(f'{parquet}: missing required column {col!r}', fatal=True)
    found = {col: next((n for n in ALIASES.get(col, (col,)) if n in names), None) for col in COLUMNS}
    return {col: name for col, name in found.items() if name}


# JPEG start-of-frame markers (they hold the size); C4, C8 and CC are other segments.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: memoryview | bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment (~50x faster than PIL); None if the
    bytes are not a JPEG whose markers lead to one."""
    if bytes(data[:2]) != b'\xff\xd8':
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # fill byte or no length
            i += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_SOF:
            h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return (w, h) if w and h else None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def binary_buffers(arr: pa.Array) -> tuple[list[int], memoryview]:
    """(offsets, data) of a binary or large binary array's rows, without copying the data."""
    _, offsets, data = arr.buffers()
    dtype = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(offsets, dtype)[arr.offset: arr.offset + len(arr) + 1]
    return offsets.tolist(), memoryview(data if data is not None else b'').cast('B')  # arrow's are signed


def as_binary(values: np.ndarray) -> pa.Array:
    """A binary array whose row i holds the little-endian bytes of `values[i]` (no copy)."""
    values = np.ascontiguousarray(values)
    n = len(values)
    width = values.nbytes // n
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(values)])


def _casts(arr: pa.Array, to: pa.DataType) -> bool:
    try:
        arr.cast(to)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False


def typed_columns(batch: pa.RecordBatch, found: dict[str, str], parquet: str,
                  first_row: int) -> dict[str, pa.Array]:
    """Every input column present, by output name, cast to its output type (jpg: kept binary). A
    value that does not cast (a caption of invalid UTF-8, a float column of text, ...) is bad input:
    a skippable ShardError naming the file, row and column."""
    out = {}
    for col, name in found.items():
        arr = batch.column(name)
        large_jpg = col == 'jpg' and pa.types.is_large_binary(arr.type)  # kept: binary's offsets overflow
        to = arr.type if large_jpg else ARROW_TYPES[COLUMNS[col]]
        try:
            out[col] = arr.cast(to)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            row = next((i for i in range(len(arr)) if not _casts(arr.slice(i, 1), to)), 0)
            raise ShardError(f'{parquet}: bad value in column {name!r} at row {first_row + row}, not '
                             f'{to} ({e})', fatal=False) from e
    return out


def count_failures(status: pa.Array, error: pa.Array | None, rows: np.ndarray, skipped: Counter) -> None:
    """Count non-success rows by reason: the error message, else the status."""
    take = pa.array(rows)
    messages = error.take(take).to_pylist() if error is not None else [None] * len(rows)
    skipped.update(message or state or 'no status'
                   for message, state in zip(messages, status.take(take).to_pylist()))


class LeftOut(Exception):
    """An image that is not stored: its reason (counted) and what PIL said (named with it)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class LeftOutNames:
    """The names of the images a task leaves out: every one a JSON line in an unnamed temporary file
    (not memory), counted, and the first FIRST_NAMED per reason by key kept for the record."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.count = 0
        self.first: dict[str, list[dict]] = {}

    def append(self, entry: dict[str, str]) -> None:
        self.file.write(json.dumps(entry).encode() + b'\n')
        self.count += 1
        first = self.first.setdefault(entry['reason'], [])
        if len(first) < FIRST_NAMED or entry['key'] < first[-1]['key']:
            first.append(entry)
            first.sort(key=lambda x: x['key'])
            del first[FIRST_NAMED:]

    def chunks(self) -> Iterator[bytes]:
        """The JSON lines, in the order appended, a MB at a time."""
        self.file.flush()
        self.file.seek(0)
        yield from iter(lambda: self.file.read(2**20), b'')


def what_pil_said(e: BaseException) -> str:
    """The exception's class and first line, without the address of PIL's file object."""
    text = re.sub(r' <_io\.BytesIO object at 0x[0-9a-f]+>', '', (str(e).splitlines() or [''])[0])
    return f'{type(e).__name__}: {text[:200]}'


def decoded_size(image: memoryview) -> tuple[int, int]:
    """(width, height) of an image that PIL's defaults decode whole, exactly as a trainer's loader does
    (`Image.open(io.BytesIO(b)).load()`: the first frame, every byte of it, under the pixel limit);
    else LeftOut. ~the decode's own time: a JPEG of 512 x 512 takes ~2 ms."""
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            return im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise LeftOut(BOMB, what_pil_said(e)) from None
    except Image.UnidentifiedImageError as e:
        raise LeftOut(UNREADABLE_HEADER, what_pil_said(e)) from None
    except Exception as e:  # truncated, a broken stream, tiles out of bounds, ...: PIL raises many kinds
        raise LeftOut(DOES_NOT_DECODE, what_pil_said(e)) from None


def header_size(image: memoryview) -> tuple[int, int]:
    """(width, height) from the header alone, no pixel decoded (so no pixel limit either); else LeftOut."""
    size = jpeg_size(image)
    if size is not None:
        return size
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # one thread of a worker decodes
    try:
        with Image.open(io.BytesIO(image)) as im:  # PNG, WebP, odd JPEGs
            return im.size
    except Exception as e:
        raise LeftOut(UNREADABLE_HEADER, what_pil_said(e)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@dataclass(frozen=True)
class Check:
    """One --verify mode: how a stored image is checked and sized, and on which rows."""
    size: Callable[[memoryview], tuple[int, int]]  # (width, height), or LeftOut
    every_row: bool  # False: only rows whose parquet holds no size (the rest are stored unopened)


CHECKS = {'full': Check(decoded_size, True), 'header': Check(header_size, False)}


def image_sizes(cols: dict[str, pa.Array], n: int, ok: np.ndarray, jpg: tuple[list[int], memoryview],
                check: Check, leave_out: Callable[[int, LeftOut], None]) -> tuple[dict[str, np.ndarray],
                                                                               np.ndarray]:
    """The four size columns, from the parquet or else from the image, and the rows of `ok` that pass
    `check` (the others go to `leave_out`)."""
    sizes = {c: (pc.fill_null(cols[c].cast(pa.int64()), -1).to_numpy() if c in cols
                 else np.full(n, -1, np.int64)) for c in SIZE_COLUMNS}
    width, height = sizes['width'].copy(), sizes['height'].copy()
    offsets, data = jpg
    kept = ok.copy()
    opened = ok if check.every_row else ok & ((width < 0) | (height < 0))
    for i in np.flatnonzero(opened).tolist():
        try:
            size = check.size(data[offsets[i]:offsets[i + 1]])
        except LeftOut as e:
            kept[i] = False
            leave_out(i, e)
            continue
        if width[i] < 0 or height[i] < 0:
            width[i], height[i] = size
    unknown_original = (sizes['original_width'] < 0) | (sizes['original_height'] < 0)
    return {'width': width, 'height': height,
            'original_width': np.where(unknown_original, width, sizes['original_width']),
            'original_height': np.where(unknown_original, height, sizes['original_height'])}, kept


def mds_pieces(typed: dict[str, pa.Array], n: int, sizes: dict[str, np.ndarray],
               jpg_offsets: list[int]) -> tuple[pa.Array, pa.Array]:
    """Per row, the MDS encoding of the sample before its jpg bytes and after them.

    An MDS sample is the u32 sizes of its variable-size columns, then every column in name order;
    here all but the jpg are joined per row by arrow kernels, the jpg is added by the writer.
    """
    cols = {col: as_binary(sizes[col].astype('<i4')) for col in SIZE_COLUMNS}
    for col in [c for c in MDS_COLUMNS if c not in cols and c != 'jpg']:
        enc = COLUMNS[col]
        arr = pc.fill_null(typed[col] if col in typed else pa.nulls(n, ARROW_TYPES[enc]), DEFAULTS[enc])
        cols[col] = (arr.cast(pa.binary()) if enc == 'str'
                     else as_binary(arr.to_numpy().astype(FIXED_DTYPES[enc])))
    lengths = [np.diff(jpg_offsets) if col == 'jpg' else pc.binary_length(cols[col]).to_numpy()
               for col in VAR_COLUMNS]
    head = as_binary(np.stack(lengths, axis=1).astype('<u4'))
    at = MDS_COLUMNS.index('jpg')
    before = pc.binary_join_element_wise(head, *(cols[c] for c in MDS_COLUMNS[:at]), b'')
    after = pc.binary_join_element_wise(*(cols[c] for c in MDS_COLUMNS[at + 1:]), b'')
    return before, after


def encode_batch(typed: dict[str, pa.Array], n: int, skipped: Counter, left_out: LeftOutNames,
                 args: argparse.Namespace) -> list[tuple[str, tuple[memoryview, ...]]]:
    """(bucket, pieces) for each success row that passes --verify, in row order: the pieces'
    concatenation is the row's MDS sample (views of arrow buffers). Counts the rest in `skipped`, and
    names each success row left out (key, url, reason, what PIL said) in `left_out`."""
    status = pc.fill_null(typed['status'], '')
    ok = pc.equal(status, 'success').to_numpy(zero_copy_only=False)
    count_failures(status, typed.get('error_message'), np.flatnonzero(~ok), skipped)
    names = {c: typed[c] if c in typed else pa.nulls(n, pa.string()) for c in ('key', 'url')}

    def leave_out(i: int, why: LeftOut) -> None:
        skipped[why.reason] += 1
        left_out.append({'key': names['key'][i].as_py() or '', 'url': names['url'][i].as_py() or '',
                         'reason': why.reason, 'error': why.detail})

    jpg = binary_buffers(typed['jpg'])
    no_bytes = ok & ~typed['jpg'].is_valid().to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(no_bytes).tolist():  # success with no bytes: nothing to write
        leave_out(i, LeftOut(UNREADABLE_HEADER, 'no bytes'))
    ok &= ~no_bytes
    sizes, ok = image_sizes(typed, n, ok, jpg, CHECKS[args.verify], leave_out)
    rows = np.flatnonzero(ok)
    if not len(rows):
        return []
    if args.bucketed:
        shorter = np.minimum(sizes['width'], sizes['height'])
        which = np.clip(np.searchsorted(BUCKET_EDGES, shorter, side='right') - 1, 0, len(BUCKETS) - 1)
        buckets = [BUCKETS[b] for b in which.tolist()]
    else:
        buckets = [UNBUCKETED] * n
    before, after = mds_pieces(typed, n, sizes, jpg[0])
    (bo, bv), (jo, jv), (ao, av) = binary_buffers(before), jpg, binary_buffers(after)
    return [(buckets[i], (bv[bo[i]:bo[i + 1]], jv[jo[i]:jo[i + 1]], av[ao[i]:ao[i + 1]]))
            for i in rows.tolist()]


def encoded_batches(pf: pq.ParquetFile, found: dict[str, str], parquet: str, skipped: Counter,
                    left_out: LeftOutNames,
                    args: argparse.Namespace) -> Iterator[list[tuple[str, tuple[memoryview, ...]]]]:
    """encode_batch on each row batch of a parquet; whatever fails here is the input's fault: a
    skippable ShardError (the shard is kept on disk), never a remote error."""
    batches = pf.iter_batches(batch_size=args.batch_size, columns=sorted(set(found.values())))
    first_row = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise ShardError(f'{parquet}: unreadable parquet ({type(e).__name__}: {e})', fatal=False) from e
        try:
            yield encode_batch(typed_columns(batch, found, parquet, first_row), batch.num_rows, skipped,
                               left_out, args)
        except ShardError:
            raise
        except Exception as e:
            raise ShardError(f'{parquet}: rows {first_row}-{first_row + batch.num_rows - 1} cannot be '
                             f'converted ({type(e).__name__}: {e})', fatal=False) from e
        first_row += batch.num_rows


# ---------------------------------------------------------------------------------------------
# Writing MDS: the bytes and index.json streaming's MDSWriter writes, each sample copied once.
# ---------------------------------------------------------------------------------------------

def mds_config(size_limit: int) -> dict:
    """What every MDS shard entry of an index.json of ours holds besides its own facts (samples and
    file), in the order MDSWriter writes it; also the config in each shard file's header."""
    return {'column_encodings': [COLUMNS[c] for c in MDS_COLUMNS], 'column_names': MDS_COLUMNS,
            'column_sizes': [MDS_SIZES[COLUMNS[c]] for c in MDS_COLUMNS], 'compression': None,
            'format': 'mds', 'hashes': [], 'size_limit': size_limit, 'version': 2}


def mds_name(i: int) -> str:
    """The file of MDS shard `i` of a part (PartWriter's and MDSWriter's naming)."""
    return f'shard.{i:05}.mds'


class PartWriter:
    """One bucket's part of one input shard: an MDS dataset with the files and index.json that
    streaming's MDSWriter writes for the same samples (tested), but each sample is copied once,
    from arrow's buffers into a reused buffer holding the MDS shard being filled (MDSWriter makes
    Python objects and copies every image several times). `land(path)` is called on each file
    once written (fsync or upload, in the background)."""

    def __init__(self, folder: str, size_limit: int, buffer: mmap.mmap, land: Callable[[str], Any]):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.limit, self.buffer, self.land = folder, size_limit, buffer, land
        self.config = mds_config(size_limit)
        self.config_data = json.dumps(self.config, sort_keys=True).encode()
        self.sizes: list[int] = []
        self.used = 0
        self.shards: list[dict] = []

    def write(self, pieces: tuple[memoryview, ...]) -> None:
        size = sum(map(len, pieces))
        # MDSWriter's rule: the shard with this sample (and 4 bytes of offset each) would pass the limit
        if self.sizes and 8 + len(self.config_data) + self.used + 4 * len(self.sizes) + size + 4 > self.limit:
            self.flush()
        if self.used + size > len(self.buffer):  # one sample larger than --size_limit
            bigger = mmap.mmap(-1, self.used + size)
            bigger[:self.used] = self.buffer[:self.used]
            self.buffer = bigger
        for piece in pieces:
            self.buffer[self.used:self.used + len(piece)] = piece
            self.used += len(piece)
        self.sizes.append(size)

    def flush(self) -> None:
        n = len(self.sizes)
        head = 4 + 4 * (n + 1) + len(self.config_data)  # sample count, offsets, config
        offsets = np.cumsum([0] + self.sizes) + head
        name = mds_name(len(self.shards))
        path = os.path.join(self.folder, name)
        with open(path, 'wb') as f:
            f.write(np.uint32(n).tobytes() + offsets.astype('<u4').tobytes() + self.config_data)
            f.write(memoryview(self.buffer)[:self.used])
        self.shards.append({**self.config, 'samples': n, 'zip_data': None,
                            'raw_data': {'basename': name, 'bytes': head + self.used, 'hashes': {}}})
        self.land(path)
        self.sizes, self.used = [], 0

    def finish(self) -> dict:
        """Write the last shard and index.json; returns the part as its record keeps it."""
        if self.sizes:
            self.flush()
        path = os.path.join(self.folder, 'index.json')
        Path(path).write_text(json.dumps({'shards': self.shards, 'version': 2}, sort_keys=True))
        self.land(path)
        return {'bytes': [s['raw_data']['bytes'] for s in self.shards],
                'samples': [s['samples'] for s in self.shards]}


# A task's record, `<remote>/_cloudwriter[/<sub>]/<NNNNN>.record`, NNNNN its first input shard (its
# existence makes every shard of the task done): the shards, their counts (rows in = samples written +
# rows skipped), how many images they left out and the first of them by reason (all are named in
# <NNNNN>.left_out.jsonl), and per bucket its part's MDS shards' bytes and samples, their common config
# kept once (docs/scale.md: LAION-2B on paper).

def shard_record(sids: list[str], bucketed: bool, rows: int, samples: dict[str, int],
                 skipped: dict[str, int], left_out: int, left_out_first: dict[str, list[dict]],
                 nbytes: int, config: dict, parts: dict[str, dict[str, list[int]]],
                 verify: str = 'full') -> dict[str, Any]:
    """A task's record; `parts`: bucket -> {'bytes': [...], 'samples': [...]}, one item per MDS shard."""
    return {'shard': sids[0], 'shards': sids, 'bucketed': bucketed, 'verify': verify, 'rows': rows,
            'samples': samples, 'skipped': skipped, 'left_out': left_out, 'left_out_first': left_out_first,
            'bytes': nbytes, 'config': config, 'parts': parts}


def open_shard(parquet: str) -> tuple[pq.ParquetFile, dict[str, str]]:
    """A parquet (a path or URL) and its columns by output name; a skippable ShardError if unreadable."""
    try:
        fs, path = input_fs(parquet)
        pf = pq.ParquetFile(path, filesystem=fs)
    except Exception as e:
        raise ShardError(f'{parquet}: unreadable parquet ({type(e).__name__}: {e})', fatal=False) from e
    return pf, input_columns(pf.schema_arrow.names, parquet)


def write_parts(parquets: list[str], out_root: str, sub: str, args: argparse.Namespace,
                land: Callable[[str], Any], preview: dict[str, dict[str, list[dict]]] | None = None,
                left_out: LeftOutNames | None = None) -> dict[str, Any]:
    """Read parquets (paths or URLs) one after another, in batches, into one MDS part per bucket,
    `<out_root>/<bucket>[/<sub>]/<first shard>`: each bucket's open MDS shard is carried from one parquet
    to the next, so only the last MDS shard of a part is partly filled. With a `preview` dict, also keep
    each shard's first samples of each bucket there (by shard id) as candidates; the images left out are
    named in `left_out`. Returns the task's record."""
    sids = [Path(parquet).stem for parquet in parquets]
    for sid in sids:  # what a killed run left of a task that began with one of them
        remove_parts(out_root, sub, sid)
    limit = args.size_limit
    writers: dict[str, PartWriter] = {}
    # each bucket's open MDS shard, in a buffer the worker reuses from task to task (anonymous memory:
    # pages are only taken once written)
    buffers = _WORKER.setdefault('buffers', {})
    counts, skipped, rows, nbytes = Counter(), Counter(), 0, 0
    left_out = LeftOutNames() if left_out is None else left_out
    progress = _WORKER.get('progress')
    for parquet, sid in zip(parquets, sids):
        try:
            pf, found = open_shard(parquet)
            written, dropped = Counter(), Counter()  # this shard's
            candidates = None if preview is None else preview.setdefault(sid, {})
            for encoded in encoded_batches(pf, found, parquet, dropped, left_out, args):
                n0, b0 = written.total(), nbytes
                for bucket, pieces in encoded:
                    if bucket not in writers:
                        if len(buffers.get(bucket, b'')) < limit:
                            buffers[bucket] = mmap.mmap(-1, limit)
                        writers[bucket] = PartWriter(join(out_root, bucket, sub, sids[0]), limit,
                                                     buffers[bucket], land)
                    writers[bucket].write(pieces)
                    if candidates is not None:
                        keep_candidate(candidates, bucket, written[bucket], pieces)
                    written[bucket] += 1
                    nbytes += len(pieces[1])
                if progress is not None:
                    with progress.get_lock():
                        progress[0] += written.total() - n0
                        progress[1] += nbytes - b0
        except ShardError as e:
            e.shard = sid
            raise
        n = pf.metadata.num_rows
        if written.total() + dropped.total() != n:  # every row is written or counted, never lost
            raise ShardError(f'{parquet}: {n} rows in, but {written.total()} written and {dropped.total()} '
                             'counted as skipped; report this as a bug', fatal=True)
        counts.update(written)
        skipped.update(dropped)
        rows += n
    parts = {bucket: w.finish() for bucket, w in writers.items()}
    return shard_record(sids, args.bucketed, rows, counts, skipped, left_out.count, left_out.first, nbytes,
                        mds_config(limit), parts, args.verify)


# ---------------------------------------------------------------------------------------------
# Preview (--preview N): workers keep candidates per shard; the driver draws one sheet per bucket.
# ---------------------------------------------------------------------------------------------

def mds_sample(data: bytes) -> dict[str, Any]:
    """The columns of one encoded MDS sample (what a reader gets back)."""
    n_var = len(VAR_COLUMNS)
    var_sizes = dict(zip(VAR_COLUMNS, np.frombuffer(data, '<u4', n_var).tolist()))
    out, pos = {}, 4 * n_var
    for col in MDS_COLUMNS:
        enc = COLUMNS[col]
        size = MDS_SIZES[enc] or var_sizes[col]
        raw = data[pos:pos + size]
        pos += size
        out[col] = (raw.decode() if enc == 'str' else raw if enc == 'bytes'
                    else np.frombuffer(raw, FIXED_DTYPES[enc])[0].item())
    return out


# >>> twin: decode (copied verbatim in caption_images.py, curate_images.py, laion_cloudwriter.py,
# precompute_latents.py; tests/test_twins.py checks the copies). The one decode rule of every script that
# looks at pixels, stated in docs/decoding.md.
DECODE_PIXEL_LIMIT = 2 * 89_478_485  # PIL's default bomb limit (2 x MAX_IMAGE_PIXELS), even if lifted
SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N')  # grayscale modes, 0..65535
# 16-bit and 32-bit integer grayscale to 8 bits as tables PIL applies (an `I` image's values clipped to
# 0..65535 first): scaled by 255/65535 and rounded half to even, or (an `I` image within 0..255) clipped
EIGHT_BITS = {True: np.rint(np.arange(65536) * (255 / 65535)).astype(int).tolist(),
              False: np.clip(np.arange(65536), 0, 255).tolist()}


def decode(image: bytes | Image.Image, notes: list[str] | None = None) -> Image.Image:
    """An image column's value as a reader gives it (the stored bytes; a PIL image from streaming's jpeg,
    png or pil encodings) as the picture `to_rgb` states. What PIL warns and libtiff prints meanwhile is
    added to `notes` (when given), never printed."""
    with noted() as said:
        try:
            return to_rgb(opened(image))
        finally:
            if notes is not None:
                notes += said


def opened(image: bytes | Image.Image) -> Image.Image:
    """An image column's value as an image fresh from Image.open (a PIL image as it is)."""
    return image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))


def to_rgb(img: Image.Image) -> Image.Image:
    """The 8-bit RGB picture a viewer shows of an image fresh from Image.open (a draft() allowed; nothing
    may have loaded it: after a failed load() a second one returns partial pixels without a word):
    - its first frame (animated GIF, APNG and WebP; MPO), at the size PIL decodes (after any draft());
    - refused (DecompressionBombError) above DECODE_PIXEL_LIMIT pixels, before anything is decoded;
    - EXIF orientation applied; a broken EXIF block turns nothing and loses nothing;
    - 16-bit grayscale scaled by 255/65535 (rounded half to even); 32-bit integer and float grayscale
      likewise when a value exceeds 255, else taken as 8-bit; clipped to 0..255; integers by a table (at
      most 4 bytes a pixel beside the image, not the 8 of a float64 copy);
    - transparency (an alpha band: RGBA, LA, PA; a tRNS chunk, 16-bit grayscale's key included, or GIF
      transparent index) over white;
    - every other mode (CMYK, LAB, YCbCr, palette, 1-bit) by PIL's convert('RGB'), ICC profiles ignored.
    Raises what PIL raises for bytes it cannot decode (truncated, corrupt, unknown)."""
    if img.width * img.height > DECODE_PIXEL_LIMIT:
        raise Image.DecompressionBombError(f'{img.width} x {img.height} pixels is over the limit of '
                                           f'{DECODE_PIXEL_LIMIT}: a decompression bomb?')
    img.load()
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose a good image
        ImageOps.exif_transpose(img, in_place=True)
    if img.mode in SIXTEEN_BIT or img.mode == 'I':
        table = EIGHT_BITS[img.mode != 'I' or img.getextrema()[1] > 255]
        if isinstance(key := img.info.get('transparency'), int) and 0 <= key < len(table):
            table = table[:key] + [255] + table[key + 1:]  # the tRNS key's pixels: white
        img = (img if img.mode == 'I' else img.convert('I')).point(table, 'L')
    elif img.mode == 'F':
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr *= 255 / 65535
        img = Image.fromarray(np.clip(np.rint(arr, out=arr), 0, 255, out=arr).astype(np.uint8))
    if img.has_transparency_data:
        rgba = img.convert('RGBA')
        img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == 'RGB' else img.convert('RGB')


# What PIL warns (each time: a last warnings filter says 'always' for its UserWarnings and
# DecompressionBombWarning) and libtiff prints (its handlers are pointed here) while an image decodes
# would land inside progress bars and after summaries: in a thread inside noted() it is kept instead.
DECODING = threading.local()  # .notes: the list of this thread's innermost noted(); None outside


@contextlib.contextmanager
def noted() -> Iterator[list[str]]:
    """Inside, what PIL warns and libtiff prints in this thread goes to the list yielded (and then to an
    enclosing noted()'s), never to the console. Outside, PIL's warnings show as usual and libtiff's
    words are dropped (the error PIL raises for them stays)."""
    outer = getattr(DECODING, 'notes', None)
    DECODING.notes = notes = []
    try:
        yield notes
    finally:
        DECODING.notes = outer
        if outer is not None:
            outer += notes


def note_warning(message, category, filename, lineno, file=None, line=None, shown=warnings.showwarning):
    """warnings.showwarning: inside noted(), the warning is noted; outside, shown as before."""
    notes = getattr(DECODING, 'notes', None)
    if notes is None:
        return shown(message, category, filename, lineno, file, line)
    if (text := f'{category.__name__}: {str(message).strip()}') not in notes:
        notes.append(text)


def note_libtiff(module: bytes | None, fmt: bytes, args: int | None) -> None:
    """libtiff's error and warning handler (module, printf format, va_list): noted, or dropped."""
    notes = getattr(DECODING, 'notes', None)
    if notes is not None:
        text = ctypes.create_string_buffer(512)
        LIBC.vsnprintf(text, len(text), fmt, args)
        if (said := f'libtiff: {text.value.decode(errors="replace").strip()}') not in notes:
            notes.append(said)  # once: it may say the same of every strip


def quiet_libtiff() -> list:
    """Point the handlers of the libtiff PIL loaded (found in /proc/self/maps; Linux) at note_libtiff;
    returns what must stay referenced while they are set (nothing where libtiff is not found)."""
    with contextlib.suppress(OSError, AttributeError):
        with open('/proc/self/maps') as maps:
            path = next((ln.split()[-1] for ln in maps if '/libtiff' in ln), None)
        if path is not None:
            libtiff = ctypes.CDLL(path)
            handler = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)(note_libtiff)
            libtiff.TIFFSetErrorHandler(handler)
            libtiff.TIFFSetWarningHandler(handler)
            return [libtiff, handler]
    return []


LIBC = ctypes.CDLL(None)
LIBC.vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
LIBTIFF = quiet_libtiff()
warnings.showwarning = note_warning
warnings.filterwarnings('always', category=UserWarning, module=r'PIL\.', append=True)
warnings.filterwarnings('always', category=Image.DecompressionBombWarning, append=True)
# <<< twin: decode


def keep_candidate(preview: dict[str, list[dict]], bucket: str, index: int,
                   pieces: tuple[memoryview, ...]) -> None:
    """Keep sample `index` of this shard's `bucket` part if it is one of its first PREVIEW_PER_SHARD,
    its image as a JPEG at most PREVIEW_THUMB px on its longer side (b'' if it does not decode)."""
    kept = preview.setdefault(bucket, [])
    if len(kept) >= PREVIEW_PER_SHARD:
        return
    s = mds_sample(b''.join(pieces))
    thumb = b''  # e.g. a truncated file or a bomb: its tile says so
    with contextlib.suppress(Exception), Image.open(io.BytesIO(s['jpg'])) as im:
        im.draft(im.mode, (PREVIEW_THUMB, PREVIEW_THUMB))  # JPEG: decode at 1/2..1/8 scale
        im = to_rgb(im)
        im.thumbnail((PREVIEW_THUMB, PREVIEW_THUMB), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, 'JPEG', quality=90)
        thumb = buf.getvalue()
    kept.append({'index': index, 'key': s['key'], 'caption': s['caption'], 'width': s['width'],
                 'height': s['height'], 'thumb': base64.b64encode(thumb).decode()})


def spread_picks(available: dict[str, int], n: int) -> list[tuple[str, int]]:
    """n (shard, rank) pairs, in order: one candidate each of n shards spread evenly over the sorted
    shard ids; with fewer shards than n, each shard's first, then second, ... candidate."""
    sids = sorted(sid for sid, k in available.items() if k)
    if len(sids) >= n:
        return [(sids[(2 * i + 1) * len(sids) // (2 * n)], 0) for i in range(n)]
    picks = [(sid, rank) for rank in range(PREVIEW_PER_SHARD) for sid in sids if rank < available[sid]]
    return sorted(picks[:n])


def fit_lines(paragraphs: list[str], font: Any, width: int, lines: int) -> list[str]:
    """The paragraphs wrapped (at spaces where possible) into at most `lines` lines no wider than
    `width` px, each paragraph on a new line; text that does not fit ends the last line with '…'."""
    out: list[str] = []
    for text in paragraphs:
        text = ''.join(c if c.isprintable() else ' ' for c in text).strip()
        while text and len(out) < lines:
            k = len(text)
            while k > 1 and font.getlength(text[:k]) > width:
                k -= 1
            if k < len(text) and ' ' in text[1:k]:
                k = text.rindex(' ', 1, k)
            out.append(text[:k])
            text = text[k:].lstrip()
        if text and out:  # cut short
            while len(out[-1]) > 1 and font.getlength(out[-1] + '…') > width:
                out[-1] = out[-1][:-1]
            out[-1] += '…'
            break
    return out


# >>> twin: preview-font (verbatim in caption_images.py, curate_images.py, laion_cloudwriter.py,
# precompute_latents.py; test_twins.py)
def preview_font(size: float = 10) -> ImageFont.FreeTypeFont:
    """The font of every preview: DejaVu Sans, which matplotlib (a requirement) ships. It draws Latin,
    Greek, Cyrillic, Arabic, Hebrew and more (not Chinese, Japanese or Korean); Pillow's own font
    (ImageFont.load_default) has ASCII only and draws any other letter, even 'ü', as a box."""
    try:
        import matplotlib
    except ImportError:  # a preview with boxes, rather than none
        return ImageFont.load_default(size)
    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf', 'DejaVuSans.ttf'),
                              size)
# <<< twin: preview-font


def contact_sheet(title: str, tiles: list[tuple[Image.Image | None, list[str]]]) -> Image.Image:
    """A grid of the tiles (ceil(sqrt(n)) columns) under a one-line title: tile i's image centred in a
    PREVIEW_THUMB px square (a grey one when None) above its text paragraphs (PREVIEW_LINES lines).
    Size: (columns x (cell + 8), 20 + rows x (cell + 8 + 12 x lines)). Pillow only."""
    pad, line_h, title_h, cell = 4, 12, 20, PREVIEW_THUMB
    font = preview_font()
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = max(1, math.ceil(len(tiles) / cols))
    tile_w, tile_h = cell + 2 * pad, cell + 2 * pad + line_h * PREVIEW_LINES
    sheet = Image.new('RGB', (cols * tile_w, title_h + rows * tile_h), 'white')
    draw = ImageDraw.Draw(sheet)
    for line in fit_lines([title], font, sheet.width - 2 * pad, 1):
        draw.text((pad, 4), line, 'black', font)
    for i, (img, text) in enumerate(tiles):
        x, y = (i % cols) * tile_w + pad, title_h + (i // cols) * tile_h + pad
        if img is None:
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(200, 200, 200))
        else:
            sheet.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
        for j, line in enumerate(fit_lines(text, font, cell, PREVIEW_LINES)):
            draw.text((x, y + cell + 1 + j * line_h), line, 'black', font)
    return sheet


def write_previews(records: dict[str, dict], samples: dict[str, int], args: argparse.Namespace, folder: str,
                   prefix: str) -> dict[str, dict]:
    """`<folder>/<prefix><bucket>.png` for each bucket of `samples` (the summary's samples per bucket):
    --preview samples spread over the recorded shards that have candidates. Returns, by bucket, the
    PNG's path and the keys drawn (in order)."""
    counts = {sid: (task, n) for task, r in records.items() for sid, n in r.get('preview', {}).items()}
    picks = {bucket: spread_picks({sid: n.get(bucket, 0) for sid, (_, n) in counts.items()}, args.preview)
             for bucket in samples}
    tasks = sorted({counts[sid][0] for p in picks.values() for sid, _ in p})
    candidates: dict[str, dict[str, list[dict]]] = {}  # shard -> bucket -> its candidates
    with ThreadPoolExecutor(16) as pool:  # the candidate files drawn from, one small GET per task
        for got in pool.map(lambda task: json.loads(read(args, join(RECORDS, args.subfolder,
                                                                   f'{task}.preview'))), tasks):
            candidates.update(got['shards'] if 'shards' in got else {got['shard']: got['buckets']})
    out = {}
    for bucket, chosen in picks.items():
        if not chosen:  # its shards were converted without --preview
            continue
        shown = [candidates[sid][bucket][rank] for sid, rank in chosen]
        tiles = [(Image.open(io.BytesIO(base64.b64decode(c['thumb']))) if c['thumb'] else None,
                  [f"{c['width']}x{c['height']}  {c['key']}", c['caption']]) for c in shown]
        shards = sum(1 for _, n in counts.values() if n.get(bucket))
        title = (f'bucket {bucket} (shorter side): {len(shown)} of {samples[bucket]:,} samples, '
                 f'from {len({sid for sid, _ in chosen})} of {shards:,} shards')
        path = join(folder, f'{prefix}{bucket}.png')
        png = io.BytesIO()
        contact_sheet(title, tiles).save(png, 'PNG')
        write_file(path, png.getvalue())
        out[bucket] = {'png': path, 'keys': [c['key'] for c in shown]}
    return out


# ---------------------------------------------------------------------------------------------
# Merging: one index.json per bucket over done shards only.
# ---------------------------------------------------------------------------------------------

def index_chunks(parts: list[tuple[str, dict, dict[str, list[int]]]]) -> Iterator[bytes]:
    """The merged index.json over `parts` ((folder relative to the index, config, part) in order), byte
    for byte as json.dumps writes the index streaming's merge_index makes of the parts' own index.json
    (tested), built one MDS shard entry at a time: never the whole index in memory (1.1 GB of text
    for the biggest bucket at 230k input shards and 64 MB)."""
    yield b'{"version": 2, "shards": ['
    heads: dict[int, str] = {}  # an entry's text before its samples, by config
    sep = ''
    for name, config, part in parts:
        if id(config) not in heads:
            heads[id(config)] = json.dumps(config)[:-1] + (', ' if config else '')
        head, where = heads[id(config)], json.dumps(f'{name}/')[:-1]
        entries = [f'{sep if i == 0 else ", "}{head}"samples": {n}, "zip_data": null, "raw_data": '
                   f'{{"basename": {where}{mds_name(i)}", "bytes": {b}, "hashes": {{}}}}}}'
                   for i, (b, n) in enumerate(zip(part['bytes'], part['samples']))]
        if entries:
            sep = ', '
            yield ''.join(entries).encode()
    yield b']}'


def bucket_parts(records: dict[str, dict], bucket: str, prefix: str = '') -> list[tuple[str, dict, dict]]:
    """index_chunks' parts for `bucket` of these records, in shard order, their folders below `prefix`."""
    return [(join(prefix, sid), r['config'], r['parts'][bucket]) for sid, r in sorted(records.items())
            if bucket in r['parts']]


def publish_index(parts: list[tuple[str, dict, dict]], args: argparse.Namespace, bucket: str,
                  subfolder: str) -> None:
    """Replace the dataset's index.json (one rename or one PUT: readers see the old or the new)."""
    put(args, join(bucket, subfolder, 'index.json'), index_chunks(parts))


def merge_run(records: dict[str, dict], args: argparse.Namespace) -> None:
    """index.json of each bucket of this run's (sub)folder, over its done shards."""
    for bucket in sorted({b for r in records.values() for b in r['parts']}):
        publish_index(bucket_parts(records, bucket), args, bucket, args.subfolder)


def merge_subfolders(args: argparse.Namespace) -> dict[str, int]:
    """--merge_only: `<remote>/<bucket>/index.json` over every subfolder's done shards (and each
    subfolder's own index.json rewritten too). Returns samples per bucket."""
    by_sub = read_records(args, None)
    totals = Counter()
    for bucket in sorted({b for recs in by_sub.values() for r in recs.values() for b in r['parts']}):
        parts = []
        for sub, recs in by_sub.items():
            own = bucket_parts(recs, bucket)
            if sub and own:
                publish_index(own, args, bucket, sub)
            parts += bucket_parts(recs, bucket, sub)
            totals[bucket] += sum(r['samples'].get(bucket, 0) for r in recs.values())
        # in the order merge_index lists them: by the folder below <bucket> (a subfolder or a shard id)
        parts.sort(key=lambda part: part[0].split('/')[0])
        publish_index(parts, args, bucket, '')
    return totals


def publish(work: Work, args: argparse.Namespace) -> str:
    """After the loop: take the records that shards abandoned at a stop signal wrote just before it
    (else name the parquet files a done download left unconverted), then write every bucket's
    index.json. Returns '' or the fatal error."""
    if _STOP['signal']:
        time.sleep(STOP_GRACE_S)  # a record written just before the lease said stopping
        for sids in work.futures.values():
            with contextlib.suppress(FileNotFoundError):
                work.add(load_record(read(args, join(RECORDS, args.subfolder, f'{sids[0]}.record'))))
    else:
        work.stats['ignored'] = [shard_path(args.local, sid)
                                 for sid in unfinished_shards(list_input(work.fs, work.root), work.done)]
    try:
        merge_run(work.records, args)
    except Exception as e:
        work.stats['errors'].append(f'writing the merged index.json to {args.remote} failed '
                                    f'({type(e).__name__}: {e})')
        return error(work.stats['errors'][-1])
    return ''


# ---------------------------------------------------------------------------------------------
# Summary.
# ---------------------------------------------------------------------------------------------

def summarize(work: Work, names: str, elapsed: float) -> dict[str, Any]:
    """The summary of the recorded shards and this run; `names`: where the images left out are named."""
    records, run = work.records, work.stats
    per_bucket, skipped, rows, verify, left_out = Counter(), Counter(), 0, Counter(), 0
    for r in records.values():
        per_bucket.update(r['samples'])
        skipped.update(r['skipped'])
        verify[r.get('verify', 'header')] += len(r['shards'])  # records of older runs: headers only
        rows += r.get('rows', sum(r['samples'].values()) + sum(r['skipped'].values()))  # older records
        left_out += r.get('left_out', 0)
    return {'shards_done': len(work.done), 'shards_this_run': run['shards'],
            'samples_per_bucket': dict(sorted(per_bucket.items())),
            'rows': rows, 'samples': sum(per_bucket.values()), 'rows_skipped': skipped.total(),
            'skipped_by_reason': skipped,
            'left_out': {'images': left_out, 'names': names,
                         'first': dict(sorted(work.first_left_out.items()))},
            'verify': dict(verify),
            'bytes': sum(r['bytes'] for r in records.values()),
            'bytes_this_run': run['bytes'], 'samples_this_run': run['samples'],
            'skipped_shards': run['bad'], 'ignored_parquet': run['ignored'], 'errors': run['errors'],
            'elapsed_s': round(elapsed, 2),
            'samples_per_s': round(run['samples'] / max(elapsed, 1e-9), 1),
            'mb_per_s': round(run['bytes'] / 1e6 / max(elapsed, 1e-9), 1)}


def print_summary(summary: dict[str, Any], path: str) -> None:
    lines = [f"shards: {summary['shards_done']} done ({summary['shards_this_run']} this run), "
             f"{summary['samples']} samples, {summary['bytes'] / 1e6:.1f} MB of images",
             f"this run: {summary['samples_this_run']} samples in {summary['elapsed_s']} s "
             f"({summary['samples_per_s']} samples/s, {summary['mb_per_s']} MB/s)"]
    lines += [f'  {b:>14}: {n}' for b, n in summary['samples_per_bucket'].items()]
    modes = summary['verify']
    lines.append(f"rows: {summary['rows']} in = {summary['samples']} written + {summary['rows_skipped']} "
                 f"skipped (verify: {', '.join(f'{m} {n} shards' for m, n in sorted(modes.items()))})")
    if modes.get('header'):
        lines.append(f"NOTE: {modes['header']} shard(s) were converted with --verify header (or by an older "
                     'version): their images may not decode')
    left_out = summary['left_out']
    for reason, n in sorted(summary['skipped_by_reason'].items()):
        named = [f"{x['key']} {x['url']}".strip() for x in left_out['first'].get(reason, [])]
        lines.append(f'  {n:>8}  {reason}' + (f": {', '.join(named[:3])}{', ...' if n > 3 else ''}"
                                               if named else ''))
    if left_out['images']:
        lines.append(f"  (each of the {left_out['images']} images left out is named, with what PIL said, in "
                     f"{left_out['names']})")
    lines += [f'SKIPPED (parquet kept): {bad}' for bad in summary['skipped_shards']]
    ignored = summary['ignored_parquet']
    if ignored:
        shown = ', '.join(ignored[:3]) + (', ...' if len(ignored) > 3 else '')
        lines.append(f'IGNORED (not converted): {len(ignored)} parquet file(s) without the _stats.json '
                     f'img2dataset writes once a shard is finished: {shown}; finish them (rerun the '
                     'download) or give each its NNNNN_stats.json if it is whole, then rerun')
    lines += [f'ERROR: {err}' for err in summary['errors']]
    if summary.get('interrupted'):
        lines.append(f"INTERRUPTED by {summary['interrupted']}: the index covers the "
                     f"{summary['shards_done']} recorded shards; rerun the same command to resume")
    lines += [f"preview {b}: {p['png']}" for b, p in summary.get('preview', {}).items()]
    if summary.get('preview_error'):
        lines.append(f"WARNING: no preview drawn ({summary['preview_error']}); rerun the same command")
    lines.append(f'summary JSON: {path}')
    print('\n'.join(lines), flush=True)


def finish(work: Work, start: float, args: argparse.Namespace, code: int) -> int:
    names = (f'{join(args.remote, RECORDS, args.subfolder, "NNNNN" + LEFT_OUT)}: one JSON line per image '
             '(key, url, reason, error), one file per task (NNNNN its first shard) that left any out')
    summary = summarize(work, names, time.time() - start)
    records = work.records
    summary['exit_code'] = code
    if _STOP['signal']:
        summary['interrupted'] = signal.Signals(_STOP['signal']).name
    name = f'summary_{args.subfolder}.json' if args.subfolder else 'summary.json'
    path = args.summary or join(args.local, SUMMARY_DIR, name)
    if args.preview and code in (EXIT_OK, EXIT_BAD_INPUT):
        prefix = f'preview_{args.subfolder}_' if args.subfolder else 'preview_'
        try:
            summary['preview'] = write_previews(records, summary['samples_per_bucket'], args,
                                                os.path.dirname(path) or '.', prefix)
        except Exception as e:  # the dataset is complete; only its picture is missing
            summary['preview_error'] = f'{type(e).__name__}: {e}'
    try:
        write_file(path, json.dumps(summary, indent=2).encode())
    except Exception as e:  # the summary is also printed: not a reason to lose the exit code
        print(f'error: writing the summary to {path} failed ({type(e).__name__}: {headline(e)})',
              file=sys.stderr)
    print_summary(summary, path)
    for scratch in [Path(args.staging, 'parts'), *Path(args.staging).glob('publish*')]:
        shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(args.staging)
    return code


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

def run(args: argparse.Namespace, lease: Lease) -> int:
    """Convert every finished shard of --local, publish each bucket's index, write the summary."""
    start = time.time()
    fs, root = input_fs(args.local)
    stats: dict[str, Any] = {'shards': 0, 'samples': 0, 'bytes': 0, 'bad': [], 'errors': [], 'ignored': []}
    first: dict[str, list[dict]] = {}
    work = Work(fs, root, prior_records(args, fs, root, first), stats, {}, [], set(), first)
    engine = start_engine(args)
    lease.start_refreshing()
    try:
        fatal = convert(work, engine, args, lease, start)
    except BaseException:
        engine.stop(True)
        raise
    if _STOP['signal'] and not fatal:
        lease.halt_tasks()
    engine.stop(bool(_STOP['signal'] or fatal))
    fatal = fatal or publish(work, args)  # after a fatal error nothing more is asked of the remote
    if fatal:
        code = EXIT_FATAL
    elif _STOP['signal']:
        code = 128 + _STOP['signal']
    else:
        code = EXIT_BAD_INPUT if work.stats['bad'] or work.stats['ignored'] else EXIT_OK
    return finish(work, start, args, code)


def merge_only(args: argparse.Namespace) -> int:
    """--merge_only: join every subfolder's done shards; nothing recorded there is an error, and so is
    a subfolder that a live run still writes (its index would miss what that run records next)."""
    try:
        for rel in REMOTES[args.remote_kind].list(args.remote, RECORDS, LEASE):
            lease = Lease(args, record_subfolder(rel))
            busy = lease.held_by_other(lease.read(), 'run --merge_only once it has ended')
            if busy:
                raise RunError(f'--merge_only: {busy}')
        totals = merge_subfolders(args)
    except RunError:
        raise
    except Exception as e:
        raise RunError(f'merging at {args.remote} failed ({type(e).__name__}: {e})') from None
    if not totals:
        raise RunError(f'{args.remote}: no converted shards recorded under {join(args.remote, RECORDS)}; '
                       'give the --remote the cloudwriter runs wrote to')
    print(json.dumps({'merged_samples_per_bucket': totals}))
    return EXIT_OK


def main() -> int:
    args = parse_args()
    endpoint = next((os.environ[k] for k in S3_ENDPOINT_VARS if os.environ.get(k)), '')
    if endpoint:
        os.environ['S3_ENDPOINT_URL'] = endpoint
    logging.basicConfig(level=logging.ERROR, format='%(levelname)s %(name)s: %(message)s')
    # py4j logs each call into a JVM that has gone (a stop to the process group ends it too) with its
    # traceback, on the root logger; a task that fails that way is reported in one line by collect
    logging.getLogger().handlers[0].addFilter(lambda record: f'{os.sep}py4j{os.sep}' not in record.pathname)
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    if not args.merge_only:
        if same_place(args):
            error(same_place(args))
            return EXIT_FATAL
        sleep_unless_stopped(args.wait_before_start)
    if _STOP['signal']:
        return 128 + _STOP['signal']
    code, lease = EXIT_FATAL, None
    try:
        if args.merge_only:
            args.staging = args.staging or tempfile.mkdtemp(prefix='cloudwriter-merge-')
            return merge_only(args)
        lease = take_ownership(args)
        code = run(args, lease) if lease else 128 + _STOP['signal']
    except RunError as e:  # a reason not to start
        error(str(e))
    except Exception as e:  # e.g. the remote is unreachable when reading the records
        error(f'{args.remote}: {type(e).__name__}: {e}')
    finally:
        if lease is not None:
            lease.release(remote_ok=code != EXIT_FATAL)
    return code


if __name__ == '__main__':
    sys.exit(main())
