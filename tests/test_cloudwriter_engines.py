"""laion_cloudwriter.py on many machines' engines, as a user switches to them: --distributor pyspark
(Spark local mode, local[2,4]: 2 cores, a task tried up to 4 times) and ray (one local node shared
by this module, joined through RAY_ADDRESS as a cluster is), and --local in object storage (the test
bed's S3). Everything stays on 127.0.0.1. Each engine must write what multiprocessing writes, survive
its driver's kill -9 and a worker killed mid-task, and never duplicate a sample."""

from __future__ import annotations

import os
import signal
import sys
import time
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
    start,
    wait_for,
)
from testbed.corpus import good_items

# Spark in local mode on loopback; local[2,4] lets a task fail 3 times before the job fails.
SPARK_ENV = {
    'PYSPARK_PYTHON': sys.executable, 'PYSPARK_DRIVER_PYTHON': sys.executable, 'SPARK_LOCAL_IP': '127.0.0.1',
    'PYSPARK_SUBMIT_ARGS': '--master local[2,4] --conf spark.driver.host=127.0.0.1 --conf '
                           'spark.driver.bindAddress=127.0.0.1 --conf spark.ui.enabled=false pyspark-shell',
}
# Ray keeps to loopback only when it believes it runs no cluster (else it takes the host's address).
RAY_ENV = {'RAY_USAGE_STATS_ENABLED': '0', 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0'}


@pytest.fixture(scope='module')
def ray_cluster(s3_server):
    """One Ray node of 2 CPUs on 127.0.0.1 for the module; its address, as RAY_ADDRESS gives it. Its
    workers reach the test bed's S3 as a cluster's nodes reach storage: from their own environment."""
    saved = dict(os.environ)
    os.environ.update(RAY_ENV, **s3_server.env)
    import ray
    ctx = ray.init(num_cpus=2, _node_ip_address='127.0.0.1', include_dashboard=False,
                   logging_level='ERROR')
    yield ctx.address_info['gcs_address']
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


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
                 or proc.poll() is not None, what='a record')
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    done = {k[:-len('.record')] for k in keys('laion/_cloudwriter/') if k.endswith('.record')}
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
