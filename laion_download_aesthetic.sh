#!/usr/bin/env bash
# laion_download_aesthetic.sh - download the LAION-2B-en aesthetic 4.5+ subset with img2dataset into
# parquet shards, bytes exactly as downloaded, resumable, with a `done` file at the end.
#
# Example:
#   URL_LIST=/tmp/laion2b-4.5-raw OUTPUT_FOLDER=/tmp/laion2b-processed ./laion_download_aesthetic.sh
#
# Reads:  the subset's metadata parquet files in URL_LIST (URL, TEXT, WIDTH, HEIGHT, similarity,
#         punsafe, pwatermark, hash, AESTHETIC_SCORE).
# Writes: what laion_download_all.sh writes, with AESTHETIC_SCORE kept, caption from TEXT, url from URL,
#         and md5 computed from the bytes (the subset has no md5 to verify against).
#
# This script is laion_download_all.sh with the subset's columns: it sets these defaults and runs its
# sibling from the same folder (copy the two together). Every knob and argument of
# laion_download_all.sh works here; only these defaults differ:
#   URL_LIST                 /tmp/laion2b-4.5-raw
#   URL_COL, CAPTION_COL     URL, TEXT
#   SAVE_ADDITIONAL_COLUMNS  punsafe,pwatermark,similarity,hash,AESTHETIC_SCORE
#   VERIFY_HASH              empty (nothing to verify against)
# Manual: docs/download.md.
set -euo pipefail

export URL_LIST=${URL_LIST:-/tmp/laion2b-4.5-raw}
export URL_COL=${URL_COL:-URL}
export CAPTION_COL=${CAPTION_COL:-TEXT}
export SAVE_ADDITIONAL_COLUMNS=${SAVE_ADDITIONAL_COLUMNS-punsafe,pwatermark,similarity,hash,AESTHETIC_SCORE}
export VERIFY_HASH=${VERIFY_HASH-}
exec "$(dirname "${BASH_SOURCE[0]}")/laion_download_all.sh" "$@"
