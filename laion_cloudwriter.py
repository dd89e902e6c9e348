"""Convert img2dataset parquet shards into resolution-bucketed MDS datasets on any remote, resumably.

Example (beside a running download, or after it):

    python laion_cloudwriter.py --local /data/laion/parquet --remote s3://my-bucket/laion \\
        --bucketed --subfolder machine-00 --processes 16

Reads `--local`: img2dataset's `NNNNN.parquet` shards (with `output_format parquet`, no re-encoding).
A shard is finished once its `NNNNN_stats.json` exists; the run ends once a `done` file is in
`--local` and every finished shard is converted (so on a finished download it converts and exits,
beside a running one it keeps polling every `--poll_interval` seconds).

Writes to `--remote` (a folder or any remote streaming uploads to: s3://, gs://, oci://, ...):

    <remote>/<lo>-<hi>[/<subfolder>]/index.json          one StreamingDataset per bucket
    <remote>/<lo>-<hi>[/<subfolder>]/<NNNNN>/...         the part written from input shard NNNNN
    <remote>/_cloudwriter[/<subfolder>]/<NNNNN>.record   written once all parts of NNNNN are up

Buckets are on min(width, height) with edges 0, 64, 128, 256, 512, 768, 1024, 2**20 (one dataset
`0-1048576` without `--bucketed`). Sizes come from the parquet where img2dataset filled them and
otherwise from the image header (never decoded). Only `success` rows are written; the others, and
success rows whose bytes have no readable image header, are counted by reason.

Resume: a shard is done when its `.record` exists at the remote; the merged `index.json` of each
bucket (rewritten every `--merge_interval` seconds and at the end, each bucket on its own) lists
only done shards, so a reader sees all of a shard or none of it. After any crash, rerun the same
command (on any machine): done shards are skipped, the others redone, their parts overwritten.
Without `--keep_parquet`, a parquet is deleted only after the record is up, and its `_stats.json`
becomes `NNNNN_converted.json` (so a resumed img2dataset still counts the shard as finished).
Parts are written locally (`--staging`) and uploaded by the worker itself with streaming's
CloudUploader (MDSWriter's own upload threads only log failures): a failing upload is retried
`--retry` times, then the run stops all workers and exits 2, deleting nothing.

Many machines: give each run its own `--subfolder`, then join them once all are finished with

    python laion_cloudwriter.py --remote s3://my-bucket/laion --merge_only

which writes `<remote>/<lo>-<hi>/index.json` over every subfolder's done shards.

Scale: a LAION-2B shard of 10,000 rows is ~1 GB; each worker holds one parquet row batch plus at
most one open MDS shard (`--size_limit`) per bucket, so memory is about
processes x (batch + buckets x size_limit) whatever the number or size of the input shards.
Missing optional columns (and nulls) become: NaN for floats, '' for strings, 0 for `hash`.
At the end a summary is printed and written as JSON to `--summary` (default
`<local>/_cloudwriter/summary[_<subfolder>].json`). Exit code: 0 ok, 1 some parquet unreadable
(skipped, kept, named), 2 fatal (remote failing, missing required column).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import io
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from streaming import MDSWriter
from streaming.base.storage.download import CloudDownloader
from streaming.base.storage.upload import CloudUploader
from streaming.base.util import merge_index
from tqdm import tqdm

Image.MAX_IMAGE_PIXELS = None  # only headers are read: no decompression bomb to fear

# Shorter-side bucket edges; each bucket is its own dataset `<lo>-<hi>`.
BUCKET_EDGES = (0, 64, 128, 256, 512, 768, 1024, 2**20)
BUCKETS = [f'{lo}-{hi}' for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:])]
UNBUCKETED = f'{BUCKET_EDGES[0]}-{BUCKET_EDGES[-1]}'

# Output schema (MDS encodings). Floats default to NaN, strings to '', hash to 0.
FLOAT_COLUMNS = ('punsafe', 'pwatermark', 'similarity', 'aesthetic_score')
STR_COLUMNS = ('caption', 'url', 'key', 'status', 'error_message', 'exif')
SIZE_COLUMNS = ('width', 'height', 'original_width', 'original_height')
COLUMNS = {**{c: 'float64' for c in FLOAT_COLUMNS}, **{c: 'str' for c in STR_COLUMNS},
           **{c: 'int32' for c in SIZE_COLUMNS}, 'jpg': 'bytes', 'hash': 'int64'}
REQUIRED = ('jpg', 'caption', 'width', 'height', 'status')
# Input names that differ from the output name (the aesthetic set's metadata is upper case).
ALIASES = {'aesthetic_score': ('aesthetic_score', 'AESTHETIC_SCORE')}

RECORDS = '_cloudwriter'  # record area under --remote; not *.json so merge_index never sees it
# Summary folder under --local: img2dataset parses a shard number from every *.json directly in it.
SUMMARY_DIR = '_cloudwriter'
UNREADABLE_HEADER = 'success but no readable image header'
EXIT_OK, EXIT_BAD_INPUT, EXIT_FATAL = 0, 1, 2

log = logging.getLogger('laion_cloudwriter')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--local', type=str, default='',
                   help='Folder of img2dataset parquet shards (NNNNN.parquet + NNNNN_stats.json).')
    p.add_argument('--remote', type=str, default='',
                   help='Where the MDS datasets go: a folder, s3://bucket/path, gs://..., oci://... '
                        '(required)')
    p.add_argument('--subfolder', type=str, default='',
                   help='Write <remote>/<bucket>/<subfolder>: one per machine, joined by --merge_only.')
    p.add_argument('--bucketed', action='store_true',
                   help='One dataset per shorter-side bucket (else one dataset 0-1048576).')
    p.add_argument('--keep_parquet', action='store_true',
                   help='Keep parquet shards and their _stats.json after conversion.')
    p.add_argument('--processes', type=int, default=os.cpu_count() or 1,
                   help='Worker processes, each converting one parquet shard at a time.')
    p.add_argument('--poll_interval', type=float, default=10.0,
                   help='Seconds between looks at --local for newly finished shards.')
    p.add_argument('--wait_before_start', type=float, default=0.0,
                   help='Seconds to sleep before starting (e.g. while the download starts).')
    p.add_argument('--merge_interval', type=float, default=300.0,
                   help='Seconds between rewrites of the merged index.json while running '
                        '(it is always written at the end).')
    p.add_argument('--size_limit', type=str, default='64mb',
                   help='MDS shard size limit (streaming size_limit); bounds memory per bucket.')
    p.add_argument('--compression', type=str, default='',
                   help="MDS shard compression (streaming's, e.g. zstd); default none (JPEGs).")
    p.add_argument('--batch_size', type=int, default=256,
                   help='Parquet rows read at a time per worker (bounds memory).')
    p.add_argument('--upload_threads', type=int, default=8,
                   help='Parallel uploads per worker for a cloud remote.')
    p.add_argument('--retry', type=int, default=2,
                   help="Attempts per upload (streaming's uploader retry) before the run stops.")
    p.add_argument('--staging', type=str, default='',
                   help='Local scratch for parts before upload (default <local>/_cloudwriter_staging).')
    p.add_argument('--summary', type=str, default='',
                   help='Summary JSON path (default <local>/_cloudwriter/summary[_<subfolder>].json).')
    p.add_argument('--merge_only', action='store_true',
                   help='Only write <remote>/<bucket>/index.json over every subfolder\'s done shards.')
    p.add_argument('--wandb_project', type=str, default='',
                   help='Log progress to this wandb project (only if wandb is installed).')
    args = p.parse_args(argv)
    if '/' in args.subfolder.strip('/'):
        p.error('--subfolder must be one folder name (no "/")')
    if not args.remote:
        p.error('--remote is required')
    args.subfolder = args.subfolder.strip('/')
    args.remote = args.remote.rstrip('/')
    if not args.merge_only and not args.local:
        p.error('--local is required (unless --merge_only)')
    return args


# ---------------------------------------------------------------------------------------------
# Remote helpers: a local folder is written directly (fsync + rename), anything else through
# streaming's CloudUploader / CloudDownloader.
# ---------------------------------------------------------------------------------------------

def is_cloud(remote: str) -> bool:
    return '://' in remote


def join(*parts: str) -> str:
    return '/'.join(p.strip('/') if i else p.rstrip('/') for i, p in enumerate(parts) if p)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_local_atomic(path: str, data: bytes) -> None:
    """Write a file so that it exists whole or not at all, and is on disk."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_UPLOADERS: dict[tuple[str, str], Any] = {}


def uploader(staging: str, remote: str, retry: int, cache: bool = False):
    """streaming's uploader from a local staging root to a remote root (keeps nothing local)."""
    if (staging, remote) in _UPLOADERS:
        return _UPLOADERS[staging, remote]
    os.makedirs(staging, exist_ok=True)
    up = CloudUploader.get((staging, remote), keep_local=False, retry=retry, exist_ok=True)
    if cache:
        _UPLOADERS[staging, remote] = up
    return up


def put_bytes(remote: str, rel: str, data: bytes, staging: str, retry: int) -> None:
    """Write one small file at `remote`/`rel`, whole or not at all (a rename, or one PUT)."""
    if not is_cloud(remote):
        write_local_atomic(os.path.join(remote, rel), data)
        return
    root = os.path.join(staging, f'publish{os.getpid()}')
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    Path(root, rel).write_bytes(data)
    uploader(root, remote, retry, cache=True).upload_file(rel)  # removes the local copy


def list_records(remote: str, prefix: str) -> list[str]:
    """Paths (relative to `remote`) of every *.record below `remote`/`prefix`."""
    if not is_cloud(remote):
        base = Path(remote, prefix)
        return sorted(str(p.relative_to(remote)) for p in base.rglob('*.record')) if base.is_dir() else []
    with tempfile.TemporaryDirectory() as tmp:
        keys = CloudUploader.get((tmp, remote), exist_ok=True).list_objects(prefix.strip('/') + '/') or []
    root = urlparse(remote).path.strip('/')
    return sorted(k[len(root):].strip('/') if root else k for k in keys if k.endswith('.record'))


def read_remote(remote_file: str) -> bytes:
    if not is_cloud(remote_file):
        return Path(remote_file).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        dest = os.path.join(tmp, 'f')
        CloudDownloader.direct_download(remote_file, dest)
        return Path(dest).read_bytes()


def read_records(remote: str, subfolder: str | None) -> dict[str, dict[str, dict]]:
    """Done shards' records, by subfolder ('' = none) then shard id. `subfolder=None`: every one."""
    wanted = []
    for rel in list_records(remote, join(RECORDS, subfolder or '')):
        sub = os.path.dirname(rel)[len(RECORDS):].strip('/')
        if subfolder is None or sub == subfolder:  # not a record of another subfolder below ours
            wanted.append((sub, join(remote, rel)))
    out: dict[str, dict[str, dict]] = {}
    with ThreadPoolExecutor(16) as pool:  # one small GET each: in parallel
        for (sub, _), data in zip(wanted, pool.map(read_remote, [url for _, url in wanted])):
            rec = json.loads(data)
            out.setdefault(sub, {})[rec['shard']] = rec
    return out


# ---------------------------------------------------------------------------------------------
# Find work: finished shards in --local.
# ---------------------------------------------------------------------------------------------

def finished_shards(local: str) -> dict[str, str]:
    """Shard id -> parquet path, for every shard whose _stats.json exists."""
    out = {}
    for stats in Path(local).glob('*_stats.json'):
        sid = stats.name[: -len('_stats.json')]
        parquet = stats.with_name(f'{sid}.parquet')
        if parquet.exists():
            out[sid] = str(parquet)
    return dict(sorted(out.items()))


def delete_input(parquet: str) -> None:
    """Remove a converted shard's parquet, then turn its _stats.json into `NNNNN_converted.json`.

    img2dataset takes every `NNNNN_*.json` in its output folder for a finished shard, so a download
    resumed beside us does not fetch converted shards again; we only look at `*_stats.json`.
    """
    p = Path(parquet)
    p.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(p.with_name(f'{p.stem}_stats.json'), p.with_name(f'{p.stem}_converted.json'))


# ---------------------------------------------------------------------------------------------
# Read + transform: parquet row batches to MDS samples (in the worker processes).
# ---------------------------------------------------------------------------------------------

class ShardError(Exception):
    """A shard that cannot be converted; `fatal` stops the run, else the shard is skipped."""

    def __init__(self, message: str, fatal: bool):
        super().__init__(message, fatal)
        self.message, self.fatal = message, fatal


def input_columns(names: list[str], parquet: str) -> dict[str, str]:
    """Output column -> input column present in the file; stops on a missing required column."""
    for col in REQUIRED:
        if col not in names:
            raise ShardError(f'{parquet}: missing required column {col!r}', fatal=True)
    found = {}
    for col in COLUMNS:
        for name in ALIASES.get(col, (col,)):
            if name in names:
                found[col] = name
                break
    return found


def column_lists(batch: pa.RecordBatch, found: dict[str, str]) -> dict[str, list]:
    """Each output column of a batch as a Python list, nulls replaced by the defaults."""
    n = batch.num_rows
    out: dict[str, list] = {}
    for col, enc in COLUMNS.items():
        if col not in found:
            default = math.nan if enc == 'float64' else '' if enc == 'str' else 0
            out[col] = [None if col in SIZE_COLUMNS or col == 'jpg' else default] * n
            continue
        arr = batch.column(found[col])
        if enc == 'float64':
            arr = pc.fill_null(arr.cast(pa.float64()), math.nan)
        elif enc == 'str':
            arr = pc.fill_null(arr.cast(pa.string()), '')
        elif col == 'hash':
            arr = pc.fill_null(arr.cast(pa.int64()), 0)
        out[col] = arr.to_pylist()
    return out


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


def header_size(data: memoryview | bytes) -> tuple[int, int] | None:
    """(width, height) from the image header, without decoding pixels; None if unreadable."""
    size = jpeg_size(data)
    if size is not None:
        return size
    try:
        with Image.open(io.BytesIO(data)) as im:  # PNG, WebP, odd JPEGs...
            return im.size
    except Exception:
        return None


def bucket_of(width: int, height: int, bucketed: bool) -> str:
    if not bucketed:
        return UNBUCKETED
    i = bisect.bisect_right(BUCKET_EDGES, min(width, height)) - 1
    return BUCKETS[min(max(i, 0), len(BUCKETS) - 1)]


def samples(cols: dict[str, list], skipped: dict[str, int], bucketed: bool):
    """(bucket, sample) for each success row with a known size; counts the rest in `skipped`."""
    for i, status in enumerate(cols['status']):
        if status != 'success':
            reason = cols['error_message'][i] or status or 'no status'
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        data = cols['jpg'][i] or b''
        w, h = cols['width'][i], cols['height'][i]
        if w is None or h is None:
            size = header_size(data)
            if size is None:
                skipped[UNREADABLE_HEADER] = skipped.get(UNREADABLE_HEADER, 0) + 1
                continue
            w, h = size
        sample = {c: v[i] for c, v in cols.items()}
        sample.update(jpg=data, width=w, height=h)
        if sample['original_width'] is None or sample['original_height'] is None:
            sample['original_width'], sample['original_height'] = w, h
        yield bucket_of(w, h, bucketed), sample


# ---------------------------------------------------------------------------------------------
# Write: one worker converts one shard into one MDS part per bucket, uploads, then records it.
# ---------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def init_worker(progress: Any, args: argparse.Namespace) -> None:
    """Per-process state; workers die with the parent (a killed run leaves no writer behind)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(progress=progress, args=args)


def read_batches(pf: pq.ParquetFile, parquet: str, columns: list[str], batch_size: int):
    """Row batches of a parquet; a corrupt file becomes a skippable ShardError."""
    batches = pf.iter_batches(batch_size=batch_size, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise ShardError(f'{parquet}: unreadable parquet ({type(e).__name__}: {e})', fatal=False) from e
        yield batch


def write_parts(parquet: str, out_root: str, sub: str, args: argparse.Namespace) -> dict[str, Any]:
    """Read one parquet in batches into MDS parts `<out_root>/<bucket>[/<sub>]/<shard>`."""
    sid = Path(parquet).stem
    try:
        pf = pq.ParquetFile(parquet, memory_map=True)
    except Exception as e:
        raise ShardError(f'{parquet}: unreadable parquet ({type(e).__name__}: {e})', fatal=False) from e
    found = input_columns(pf.schema_arrow.names, parquet)
    writers: dict[str, Any] = {}
    counts: dict[str, int] = {}
    skipped: dict[str, int] = {}
    nbytes = 0
    progress = _WORKER.get('progress')
    try:
        for batch in read_batches(pf, parquet, sorted(set(found.values())), args.batch_size):
            cols = column_lists(batch, found)
            n0, b0 = sum(counts.values()), nbytes
            for bucket, sample in samples(cols, skipped, args.bucketed):
                w = writers.get(bucket)
                if w is None:
                    part = join(out_root, bucket, sub, sid)
                    shutil.rmtree(part, ignore_errors=True)
                    w = writers[bucket] = MDSWriter(out=part, columns=COLUMNS, size_limit=args.size_limit,
                                                    compression=args.compression or None)
                w.write(sample)
                counts[bucket] = counts.get(bucket, 0) + 1
                nbytes += len(sample['jpg'])
            if progress is not None:
                with progress.get_lock():
                    progress[0] += sum(counts.values()) - n0
                    progress[1] += nbytes - b0
    finally:
        for w in writers.values():
            w.finish()
    index = {b: json.loads(Path(out_root, b, sub, sid, 'index.json').read_text()) for b in writers}
    return {'shard': sid, 'parquet': os.path.basename(parquet), 'bucketed': args.bucketed,
            'samples': counts, 'skipped': skipped, 'bytes': nbytes, 'index': index}


def upload_parts(record: dict, staging: str, args: argparse.Namespace) -> None:
    """Upload every file of a shard's parts, then check each is listed at the remote."""
    sid, sub = record['shard'], args.subfolder
    files = []
    for bucket, index in record['index'].items():
        rel = join(bucket, sub, sid)
        names = [s[k]['basename'] for s in index['shards'] for k in ('raw_data', 'zip_data')
                 if s.get(k)]
        files += [join(rel, name) for name in names] + [join(rel, 'index.json')]
    up = uploader(staging, args.remote, args.retry, cache=True)
    with ThreadPoolExecutor(args.upload_threads) as pool:
        list(pool.map(up.upload_file, files))
    listed = set()
    for bucket in record['index']:
        listed.update(up.list_objects(join(bucket, sub, sid) + '/') or [])
    root = urlparse(args.remote).path.strip('/')
    missing = [f for f in files if join(root, f).strip('/') not in listed]
    if missing:
        raise RuntimeError(f'uploaded but not listed at the remote: {missing[:3]}')


def write_record(record: dict, args: argparse.Namespace) -> None:
    """The shard's record at the remote: written last, it is what makes the shard done."""
    rel = join(RECORDS, args.subfolder, f"{record['shard']}.record")
    put_bytes(args.remote, rel, json.dumps(record).encode(), args.staging, args.retry)


def convert_shard(parquet: str) -> dict[str, Any]:
    """Convert one shard; returns its record once it is written at the remote."""
    args = _WORKER['args']
    sid = Path(parquet).stem
    cloud = is_cloud(args.remote)
    out_root = os.path.join(args.staging, 'parts') if cloud else args.remote
    try:
        record = write_parts(parquet, out_root, args.subfolder, args)
        if cloud:
            upload_parts(record, os.path.join(args.staging, 'parts'), args)
        else:
            for bucket in record['index']:
                part = Path(out_root, bucket, args.subfolder, sid)
                for f in part.iterdir():
                    fsync_file(str(f))
        write_record(record, args)
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f'{parquet}: writing to {args.remote} failed ({type(e).__name__}: {e})',
                         fatal=True) from e
    finally:
        if cloud:
            for bucket in BUCKETS + [UNBUCKETED]:
                shutil.rmtree(Path(out_root, bucket, args.subfolder, sid), ignore_errors=True)
    if not args.keep_parquet:
        delete_input(parquet)
    return record


# ---------------------------------------------------------------------------------------------
# Merge: one index.json per bucket over done shards only, with streaming's merge_index.
# ---------------------------------------------------------------------------------------------

def merge_parts(parts: dict[str, dict], out: str) -> str:
    """Write each part's index into `out/<name>/index.json`, merge them into `out/index.json`."""
    paths = []
    for name, index in sorted(parts.items()):
        path = Path(out, name, 'index.json')
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(index))
        paths.append(str(path))
    merge_index(paths, out)
    return os.path.join(out, 'index.json')


def publish_index(merged: str, args: argparse.Namespace, bucket: str, subfolder: str) -> None:
    """Replace the dataset's index.json with the merged one."""
    rel = join(bucket, subfolder, 'index.json')
    put_bytes(args.remote, rel, Path(merged).read_bytes(), args.staging, args.retry)


def merge_run(records: dict[str, dict], args: argparse.Namespace) -> None:
    """index.json of each bucket of this run's (sub)folder, over its done shards."""
    for bucket in sorted({b for r in records.values() for b in r['index']}):
        parts = {sid: r['index'][bucket] for sid, r in records.items() if bucket in r['index']}
        with tempfile.TemporaryDirectory(dir=args.staging) as tmp:
            merged = merge_parts(parts, tmp)
            publish_index(merged, args, bucket, args.subfolder)


def merge_subfolders(args: argparse.Namespace) -> dict[str, int]:
    """--merge_only: `<remote>/<bucket>/index.json` over every subfolder's done shards (and each
    subfolder's own index.json rewritten too). Returns samples per bucket."""
    by_sub = read_records(args.remote, None)
    totals: dict[str, int] = {}
    buckets = sorted({b for recs in by_sub.values() for r in recs.values() for b in r['index']})
    for bucket in buckets:
        with tempfile.TemporaryDirectory(dir=args.staging) as tmp:
            tops: dict[str, dict] = {}
            for sub, recs in sorted(by_sub.items()):
                parts = {sid: r['index'][bucket] for sid, r in recs.items() if bucket in r['index']}
                if not parts:
                    continue
                if sub:
                    merged = merge_parts(parts, os.path.join(tmp, 'subs', sub))
                    publish_index(merged, args, bucket, sub)
                    tops[sub] = json.loads(Path(merged).read_text())
                else:
                    tops.update(parts)
                totals[bucket] = totals.get(bucket, 0) + sum(r['samples'].get(bucket, 0)
                                                            for r in recs.values())
            merged = merge_parts(tops, os.path.join(tmp, 'top'))
            publish_index(merged, args, bucket, '')
    return totals


# ---------------------------------------------------------------------------------------------
# Summary.
# ---------------------------------------------------------------------------------------------

def summarize(records: dict[str, dict], run: dict[str, Any], elapsed: float) -> dict[str, Any]:
    per_bucket: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for r in records.values():
        for b, n in r['samples'].items():
            per_bucket[b] = per_bucket.get(b, 0) + n
        for k, n in r['skipped'].items():
            skipped[k] = skipped.get(k, 0) + n
    mb = run['bytes'] / 1e6
    return {'shards_done': len(records), 'shards_this_run': run['shards'],
            'samples_per_bucket': dict(sorted(per_bucket.items())),
            'samples': sum(per_bucket.values()), 'skipped_by_reason': skipped,
            'bytes': sum(r['bytes'] for r in records.values()),
            'bytes_this_run': run['bytes'], 'samples_this_run': run['samples'],
            'unreadable_parquet': run['bad'], 'errors': run['errors'],
            'elapsed_s': round(elapsed, 2),
            'samples_per_s': round(run['samples'] / max(elapsed, 1e-9), 1),
            'mb_per_s': round(mb / max(elapsed, 1e-9), 1)}


def print_summary(summary: dict[str, Any], path: str) -> None:
    lines = [f"shards: {summary['shards_done']} done ({summary['shards_this_run']} this run), "
             f"{summary['samples']} samples, {summary['bytes'] / 1e6:.1f} MB of images",
             f"this run: {summary['samples_this_run']} samples in {summary['elapsed_s']} s "
             f"({summary['samples_per_s']} samples/s, {summary['mb_per_s']} MB/s)"]
    lines += [f'  {b:>14}: {n}' for b, n in summary['samples_per_bucket'].items()]
    if summary['skipped_by_reason']:
        lines.append('skipped:')
        lines += [f'  {n:>8}  {k}' for k, n in sorted(summary['skipped_by_reason'].items())]
    for bad in summary['unreadable_parquet']:
        lines.append(f'UNREADABLE (kept): {bad}')
    for err in summary['errors']:
        lines.append(f'ERROR: {err}')
    lines.append(f'summary JSON: {path}')
    print('\n'.join(lines), flush=True)


# ---------------------------------------------------------------------------------------------
# Main loop: poll --local, convert finished shards in parallel, merge, clean up.
# ---------------------------------------------------------------------------------------------

def wandb_run(args: argparse.Namespace):
    if not args.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        log.warning('wandb is not installed; not logging to wandb')
        return None
    return wandb.init(project=args.wandb_project, config=vars(args))


def terminate(executor: ProcessPoolExecutor) -> None:
    """Stop the workers now (a failing remote must not keep them busy)."""
    for proc in list(getattr(executor, '_processes', {}).values()):
        with contextlib.suppress(Exception):
            proc.kill()
    executor.shutdown(wait=False, cancel_futures=True)


def run(args: argparse.Namespace) -> int:
    start = time.time()
    records = read_records(args.remote, args.subfolder).get(args.subfolder, {})
    mixed = [sid for sid, r in records.items() if r.get('bucketed') != args.bucketed]
    if mixed:
        print(f'error: {args.remote} holds shards written {"without" if args.bucketed else "with"} '
              f'--bucketed (e.g. {mixed[0]}); use the same setting or another --remote/--subfolder',
              file=sys.stderr)
        return EXIT_FATAL
    if not args.keep_parquet:
        for sid in records:  # recorded, but a run died before deleting its input
            delete_input(os.path.join(args.local, f'{sid}.parquet'))
    run_stats: dict[str, Any] = {'shards': 0, 'samples': 0, 'bytes': 0, 'bad': [], 'errors': []}
    progress = mp.get_context('fork').Array('q', 2)
    executor = ProcessPoolExecutor(args.processes, mp_context=mp.get_context('fork'),
                                   initializer=init_worker, initargs=(progress, args))
    wb = wandb_run(args)
    bar = tqdm(desc='shards', unit='shard', dynamic_ncols=True, file=sys.stderr)
    futures: dict[Future, str] = {}
    bad: set[str] = set()
    last_merge, merged_n, last_scan = time.time(), len(records), -math.inf
    try:
        while True:
            if not futures or time.time() - last_scan >= args.poll_interval:
                last_scan = time.time()
                done_flag = Path(args.local, 'done').exists()  # before the scan: no shard missed
                busy = set(futures.values())
                for sid, parquet in finished_shards(args.local).items():
                    if sid not in records and sid not in bad and sid not in busy:
                        futures[executor.submit(convert_shard, parquet)] = sid
                bar.total = len(records) + len(futures)
                bar.refresh()
                if not futures:
                    if done_flag:
                        break
                    time.sleep(args.poll_interval)
                    continue
            finished, _ = wait(list(futures), timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                sid = futures.pop(fut)
                try:
                    rec = fut.result()
                except ShardError as e:
                    if e.fatal:
                        run_stats['errors'].append(e.message)
                        raise
                    bad.add(sid)
                    run_stats['bad'].append(e.message)
                    tqdm.write(f'skipped: {e.message}', file=sys.stderr)
                    continue
                records[sid] = rec
                run_stats['shards'] += 1
                run_stats['samples'] += sum(rec['samples'].values())
                run_stats['bytes'] += rec['bytes']
                bar.update(1)
            el = max(time.time() - start, 1e-9)
            bar.set_postfix_str(f'{progress[0] / el:,.0f} samples/s, {progress[1] / el / 1e6:,.1f} MB/s')
            if wb is not None and finished:
                wb.log({'samples': progress[0], 'bytes': progress[1], 'shards': len(records)})
            if len(records) > merged_n and time.time() - last_merge > args.merge_interval:
                merge_run(records, args)
                last_merge, merged_n = time.time(), len(records)
    except ShardError as e:
        terminate(executor)
        bar.close()
        print(f'error: {e.message}', file=sys.stderr, flush=True)
        return finish(records, run_stats, start, args, EXIT_FATAL)
    except BaseException:
        terminate(executor)
        raise
    executor.shutdown()
    bar.close()
    try:
        merge_run(records, args)
    except Exception as e:
        msg = f'writing the merged index.json to {args.remote} failed ({type(e).__name__}: {e})'
        run_stats['errors'].append(msg)
        print(f'error: {msg}', file=sys.stderr, flush=True)
        return finish(records, run_stats, start, args, EXIT_FATAL)
    if wb is not None:
        wb.finish()
    return finish(records, run_stats, start, args, EXIT_BAD_INPUT if run_stats['bad'] else EXIT_OK)


def finish(records: dict, run_stats: dict, start: float, args: argparse.Namespace, code: int) -> int:
    summary = summarize(records, run_stats, time.time() - start)
    summary['exit_code'] = code
    name = f'summary_{args.subfolder}.json' if args.subfolder else 'summary.json'
    path = Path(args.summary or os.path.join(args.local or '.', SUMMARY_DIR, name))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print_summary(summary, path)
    for scratch in [Path(args.staging, 'parts'), *Path(args.staging).glob('publish*')]:
        shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(args.staging)
    return code


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR, format='%(levelname)s %(name)s: %(message)s')
    logging.getLogger().setLevel(logging.ERROR)  # merge_index warns about its temp folder
    args.staging = args.staging or os.path.join(args.local or tempfile.gettempdir(), '_cloudwriter_staging')
    os.makedirs(args.staging, exist_ok=True)
    if args.merge_only:
        try:
            totals = merge_subfolders(args)
        except Exception as e:
            print(f'error: merging at {args.remote} failed ({type(e).__name__}: {e})', file=sys.stderr)
            return EXIT_FATAL
        print(json.dumps({'merged_samples_per_bucket': totals}))
        return EXIT_OK
    if args.wait_before_start > 0:
        time.sleep(args.wait_before_start)
    if not Path(args.local).is_dir():
        print(f'error: --local {args.local} is not a folder', file=sys.stderr)
        return EXIT_FATAL
    try:
        return run(args)
    except KeyboardInterrupt:
        print('interrupted; rerun the same command to resume', file=sys.stderr)
        return 130
    except Exception as e:  # e.g. the remote is unreachable when reading the records
        print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
        return EXIT_FATAL


if __name__ == '__main__':
    sys.exit(main())
