"""Engines as a user's cluster runs them: started before the job, on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 (now)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def spark_standalone(logs: Path, env: dict[str, str]) -> Iterator[str]:
    """A Spark standalone master and one 2-core worker on 127.0.0.1, started as `spark-class` starts
    them on a cluster, with exactly `env` (plus SPARK_HOME and loopback settings); yields the master URL.
    Their logs and the worker's work folder are under `logs`."""
    import pyspark
    spark_class = Path(pyspark.__file__).parent / 'bin' / 'spark-class'
    env = {**env, 'SPARK_LOCAL_IP': '127.0.0.1', 'PYSPARK_PYTHON': sys.executable,
           'SPARK_MASTER_OPTS': '-Dspark.master.rest.enabled=false',
           'SPARK_HOME': str(spark_class.parent.parent)}
    port = free_port()
    url = f'spark://127.0.0.1:{port}'
    daemons = [('master', ['org.apache.spark.deploy.master.Master', '--host', '127.0.0.1',
                           '--port', str(port), '--webui-port', str(free_port())]),
               ('worker', ['org.apache.spark.deploy.worker.Worker', '--host', '127.0.0.1', '--cores', '2',
                           '--memory', '1g', '--webui-port', str(free_port()), '--work-dir', str(logs), url])]
    procs = []
    try:
        for name, args in daemons:
            with open(logs / f'{name}.log', 'w') as log:
                procs.append(subprocess.Popen([str(spark_class), *args], env=env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 120
        while 'Registering worker' not in (logs / 'master.log').read_text():
            assert time.time() < deadline and all(p.poll() is None for p in procs), (
                (logs / 'master.log').read_text()[-2000:] + (logs / 'worker.log').read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
