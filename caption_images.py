"""Write dense synthetic captions of every image of an MDS dataset with a vision-language model, once.

Reads one bucket of what laion_cloudwriter.py wrote, asks a vision-language model to describe each image
(one caption column per prompt), cleans the text with a table of rules and stores it beside the alt-text,
so that training can pick a caption per sample and precompute_latents.py can encode them. Two engines
(`ENGINES`): `transformers` runs an image-text-to-text model (LLaVA-1.5/NeXT, Qwen2-VL / Qwen2.5-VL,
SmolVLM / Idefics3: any that loads with AutoProcessor and AutoModelForImageTextToText) in this process;
`openai` sends each image to OpenAI-compatible servers (`vllm serve`, SGLang, TGI, llama.cpp,
`transformers serve`, a hosted API) with `--concurrency` requests in flight. The full manual is
docs/caption_images.md.

Examples (one GPU; `torchrun --nproc_per_node 8 -- caption_images.py ...` for eight):

    python caption_images.py --remote_download s3://my-bucket/laion/mds --bucket 3 \\
        --local /tmp/caption-cache --remote_upload s3://my-bucket/laion/captioned \\
        --model_name Qwen/Qwen2-VL-2B-Instruct --batch-size 32
    python caption_images.py ... --engine openai --endpoint http://127.0.0.1:8000/v1 --concurrency 128 \\
        --prompt short='Describe this image in one sentence.' --prompt long='Describe this image in detail.'

Reads `<remote_download>/<bucket name>[/<subfolder>]`, or `<local>/<bucket name>` in place without
`--remote_download`: MDS shards with a `jpg` column; and the model (hub name or folder), or its servers.

Writes `<remote_upload>/<bucket name>[/<subfolder>]`: every input column unchanged plus a str column per
prompt (`--prompt KEY=TEXT`; `--caption_key` names the column of a `--prompt TEXT`; with `--keep_raw` also
`<key>_raw`, the text before the rules), and `captions.json` beside index.json (model, prompts, decoding
settings, rules, counts, token usage, endpoints without credentials). Ends with a summary, printed and
written as JSON (`--summary`); `--preview N` adds a PNG.

Resume: the work is split into parts of whole input shards; each finished part gets a `_done` marker
with the settings that shape its text. Rerun the same command, with any number of processes, to skip
finished parts; other settings or another input are refused. Rank 0 merges index.json at the end.

Exit codes: 0 done (undecodable images, and images a server refuses with a 4xx, are skipped: each named
in its part's `_done` marker, counted by reason in the summary); 2 one `error:` line (a flag, the model,
the places, a rerun's other settings, parts left unfinished: a request that failed after its retries,
named in the part's `_failed`, or endpoints that stopped answering);
128 + the signal after SIGTERM (143) or Ctrl-C (130): finished parts are kept.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import ctypes
import dataclasses
import email.utils
import hashlib
import io
import json
import os
import random
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

# Bucket edges on the shorter image side, as laion_cloudwriter.py buckets them: `--bucket 3` is '256-512'.
BUCKET_EDGES = (0, 64, 128, 256, 512, 768, 1024, 2**20)
BUCKET_NAMES = tuple(f'{lo}-{hi}' for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:]))
IMAGE_COLUMN, CAPTION_COLUMN = 'jpg', 'caption'  # the cloudwriter's image bytes and alt-text
RAW = '{key}_raw'  # --keep_raw: the decoded text before the rules
INDEX = 'index.json'
DONE_MARKER = '_done'  # per part; not *.json, so no reader takes it for an index
FAILED = '_failed'  # instead of DONE_MARKER in a part left unfinished: its images that failed, named
NAMED = ('skipped', 'noted', 'failed')  # the images a part names (sample id, key, why): see twin named
STAGING = '.staging-captions'  # below --local: output files on their way to a remote
RECORD = 'captions.json'  # beside index.json: how the captions were made, and the counts
DEFAULT_PROMPT = ('Describe this image in detail in one paragraph: the main subjects, what they look like '
                  'and do, the setting, the colours and lighting, and any text that is visible.')
DEFAULT_MODEL = 'Qwen/Qwen2-VL-2B-Instruct'  # --engine transformers without --model_name
# --engine openai: a request is retried after BACKOFF[0] s, doubling up to BACKOFF[1] s (times 0.5..1, so that
# processes that failed together do not retry together), or after the Retry-After a server asks for (at most
# MAX_RETRY_AFTER s); an endpoint that did not answer (refused or timed-out connection) sits out DOWN_SECONDS.
BACKOFF, MAX_RETRY_AFTER, DOWN_SECONDS = (0.5, 30.0), 600.0, 30.0


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
    sentences, kept = SENTENCE_END.split(text.strip()), {}
    for s in sentences:
        kept.setdefault(' '.join(s.lower().split()), s)
    return text if len(kept) == len(sentences) else ' '.join(kept.values())


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
        if value != value:  # NaN: every comparison is false, so it would pass any bound unseen
            raise argparse.ArgumentTypeError(f'{text!r} is not a number')
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


def prompt(text: str) -> tuple[str | None, str]:
    """`--prompt KEY=TEXT` (the caption column KEY) or `--prompt TEXT` (the column --caption_key)."""
    key, sep, rest = text.partition('=')
    if sep and re.fullmatch(r'\w+', key):
        if not rest.strip():
            raise argparse.ArgumentTypeError(f'{text}: the prompt of {key} is empty')
        return key, rest
    return None, text


def endpoint(text: str) -> str:
    if urllib.parse.urlsplit(text).scheme not in ('http', 'https'):
        raise argparse.ArgumentTypeError(f'{redact(text)}: an endpoint is the http(s) URL of an API, such as '
                                         'http://127.0.0.1:8000/v1')
    return text.rstrip('/')


def upload(text: str) -> str:
    if text != 'png' and not re.fullmatch(r'jpeg:([1-9]\d?|100)', text):
        raise argparse.ArgumentTypeError(f'{text}: png (lossless) or jpeg:QUALITY (1-100), such as jpeg:90')
    return text


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
    p.add_argument('--engine', choices=('transformers', 'openai'), default='transformers',
                   help='transformers: the model in this process; openai: OpenAI-compatible servers')
    p.add_argument('--model_name', default='',
                   help=f'transformers: a hub name or folder (empty: {DEFAULT_MODEL}); openai: the served '
                        'name (empty: the one the endpoint lists at /models)')
    p.add_argument('--prompt', type=prompt, action='append', metavar='[KEY=]TEXT', default=argparse.SUPPRESS,
                   help='the user turn beside the image; KEY=TEXT, repeated: a caption column per KEY '
                        '(default: DEFAULT_PROMPT, a detailed paragraph, in --caption_key)')
    p.add_argument('--caption_key', default='vlm_caption', help='the column of a --prompt without KEY=')
    p.add_argument('--keep_raw', action='store_true',
                   help='also store <key>_raw per caption column: the decoded text before the rules')
    p.add_argument('--rules', nargs='*', choices=RULE_NAMES, default=list(RULE_NAMES),
                   help='post-processing rules to apply, in table order; none: store the decoded text')
    p.add_argument('--max_new_tokens', type=at_least(1), default=256, help='generated tokens per caption')
    p.add_argument('--decoding', choices=('greedy', 'sample'), default='greedy',
                   help='greedy: a rerun writes the same text; sample: seeded by --seed and the sample id')
    p.add_argument('--temperature', type=at_least(1e-6, float), default=0.7, help='--decoding sample')
    p.add_argument('--top_p', type=at_least(1e-6, float), default=0.9, help='--decoding sample')
    p.add_argument('--seed', type=at_least(0), default=0, help='--decoding sample: seed of each sample')
    p.add_argument('--batch-size', dest='batch_size', type=at_least(1), default=16,
                   help='images per generate call (transformers, left-padded) or per read (openai)')
    p.add_argument('--device', choices=('auto', 'cuda', 'cpu'), default='auto',
                   help='transformers: auto is cuda:<LOCAL_RANK> when available')
    p.add_argument('--dtype', choices=('auto', 'float32', 'float16', 'bfloat16'), default='auto',
                   help='transformers: auto is the device row of RUNTIMES')
    p.add_argument('--attention', choices=('auto', 'flash_attention_2', 'sdpa', 'eager'), default='auto',
                   help='transformers: auto is the first installed of the device row of RUNTIMES')
    p.add_argument('--endpoint', type=endpoint, nargs='+', default=[],
                   help='openai: API base URLs, e.g. http://HOST:8000/v1 (one per vllm serve)')
    p.add_argument('--api_key_env', default='OPENAI_API_KEY',
                   help='openai: the variable holding the API key (never printed or written)')
    p.add_argument('--concurrency', type=at_least(1), default=64, help='openai: requests in flight per rank')
    p.add_argument('--retries', type=at_least(0), default=6, help='openai: retries of a request (BACKOFF)')
    p.add_argument('--request_timeout', type=at_least(1, float), default=600, help='openai: s per request')
    p.add_argument('--upload', type=upload, default='png',
                   help='openai: png, the decoded pixels, lossless; jpeg:QUALITY, smaller (hosted APIs)')
    p.add_argument('--upload_side', type=at_least(0), default=0, help='openai: longest side sent (0: as is)')
    p.add_argument('--price', type=at_least(0, float), nargs=2, metavar=('INPUT', 'OUTPUT'),
                   help='USD per million input and output tokens: the summary states the cost')
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
    args = p.parse_args(argv)
    # one caption column per key; a later --prompt for a key replaces an earlier one, as for any flag
    pairs = vars(args).pop('prompt', [(None, DEFAULT_PROMPT)])
    args.prompts = {key or args.caption_key: text for key, text in pairs}
    # the places every rank and the final report use, derived once
    default = f'captions_summary_{args.bucket or "dataset"}.json'
    args.summary = args.summary or os.path.join(args.local, default)
    args.preview_path = args.preview_path or os.path.splitext(args.summary)[0] + '_preview.png'
    if args.engine == 'openai' and not args.endpoint:
        p.error('--engine openai needs --endpoint URL [URL ...]')
    return args


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
    """What rank 0 found; each rank receives it with only its own share of the work."""

    places: Places
    shards: list[dict] | dict[int, dict]  # the input's shard records by number (a rank: its parts' only)
    columns: dict[str, str]
    parts: list[Part]  # every part (rank 0 only)
    pending: list[Part]  # the parts without a _done marker (a rank: its share, every world-th)
    finished: int  # the parts with one before this run
    settings: dict


def read_input(pl: Places, new_columns: list[str], timeout: float) -> tuple[list[dict], dict[str, str]]:
    """The input's shard list and {column: MDS encoding}, checked (a copy of the index goes to the cache)."""
    url, local = join(pl.src, INDEX), os.path.join(pl.cache, INDEX)
    os.makedirs(pl.cache, exist_ok=True)
    try:
        if url != local:
            fetch(url, local, timeout)
        with open(local) as f:
            shards = json.load(f, object_hook=shared_lists())['shards']
    except Exception as err:  # unreachable remote, missing dataset, corrupt index
        raise UserError(f'cannot read the input dataset index {url}: {first_line(err)}') from None
    columns = dict(zip(shards[0]['column_names'], shards[0]['column_encodings'])) if shards else {}
    if any(s.get('format') != 'mds' or dict(zip(s['column_names'], s['column_encodings'])) != columns
           for s in shards):
        raise UserError(f'{url}: the shards must all be MDS with the same columns')
    if shards and IMAGE_COLUMN not in columns:
        raise UserError(f'{url}: the input has no `{IMAGE_COLUMN}` column (columns: {", ".join(columns)})')
    if taken := [c for c in new_columns if c in columns]:
        raise UserError(f'{url} already has a column {taken[0]}: pass another --caption_key (or KEY=)')
    return shards, columns


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


def make_plan(args: argparse.Namespace, pl: Places, engine_settings: dict) -> Plan:
    """Rank 0: check the input and the output, and list the parts still to do."""
    new = [c for key in args.prompts for c in (key, RAW.format(key=key))[:1 + args.keep_raw]]
    shards, columns = read_input(pl, new, args.download_timeout)
    columns.update(dict.fromkeys(new, 'str'))
    parts = plan_parts(shards, args.part_size)
    settings = {'engine': args.engine, **engine_settings, 'prompts': args.prompts, 'keep_raw': args.keep_raw,
                'rules': args.rules, 'max_new_tokens': args.max_new_tokens, 'part_size': args.part_size,
                'input_samples': parts[-1].last if parts else 0, 'input_index': index_digest(shards)[:16]}
    names = set(output_names(pl.out))
    if names and RECORD not in names and not any(n.endswith(f'/{DONE_MARKER}') for n in names):
        raise UserError(f'--remote_upload {pl.out} holds files this script did not write '
                        f'({sorted(names)[0]}, ...): pass a new or empty --remote_upload')
    done = set()
    for name, marker in done_markers(pl.out, [p for p in parts if f'{p.name}/{DONE_MARKER}' in names],
                                     args.download_timeout):
        old = marker['settings']
        for key in sorted(set(old) | set(settings)):
            if old.get(key) != settings.get(key):
                raise UserError(f'{pl.out}/{name} was written with {key}={str(old.get(key))[:60]!r}, '
                                f'this run has {str(settings.get(key))[:60]!r}: rerun with the same flags '
                                'or write to a new --remote_upload')
        done.add(name)
    os.makedirs(pl.staging, exist_ok=True)
    put_text(pl.out, pl.staging, RECORD, json.dumps({'settings': settings}, indent=1))  # the output is ours
    return Plan(pl, shards, columns, parts, [p for p in parts if p.name not in done], len(done), settings)


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
# Reading: a part's shards, its images decoded once, in batches that never cross a part
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


@dataclasses.dataclass
class Batch:
    part: Part
    ids: list[int]
    samples: list[dict]
    images: list[Image.Image]
    skipped: list[dict]
    noted: list[dict]  # decoded, with what PIL warned or libtiff said
    last: bool  # the part's last batch


def batches(reader: ShardReader, parts: list[Part], size: int) -> Iterator[Batch]:
    """Every part's decodable images in batches of `size` (undecodable ones skipped, named; what PIL or
    libtiff said of one named, never printed)."""
    for part in parts:
        batch = Batch(part, [], [], [], [], [], False)
        for sample_id, sample in reader.samples(part):
            name, notes = {'id': sample_id, 'key': str(sample.get('key', ''))}, []
            try:
                batch.images.append(decode(sample[IMAGE_COLUMN], notes))
            except Exception as err:  # PIL raises many types for bad bytes: every one is a skip
                reason = ('not an image format PIL can read' if isinstance(err, UnidentifiedImageError)
                          else f'{type(err).__name__}: {first_line(err)}')
                batch.skipped.append({**name, 'reason': '; '.join([reason, *notes])})
                continue
            if notes:
                batch.noted.append({**name, 'notes': notes})
            batch.ids.append(sample_id)
            batch.samples.append(sample)
            if len(batch.ids) == size:
                yield batch
                batch = Batch(part, [], [], [], [], [], False)
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
# Captioning: a row of ENGINES per engine; each turns a stream of batches into replies, in order
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reply:
    """One caption as an engine returns it."""

    text: str  # decoded, before the rules
    tokens: int | None  # generated tokens (None: the server did not say)
    prompt_tokens: int | None  # tokens of the prompt with the image
    cut: bool  # stopped at --max_new_tokens


@dataclasses.dataclass(frozen=True)
class Lost:
    """An image without captions: refused by the server (a skip), or failed after every retry (its part
    is left unfinished for a rerun)."""

    reason: str
    refused: bool


class EndpointsDown(Exception):
    """No endpoint answers: the run stops, its unfinished parts are left for a rerun."""


def sample_seed(seed: int, sample_id: int) -> int:
    """The seed of a sample's captions under --decoding sample: the same in any batch, run or engine."""
    return int(hashlib.sha1(f'{seed}/{sample_id}'.encode()).hexdigest()[:15], 16)


# device: (dtype, attention in order of preference: the first that is installed is used)
RUNTIMES = {'cuda': ('bfloat16', ('flash_attention_2', 'sdpa')), 'cpu': ('float32', ('sdpa',))}
ATTENTION_INSTALLED = {'flash_attention_2': 'is_flash_attn_2_available', 'sdpa': 'is_torch_sdpa_available'}


def decoding_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The generate() arguments besides max_new_tokens: greedy, or sampling with its settings and seed."""
    if args.decoding == 'greedy':
        return {'do_sample': False, 'num_beams': 1}
    # top_k 0: nucleus sampling alone, whatever top_k the model's generation_config sets (Qwen2-VL's 1)
    return {'do_sample': True, 'temperature': args.temperature, 'top_p': args.top_p, 'top_k': 0,
            'seed': args.seed}


def transformers_settings(args: argparse.Namespace) -> dict:
    """What shapes a transformers caption: model, decoding, batch (padding), dtype, attention (the flags, or
    for 'auto' the device's row of RUNTIMES)."""
    import transformers.utils

    dtype, preferred = RUNTIMES[pick_device(args).type]
    available = [a for a in preferred if getattr(transformers.utils, ATTENTION_INSTALLED[a])()]
    return {'model_name': args.model_name or DEFAULT_MODEL, **decoding_settings(args),
            'batch_size': args.batch_size, 'dtype': dtype if args.dtype == 'auto' else args.dtype,
            'attention': args.attention if args.attention != 'auto' else (available or ['eager'])[0]}


@dataclasses.dataclass
class HFModel:
    """A transformers model, its processor, and the token ids that end a caption."""

    model: Any
    processor: Any
    prompts: dict[str, str]  # caption key -> the chat template applied to its prompt
    stop_ids: set[int]
    about: dict  # for the markers: where it ran


def not_a_vlm(model_name: str) -> str | None:
    """What a local --model_name folder is, when it cannot be an image-text-to-text model (None: it may be
    one, or it is a hub name: loading tells)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if not os.path.isdir(model_name):  # a hub name is org/name; a path to nothing is neither
        return 'is no folder, nor a hub name (org/name)' if model_name.count('/') > 1 or \
            model_name.startswith(('/', '.', '~')) else None
    if pipeline := [name for name in ('model_index.json', 'unet/config.json', 'transformer/config.json',
                                      'vae/config.json', 'text_encoder/config.json')
                    if os.path.exists(os.path.join(model_name, name))]:
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


def load_transformers(args: argparse.Namespace, settings: dict) -> HFModel:
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    transformers.logging.set_verbosity_error()  # generate()'s advice on unused settings, per batch
    name, device = settings['model_name'], pick_device(args)
    if what := not_a_vlm(name):
        raise UserError(f'--model_name {name} {what}: pass an image-text-to-text model (a hub name such as '
                        f'{DEFAULT_MODEL}, or a folder with its config.json and processor)')
    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(
            name, torch_dtype=getattr(torch, settings['dtype']),
            attn_implementation=settings['attention']).to(device).eval()
    except Exception as err:
        why = first_line(err).split('. ')[0]  # transformers may go on with a list of every model type
        hint = 'pass --attention eager' if 'attention' in why.lower() else 'check the name'
        raise UserError(f'cannot load {name} with AutoProcessor and AutoModelForImageTextToText '
                        f'({why}); {hint}') from None
    tokenizer = processor.tokenizer
    tokenizer.padding_side = 'left'  # generation continues every row from its last prompt token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        prompts = {key: processor.apply_chat_template([{'role': 'user', 'content': [
            {'type': 'image'}, {'type': 'text', 'text': text}]}], add_generation_prompt=True)
            for key, text in args.prompts.items()}
    except Exception as err:
        raise UserError(f'{name}: its processor has no usable chat template ({first_line(err)})') from None
    eos = model.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), tokenizer.pad_token_id} - {None}
    return HFModel(model, processor, prompts, stops, {'device': str(device)})


def generate_transformers(m: HFModel, images: list[Image.Image], ids: list[int],
                          args: argparse.Namespace) -> list[dict[str, Reply]]:
    """{caption key: Reply} per image. Greedy: one left-padded batch per prompt; sampling: one image at a
    time after seeding with (--seed, its sample id), so a caption depends on its image and seed alone."""
    import torch

    kwargs = {k: v for k, v in decoding_settings(args).items() if k != 'seed'}
    rows = [range(len(images))] if args.decoding == 'greedy' else [[i] for i in range(len(images))]
    replies: list[dict[str, Reply]] = [{} for _ in images]
    for key, prompt in m.prompts.items():
        for group in rows:
            if args.decoding == 'sample':
                torch.manual_seed(sample_seed(args.seed, ids[group[0]]))
            # floating tensors (pixels) in the model's dtype
            inputs = m.processor(images=[images[i] for i in group], text=[prompt] * len(group), padding=True,
                                 return_tensors='pt').to(m.model.device, m.model.dtype)
            with torch.inference_mode():
                out = m.model.generate(**inputs, max_new_tokens=args.max_new_tokens, **kwargs)
            prompt_tokens = inputs['attention_mask'].sum(1).tolist()
            for i, row, n_in in zip(group, out[:, inputs['input_ids'].shape[1]:].tolist(), prompt_tokens):
                end = next((j for j, t in enumerate(row) if t in m.stop_ids), None)
                replies[i][key] = Reply(m.processor.decode(row[:end], skip_special_tokens=True),
                                        len(row) if end is None else end + 1, n_in,
                                        end is None and len(row) >= args.max_new_tokens)
    return replies


def caption_transformers(m: HFModel, stream: Iterator[Batch], args: argparse.Namespace):
    for batch in stream:
        yield batch, generate_transformers(m, batch.images, batch.ids, args) if batch.ids else []


def redact(url: str) -> str:
    """`url` as records and messages show it: without user:password@ and without a ?query."""
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((u.scheme, u.netloc.rpartition('@')[2], u.path, '', ''))


def retry_after(value: str | None) -> float | None:
    """The seconds a Retry-After header asks for (a number or an HTTP date), at most MAX_RETRY_AFTER."""
    with contextlib.suppress(TypeError, ValueError):  # none, or none that can be read
        seconds = float(value) if re.fullmatch(r'[\d.]+', value) else \
            email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        return min(max(seconds, 0.0), MAX_RETRY_AFTER)
    return None


def data_url(img: Image.Image, args: argparse.Namespace) -> str:
    """The picture a server receives: by default a lossless PNG of exactly the decoded image."""
    if args.upload_side and max(img.size) > args.upload_side:
        img = img.copy()
        img.thumbnail((args.upload_side, args.upload_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if args.upload == 'png':
        img.save(buf, 'PNG', compress_level=0)  # stored, not deflated: the same pixels at a third of the CPU
    else:
        img.save(buf, 'JPEG', quality=int(args.upload[5:]))
    return f'data:image/{args.upload[:4]};base64,{base64.b64encode(buf.getvalue()).decode()}'


class Client:
    """The run's OpenAI-compatible endpoints behind one httpx client (thread-safe, keep-alive): a request
    goes to the endpoint with the fewest in flight among those answering, and is retried (BACKOFF)."""

    def __init__(self, args: argparse.Namespace, settings: dict):
        import httpx

        key = os.environ.get(args.api_key_env, '')
        self.secrets = [s for s in (key, *(urllib.parse.urlsplit(u).password for u in args.endpoint)) if s]
        self.http = httpx.Client(
            headers={'Authorization': f'Bearer {key}'} if key else None,
            timeout=httpx.Timeout(args.request_timeout, connect=min(10.0, args.request_timeout)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=args.concurrency))
        self.args, self.settings, self.lock, self.stopped = args, settings, threading.Lock(), False
        self.busy = dict.fromkeys(args.endpoint, 0)  # requests in flight per endpoint
        self.down = dict.fromkeys(args.endpoint, 0.0)  # out of the rotation until then
        self.about = {'endpoints': [redact(u) for u in args.endpoint], 'served_model': None}

    def scrub(self, text: str) -> str:
        """A server's message or an error without the API key or an endpoint's password in it."""
        for secret in self.secrets:
            text = text.replace(secret, '***')
        return text

    def refuse(self, url: str, status: int, text: str) -> None:
        """401, 403, 404 say the same for every image: the key, or the URL or model, is wrong."""
        if status in (401, 403, 404):
            what = (f'refused the API key in ${self.args.api_key_env}' if status != 404 else
                    'knows no such path or model: check --endpoint (the API base, e.g. http://HOST:8000/v1) '
                    'and --model_name')
            raise UserError(f'{redact(url)} {what} (HTTP {status}: {self.scrub(text)[:200]})')

    def listed_model(self) -> str:
        """The one model that the first endpoint to answer lists at /models."""
        import httpx

        why = ''
        for url in self.down:
            try:
                r = self.http.get(f'{url}/models')
                self.refuse(url, r.status_code, r.text)
                names = [m['id'] for m in r.json()['data']]
            except (httpx.RequestError, ValueError, LookupError, TypeError) as err:
                why = f'{redact(url)}: {self.scrub(first_line(err))}'
                continue
            if len(names) == 1:
                return names[0]
            raise UserError(f'{redact(url)}/models lists {len(names)} models ({", ".join(names[:3])}, '
                            '...): pass --model_name')
        raise UserError(f'no endpoint answered GET /models ({why}): start the server, or pass --model_name')

    def pick(self) -> str:
        """The answering endpoint with the fewest requests in flight (none answering: the first back)."""
        with self.lock:
            now = time.time()
            url = min(self.down, key=lambda u: (self.down[u] > now, max(self.down[u], now), self.busy[u]))
            self.busy[url] += 1
            return url

    def answering(self) -> bool:
        return any(t <= time.time() for t in self.down.values())

    def post(self, body: dict) -> Reply | Lost:
        """One chat completion, retried after a connection error, a timeout, a cut answer, 5xx or 429."""
        import httpx

        tries, why = 0, ''
        while not self.stopped:
            url, wait = self.pick(), None
            try:
                with self.http.stream('POST', f'{url}/chat/completions', json=body) as r:
                    if r.status_code == 200:
                        return self.reply(r)
                    text = r.read().decode(errors='replace')
                    self.refuse(url, r.status_code, text)
                    why = f'HTTP {r.status_code} from {redact(url)}: {self.scrub(text)[:200]}'
                    if r.status_code < 500 and r.status_code not in (408, 429):
                        return Lost(why, refused=True)  # the image's own: too large, content policy, ...
                    wait = retry_after(r.headers.get('retry-after'))
            except (httpx.RequestError, ValueError) as err:  # no answer, or one cut short or malformed
                why = f'{type(err).__name__} from {redact(url)}: {self.scrub(first_line(err))}'
                if isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout)):
                    with self.lock:
                        self.down[url] = time.time() + DOWN_SECONDS
                    if self.answering():
                        continue  # the others take its requests, at once
            finally:
                with self.lock:
                    self.busy[url] -= 1
            tries += 1
            if tries > self.args.retries:
                break
            time.sleep(wait if wait is not None else
                       min(BACKOFF[1], BACKOFF[0] * 2 ** (tries - 1)) * random.uniform(0.5, 1))
        if not self.answering():
            raise EndpointsDown(why)
        return Lost(f'{why} (after {tries - 1} retries)', refused=False)

    def reply(self, r) -> Reply:
        """The caption of a 200 answer, whole (JSON) or streamed (server-sent events)."""
        lines = r.iter_lines() if r.headers.get('content-type', '').startswith('text/event-stream') else None
        events = [json.loads(ln[5:]) for ln in lines if ln[:5] == 'data:' and ln[5:].strip() != '[DONE]'] \
            if lines else [json.loads(r.read())]
        if errors := [e['error'] for e in events if 'error' in e]:
            raise ValueError(f'the answer holds an error: {str(errors[0])[:200]}')
        choices = [c for e in events for c in e.get('choices') or ()]
        finish = [c['finish_reason'] for c in choices if c.get('finish_reason')]
        if not finish:
            raise ValueError('the answer ended before its finish_reason')
        usage = next((e['usage'] for e in events[::-1] if e.get('usage')), {})
        self.about['served_model'] = next((e['model'] for e in events if e.get('model')), None)
        text = ''.join((c.get('message') or c.get('delta') or {}).get('content') or '' for c in choices)
        return Reply(text, usage.get('completion_tokens'), usage.get('prompt_tokens'), finish[-1] == 'length')

    def caption(self, img: Image.Image, sample_id: int) -> dict[str, Reply] | Lost:
        """Every prompt's caption of one image (encoded once), or why it has none."""
        s, image = self.settings, {'type': 'image_url', 'image_url': {'url': data_url(img, self.args)}}
        asked = {'model': s['model_name'], 'max_tokens': self.args.max_new_tokens,
                 **{k: s[k] for k in ('temperature', 'top_p') if k in s}}
        if 'seed' in s:
            asked['seed'] = sample_seed(s['seed'], sample_id)
        replies = {}
        for key, text in self.args.prompts.items():
            turn = {'role': 'user', 'content': [image, {'type': 'text', 'text': text}]}
            replies[key] = self.post({**asked, 'messages': [turn]})
            if isinstance(replies[key], Lost):
                return replies[key]
        return replies


def openai_settings(args: argparse.Namespace) -> dict:
    """What shapes a served caption: the model's name, the decoding (greedy: temperature 0; sampling: a
    seed per sample from --seed) and the picture sent."""
    decoding = ({'temperature': 0} if args.decoding == 'greedy' else
                {'temperature': args.temperature, 'top_p': args.top_p, 'seed': args.seed})
    return {'model_name': args.model_name or Client(args, {}).listed_model(), **decoding,
            'upload': args.upload, 'upload_side': args.upload_side}


def caption_openai(client: Client, stream: Iterator[Batch], args: argparse.Namespace):
    """Each batch's replies in order, while --concurrency requests are in flight across batches and parts:
    later images are sent while a slow caption holds up an earlier batch. At most 2 x --concurrency images
    wait to be sent or answered (decoded pictures), and 16 x --concurrency for an earlier one (samples)."""
    pool, waiting = ThreadPoolExecutor(args.concurrency), collections.deque()

    def full() -> bool:
        return sum(not f.done() for _, fs in waiting for f in fs) > 2 * args.concurrency or \
            sum(len(fs) for _, fs in waiting) > 16 * args.concurrency

    def oldest():
        batch, futures = waiting.popleft()
        return batch, [f.result() for f in futures]

    try:
        for batch in stream:
            waiting.append((batch, [pool.submit(client.caption, *a) for a in zip(batch.images, batch.ids)]))
            batch.images = []  # each request holds its picture until it is encoded
            while waiting and (all(f.done() for f in waiting[0][1]) or full()):
                yield oldest()
        while waiting:
            yield oldest()
    finally:
        client.stopped = True  # the workers' requests end with the connections
        pool.shutdown(wait=False, cancel_futures=True)
        client.http.close()


@dataclasses.dataclass(frozen=True)
class Engine:
    """A captioning engine: what shapes its text (asked once, on rank 0, for the plan), a load per process,
    then (batch, a {caption key: Reply} or Lost per image) for each batch of a stream, in order."""

    settings: Callable[[argparse.Namespace], dict]
    load: Callable[[argparse.Namespace, dict], Any]
    caption: Callable[[Any, Iterator[Batch], argparse.Namespace], Iterator[tuple[Batch, list]]]


ENGINES = {'transformers': Engine(transformers_settings, load_transformers, caption_transformers),
           'openai': Engine(openai_settings, Client, caption_openai)}


# ----------------------------------------------------------------------------------------------
# Writing: one MDSWriter per part, then its _done marker with the part's counts
# ----------------------------------------------------------------------------------------------

def new_counts(keys) -> dict[str, Any]:
    return {'written': 0, 'tokens': 0, 'prompt_tokens': 0, 'no_usage': 0, **{k: [] for k in NAMED},
            'captions': {k: {'cut_off': 0, 'empty': 0, 'rules': dict.fromkeys(RULE_NAMES, 0)} for k in keys}}


def add(total: dict, more: dict) -> dict:
    """`more`'s counts added into `total`: numbers summed, lists joined, dicts key by key."""
    for k, v in more.items():
        total[k] = v if k not in total else add(total[k], v) if isinstance(v, dict) else total[k] + v
    return total


def open_part(plan: Plan, part: Part, args: argparse.Namespace, staging: str):
    """The part's MDSWriter (to a remote output: through a folder in `staging`)."""
    out = join(plan.places.out, part.name)
    out = (os.path.join(staging, part.name), out) if is_remote(out) else out
    return mds_writer(plan.columns, out=out, compression=args.compression or None,
                      size_limit=args.size_limit, exist_ok=True)


def write_batch(writer, batch: Batch, replies: list, args: argparse.Namespace, counts: dict) -> None:
    """Each captioned sample with its columns after the rules, counted; a refused image is a skip, a failed
    one is named in counts['failed'] (its part gets no marker)."""
    rules = tuple(r for r in RULES if r.__name__ in args.rules)
    add(counts, {'skipped': batch.skipped, 'noted': batch.noted})
    for sample_id, sample, reply in zip(batch.ids, batch.samples, replies):
        if isinstance(reply, Lost):
            lost = {'id': sample_id, 'key': str(sample.get('key', '')), 'reason': reply.reason}
            counts['skipped' if reply.refused else 'failed'].append(lost)
            continue
        row = dict(sample)
        for key, r in reply.items():
            row[key], changed = clean(r.text, rules)
            if args.keep_raw:
                row[RAW.format(key=key)] = r.text
            add(counts, {'tokens': r.tokens or 0, 'prompt_tokens': r.prompt_tokens or 0,
                         'no_usage': r.tokens is None, 'captions': {key: {
                             'cut_off': r.cut, 'empty': not row[key], 'rules': dict.fromkeys(changed, 1)}}})
        writer.write(row)
        counts['written'] += 1


def close_part(writer, plan: Plan, part: Part, counts: dict[str, Any], staging: str, started: float,
               about: dict) -> None:
    """Finish the part's shards, then its marker: a part with a marker is whole. A part in which an image
    failed gets none, but FAILED naming those images."""
    try:
        writer.finish()
        if counts['failed']:
            put_text(plan.places.out, staging, f'{part.name}/{FAILED}', json.dumps(counts['failed']))
        else:
            marker = {'part': part.name, 'rank': int(os.environ.get('RANK', 0)), **counts,
                      'seconds': round(time.time() - started, 3), 'about': about, 'settings': plan.settings}
            put_text(plan.places.out, staging, f'{part.name}/{DONE_MARKER}', json.dumps(marker))
    except Exception as err:
        raise UserError(f'writing part {part.name} to {plan.places.out} failed ({first_line(err)}); rerun '
                        'the same command to resume') from None


def caption_parts(args: argparse.Namespace, plan: Plan, engine: Engine, model: Any, rank: int,
                  world: int) -> dict[str, Any]:
    """Caption this rank's share of the unfinished parts; returns its speed, the images that failed (counted
    and the first named: each is named in its part's FAILED), and why it stopped early (endpoints that
    stopped answering), if it did."""
    from tqdm import tqdm

    staging = os.path.join(plan.places.staging, f'rank{rank}')
    os.makedirs(staging, exist_ok=True)
    reader = ShardReader(plan, args, rank)
    bar = tqdm(total=sum(p.last - p.first for p in plan.pending), unit='img', disable=rank != 0,
               dynamic_ncols=True, desc=f'rank 0/{world} captions' if world > 1 else 'captions')
    start, images, tokens, failed, stopped = time.time(), 0, 0, named(), None
    writer = counts = None
    try:
        stream = prefetched(batches(reader, plan.pending, args.batch_size))
        for batch, replies in engine.caption(model, stream, args):
            if writer is None:
                writer, opened = open_part(plan, batch.part, args, staging), time.time()
                counts = new_counts(args.prompts)
            before = counts['written'], counts['tokens']
            write_batch(writer, batch, replies, args, counts)
            images, tokens = images + counts['written'] - before[0], tokens + counts['tokens'] - before[1]
            bar.update(len(batch.ids) + len(batch.skipped))
            bar.set_postfix_str(f'{tokens / max(time.time() - start, 1e-9):.1f} tok/s', refresh=False)
            if batch.last:
                close_part(writer, plan, batch.part, counts, staging, opened, model.about)
                add_named(failed, [{**f, 'part': batch.part.name} for f in counts['failed']])
                writer = None
    except EndpointsDown as err:
        stopped = f'every endpoint stopped answering (last: {err})'
    except UserError:
        raise
    except Exception as err:
        raise UserError(f'reading or captioning failed: {first_line(err)}; rerun the same command to '
                        'resume') from None
    finally:
        bar.close()
    return {'images': images, 'tokens': tokens, 'seconds': round(time.time() - start, 3), 'failed': failed,
            'stopped': stopped}


# ----------------------------------------------------------------------------------------------
# Merging, the record, the summary and the preview (rank 0)
# ----------------------------------------------------------------------------------------------

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


def summarize(args: argparse.Namespace, plan: Plan, ranks: list[dict], world: int) -> dict:
    """Totals over every part (this run's and earlier runs'), read from the parts' markers one at a time;
    the speed of this run over every rank, and the images that failed on any."""
    out, total, done, about = plan.places.out, new_counts(plan.settings['prompts']), set(), {}
    names = {k: named() for k in NAMED}
    for name, m in done_markers(out, plan.parts, args.download_timeout):
        for k in NAMED:
            add_named(names[k], m.pop(k, []))
        add(total, {k: m[k] for k in total if k in m})
        about[json.dumps(m['about'])] = m['about']
        done.add(name)
    for r in ranks:  # a part's failed images are in its FAILED, not a marker
        add(names['failed'], r['failed'])
    names['failed']['first'] = {k: sorted(v, key=lambda f: f['id'])[:FIRST_NAMED]
                                for k, v in names['failed']['first'].items()}
    where = {k: f'{out}/NNNNN/{DONE_MARKER}, under "{k}"' for k in NAMED}
    where['failed'] = f'{out}/NNNNN/{FAILED} of each part left unfinished'
    images, tokens = (sum(r[k] for r in ranks) for k in ('images', 'tokens'))
    seconds = max(r['seconds'] for r in ranks)
    speed = {'images': images, 'tokens': tokens, 'seconds': seconds, 'images_per_s': round(images / max(
        seconds, 1e-9), 3), 'tokens_per_s': round(tokens / max(seconds, 1e-9), 1)}
    cost = args.price and round(total['prompt_tokens'] * args.price[0] / 1e6 + total['tokens'] * args.price[1]
                                / 1e6, 4)
    for k in NAMED:
        total[k], total[f'{k}_names'] = sum(names[k]['by_reason'].values()), {**names[k], 'in': where[k]}
    return {'input': plan.places.src, 'output': out, **total,
            'stopped': next((r['stopped'] for r in ranks if r['stopped']), None), 'price': args.price,
            'cost_usd': cost, 'input_samples': plan.settings['input_samples'], 'parts': len(plan.parts),
            'parts_before': plan.finished, 'parts_this_run': len(done) - plan.finished, 'world_size': world,
            'speed': speed, 'parts_missing': [p.name for p in plan.parts if p.name not in done],
            'settings': plan.settings, 'interrupted': None, 'about': list(about.values())}


def report(summary: dict, path: str) -> None:
    """The summary as JSON at `path`, and on one screen."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(summary, f, indent=2)
    s, speed, settings = summary, summary['speed'], summary['settings']
    lines = [f'input    {s["input"]}: {s["input_samples"]} samples',
             f'output   {s["output"]}: {s["written"]} images captioned in {", ".join(s["captions"])}, '
             f'{s["skipped"]} skipped' + (f', {s["failed"]} failed' if s['failed'] else ''),
             f'tokens   {s["prompt_tokens"]} in, {s["tokens"]} generated '
             f'({s["tokens"] / max(s["written"], 1):.1f} per image)'
             + (f'; the server reported none for {s["no_usage"]} captions' if s['no_usage'] else '')
             + (f'; cost ${s["cost_usd"]:.4f} (${s["price"][0]} / ${s["price"][1]} per million in / out)'
                if s['price'] else '')]
    for key, c in s['captions'].items():
        rules = [f'{name} {n}' for name, n in c['rules'].items() if name in settings['rules']]
        lines.append(f'{key:<8} {c["cut_off"]} cut off at --max_new_tokens {settings["max_new_tokens"]}, '
                     f'{c["empty"]} empty; rules {", ".join(rules) or "none"} (captions changed)')
    lines += [f'parts    {s["parts_before"] + s["parts_this_run"]} of {s["parts"]} done '
              f'({s["parts_this_run"]} this run, {s["parts_before"]} before), world size {s["world_size"]}',
              f'speed    {speed["images"]} images in {speed["seconds"]:.1f} s, {speed["images_per_s"]:.2f} '
              f'images/s, {speed["tokens_per_s"]:.1f} tokens/s (all ranks)']
    lines += [f'{k:<8} {line}' for k in NAMED for line in named_lines(s[f'{k}_names'])]
    if s['stopped']:
        lines.append(f'stopped  {s["stopped"]}')
    if s['interrupted']:
        lines.append(f'stopped by {s["interrupted"]}: {len(s["parts_missing"])} parts left, no index.json '
                     'yet; rerun the same command to resume')
    if s.get('preview'):
        lines.append(f'preview  {s["preview"]["path"]}')
    lines.append(f'summary  {path}')
    print('\n'.join(lines), flush=True)


def write_record(plan: Plan, summary: dict, staging: str) -> None:
    """RECORD beside index.json: how the captions were made (model, prompts, decoding, rules, the endpoints
    without credentials), the counts and the token usage."""
    rules = [{'name': r.__name__, 'rule': r.__doc__} for r in RULES if r.__name__ in plan.settings['rules']]
    counts = {k: summary[k] for k in ('input_samples', 'written', 'skipped', 'captions', 'prompt_tokens',
                                      'tokens', 'no_usage', 'price', 'cost_usd')}
    columns = {c: plan.columns[c] for key in plan.settings['prompts'] for c in (key, RAW.format(key=key))
               if c in plan.columns}
    record = {'settings': plan.settings, 'about': summary['about'], 'rules': rules, 'counts': counts,
              'columns': columns}
    put_text(plan.places.out, staging, RECORD, json.dumps(record, indent=1))


PREVIEW_TILE, PREVIEW_TEXT_WIDTH, PREVIEW_LINES = 160, 520, 5  # px, px, lines of text per caption


def wrap(text: str, draw: ImageDraw.ImageDraw, font, lines: int) -> list[str]:
    """`text` in at most `lines` lines of at most PREVIEW_TEXT_WIDTH px ('...' where it is cut)."""
    out, line = [], ''
    for word in text.split():
        if draw.textlength(f'{line} {word}'.strip(), font=font) > PREVIEW_TEXT_WIDTH and line:
            out.append(line)
            line = word
        else:
            line = f'{line} {word}'.strip()
    out.append(line)
    return out[:lines - 1] + [out[lines - 1] + ' ...'] if len(out) > lines else out


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


def write_preview(args: argparse.Namespace, plan: Plan) -> list[int]:
    """A PNG of --preview images spread over the output, each beside its alt-text and new captions, at
    --preview_path."""
    out_root, keys = plan.places.out, list(plan.settings['prompts'])
    per_caption = min(PREVIEW_LINES, 2 * PREVIEW_LINES // len(keys) - 1)  # the columns share the lines
    with tempfile.TemporaryDirectory() as cache:
        where = {'remote': out_root, 'local': cache} if is_remote(out_root) else {'local': out_root}
        ds = streaming_dataset(**where)
        n = min(args.preview, ds.num_samples)
        ids = sorted({round(i * (ds.num_samples - 1) / max(n - 1, 1)) for i in range(n)})
        samples = [ds[i] for i in ids]
        del ds
    font = preview_font()
    row_h = max(PREVIEW_TILE, 14 * (2 * PREVIEW_LINES + 2)) + 8
    sheet = Image.new('RGB', (PREVIEW_TILE + PREVIEW_TEXT_WIDTH + 24, 8 + row_h * len(samples) + 14), 'white')
    draw = ImageDraw.Draw(sheet)
    title = f'{plan.settings["model_name"]}: {" | ".join(args.prompts.values())}'
    draw.text((8, 4), title[:110], fill='black', font=font)
    for row, sample in enumerate(samples):
        top = 22 + row * row_h
        img = decode(sample[IMAGE_COLUMN], [])
        img.thumbnail((PREVIEW_TILE, PREVIEW_TILE))
        sheet.paste(img, (8, top))
        lines = ['alt-text: ' + ' / '.join(wrap(str(sample.get(CAPTION_COLUMN, '')), draw, font, 2))]
        for key in keys:
            lines += [f'{key}:', *wrap(sample[key], draw, font, per_caption)]
        for i, line in enumerate(lines):
            draw.text((PREVIEW_TILE + 16, top + 14 * i), line, fill='black', font=font)
    os.makedirs(os.path.dirname(os.path.abspath(args.preview_path)), exist_ok=True)
    sheet.save(args.preview_path)
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


def share_plan(args: argparse.Namespace, pl: Places, engine: Engine, rank: int, world: int) -> Plan:
    """Rank 0 makes the plan (or meets the error); each rank receives it with only its share of the parts
    to do (every world-th) and their input shards, scattered: the input's index, ~0.5M shard records in
    LAION-2B's biggest bucket, stays whole on rank 0 alone, and only while it plans."""
    import torch.distributed as dist

    shares: list[Any] = [None] * world
    if rank == 0:
        try:
            plan = make_plan(args, pl, engine.settings(args))
            for r in range(world):
                mine = plan.pending[r::world]
                shares[r] = dataclasses.replace(plan, parts=plan.parts if r == 0 else [], pending=mine,
                                                shards={i: plan.shards[i] for p in mine for i in p.shards})
        except UserError as err:
            shares = [err] * world
    received = shares[:1]  # rank 0 keeps its own
    if world > 1:
        dist.scatter_object_list(received, [None, *shares[1:]] if rank == 0 else None, src=0)
    mine = shares[0] if rank == 0 else received[0]
    if isinstance(mine, UserError):
        raise mine
    return mine


def finish(args: argparse.Namespace, plan: Plan, ranks: list[dict], world: int) -> None:
    """Rank 0 after every rank is done: the index, the record, the summary, the preview."""
    staging = os.path.join(plan.places.staging, 'merge')
    os.makedirs(staging, exist_ok=True)
    summary = summarize(args, plan, ranks, world)
    if missing := summary['parts_missing']:
        report(summary, args.summary)
        why = summary['stopped'] or (f'images failed after their retries: {summary["failed"]}, named above'
                                     if summary['failed'] else '')
        listed = ', '.join(missing[:5]) + (', ...' if len(missing) > 5 else '')
        raise UserError(f'parts {listed} ({len(missing)} of {len(plan.parts)}) have no _done marker'
                        + (f' ({why})' if why else '') + '; rerun the same command')
    merge_parts(plan.places.out, plan.parts, staging, args.download_timeout)
    write_record(plan, summary, staging)
    if args.preview:
        summary['preview'] = {'path': args.preview_path, 'samples': write_preview(args, plan)}
    report(summary, args.summary)
    shutil.rmtree(plan.places.staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # a bad flag ends here, with argparse's message and exit code 2
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    stop_on_signals()
    engine, plan, dist = ENGINES[args.engine], None, None
    try:
        check_places(pl := places(args))  # before torch is imported
        import torch.distributed as dist

        if world > 1:
            dist.init_process_group('gloo', timeout=timedelta(seconds=args.dist_timeout))
        plan = share_plan(args, pl, engine, rank, world)
        ranks = [caption_parts(args, plan, engine, engine.load(args, plan.settings), rank, world)]
        if world > 1:  # every rank's speed and failed images, for rank 0's summary
            ranks = ranks * world
            dist.all_gather_object(ranks, ranks[rank])
        if rank == 0:
            finish(args, plan, ranks, world)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as stop:
        if rank == 0 and plan is not None:
            with contextlib.suppress(Exception):  # an unreachable output must not hide the interruption
                idle = {'images': 0, 'tokens': 0, 'seconds': 0.0, 'failed': named(), 'stopped': None}
                report({**summarize(args, plan, [idle], world), 'interrupted': str(stop)}, args.summary)
        print(f'error: stopped by {stop}: finished parts are kept, the part in progress is not; rerun the '
              'same command to resume', file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    finally:
        if dist and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
