#!/usr/bin/env bash
# laion_download_all.sh - download LAION-2B-en images with img2dataset into parquet shards, bytes
# exactly as the servers sent them (no resize, no re-encode), resumable, with a `done` file at the end.
#
# Example:
#   URL_LIST=/tmp/laion2b-raw OUTPUT_FOLDER=/tmp/laion2b-processed PROCESSES_COUNT=8 ./laion_download_all.sh
# On a cluster (every node reaches the bucket; pip install pyspark or ray, and s3fs, on every node):
#   DISTRIBUTOR=pyspark SPARK_MASTER=spark://head:7077 URL_LIST=s3://b/laion2b-raw \
#     OUTPUT_FOLDER=s3://b/laion2b-processed ./laion_download_all.sh
#   DISTRIBUTOR=ray RAY_ADDRESS=head:6379 URL_LIST=s3://b/laion2b-raw OUTPUT_FOLDER=s3://b/laion2b-processed \
#     ./laion_download_all.sh
#
# Reads:  the metadata parquet files in URL_LIST (LAION-2B-en: url, caption, similarity, punsafe,
#         pwatermark, hash, md5); ~2.3 billion rows in 128 files for the whole set. Other sets' metadata
#         (Re-LAION, aesthetics, DataComp, COYO, CC12M, PD12M): set DATASET (the PRESETS table below).
# Writes: OUTPUT_FOLDER/NNNNN.parquet, one shard per NUMBER_SAMPLE_PER_SHARD metadata rows, with the
#         columns punsafe, pwatermark, similarity, hash, caption, md5, url, key, status, error_message,
#         width, height, original_width, original_height (all four null: nothing is decoded), exif, jpg
#         (the downloaded bytes; null unless status is 'success'); then NNNNN_stats.json, which marks
#         the shard finished (laion_cloudwriter.py converts finished shards while this runs); and
#         `done` once every shard is finished. Read a shard with pyarrow.parquet.read_table.
# Resume: run the same command again. Shards with a _stats.json are not downloaded again; a shard cut
#         off mid-way is downloaded again from its start. `done` is removed when a run starts.
#         OUTPUT_FOLDER/download_settings.txt records what decides which rows land in which shard
#         (NUMBER_SAMPLE_PER_SHARD, the metadata files with their rows and sizes, the columns): a
#         rerun with other values is refused (exit 2) before anything is touched.
# Exit:   0 and `done` only when img2dataset finished every shard; otherwise non-zero and no `done`.
#         2: bad settings or metadata (one line says which); 130: interrupted.
#         `done` needs a _stats.json for every shard the metadata makes: ray drops a failed shard without
#         a word, and img2dataset exits 0 after failed shards on every distributor.
# At the end: a one-screen summary from the _stats.json files, also written to
#         OUTPUT_FOLDER/download_summary.txt. With CHECK_IMAGES (on by default only for multiprocessing
#         into a local folder) images that downloaded but do not decode (img2dataset marks them
#         'success', as it decodes nothing here) are counted as corrupt; otherwise they count as ok here
#         and laion_cloudwriter.py counts those whose header does not read, where it reads them anyway.
# Manual: docs/download.md (datasets, filtering, every knob, the summary, running on a cluster).
#
# Knobs: environment variables named as the img2dataset flag they set (upper case), with defaults.
# Any arguments are passed on to img2dataset (e.g. --min_image_size=64 or --user_agent_token=me);
# set the flags below through their variable, not as arguments.
#   URL_LIST                 metadata folder (or one parquet file)      /tmp/laion2b-raw
#   OUTPUT_FOLDER            folder for the shards, not URL_LIST's: local, or s3://… (any fsspec URL;
#                            needs s3fs, credentials as boto reads them; an S3-compatible endpoint in
#                            S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or
#                            FSSPEC_S3_ENDPOINT_URL, the first set winning, as in laion_cloudwriter.py).
#                            For pyspark/ray on many machines, storage every node
#                            reaches.                                   /tmp/laion2b-processed
#   PROCESSES_COUNT          download processes; half the cores, so laion_cloudwriter.py gets the rest
#   THREAD_COUNT             download threads per process               64
#   DISTRIBUTOR              multiprocessing, or pyspark / ray for many machines (needs that package)
#   SPARK_MASTER             (pyspark) the master to run on, e.g. spark://head:7077 or yarn; other Spark
#                            settings through PYSPARK_SUBMIT_ARGS      local[PROCESSES_COUNT,3]
#   RAY_ADDRESS              (ray) the cluster to join, e.g. head:6379; empty: a one-machine Ray with
#                            PROCESSES_COUNT CPUs                       (empty)
#   STORAGE_ENV              (ours; pyspark, ray) forward: carry this process's storage settings (AWS_*,
#                            FSSPEC_*, S3_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS) to every task;
#                            their names are printed, never their values. cluster: the nodes' own
#                            settings (laion_cloudwriter.py's --storage_env; once FORWARD_STORAGE_ENV
#                            =True/False, still read)                  forward
#   ENABLE_WANDB             log to Weights & Biases: needs WANDB_API_KEY or a `wandb login` done
#                            beforehand; never prompts                  False
#   NUMBER_SAMPLE_PER_SHARD  rows per shard                             10000
#   TIMEOUT                  seconds per image request                 10
#   RETRIES                  extra attempts per failed image           0
#   DATASET                  (ours) the metadata's preset: the defaults of URL_COL, CAPTION_COL,
#                            SAVE_ADDITIONAL_COLUMNS, VERIFY_HASH(_TYPE); see PRESETS    laion2b-en
#   FILTER                   (ours) Polars SQL condition rows must meet to be downloaded, e.g.
#                            'punsafe < 0.1 AND similarity >= 0.28'; NULL drops the row   (empty)
#   BLOCKLIST                (ours) comma-separated files (text, one value a line, or parquet) of
#                            BLOCKLIST_COLUMN values whose rows are dropped               (empty)
#   BLOCKLIST_COLUMN         (ours) the metadata column BLOCKLIST lists                   URL_COL
#   DEDUP                    (ours) keep only the first row of each URL                   False
#                            FILTER/BLOCKLIST/DEDUP: filter_metadata.py writes the rows kept to
#                            OUTPUT_FOLDER/_metadata once (summary, histograms, settings record);
#                            a rerun with other settings into the same OUTPUT_FOLDER is refused.
#   URL_COL, CAPTION_COL     metadata columns of the URL and caption   url, caption
#   SAVE_ADDITIONAL_COLUMNS  metadata columns kept, comma-separated    punsafe,pwatermark,similarity,hash
#   VERIFY_HASH              metadata column with each image's md5, checked against the downloaded
#                            bytes (mismatches fail as 'hash mismatch'); empty or False: do not check.
#                            Files without that column are not checked.      md5
#   VERIFY_HASH_TYPE         the hash VERIFY_HASH holds: md5, sha256 or sha512; img2dataset computes
#                            it into a column of that name (md5 but for DATASET=datacomp)   md5
#   CHECK_IMAGES             (ours) decode each new image once at the end (as laion_cloudwriter.py does:
#                            whole, under PIL's pixel limit) to count corrupt files, read
#                            back through this machine: a local OUTPUT_FOLDER only
#                            True for multiprocessing into a local folder, else False
#   PYTHON                   (ours) the interpreter with img2dataset (and pyspark or ray) that runs the
#                            download and the checks                   python3
# laion_download_aesthetic.sh runs this script with the aesthetic 4.5+ subset's defaults.
set -euo pipefail

PROG=laion_download
cores=$(nproc 2>/dev/null || echo 2)
URL_LIST=${URL_LIST:-/tmp/laion2b-raw}
OUTPUT_FOLDER=${OUTPUT_FOLDER:-/tmp/laion2b-processed}
PROCESSES_COUNT=${PROCESSES_COUNT:-$(( cores / 2 > 1 ? cores / 2 : 1 ))}
THREAD_COUNT=${THREAD_COUNT:-64}
DISTRIBUTOR=${DISTRIBUTOR:-multiprocessing}
ENABLE_WANDB=${ENABLE_WANDB:-False}
NUMBER_SAMPLE_PER_SHARD=${NUMBER_SAMPLE_PER_SHARD:-10000}
TIMEOUT=${TIMEOUT:-10}
RETRIES=${RETRIES:-0}
# DATASET presets: URL column, caption column, metadata columns kept (SAVE_ADDITIONAL_COLUMNS), the column
# with each image's hash (VERIFY_HASH; - for none) and that hash (VERIFY_HASH_TYPE). Where and how big each
# set is: docs/download.md, "Datasets". Columns img2dataset writes itself (key status width height
# original_width original_height exif error_message md5) are never kept from the metadata: it records them
# for the file it downloads; FILTER can still use them.
declare -A PRESETS=(
  [laion2b-en]='url caption punsafe,pwatermark,similarity,hash md5 md5'
  [relaion2b-en-research]='url caption punsafe,pwatermark,similarity,hash - md5'
  [relaion2b-en-research-safe]='url caption punsafe,pwatermark,similarity,hash - md5'
  [laion-aesthetics]='URL TEXT punsafe,pwatermark,similarity,hash,AESTHETIC_SCORE - md5'
  [datacomp]='url text uid,clip_b32_similarity_score,clip_l14_similarity_score sha256 sha256'
  [coyo]='url text id,clip_similarity_vitb32,clip_similarity_vitl14,watermark_score,aesthetic_score_laion_v2,nsfw_score_opennsfw2 - md5'
  [cc12m]='url caption - - md5'
  [pd12m]='url caption id,license,source hash md5'
)
DATASET=${DATASET:-laion2b-en}
read -r p_url p_caption p_keep p_verify p_type <<<"${PRESETS[$DATASET]:-url caption - - md5}"
URL_COL=${URL_COL:-$p_url}
CAPTION_COL=${CAPTION_COL:-$p_caption}
SAVE_ADDITIONAL_COLUMNS=${SAVE_ADDITIONAL_COLUMNS-${p_keep#-}}
VERIFY_HASH=${VERIFY_HASH-${p_verify#-}}
VERIFY_HASH_TYPE=${VERIFY_HASH_TYPE:-$p_type}
FILTER=${FILTER:-}
BLOCKLIST=${BLOCKLIST:-}
BLOCKLIST_COLUMN=${BLOCKLIST_COLUMN:-$URL_COL}
DEDUP=${DEDUP:-False}
SPARK_MASTER=${SPARK_MASTER:-local[$PROCESSES_COUNT,3]}  # 3: a task whose worker dies runs again
RAY_ADDRESS=${RAY_ADDRESS:-}
STORAGE_ENV=${STORAGE_ENV:-forward}
[[ $DISTRIBUTOR == multiprocessing && $OUTPUT_FOLDER != *://* ]] && check_default=True || check_default=False
CHECK_IMAGES=${CHECK_IMAGES:-$check_default}
PYTHON=${PYTHON:-python3}
export NO_ALBUMENTATIONS_UPDATE=${NO_ALBUMENTATIONS_UPDATE:-1}  # no update check in every process
# An S3-compatible endpoint under any of these names, the first set winning, in laion_cloudwriter.py's
# order (streaming's, botocore's service-specific then global, fsspec's): the pipeline's scripts then use
# one endpoint. It becomes FSSPEC_S3_ENDPOINT_URL, which s3fs takes over botocore's, for the metadata
# step, img2dataset and every engine task.
for endpoint in S3_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_ENDPOINT_URL FSSPEC_S3_ENDPOINT_URL; do
  [[ -z ${!endpoint:-} ]] || { export FSSPEC_S3_ENDPOINT_URL=${!endpoint}; break; }
done
# Flags this script sets itself: they come from the variables above or are fixed.
OWN_FLAGS='url_list output_folder processes_count thread_count distributor enable_wandb
  number_sample_per_shard timeout retries url_col caption_col save_additional_columns verify_hash
  compute_hash input_format output_format resize_mode disable_all_reencoding incremental_mode'

# How each DISTRIBUTOR starts: python run before img2dataset's own command line, in the same process,
# given its arguments ahead of img2dataset's, up to a `--`: the names of the storage settings to carry
# (STORAGE_NAMES, or none) and the values of the variables ENGINE_ARGS lists. img2dataset uses the Spark
# session that exists instead of making its own local[N] one, and joins the Ray that ray.init started.
# `storage` is the driver's storage settings, which every task gets: a cluster's workers run with the
# environment it started with. Spark hides the values of secrets (spark.redaction.regex) in its UI and
# logs; Ray gets them inside a function its workers run as they start, which it keeps in its store, as
# it keeps task arguments.
ENGINE_TAKE='end = sys.argv.index("--")
names, *engine = sys.argv[1:end]
del sys.argv[1:end + 1]
storage = {k: v for k, v in os.environ.items() if k.startswith(tuple(names.split()))}
carried = ", ".join(sorted(storage)) or "no storage settings"
print(f"laion_download: carrying to every task: {carried} (values not shown)", file=sys.stderr)'
# A row whose hash column (VERIFY_HASH) is null: img2dataset 1.47 compares the file's hash with None and
# drops the row as 'hash mismatch'. Here it is downloaded without the check and counted in its shard's
# _stats.json under UNHASHED; a hash that differs is still refused. The one line of img2dataset's
# Downloader.download_shard that decides is rewritten (its source, read where it runs); an img2dataset
# without that line fails every shard (img2dataset names each, and no `done` is written).
UNHASHED_SHIM='import importlib
import inspect
import re
import textwrap

from img2dataset.downloader import Downloader

UNHASHED = "no hash to verify: downloaded unchecked"
HASH_CHECK = re.compile(r"^( +)if hash_indice is not None:$", re.M)


def unhashed_unchecked(method):
    """`method` (download_shard) with its hash check skipped where the row has no hash."""
    source = textwrap.dedent(inspect.getsource(method))
    if len(HASH_CHECK.findall(source)) != 1:
        raise RuntimeError("laion_download: this img2dataset checks hashes elsewhere; install the "
                           "img2dataset version of requirements.txt")
    source = HASH_CHECK.sub(lambda m: f"{m[1]}if hash_indice is not None and sample_data[hash_indice] is None:\n"
                                      f"{m[1]}    status_dict.increment(UNHASHED)\n"
                                      f"{m[1]}elif hash_indice is not None:", source)
    scope = {**vars(inspect.getmodule(method)), "UNHASHED": UNHASHED}
    exec(compile(source, inspect.getsourcefile(method), "exec"), scope)
    return scope[method.__name__]


class UnhashedUnchecked(Downloader):
    def download_shard(self, row):
        return unhashed_unchecked(Downloader.download_shard)(self, row)


importlib.import_module("img2dataset.main").Downloader = UnhashedUnchecked  # the package names a function main'
declare -A ENGINE_ARGS=([multiprocessing]='' [pyspark]='SPARK_MASTER' [ray]='RAY_ADDRESS PROCESSES_COUNT')
declare -A ENGINE_START=(
  [multiprocessing]=''
  [pyspark]='from pyspark.sql import SparkSession
builder = SparkSession.builder.master(engine[0]).appName("laion_download")
for name, value in storage.items():
    builder = builder.config(f"spark.executorEnv.{name}", value)
spark = builder.getOrCreate()
print(f"laion_download: spark master {spark.sparkContext.master}", file=sys.stderr)'
  [ray]='import ray
address = engine[0] or None
def set_storage_env(storage=storage):  # as the worker starts: not env_vars, which Ray logs in clear
    os.environ.update(storage)
    import fsspec.config  # fsspec read FSSPEC_* when imported
    fsspec.config.set_conf_env(fsspec.config.conf)
ray.init(address=address, num_cpus=None if address else int(engine[1]),
         runtime_env={"worker_process_setup_hook": set_storage_env} if storage else None)
print(f"laion_download: ray at {ray.get_runtime_context().gcs_address}", file=sys.stderr)'
)
# The storage settings carried to the tasks of pyspark and ray: variables with these names or name
# prefixes (boto's and s3fs's endpoint, region, profile, config files, credentials; gcsfs's key file).
# STORAGE_ENV=cluster carries none (instance roles, or settings the cluster has itself).
STORAGE_NAMES='AWS_ FSSPEC_ S3_ENDPOINT_URL GOOGLE_APPLICATION_CREDENTIALS'

die() { echo "$PROG: error: $*" >&2; exit 2; }

# True for True/true/1/yes/on, false for False/false/0/no/off/empty; anything else is an error.
truthy() {
  case "${2,,}" in
    true | 1 | yes | on) return 0 ;;
    false | 0 | no | off | '') return 1 ;;
    *) die "$1=$2: expected True or False" ;;
  esac
}

# True when PYTHON can import the module $1 (found, not imported: quick).
has_module() {
  "$PYTHON" -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('$1'))" 2>/dev/null
}

# Settings: numbers, the distributor, wandb credentials and pass-through arguments.
check_settings() {
  local var arg flag
  for var in PROCESSES_COUNT THREAD_COUNT NUMBER_SAMPLE_PER_SHARD TIMEOUT; do
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "$var=${!var}: expected a positive whole number"
  done
  [[ $RETRIES =~ ^[0-9]+$ ]] || die "RETRIES=$RETRIES: expected a whole number"
  [[ -v PRESETS[$DATASET] ]] || die "DATASET=$DATASET: expected one of ${!PRESETS[*]}"
  [[ $VERIFY_HASH_TYPE =~ ^(md5|sha256|sha512)$ ]] ||
    die "VERIFY_HASH_TYPE=$VERIFY_HASH_TYPE: expected md5, sha256 or sha512"
  [[ ! ${VERIFY_HASH,,} =~ ^(0|false|no|off|none)$ ]] || VERIFY_HASH=''  # a column name, or none
  for var in key status width height original_width original_height exif error_message md5; do
    [[ ,$SAVE_ADDITIONAL_COLUMNS, != *,$var,* ]] || die "SAVE_ADDITIONAL_COLUMNS names '$var': img2dataset" \
      "writes that column itself for the image it downloads; drop it (FILTER can still use it)"
  done
  truthy DEDUP "$DEDUP" && DEDUP=True || DEDUP=False
  case "$DISTRIBUTOR" in
    multiprocessing) ;;
    pyspark | ray) has_module "$DISTRIBUTOR" ||
      die "DISTRIBUTOR=$DISTRIBUTOR needs the $DISTRIBUTOR package (pip install $DISTRIBUTOR)" ;;
    *) die "DISTRIBUTOR=$DISTRIBUTOR: expected multiprocessing, pyspark or ray" ;;
  esac
  if truthy ENABLE_WANDB "$ENABLE_WANDB"; then
    ENABLE_WANDB=True
    [[ -n ${WANDB_API_KEY:-} || ${WANDB_MODE:-} =~ ^(offline|disabled|dryrun)$ ]] ||
      grep -qs api.wandb.ai "${NETRC:-$HOME/.netrc}" ||
      die "ENABLE_WANDB=True but wandb has no credentials: set WANDB_API_KEY (or WANDB_MODE=offline)"
  else
    ENABLE_WANDB=False
  fi
  if [[ -n ${FORWARD_STORAGE_ENV:-} ]]; then  # STORAGE_ENV's old name
    truthy FORWARD_STORAGE_ENV "$FORWARD_STORAGE_ENV" && STORAGE_ENV=forward || STORAGE_ENV=cluster
    echo "$PROG: note: FORWARD_STORAGE_ENV is deprecated: read as STORAGE_ENV=$STORAGE_ENV" >&2
  fi
  [[ $STORAGE_ENV =~ ^(forward|cluster)$ ]] || die "STORAGE_ENV=$STORAGE_ENV: expected forward or cluster"
  check_output_folder
  if truthy CHECK_IMAGES "$CHECK_IMAGES"; then
    CHECK_IMAGES=True
    [[ $OUTPUT_FOLDER != *://* ]] || die "CHECK_IMAGES=True reads every image back through this machine:" \
      "only for a local OUTPUT_FOLDER, not $OUTPUT_FOLDER (laion_cloudwriter.py counts unreadable images)"
  else
    CHECK_IMAGES=False
  fi
  has_module img2dataset || die "PYTHON=$PYTHON has no img2dataset (pip install -r requirements.txt)"
  for arg in "$@"; do
    for flag in $OWN_FLAGS; do
      [[ ${arg//-/_} == "__$flag" || ${arg//-/_} == "__$flag="* ]] &&
        die "argument $arg: this script sets --$flag itself (set ${flag^^} instead, where it is a knob)"
    done
  done
  return 0
}

# A local OUTPUT_FOLDER: new or existing, in a folder we can write to, not a file or under one, and
# not the metadata's own folder
# (the shards, named NNNNN.parquet like many metadata files, would mix with and could overwrite the
# metadata, and a rerun would read them as metadata). Paths are compared after resolving symlinks.
check_output_folder() {
  local meta_dir there=$OUTPUT_FOLDER
  [[ $OUTPUT_FOLDER != *://* ]] || return 0  # a URL: claim checks it can be reached
  while [[ ! -e $there && $there != "$(dirname -- "$there")" ]]; do there=$(dirname -- "$there"); done
  [[ -d $there ]] || die "OUTPUT_FOLDER=$OUTPUT_FOLDER: $there exists and is not a folder;" \
    'point OUTPUT_FOLDER at a folder (new or existing)'
  [[ -w $there ]] || die "OUTPUT_FOLDER=$OUTPUT_FOLDER: $there is not writable by $(id -un);" \
    'pick a folder you can write to'
  if [[ $URL_LIST != *://* ]]; then
    meta_dir=$URL_LIST
    [[ -d $URL_LIST ]] || meta_dir=$(dirname -- "$URL_LIST")
    [[ $(realpath -m -- "$OUTPUT_FOLDER") != "$(realpath -m -- "$meta_dir")" ]] ||
      die "OUTPUT_FOLDER=$OUTPUT_FOLDER is the metadata folder of URL_LIST=$URL_LIST; the shards" \
        'would mix with the metadata files: pick another OUTPUT_FOLDER'
  fi
  return 0
}

# The embedded Python pieces, one job each, taking their inputs as arguments. Each fails with one
# `laion_download: error:` line and a non-zero exit (the caller exits 2 or counts the run unfinished).

# The metadata's plan, from its parquet footers only: one line on a missing or empty folder, a file that
# does not read or lacks a column. Prints "<hash column to verify, or -> <shards> <rows> <layout>", the
# layout being the files in order with their rows and sizes, which the shard ids follow.
# Arguments: URL_LIST, NUMBER_SAMPLE_PER_SHARD, VERIFY_HASH (empty: none), then KNOB=column for each
# column the download reads.
plan() {
  "$PYTHON" - "$@" <<'EOF'
import hashlib
import math
import sys

import fsspec
import pyarrow.parquet as pq

url_list, per_shard, verify, *columns = sys.argv[1:]
per_shard = int(per_shard)
try:
    fs, path = fsspec.core.url_to_fs(url_list)
    exists = fs.exists(path)
except Exception as err:  # no filesystem for it (s3fs missing), no credentials
    sys.exit(f"laion_download: error: URL_LIST={url_list}: cannot reach it "
             f"({type(err).__name__}: {' '.join(str(err).split())[:300]})")
if not exists:
    sys.exit(f'laion_download: error: URL_LIST={url_list}: no such folder or file')
files = sorted(fs.glob(path.rstrip('/') + '/*.parquet')) if fs.isdir(path) else [path]
if not files:
    sys.exit(f'laion_download: error: URL_LIST={url_list}: the folder holds no *.parquet metadata files')
rows = shards = unhashed = 0
layout = hashlib.sha256()
for f in files:
    try:
        with fs.open(f, 'rb') as fh:
            meta = pq.ParquetFile(fh)
            names, n = meta.schema_arrow.names, meta.metadata.num_rows
        size = fs.size(f)
    except Exception as err:  # any reason a footer does not read: name the file, not the traceback
        sys.exit(f'laion_download: error: {f}: not a readable parquet file ({type(err).__name__}: {err})')
    for knob, col in (c.split('=', 1) for c in columns):
        if col not in names:
            sys.exit(f"laion_download: error: {f}: no column '{col}' ({knob}); its columns: {', '.join(names)}")
    unhashed += bool(verify) and verify not in names
    rows += n
    shards += math.ceil(n / per_shard)
    layout.update(f"{f.rsplit('/', 1)[-1]}\t{n}\t{size}\n".encode())
if unhashed:
    print(f"laion_download: note: {unhashed} of {len(files)} metadata files have no column '{verify}' "
          '(VERIFY_HASH): the hash is computed but not verified', file=sys.stderr)
    verify = ''
print(f'laion_download: {len(files)} metadata files, {rows} rows -> {shards} shards of up to {per_shard}'
      + (f", hash verified against column '{verify}'" if verify else ''), file=sys.stderr)
print(verify or '-', shards, rows, f'{len(files)} files, {rows} rows, sha256 {layout.hexdigest()[:16]}')
EOF
}

# Claims OUTPUT_FOLDER for this run: refuses settings other than those its download_settings.txt records
# (a rerun with them would repeat or drop rows beside the finished shards), then makes the folder (the
# first write: an endpoint, bucket or credentials that do not work stop the run here), writes the record,
# removes `done` and leaves a placeholder download_summary.txt.
# Arguments: OUTPUT_FOLDER, then KEY=value for each setting the record holds.
claim() {
  "$PYTHON" - "$@" <<'EOF'
import sys

import fsspec

output_folder, *pairs = sys.argv[1:]
settings = dict(pair.split('=', 1) for pair in pairs)


def unreachable(err: Exception) -> None:
    sys.exit(f'laion_download: error: OUTPUT_FOLDER={output_folder}: cannot reach it '
             f"({type(err).__name__}: {' '.join(str(err).split())[:300]})")


try:
    fs, out = fsspec.core.url_to_fs(output_folder)
    record = out + '/download_settings.txt'
    lines = fs.cat_file(record).decode().splitlines() if fs.exists(record) else []
except Exception as err:  # no filesystem for it (s3fs missing), no credentials, no endpoint
    unreachable(err)
recorded = dict(line.split('=', 1) for line in lines if '=' in line and not line.startswith('#'))
for key in (k for k in settings if k in recorded and recorded[k] != settings[k]):
    sys.exit(f'laion_download: error: OUTPUT_FOLDER={output_folder} holds shards made with '
             f'{key}={recorded[key]}, not {settings[key]} (download_settings.txt): rerun with those '
             'settings, or pick a new OUTPUT_FOLDER')
try:
    fs.makedirs(out, exist_ok=True)
    head = '# laion_download_all.sh: a rerun into this folder must have these settings\n'
    fs.pipe_file(record, (head + ''.join(f'{k}={v}\n' for k, v in {**recorded, **settings}.items())).encode())
    if fs.exists(out + '/done'):
        fs.rm(out + '/done')
    fs.pipe_file(out + '/download_summary.txt', b'laion_download: running; the summary comes last\n')
except Exception as err:
    unreachable(err)
EOF
}

# CHECK_IMAGES: decodes the 'success' images of each finished shard not checked yet, in PROCESSES_COUNT
# processes, and records "<shard> <its stats' end_time> <images checked> <corrupt>" lines in the local
# OUTPUT_FOLDER/.image_check.tsv (a shard downloaded again has a new end_time: it is checked again).
# Arguments: OUTPUT_FOLDER (a local path), PROCESSES_COUNT.
check_images() {
  "$PYTHON" - "$@" <<'EOF'
import glob
import io
import json
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor

import pyarrow.parquet as pq
from PIL import Image

out, processes = sys.argv[1], int(sys.argv[2])
CACHE = os.path.join(out, '.image_check.tsv')
# Over PIL's pixel limit is a decompression bomb, refused as laion_cloudwriter.py refuses it.
warnings.simplefilter('error', Image.DecompressionBombWarning)


def decodes(data: bytes) -> bool:
    """True when PIL's defaults decode the whole file, as laion_cloudwriter.py (--verify full) and a
    trainer's loader do: Image.open(...).load(), under the pixel limit (no draft(): it skips data)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def check_shard(path: str) -> tuple[int, int] | None:
    """(images checked, corrupt) among a shard's 'success' rows; None when the shard is gone (the
    cloudwriter converted and removed it) or does not read."""
    checked = corrupt = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=['status', 'jpg']):
            for status, data in zip(batch.column('status').to_pylist(), batch.column('jpg').to_pylist()):
                if status == 'success':
                    checked += 1
                    corrupt += not decodes(data or b'')
    except Exception:
        return None
    return checked, corrupt


def end_time(stats: str) -> str | None:
    """The shard's end_time as the cache keys it; None when its stats went away (the cloudwriter)."""
    try:
        with open(stats) as f:
            return repr(json.load(f)['end_time'])
    except FileNotFoundError:
        return None


cache = {}  # (shard, end_time) -> 'images checked\tcorrupt'
if os.path.exists(CACHE):
    for line in open(CACHE).read().splitlines():
        shard, end, counts = line.split('\t', 2)
        cache[(shard, end)] = counts
todo = []
for stats in sorted(glob.glob(os.path.join(out, '*_stats.json'))):
    shard = os.path.basename(stats).split('_')[0]
    key = (shard, end_time(stats))
    if key[1] is not None and key not in cache and os.path.exists(os.path.join(out, shard + '.parquet')):
        todo.append(key)
if todo:
    print(f'laion_download: checking that the images of {len(todo)} new shards decode ...', flush=True)
    with ProcessPoolExecutor(min(len(todo), processes)) as pool:
        for key, got in zip(todo, pool.map(check_shard, [os.path.join(out, s + '.parquet') for s, _ in todo])):
            if got is not None:
                cache[key] = f'{got[0]}\t{got[1]}'
    with open(CACHE + '.tmp', 'w') as f:  # then renamed: a run killed while writing leaves the old one
        f.writelines(f'{s}\t{end}\t{counts}\n' for (s, end), counts in cache.items())
    os.replace(CACHE + '.tmp', CACHE)
EOF
}

# The one-screen summary over every *_stats.json, printed and written to OUTPUT_FOLDER/download_summary.txt,
# with the corrupt images check_images counted (CHECK_IMAGES). Writes `done` and exits 0 when img2dataset
# exited 0 and every expected shard has its _stats.json; exits 1 otherwise.
# Arguments: OUTPUT_FOLDER, expected shards, the run's start (epoch s), img2dataset's exit code,
# CHECK_IMAGES (True: read OUTPUT_FOLDER/.image_check.tsv).
summarize() {
  "$PYTHON" - "$@" <<'EOF'
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import fsspec
from fsspec.implementations.local import LocalFileSystem

output_folder, expected, start, img2dataset_rc, check = sys.argv[1:]
fs, out = fsspec.core.url_to_fs(output_folder)
expected, start, check = int(expected), float(start), check == 'True'
READERS = 32  # _stats.json files read at once: at 230k shards in a bucket, one by one takes hours
CHUNK = 4096  # files handed to the readers at a time: their stats are counted, then dropped
UNHASHED = 'no hash to verify: downloaded unchecked'  # UNHASHED_SHIM's count, in status_dict


def read_stats(path: str) -> tuple[str, dict] | None:
    """(shard name, its stats); None when the file went away (renamed by the cloudwriter)."""
    try:
        return path.rsplit('/', 1)[-1].split('_')[0], json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


# Stats before parquets: laion_cloudwriter.py, running beside, deletes a parquet and then renames its
# stats to NNNNN_converted.json (same content), so a parquet seen after its stats were missed is a
# shard img2dataset did not finish. Converted after stats: a rename between the two listings is caught.
paths = sorted(fs.glob(out + '/*_stats.json')) + sorted(fs.glob(out + '/*_converted.json'))
sizes = {f['name'].rsplit('/', 1)[-1][:-len('.parquet')]: f['size']
         for f in fs.ls(out, detail=True) if f['name'].endswith('.parquet')}
checked = {}  # (shard, end_time) -> (images checked, corrupt), as check_images wrote them
if check and fs.exists(out + '/.image_check.tsv'):
    for line in fs.cat_file(out + '/.image_check.tsv').decode().splitlines():
        shard, end, n, bad = line.split('\t')
        checked[(shard, end)] = (int(n), int(bad))

# Each shard's stats are counted as they are read, then dropped: only the ids stay (230k stats files hold
# ~1.5 GB as Python objects)
reasons: dict[str, int] = {}
finished: set[str] = set()
count = successes = corrupt = unchecked = nbytes = n_new = n_new_shards = 0
new_start, new_end = float('inf'), float('-inf')
with ThreadPoolExecutor(READERS) as pool:
    for i in range(0, len(paths), CHUNK):
        for s, st in filter(None, pool.map(read_stats, paths[i:i + CHUNK])):
            if s in finished:  # renamed to _converted.json between the two listings: read twice
                continue
            finished.add(s)
            count += st['count']
            successes += st['successes']
            for reason, n in st['status_dict'].items():
                if reason != 'success':
                    reasons[reason] = reasons.get(reason, 0) + n
            got = checked.get((s, repr(st['end_time'])))
            corrupt += got[1] if got else 0
            unchecked += 0 if got else st['successes']
            nbytes += sizes.get(s, 0)
            if st['end_time'] >= start:  # finished by this run
                n_new, n_new_shards = n_new + st['count'], n_new_shards + 1
                new_start, new_end = min(new_start, st['start_time']), max(new_end, st['end_time'])
if corrupt:
    reasons['corrupt: downloaded but does not decode'] = corrupt
unhashed = reasons.pop(UNHASHED, 0)  # downloaded, counted in successes: not a failure
done_ids = {int(s) for s in finished}
missing = [f'{i:05d}' for i in range(expected) if i not in done_ids]
partial = sum(s in sizes for s in missing)
complete = not missing and img2dataset_rc == '0'

lines = [f'== laion_download summary: {output_folder}',
         f'  shards finished     {len(finished):>10,}  of {expected:,} expected']
if missing:
    lines.append(f"  shards unfinished   {len(missing):>10,}  (no _stats.json: {', '.join(missing[:5])}"
                 f"{' ...' if len(missing) > 5 else ''}; {partial:,} of them left a parquet)")
lines.append(f'  rows                {count:>10,}')
lines.append(f'  images ok           {successes - corrupt:>10,}' + (
    f'  ({unchecked:,} not checked for corruption)' if check and unchecked else '' if check else
    '  (not decoded: laion_cloudwriter.py counts those whose header does not read)'))
if unhashed:
    lines.append(f'  no hash, unchecked  {unhashed:>10,}  (of images ok: null in the VERIFY_HASH column, '
                 'so downloaded without the hash check)')
lines.append(f'  failures            {count - successes + corrupt:>10,}')
for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:8]:
    lines.append(f"    {n:>10,}  {' '.join(reason.split())[:90]}")
if len(reasons) > 8:
    lines.append(f'    {sum(sorted(reasons.values())[:-8]):>10,}  ({len(reasons) - 8} other reasons)')
lines.append(f'  bytes               {nbytes:>10,}  ({nbytes / 2**20:,.1f} MiB of finished shards here)')
if n_new_shards:
    secs = new_end - new_start
    lines.append(f'  this run            {n_new:>10,}  rows in {n_new_shards} shards, {secs:.1f} s, '
                 f'{n_new / max(secs, 1e-9):,.0f} rows/s')
text = '\n'.join(lines) + '\n'
print('\n' + text, end='', flush=True)
fs.pipe_file(out + '/download_summary.txt', text.encode())
if complete:
    if not isinstance(fs, LocalFileSystem) and fs.exists(out + '/_tmp'):
        fs.rm(out + '/_tmp', recursive=True)  # img2dataset's shard inputs: it removes them only locally
    fs.touch(out + '/done')
sys.exit(0 if complete else 1)
EOF
}

# The metadata img2dataset reads: URL_LIST itself, or with FILTER/BLOCKLIST/DEDUP the rows they keep, written
# once to OUTPUT_FOLDER/_metadata by filter_metadata.py (reused by a rerun with the same settings; other
# settings are refused there). Prints the folder to read.
filter_step() {
  local flags=(--url_list="$URL_LIST" --output_folder="$OUTPUT_FOLDER" --filter="$FILTER"
    --blocklist="$BLOCKLIST" --blocklist_column="$BLOCKLIST_COLUMN" --url_col="$URL_COL"
    --caption_col="$CAPTION_COL" --require="$SAVE_ADDITIONAL_COLUMNS")
  [[ $DEDUP == True ]] && flags+=(--dedup)
  "$PYTHON" "$(dirname -- "${BASH_SOURCE[0]}")/filter_metadata.py" "${flags[@]}"
}

main() {
  check_settings "$@"
  local planned verify expected rows layout col var rc=0 run_start engine=() columns=()
  URL_LIST=$(filter_step) || exit 2
  columns=("URL_COL=$URL_COL" "CAPTION_COL=$CAPTION_COL")
  for col in ${SAVE_ADDITIONAL_COLUMNS//,/ }; do columns+=("SAVE_ADDITIONAL_COLUMNS=$col"); done
  planned=$(plan "$URL_LIST" "$NUMBER_SAMPLE_PER_SHARD" "$VERIFY_HASH" "${columns[@]}") || exit 2
  read -r verify expected rows layout <<<"$planned"
  # What decides which metadata rows land in which shard id, and the shards' columns: a rerun into this
  # OUTPUT_FOLDER with other values would repeat or drop rows. Add a setting that does the same (a filter
  # of the rows) as one more entry here.
  claim "$OUTPUT_FOLDER" "NUMBER_SAMPLE_PER_SHARD=$NUMBER_SAMPLE_PER_SHARD" "metadata=$layout" \
    "URL_COL=$URL_COL" "CAPTION_COL=$CAPTION_COL" "SAVE_ADDITIONAL_COLUMNS=$SAVE_ADDITIONAL_COLUMNS" || exit 2
  trap 'echo "$PROG: interrupted: no done file; run the same command again to resume" >&2; exit 130' INT

  local args=(
    --url_list="$URL_LIST" --output_folder="$OUTPUT_FOLDER"
    --input_format=parquet --output_format=parquet
    --url_col="$URL_COL" --caption_col="$CAPTION_COL" --compute_hash="$VERIFY_HASH_TYPE"
    --resize_mode=no --disable_all_reencoding=True
    --processes_count="$PROCESSES_COUNT" --thread_count="$THREAD_COUNT" --distributor="$DISTRIBUTOR"
    --enable_wandb="$ENABLE_WANDB" --number_sample_per_shard="$NUMBER_SAMPLE_PER_SHARD"
    --timeout="$TIMEOUT" --retries="$RETRIES"
  )
  [[ -n $SAVE_ADDITIONAL_COLUMNS ]] &&
    args+=(--save_additional_columns="[\"${SAVE_ADDITIONAL_COLUMNS//,/\",\"}\"]")
  [[ $verify != - ]] && args+=(--verify_hash="[\"$verify\",\"$VERIFY_HASH_TYPE\"]")

  local start=${ENGINE_START[$DISTRIBUTOR]}
  if [[ -n $start ]]; then
    [[ $STORAGE_ENV == forward ]] && engine=("$STORAGE_NAMES") || engine=('')
    for var in ${ENGINE_ARGS[$DISTRIBUTOR]}; do engine+=("${!var}"); done
    engine+=(--)
  fi
  # The engine starts first in the same python process (ENGINE_START), then img2dataset's command line,
  # from a file: multiprocessing's (spawned) workers import it to find UNHASHED_SHIM's Downloader, which
  # pyspark and ray carry to their workers by value. (Global: the EXIT trap removes it.)
  launcher=$(mktemp -d)/laion_download_img2dataset.py
  trap 'rm -rf -- "${launcher%/*}"' EXIT
  { printf '%s\n' "$UNHASHED_SHIM" "if __name__ == '__main__':"
    printf '%s\n' 'import os, sys' ${start:+"$ENGINE_TAKE" "$start"} 'from img2dataset import main' 'main()' |
      sed 's/^/    /'
  } >"$launcher"
  run_start=$(date +%s)
  # stdin from /dev/null: nothing (wandb included) can wait for an answer in an unattended job.
  PYTHONUNBUFFERED=1 "$PYTHON" "$launcher" "${engine[@]}" "${args[@]}" "$@" </dev/null 2>&1 || rc=$?
  # img2dataset exits 0 even after failed shards (ray does not even retry them): summarize decides.
  if ! { [[ $CHECK_IMAGES == False ]] || check_images "$OUTPUT_FOLDER" "$PROCESSES_COUNT"; } ||
    ! summarize "$OUTPUT_FOLDER" "$expected" "$run_start" "$rc" "$CHECK_IMAGES"; then
    echo "$PROG: download incomplete (img2dataset exit code $rc): no done file;" \
      'run the same command again to resume' >&2
    exit $(( rc != 0 ? rc : 1 ))
  fi
  echo "$PROG: done: $OUTPUT_FOLDER/done ($rows metadata rows)"
}

main "$@"
