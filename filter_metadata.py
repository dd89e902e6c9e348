"""filter_metadata.py - keep the metadata rows worth downloading, before a single image is fetched.

Streams image-caption metadata parquet (local or any fsspec URL, e.g. s3://) one record batch at a time,
drops the rows a FILTER (Polars SQL), a BLOCKLIST (URLs or hashes) and, optionally, an exact URL dedup
remove, and writes what is left once, beside the download: <output_folder>/_metadata/part-NNNNN.parquet
(one per input file that keeps a row, all columns as they were), with filter_summary.txt (rows in, rows
out, removed per clause, by the blocklist and by the dedup), filter_histograms.png (before/after) and, last,
`settings`, the record of what made it. laion_download_all.sh runs this step (FILTER, BLOCKLIST, DEDUP)
and hands the result to img2dataset; run it by hand to look at a filter before downloading anything.
The full manual is docs/download.md#filtering-the-metadata-first-filter-blocklist-dedup.

Example:
  python filter_metadata.py --url_list /data/relaion2b-raw --output_folder /data/relaion2b-processed \
    --filter "punsafe < 0.1 AND pwatermark < 0.5 AND similarity >= 0.28" --blocklist removed.txt --dedup
  (prints the folder img2dataset should read: /data/relaion2b-processed/_metadata)

Filter: one Polars SQL condition (pl.sql_expr) over the metadata's columns; the top-level AND clauses are
  counted one by one, in the order written. A row is kept only where the condition is TRUE: a NULL (e.g.
  `punsafe < 0.1` where punsafe is null) drops the row, as SQL's WHERE does; write
  `(punsafe < 0.1 OR punsafe IS NULL)` to keep such rows.
Blocklist: text files (one URL or hash per line; blank lines and lines starting with # are skipped) or
  parquet files (the column named as --blocklist_column, or their only column); a row whose
  --blocklist_column value, as text, is listed is dropped. The list is held in memory (a removal list of
  10M URLs: ~2 GB).
Dedup: the first row of each URL is kept, in file order; holds 8 bytes per distinct URL (a 64-bit hash;
  2.3B URLs: ~19 GB, up to ~1.7x that while runs merge; two distinct URLs sharing a hash, about 1 in 7
  at 2.3B rows, drop one of them).
Resume: a rerun with the same settings reuses the filtered metadata (img2dataset's shard ids keep meaning
  the same rows); other settings, or filtering into an output that already has shards made from the
  unfiltered metadata, are refused. A run killed before `settings` was written leaves nothing a rerun
  trusts: the rerun starts over.
Exit: 0 (the folder to read on stdout); 2: bad settings, a filter that does not parse or names a missing
  column, no row left, or a refused rerun (one line on stderr says which).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PROG = 'filter_metadata'
METADATA_DIR = '_metadata'  # under --output_folder: img2dataset reads only top-level *.json and *.parquet
RECORD = 'settings'  # KEY=value lines, written last: its presence marks the filtered metadata complete
SUMMARY, PLOT = 'filter_summary.txt', 'filter_histograms.png'
BATCH_ROWS = 256 * 1024  # rows per record batch read: ~30 MB of LAION metadata in memory at a time
# Histogram quantities: (title, candidate column names in the metadata's spellings, bin range). Shorter
# side and aspect ratio come from the first width/height pair found; caption length from --caption_col.
SIZE_PAIRS = (('WIDTH', 'HEIGHT'), ('width', 'height'), ('original_width', 'original_height'))
SCORES = (('punsafe', ('punsafe', 'nsfw_score_opennsfw2'), (0.0, 1.0)),
          ('pwatermark', ('pwatermark', 'watermark_score'), (0.0, 1.0)),
          ('similarity', ('similarity', 'clip_b32_similarity_score', 'clip_similarity_vitb32'), (0.0, 0.5)),
          ('aesthetic score', ('AESTHETIC_SCORE', 'aesthetic_score', 'aesthetic_score_laion_v2'),
           (0.0, 10.0)))
BINS = 40


def fail(msg: str) -> NoReturn:
    print(f'{PROG}: error: {msg}', file=sys.stderr, flush=True)
    sys.exit(2)


def note(msg: str) -> None:
    print(f'{PROG}: {msg}', file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--url_list', required=True, help='metadata folder of *.parquet files, or one file')
    p.add_argument('--output_folder', required=True,
                   help=f'the download\'s output folder; the filtered metadata goes to its {METADATA_DIR}/')
    p.add_argument('--filter', default='', help='Polars SQL condition rows must meet (empty: keep all)')
    p.add_argument('--blocklist', default='', help='comma-separated text or parquet files of values to drop')
    p.add_argument('--blocklist_column', default='', help='metadata column matched (default: --url_col)')
    p.add_argument('--dedup', action='store_true', help='keep only the first row of each URL')
    p.add_argument('--url_col', default='url', help='metadata column of the URL')
    p.add_argument('--caption_col', default='caption', help='metadata column of the caption')
    p.add_argument('--require', default='',
                   help='comma-separated columns the downloader reads next (checked before any work)')
    p.add_argument('--batch_rows', type=int, default=BATCH_ROWS, help='rows per batch read')
    p.add_argument('--no_plot', action='store_true', help=f'skip {PLOT}')
    return p.parse_args(argv)


# ---- the filter: Polars SQL, split into its top-level AND clauses by Polars itself ------------------

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


def parse_filter(text: str):
    """The Polars expression of --filter; one line and exit 2 when it does not parse."""
    import polars as pl
    try:
        return pl.sql_expr(text)
    except Exception as err:
        fail(f'FILTER={text!r} does not parse as a Polars SQL condition: {one_line(err)}')


def compile_filter(text: str, expr, schema: pa.Schema, where: str) -> tuple[list, list[str]]:
    """(clauses, labels) of the parsed --filter; one line and exit 2 when it does not evaluate on the
    metadata's column types (checked on no rows)."""
    import polars as pl
    try:
        pl.from_arrow(schema.empty_table()).filter(expr)
    except Exception as err:
        fail(f'FILTER={text!r} does not evaluate on the columns of {where}: {one_line(err)}')
    clauses = split_and(expr)
    return clauses, clause_labels(text, clauses)


def one_line(err: Exception) -> str:
    return ' '.join(str(err).split())[:300]


# ---- blocklist and dedup -----------------------------------------------------------------------------

def read_blocklist(paths: list[str], column: str) -> tuple[set[str], list[str]]:
    """(the listed values, 'path sha256' of each file for the record)."""
    values: set[str] = set()
    stamps = []
    for path in paths:
        try:
            with fsspec.open(path, 'rb') as f:
                data = f.read()
        except Exception as err:
            fail(f'BLOCKLIST {path}: cannot read it ({one_line(err)})')
        stamps.append(f'{path} sha256:{hashlib.sha256(data).hexdigest()}')
        if data[:4] == b'PAR1':
            table = pq.read_table(pa.BufferReader(data))
            name = column if column in table.column_names else (
                table.column_names[0] if table.num_columns == 1 else None)
            if name is None:
                fail(f"BLOCKLIST {path}: no column '{column}' and more than one column; "
                     f"its columns: {', '.join(table.column_names)}")
            values.update(str(v) for v in table.column(name).drop_null().to_pylist())
        else:
            for line in data.decode('utf-8', 'replace').splitlines():
                line = line.strip()
                if line and not line.startswith('#'):
                    values.add(line)
    return values, stamps


@dataclass
class Seen:
    """64-bit hashes of the URLs seen so far, as sorted numpy runs merged like an LSM tree (a run is
    merged into the one before it once that one is not at least twice its size)."""

    runs: list[np.ndarray] = field(default_factory=list)

    def first_time(self, hashes: np.ndarray) -> np.ndarray:
        """Mask of the rows whose hash is new (first occurrence within `hashes` too); records them."""
        uniq, first = np.unique(hashes, return_index=True)
        new = np.ones(len(uniq), bool)
        for run in self.runs:
            pos = np.searchsorted(run, uniq).clip(max=len(run) - 1)
            new &= run[pos] != uniq
        keep = np.zeros(len(hashes), bool)
        keep[first[new]] = True
        if new.any():
            self.runs.append(uniq[new])
        while len(self.runs) > 1 and len(self.runs[-2]) < 2 * len(self.runs[-1]):
            merged = np.concatenate([self.runs[-2], self.runs.pop()])
            merged.sort(kind='stable')  # timsort finds the two sorted runs: one linear merge, in place
            self.runs[-1] = merged
        return keep


# ---- histograms: fixed bins, counted batch by batch --------------------------------------------------

def quantities(schema: pa.Schema, caption_col: str) -> list[tuple[str, object, tuple[float, float]]]:
    """(title, Polars expression, bin range) of each histogram the metadata's columns allow."""
    import polars as pl
    out = []
    pair = next(((w, h) for w, h in SIZE_PAIRS if w in schema.names and h in schema.names), None)
    if pair:
        w, h = pl.col(pair[0]).cast(pl.Float64), pl.col(pair[1]).cast(pl.Float64)
        out.append(('shorter side (px)', pl.min_horizontal(w, h), (0.0, 2048.0)))
        out.append(('aspect ratio (w/h)', w / h, (0.0, 4.0)))
    for title, names, span in SCORES:
        name = next((n for n in names if n in schema.names), None)
        if name:
            out.append((title, pl.col(name).cast(pl.Float64), span))
    if caption_col in schema.names:
        out.append(('caption length (chars)', pl.col(caption_col).str.len_chars().cast(pl.Float64),
                    (0.0, 400.0)))
    return out


def add_counts(counts: np.ndarray, values: np.ndarray, span: tuple[float, float]) -> None:
    """Adds `values` (NaN skipped; outside `span` into the end bins) to the histogram `counts`."""
    values = values[~np.isnan(values)]
    idx = ((values - span[0]) / (span[1] - span[0]) * BINS).astype(np.int64).clip(0, BINS - 1)
    counts += np.bincount(idx, minlength=BINS)


def draw(hists: list, path_png: str, fs) -> bool:
    """Writes the before/after histograms as one PNG; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        note(f'matplotlib not installed: no {PLOT}')
        return False
    cols = 2
    rows = -(-len(hists) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.8 * rows), squeeze=False)
    for ax, (title, _, span, before, after) in zip(axes.flat, hists):
        edges = np.linspace(span[0], span[1], BINS + 1)
        ax.stairs(before, edges, fill=True, color='0.75', label=f'before ({int(before.sum()):,})')
        ax.stairs(after, edges, fill=True, color='tab:blue', alpha=0.8, label=f'after ({int(after.sum()):,})')
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(hists):]:
        ax.axis('off')
    fig.tight_layout()
    with fs.open(path_png, 'wb') as f:
        fig.savefig(f, format='png', dpi=80)
    plt.close(fig)
    return True


# ---- the run -----------------------------------------------------------------------------------------

def list_inputs(url_list: str) -> tuple[object, list[str]]:
    """(filesystem, sorted *.parquet files) of --url_list, as img2dataset lists them."""
    try:
        fs, path = fsspec.core.url_to_fs(url_list)
        if not fs.exists(path):
            fail(f'URL_LIST={url_list}: no such folder or file')
        files = sorted(fs.glob(path.rstrip('/') + '/*.parquet')) if fs.isdir(path) else [path]
    except SystemExit:
        raise
    except Exception as err:
        fail(f'URL_LIST={url_list}: cannot reach it ({type(err).__name__}: {one_line(err)})')
    if not files:
        fail(f'URL_LIST={url_list}: the folder holds no *.parquet metadata files')
    return fs, files


def read_schemas(fs, files: list[str], needed: dict[str, str]) -> pa.Schema:
    """The first file's schema, after checking every footer reads and holds the `needed` columns
    (column -> the setting that names it)."""
    first = None
    for f in files:
        try:
            with fs.open(f, 'rb') as fh:
                schema = pq.ParquetFile(fh).schema_arrow
        except Exception as err:
            fail(f'{f}: not a readable parquet file ({type(err).__name__}: {one_line(err)})')
        for col, knob in needed.items():
            if col not in schema.names:
                fail(f"{f}: no column '{col}' ({knob}); its columns: {', '.join(schema.names)}")
        first = first or schema
    return first


def record_text(args: argparse.Namespace, fs, files: list[str], stamps: list[str]) -> str:
    """The settings that decide which rows the filtered metadata holds, as KEY=value lines; FILES
    names the input files by count and a digest of their names and sizes (a changed input is refused)."""
    listing = ''.join(f'{f.rsplit("/", 1)[-1]} {fs.size(f)}\n' for f in files)
    lines = {'URL_LIST': args.url_list,
             'FILES': f'{len(files)} sha256:{hashlib.sha256(listing.encode()).hexdigest()}',
             'FILTER': args.filter,
             'BLOCKLIST': ' '.join(stamps), 'BLOCKLIST_COLUMN': args.blocklist_column,
             'DEDUP': str(args.dedup), 'URL_COL': args.url_col}
    return ''.join(f'{k}={" ".join(v.split())}\n' for k, v in lines.items())


def check_rerun(fs, meta: str, out: str, want: str | None, output_folder: str) -> bool:
    """True when the filtered metadata with exactly these settings is there to reuse. Refuses (exit 2)
    other settings, and filtering into an output whose shards were made without a filter. `want` None:
    this run does not filter (then a record from a filtering run is refused)."""
    try:
        have = fs.cat_file(f'{meta}/{RECORD}').decode() if fs.exists(f'{meta}/{RECORD}') else None
        shards = fs.glob(f'{out}/*_stats.json') if fs.exists(out) else []
    except Exception as err:
        fail(f'OUTPUT_FOLDER={output_folder}: cannot reach it ({type(err).__name__}: {one_line(err)})')
    if have is None:
        if want is not None and shards:
            fail(f'OUTPUT_FOLDER={output_folder} holds {len(shards)} shards downloaded without FILTER/'
                 'BLOCKLIST/DEDUP: their ids mean other rows; filter into a new OUTPUT_FOLDER')
        return False
    if have == want:
        return True
    old, new = parse_record(have), parse_record(want or '')
    changed = [k for k in old if old[k] != new.get(k, '')] if want else ['FILTER', 'BLOCKLIST', 'DEDUP']
    what = '; '.join(f'{k} {old.get(k, "")!r} -> {new.get(k, "")!r}' for k in changed
                     if old.get(k, '') not in ('', 'False') or new.get(k, '') not in ('', 'False'))
    fail(f'OUTPUT_FOLDER={output_folder} was filtered with other settings ({what}): shard ids would mean '
         'other rows; rerun with the same settings or use a new OUTPUT_FOLDER')


def parse_record(text: str) -> dict[str, str]:
    return dict(line.split('=', 1) for line in text.splitlines() if '=' in line)


def run(args: argparse.Namespace) -> str:
    """Filters --url_list into <output_folder>/_metadata unless already done; returns the folder to read."""
    out_fs, out = fsspec.core.url_to_fs(args.output_folder)
    out = out.rstrip('/')
    meta = f'{out}/{METADATA_DIR}'
    filtering = bool(args.filter or args.blocklist or args.dedup)
    if not filtering:
        check_rerun(out_fs, meta, out, None, args.output_folder)
        return args.url_list
    fs, files = list_inputs(args.url_list)
    block_col = args.blocklist_column or args.url_col
    needed = {args.url_col: 'URL_COL', args.caption_col: 'CAPTION_COL'}
    needed.update({c: 'needed by the download' for c in args.require.split(',') if c})
    if args.blocklist:
        needed[block_col] = 'BLOCKLIST_COLUMN'
    expr = parse_filter(args.filter) if args.filter else None
    if expr is not None:
        needed.update({c: 'FILTER' for c in expr.meta.root_names() if c not in needed})
    schema = read_schemas(fs, files, needed)
    clauses, labels = compile_filter(args.filter, expr, schema, files[0]) if expr is not None else ([], [])
    blocked, stamps = read_blocklist([p for p in args.blocklist.split(',') if p], block_col) \
        if args.blocklist else (set(), [])
    want = record_text(args, fs, files, stamps)
    folder = out_fs.unstrip_protocol(meta) if '://' in args.output_folder else meta
    if check_rerun(out_fs, meta, out, want, args.output_folder):
        note(f'reusing the filtered metadata in {folder} (same settings)')
        return folder
    made_out = not out_fs.exists(out)
    if out_fs.exists(meta):  # a run cut off before its record: nothing in it is trusted
        note(f'{folder} has no {RECORD} record (a run cut off while filtering): filtering again')
        out_fs.rm(meta, recursive=True)
    out_fs.makedirs(meta, exist_ok=True)
    try:
        summary = filter_files(args, fs, files, out_fs, meta, clauses, labels, blocked, schema)
    except SystemExit:  # no row left: leave the output as it was
        out_fs.rm(out if made_out else meta, recursive=True)
        raise
    out_fs.pipe_file(f'{meta}/{SUMMARY}', summary.encode())
    print(summary, end='', file=sys.stderr, flush=True)
    out_fs.pipe_file(f'{meta}/{RECORD}', want.encode())  # last: the filtered metadata is complete
    return folder


def keep_mask(df, clauses: list, listed, block_col: str, seen: Seen | None, url_col: str,
              counts: dict) -> np.ndarray:
    """The rows of one batch to keep: each clause in order (a NULL fails it), then the blocklist (`listed`,
    None for none), then the dedup; adds the rows each removes to `counts`."""
    import polars as pl
    alive = np.ones(df.height, bool)
    if clauses:  # every clause's mask in one select
        masks = df.select([c.fill_null(False).alias(str(k)) for k, c in enumerate(clauses)])
        for k in range(len(clauses)):
            ok = masks.to_series(k).to_numpy()
            counts['clauses'][k] += int(np.count_nonzero(alive & ~ok))
            alive &= ok
    if listed is not None:
        hit = df.select(pl.col(block_col).cast(pl.String).is_in(listed).fill_null(False))
        hit = hit.to_series().to_numpy()
        counts['blocked'] += int(np.count_nonzero(alive & hit))
        alive &= ~hit
    if seen is not None:
        idx = np.flatnonzero(alive)
        first = seen.first_time(df.get_column(url_col).hash(seed=0).to_numpy()[idx])
        counts['dup'] += len(idx) - int(np.count_nonzero(first))
        alive[idx[~first]] = False
    return alive


def filter_file(fs, path: str, out_fs, part: str, batch_rows: int, keep, hists: list) -> tuple[int, int]:
    """Streams one metadata file through `keep` (a batch -> mask of its rows to keep) into `part`, written
    only when a row is kept (all columns, the input's types); adds to the histograms. Returns (rows in,
    rows out)."""
    import polars as pl
    writer = sink = None
    rows_in = rows_out = 0
    with fs.open(path, 'rb') as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows):
            df = pl.from_arrow(pa.Table.from_batches([batch]))
            kept = df.filter(pl.Series(keep(df)))
            for _, expr, span, before, after in hists:
                add_counts(before, df.select(expr).to_series().to_numpy().astype(float), span)
                add_counts(after, kept.select(expr).to_series().to_numpy().astype(float), span)
            if kept.height:
                if writer is None:
                    sink = out_fs.open(part, 'wb')
                    writer = pq.ParquetWriter(sink, batch.schema)
                writer.write_table(kept.to_arrow().cast(batch.schema))
            rows_in, rows_out = rows_in + df.height, rows_out + kept.height
    if writer is not None:
        writer.close()
        sink.close()
    return rows_in, rows_out


def filter_files(args: argparse.Namespace, fs, files: list[str], out_fs, meta: str, clauses: list,
                 labels: list[str], blocked: set[str], schema: pa.Schema) -> str:
    """Streams every file through the clauses, the blocklist and the dedup into meta/part-NNNNN.parquet;
    returns the summary text. Exits 2 (removing what it wrote) when no row is left."""
    import polars as pl
    counts = {'clauses': [0] * len(clauses), 'blocked': 0, 'dup': 0}
    n_in = n_out = 0
    seen = Seen() if args.dedup else None
    block_col = args.blocklist_column or args.url_col
    hists = [(t, e, s, np.zeros(BINS, np.int64), np.zeros(BINS, np.int64))
             for t, e, s in quantities(schema, args.caption_col)]
    listed = pl.Series(sorted(blocked), dtype=pl.String).implode()
    start = time.time()
    nbytes = 0

    def keep(df) -> np.ndarray:
        return keep_mask(df, clauses, listed if blocked else None, block_col, seen, args.url_col, counts)

    for i, f in enumerate(files):
        try:
            rows_in, rows_out = filter_file(fs, f, out_fs, f'{meta}/part-{i:05d}.parquet', args.batch_rows,
                                            keep, hists)
        except Exception as err:  # a file whose types differ, a batch that does not read
            fail(f'{f}: cannot filter it ({type(err).__name__}: {one_line(err)})')
        n_in, n_out, nbytes = n_in + rows_in, n_out + rows_out, nbytes + fs.size(f)
    if n_out == 0:
        fail(f'no metadata row is left of {n_in:,} (FILTER={args.filter!r}'
             f'{", BLOCKLIST" if blocked else ""}{", DEDUP" if seen else ""}): nothing to download; '
             'loosen the filter')
    secs = time.time() - start
    lines = [f'== {PROG} summary: {args.url_list}',
             f'  rows in             {n_in:>14,}  ({len(files)} files, {nbytes / 2**20:,.1f} MiB, '
             f'{secs:.1f} s, {n_in / max(secs, 1e-9):,.0f} rows/s)',
             f'  rows out            {n_out:>14,}  ({n_out / n_in:.1%})']
    lines += [f'  removed by clause   {n:>14,}  {label}' for n, label in zip(counts['clauses'], labels)]
    if blocked:
        lines.append(f'  removed by blocklist{counts["blocked"]:>14,}  '
                     f'({len(blocked):,} values in {block_col})')
    if seen is not None:
        lines.append(f'  removed as repeated {counts["dup"]:>14,}  (same {args.url_col} as an earlier row)')
    if hists and not args.no_plot and draw(hists, f'{meta}/{PLOT}', out_fs):
        lines.append(f'  histograms          {PLOT} ({", ".join(h[0] for h in hists)})')
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(run(args))


if __name__ == '__main__':
    main()
