"""laion_download_all.sh on Spark and Ray, and into S3, as a user with a cluster runs it.

Spark is a standalone master and one worker on 127.0.0.1, started once here, that each run joins through
SPARK_MASTER; Ray is one node on 127.0.0.1 that this module starts once and every run joins through
RAY_ADDRESS: the way each joins a cluster (Ray takes the
machine's own address even when given 127.0.0.1, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 says this
is a one-machine Ray, as on a laptop). S3 is the
test bed's moto server. Each run costs ~30-60 s (a JVM or a Ray driver, then img2dataset).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_download import (
    PER_SHARD,
    SCRIPTS,
    check_rows,
    expected_summary,
    full_entries,
    read_output,
    script_env,
    summary,
)
from testbed.corpus import good_items
from testbed.engines import spark_standalone
from testbed.laion_meta import entries_for, full_table

# No usage stats, loopback only, no token (a cluster on loopback has nothing to keep out).
RAY_ENV = {'RAY_USAGE_STATS_ENABLED': '0', 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0',
           'RAY_AUTH_MODE': 'disabled'}
os.environ.update(RAY_ENV)  # read when ray is imported
import pyspark  # noqa: E402, F401  (test dependencies, requirements-dev.txt: a missing one fails, not skips)
import ray  # noqa: E402

SPARK_ENV = {
    'SPARK_LOCAL_IP': '127.0.0.1', 'PYSPARK_PYTHON': sys.executable,
    'SPARK_MASTER_OPTS': '-Dspark.master.rest.enabled=false',
    'PYSPARK_SUBMIT_ARGS': '--conf spark.driver.host=127.0.0.1 --conf spark.driver.bindAddress=127.0.0.1 '
                           '--conf spark.ui.enabled=false --conf spark.executor.memory=512m pyspark-shell',
}

# Each engine's own logs, filled in by its fixture: no secret may be written there.
LOGS: dict[str, Path] = {}
# The names of storage settings (laion_download_all.sh's STORAGE_ENV): no engine starts with them.
STORAGE = ('AWS_', 'FSSPEC_', 'S3_ENDPOINT_URL', 'GOOGLE_APPLICATION_CREDENTIALS')


@pytest.fixture(scope='module')
def spark_master(tmp_path_factory):
    """A standalone Spark master and worker on 127.0.0.1, started (as on a cluster) without any storage
    settings; its URL."""
    logs = LOGS['pyspark'] = tmp_path_factory.mktemp('spark')
    with spark_standalone(logs, {k: v for k, v in os.environ.items() if not k.startswith(STORAGE)}) as url:
        yield url


@pytest.fixture(scope='module')
def ray_address():
    """One Ray node on 127.0.0.1, started here before any job and without any storage settings, as a
    cluster is started: what a task needs to reach the bucket comes with the job."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(STORAGE)}
    try:
        ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        os.environ.update(saved)
    assert ctx.address_info['gcs_address'].startswith('127.0.0.1:')
    LOGS['ray'] = Path(ctx.address_info['session_dir'])
    yield ctx.address_info['gcs_address']
    ray.shutdown()


@pytest.fixture
def engine_env(request):
    """The knobs that pick the engine named by the test's parameter, joined to its cluster."""
    if request.param == 'pyspark':
        return {'DISTRIBUTOR': 'pyspark', 'SPARK_MASTER': request.getfixturevalue('spark_master'),
                **SPARK_ENV}
    ray_address = request.getfixturevalue('ray_address')
    return {'DISTRIBUTOR': 'ray', 'RAY_ADDRESS': ray_address, **RAY_ENV}


def run(meta: str, out: str, **knobs: str) -> subprocess.CompletedProcess:
    env = script_env(meta, out, **knobs)
    return subprocess.run([str(SCRIPTS['full'])], env=env, capture_output=True, text=True, timeout=400)


def shard_paths(entries: list) -> list[set[str]]:
    """The server paths each shard requests."""
    paths = [urlparse(e.url).path for e, _ in entries]
    return [set(paths[i:i + PER_SHARD]) for i in range(0, len(paths), PER_SHARD)]


@pytest.mark.parametrize('engine_env', ['pyspark', 'ray'], indirect=True)
def test_engine_counts_a_failed_shard_and_the_rerun_fetches_only_it(engine_env, image_server, tmp_path):
    # Shard 1 cannot be written (its file name is taken by a folder, as on a full disk): img2dataset
    # on Spark retries it and gives up, on Ray drops it without a word; both exit 0.
    entries, table = full_entries(image_server, slow=False)
    (tmp_path / 'raw').mkdir()
    pq.write_table(table, tmp_path / 'raw' / 'part-00000.parquet')
    out = tmp_path / 'out'
    (out / '00001.parquet').mkdir(parents=True)
    # The tasks need no storage settings here: the first run keeps them back as the cloudwriter's
    # spelling says, the rerun as the old one did.
    first = run(tmp_path / 'raw', out, CHECK_IMAGES='True', STORAGE_ENV='cluster', **engine_env)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert 'carrying to every task: no storage settings (values not shown)' in first.stdout
    assert 'no done file' in first.stderr and not (out / 'done').exists()
    assert re.search(r'shards unfinished +1 +\(no _stats.json: 00001;', first.stdout)
    assert (out / 'download_summary.txt').read_text() in first.stdout
    engine_line = {'pyspark': f"spark master {engine_env.get('SPARK_MASTER')}",
                   'ray': f"ray at {engine_env.get('RAY_ADDRESS')}"}
    assert engine_line[engine_env['DISTRIBUTOR']] in first.stdout  # the cluster we named, not a new one

    (out / '00001.parquet').rmdir()
    before = dict(image_server.hits)
    again = run(tmp_path / 'raw', out, CHECK_IMAGES='True', FORWARD_STORAGE_ENV='False', **engine_env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (out / 'done').exists()
    assert again.stderr.startswith(
        'laion_download: note: FORWARD_STORAGE_ENV is deprecated: read as STORAGE_ENV=cluster\n')
    assert 'carrying to every task: no storage settings (values not shown)' in again.stdout
    per_shard = shard_paths(entries)
    others = set().union(*per_shard[:1], *per_shard[2:]) - per_shard[1]
    fetched = {p: image_server.hits[p] - before.get(p, 0) for p in set().union(*per_shard)}
    assert {p: fetched[p] for p in others} == dict.fromkeys(others, 0)
    assert all(fetched[p] > 0 for p in per_shard[1] - others)
    shards = len(per_shard)
    assert sorted(p.name for p in out.glob('*_stats.json')) == [f'{s:05d}_stats.json' for s in range(shards)]
    check_rows(read_output(out), entries, ['punsafe', 'pwatermark', 'similarity', 'hash'])
    got = summary(again.stdout)
    assert got.pop('shards finished') == shards
    assert got == expected_summary(entries)  # corrupt files counted: CHECK_IMAGES on a local folder


@pytest.mark.parametrize('engine_env', ['pyspark', 'ray'], indirect=True)
def test_s3_in_and_out_on_a_cluster_started_without_storage_settings(engine_env, image_server, s3):
    # The metadata and the shards both in the bucket, the download on the cluster's workers, which were
    # started without the endpoint or credentials: the job carries them (and never shows the secret).
    entries, table = full_entries(image_server, slow=False)
    client = s3.client()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket=s3.bucket, Key='laion2b-raw/part-00000.parquet', Body=buf.getvalue())
    url_list, out = f's3://{s3.bucket}/laion2b-raw', f's3://{s3.bucket}/laion2b-processed'
    secret = f'secret-{s3.bucket}'  # moto takes any key: this one must appear nowhere but in the tasks
    knobs = dict(s3.env, AWS_SECRET_ACCESS_KEY=secret, **engine_env)
    proc = run(url_list, out, **knobs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    carried = re.search(r'carrying to every task: (.*) \(values not shown\)', proc.stdout).group(1)
    assert {'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_DEFAULT_REGION', 'FSSPEC_S3_ENDPOINT_URL',
            'S3_ENDPOINT_URL'} <= set(carried.split(', '))
    assert secret not in proc.stdout + proc.stderr
    shards = -(-len(entries) // PER_SHARD)
    keys = s3.list_keys(s3.bucket, 'laion2b-processed/')
    names = [f'{s:05d}{suffix}' for s in range(shards) for suffix in ('.parquet', '_stats.json')]
    assert sorted(k.split('/', 1)[1] for k in keys) == sorted(
        names + ['done', 'download_summary.txt', 'download_settings.txt'])

    def read(key: str) -> bytes:
        return client.get_object(Bucket=s3.bucket, Key=f'laion2b-processed/{key}')['Body'].read()

    table = pa.concat_tables([pq.read_table(io.BytesIO(read(f'{s:05d}.parquet'))) for s in range(shards)])
    # Corrupt files are not decoded back through this machine: they count as downloaded, which they are.
    check_rows(table, entries, ['punsafe', 'pwatermark', 'similarity', 'hash'])
    want = expected_summary([(e, 'success' if x == 'decode' else x) for e, x in entries])
    got = summary(proc.stdout)
    assert got.pop('shards finished') == shards
    assert got == want
    assert 'not decoded: laion_cloudwriter.py counts those whose header does not read' in proc.stdout
    assert read('download_summary.txt').decode() in proc.stdout
    # (A rerun into the bucket fetches nothing: test_the_first_endpoint_variable_set_wins..., whose
    # img2dataset lists the finished shards on the driver, as it does here.)
    assert not [k for k in s3.list_keys(s3.bucket) if secret.encode() in client.get_object(
        Bucket=s3.bucket, Key=k)['Body'].read()]
    logs = LOGS[engine_env['DISTRIBUTOR']]
    assert not [p for p in logs.rglob('*') if p.is_file() and secret.encode() in p.read_bytes()]


def test_decode_check_on_remote_output_is_refused(s3, tmp_path):
    proc = subprocess.run([str(SCRIPTS['full'])], env=script_env(tmp_path, f's3://{s3.bucket}/out',
                                                                 CHECK_IMAGES='True'),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f'laion_download: error: CHECK_IMAGES=True reads every image back through this machine: only for a '
        f'local OUTPUT_FOLDER, not s3://{s3.bucket}/out (laion_cloudwriter.py counts unreadable images)']


def test_unreachable_output_gets_one_line(image_server, tmp_path):
    # No endpoint answers (a closed port on loopback): the run stops at its first write, before any
    # download.
    (tmp_path / 'raw').mkdir()
    pq.write_table(full_entries(image_server, slow=False)[1], tmp_path / 'raw' / 'part-00000.parquet')
    env = script_env(tmp_path / 'raw', 's3://nobucket/out', AWS_ENDPOINT_URL='http://127.0.0.1:9',
                     AWS_ACCESS_KEY_ID='x', AWS_SECRET_ACCESS_KEY='x', AWS_DEFAULT_REGION='us-east-1',
                     AWS_EC2_METADATA_DISABLED='true', AWS_MAX_ATTEMPTS='1')
    proc = subprocess.run([str(SCRIPTS['full'])], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if 'error' in line]
    # The first step to touch OUTPUT_FOLDER says so: the metadata step (filter_metadata.py looks for a
    # filtered copy there even without a FILTER, so that adding one later is caught) or the script's claim
    # of the folder.
    one_line = r'(laion_download|filter_metadata): error: OUTPUT_FOLDER=s3://nobucket/out: cannot reach it'
    assert len(errors) == 1 and re.match(one_line, errors[0]), proc.stderr


def put_metadata(s3, entries: list, key: str = 'raw/part-00000.parquet') -> str:
    """Writes the entries as full-set metadata into the test's bucket; returns the URL_LIST."""
    buf = io.BytesIO()
    pq.write_table(full_table(entries), buf)
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=buf.getvalue())
    return f's3://{s3.bucket}/{key.rsplit("/", 1)[0]}'


def bucket_rows(s3, prefix: str) -> pa.Table:
    """Every shard under s3://<bucket>/<prefix>, read back with pyarrow."""
    keys = [k for k in s3.list_keys(s3.bucket, prefix) if k.endswith('.parquet')]
    return pa.concat_tables([pq.read_table(io.BytesIO(
        s3.client().get_object(Bucket=s3.bucket, Key=k)['Body'].read())) for k in keys])


# The documented ways of naming an S3-compatible endpoint, in the order the first set wins
# (docs/storage.md): laion_cloudwriter.py's S3_ENDPOINT_VARS, so that the two scripts use one endpoint.
ENDPOINT_VARIABLES = ['S3_ENDPOINT_URL', 'AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'FSSPEC_S3_ENDPOINT_URL']
DEAD = 'http://127.0.0.1:9'  # nothing listens there


def endpoint_in(s3, variable: str) -> dict[str, str]:
    """The bucket's storage settings with its endpoint in `variable` only and, as a user who set more than
    one might have, a dead endpoint in each variable that comes after it."""
    later = ENDPOINT_VARIABLES[ENDPOINT_VARIABLES.index(variable) + 1:]
    storage = {k: v for k, v in s3.env.items() if k != 'S3_ENDPOINT_URL'}
    return {**storage, variable: s3.endpoint, **dict.fromkeys(later, DEAD), 'AWS_MAX_ATTEMPTS': '1'}


def test_the_first_endpoint_variable_set_wins_for_the_whole_download(image_server, s3):
    # S3_ENDPOINT_URL, the cloudwriter's first, beside dead endpoints in all the others: the metadata
    # step, img2dataset's processes (s3fs) and the summary all reach the bucket.
    entries = entries_for(image_server, good_items()[:2], failures=False, redirect=False)
    url_list, out = put_metadata(s3, entries), f's3://{s3.bucket}/out'
    proc = run(url_list, out, **endpoint_in(s3, 'S3_ENDPOINT_URL'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'out/done' in s3.list_keys(s3.bucket, 'out/')
    check_rows(bucket_rows(s3, 'out/'), [(e, e.expect) for e in entries], ['punsafe'])
    before = dict(image_server.hits)
    again = run(url_list, out, **endpoint_in(s3, 'S3_ENDPOINT_URL'))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert dict(image_server.hits) == before  # every shard was finished: nothing fetched again
    assert 'out/done' in s3.list_keys(s3.bucket, 'out/')
    # Each variable, with dead endpoints after it, reaches the bucket: its download_settings.txt refuses
    # a rerun with other rows per shard (a dead endpoint would say that it cannot reach OUTPUT_FOLDER).
    for variable in ENDPOINT_VARIABLES:
        refused = run(url_list, out, **endpoint_in(s3, variable), NUMBER_SAMPLE_PER_SHARD='1')
        assert refused.returncode == 2, (variable, refused.stderr)
        assert 'holds shards made with NUMBER_SAMPLE_PER_SHARD=5, not 1' in refused.stderr, variable
    assert 'out/done' in s3.list_keys(s3.bucket, 'out/')
