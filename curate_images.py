"""Score, CLIP-score and near-deduplicate the images of MDS datasets, then filter them: before captions.

Reads one, several or all buckets of what laion_cloudwriter.py wrote, embeds every image once with an
image-text model of transformers (CLIPModel, SiglipModel: any with get_image_features and
get_text_features), and adds columns: one per score head (a linear layer or an MLP over the normalised
embedding, such as LAION's improved aesthetic predictor), one CLIP score per `--caption_keys` column
(cosine of image and text features), and `dup_group` / `dup_keep` over every bucket together. A
`--filter` (Polars SQL, as filter_metadata.py reads it) then drops rows. The full manual is
docs/curate_images.md.

Example (one GPU; `torchrun --nproc_per_node 8 -- curate_images.py ...` for eight):

    python curate_images.py --remote_download s3://my-bucket/laion/mds --bucket all \\
        --local /tmp/curate-cache --remote_upload s3://my-bucket/laion/curated \\
        --model_name openai/clip-vit-large-patch14 --heads aesthetic=sac+logos+ava1-l14-linearMSE.pth \\
        --caption_keys caption --filter 'aesthetic >= 5 AND clip_caption >= 0.2 AND dup_keep = 1'

Reads `<remote_download>/<bucket>[/<subfolder>]` (or `<local>/<bucket>` in place): MDS with a `jpg`
column. Writes `<remote_upload>/<bucket>[/<subfolder>]`: every input column unchanged plus the new ones,
and `curation.json` beside each index.json (model, heads, thresholds, filter, counts). The passes
keep their work below `<remote_upload>/_curate[/<subfolder>]/` (per part: embeddings and scores; the
dedup's centroids, shuffled vectors, pairs and groups). Ends with a summary, printed and written as
JSON (`--summary`); `--preview N` adds a PNG of N duplicate groups and the highest and lowest scored.

Resume: every pass works in units with a `_done` marker (embedding: parts of whole input shards; dedup:
its parts and groups of clusters; writing: parts again). Rerun the same command with any number of
processes to skip finished units; other settings are refused, but another `--filter` rewrites only the
output (the embeddings and the dedup are reused: tune it by looking). Rank 0 merges each index.json last.

Exit codes: 0 done (undecodable images are skipped: each named in its part's `_done` marker, counted by
reason in the summary); 2 one `error:` line; 128 + the signal after SIGTERM (143) or Ctrl-C (130):
finished units are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

BUCKET_EDGES = (0, 64, 128, 256, 512, 768, 1024, 2**20)  # on the shorter side, as the cloudwriter buckets
BUCKET_NAMES = tuple(f'{lo}-{hi}' for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:]))
IMAGE_COLUMN, KEY_COLUMN = 'jpg', 'key'  # the cloudwriter's image bytes and sample key
IMAGE_ENCODINGS = ('bytes', 'jpeg', 'png')  # of IMAGE_COLUMN: each a file's bytes (see stored-files)
INDEX = 'index.json'
DONE_MARKER = '_done'  # per unit of work; not *.json, so streaming's merge_index never takes it for an index
STAGING = '.staging-curate'  # below --local: output files on their way to a remote
RECORD = 'curation.json'  # beside each index.json: how the columns were made, and the counts
WORK = '_curate'  # below --remote_upload: every pass's finished units
SETTINGS = 'settings.json'  # in WORK: the run's settings; a rerun with others is refused
# in WORK: the centroids alone in a folder (listing it says whether they are there); the groups a file per
# part of the run (a rank's write pass reads its parts' only) and the largest groups, then a _done marker
CENTROIDS, GROUPS = 'dedup/centroids/centroids.npz', 'dedup/groups'
PREVIEW_TILE, PREVIEW_LINE, PREVIEW_PER_ROW = 128, 14, 8  # px, px of a text line, images per row
PREVIEW_GROUPS = 100  # at most: the largest groups are kept for the preview when the groups are made
SIM_COLUMN = 'clip_{key}'  # float32: cosine of the image and the text of column `key`
DUP_GROUP, DUP_KEEP = 'dup_group', 'dup_keep'  # int64 run id of the kept member (-1: no duplicate); int32 0/1
# --clusters 0: 2 sqrt(N) clusters for N images. Each vector is compared with the k centroids (N k d
# multiply-adds in all) and, as it sits in 2 clusters of ~2N/k members, within them (4 N^2 d / k in all):
# equal at k = 2 sqrt(N), when a cluster holds ~sqrt(N) vectors.
CLUSTER_RULE = '2 sqrt(N)'
SAMPLE_PER_CLUSTER = 64  # k-means trains on about this many vectors per centroid (faiss wants 39..256)
BLOCK = 4096  # rows per block of a within-cluster similarity matrix (BLOCK x members, float32)
HASH_BITS = 8  # dHash grid: 8 x 8 = 64 bits
# A dHash groups on its own only with detail: at least this many different rows of its 8 and this many
# bits of each value. Solid colours, gradients, stripes and flags, a blank page share a few hashes with
# every other such picture (all bits equal, or one row repeated); their copies are the embedding's to find.
DHASH_ROWS, DHASH_BITS = 4, 8


# >>> twin: errors (verbatim in caption_images.py, curate_images.py; test_twins.py)
class UserError(Exception):
    """A problem with the command line, the input, the model or the environment: reported in one line."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the main process: stop, keep finished parts, report."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
# <<< twin: errors


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------

# >>> twin: at-least (verbatim in caption_images.py, curate_images.py; test_twins.py)
def at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if value != value:  # NaN: every comparison is false, so it would pass any bound unseen
            raise argparse.ArgumentTypeError(f'{text!r} is not a number')
        if value < low:
            raise argparse.ArgumentTypeError(f'{text} must be at least {low}')
        return value
    return check
# <<< twin: at-least


def cosine(text: str) -> float:
    value = at_least(-1.0, float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f'{text}: a cosine is at most 1')
    return value


def preview_groups(text: str) -> int:
    value = at_least(0)(text)
    if value > PREVIEW_GROUPS:
        raise argparse.ArgumentTypeError(f'{text}: the preview shows at most {PREVIEW_GROUPS} groups')
    return value


def bucket_name(text: str) -> str:
    """An index into BUCKET_NAMES, a bucket name, or 'all' (every bucket the input has)."""
    if text.isdigit():
        if int(text) >= len(BUCKET_NAMES):
            raise argparse.ArgumentTypeError(f'{text}: the bucket index must be 0..{len(BUCKET_NAMES) - 1} '
                                             f'({", ".join(BUCKET_NAMES)})')
        return BUCKET_NAMES[int(text)]
    return text


def head_flag(text: str) -> tuple[str, str]:
    name, _, path = text.partition('=')
    if not re.fullmatch(r'[A-Za-z_]\w*', name) or not path:
        raise argparse.ArgumentTypeError(f'{text}: write NAME=FILE, NAME a column name such as aesthetic')
    return name, path


# >>> twin: output-flags (verbatim in caption_images.py, curate_images.py; test_twins.py)
def size_limit(text: str) -> int:
    """'256mb', '64kb', '67108864': bytes per shard, as streaming's MDSWriter reads them."""
    found = re.fullmatch(r'(\d+)\s*(b|kb|mb|gb)?', text.strip().lower())
    value = int(found[1]) * 1024 ** ('b', 'kb', 'mb', 'gb').index(found[2] or 'b') if found else 0
    if not 0 < value < 2**32:
        raise argparse.ArgumentTypeError(f'{text}: must be a shard size from 1b to below 4gb, such as 256mb')
    return value


def compression(text: str) -> str:
    if text and not re.fullmatch(r'(br|bz2|gz|snappy|zstd)(:\d+)?', text):
        raise argparse.ArgumentTypeError(f'{text}: streaming knows br, bz2, gz, snappy, zstd (with an '
                                         'optional level, e.g. zstd:7); leave it empty for none')
    return text
# <<< twin: output-flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--local', default='/tmp/curate-images',
                   help='local cache folder; without --remote_download the input is read from '
                        '<local>/<bucket>')
    p.add_argument('--remote_download', default='', help='remote (or local) root of the input MDS datasets')
    p.add_argument('--remote_upload', required=True, help='remote (or local) root to write the output to')
    p.add_argument('--bucket', type=bucket_name, nargs='*', default=[],
                   help="buckets to read together: indices (0 '0-64' ... 3 '256-512' ...), names, or 'all'; "
                        'none: the roots are one dataset')
    p.add_argument('--subfolder', default='', help='subfolder below each bucket folder')
    p.add_argument('--model_name', default='openai/clip-vit-large-patch14',
                   help='image-text model (hub name or folder) with get_image_features / get_text_features')
    p.add_argument('--heads', type=head_flag, nargs='*', default=[],
                   help='score heads NAME=FILE: a torch state_dict of Linear layers (layers.0.weight ... '
                        'layers.7.bias) applied in key order to the normalised image embedding; column NAME')
    p.add_argument('--caption_keys', nargs='*', default=[],
                   help='text columns to CLIP-score against their image; column clip_<key>')
    p.add_argument('--dup_threshold', type=cosine, default=0.95,
                   help='images whose embeddings have a cosine above this are near-duplicates')
    p.add_argument('--clusters', type=at_least(0), default=0,
                   help=f'k-means clusters for the dedup; 0: {CLUSTER_RULE} for N images')
    p.add_argument('--dedup_parts', type=at_least(1), default=64,
                   help='groups of clusters: the dedup units of work and of resume, shared by the ranks')
    p.add_argument('--filter', default='', help='Polars SQL condition rows must meet (empty: keep every row)')
    p.add_argument('--batch-size', dest='batch_size', type=at_least(1), default=256, help='images per batch')
    p.add_argument('--num_workers', type=at_least(0), default=4,
                   help='DataLoader decoding processes per rank')
    p.add_argument('--device', choices=('auto', 'cuda', 'cpu'), default='auto',
                   help='auto: cuda:<LOCAL_RANK> when available')
    p.add_argument('--part_size', type=at_least(1), default=5000,
                   help='samples per unit of work and of resume (whole input shards, at least this many)')
    p.add_argument('--size_limit', type=size_limit, default='256mb', help='output shard size limit')
    p.add_argument('--compression', type=compression, default='', help='output shard compression, e.g. zstd')
    p.add_argument('--download_timeout', type=at_least(1e-3, float), default=300, help='seconds per file')
    p.add_argument('--download_retry', type=at_least(0), default=2, help='retries per file download')
    p.add_argument('--dist_timeout', type=at_least(1, float), default=7 * 24 * 3600,
                   help='seconds ranks wait for each other at each barrier')
    p.add_argument('--summary', default='',
                   help='where to write the JSON summary; empty: <local>/curate_summary.json')
    p.add_argument('--preview', type=preview_groups, default=0,
                   help=f'rank 0 writes a PNG of this many duplicate groups (the largest; at most '
                        f'{PREVIEW_GROUPS}) and of the highest and lowest scored')
    p.add_argument('--preview_path', default='', help='empty: beside the summary, <summary>_preview.png')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Places, remotes, parts and markers: the machinery of caption_images.py and precompute_latents.py
# ----------------------------------------------------------------------------------------------

# >>> twin: paths (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
def is_remote(path: str) -> bool:
    return urllib.parse.urlparse(path).scheme not in ('', 'file')


def join(root: str, *names: str) -> str:
    """Join path pieces, dropping empty ones (works for local paths and URLs)."""
    return '/'.join([root.rstrip('/')] + [n.strip('/') for n in names if n])
# <<< twin: paths


# >>> twin: places (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
@dataclasses.dataclass(frozen=True)
class Places:
    """Where a run reads, caches, stages and writes."""

    src: str  # the input dataset
    cache: str  # downloaded input shards; == src when the input is read in place (no --remote_download)
    out: str  # the output dataset
    staging: str  # local copies of output files on their way to a remote; deleted at the end


def places(args: argparse.Namespace) -> Places:
    """The run's places. A download cache belongs to one input and one output, so a run on another
    dataset (or into another output) never meets its shards."""
    out = join(args.remote_upload, args.bucket, args.subfolder)
    src = cache = join(args.local, args.bucket, args.subfolder)
    if args.remote_download:
        src = join(args.remote_download, args.bucket, args.subfolder)
        cache = join(args.local, args.bucket, args.subfolder, f'download-{digest(src, out)}')
    return Places(src, cache, out, join(args.local, STAGING, digest(out)))


def digest(*paths: str) -> str:
    """A short name for a combination of places (same places, any spelling: same name)."""
    return hashlib.sha1('\n'.join('/'.join(address(p)) for p in paths).encode()).hexdigest()[:12]
# <<< twin: places


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


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One input dataset of the run: its places, shards, columns and parts; run ids start at `offset`."""

    name: str
    places: Places
    shards: list[dict]
    columns: dict[str, str]
    parts: list[Part]
    offset: int


def bucket_places(args: argparse.Namespace) -> dict[str, Places]:
    """{bucket: its places}; 'all': every bucket whose index.json exists at the input root."""
    names = args.bucket or ['']
    if 'all' in names:
        root = args.remote_download or args.local
        names = [b for b in BUCKET_NAMES
                 if exists(join(root, b, args.subfolder, INDEX), args.download_timeout)]
        if not names:
            hints = (subfolder_hint(join(root, b, args.subfolder)) for b in BUCKET_NAMES)
            hint = next(filter(None, hints), '')
            raise UserError(f'--bucket all: no bucket of {", ".join(BUCKET_NAMES)} has an index.json '
                            f'below {root}{hint}')
    return {b: places(argparse.Namespace(**{**vars(args), 'bucket': b})) for b in dict.fromkeys(names)}


def exists(url: str, timeout: float) -> bool:
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(Exception):
        fetch(url, os.path.join(tmp, 'f'), timeout)
        return True
    return False


# >>> twin: check-places (verbatim in caption_images.py, curate_images.py; test_twins.py)
def check_places(pl: Places) -> None:
    """Refuse places that are one another or inside one another: a run would overwrite or delete the
    other's files. (An input read in place from --local may hold the staging folder: the clean-up
    deletes only that folder.)"""
    roles = {'the output (--remote_upload)': pl.out, 'the input': pl.src,
             'the download cache (--local)': pl.cache, 'the staging folder (--local)': pl.staging}
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = address(roles[a]), address(roles[b])
            relation = ('is the same place as' if x == y else 'is inside' if x[:len(y)] == y
                        else 'holds' if y[:len(x)] == x else '')
            if (a, b) == ('the input', 'the download cache (--local)') and pl.cache == pl.src \
                    or (a, b, relation) == ('the input', 'the staging folder (--local)', 'holds'):
                continue  # read in place: the cache is the input
            if relation:
                raise UserError(f'{a} {roles[a]} {relation} {b} {roles[b]}: give --remote_download, '
                                '--local and --remote_upload places of their own')


def first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def fetch(url: str, dest: str, timeout: float) -> None:
    """Download one file from a remote (or copy a local one) to `dest`, atomically."""
    tmp = f'{dest}.tmp{os.getpid()}'
    if is_remote(url):
        from streaming.base.storage.download import CloudDownloader
        CloudDownloader.direct_download(url, tmp, timeout)
    else:
        shutil.copyfile(url, tmp)
    os.replace(tmp, dest)


def output_names(out_root: str) -> list[str]:
    """Every file below `out_root`, relative to it."""
    if not is_remote(out_root):
        return [os.path.relpath(os.path.join(d, f), out_root)
                for d, _, files in os.walk(out_root) for f in files]
    from streaming.base.storage.upload import CloudUploader

    prefix = urllib.parse.urlparse(out_root).path.strip('/')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            keys = CloudUploader.get((tmp, out_root), exist_ok=True).list_objects() or []
    except Exception as err:
        raise UserError(f'cannot list the output {out_root}: {first_line(err)}') from None
    return [k[len(prefix):].lstrip('/') for k in keys]
# <<< twin: check-places


# >>> twin: read-json (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
def read_json(url: str, timeout: float, object_hook: Callable[[dict], Any] | None = None) -> Any:
    """A JSON file at a remote (fetched to a temporary file) or in a folder (read in place)."""
    with contextlib.ExitStack() as stack:
        if is_remote(url):
            local = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), 'f')
            fetch(url, local, timeout)
            url = local
        with open(url) as f:
            return json.load(f, object_hook=object_hook)
# <<< twin: read-json


# >>> twin: shared-lists (verbatim in caption_images.py, curate_images.py, precompute_latents.py;
# test_twins.py)
def shared_lists() -> Callable[[dict], dict]:
    """An object_hook for json.load of an MDS index.json: the lists its shard records repeat (the column
    names, encodings and sizes) are held once, so that a record takes ~0.9 KB instead of ~3.5 (rank 0
    holds the input's index while it plans: ~470k records in LAION-2B's biggest bucket). Nothing may
    change such a list in place."""
    seen: dict[tuple, list] = {}

    def shared(obj: dict) -> dict:
        for key, value in obj.items():
            if isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value):
                obj[key] = seen.setdefault((key, *value), value)
        return obj
    return shared
# <<< twin: shared-lists


# >>> twin: index-text (verbatim in caption_images.py, curate_images.py, precompute_latents.py;
# test_twins.py)
def index_text(shards: Iterable[dict]) -> Iterator[str]:
    """The text of an MDS index.json over `shards` (as `json.dumps({'version': 2, 'shards': [...]})` writes
    it), piece by piece: a merge writes each record as it reads it (~644k in LAION-2B's biggest bucket)."""
    yield '{"version": 2, "shards": ['
    for i, shard in enumerate(shards):
        yield ', ' * bool(i) + json.dumps(shard)
    yield ']}'
# <<< twin: index-text


# >>> twin: put-text (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
def put_text(out_root: str, staging: str, relpath: str, text: str | Iterable[str]) -> None:
    """Write `text`, or its pieces in order, to `<out_root>/<relpath>` (local: atomically; remote: via
    `staging`)."""
    if not is_remote(out_root):
        path = os.path.join(out_root, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + '.tmp', 'w') as f:
            f.writelines([text] if isinstance(text, str) else text)
        os.replace(path + '.tmp', path)
        return
    from streaming.base.storage.upload import CloudUploader

    folder, name = os.path.split(relpath)
    with tempfile.TemporaryDirectory(dir=staging, ignore_cleanup_errors=True) as local_dir:
        with open(os.path.join(local_dir, name), 'w') as f:
            f.writelines([text] if isinstance(text, str) else text)
        uploader = CloudUploader.get((local_dir, join(out_root, folder)), keep_local=False, exist_ok=True)
        uploader.upload_file(name)
# <<< twin: put-text


def put_arrays(root: str, staging: str, relpath: str, **arrays: np.ndarray) -> None:
    """Write `arrays` as an .npz to `<root>/<relpath>` (local: atomically; remote: via `staging`)."""
    os.makedirs(staging, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging) as tmp:
        np.savez(os.path.join(tmp, 'f.npz'), **arrays)
        if not is_remote(root):
            os.makedirs(os.path.dirname(os.path.join(root, relpath)), exist_ok=True)
            os.replace(os.path.join(tmp, 'f.npz'), os.path.join(root, relpath))
            return
        from streaming.base.storage.upload import CloudUploader
        folder, name = os.path.split(relpath)
        os.replace(os.path.join(tmp, 'f.npz'), os.path.join(tmp, name))
        CloudUploader.get((tmp, join(root, folder)), keep_local=False, exist_ok=True).upload_file(name)


def get_arrays(url: str, timeout: float) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        fetch(url, os.path.join(tmp, 'f.npz'), timeout)
        with np.load(os.path.join(tmp, 'f.npz')) as z:
            return {k: z[k] for k in z.files}


# >>> twin: parts (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
@dataclasses.dataclass(frozen=True)
class Part:
    """A unit of work: consecutive whole input shards, i.e. global sample ids [first, last)."""

    name: str
    shards: tuple[int, ...]
    first: int
    last: int


def plan_parts(shards: list[dict], part_size: int) -> list[Part]:
    """Group consecutive shards into parts of at least `part_size` samples (the last may be smaller)."""
    parts: list[Part] = []
    group: list[int] = []
    first = count = 0
    for i, shard in enumerate(shards):
        group.append(i)
        count += shard['samples']
        if count >= part_size or i == len(shards) - 1:
            parts.append(Part(f'{len(parts):05d}', tuple(group), first, first + count))
            first += count
            group, count = [], 0
    return parts
# <<< twin: parts


# >>> twin: done-markers (verbatim in caption_images.py, curate_images.py; test_twins.py)
def done_markers(out_root: str, parts: list[Part], timeout: float) -> Iterator[tuple[str, dict]]:
    """(part name, marker) of each of the given parts that has a readable _done marker, in part order:
    read 16 at a time and at most 256 ahead, so that a caller holds one marker at a time."""
    def read(part: Part) -> tuple[str, dict | None]:
        try:
            return part.name, read_json(join(out_root, part.name, DONE_MARKER), timeout)
        except Exception:  # absent or unreadable: the part is simply done again
            return part.name, None

    with ThreadPoolExecutor(16) as pool:
        for start in range(0, len(parts), 256):
            yield from ((name, m) for name, m in pool.map(read, parts[start:start + 256]) if m is not None)
# <<< twin: done-markers


# >>> twin: named (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
# An image skipped, refused, failed or decoded with a warning (from PIL or libtiff) is named (sample id, key,
# reason or notes) in its part's marker or file, which holds at most --part_size names. A summary keeps
# their count per reason and the first FIRST_NAMED per reason (in part order) and says where the rest are,
# as laion_cloudwriter.py does its left-outs: the summary, and rank 0's memory as it reads the markers one
# at a time, stay the same size whatever their number (~20M images at 1% of LAION-2B).
FIRST_NAMED = 20


def named() -> dict:
    """No image named yet: {'by_reason': {reason: count}, 'first': {reason: [entry, ...]}}; a summary adds
    'in', where each one is named."""
    return {'by_reason': {}, 'first': {}}


def add_named(names: dict, entries: list[dict]) -> dict:
    """`names` with `entries` ({'id', 'key', and 'reason' or 'notes'}) added, each under its reason: the words
    before the first ': ' of its reason or first note (an error's type, 'HTTP 400 from <endpoint>', a
    warning's category)."""
    for entry in entries:
        reason = (entry.get('reason') or entry['notes'][0]).split(': ')[0][:100]
        names['by_reason'][reason] = names['by_reason'].get(reason, 0) + 1
        if len(first := names['first'].setdefault(reason, [])) < FIRST_NAMED:
            first.append(entry)
    return names


def named_lines(names: dict) -> list[str]:
    """The screen's account of named images: per reason, its count and its first three (the first with
    what was said of it)."""
    lines = []
    for reason, n in names['by_reason'].items():
        first = names['first'][reason]
        said = ' '.join((first[0].get('reason') or '; '.join(first[0]['notes'])).split())
        lines.append(f'{n} x {reason}: ' + ', '.join(f'sample {e["id"]} key={e["key"]!r}' for e in first[:3])
                     + ', ...' * (n > 3) + f' (first: {said[:120]})' * (said != reason))
    return lines + [f'(each named in {names["in"]})'] * bool(lines)
# <<< twin: named


# ----------------------------------------------------------------------------------------------
# The plan (rank 0): the buckets, the heads, the filter, the settings; every check before a model loads
# ----------------------------------------------------------------------------------------------

# Score columns are rows of one table (Plan.scores): each turns a batch's normalised image embeddings
# and its captions' normalised text features ({caption key: array}) into one float32 per image.

@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """How a head's own code puts its Linear layers together. A state_dict holds the Linear layers only:
    what sits between them (activations, Dropouts) shows as gaps in the N of their `layers.N` keys, and
    a gap does not say whether it is an activation or a Dropout. So a head is read only by a layout whose
    code we know, matched by its gaps; any other is refused."""

    name: str
    between: int  # the gap between two Linear layers (modules without weights) ...
    before_last: int  # ... and between the last two
    min_layers: int  # Linear layers
    relu: bool  # a ReLU after every Linear layer but the last (Dropouts do nothing at inference)

    def fits(self, gaps: tuple[int, ...]) -> bool:
        return (len(gaps) + 1 >= self.min_layers and all(g == self.between for g in gaps[:-1])
                and gaps[-1:] in ((), (self.before_last,)))


HEAD_LAYOUTS = (
    HeadLayout('Linear layers one after another', 0, 0, 1, relu=False),
    # christophschuhmann/improved-aesthetic-predictor, train_predictor.py's MLP (its ReLUs commented out):
    # Linear, Dropout, ..., Linear, Dropout, Linear, Linear; sac+logos+ava1-l14-linearMSE.pth (0, 2, 4, 6, 7)
    HeadLayout("LAION's aesthetic predictor, linear (Dropouts between its Linear layers)", 1, 0, 3,
               relu=False),
    # the same MLP trained with its ReLUs: Linear, ReLU, Dropout, ..., Linear, ReLU, Linear;
    # ava+logos-l14-reluMSE.pth (0, 3, 6, 9, 11)
    HeadLayout("LAION's aesthetic predictor with ReLUs (ReLU, Dropout between its Linear layers)", 2, 1, 3,
               relu=True),
)


@dataclasses.dataclass(frozen=True)
class Head:
    """Column `name`: Linear layers (in the order of their keys), put together as `layout` says, applied
    to the normalised embedding."""

    name: str
    path: str
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (weight [out, in], bias [out])
    layout: HeadLayout

    def __call__(self, emb: np.ndarray, texts: dict[str, np.ndarray]) -> np.ndarray:
        x = emb.astype(np.float32)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if self.layout.relu and i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x[:, 0]

    def record(self) -> dict:
        return {'column': self.name, 'head': self.path, 'layout': self.layout.name,
                'layers': [list(w.shape) for w, _ in self.layers]}


@dataclasses.dataclass(frozen=True)
class Similarity:
    """Column clip_<key> (the CLIP score): the cosine of the image's and caption column key's features."""

    key: str

    @property
    def name(self) -> str:
        return SIM_COLUMN.format(key=self.key)

    def __call__(self, emb: np.ndarray, texts: dict[str, np.ndarray]) -> np.ndarray:
        return (emb * texts[self.key]).sum(-1)

    def record(self) -> dict:
        return {'column': self.name, 'cosine of the image and the text of': self.key}


def load_head(name: str, path: str, dim: int) -> Head:
    """Column `name` from a torch state_dict (or a checkpoint dict holding one) of Linear layers, keyed
    `weight`/`bias` or `[prefix]N.weight`/`[prefix]N.bias`, whose gaps in N match a row of HEAD_LAYOUTS;
    the shapes must chain from the embedding size `dim` to one score."""
    flag = f'--heads {name}={path}'
    state = read_state_dict(path, flag)
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in state.items():
        m = re.fullmatch(r'(?:(.*?)(\d+)\.)?(weight|bias)', key)
        if not m:
            raise UserError(f'{flag}: {key!r} is not the weight or bias of a Linear layer; a head is Linear '
                            'layers (layers.N.weight, layers.N.bias), as LAION\'s aesthetic predictor')
        found.setdefault(m[1] or '', {}).setdefault(int(m[2] or 0), {})[m[3]] = value.float().numpy()
    if len(found) != 1:
        raise UserError(f'{flag}: its layers sit under {len(found)} prefixes ({", ".join(found)}); a head is '
                        'one chain of Linear layers')
    numbered = sorted(found.popitem()[1].items())
    if any(set(wb) != {'weight', 'bias'} for _, wb in numbered):
        raise UserError(f'{flag}: every Linear layer needs a weight and a bias')
    layers = tuple((wb['weight'], wb['bias']) for _, wb in numbered)
    shapes = [w.shape for w, _ in layers]
    if any(len(s) != 2 for s in shapes) or shapes[0][1] != dim or shapes[-1][0] != 1 \
            or any(a[0] != b[1] for a, b in zip(shapes, shapes[1:])):
        raise UserError(f'{flag}: layer shapes {shapes} do not chain from the embedding size {dim} to one '
                        'score')
    ns = [n for n, _ in numbered]
    gaps = tuple(b - a - 1 for a, b in zip(ns, ns[1:]))
    layout = next((row for row in HEAD_LAYOUTS if row.fits(gaps)), None)
    if layout is None:
        raise UserError(f'{flag}: between its Linear layers ({", ".join(map(str, ns))}) sit modules that '
                        'hold no weights, which a state_dict does not name; this script reads Linear layers '
                        "one after another and LAION's two aesthetic-predictor layouts (0, 2, 4, 6, 7 and 0, "
                        '3, 6, 9, 11); score other heads from the embeddings it keeps in _curate/embed')
    return Head(name, path, layers, layout)


def read_state_dict(path: str, flag: str) -> dict:
    """The tensors torch.save wrote to `path`: a state_dict, or the one state_dict a checkpoint dict holds
    ({'model': ..., 'epoch': 3}). Loaded with weights_only: a pickled module (code) is refused."""
    import pickle
    import zipfile

    import torch

    if not os.path.isfile(path):
        raise UserError(f'{flag}: no such file')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        pickled = isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path)
        what = ('holds pickled Python objects (a whole nn.Module?), which this script does not unpickle'
                if pickled else 'is not a file torch.save wrote')
        raise UserError(f'{flag}: {what}: save the head with torch.save(module.state_dict(), path)') from None

    def tensors(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(torch.is_tensor(v) for v in d.values())

    inner = [v for v in obj.values() if tensors(v)] if isinstance(obj, dict) else []
    if tensors(obj) or len(inner) == 1:
        return obj if tensors(obj) else inner[0]
    what = f'a dict of {", ".join(map(str, obj))}' if isinstance(obj, dict) else f'a {type(obj).__name__}'
    raise UserError(f'{flag}: holds {what}, not one state_dict of tensors: save the head with '
                    'torch.save(module.state_dict(), path)')


def embedding_dim(model_name: str) -> int:
    """The size of the image embedding, from the model's config (read before the model loads)."""
    from transformers import AutoConfig

    config = os.path.join(model_name, 'config.json')
    if os.path.isdir(model_name) and not os.path.isfile(config):
        what = ('a diffusers pipeline (model_index.json)' if os.path.isfile(os.path.join(model_name,
                'model_index.json')) else 'no config.json')
        raise UserError(f'--model_name {model_name} holds {what}, not an image-text model: pass a folder or '
                        'hub name of one such as CLIPModel or SiglipModel (openai/clip-vit-large-patch14)')
    typed = True
    with contextlib.suppress(Exception), open(config) as f:
        typed = 'model_type' in json.load(f)
    if not typed:
        raise UserError(f'--model_name {model_name}: its config.json names no model_type (a diffusers '
                        'component?): pass an image-text model such as CLIPModel or SiglipModel')
    try:
        cfg = AutoConfig.from_pretrained(model_name)
    except Exception as err:
        raise UserError(f'cannot read the config of {model_name} ({first_line(err)}); check '
                        '--model_name') from None
    if not (hasattr(cfg, 'vision_config') and hasattr(cfg, 'text_config')):
        raise UserError(f'--model_name {model_name} is a {cfg.model_type} model, not an image-text model '
                        'with an image and a text tower: pass one such as CLIPModel or SiglipModel')
    return getattr(cfg, 'projection_dim', None) or cfg.vision_config.hidden_size


def read_bucket(name: str, pl: Places, args: argparse.Namespace, offset: int) -> Bucket:
    """One input dataset, checked as far as its index.json can tell: MDS shards with one set of columns,
    an image column, text in every --caption_keys column, and (read in place) every shard file there."""
    url = join(pl.src, INDEX)
    os.makedirs(pl.cache, exist_ok=True)
    shards = read_index(url, os.path.join(pl.cache, INDEX), args.download_timeout, pl.src)
    columns = dict(zip(shards[0]['column_names'], shards[0]['column_encodings'])) if shards else {}
    if any(s['format'] != 'mds' or dict(zip(s['column_names'], s['column_encodings'])) != columns
           for s in shards):
        raise UserError(f'{url}: the shards must all be MDS with the same columns')
    texts = ', '.join(c for c, e in columns.items() if e == 'str')
    if shards and columns.get(IMAGE_COLUMN) not in IMAGE_ENCODINGS:
        raise UserError(f'{url}: {image_column_problem(columns)}')
    for key in args.caption_keys if shards else ():
        if key not in columns:
            raise UserError(f'{url}: the input has no `{key}` column (text columns: {texts})')
        if columns[key] != 'str':
            raise UserError(f'--caption_keys {key}: the column holds {columns[key]}, not text (str); the '
                            f'text columns of {url} are {texts}')
    local = pl.cache == pl.src and not is_remote(pl.src)
    damaged = [s['raw_data']['basename'] for s in shards if local and not intact(pl.src, s)]
    if damaged:
        raise UserError(f'{url} lists {len(damaged)} shard files that are missing or not of the size it says '
                        f'({", ".join(damaged[:3])}{", ..." if len(damaged) > 3 else ""}): restore them or '
                        'write the dataset again')
    return Bucket(name, pl, shards, columns, plan_parts(shards, args.part_size), offset)


def intact(folder: str, shard: dict) -> bool:
    """Whether `folder` holds the shard's raw or compressed file, of the size its index entry says."""
    for data in filter(None, (shard['raw_data'], shard.get('zip_data'))):
        path = os.path.join(folder, data['basename'])
        if os.path.isfile(path) and os.path.getsize(path) == data.get('bytes', os.path.getsize(path)):
            return True
    return False


def read_index(url: str, local: str, timeout: float, folder: str) -> list[dict]:
    """The shards an MDS index.json lists (fetched from `url` to `local`)."""
    try:
        if url != local:
            fetch(url, local, timeout)
        with open(local) as f:
            text = f.read()
    except Exception as err:
        raise UserError(f'cannot read the input dataset index {url}: {first_line(err)}'
                        f'{subfolder_hint(folder)}') from None
    try:
        shards = json.loads(text)['shards']
        assert all(isinstance(s['format'], str) and s['samples'] >= 0 and s['raw_data']['basename']
                   and len(s['column_names']) == len(s['column_encodings']) for s in shards)
    except Exception:
        raise UserError(f'{url} is not an MDS index.json (a list of "shards"): point --remote_download or '
                        '--local at datasets such as laion_cloudwriter.py writes') from None
    return shards


def subfolder_hint(folder: str) -> str:
    """'; <folder>/<sub>/index.json exists: pass --subfolder <sub>' when a folder one level down holds an
    index (a --subfolder forgotten), else ''. It lists below `folder`: only on the way to an error."""
    with contextlib.suppress(Exception):
        if is_remote(folder):
            names = output_names(folder)
        else:
            found = glob.glob(os.path.join(glob.escape(folder), '*', INDEX))
            names = [os.path.relpath(p, folder) for p in found]
        subs = sorted(n.split('/')[0] for n in names if n.count('/') == 1 and n.endswith('/' + INDEX))
        if subs:
            return f'; {join(folder, subs[0], INDEX)} exists: pass --subfolder {subs[0]}'
    return ''


def image_column_problem(columns: dict[str, str]) -> str:
    """Why the input's `jpg` column is not one this script reads, and what to do."""
    if IMAGE_COLUMN in columns:
        return (f'its `{IMAGE_COLUMN}` column is stored as {columns[IMAGE_COLUMN]}; this script reads image '
                f'files there: {", ".join(IMAGE_ENCODINGS)} (streaming\'s encodings)')
    images = [f'`{c}` ({e})' for c, e in columns.items()
              if e in ('jpeg', 'png', 'pil') or c in ('png', 'webp', 'image', 'img', 'jpeg')]
    return (f'the input has no `{IMAGE_COLUMN}` column, where this script reads the images as '
            'laion_cloudwriter.py writes them' + (f'; its images seem to be in {", ".join(images)}: store '
                                                  f'them as `{IMAGE_COLUMN}`' if images else
                                                  f' (columns: {", ".join(columns)})'))


def new_columns(args: argparse.Namespace) -> dict[str, str]:
    """{column: encoding} of the columns this run adds; a column two flags would make is refused."""
    made = [*((name, f'--heads {name}={path}', 'float32') for name, path in args.heads),
            *((SIM_COLUMN.format(key=k), f'--caption_keys {k}', 'float32') for k in args.caption_keys),
            (DUP_GROUP, 'the dedup', 'int64'), (DUP_KEEP, 'the dedup', 'int32')]
    columns, maker = {}, {}
    for column, flag, encoding in made:
        if column in maker:
            raise UserError(f'the column {column} would be written twice, by {maker[column]} and by {flag}: '
                            'give each head a column name of its own and name each caption column once')
        columns[column], maker[column] = encoding, flag
    return columns


POLARS_TYPES = {'str': 'String', 'int8': 'Int8', 'int16': 'Int16', 'int32': 'Int32', 'int64': 'Int64',
                'uint8': 'UInt8', 'uint16': 'UInt16', 'uint32': 'UInt32', 'uint64': 'UInt64',
                'float16': 'Float32', 'float32': 'Float32', 'float64': 'Float64', 'int': 'Int64'}


def filter_schema(columns: dict[str, str]) -> dict[str, Any]:
    """The columns --filter can name: the scalar ones (not bytes, images or arrays)."""
    import polars as pl
    return {k: getattr(pl, POLARS_TYPES[v]) for k, v in columns.items() if v in POLARS_TYPES}


# >>> twin: sql-clauses (verbatim in curate_images.py, filter_metadata.py; test_twins.py)
def split_and(expr) -> list:
    """The top-level AND operands of a Polars expression, in the order written."""
    root = json.loads(expr.meta.serialize(format='json'))
    if isinstance(root, dict) and root.get('BinaryExpr', {}).get('op') == 'And':
        right, left = expr.meta.pop()  # pop() lists a binary node's inputs right first
        return split_and(left) + split_and(right)
    return [expr]


def clause_labels(text: str, clauses: list) -> list[str]:
    """The user's own text of each clause where a split at top-level ANDs (outside brackets and quotes)
    parses to exactly Polars' clauses; Polars' rendering of them otherwise."""
    import polars as pl
    pieces, depth, quote, start = [], 0, '', 0
    for m in re.finditer(r"[()'\"]|\bAND\b", text, re.I):
        tok = m.group()
        if quote:
            quote = '' if tok == quote else quote
        elif tok in '\'"':
            quote = tok
        elif tok in '()':
            depth += 1 if tok == '(' else -1
        elif depth == 0:
            pieces.append(text[start:m.start()].strip())
            start = m.end()
    pieces.append(text[start:].strip())
    try:
        if len(pieces) == len(clauses) and all(pl.sql_expr(p).meta.eq(c) for p, c in zip(pieces, clauses)):
            return pieces
    except Exception:
        pass
    return [str(c) for c in clauses]
# <<< twin: sql-clauses


def compile_filter(text: str, schema: dict[str, Any]) -> tuple[list, list[str]]:
    """(clauses, labels) of --filter, checked on an empty frame of the output's columns."""
    import polars as pl
    if not text:
        return [], []
    try:
        expr = pl.sql_expr(text)
        pl.DataFrame(schema=schema).filter(expr)
    except Exception as err:
        raise UserError(f'--filter {text!r} does not evaluate on the columns {", ".join(schema)}: '
                        f'{first_line(err)}') from None
    clauses = split_and(expr)
    return clauses, clause_labels(text, clauses)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What rank 0 found and every rank needs."""

    buckets: list[Bucket]
    work: str  # <remote_upload>/_curate
    staging: str
    scores: list[Head | Similarity]  # the score columns, in column order
    columns: dict[str, str]  # every output column
    clusters: int
    settings: dict

    def units(self) -> list[tuple[Bucket, Part]]:
        return [(b, p) for b in self.buckets for p in b.parts]

    @property
    def rows(self) -> int:
        return sum(p.last - p.first for _, p in self.units())


def make_plan(args: argparse.Namespace) -> Plan:
    """Rank 0: check the flags, the buckets, the heads, the filter and the output; list the work."""
    added = new_columns(args)
    check_outputs(args)
    pls = bucket_places(args)
    for pl in pls.values():
        check_places(pl)
    buckets, offset = [], 0
    for name, pl in pls.items():
        buckets.append(read_bucket(name, pl, args, offset))
        offset += buckets[-1].parts[-1].last if buckets[-1].parts else 0
    columns = {**buckets[0].columns, **added}
    for b in buckets:
        clash = sorted(set(b.columns) & set(added))
        if clash:
            raise UserError(f'{b.places.src} already has a column {clash[0]}: rename the head or pass other '
                            '--caption_keys')
        if b.shards and {**b.columns, **added} != columns:
            raise UserError(f'{b.places.src}: its columns differ from {buckets[0].places.src}\'s')
    compile_filter(args.filter, filter_schema(columns))
    dim = embedding_dim(args.model_name)
    heads = [load_head(name, path, dim) for name, path in args.heads]
    work = join(args.remote_upload, WORK, args.subfolder)
    clusters = args.clusters or auto_clusters(offset)
    settings = {'model_name': args.model_name, 'heads': {h.name: file_sha1(h.path) for h in heads},
                'caption_keys': args.caption_keys, 'dup_threshold': args.dup_threshold, 'clusters': clusters,
                'dedup_parts': args.dedup_parts, 'part_size': args.part_size,
                'buckets': {b.name: {'shards': len(b.shards), 'samples': sum(s['samples'] for s in b.shards),
                                     'sha1': index_digest(b.shards)}
                            for b in buckets}}
    staging = join(args.local, STAGING, digest(work))
    old = json.loads(open_text(join(work, SETTINGS), args.download_timeout)) \
        if exists(join(work, SETTINGS), args.download_timeout) else None
    if old is None and any(output_names(b.places.out) for b in buckets):
        raise UserError(f'--remote_upload {buckets[0].places.out} holds files this script did not write: '
                        'pass a new or empty --remote_upload')
    if old is not None and old != settings:
        raise UserError(f'{work} holds the work of a run with other settings: '
                        f'{"; ".join(changes(old, settings))}. Rerun with the flags and input it was made '
                        'with, or write to a new --remote_upload')
    os.makedirs(staging, exist_ok=True)
    put_text(work, staging, SETTINGS, json.dumps(settings, indent=1))
    scores = [*heads, *(Similarity(k) for k in args.caption_keys)]
    return Plan(buckets, work, staging, scores, columns, clusters, settings)


def changes(old: dict, new: dict) -> list[str]:
    """What differs between the settings the work was made with and this run's, in the user's words."""
    def bucket(b: dict | None) -> str:
        n, rows = (b['shards'], b['samples']) if b else (0, 0)
        return f'{n} shard{"s" * (n != 1)} of {rows} sample{"s" * (rows != 1)}' if b else 'not in the run'

    said = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == 'heads' and isinstance(a, dict):
            said += [f'--heads {n}: ' + ('not in this run' if n not in b else 'not in that run' if n not in a
                                         else 'another file (its sha1 differs)')
                     for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
        elif key == 'buckets' and all(isinstance(v, dict) for v in [*a.values(), *b.values()]):
            said += [f'input {n or "dataset"}: {bucket(a.get(n))} then, {bucket(b.get(n))} now'
                     + (' (other shards)' if n in a and n in b and bucket(a[n]) == bucket(b[n]) else '')
                     for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
        else:
            said.append(f'--{key} {json.dumps(a)} then, {json.dumps(b)} now')
    return said


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, a folder that is a file and a file that is a folder: the run would
    otherwise fail after hours, or after writing its output."""
    folders = {'--remote_upload': args.remote_upload, '--local': args.local}
    files = {'--summary': summary_path(args), '--preview_path': preview_path(args) if args.preview else ''}
    for flag, path in [*folders.items(), *files.items()]:
        if not path or is_remote(path):
            continue
        if flag in files and os.path.isdir(path):
            raise UserError(f'{flag} {path} is a folder: pass a file name')
        up = path if flag in folders else os.path.dirname(os.path.abspath(path))
        while up and not os.path.exists(up):
            up = os.path.dirname(up)
        if up and not os.path.isdir(up):
            raise UserError(f'{flag} {path}: {up} is a file, not a folder')


def auto_clusters(rows: int) -> int:
    return max(1, round(2 * math.sqrt(rows)))


def file_sha1(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha1(f.read()).hexdigest()


# >>> twin: index-digest (verbatim in caption_images.py, curate_images.py, precompute_latents.py;
# test_twins.py)
def index_digest(shards: list[dict]) -> str:
    """The sha1 of an input's shard records as `json.dumps(shards, sort_keys=True)` writes them (its
    identity in the markers), taken record by record: never the whole index as one string, 0.6 GB at
    LAION-2B's biggest bucket."""
    digest = hashlib.sha1(b'[')
    for i, shard in enumerate(shards):
        digest.update((', ' * bool(i) + json.dumps(shard, sort_keys=True)).encode())
    digest.update(b']')
    return digest.hexdigest()
# <<< twin: index-digest


def open_text(url: str, timeout: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        fetch(url, os.path.join(tmp, 'f'), timeout)
        with open(os.path.join(tmp, 'f')) as f:
            return f.read()


# ----------------------------------------------------------------------------------------------
# Reading: a part's samples; images decoded in DataLoader workers
# ----------------------------------------------------------------------------------------------

# >>> twin: shard-reader (verbatim in caption_images.py, curate_images.py; test_twins.py)
class ShardReader:
    """Input shards on local disk: downloaded (and decompressed) on first use, removed after their shard
    is read. A rank's parts, hence its shards, are its own: it downloads into `<cache>/rank<r>`, emptied
    first (a shard an earlier run left there cannot be checked against the input). `plan.shards` holds the
    index records of at least those shards, by number (a list, or a dict of a rank's own)."""

    def __init__(self, plan: Plan, args: argparse.Namespace, rank: int):
        from streaming import Stream

        remote = plan.places.src if plan.places.src != plan.places.cache else None
        self.local, self.shards = plan.places.cache, plan.shards
        if remote:
            self.local = os.path.join(self.local, f'rank{rank}')
            shutil.rmtree(self.local, ignore_errors=True)
            os.makedirs(self.local)
        self.stream = Stream(remote=remote, local=self.local, download_retry=args.download_retry,
                             download_timeout=args.download_timeout, keep_zip=False)
        self.evict = remote is not None

    def samples(self, part: Part) -> Iterator[tuple[int, dict]]:
        """(global sample id, sample) of every sample of the part, in order."""
        from streaming.base.format import reader_from_json

        sample_id = part.first
        for shard in part.shards:
            reader = reader_from_json(self.local, None, as_stored(self.shards[shard]))
            self.stream.prepare_shard(reader)
            for i in range(reader.samples):
                yield sample_id + i, reader.get_item(i)
            sample_id += reader.samples
            if self.evict:
                reader.evict()
# <<< twin: shard-reader


# >>> twin: stored-files (verbatim in caption_images.py, curate_images.py, precompute_latents.py;
# test_twins.py)
# streaming's encodings whose stored bytes are a whole image file: read as those bytes and written back the
# same, never decoded to write them again (its writer saves a PIL image as a new JPEG at quality 75)
FILE_ENCODINGS = ('jpeg', 'png')


def as_stored(shard: dict) -> dict:
    """An input shard's record (of index.json), its FILE_ENCODINGS columns read as the bytes stored."""
    return {**shard, 'column_encodings': ['bytes' if e in FILE_ENCODINGS else e
                                          for e in shard['column_encodings']]}


def mds_writer(columns: dict[str, str], **kwargs):
    """streaming's MDSWriter that writes the FILE_ENCODINGS columns as the bytes `as_stored` read (the same
    image file), recorded under their own encoding, so a reader decodes them as before."""
    from streaming import MDSWriter

    class StoredBytesWriter(MDSWriter):
        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), 'column_encodings': [columns[c] for c in self.column_names]}

    return StoredBytesWriter(columns={c: 'bytes' if e in FILE_ENCODINGS else e for c, e in columns.items()},
                             **kwargs)
# <<< twin: stored-files


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


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: a 9 x 8 grey thumbnail, one bit per left < right neighbour. A copy
    re-encoded or resized keeps it; an exact match of it is an edge of the dedup."""
    px = np.asarray(img.convert('L').resize((HASH_BITS + 1, HASH_BITS), Image.Resampling.BILINEAR), np.int16)
    bits = (px[:, 1:] > px[:, :-1]).ravel()
    return int(np.packbits(bits).view('>u8')[0] >> 1)  # 63 bits: fits int64


def detailed(dhash: np.ndarray) -> np.ndarray:
    """Which of the dHashes (int64, as dhash() makes them) have DHASH_ROWS different rows and DHASH_BITS
    bits of each value: those may join images on their own."""
    rows = (dhash.astype(np.uint64) << np.uint64(1)).astype('>u8').view(np.uint8).reshape(-1, 8) & 0xFE
    different = 1 + np.count_nonzero(np.diff(np.sort(rows, axis=1), axis=1), axis=1)
    ones = np.unpackbits(rows, axis=1).sum(axis=1)
    return (different >= DHASH_ROWS) & (np.minimum(ones, 63 - ones) >= DHASH_BITS)


class PartImages:
    """A part's images for a DataLoader: a worker decodes, hashes and preprocesses one sample."""

    def __init__(self, items: list[tuple[int, str, bytes]], processor: Any):
        self.items, self.processor = items, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample_id, key, data = self.items[i]
        sha = int.from_bytes(hashlib.sha1(data).digest()[:8], 'big') >> 1  # 63 bits: fits int64
        row, notes = {'id': sample_id, 'key': key, 'sha': sha}, []
        try:
            img = decode(data, notes)
        except Exception as err:  # PIL raises many types for bad bytes: every one is a skip
            reason = ('not an image format PIL can read' if isinstance(err, UnidentifiedImageError)
                      else f'{type(err).__name__}: {first_line(err)}')
            return {**row, 'reason': '; '.join([reason, *notes])}
        pixels = self.processor(images=img, return_tensors='pt')['pixel_values'][0]
        return {**row, 'pixels': pixels, 'area': img.width * img.height, 'dhash': dhash(img), 'notes': notes}


def collate(batch: list[dict]) -> tuple[Any, list[dict]]:
    """In the worker: the decoded images' pixels stacked into one tensor (one shared-memory handoff
    per batch, not per image), and every sample's row (a skipped one with its reason)."""
    import torch
    pixels = [r.pop('pixels') for r in batch if 'pixels' in r]
    return (torch.stack(pixels) if pixels else None), batch


# ----------------------------------------------------------------------------------------------
# Pass 1, embedding: per part, the normalised embeddings, the scores and the hashes (rows.npz + _done)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Model:
    model: Any
    processor: Any
    tokenizer: Any
    device: Any
    dtype: Any


def load_model(args: argparse.Namespace, device) -> Model:
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    try:
        model = AutoModel.from_pretrained(args.model_name, dtype=dtype).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(args.model_name)
        tokenizer = AutoTokenizer.from_pretrained(args.model_name) if args.caption_keys else None
    except Exception as err:
        raise UserError(f'cannot load {args.model_name} with AutoModel, AutoImageProcessor and AutoTokenizer '
                        f'({first_line(err)}); check --model_name') from None
    if not (hasattr(model, 'get_image_features') and hasattr(model, 'get_text_features')):
        raise UserError(f'{args.model_name} ({type(model).__name__}) has no get_image_features / '
                        'get_text_features: pass an image-text model such as CLIPModel or SiglipModel')
    return Model(model, processor, tokenizer, device, dtype)


def text_max_length(model: Any) -> int:
    """Captions are padded to and cut at the text tower's positions (SigLIP was trained padded so)."""
    return model.config.text_config.max_position_embeddings


def embed_batch(m: Model, pixels, texts: dict[str, list[str]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(normalised image embeddings, {caption key: normalised text features}) of one batch, float32."""
    import torch

    with torch.inference_mode():
        img = m.model.get_image_features(pixel_values=pixels.to(m.device, m.dtype)).float()
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = {}
        for key, captions in texts.items():
            tok = m.tokenizer(captions, padding='max_length', truncation=True,
                              max_length=text_max_length(m.model), return_tensors='pt').to(m.device)
            features = m.model.get_text_features(**tok).float()
            txt[key] = torch.nn.functional.normalize(features, dim=-1).cpu().numpy()
    return img.cpu().numpy(), txt


def part_items(reader: ShardReader, part: Part, caption_keys: list[str]) -> tuple[list, dict[int, dict]]:
    items, texts = [], {}
    for sample_id, sample in reader.samples(part):
        items.append((sample_id, str(sample.get(KEY_COLUMN, sample_id)), sample[IMAGE_COLUMN]))
        texts[sample_id] = {k: str(sample[k] or '') for k in caption_keys}
    return items, texts


def narrow(keys: np.ndarray) -> np.ndarray:
    """`keys` at one byte a character where all are ASCII, a quarter of numpy's str, in the same order
    (the keep rule compares them); as they are otherwise."""
    try:
        return keys.astype(f'S{max(keys.dtype.itemsize // 4, 1)}') if keys.dtype.kind == 'U' else keys
    except UnicodeEncodeError:
        return keys


def embed_part(m: Model, plan: Plan, args: argparse.Namespace, bucket: Bucket, part: Part,
               reader: ShardReader, bar) -> dict[str, Any]:
    """Pass 1 for one part: rows.npz (ids, keys, hashes, areas, float16 embeddings, scores) and _done."""
    import torch

    items, texts = part_items(reader, part, args.caption_keys)
    loader = torch.utils.data.DataLoader(PartImages(items, m.processor), batch_size=args.batch_size,
                                         num_workers=args.num_workers, collate_fn=collate)
    scores: dict[str, list] = {s.name: [] for s in plan.scores}
    rows, embs, skipped, noted = [], [], [], []
    for pixels, batch in loader:
        good = [r for r in batch if 'reason' not in r]
        skipped += [{'id': r['id'], 'key': r['key'], 'reason': r['reason']} for r in batch if 'reason' in r]
        noted += [{'id': r['id'], 'key': r['key'], 'notes': r['notes']} for r in good if r['notes']]
        if good:
            captions = {k: [texts[r['id']][k] for r in good] for k in args.caption_keys}
            emb, txt = embed_batch(m, pixels, captions)
            rows += good
            embs.append(emb)
            for score in plan.scores:
                scores[score.name].append(score(emb, txt))
        bar.update(len(batch))
    emb = np.concatenate(embs) if embs else np.zeros((0, embedding_dim(args.model_name)), np.float32)
    arrays = {c: np.array([r[c] for r in rows], np.int64) for c in ('id', 'sha', 'dhash', 'area')}
    arrays.update(key=narrow(np.array([r['key'] for r in rows], str)), emb=emb.astype(np.float16))
    arrays.update({f'score:{c}': np.concatenate(v or [np.zeros(0)]).astype(np.float32)
                   for c, v in scores.items()})
    folder = unit_folder('embed', bucket, part)
    put_arrays(plan.work, plan.staging, join(folder, 'rows.npz'), **arrays)
    put_arrays(plan.work, plan.staging, join(folder, 'sample.npz'),  # what the k-means trains on
               emb=arrays['emb'][sampled(arrays['id'] + bucket.offset, sample_rate(plan))])
    marker = {'rank': int(os.environ.get('RANK', 0)), 'embedded': len(rows), 'skipped': skipped,
              'noted': noted}
    put_text(plan.work, plan.staging, join(folder, DONE_MARKER), json.dumps(marker))
    return marker


def unit_folder(stage: str, bucket: Bucket, part: Part) -> str:
    return join(stage, bucket.name or '_', part.name)


def pending(plan: Plan, stage: str) -> list[tuple[Bucket, Part]]:
    """The (bucket, part) units of a pass without a _done marker."""
    names = set(output_names(join(plan.work, stage)))  # this pass's folder only: the work holds millions
    return [(b, p) for b, p in plan.units() if f'{b.name or "_"}/{p.name}/{DONE_MARKER}' not in names]


def embed_pass(args: argparse.Namespace, plan: Plan, device, rank: int, world: int) -> dict[str, float]:
    from tqdm import tqdm

    mine = agreed(lambda: pending(plan, 'embed'), rank)[rank::world]
    if not mine:
        return {'images': 0, 'seconds': 0.0, 'images_per_s': 0.0}
    m = load_model(args, device)
    bar = tqdm(total=sum(p.last - p.first for _, p in mine), unit='img', disable=rank != 0,
               dynamic_ncols=True, desc=f'rank 0/{world} embeds' if world > 1 else 'embeds')
    start, readers = time.time(), {}
    try:
        for bucket, part in mine:
            if bucket.name not in readers:
                readers[bucket.name] = ShardReader(bucket, args, rank)
            reader = readers[bucket.name]
            embed_part(m, plan, args, bucket, part, reader, bar)
    except (UserError, Interrupted):
        raise
    except Exception as err:  # a network or disk error passes, a damaged input does not: say which part
        raise UserError(f'reading or embedding part {part.name} of {bucket.name or "the dataset"} failed: '
                        f'{first_line(err)}; finished parts are kept, and once the cause is gone a rerun of '
                        'the same command resumes') from None
    finally:
        bar.close()
    seconds, images = time.time() - start, sum(p.last - p.first for _, p in mine)
    return {'images': images, 'seconds': round(seconds, 3),
            'images_per_s': round(images / max(seconds, 1e-9), 2)}


def embed_url(plan: Plan, bucket: Bucket, part: Part) -> str:
    return join(plan.work, unit_folder('embed', bucket, part), 'rows.npz')


# ----------------------------------------------------------------------------------------------
# Pass 2, dedup: k-means on a sample (rank 0) -> each part's vectors to the groups of their 2 nearest
# centroids (shuffle) -> each group compared within its clusters (pairs) -> connected components (rank 0)
# ----------------------------------------------------------------------------------------------

def train_centroids(plan: Plan, args: argparse.Namespace) -> None:
    """Rank 0: spherical k-means (faiss, seeded) on every part's rows whose run id hashes under the
    sample rate; centroids.npz, written once (a rerun reuses it)."""
    import faiss

    if output_names(join(plan.work, os.path.dirname(CENTROIDS))):
        return
    sample = [get_arrays(join(plan.work, unit_folder('embed', b, p), 'sample.npz'),
                         args.download_timeout)['emb'] for b, p in plan.units()]
    x = np.concatenate(sample).astype(np.float32) if sample else np.zeros((0, 1), np.float32)
    k = max(1, min(plan.clusters, len(x)))
    if len(x) and k > 1:
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=1234, spherical=True, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(x))
        centroids = km.centroids
    else:  # one cluster: every vector is compared with every other
        centroids = np.ones((1, x.shape[1] if len(x) else 1), np.float32)
    put_arrays(plan.work, plan.staging, CENTROIDS, centroids=centroids)


def sample_rate(plan: Plan) -> float:
    """The share of rows the k-means trains on: about SAMPLE_PER_CLUSTER per cluster."""
    return min(1.0, plan.clusters * SAMPLE_PER_CLUSTER / max(plan.rows, 1))


def sampled(gid: np.ndarray, rate: float) -> np.ndarray:
    """A deterministic sample of run ids at `rate`: a multiplicative hash under the rate."""
    h = (gid.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
    return h.astype(np.float64) / 2.0**53 < rate


def shuffle_part(plan: Plan, args: argparse.Namespace, bucket: Bucket, part: Part,
                 centroids: np.ndarray) -> None:
    """Each vector of the part to the dedup part of each of its 2 nearest clusters; each hash to the
    dedup part its value picks (exact and perceptual copies meet there whatever their embeddings)."""
    import faiss

    z = get_arrays(embed_url(plan, bucket, part), args.download_timeout)
    gid, emb = z['id'] + bucket.offset, z['emb']
    k = min(2, len(centroids))
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    near = index.search(emb.astype(np.float32), k)[1] if len(emb) else np.zeros((0, k), np.int64)
    folder = unit_folder('dedup/shuffle', bucket, part)
    for g in range(args.dedup_parts):
        rows, cl = np.nonzero(near % args.dedup_parts == g)  # a vector goes to each of its 2 clusters
        views = {'vec': rows, 'sha': np.flatnonzero(z['sha'] % args.dedup_parts == g),
                 'dhash': np.flatnonzero(z['dhash'] % args.dedup_parts == g)}
        put_arrays(plan.work, plan.staging, join(folder, f'{g:05d}.npz'), cluster=near[rows, cl],
                   emb=emb[rows], sha=z['sha'][views['sha']], dhash=z['dhash'][views['dhash']],
                   **{f'{v}_{c}': (gid if c == 'gid' else z[c])[r] for v, r in views.items()
                      for c in ('gid', 'area', 'key')})
    put_text(plan.work, plan.staging, join(folder, DONE_MARKER), '{}')


def compare_group(plan: Plan, args: argparse.Namespace, g: int) -> None:
    """The pairs of one dedup part: within each of its clusters, every pair above --dup_threshold; and
    every pair of equal content hash or equal dHash. Written with each member's area and key."""
    zs = [get_arrays(join(plan.work, unit_folder('dedup/shuffle', b, p), f'{g:05d}.npz'),
                     args.download_timeout) for b, p in plan.units()]
    if not zs:  # an input without samples
        put_arrays(plan.work, plan.staging, f'dedup/pairs/{g:05d}.npz', edges=np.zeros((0, 2), np.int64),
                   gid=np.zeros(0, np.int64), area=np.zeros(0, np.int64), key=np.zeros(0, str))
        return
    cat = {k: np.concatenate([z[k] for z in zs]) for k in zs[0]}
    pairs = [np.zeros((0, 2), np.int64)]
    order = np.argsort(cat['cluster'], kind='stable')
    _, starts = np.unique(cat['cluster'][order], return_index=True)
    # each cluster's rows; none at --dup_threshold 1: no cosine is above 1 (float16 rounding gives 1.0002)
    for idx in np.split(order, starts[1:]) if len(order) and args.dup_threshold < 1 else []:
        x, gid = cat['emb'][idx].astype(np.float32), cat['vec_gid'][idx]
        for lo in range(0, len(idx), BLOCK):
            i, j = np.nonzero(x[lo:lo + BLOCK] @ x.T > args.dup_threshold)
            keep = lo + i < j
            pairs.append(np.stack([gid[lo + i[keep]], gid[j[keep]]], 1))
    for h in ('sha', 'dhash'):
        order = np.lexsort((cat[f'{h}_gid'], cat[h]))
        if h == 'dhash':
            order = order[detailed(cat[h][order])]
        vals, ids = cat[h][order], cat[f'{h}_gid'][order]
        same = vals[1:] == vals[:-1]
        pairs.append(np.stack([ids[:-1][same], ids[1:][same]], 1))  # a chain links each run of equals
    edges = np.unique(np.concatenate(pairs), axis=0)
    views = ('vec', 'sha', 'dhash')
    gid, first = np.unique(np.concatenate([cat[f'{v}_gid'] for v in views]), return_index=True)
    wanted = np.isin(gid, edges)
    put_arrays(plan.work, plan.staging, f'dedup/pairs/{g:05d}.npz', edges=edges, gid=gid[wanted],
               **{c: np.concatenate([cat[f'{v}_{c}'] for v in views])[first][wanted]
                  for c in ('area', 'key')})


def decide_groups(plan: Plan, args: argparse.Namespace) -> None:
    """Rank 0: the groups of all the pairs (connect), written per part of the run: the run ids of the
    part's images in a group, each one's group (the kept member's run id) and keep; then the largest
    groups for the preview; then the _done marker."""
    if exists(join(plan.work, GROUPS, DONE_MARKER), args.download_timeout):
        return
    pieces: dict[str, list[np.ndarray]] = {'edges': [], 'gid': [], 'area': [], 'key': []}
    for g in range(args.dedup_parts):
        z = get_arrays(join(plan.work, f'dedup/pairs/{g:05d}.npz'), args.download_timeout)
        for column, values in pieces.items():
            values.append(narrow(z[column]) if column == 'key' else z[column])
    edges = np.concatenate(pieces.pop('edges'))  # each column's pieces go once it is joined
    gid, first = np.unique(np.concatenate(pieces.pop('gid')), return_index=True)
    area, key = np.concatenate(pieces.pop('area'))[first], np.concatenate(pieces.pop('key'))[first]
    group = connect(edges, gid, area, key)
    keep = (group == gid).astype(np.int32)

    def put(unit: tuple[Bucket, Part]) -> None:
        b, p = unit
        lo, hi = np.searchsorted(gid, [b.offset + p.first, b.offset + p.last])
        put_arrays(plan.work, plan.staging, groups_file(b, p), gid=gid[lo:hi], group=group[lo:hi],
                   keep=keep[lo:hi])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, plan.units()))
    put_arrays(plan.work, plan.staging, join(GROUPS, 'largest.npz'), **largest_groups(gid, group))
    put_text(plan.work, plan.staging, join(GROUPS, DONE_MARKER), '{}')


def connect(edges: np.ndarray, gid: np.ndarray, area: np.ndarray, key: np.ndarray) -> np.ndarray:
    """The group of each image `gid` (sorted run ids; its `area` and `key`): the connected components of
    the pairs `edges` (scipy's csgraph: no Python loop per pair), each named by the member it keeps: the
    largest image (width x height), then the lowest key, then the lowest run id."""
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    n, ends = len(gid), edges.ravel()
    where = np.argsort(ends)  # looked up in order: at random, a large `gid` is a cache miss per step
    at = np.empty(len(ends), np.int64)
    at[where] = np.searchsorted(gid, ends[where])
    del where
    graph = coo_array((np.ones(len(edges), np.int8), (at[0::2], at[1::2])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    del graph
    order = np.lexsort((gid, key, -area, label))  # each component together, the member it keeps first
    ordered = label[order]
    first = np.ones(n, bool)
    first[1:] = ordered[1:] != ordered[:-1]
    kept = np.zeros(label.max(initial=-1) + 1, np.int64)
    kept[ordered[first]] = gid[order[first]]
    return kept[label]


def largest_groups(gid: np.ndarray, group: np.ndarray) -> dict[str, np.ndarray]:
    """The PREVIEW_GROUPS largest groups (ties: the lower kept run id): `group` (the kept run id), `size`,
    `members` (the kept one, then the others by run id, PREVIEW_PER_ROW at most, padded with -1)."""
    kept, size = np.unique(group, return_counts=True)
    top = np.lexsort((kept, -size))[:PREVIEW_GROUPS]
    members = np.full((len(top), PREVIEW_PER_ROW), -1, np.int64)
    chosen = np.isin(group, kept[top])
    gid, group = gid[chosen], group[chosen]  # the members of these groups only
    for row, g in enumerate(kept[top]):
        others = gid[group == g]
        ids = np.concatenate([[g], others[others != g]])[:PREVIEW_PER_ROW]
        members[row, :len(ids)] = ids
    return {'group': kept[top], 'size': size[top], 'members': members}


def groups_file(bucket: Bucket, part: Part) -> str:
    return join(GROUPS, bucket.name or '_', f'{part.name}.npz')


def unpaired(plan: Plan, dedup_parts: int) -> list[int]:
    names = set(output_names(join(plan.work, 'dedup/pairs')))
    return [g for g in range(dedup_parts) if f'{g:05d}.npz' not in names]


def dedup_pass(args: argparse.Namespace, plan: Plan, rank: int, world: int,
               barrier: Callable[[], None]) -> None:
    """Every rank its share of the shuffle and of the compare; rank 0 the centroids and the groups. Each
    step's units are files written atomically or marked done, so a rerun does only what is missing."""
    if rank == 0:
        train_centroids(plan, args)
    barrier()
    centroids = get_arrays(join(plan.work, CENTROIDS), args.download_timeout)['centroids']
    for bucket, part in agreed(lambda: pending(plan, 'dedup/shuffle'), rank)[rank::world]:
        shuffle_part(plan, args, bucket, part, centroids)
    barrier()
    for g in agreed(lambda: unpaired(plan, args.dedup_parts), rank)[rank::world]:
        compare_group(plan, args, g)
    barrier()
    if rank == 0:
        decide_groups(plan, args)
    barrier()


# ----------------------------------------------------------------------------------------------
# Pass 3, writing: every input column plus the new ones, the --filter applied, per part (+ _done)
# ----------------------------------------------------------------------------------------------

def dup_columns(groups: dict[str, np.ndarray], gid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dup_group, dup_keep) of the run ids `gid`: -1 and 1 for an image in no group."""
    group, keep = np.full(len(gid), -1, np.int64), np.ones(len(gid), np.int32)
    if len(groups['gid']):
        at = np.searchsorted(groups['gid'], gid).clip(0, len(groups['gid']) - 1)
        hit = groups['gid'][at] == gid
        group[hit], keep[hit] = groups['group'][at[hit]], groups['keep'][at[hit]]
    return group, keep


def write_part(plan: Plan, args: argparse.Namespace, bucket: Bucket, part: Part, reader: ShardReader,
               clauses: list) -> None:
    import polars as pl

    z = get_arrays(embed_url(plan, bucket, part), args.download_timeout)
    marker = json.loads(open_text(join(plan.work, unit_folder('embed', bucket, part), DONE_MARKER),
                                  args.download_timeout))
    groups = get_arrays(join(plan.work, groups_file(bucket, part)), args.download_timeout)
    group, keep = dup_columns(groups, z['id'] + bucket.offset)
    new = {**{c[6:]: z[c] for c in z if c.startswith('score:')}, DUP_GROUP: group, DUP_KEEP: keep}
    row_of = {int(i): r for r, i in enumerate(z['id'])}
    samples = [(sid, s) for sid, s in reader.samples(part) if sid in row_of]
    schema = filter_schema(plan.columns)
    frame = pl.DataFrame({c: [s[c] for _, s in samples] if c in bucket.columns else new[c] for c in schema},
                         schema=schema)
    alive, removed = np.ones(len(samples), bool), []
    if clauses:
        masks = frame.select([c.fill_null(False).alias(str(k)) for k, c in enumerate(clauses)])
        for k in range(len(clauses)):
            ok = masks.to_series(k).to_numpy()
            removed.append(int(np.count_nonzero(alive & ~ok)))
            alive &= ok
    out = join(bucket.places.out, part.name)
    target = (os.path.join(plan.staging, bucket.name, part.name), out) if is_remote(out) else out
    with mds_writer(plan.columns, out=target, compression=args.compression or None,
                    size_limit=args.size_limit, exist_ok=True) as writer:
        for r, (sid, sample) in enumerate(samples):
            if alive[r]:
                writer.write({**sample, **{c: v[row_of[sid]] for c, v in new.items()}})
    counts = {'input': part.last - part.first, 'written': int(alive.sum()), 'skipped': marker['skipped'],
              'noted': marker.get('noted', []),  # an embedding of an earlier version named none
              'removed_by_clause': removed, 'in_groups': int(np.count_nonzero(new[DUP_GROUP] >= 0)),
              'kept_of_groups': int(np.count_nonzero((new[DUP_GROUP] >= 0) & (new[DUP_KEEP] == 1)))}
    first = f'score:{plan.scores[0].name}' if plan.scores else ''
    counts['extremes'] = score_extremes(z['id'] + bucket.offset, z[first]) if first else {}
    put_text(bucket.places.out, plan.staging, join(part.name, DONE_MARKER),
             json.dumps({'rank': int(os.environ.get('RANK', 0)), 'filter': args.filter, **counts}))


def score_extremes(gid: np.ndarray, score: np.ndarray) -> dict[str, list]:
    """The part's PREVIEW_PER_ROW highest and lowest of the first score column, [run id, score] each, for
    the preview (which thus never reads every part's scores): ties go to the lower run id among the
    highest, to the higher among the lowest."""
    order = np.argsort(-score, kind='stable')
    return {k: [[int(gid[i]), float(score[i])] for i in pick] for k, pick in
            (('highest', order[:PREVIEW_PER_ROW]), ('lowest', order[::-1][:PREVIEW_PER_ROW]))}


def unwritten(plan: Plan, args: argparse.Namespace) -> list[tuple[Bucket, Part]]:
    """The output parts without a marker, or written with another --filter (written again)."""
    todo = []
    for b in plan.buckets:
        done = {name for name, m in done_markers(b.places.out, b.parts, args.download_timeout)
                if m.get('filter') == args.filter}
        todo += [(b, p) for p in b.parts if p.name not in done]
    return todo


def write_pass(args: argparse.Namespace, plan: Plan, rank: int, world: int) -> None:
    from tqdm import tqdm

    clauses, _ = compile_filter(args.filter, filter_schema(plan.columns))
    todo = agreed(lambda: unwritten(plan, args), rank)
    readers: dict[str, ShardReader] = {}
    for bucket, part in tqdm(todo[rank::world], desc='writes', unit='part', disable=rank != 0):
        if bucket.name not in readers:
            readers[bucket.name] = ShardReader(bucket, args, rank)
        write_part(plan, args, bucket, part, readers[bucket.name], clauses)


# ----------------------------------------------------------------------------------------------
# Finishing (rank 0): each bucket's index.json and record, the summary, the preview
# ----------------------------------------------------------------------------------------------

def merge_bucket(bucket: Bucket, staging: str, written: int, timeout: float) -> None:
    """The bucket's index.json: its parts' indexes merged. A bucket left without rows gets none (and an
    old one goes; at a remote, where streaming cannot delete, it is overwritten by an index of no shards):
    StreamingDataset refuses a stream without samples, so a reader takes the buckets with an index.json."""
    out = bucket.places.out
    if written:
        merge_parts(out, bucket.parts, staging, timeout)
    elif not is_remote(out):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, INDEX))
    elif exists(join(out, INDEX), timeout):
        put_text(out, staging, INDEX, json.dumps({'version': 2, 'shards': []}))


# >>> twin: merge-parts (verbatim in caption_images.py, curate_images.py; test_twins.py)
def merge_parts(out_root: str, parts: list[Part], staging: str, timeout: float) -> None:
    """One index.json at `out_root` over its parts' (none: an empty, readable one), in part order, written
    record by record as the parts' indexes are read (16 at a time, at most 256 parts ahead)."""
    hook = shared_lists()

    def shards(part: Part) -> list[dict]:
        found = read_json(join(out_root, part.name, INDEX), timeout, hook)['shards']
        return [{**s, **{k: {**s[k], 'basename': f'{part.name}/{s[k]["basename"]}'}
                         for k in ('raw_data', 'zip_data') if s.get(k)}} for s in found]

    def merged() -> Iterator[dict]:
        with ThreadPoolExecutor(16) as pool:
            for start in range(0, len(parts), 256):
                yield from (s for found in pool.map(shards, parts[start:start + 256]) for s in found)

    try:
        put_text(out_root, staging, INDEX, index_text(merged()))
    except Exception as err:
        raise UserError(f'merging the index at {out_root} failed: {first_line(err)}') from None
# <<< twin: merge-parts


def summarize(args: argparse.Namespace, plan: Plan, speed: dict, world: int) -> dict:
    """Totals per bucket over its parts' markers, read one at a time: the images each part skipped or decoded
    with a warning are named in its marker, counted by reason here (twin named)."""
    _, labels = compile_filter(args.filter, filter_schema(plan.columns))
    buckets, missing, names = {}, [], {'skipped': named(), 'noted': named()}
    for b in plan.buckets:
        total = {'input': 0, 'written': 0, 'skipped': 0, 'noted': 0, 'in_groups': 0, 'kept_of_groups': 0,
                 'removed_by_clause': [0] * len(labels)}
        done = set()
        for name, m in done_markers(b.places.out, b.parts, args.download_timeout):
            if m.get('filter') != args.filter:
                continue
            for k, fold in names.items():
                total[k] += len(m.get(k, []))
                add_named(fold, m.get(k, []))
            for k in ('input', 'written', 'in_groups', 'kept_of_groups'):
                total[k] += m[k]
            total['removed_by_clause'] = [a + b for a, b in zip(total['removed_by_clause'],
                                                                m['removed_by_clause'])]
            done.add(name)
        missing += [f'{b.name}/{p.name}' for p in b.parts if p.name not in done]
        buckets[b.name] = {'output': b.places.out, **total,
                           'removed_by_clause': dict(zip(labels, total['removed_by_clause']))}
    outs = join(args.remote_upload, '<bucket>' if len(plan.buckets) > 1 else plan.buckets[0].name,
                args.subfolder)
    return {'buckets': buckets, 'input_samples': plan.rows,
            'written': sum(b['written'] for b in buckets.values()),
            **{k: sum(b[k] for b in buckets.values()) for k in names},
            **{f'{k}_names': {**fold, 'in': f'{outs}/NNNNN/{DONE_MARKER}, under "{k}"'}
               for k, fold in names.items()},
            'in_groups': sum(b['in_groups'] for b in buckets.values()),
            'kept_of_groups': sum(b['kept_of_groups'] for b in buckets.values()),
            'parts_missing': missing, 'world_size': world, 'rank0': speed, 'settings': plan.settings,
            'interrupted': None}


def report(summary: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(summary, f, indent=2)
    s, speed = summary, summary['rank0']
    lines = [f'input    {s["input_samples"]} samples in {len(s["buckets"])} buckets; {s["skipped"]} '
             f'undecodable images skipped, {s["noted"]} decoded with a warning from PIL or libtiff',
             f'dedup    {s["in_groups"]} images in duplicate groups, {s["kept_of_groups"]} kept by the rule '
             f'(cosine > {s["settings"]["dup_threshold"]}, equal bytes or dHash)',
             f'output   {s["written"]} rows written']
    for name, b in s['buckets'].items():
        lines.append(f'  {name or "dataset"}: {b["written"]} of {b["input"]} -> {b["output"]}'
                     + ('' if b['written'] else ' (no index.json: no row is left)'))
        lines += [f'    removed by clause {n:>10}  {label}' for label, n in b['removed_by_clause'].items()]
    lines.append(f'speed    rank 0 embedded {speed["images"]} images in {speed["seconds"]:.1f} s '
                 f'({speed["images_per_s"]:.1f} images/s), world size {s["world_size"]}')
    lines += [f'{k:<8} {line}' for k in ('skipped', 'noted') for line in named_lines(s[f'{k}_names'])]
    if s['interrupted']:
        lines.append(f'stopped by {s["interrupted"]}: rerun the same command to resume')
    if s.get('preview'):
        lines.append(f'preview  {s["preview"]["path"]}')
    lines.append(f'summary  {path}')
    print('\n'.join(lines), flush=True)


def write_record(args: argparse.Namespace, plan: Plan, bucket: Bucket, summary: dict) -> None:
    record = {'model_name': args.model_name,
              'scores': [s.record() for s in plan.scores], 'head_sha1': plan.settings['heads'],
              'dedup': {'dup_threshold': args.dup_threshold, 'clusters': plan.clusters, 'neighbours': 2,
                        'also': f'equal content (sha1) and equal 64-bit dHash (with {DHASH_ROWS} different '
                                f'rows and {DHASH_BITS} bits of each value)',
                        'keep': 'largest width x height, then lowest key, then lowest run id',
                        'buckets_together': [b.name for b in plan.buckets]},
              'filter': args.filter, 'counts': summary['buckets'][bucket.name],
              'columns': new_columns(args)}
    put_text(bucket.places.out, plan.staging, RECORD, json.dumps(record, indent=1))


def preview_rows(args: argparse.Namespace, plan: Plan) -> list[tuple[str, list[tuple[int, str]]]]:
    """(title, [(run id, label)]): the --preview largest duplicate groups (the kept member first), then
    the highest and the lowest by the first score column."""
    largest = get_arrays(join(plan.work, GROUPS, 'largest.npz'), args.download_timeout)
    rows = []
    for n in range(min(args.preview, len(largest['group']))):
        g, members = largest['group'][n], largest['members'][n]
        rows.append((f'duplicate group {n + 1}: {largest["size"][n]} images, the kept one first',
                     [(int(x), 'kept' if x == g else 'dropped') for x in members if x >= 0]))
    if plan.scores:
        extremes = [m.get('extremes', {}) for b in plan.buckets
                    for _, m in done_markers(b.places.out, b.parts, args.download_timeout)]
        for end, rule in (('highest', lambda x: (-x[1], x[0])), ('lowest', lambda x: (x[1], -x[0]))):
            best = sorted({tuple(x) for e in extremes for x in e.get(end, [])}, key=rule)
            rows.append((f'{end} {plan.scores[0].name}',
                         [(g, f'{v:.3f}') for g, v in best[:PREVIEW_PER_ROW]]))
    return rows


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

# >>> twin: streaming-dataset (verbatim in caption_images.py, curate_images.py; test_twins.py)
def streaming_dataset(**where: Any) -> Any:
    """streaming's StreamingDataset over `where` (local, remote), in order, one sample a batch. Opened again
    when another process on this machine took the same shared-memory name at that moment: streaming 0.13
    looks for a free name, then creates it (mosaicml/streaming#884), so previews of jobs side by side
    would fail at the end of a finished run."""
    from streaming import StreamingDataset

    for attempt in range(8):
        try:
            return StreamingDataset(**where, shuffle=False, batch_size=1)
        except FileExistsError:
            if attempt == 7:
                raise
            time.sleep(0.05 * 2 ** attempt)
# <<< twin: streaming-dataset


def write_preview(args: argparse.Namespace, plan: Plan, path: str) -> dict:
    """A PNG of preview_rows: each row a title line, then its images, each over '<bucket>#<id> label'."""
    rows, datasets = preview_rows(args, plan), {}
    height = PREVIEW_LINE + PREVIEW_TILE + PREVIEW_LINE + 8
    sheet = Image.new('RGB', (PREVIEW_PER_ROW * (PREVIEW_TILE + 8) + 8, len(rows) * height + 8), 'white')
    draw, font = ImageDraw.Draw(sheet), preview_font()
    for r, (title, entries) in enumerate(rows):
        top = 8 + r * height
        draw.text((8, top), title, fill='black', font=font)
        for c, (g, label) in enumerate(entries):
            b = next(b for b in reversed(plan.buckets) if b.offset <= g)
            if b.name not in datasets:
                remote = None if b.places.cache == b.places.src else b.places.src
                datasets[b.name] = streaming_dataset(local=b.places.cache, remote=remote)
            img = decode(datasets[b.name][g - b.offset][IMAGE_COLUMN], [])  # counted in the markers
            img.thumbnail((PREVIEW_TILE, PREVIEW_TILE))
            x = 8 + c * (PREVIEW_TILE + 8)
            sheet.paste(img, (x, top + PREVIEW_LINE))
            draw.text((x, top + PREVIEW_LINE + PREVIEW_TILE + 2), f'{b.name}#{g - b.offset} {label}',
                      fill='black', font=font)
    del datasets
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return {'path': path, 'rows': [(title, [g for g, _ in entries]) for title, entries in rows]}


def summary_path(args: argparse.Namespace) -> str:
    return args.summary or os.path.join(args.local, 'curate_summary.json')


def preview_path(args: argparse.Namespace) -> str:
    return args.preview_path or os.path.splitext(summary_path(args))[0] + '_preview.png'


def finish(args: argparse.Namespace, plan: Plan, speed: dict, world: int) -> None:
    summary = summarize(args, plan, speed, world)
    if summary['parts_missing']:
        report(summary, summary_path(args))
        raise UserError(f'parts {", ".join(summary["parts_missing"])} have no _done marker; rerun the same '
                        'command')
    for b in plan.buckets:
        merge_bucket(b, plan.staging, summary['buckets'][b.name]['written'], args.download_timeout)
        write_record(args, plan, b, summary)
    if args.preview:
        summary['preview'] = write_preview(args, plan, preview_path(args))
    report(summary, summary_path(args))
    shutil.rmtree(plan.staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------

# >>> twin: signals-and-device (verbatim in caption_images.py, curate_images.py; test_twins.py)
def stop_on_signals() -> None:
    """SIGTERM (how platforms stop a job) and SIGINT raise Interrupted; a second one ends the process."""
    def handler(signum: int, frame) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def pick_device(args: argparse.Namespace):
    import torch

    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no GPU is visible to torch')
    if args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available()):
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device('cpu')
# <<< twin: signals-and-device


def agreed(compute: Callable[[], Any], rank: int) -> Any:
    """What rank 0 computes (or the error it meets), on every rank: the plan, and each pass's list of
    unfinished units, which must be one list (a rank that listed after another had finished a unit
    would take another share, and a unit could fall between them)."""
    import torch.distributed as dist

    result: list[Any] = [None]
    if rank == 0:
        try:
            result[0] = compute()
        except UserError as err:
            result[0] = err
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], UserError):
        raise result[0]
    return result[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch.distributed as dist
    import transformers

    transformers.logging.set_verbosity_error()
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    stop_on_signals()
    plan = None
    barrier = dist.barrier if world > 1 else (lambda: None)
    try:
        if world > 1:
            dist.init_process_group('gloo', timeout=timedelta(seconds=args.dist_timeout))
        device = pick_device(args)
        plan = agreed(lambda: make_plan(args), rank)
        speed = embed_pass(args, plan, device, rank, world)
        barrier()
        dedup_pass(args, plan, rank, world, barrier)
        write_pass(args, plan, rank, world)
        barrier()
        if rank == 0:
            finish(args, plan, speed, world)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as stop:
        print(f'error: stopped by {stop}: finished parts are kept, the part in progress is not; rerun the '
              'same command to resume', file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
