"""Convert COCO 2014 val images and their captions into a streaming (MDS) dataset at a remote.

COCO 2014 val (40,504 JPEGs, 6.2 GB, ~5 captions each) is the reference set for FID and CLIP-score
evaluation of text-to-image models. Download `val2014/` and `annotations/captions_val2014.json` from
cocodataset.org, then:

    python convert_coco.py --data_path coco/val2014 \
        --annotation_path coco/annotations/captions_val2014.json --remote s3://my-bucket/coco2014-val

By default the same 10,000 images as the published pipeline are kept, so FID figures stay comparable:
`np.random.seed(0); np.random.choice(image_ids, 10000, replace=False)` over the captioned image ids in
the order they first appear in the annotations; the samples are written in that chosen order.
`--num_samples 0` keeps every captioned image, in first-appearance order. The same arguments always
give the same samples in the same order. The 10k subset is ~1.6 GB; on 2 cores and a local disk it
converts at ~1,000 images/s, a third of `cp -r` or better (benchmarks/bench_convert_coco.py).

Each sample holds the columns of COLUMNS: `image` is the original file's bytes, never re-encoded
(readers get a PIL image), `captions` every caption of the image with whitespace runs and newlines
collapsed to one space. Files are found only through the annotation's `images` list; files on disk
without annotation are ignored and counted; annotated files missing on disk stop the run (or, with
`--skip_missing`, are skipped and counted).

Shards are written to a staging folder (`--local`) and moved or uploaded as they fill; `index.json`
goes to the remote last, after every shard arrived, and a stale one is removed first. So an
interrupted run never leaves an index a reader would take for the whole set; rerun to finish it.

The script writes only where it is sure to destroy nothing. `--remote` must be new, empty, or this
script's own output, which it marks with `convert_coco.json` before the first shard; anything else,
such as another dataset, is refused in one line. A rerun replaces its own output and removes the
earlier run's shards that the new index does not list. In `--local` it touches only its staging
subfolder. A local remote that is, holds or lies inside an input is refused (real paths compared, so
symlinks and other spellings of a path count).
Exit: 0 written; 2 refused or failed (one `error:` line says why); 1 interrupted. The full manual is
docs/convert_coco.md.

Read back:
    from streaming import StreamingDataset
    ds = StreamingDataset(remote='s3://my-bucket/coco2014-val', local='/tmp/coco', shuffle=False)
    ds[0]  # {'image': <PIL JPEG>, 'captions': [...], 'image_id': ..., 'file_name': ..., ...}
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

if TYPE_CHECKING:  # streaming imports torch (~8 s): loaded only once the input checks have passed
    from streaming import MDSWriter

# The output schema (MDS column name -> encoding).
COLUMNS = {
    'image': 'jpeg',        # the original JPEG file, byte for byte
    'captions': 'json',     # list[str], all captions of the image, in annotation order
    'image_id': 'int64',    # COCO image id
    'file_name': 'str',     # e.g. COCO_val2014_000000391895.jpg
    'width': 'int32',       # pixel size from the JPEG header
    'height': 'int32',
}
DEFAULT_NUM_SAMPLES = 10_000  # the evaluation subset of the published pipeline
# Shards of 16 MB: ~100 for the 10k subset. MDSWriter copies each shard twice in memory; buffers over
# 32 MB are fresh mmaps for glibc every time, which made 64 MB shards ~2.5x slower to write here.
DEFAULT_SIZE_LIMIT = '16mb'
JPEG_MAGIC = b'\xff\xd8\xff'
INDEX = 'index.json'
MARKER = 'convert_coco.json'  # "written by convert_coco.py": a rerun may replace what sits beside it
STAGING = '.convert_coco.partial'  # the staging folder, inside --local or else a local remote
# What this script leaves in a folder it writes: shards (compressed too), the index, the marker, its
# staging folder, and the hidden `.<name>.partial` of a move that was cut off.
OURS = re.compile(r'\.?(shard\.\d{5}\.mds(\.\w+)?|index\.json|convert_coco\.json)(\.partial)?|'
                  + re.escape(STAGING))
SHOW_FIRST = 5  # how many missing files an error lists


class ConvertError(Exception):
    """A problem with the input or the remote that the user must fix; printed as one line."""


def parse_args() -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data_path', type=str, default='val2014',
                   help='folder of the COCO 2014 val images (COCO_val2014_*.jpg)')
    p.add_argument('--annotation_path', type=str, default='annotations/captions_val2014.json',
                   help='the COCO captions JSON (captions_val2014.json)')
    p.add_argument('--remote', type=str, default='coco2014-val-mds',
                   help='where the dataset goes: a local folder or a remote like s3://bucket/prefix; '
                        f'new, empty, or an earlier output of this script (marked by {MARKER})')
    p.add_argument('--local', type=str, default='',
                   help=f'local folder in which shards wait before they reach `remote`, in a subfolder '
                        f'{STAGING} that is cleared and removed (nothing else is touched); empty: that '
                        'subfolder inside a local remote, else a temporary folder')
    p.add_argument('--num_samples', type=int, default=DEFAULT_NUM_SAMPLES,
                   help='images to keep, chosen by np.random.choice with `seed`; 0 keeps all')
    p.add_argument('--seed', type=int, default=0, help='np.random.seed for choosing the images')
    p.add_argument('--skip_missing', action='store_true',
                   help='skip (and count) annotated images missing on disk instead of stopping')
    p.add_argument('--size_limit', type=str, default=DEFAULT_SIZE_LIMIT,
                   help='shard size limit before a new shard starts (bytes, or like 64mb)')
    p.add_argument('--compression', type=str, default=None,
                   help='shard compression such as zstd (JPEG bytes gain little)')
    p.add_argument('--workers', type=int, default=16, help='threads reading image files in parallel')
    p.add_argument('--upload_workers', type=int, default=4,
                   help='threads moving or uploading finished shards to `remote`')
    return p.parse_args()


# ---- find work: annotations, selection, files -------------------------------------------------

@dataclass
class CocoImage:
    """One annotated image: where it is and what is said about it."""

    image_id: int
    file_name: str
    width: int | None
    height: int | None
    captions: list[str] = field(default_factory=list)


def normalize_caption(text: str) -> str:
    """Collapse whitespace runs (newlines, tabs, double spaces) to one space and trim the ends."""
    return ' '.join(text.split())


def _field(entry: Any, key: str, kind: type, where: str) -> Any:
    """entry[key], checked to be of `kind`, or a ConvertError saying what is wrong and where."""
    if not isinstance(entry, dict) or key not in entry:
        raise ConvertError(f'{where} has no "{key}"')
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConvertError(f'{where}: "{key}" should be {kind.__name__}, got {value!r:.60}')
    return value


def load_annotations(path: Path) -> tuple[dict[int, CocoImage], list[int]]:
    """Read the captions JSON: images by id, and the captioned ids in first-appearance order."""
    if not path.is_file():
        raise ConvertError(f'annotation file not found: {path}')
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f'{path} is not valid JSON: {e}') from None
    for key in ('images', 'annotations'):
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise ConvertError(f'{path} has no "{key}" list; is it a COCO captions file?')
    images: dict[int, CocoImage] = {}
    for n, entry in enumerate(doc['images']):
        where = f'{path}: images[{n}]'
        image_id = _field(entry, 'id', int, where)
        if image_id in images:
            raise ConvertError(f'{where}: image id {image_id} appears twice')
        size = [entry.get(k) if isinstance(entry.get(k), int) else None for k in ('width', 'height')]
        images[image_id] = CocoImage(image_id, _field(entry, 'file_name', str, where), *size)
    order: list[int] = []
    for n, entry in enumerate(doc['annotations']):
        where = f'{path}: annotations[{n}]'
        image_id = _field(entry, 'image_id', int, where)
        caption = _field(entry, 'caption', str, where)
        if image_id not in images:
            raise ConvertError(f'{where}: image_id {image_id} is not in the "images" list')
        if not images[image_id].captions:
            order.append(image_id)
        images[image_id].captions.append(normalize_caption(caption))
    return images, order


def select_image_ids(ids: list[int], num_samples: int, seed: int) -> list[int]:
    """The published pipeline's choice: np.random.seed(seed); np.random.choice(ids, n, replace=False).

    num_samples 0 keeps all ids in their order; asking for more ids than exist is an error (a smaller
    set would silently change FID figures).
    """
    if num_samples < 0:
        raise ConvertError(f'--num_samples must be >= 0, got {num_samples}')
    if num_samples == 0:
        return list(ids)
    if num_samples > len(ids):
        raise ConvertError(f'--num_samples {num_samples} asks for more images than the annotation '
                           f'has captioned images ({len(ids)}); pass --num_samples 0 to keep all')
    np.random.seed(seed)
    return [int(i) for i in np.random.choice(ids, num_samples, replace=False)]


def find_files(data_path: Path, chosen: list[CocoImage], images: dict[int, CocoImage],
               skip_missing: bool) -> tuple[list[CocoImage], list[CocoImage], int]:
    """Split the chosen images into present and missing; count files on disk nobody annotated."""
    if not data_path.is_dir():
        raise ConvertError(f'image folder not found: {data_path}')
    on_disk = {e.name for e in os.scandir(data_path) if e.is_file()}
    annotated = {im.file_name for im in images.values()}
    unannotated = len(on_disk - annotated)
    found = [im.file_name in on_disk or (data_path / im.file_name).is_file() for im in chosen]
    present = [im for im, ok in zip(chosen, found) if ok]
    missing = [im for im, ok in zip(chosen, found) if not ok]
    if missing and not skip_missing:
        names = ', '.join(im.file_name for im in missing[:SHOW_FIRST])
        more = f' and {len(missing) - SHOW_FIRST} more' if len(missing) > SHOW_FIRST else ''
        raise ConvertError(f'{len(missing)} annotated images are missing in {data_path}: {names}{more} '
                           f'(pass --skip_missing to skip them)')
    return present, missing, unannotated


# ---- read -------------------------------------------------------------------------------------

def read_sample(data_path: Path, im: CocoImage) -> dict[str, Any]:
    """Read one file into a sample dict, checking that it is a JPEG (size from its header)."""
    path = data_path / im.file_name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConvertError(f'cannot read {path}: {e.strerror}') from None
    try:
        with Image.open(io.BytesIO(data)) as img:  # parses the header only
            fmt, (width, height) = img.format, img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        fmt = None
    if fmt != 'JPEG' or not data.startswith(JPEG_MAGIC):
        raise ConvertError(f'{path} is not a JPEG file ({fmt or "unreadable"})')
    # bytes pass through MDS encoding untouched (streaming's mds_encode returns bytes as they are)
    return {'image': data, 'captions': im.captions, 'image_id': np.int64(im.image_id),
            'file_name': im.file_name, 'width': np.int32(width), 'height': np.int32(height)}


def read_in_order(data_path: Path, chosen: list[CocoImage],
                  workers: int) -> Iterator[tuple[CocoImage, dict[str, Any]]]:
    """Read files on a thread pool, yielding (image, sample) in `chosen` order, reading ahead a little."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix='read')
    pending: deque[tuple[CocoImage, Future]] = deque()
    todo = iter(chosen)
    try:
        for im in todo:
            pending.append((im, pool.submit(read_sample, data_path, im)))
            if len(pending) >= 4 * workers:
                im, future = pending.popleft()
                yield im, future.result()
        while pending:
            im, future = pending.popleft()
            yield im, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- write: claim the output, staging shards, then the remote, index last ---------------------

def is_local(remote: str) -> bool:
    return urllib.parse.urlparse(remote).scheme in ('', 'file')


def local_path(remote: str) -> Path:
    return Path(urllib.parse.urlparse(remote).path if remote.startswith('file://') else remote)


def check_apart(inputs: dict[str, Path], remote: Path) -> None:
    """Refuse a local remote that is, holds or lies inside an input.

    Real paths are compared, so a symlink, `./` or a relative spelling of the same folder counts.
    """
    out = remote.resolve()
    for flag, path in inputs.items():
        real = path.resolve()
        if out == real or out.is_relative_to(real) or real.is_relative_to(out):
            raise ConvertError(f'--remote {remote} and {flag} {path} are the same place or one holds the '
                               f'other ({out} vs {real}); write the output to a folder of its own')


def claim(names: list[str], remote: str) -> list[str]:
    """`names` (what the remote holds) if all are this script's earlier output, else a ConvertError.

    Empty or missing is new. Files are ours only beside MARKER and only of the kinds OURS names:
    an index.json without our marker is some other dataset's.
    """
    foreign = [n for n in names if not OURS.fullmatch(n)] if MARKER in names else list(names)
    if foreign:
        more = f' and {len(foreign) - SHOW_FIRST} more' if len(foreign) > SHOW_FIRST else ''
        raise ConvertError(f'--remote {remote} holds files this script did not write '
                           f'({", ".join(sorted(foreign)[:SHOW_FIRST])}{more}), perhaps another dataset; '
                           'pass a new or empty --remote, or remove those files yourself')
    return names


def folder_names(path: Path, flag: str) -> list[str]:
    """The entries of a local folder ([] when it does not exist), or a ConvertError naming `flag`."""
    if not path.exists():
        return []
    if not path.is_dir():
        raise ConvertError(f'{flag} {path} is a file, not a folder; pass a folder')
    try:
        return os.listdir(path)
    except OSError as e:
        raise ConvertError(f'cannot read {flag} {path}: {e.strerror}') from None


def make_folder(path: Path, flag: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f'cannot create {flag} {path}: {e.strerror}') from None


def write_marker(folder: Path) -> None:
    """MARKER in `folder`: the claim that lets a rerun replace what this script wrote there."""
    doc = {'written_by': 'convert_coco.py', 'columns': COLUMNS,
           'note': 'a rerun of convert_coco.py replaces the index and shards beside this file'}
    (folder / MARKER).write_text(json.dumps(doc, indent=1) + '\n')


def staging_folder(local: str, remote: str) -> Path:
    """The staging folder, ours alone: STAGING inside `--local` or a local remote, else a temporary one.

    Only this subfolder is cleared and removed, so `--local` may be any folder.
    """
    if local:
        return Path(local) / STAGING
    if is_local(remote):
        return local_path(remote) / STAGING
    return Path(tempfile.mkdtemp(prefix='convert_coco-'))


def prepare_staging(staging: Path) -> None:
    """An empty staging folder (a run killed earlier may have left shards in it)."""
    shutil.rmtree(staging, ignore_errors=True)
    make_folder(staging, '--local')


class Publisher:
    """Moves (local remote) or uploads (cloud remote) finished files from staging in the background.

    `names()` lists the remote, `start()` marks it as ours and removes its old index, `finish()` waits
    for every shard, removes the earlier run's files that the new index does not list, then puts
    `index.json` last, so the remote never has an index whose shards are not all there.
    """

    def __init__(self, staging: Path, remote: str, workers: int) -> None:
        self.staging, self.remote = staging, remote
        self.uploader = None
        if not is_local(remote):
            from streaming.base.storage.upload import CloudUploader

            make_folder(staging, '--local')
            try:
                self.uploader = CloudUploader.get((str(staging), remote), exist_ok=True)
            except Exception as e:  # bad scheme, missing bucket, no credentials
                raise ConvertError(f'cannot use remote {remote}: {e}') from None
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix='upload')
        self.futures: list[Future] = []
        self.sent: set[str] = set()  # shards of this run
        self.earlier: list[str] = []  # files of an earlier run that this one may replace

    def names(self) -> list[str]:
        """What the remote holds now, as names relative to it (a subfolder's files keep their '/')."""
        if self.uploader is None:
            return folder_names(local_path(self.remote), '--remote')
        prefix = urllib.parse.urlparse(self.remote).path.strip('/')
        try:
            keys = self.uploader.list_objects() or []
        except NotImplementedError:  # streaming lists s3, gs and oci only
            raise ConvertError(f'cannot list --remote {self.remote} to check that it holds no other '
                               'dataset; write to a local folder, s3://, gs:// or oci:// and copy it '
                               'there') from None
        except Exception as e:  # no permission, network, ...
            raise ConvertError(f'cannot list --remote {self.remote} to check that it holds no other '
                               f'dataset ({type(e).__name__}: {e})') from None
        return [k[len(prefix):].lstrip('/') for k in keys]

    def start(self, old: list[str]) -> None:
        """Claim the remote with MARKER and remove the index of an earlier run (`old`: its files)."""
        if self.uploader is None:
            make_folder(local_path(self.remote), '--remote')
            write_marker(local_path(self.remote))
        else:
            write_marker(self.staging)
            self.uploader.upload_file(MARKER)
        self.earlier = [n for n in old if n not in (MARKER, INDEX, STAGING)]
        if INDEX in old:
            self.delete([INDEX])

    def delete(self, names: list[str]) -> None:
        """Remove these files of an earlier run from the remote (local folder and S3; else warn)."""
        if not names:
            return
        if self.uploader is None:
            for name in names:
                (local_path(self.remote) / name).unlink(missing_ok=True)
        elif hasattr(self.uploader, 's3'):
            url = urllib.parse.urlparse(self.remote)
            for name in names:
                key = f'{url.path.strip("/")}/{name}'.lstrip('/')
                try:
                    self.uploader.s3.delete_object(Bucket=url.netloc, Key=key)
                except Exception as e:
                    raise ConvertError(f'cannot remove the old {name} at {self.remote}: {e}') from None
        else:
            print(f'warning: cannot delete at {self.remote}: remove {", ".join(names[:SHOW_FIRST])}'
                  f'{" ..." if len(names) > SHOW_FIRST else ""} ({len(names)} files of an earlier run) '
                  'yourself; readers of the new index never see them', file=sys.stderr)

    def _put(self, basename: str) -> None:
        if self.uploader is None:
            target = local_path(self.remote) / basename
            partial = target.with_name(f'.{basename}.partial')  # a rename makes it appear whole
            shutil.move(self.staging / basename, partial)
            os.replace(partial, target)
        else:
            self.uploader.upload_file(basename)  # removes the staged copy once uploaded

    def submit(self, basename: str) -> None:
        """Queue a finished shard; stop early if an earlier one failed."""
        if any(f.done() and f.exception() for f in self.futures[-8:]):
            self.finish()  # raises the failure
        self.sent.add(basename)
        self.futures.append(self.pool.submit(self._put, basename))

    def close(self) -> None:
        """Stop: wait for running moves/uploads, drop queued ones (used when the run fails)."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def finish(self) -> None:
        """Wait for all shards (raising the first failure), remove the earlier run's files that this
        run did not replace (shards past the new last one, cut-off moves), then put the index."""
        try:
            for f in self.futures:
                f.result()
            self.delete([n for n in self.earlier if n not in self.sent])
            self._put(INDEX)
        except ConvertError:
            raise
        except Exception as e:  # an upload that failed after the uploader's retries
            raise ConvertError(f'writing to {self.remote} failed ({type(e).__name__}: {e}); '
                               f'it has no {INDEX}, rerun to finish') from None
        finally:
            self.close()


def shard_basename(shard: dict[str, Any]) -> str:
    return (shard.get('zip_data') or shard['raw_data'])['basename']


def open_writer(staging: Path, args: argparse.Namespace) -> MDSWriter:
    """An MDSWriter into `staging` only: the Publisher, not the writer, talks to the remote."""
    from streaming import MDSWriter

    try:
        return MDSWriter(out=str(staging), columns=COLUMNS, size_limit=args.size_limit,
                         compression=args.compression or None)
    except ValueError as e:
        raise ConvertError(f'bad --size_limit or --compression: {e}') from None


def write_dataset(samples: Iterable[tuple[CocoImage, dict[str, Any]]], staging: Path,
                  publisher: Publisher, args: argparse.Namespace, total: int) -> dict[str, int]:
    """Write samples into shards in `staging`, handing each full shard to `publisher`."""
    writer = open_writer(staging, args)
    start = time.time()  # after the (slow) streaming import: the summary's rate is the conversion's
    counts = {'samples': 0, 'bytes': 0, 'shards': 0, 'size_mismatch': 0}
    bar = tqdm(total=total, unit='img', desc='convert', smoothing=0.1, dynamic_ncols=True)
    for im, sample in samples:
        writer.write(sample)
        if im.width is not None and (im.width, im.height) != (sample['width'], sample['height']):
            counts['size_mismatch'] += 1
        counts['samples'] += 1
        counts['bytes'] += len(sample['image'])
        bar.update(1)
        if counts['samples'] % 64 == 0:
            bar.set_postfix_str(f'{counts["bytes"] / 2**20 / max(bar.format_dict["elapsed"], 1e-9):.1f} MB/s')
        while counts['shards'] < len(writer.shards):
            publisher.submit(shard_basename(writer.shards[counts['shards']]))
            counts['shards'] += 1
    writer.finish()  # flushes the last shard and writes index.json into staging (not to the remote)
    bar.close()
    for shard in writer.shards[counts['shards']:]:
        publisher.submit(shard_basename(shard))
    counts['shards'] = len(writer.shards)
    publisher.finish()
    return {**counts, 'seconds': time.time() - start}


# ---- main -------------------------------------------------------------------------------------

def print_summary(stats: dict[str, Any]) -> None:
    """A one-screen summary of what was written and what was left out."""
    secs = max(stats['seconds'], 1e-9)
    print('\nconvert_coco summary')
    for key, label in (('captioned', 'captioned images in annotation'), ('chosen', 'images chosen'),
                       ('samples', 'samples written'), ('missing', 'missing on disk (skipped)'),
                       ('unannotated', 'files on disk without annotation (ignored)'),
                       ('uncaptioned', 'annotated images without captions (ignored)'),
                       ('size_mismatch', 'header size differs from annotation'),
                       ('shards', 'shards')):
        print(f'  {label:<44} {stats[key]:>10,}')
    print(f'  {"image bytes":<44} {stats["bytes"] / 2**20:>10,.2f} MB')
    rates = f'{stats["samples"] / secs:,.0f} samples/s, {stats["bytes"] / 2**20 / secs:,.1f} MB/s'
    print(f'  {"time reading and writing":<44} {secs:>10,.2f} s  ({rates})')
    print(f'  {"remote":<44} {stats["remote"]}')


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Find the chosen images, read them in parallel and write them to the remote, index last."""
    data_path, ann_path, remote = Path(args.data_path), Path(args.annotation_path), args.remote
    images, captioned = load_annotations(ann_path)
    chosen_ids = select_image_ids(captioned, args.num_samples, args.seed)
    chosen = [images[i] for i in chosen_ids]
    present, missing, unannotated = find_files(data_path, chosen, images, args.skip_missing)
    if is_local(remote):
        check_apart({'--data_path': data_path, '--annotation_path': ann_path}, local_path(remote))
    staging = staging_folder(args.local, remote)
    publisher = None
    try:
        publisher = Publisher(staging, remote, args.upload_workers)
        publisher.start(claim(publisher.names(), remote))
        prepare_staging(staging)
        counts = write_dataset(read_in_order(data_path, present, args.workers), staging, publisher,
                               args, len(present))
    finally:
        if publisher is not None:
            publisher.close()
        shutil.rmtree(staging, ignore_errors=True)
    return {'captioned': len(captioned), 'chosen': len(chosen), 'missing': len(missing),
            'unannotated': unannotated, 'uncaptioned': len(images) - len(captioned),
            'remote': remote, **counts}


def main() -> None:
    args = parse_args()
    try:
        stats = convert(args)
    except ConvertError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(f'interrupted: {args.remote} has no new {INDEX}; rerun to write the full dataset')
    print_summary(stats)


if __name__ == '__main__':
    main()
