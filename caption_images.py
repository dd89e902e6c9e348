"""Write a dense synthetic caption of every image of an MDS dataset with a vision-language model, once.

Reads one bucket of what laion_cloudwriter.py wrote, asks an image-text-to-text model of transformers
(LLaVA-1.5/NeXT, Qwen2-VL / Qwen2.5-VL, SmolVLM / Idefics3: any that loads with AutoProcessor and
AutoModelForImageTextToText) to describe each image, cleans the text with a table of rules and stores
it as a new column, so that training can pick the alt-text or the new caption per sample and
precompute_latents.py can encode both. The full manual is README.md's section "caption_images.py".

Example (one GPU; `torchrun --nproc_per_node 8 -- caption_images.py ...` for eight):

    python caption_images.py --remote_download s3://my-bucket/laion/mds --bucket 3 \\
        --local /tmp/caption-cache --remote_upload s3://my-bucket/laion/captioned \\
        --model_name Qwen/Qwen2-VL-2B-Instruct --batch-size 32

Reads `<remote_download>/<bucket name>[/<subfolder>]`, or `<local>/<bucket name>` in place without
`--remote_download`: MDS shards with a `jpg` column; and the model (hub name or folder).

Writes `<remote_upload>/<bucket name>[/<subfolder>]`: every input column unchanged plus `--caption_key`
(str; with `--keep_raw` also `<caption_key>_raw`, the text before the rules), and `captions.json`
beside index.json (model, prompt, generation settings, rules, counts). Ends with a summary, printed
and written as JSON (`--summary`); `--preview N` adds a PNG.

Resume: the work is split into parts of whole input shards; each finished part gets a `_done` marker
with the settings that shape its text. Rerun the same command, with any number of processes, to skip
finished parts; other settings or another input are refused. Rank 0 merges index.json at the end.

Exit codes: 0 done (undecodable images are skipped, counted and named in the summary); 2 one `error:`
line (a flag, the model, the places, a rerun's other settings, parts left unfinished); 128 + the signal
after SIGTERM (143) or Ctrl-C (130): finished parts are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

# Bucket edges on the shorter image side, as laion_cloudwriter.py buckets them: `--bucket 3` is '256-512'.
BUCKET_EDGES = (0, 64, 128, 256, 512, 768, 1024, 2**20)
BUCKET_NAMES = tuple(f'{lo}-{hi}' for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:]))
IMAGE_COLUMN, CAPTION_COLUMN = 'jpg', 'caption'  # the cloudwriter's image bytes and alt-text
RAW = '{key}_raw'  # --keep_raw: the decoded text before the rules
INDEX = 'index.json'
DONE_MARKER = '_done'  # per part; not *.json, so streaming's merge_index never mistakes it for an index
STAGING = '.staging-captions'  # below --local: output files on their way to a remote
RECORD = 'captions.json'  # beside index.json: how the captions were made, and the counts
DEFAULT_PROMPT = ('Describe this image in detail in one paragraph: the main subjects, what they look like '
                  'and do, the setting, the colours and lighting, and any text that is visible.')


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
# Post-processing: a table of rules, applied in order, each counted where it changes a caption
# ----------------------------------------------------------------------------------------------

PREAMBLE = re.compile(r'(?:(?:the|this) (?:image|picture|photo(?:graph)?) (?:shows|depicts|features|displays|'
                      r'captures|presents)|in (?:the|this) (?:image|picture|photo(?:graph)?),?)\s+', re.I)
NOTE = re.compile(r'\s*\bnote:', re.I)
SENTENCE_END = re.compile(r'(?<=[.!?])\s+')


def cut_at_note(text: str) -> str:
    """Drop everything from the first 'Note:' on (models add remarks about themselves there)."""
    return NOTE.split(text, maxsplit=1)[0]


def strip_preamble(text: str) -> str:
    """'The image shows a cat.' -> 'A cat.'; also 'In this image, ...', 'This photo depicts ...'."""
    body = text.lstrip()
    found = PREAMBLE.match(body)
    if not found:
        return text
    rest = body[found.end():]
    return rest[:1].upper() + rest[1:]


def drop_repeated_sentences(text: str) -> str:
    """Keep the first of sentences that repeat (ignoring case and spacing); greedy decoding loops."""
    sentences = SENTENCE_END.split(text.strip())
    seen, kept = set(), []
    for s in sentences:
        norm = ' '.join(s.lower().split())
        if norm not in seen:
            seen.add(norm)
            kept.append(s)
    return text if len(kept) == len(sentences) else ' '.join(kept)


def collapse_whitespace(text: str) -> str:
    """Runs of spaces, tabs and newlines become one space; no space at either end."""
    return ' '.join(text.split())


RULES = (cut_at_note, strip_preamble, drop_repeated_sentences, collapse_whitespace)  # applied in this order
RULE_NAMES = tuple(rule.__name__ for rule in RULES)


def clean(text: str, rules: tuple[Callable[[str], str], ...]) -> tuple[str, list[str]]:
    """`text` after each rule in order, and the names of the rules that changed it."""
    changed = []
    for rule in rules:
        new = rule(text)
        if new != text:
            changed.append(rule.__name__)
        text = new
    return text, changed


# ----------------------------------------------------------------------------------------------
# Flags: argparse types check every value before anything heavy is imported
# ----------------------------------------------------------------------------------------------

# >>> twin: at-least (verbatim in caption_images.py, curate_images.py; test_twins.py)
def at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'{text} must be at least {low}')
        return value
    return check
# <<< twin: at-least


def bucket_name(text: str) -> str:
    """`--bucket` as a folder name: an index into BUCKET_NAMES, a bucket name, or '' for none."""
    if text.isdigit():
        if int(text) >= len(BUCKET_NAMES):
            raise argparse.ArgumentTypeError(f'{text}: the bucket index must be 0..{len(BUCKET_NAMES) - 1} '
                                             f'({", ".join(BUCKET_NAMES)})')
        return BUCKET_NAMES[int(text)]
    return text


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
    p.add_argument('--local', default='/tmp/caption-images',
                   help='local cache folder: input shards are downloaded to <local>/<bucket name>/'
                        'download-<id>/; without --remote_download the input is read from <local>/<bucket>')
    p.add_argument('--remote_download', default='', help='remote (or local) root of the input MDS datasets')
    p.add_argument('--remote_upload', required=True, help='remote (or local) root to write the output to')
    p.add_argument('--bucket', type=bucket_name, default='',
                   help="bucket subfolder: an index (0 '0-64' ... 3 '256-512' ...) or a name such as "
                        "'256-512'; empty: the roots are datasets")
    p.add_argument('--subfolder', default='', help='subfolder below the bucket folder')
    p.add_argument('--model_name', default='Qwen/Qwen2-VL-2B-Instruct',
                   help='image-text-to-text model (hub name or folder) with a processor and a chat template')
    p.add_argument('--prompt', default=DEFAULT_PROMPT, help="the user turn beside the image, through the "
                                                            "processor's chat template")
    p.add_argument('--caption_key', default='vlm_caption', help='name of the new text column')
    p.add_argument('--keep_raw', action='store_true',
                   help='also store <caption_key>_raw: the decoded text before the rules (to tune them)')
    p.add_argument('--rules', nargs='*', choices=RULE_NAMES, default=list(RULE_NAMES),
                   help='post-processing rules to apply, in table order; none: store the decoded text')
    p.add_argument('--max_new_tokens', type=at_least(1), default=256, help='generated tokens per caption')
    p.add_argument('--decoding', choices=('greedy', 'sample'), default='greedy',
                   help='greedy: a rerun writes the same text; sample: seeded by --seed and the sample id')
    p.add_argument('--temperature', type=at_least(1e-6, float), default=0.7, help='--decoding sample')
    p.add_argument('--top_p', type=at_least(1e-6, float), default=0.9, help='--decoding sample')
    p.add_argument('--seed', type=at_least(0), default=0, help='--decoding sample: seed of each sample')
    p.add_argument('--batch-size', dest='batch_size', type=at_least(1), default=16,
                   help='images per generate call on each process (left-padded)')
    p.add_argument('--engine', choices=('transformers',), default='transformers', help='generation engine')
    p.add_argument('--device', choices=('auto', 'cuda', 'cpu'), default='auto',
                   help='auto: cuda:<LOCAL_RANK> when available')
    p.add_argument('--dtype', choices=('auto', 'float32', 'float16', 'bfloat16'), default='auto',
                   help='auto: the device row of RUNTIMES (bfloat16 on GPU, float32 on CPU)')
    p.add_argument('--attention', choices=('auto', 'flash_attention_2', 'sdpa', 'eager'), default='auto',
                   help='auto: the first of the device row of RUNTIMES that is installed')
    p.add_argument('--part_size', type=at_least(1), default=2000,
                   help='samples per unit of work and of resume (whole input shards, at least this many)')
    p.add_argument('--size_limit', type=size_limit, default='256mb', help='output shard size limit')
    p.add_argument('--compression', type=compression, default='', help='output shard compression, e.g. zstd')
    p.add_argument('--download_timeout', type=at_least(1e-3, float), default=300, help='seconds per file')
    p.add_argument('--download_retry', type=at_least(0), default=2, help='retries per file download')
    p.add_argument('--dist_timeout', type=at_least(1, float), default=7 * 24 * 3600,
                   help='seconds ranks wait for each other at the final barrier')
    p.add_argument('--summary', default='',
                   help='where to write the JSON summary; empty: <local>/captions_summary_<bucket>.json')
    p.add_argument('--preview', type=at_least(0), default=0,
                   help='rank 0 writes a PNG of this many images, each beside its alt-text and new caption')
    p.add_argument('--preview_path', default='', help='empty: beside the summary, <summary>_preview.png')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Places and remotes (as precompute_latents.py names them)
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


# >>> twin: put-text (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
def put_text(out_root: str, staging: str, relpath: str, text: str) -> None:
    """Write `text` to `<out_root>/<relpath>` (local: atomically; remote: via `staging`)."""
    if not is_remote(out_root):
        path = os.path.join(out_root, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + '.tmp', 'w') as f:
            f.write(text)
        os.replace(path + '.tmp', path)
        return
    from streaming.base.storage.upload import CloudUploader

    folder, name = os.path.split(relpath)
    with tempfile.TemporaryDirectory(dir=staging, ignore_cleanup_errors=True) as local_dir:
        with open(os.path.join(local_dir, name), 'w') as f:
            f.write(text)
        uploader = CloudUploader.get((local_dir, join(out_root, folder)), keep_local=False, exist_ok=True)
        uploader.upload_file(name)
# <<< twin: put-text


# ----------------------------------------------------------------------------------------------
# The plan: parts of whole input shards, minus those with a _done marker
# ----------------------------------------------------------------------------------------------

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


@dataclasses.dataclass(frozen=True)
class Plan:
    """What rank 0 found and every rank needs."""

    places: Places
    shards: list[dict]
    columns: dict[str, str]
    parts: list[Part]
    pending: list[Part]
    settings: dict


def read_input(pl: Places, caption_key: str, timeout: float) -> tuple[list[dict], dict[str, str]]:
    """The input's shard list and {column: MDS encoding}, checked (a copy of the index goes to the cache)."""
    url, local = join(pl.src, INDEX), os.path.join(pl.cache, INDEX)
    os.makedirs(pl.cache, exist_ok=True)
    try:
        if url != local:
            fetch(url, local, timeout)
        with open(local) as f:
            shards = json.load(f)['shards']
    except Exception as err:  # unreachable remote, missing dataset, corrupt index
        raise UserError(f'cannot read the input dataset index {url}: {first_line(err)}') from None
    columns = dict(zip(shards[0]['column_names'], shards[0]['column_encodings'])) if shards else {}
    if any(s.get('format') != 'mds' or dict(zip(s['column_names'], s['column_encodings'])) != columns
           for s in shards):
        raise UserError(f'{url}: the shards must all be MDS with the same columns')
    if shards and IMAGE_COLUMN not in columns:
        raise UserError(f'{url}: the input has no `{IMAGE_COLUMN}` column (columns: {", ".join(columns)})')
    if caption_key in columns or RAW.format(key=caption_key) in columns:
        raise UserError(f'{url} already has a column {caption_key}: pass another --caption_key')
    return shards, columns


def make_plan(args: argparse.Namespace, pl: Places, runtime: dict[str, str]) -> Plan:
    """Rank 0: check the input and the output, and list the parts still to do."""
    shards, columns = read_input(pl, args.caption_key, args.download_timeout)
    columns[args.caption_key] = 'str'
    if args.keep_raw:
        columns[RAW.format(key=args.caption_key)] = 'str'
    parts = plan_parts(shards, args.part_size)
    settings = {'model_name': args.model_name, 'prompt': args.prompt, 'caption_key': args.caption_key,
                'keep_raw': args.keep_raw, 'rules': args.rules, 'max_new_tokens': args.max_new_tokens,
                **decoding_settings(args), 'batch_size': args.batch_size, 'engine': args.engine, **runtime,
                'part_size': args.part_size, 'input_samples': parts[-1].last if parts else 0,
                'input_index': hashlib.sha1(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16]}
    names = output_names(pl.out)
    if names and RECORD not in names and not any(n.endswith(f'/{DONE_MARKER}') for n in names):
        raise UserError(f'--remote_upload {pl.out} holds files this script did not write '
                        f'({sorted(names)[0]}, ...): pass a new or empty --remote_upload')
    finished = [p for p in parts if f'{p.name}/{DONE_MARKER}' in names]
    markers = done_markers(pl.out, finished, args.download_timeout)
    for name, marker in markers.items():
        old = marker['settings']
        for key in sorted(set(old) | set(settings)):
            if old.get(key) != settings.get(key):
                raise UserError(f'{pl.out}/{name} was written with {key}={str(old.get(key))[:60]!r}, '
                                f'this run has {str(settings.get(key))[:60]!r}: rerun with the same flags '
                                'or write to a new --remote_upload')
    os.makedirs(pl.staging, exist_ok=True)
    put_text(pl.out, pl.staging, RECORD, json.dumps({'settings': settings}, indent=1))  # the output is ours
    return Plan(pl, shards, columns, parts, [p for p in parts if p.name not in markers], settings)


# >>> twin: done-markers (verbatim in caption_images.py, curate_images.py; test_twins.py)
def done_markers(out_root: str, parts: list[Part], timeout: float) -> dict[str, dict]:
    """{part name: marker} of the given parts that have a readable _done marker."""
    def read(part: Part) -> tuple[str, dict | None]:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                fetch(join(out_root, part.name, DONE_MARKER), os.path.join(tmp, 'f'), timeout)
                with open(os.path.join(tmp, 'f')) as f:
                    return part.name, json.load(f)
        except Exception:  # absent or unreadable: the part is simply done again
            return part.name, None

    with ThreadPoolExecutor(16) as pool:
        return {name: m for name, m in pool.map(read, parts) if m is not None}
# <<< twin: done-markers


# ----------------------------------------------------------------------------------------------
# Reading: a part's shards, its images decoded once, in batches that never cross a part
# ----------------------------------------------------------------------------------------------

# >>> twin: shard-reader (verbatim in caption_images.py, curate_images.py; test_twins.py)
class ShardReader:
    """Input shards on local disk: downloaded (and decompressed) on first use, removed after their shard
    is read. A rank's parts, hence its shards, are its own: it downloads into `<cache>/rank<r>`, emptied
    first (a shard an earlier run left there cannot be checked against the input)."""

    def __init__(self, plan: Plan, args: argparse.Namespace, rank: int):
        from streaming import Stream
        from streaming.base.format import reader_from_json

        remote = plan.places.src if plan.places.src != plan.places.cache else None
        local = plan.places.cache
        if remote:
            local = os.path.join(local, f'rank{rank}')
            shutil.rmtree(local, ignore_errors=True)
            os.makedirs(local)
        self.readers = [reader_from_json(local, None, s) for s in plan.shards]
        self.first = [0]
        for s in plan.shards:
            self.first.append(self.first[-1] + s['samples'])
        self.stream = Stream(remote=remote, local=local, download_retry=args.download_retry,
                             download_timeout=args.download_timeout, keep_zip=False)
        self.evict = remote is not None

    def samples(self, part: Part) -> Iterator[tuple[int, dict]]:
        """(global sample id, sample) of every sample of the part, in order."""
        for shard in part.shards:
            reader = self.readers[shard]
            self.stream.prepare_shard(reader)
            for i in range(reader.samples):
                yield self.first[shard] + i, reader.get_item(i)
            if self.evict:
                reader.evict()
# <<< twin: shard-reader


# >>> twin: decode (copied verbatim in caption_images.py, curate_images.py, laion_cloudwriter.py,
# precompute_latents.py; tests/test_twins.py checks the copies). The one decode rule of every script that
# looks at pixels, stated in README.md's "How images are decoded".
DECODE_PIXEL_LIMIT = 2 * 89_478_485  # PIL's default bomb limit (2 x MAX_IMAGE_PIXELS), even if lifted
SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N')  # grayscale modes, 0..65535


def to_rgb(img: Image.Image) -> Image.Image:
    """The 8-bit RGB picture a viewer shows of an image fresh from Image.open (a draft() allowed; nothing
    may have loaded it: after a failed load() a second one returns partial pixels without a word):
    - its first frame (animated GIF, APNG and WebP; MPO), at the size PIL decodes (after any draft());
    - refused (DecompressionBombError) above DECODE_PIXEL_LIMIT pixels, before anything is decoded;
    - EXIF orientation applied; a broken EXIF block turns nothing and loses nothing;
    - 16-bit grayscale scaled by 255/65535 (rounded); 32-bit integer and float grayscale likewise when a
      value exceeds 255, else taken as 8-bit; clipped to 0..255;
    - transparency (an alpha band: RGBA, LA, PA; a tRNS chunk or GIF transparent index) over white;
    - every other mode (CMYK, LAB, YCbCr, palette, 1-bit) by PIL's convert('RGB'), ICC profiles ignored.
    Raises what PIL raises for bytes it cannot decode (truncated, corrupt, unknown)."""
    if img.width * img.height > DECODE_PIXEL_LIMIT:
        raise Image.DecompressionBombError(f'{img.width} x {img.height} pixels is over the limit of '
                                           f'{DECODE_PIXEL_LIMIT}: a decompression bomb?')
    img.load()
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose a good image
        ImageOps.exif_transpose(img, in_place=True)
    if img.mode in SIXTEEN_BIT or img.mode in ('I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode in SIXTEEN_BIT or arr.max(initial=0) > 255:
            arr = arr * (255 / 65535)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if img.has_transparency_data:
        rgba = img.convert('RGBA')
        img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == 'RGB' else img.convert('RGB')
# <<< twin: decode


def decode(data: bytes) -> Image.Image:
    """The stored bytes as the model sees them (`to_rgb`)."""
    return to_rgb(Image.open(io.BytesIO(data)))


@dataclasses.dataclass
class Batch:
    part: Part
    ids: list[int]
    samples: list[dict]
    images: list[Image.Image]
    skipped: list[dict]
    last: bool  # the part's last batch


def batches(reader: ShardReader, parts: list[Part], size: int) -> Iterator[Batch]:
    """Every part's decodable images in batches of `size` (undecodable ones skipped, named)."""
    for part in parts:
        batch = Batch(part, [], [], [], [], False)
        for sample_id, sample in reader.samples(part):
            try:
                batch.images.append(decode(sample[IMAGE_COLUMN]))
            except Exception as err:  # PIL raises many types for bad bytes: every one is a skip
                reason = ('not an image format PIL can read' if isinstance(err, UnidentifiedImageError)
                          else f'{type(err).__name__}: {first_line(err)}')
                batch.skipped.append({'id': sample_id, 'key': str(sample.get('key', '')), 'reason': reason})
                continue
            batch.ids.append(sample_id)
            batch.samples.append(sample)
            if len(batch.ids) == size:
                yield batch
                batch = Batch(part, [], [], [], [], False)
        batch.last = True
        yield batch


def prefetched(items: Iterator[Batch]) -> Iterator[Batch]:
    """`items`, the next one read and decoded in a thread while the model works on this one."""
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(next, items, None)
        while (item := ahead.result()) is not None:
            ahead = pool.submit(next, items, None)
            yield item


# ----------------------------------------------------------------------------------------------
# Generation: the device row picks dtype and attention; the engine row loads and generates
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Runtime:
    dtype: str
    attention: tuple[str, ...]  # in order of preference; the first that is installed is used


RUNTIMES = {'cuda': Runtime('bfloat16', ('flash_attention_2', 'sdpa')), 'cpu': Runtime('float32', ('sdpa',))}
ATTENTION_INSTALLED = {'flash_attention_2': 'is_flash_attn_2_available', 'sdpa': 'is_torch_sdpa_available'}


def pick_runtime(args: argparse.Namespace, device: str) -> dict[str, str]:
    """{'dtype', 'attention'}: the flags, or for 'auto' the device's row of RUNTIMES."""
    import transformers.utils

    row = RUNTIMES[device]
    available = [a for a in row.attention if getattr(transformers.utils, ATTENTION_INSTALLED[a])()]
    attention = args.attention if args.attention != 'auto' else (available or ['eager'])[0]
    return {'dtype': row.dtype if args.dtype == 'auto' else args.dtype, 'attention': attention}


def decoding_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The generate() arguments besides max_new_tokens: greedy, or sampling with its settings and seed."""
    if args.decoding == 'greedy':
        return {'do_sample': False, 'num_beams': 1}
    # top_k 0: nucleus sampling alone, whatever top_k the model's generation_config sets (Qwen2-VL's 1)
    return {'do_sample': True, 'temperature': args.temperature, 'top_p': args.top_p, 'top_k': 0,
            'seed': args.seed}


@dataclasses.dataclass
class HFModel:
    """A transformers model, its processor, and the token ids that end a caption."""

    model: Any
    processor: Any
    prompt: str  # the chat template applied to --prompt
    stop_ids: set[int]


def not_a_vlm(model_name: str) -> str | None:
    """What a local --model_name folder is, when it cannot be an image-text-to-text model (None: it may be
    one, or it is a hub name: loading tells)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if not os.path.isdir(model_name):  # a hub name is org/name; a path to nothing is neither
        return 'is no folder, nor a hub name (org/name)' if model_name.count('/') > 1 or \
            model_name.startswith(('/', '.', '~')) else None
    pipeline = [name for name in ('model_index.json', 'unet/config.json', 'transformer/config.json',
                                  'vae/config.json', 'text_encoder/config.json')
                if os.path.exists(os.path.join(model_name, name))]
    if pipeline:
        return f'is a diffusers pipeline folder ({", ".join(pipeline)})'
    try:
        with open(os.path.join(model_name, 'config.json')) as f:
            model_type = json.load(f).get('model_type')
    except (OSError, ValueError, AttributeError):
        return 'has no readable config.json'
    if model_type not in CONFIG_MAPPING:
        return f'holds a model_type {model_type!r} that transformers does not know'
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return f'holds a {model_type} model, which AutoModelForImageTextToText does not load'
    return None


def load_transformers(args: argparse.Namespace, device: Any, runtime: dict[str, str]) -> HFModel:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if what := not_a_vlm(args.model_name):
        raise UserError(f'--model_name {args.model_name} {what}: pass an image-text-to-text model (a hub '
                        'name such as Qwen/Qwen2-VL-2B-Instruct, or a folder with its config.json and '
                        'processor)')
    try:
        processor = AutoProcessor.from_pretrained(args.model_name)
        model = AutoModelForImageTextToText.from_pretrained(
            args.model_name, torch_dtype=getattr(torch, runtime['dtype']),
            attn_implementation=runtime['attention']).to(device).eval()
    except Exception as err:
        why = first_line(err).split('. ')[0]  # transformers may go on with a list of every model type
        hint = 'pass --attention eager' if 'attention' in why.lower() else 'check the name'
        raise UserError(f'cannot load {args.model_name} with AutoProcessor and AutoModelForImageTextToText '
                        f'({why}); {hint}') from None
    tokenizer = processor.tokenizer
    tokenizer.padding_side = 'left'  # generation continues every row from its last prompt token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    turn = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': args.prompt}]}]
    try:
        prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
    except Exception as err:
        raise UserError(f'{args.model_name}: its processor has no usable chat template '
                        f'({first_line(err)})') from None
    eos = model.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), tokenizer.pad_token_id} - {None}
    return HFModel(model, processor, prompt, stops)


def generate_transformers(m: HFModel, images: list[Image.Image], ids: list[int],
                          args: argparse.Namespace) -> tuple[list[str], list[int], list[bool]]:
    """(decoded text, generated token count, cut off at --max_new_tokens) per image. Greedy: one
    left-padded batch; sampling: one image at a time after seeding with (--seed, its sample id), so
    a caption depends on its image and seed alone."""
    import torch

    kwargs = {k: v for k, v in decoding_settings(args).items() if k != 'seed'}
    groups = [(images, None)] if args.decoding == 'greedy' else [([im], i) for im, i in zip(images, ids)]
    texts, counts, cut = [], [], []
    for group, sample_id in groups:
        if sample_id is not None:
            torch.manual_seed(int(hashlib.sha1(f'{args.seed}/{sample_id}'.encode()).hexdigest()[:15], 16))
        inputs = m.processor(images=group, text=[m.prompt] * len(group), padding=True, return_tensors='pt')
        inputs = inputs.to(m.model.device, m.model.dtype)  # floating tensors (pixels) take the model's dtype
        with torch.inference_mode():
            out = m.model.generate(**inputs, max_new_tokens=args.max_new_tokens, **kwargs)
        for row in out[:, inputs['input_ids'].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in m.stop_ids), None)
            counts.append(len(row) if end is None else end + 1)
            cut.append(end is None and len(row) >= args.max_new_tokens)
            texts.append(m.processor.decode(row[:end], skip_special_tokens=True))
    return texts, counts, cut


@dataclasses.dataclass(frozen=True)
class Engine:
    """A generation engine: load once per process, then captions for a batch of images."""

    load: Callable[[argparse.Namespace, Any, dict[str, str]], Any]
    generate: Callable[[Any, list[Image.Image], list[int], argparse.Namespace],
                       tuple[list[str], list[int], list[bool]]]


ENGINES = {'transformers': Engine(load_transformers, generate_transformers)}


# ----------------------------------------------------------------------------------------------
# Writing: one MDSWriter per part, then its _done marker with the part's counts
# ----------------------------------------------------------------------------------------------

def new_counts() -> dict[str, Any]:
    return {'written': 0, 'skipped': [], 'cut_off': 0, 'empty': 0, 'tokens': 0,
            'rules': {name: 0 for name in RULE_NAMES}}


def open_part(plan: Plan, part: Part, args: argparse.Namespace, staging: str):
    from streaming import MDSWriter

    out = (os.path.join(staging, part.name), join(plan.places.out, part.name)) \
        if is_remote(plan.places.out) else join(plan.places.out, part.name)
    return MDSWriter(out=out, columns=plan.columns, compression=args.compression or None,
                     size_limit=args.size_limit, exist_ok=True)


def write_batch(writer, batch: Batch, texts: list[str], tokens: list[int], cut: list[bool],
                args: argparse.Namespace, counts: dict[str, Any]) -> None:
    rules = tuple(r for r in RULES if r.__name__ in args.rules)
    for sample, raw, n, cut_off in zip(batch.samples, texts, tokens, cut):
        caption, changed = clean(raw, rules)
        out = {**sample, args.caption_key: caption}
        if args.keep_raw:
            out[RAW.format(key=args.caption_key)] = raw
        writer.write(out)
        for name in changed:
            counts['rules'][name] += 1
        counts['cut_off'] += cut_off
        counts['empty'] += not caption
        counts['tokens'] += n
    counts['written'] += len(batch.samples)
    counts['skipped'] += batch.skipped


def close_part(writer, plan: Plan, part: Part, counts: dict[str, Any], staging: str, started: float) -> None:
    """Finish the part's shards, then its marker: a part with a marker is whole."""
    try:
        writer.finish()
        marker = {'part': part.name, 'rank': int(os.environ.get('RANK', 0)), **counts,
                  'seconds': round(time.time() - started, 3), 'settings': plan.settings}
        put_text(plan.places.out, staging, f'{part.name}/{DONE_MARKER}', json.dumps(marker))
    except Exception as err:
        raise UserError(f'writing part {part.name} to {plan.places.out} failed ({first_line(err)}); rerun '
                        'the same command to resume') from None


def caption_parts(args: argparse.Namespace, plan: Plan, engine: Engine, model: Any, rank: int,
                  world: int) -> dict[str, float]:
    """Caption this rank's share of the unfinished parts (every world-th); returns its speed."""
    from tqdm import tqdm

    mine = plan.pending[rank::world]
    staging = os.path.join(plan.places.staging, f'rank{rank}')
    os.makedirs(staging, exist_ok=True)
    reader = ShardReader(plan, args, rank)
    bar = tqdm(total=sum(p.last - p.first for p in mine), unit='img', disable=rank != 0, dynamic_ncols=True,
               desc=f'rank 0/{world} captions' if world > 1 else 'captions')
    start, images, tokens = time.time(), 0, 0
    writer = counts = None
    try:
        for batch in prefetched(batches(reader, mine, args.batch_size)):
            if writer is None:
                writer, counts, opened = open_part(plan, batch.part, args, staging), new_counts(), time.time()
            texts, n, cut = engine.generate(model, batch.images, batch.ids, args) if batch.ids else ([],) * 3
            write_batch(writer, batch, texts, n, cut, args, counts)
            images, tokens = images + len(batch.ids), tokens + sum(n)
            bar.update(len(batch.ids) + len(batch.skipped))
            bar.set_postfix_str(f'{tokens / max(time.time() - start, 1e-9):.1f} tok/s', refresh=False)
            if batch.last:
                close_part(writer, plan, batch.part, counts, staging, opened)
                writer = None
    except UserError:
        raise
    except Exception as err:
        raise UserError(f'reading or captioning failed: {first_line(err)}; rerun the same command to '
                        'resume') from None
    finally:
        bar.close()
    seconds = time.time() - start
    return {'images': images, 'tokens': tokens, 'seconds': round(seconds, 3),
            'images_per_s': round(images / max(seconds, 1e-9), 3),
            'tokens_per_s': round(tokens / max(seconds, 1e-9), 1)}


# ----------------------------------------------------------------------------------------------
# Merging, the record, the summary and the preview (rank 0)
# ----------------------------------------------------------------------------------------------

def merge_parts(plan: Plan, staging: str) -> None:
    """One index.json at the output root over every part, in part order."""
    from streaming.base.util import merge_index

    out = plan.places.out
    if not plan.parts:  # an empty input still gets a readable, empty output
        put_text(out, staging, INDEX, json.dumps({'version': 2, 'shards': []}))
        return
    if not is_remote(out):
        with contextlib.suppress(FileNotFoundError):  # merge_index will not overwrite it
            os.remove(os.path.join(out, INDEX))
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # merge_index warns about its temporary folder on every call
    try:
        merge_index([join(out, p.name, INDEX) for p in plan.parts],
                    (os.path.join(staging, 'merged'), out) if is_remote(out) else out,
                    keep_local=not is_remote(out))
    except Exception as err:
        raise UserError(f'merging the index at {out} failed: {first_line(err)}') from None
    finally:
        logging.disable(previous)


def summarize(args: argparse.Namespace, plan: Plan, speed: dict[str, float], world: int) -> dict:
    """Totals over every part (this run's and earlier runs'), read from the parts' markers."""
    markers = done_markers(plan.places.out, plan.parts, args.download_timeout)
    total = new_counts()
    for m in markers.values():
        for key in ('written', 'skipped', 'cut_off', 'empty', 'tokens'):
            total[key] += m[key]
        for name, n in m['rules'].items():
            total['rules'][name] += n
    skipped = total.pop('skipped')
    return {'input': plan.places.src, 'output': plan.places.out,
            'input_samples': plan.settings['input_samples'], **total, 'skipped': len(skipped),
            'skipped_samples': skipped, 'parts': len(plan.parts),
            'parts_before': len(plan.parts) - len(plan.pending),
            'parts_this_run': len(markers) - (len(plan.parts) - len(plan.pending)),
            'parts_missing': [p.name for p in plan.parts if p.name not in markers], 'world_size': world,
            'rank0': speed, 'settings': plan.settings, 'interrupted': None}


def report(summary: dict, path: str) -> None:
    """The summary as JSON at `path`, and on one screen."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(summary, f, indent=2)
    s, speed = summary, summary['rank0']
    lines = [f'input    {s["input"]}: {s["input_samples"]} samples',
             f'output   {s["output"]}: {s["written"]} captions in {s["settings"]["caption_key"]}, '
             f'{s["skipped"]} images skipped',
             f'captions {s["tokens"]} tokens generated ({s["tokens"] / max(s["written"], 1):.1f} per '
             f'caption); {s["cut_off"]} cut off at --max_new_tokens {s["settings"]["max_new_tokens"]}, '
             f'{s["empty"]} empty',
             'rules    ' + (', '.join(f'{name} {n}' for name, n in s['rules'].items() if name in
                                      s['settings']['rules']) or 'none') + ' (captions changed)',
             f'parts    {s["parts_before"] + s["parts_this_run"]} of {s["parts"]} done ({s["parts_this_run"]} this '
             f'run, {s["parts_before"]} before), world size {s["world_size"]}',
             f'speed    rank 0: {speed["images"]} images in {speed["seconds"]:.1f} s, '
             f'{speed["images_per_s"]:.2f} images/s, {speed["tokens_per_s"]:.1f} tokens/s']
    lines += [f'skipped  sample {k["id"]} key={k["key"]!r}: {k["reason"]}' for k in s['skipped_samples'][:10]]
    if s['skipped'] > 10:
        lines.append(f'... and {s["skipped"] - 10} more skipped (see the JSON)')
    if s['interrupted']:
        lines.append(f'stopped by {s["interrupted"]}: {len(s["parts_missing"])} parts left, no index.json '
                     'yet; rerun the same command to resume')
    if s.get('preview'):
        lines.append(f'preview  {s["preview"]["path"]}')
    lines.append(f'summary  {path}')
    print('\n'.join(lines), flush=True)


def write_record(plan: Plan, summary: dict, staging: str) -> None:
    """RECORD beside index.json: how the captions were made (model, prompt, generation, rules), counts."""
    rules = [{'name': r.__name__, 'rule': r.__doc__, 'captions_changed': summary['rules'][r.__name__]}
             for r in RULES if r.__name__ in plan.settings['rules']]
    key = plan.settings['caption_key']
    counts = {k: summary[k] for k in ('input_samples', 'written', 'skipped', 'cut_off', 'empty', 'tokens')}
    record = {'settings': plan.settings, 'rules': rules, 'counts': counts,
              'columns': {k: plan.columns[k] for k in (key, RAW.format(key=key)) if k in plan.columns}}
    put_text(plan.places.out, staging, RECORD, json.dumps(record, indent=1))


PREVIEW_TILE, PREVIEW_TEXT_WIDTH, PREVIEW_LINES = 160, 520, 5  # px, px, lines of text per caption


def wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int, lines: int) -> list[str]:
    """`text` in at most `lines` lines of at most `width` px ('...' where it is cut)."""
    out, line = [], ''
    for word in text.split():
        if draw.textlength(f'{line} {word}'.strip(), font=font) > width and line:
            out.append(line)
            line = word
        else:
            line = f'{line} {word}'.strip()
    out.append(line)
    return out[:lines - 1] + [out[lines - 1] + ' ...'] if len(out) > lines else out


def write_preview(args: argparse.Namespace, out_root: str, path: str) -> list[int]:
    """A PNG of --preview images spread over the output, each beside its alt-text and new caption."""
    from streaming import StreamingDataset

    with tempfile.TemporaryDirectory() as cache:
        where = {'remote': out_root, 'local': cache} if is_remote(out_root) else {'local': out_root}
        ds = StreamingDataset(**where, shuffle=False, batch_size=1)
        n = min(args.preview, ds.num_samples)
        ids = sorted({round(i * (ds.num_samples - 1) / max(n - 1, 1)) for i in range(n)})
        samples = [ds[i] for i in ids]
        del ds
    font = ImageFont.load_default()
    row_h = max(PREVIEW_TILE, 14 * (2 * PREVIEW_LINES + 2)) + 8
    sheet = Image.new('RGB', (PREVIEW_TILE + PREVIEW_TEXT_WIDTH + 24, 8 + row_h * len(samples) + 14), 'white')
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 4), f'{args.model_name}: {args.prompt}'[:110], fill='black', font=font)
    for row, sample in enumerate(samples):
        top = 22 + row * row_h
        img = decode(sample[IMAGE_COLUMN])
        img.thumbnail((PREVIEW_TILE, PREVIEW_TILE))
        sheet.paste(img, (8, top))
        lines = ['alt-text: ' + ' / '.join(wrap(str(sample.get(CAPTION_COLUMN, '')), draw, font,
                                                PREVIEW_TEXT_WIDTH, 2)),
                 f'{args.caption_key}:', *wrap(sample[args.caption_key], draw, font, PREVIEW_TEXT_WIDTH,
                                              PREVIEW_LINES)]
        for i, line in enumerate(lines):
            draw.text((PREVIEW_TILE + 16, top + 14 * i), line, fill='black', font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return ids


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


def share_plan(args: argparse.Namespace, pl: Places, runtime: dict[str, str], rank: int) -> Plan:
    """Rank 0 makes the plan (or meets the error) and every rank receives the same."""
    import torch.distributed as dist

    result: list[Any] = [None]
    if rank == 0:
        try:
            result[0] = make_plan(args, pl, runtime)
        except UserError as err:
            result[0] = err
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], UserError):
        raise result[0]
    return result[0]


def summary_path(args: argparse.Namespace) -> str:
    return args.summary or os.path.join(args.local, f'captions_summary_{args.bucket or "dataset"}.json')


def finish(args: argparse.Namespace, plan: Plan, speed: dict[str, float], world: int) -> None:
    """Rank 0 after every rank is done: the index, the record, the summary, the preview."""
    staging = os.path.join(plan.places.staging, 'merge')
    os.makedirs(staging, exist_ok=True)
    summary = summarize(args, plan, speed, world)
    if summary['parts_missing']:
        report(summary, summary_path(args))
        raise UserError(f'parts {", ".join(summary["parts_missing"])} have no _done marker; rerun the same '
                        'command')
    merge_parts(plan, staging)
    write_record(plan, summary, staging)
    if args.preview:
        path = args.preview_path or os.path.splitext(summary_path(args))[0] + '_preview.png'
        summary['preview'] = {'path': path, 'samples': write_preview(args, plan.places.out, path)}
    report(summary, summary_path(args))
    shutil.rmtree(plan.places.staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # a bad flag ends here, with argparse's message and exit code 2
    pl = places(args)
    try:
        check_places(pl)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(2)
    import torch.distributed as dist
    import transformers

    transformers.logging.set_verbosity_error()  # generate()'s advice on unused settings, per batch
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    stop_on_signals()
    plan = None
    try:
        if world > 1:
            dist.init_process_group('gloo', timeout=timedelta(seconds=args.dist_timeout))
        device = pick_device(args)
        runtime = pick_runtime(args, device.type)
        plan = share_plan(args, pl, runtime, rank)
        engine = ENGINES[args.engine]
        speed = caption_parts(args, plan, engine, engine.load(args, device, runtime), rank, world)
        if world > 1:
            dist.barrier()
        if rank == 0:
            finish(args, plan, speed, world)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as stop:
        if rank == 0 and plan is not None:
            with contextlib.suppress(Exception):  # an unreachable output must not hide the interruption
                idle = {'images': 0, 'tokens': 0, 'seconds': 0.0, 'images_per_s': 0.0, 'tokens_per_s': 0.0}
                report({**summarize(args, plan, idle, world), 'interrupted': str(stop)}, summary_path(args))
        print(f'error: stopped by {stop}: finished parts are kept, the part in progress is not; rerun the '
              'same command to resume', file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
