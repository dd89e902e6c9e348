"""laion_cloudwriter.py on many machines' engines, as a user switches to them: --distributor pyspark
(Spark local mode, local[2,4]: 2 cores, a task tried up to 4 times; and a standalone master + worker
started once for the module, as a cluster is) and ray (one local node shared by this module, joined
through RAY_ADDRESS as a cluster is), and --local in object storage (the test bed's S3). Both clusters
start before any job and without the driver's storage settings (their own point at a dead loopback
port): what a task needs of them it gets from the driver. Everything stays on 127.0.0.1. Each engine
must write what multiprocessing writes, survive its driver's kill -9, SIGTERM and SIGINT, and a
worker killed mid-task, and never duplicate a sample."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_cloudwriter import (
    ALL,
    BUCKETS,
    assert_dataset,
    cloudwriter,
    kill9,
    make_input,
    read_buckets,
    records,
    s3_records,
    start,
    wait_for,
)
from testbed.corpus import good_items
from testbed.engines import free_port, spark_standalone

# Spark in local mode on loopback; local[2,4] lets a task fail 3 times before the job fails.
SPARK_ENV = {
    'PYSPARK_PYTHON': sys.executable, 'PYSPARK_DRIVER_PYTHON': sys.executable, 'SPARK_LOCAL_IP': '127.0.0.1',
    'PYSPARK_SUBMIT_ARGS': '--master local[2,4] --conf spark.driver.host=127.0.0.1 --conf '
                           'spark.driver.bindAddress=127.0.0.1 --conf spark.ui.enabled=false pyspark-shell',
}
# Ray keeps to loopback only when it believes it runs no cluster (else it takes the host's address);
# no token (a cluster on loopback has nothing to keep out).
RAY_ENV = {'RAY_USAGE_STATS_ENABLED': '0', 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0',
           'RAY_AUTH_MODE': 'disabled'}
STORAGE_PREFIXES = ('S3_', 'AWS_', 'FSSPEC_', 'GOOGLE_APPLICATION_CREDENTIALS', 'GCS_', 'OCI_', 'AZURE_')


def cluster_environ() -> dict[str, str]:
    """The environment a cluster is started with: none of the driver's storage settings; its own
    endpoint is a loopback port where nothing listens (a task that uses it fails, never leaves
    127.0.0.1), and no instance metadata to ask for credentials."""
    dead = f'http://127.0.0.1:{free_port()}'
    env = {k: v for k, v in os.environ.items() if not k.startswith(STORAGE_PREFIXES)}
    return {**env, 'S3_ENDPOINT_URL': dead, 'AWS_ENDPOINT_URL': dead, 'AWS_EC2_METADATA_DISABLED': 'true'}


@pytest.fixture(scope='module')
def ray_cluster():
    """One Ray node of 2 CPUs on 127.0.0.1 for the module, started before any job with
    cluster_environ(); its address, as RAY_ADDRESS gives it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(cluster_environ(), **RAY_ENV)
    import ray
    try:
        ctx = ray.init(num_cpus=2, _node_ip_address='127.0.0.1', include_dashboard=False,
                       logging_level='ERROR')
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield ctx.address_info['gcs_address']
    ray.shutdown()


@pytest.fixture(scope='module')
def spark_master(tmp_path_factory):
    """A standalone Spark master and worker on 127.0.0.1, started with cluster_environ(); its URL."""
    with spark_standalone(tmp_path_factory.mktemp('spark'), cluster_environ()) as url:
        yield url


def standalone_env(master: str, extra: dict | None = None) -> dict[str, str]:
    """A driver's environment joining the standalone `master` (as spark-submit --master does)."""
    return {**os.environ, **(extra or {}), **SPARK_ENV, 'PYSPARK_SUBMIT_ARGS': (
        f'--master {master} --conf spark.driver.host=127.0.0.1 --conf spark.driver.bindAddress=127.0.0.1 '
        '--conf spark.ui.enabled=false --conf spark.executor.memory=512m pyspark-shell')}


@pytest.fixture(params=['pyspark', 'ray'])
def cluster_env(request):
    """(distributor, a function extra-env -> the driver's environment joining that engine's cluster)."""
    if request.param == 'pyspark':
        master = request.getfixturevalue('spark_master')
        return 'pyspark', lambda extra=None: standalone_env(master, extra)
    address = request.getfixturevalue('ray_cluster')
    return 'ray', lambda extra=None: engine_env('ray', address, extra)


def engine_env(distributor: str, ray_address: str = '', extra: dict | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    if distributor == 'pyspark':
        env.update(SPARK_ENV)
    elif distributor == 'ray':
        env.update(RAY_ENV, RAY_ADDRESS=ray_address)
    return env


def samples(remote: str, env=None) -> dict[str, list[dict]]:
    """Every bucket's samples as StreamingDataset reads them, in index order."""
    return read_buckets(remote, BUCKETS, env=env)


def test_pyspark_and_ray_write_the_same_samples_as_multiprocessing(root, tmp_path, ray_cluster):
    local = tmp_path / 'parquet'
    want = make_input(local, range(4))  # the whole corpus: broken images, a 404 per shard
    got = {}
    for distributor in ('multiprocessing', 'pyspark', 'ray'):
        remote = tmp_path / distributor
        r = cloudwriter(root, '--local', str(local), '--remote', str(remote), '--bucketed', '--keep_parquet',
                        '--distributor', distributor, '--processes', '2',
                        '--summary', str(tmp_path / f'{distributor}.json'),
                        env=engine_env(distributor, ray_cluster))
        assert r.returncode == 0, r.stderr
        assert 'Traceback' not in r.stderr
        got[distributor] = samples(str(remote))
        assert records(remote) == {f'{s:05d}' for s in range(4)}
    assert_dataset(got['multiprocessing'], want)
    # the same samples, in the same order, bucket by bucket (compare the bytes: NaN != NaN)
    as_bytes = {d: {b: [sorted((k, repr(v)) for k, v in s.items()) for s in rows] for b, rows in g.items()}
                for d, g in got.items()}
    assert as_bytes['pyspark'] == as_bytes['multiprocessing']
    assert as_bytes['ray'] == as_bytes['multiprocessing']


def s3_input(s3, local: Path, prefix: str) -> None:
    """Upload a download's folder to s3://<bucket>/<prefix>/, the way a distributed download leaves it."""
    client = s3.client()
    for f in sorted(local.iterdir()):
        client.upload_file(str(f), s3.bucket, f'{prefix}/{f.name}')


def test_local_on_s3_with_ray_survives_a_driver_kill9_and_deletes_sources_only_after_records(
        root, tmp_path, s3, ray_cluster):
    want = make_input(tmp_path / 'download', range(8), items=good_items())
    s3_input(s3, tmp_path / 'download', 'download')
    local, remote = f's3://{s3.bucket}/download', f's3://{s3.bucket}/laion'
    env = engine_env('ray', ray_cluster, s3.env)
    args = ('--local', local, '--remote', remote, '--merge_interval', '0', '--distributor', 'ray')

    def keys(prefix: str) -> set[str]:  # names of the objects directly under prefix
        names = {k[len(prefix):] for k in s3.list_keys(s3.bucket, prefix)}
        return {n for n in names if n and '/' not in n}

    proc = start(root, *args, env=env)
    try:
        wait_for(lambda: any(k.endswith('.record') for k in keys('laion/_cloudwriter/'))
                 or proc.poll() is not None, what='a record', interval=0.2)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    done = s3_records(s3, 'laion')
    left = keys('download/')
    assert len(done) < 8, 'killed too late to test anything'
    for s in range(8):  # a source shard is gone only once its record is up
        assert f'{s:05d}.parquet' in left or f'{s:05d}' in done

    r = cloudwriter(root, *args, env=env)

    assert r.returncode == 0, r.stderr
    assert_dataset(read_buckets(remote, [ALL], env=s3.env), want, bucketed=False)
    # every source shard converted, its stats renamed so a resumed img2dataset skips it; the summary
    # sits beside the input, where it is for a folder
    assert keys('download/') == {'done'} | {f'{s:05d}_converted.json' for s in range(8)}
    assert 'summary.json' in keys('download/_cloudwriter/')


def test_pyspark_driver_kill9_then_rerun_equals_an_uninterrupted_run(root, tmp_path):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, range(8), items=good_items())
    args = ('--local', str(local), '--remote', str(remote), '--bucketed', '--merge_interval', '0',
            '--distributor', 'pyspark')
    proc = start(root, *args, env=engine_env('pyspark'))
    try:
        wait_for(lambda: len(records(remote)) >= 2 or proc.poll() is not None, what='two records')
    finally:
        if proc.poll() is None:
            kill9(proc)  # the driver, its JVM and its python workers: the whole process group
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    done = records(remote)
    assert len(done) < 8, 'killed too late to test anything'
    for s in range(8):
        assert (local / f'{s:05d}.parquet').exists() or f'{s:05d}' in done

    r = cloudwriter(root, *args, env=engine_env('pyspark'))

    assert r.returncode == 0, r.stderr
    assert_dataset(read_buckets(str(remote), BUCKETS), want)
    assert not list(local.glob('*.parquet'))


def mapping(path: Path) -> list[int]:
    """Pids of the processes that have `path` memory-mapped (a worker reading that parquet)."""
    pids = []
    for d in os.listdir('/proc'):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if str(path) in Path(f'/proc/{d}/maps').read_text():
                    pids.append(int(d))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize('distributor', ['pyspark', 'ray'])
def test_a_worker_killed_mid_task_is_retried_and_nothing_is_duplicated(root, tmp_path, distributor,
                                                                        ray_cluster):
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, [0, 2], items=good_items())
    want.update(make_input(local, [1], items=good_items() * 60))  # a long task, to be killed in
    proc = start(root, '--local', str(local), '--remote', str(remote), '--size_limit', '256kb',
                 '--distributor', distributor, env=engine_env(distributor, ray_cluster))
    try:
        victim = local / '00001.parquet'
        wait_for(lambda: mapping(victim) or proc.poll() is not None, what='a worker reading shard 1')
        killed = mapping(victim)
        assert killed and '00001' not in records(remote), 'not caught mid-task'
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == 0, err  # the engine ran the task again
    assert_dataset(read_buckets(str(remote), [ALL]), want, bucketed=False)  # each sample once
    assert records(remote) == {'00000', '00001', '00002'} and not list(local.glob('*.parquet'))


def test_distributor_without_its_package_refuses_in_one_line(root, tmp_path):
    local = tmp_path / 'parquet'
    make_input(local, [0], items=good_items()[:2])
    hide = tmp_path / 'no-ray'  # python as on a machine without ray: `import ray` fails
    hide.mkdir()
    (hide / 'sitecustomize.py').write_text("import sys\nsys.modules['ray'] = None\n")
    env = {**os.environ, 'PYTHONPATH': str(hide)}
    t0 = time.time()
    r = cloudwriter(root, '--local', str(local), '--remote', str(tmp_path / 'mds'), '--distributor', 'ray',
                    env=env, timeout=60)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and time.time() - t0 < 60
    assert r.stderr.strip().splitlines()[-1].endswith(
        'error: --distributor ray: the ray package is not installed; pip install ray (on every machine of '
        'the cluster)')
    assert (local / '00000.parquet').exists() and not (tmp_path / 'mds').exists()


def test_a_remote_local_that_does_not_exist_refuses_in_one_line(root, tmp_path, s3):
    local = f's3://{s3.bucket}/not-downloaded-yet'
    r = cloudwriter(root, '--local', local, '--remote', str(tmp_path / 'mds'), env=s3.child_env(), timeout=60)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: --local {local} does not exist; give the download's output folder (with "
        '--wait_before_start if the download creates it)')
    assert not (tmp_path / 'mds').exists()


def test_the_drivers_storage_settings_reach_a_cluster_started_without_them(root, tmp_path, s3, cluster_env):
    distributor, env_for = cluster_env
    want = make_input(tmp_path / 'download', range(3), items=good_items())
    s3_input(s3, tmp_path / 'download', 'download')
    local, remote = f's3://{s3.bucket}/download', f's3://{s3.bucket}/laion'
    secret = f'secret-{uuid.uuid4().hex}'  # moto takes any credentials; this one must show up nowhere
    env = env_for({**s3.env, 'AWS_SECRET_ACCESS_KEY': secret})

    r = cloudwriter(root, '--local', local, '--remote', remote, '--distributor', distributor,
                    '--summary', str(tmp_path / 'summary.json'), env=env)

    assert r.returncode == 0, r.stderr[-3000:]
    assert_dataset(read_buckets(remote, [ALL], env=s3.env), want, bucketed=False)
    client = s3.client()
    written = [client.get_object(Bucket=s3.bucket, Key=k)['Body'].read()
               for k in s3.list_keys(s3.bucket, 'laion/_cloudwriter/')]
    assert len(written) == 4  # 3 records and the lease
    for text in [r.stdout, r.stderr, (tmp_path / 'summary.json').read_text(), *map(bytes.decode, written)]:
        assert secret not in text


def test_storage_env_cluster_leaves_the_workers_their_own_settings(root, tmp_path, s3, ray_cluster):
    make_input(tmp_path / 'download', range(1), items=good_items()[:2])
    s3_input(s3, tmp_path / 'download', 'download')
    local, remote = f's3://{s3.bucket}/download', f's3://{s3.bucket}/laion'

    r = cloudwriter(root, '--local', local, '--remote', remote, '--distributor', 'ray',
                    '--storage_env', 'cluster', env=engine_env('ray', ray_cluster, s3.env), timeout=180)

    # the cluster's own endpoint (a dead loopback port, no credentials) is what its tasks use
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        f'error: {local}/00000.parquet: reading its record at {remote} failed (')
    assert not [k for k in s3.list_keys(s3.bucket, 'laion/') if k.endswith('.record')]


def test_sigterm_then_sigint_each_publish_the_recorded_shards_and_a_rerun_completes(root, tmp_path,
                                                                                   cluster_env):
    """SIGTERM (the platform's stop) to the first run, SIGINT (Ctrl-C) to its rerun, both to the process
    group: each publishes exactly the shards recorded so far and releases its lease; a last rerun
    completes."""
    distributor, env_for = cluster_env
    local, remote = tmp_path / 'parquet', tmp_path / 'mds'
    want = make_input(local, range(24), items=good_items())
    args = ('--local', str(local), '--remote', str(remote), '--merge_interval', '3600',
            '--distributor', distributor)
    for sig in (signal.SIGTERM, signal.SIGINT):
        before = len(records(remote))
        proc = start(root, *args, env=env_for())
        try:
            wait_for(lambda: len(records(remote)) >= before + 2 or proc.poll() is not None,  # noqa: B023
                     what='two more records')
            os.killpg(proc.pid, sig)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                kill9(proc)
        name = signal.Signals(sig).name
        assert proc.returncode == 128 + sig, err[-3000:]
        assert f'{name}: stopping' in err and 'Traceback' not in err and 'KeyboardInterrupt' not in err, err
        done = records(remote)
        assert before + 2 <= len(done) < 24, 'stopped too late to test anything'
        assert f'INTERRUPTED by {name}: the index covers the {len(done)} recorded shards' in out
        got = read_buckets(str(remote), [ALL])  # every recorded shard, whole; nothing else
        assert_dataset(got, {k: v for k, v in want.items() if f"{v['shard']:05d}" in done}, bucketed=False)
        assert json.loads((local / '_cloudwriter' / 'summary.json').read_text())['interrupted'] == name
        assert json.loads((remote / '_cloudwriter' / 'run.lease').read_text())['released'] is True

    r = cloudwriter(root, *args, env=env_for())
    assert r.returncode == 0, r.stderr[-3000:]
    assert_dataset(read_buckets(str(remote), [ALL]), want, bucketed=False)


@pytest.mark.parametrize('distributor', ['pyspark', 'ray'])
def test_a_cluster_address_where_nothing_listens_fails_in_one_line_within_the_timeout(root, tmp_path,
                                                                                   distributor):
    local = tmp_path / 'parquet'
    make_input(local, [0], items=good_items()[:2])
    address = f'127.0.0.1:{free_port()}'
    env = standalone_env(f'spark://{address}') if distributor == 'pyspark' else engine_env('ray', address)
    t0 = time.time()
    r = cloudwriter(root, '--local', str(local), '--remote', str(tmp_path / 'mds'), '--connect_timeout', '3',
                    '--distributor', distributor, env=env, timeout=120)
    took = time.time() - t0
    what = f'Spark master spark://{address}' if distributor == 'pyspark' else 'RAY_ADDRESS'
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        f'error: --distributor {distributor}: {what} {address}: nothing answers there within 3 s '
        '(ConnectionRefusedError: ')
    assert took < 40, took  # interpreter, the JVM and the probe; not Spark's ~60 s or Ray's minutes
    assert (local / '00000.parquet').exists() and not (tmp_path / 'mds' / '0-1048576').exists()


@pytest.mark.parametrize('name', ['S3_ENDPOINT_URL', 'AWS_ENDPOINT_URL', 'AWS_ENDPOINT_URL_S3',
                                  'FSSPEC_S3_ENDPOINT_URL'])
def test_each_documented_s3_endpoint_variable_points_reads_and_writes_at_the_store(root, tmp_path, s3, name):
    """streaming's S3_ENDPOINT_URL, botocore's AWS_ENDPOINT_URL[_S3], fsspec's FSSPEC_S3_ENDPOINT_URL:
    whichever a user sets, --local is read from and --remote written to that store (only there)."""
    want = make_input(tmp_path / 'download', range(2), items=good_items()[:4])
    s3_input(s3, tmp_path / 'download', 'download')
    local, remote = f's3://{s3.bucket}/download', f's3://{s3.bucket}/laion'
    env = {k: v for k, v in s3.child_env().items() if k not in ('S3_ENDPOINT_URL', 'AWS_ENDPOINT_URL')}

    r = cloudwriter(root, '--local', local, '--remote', remote, '--summary', str(tmp_path / 'summary.json'),
                    env={**env, name: s3.endpoint}, timeout=120)

    assert r.returncode == 0, r.stderr[-3000:]
    assert_dataset(read_buckets(remote, [ALL], env=s3.env), want, bucketed=False)
    assert 'download/00000_converted.json' in s3.list_keys(s3.bucket, 'download/')
