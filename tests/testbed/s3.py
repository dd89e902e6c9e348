"""A real S3-protocol server on loopback: moto's server behind a TCP proxy that can be cut.

`S3Server.stop()` closes the proxy (new connections are refused, open ones reset) while moto keeps
its in-memory objects, so `start()` brings the same bucket back: a remote that goes down mid-run and
returns. `env` is what a child process needs (streaming reads S3_ENDPOINT_URL).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f'nothing listens on 127.0.0.1:{port}')


class _Proxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target until closed; reopens on the same port."""

    def __init__(self, target: int):
        self.target = target
        self.port = _free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        if self._listener is not None:
            return
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(('127.0.0.1', self.port))
        lst.listen(128)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            if self._listener is not None:
                try:  # wakes the thread blocked in accept(); close() alone would not
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(('127.0.0.1', self.target))
            except OSError:
                client.close()
                continue
            pair = [client, upstream]
            with self._lock:
                self._conns += pair
            left = [2]  # pipes still using the pair: the last one to end closes both sockets
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, pair, left), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, pair: list[socket.socket],
              left: list[int]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:  # without this, every connection ever made keeps two descriptors open
                left[0] -= 1
                if left[0] == 0:
                    for s in pair:
                        s.close()
                    self._conns = [c for c in self._conns if c not in pair]


class S3Server:
    """moto's S3 server on 127.0.0.1, reached through a proxy that `stop()`/`start()` cut and restore."""

    def __init__(self) -> None:
        self._moto_port = _free_port()
        self._moto: subprocess.Popen | None = None
        self._proxy = _Proxy(self._moto_port)
        self._client = None

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self._proxy.port}'

    @property
    def env(self) -> dict[str, str]:
        """Environment for a process that talks to this server (boto3 and streaming)."""
        return {'S3_ENDPOINT_URL': self.endpoint, 'AWS_ACCESS_KEY_ID': 'testing',
                'AWS_SECRET_ACCESS_KEY': 'testing', 'AWS_DEFAULT_REGION': 'us-east-1',
                'AWS_EC2_METADATA_DISABLED': 'true'}

    def child_env(self, **extra: str) -> dict[str, str]:
        """os.environ plus `env` plus `extra`: pass as `env=` to subprocess."""
        return {**os.environ, **self.env, **extra}

    def client(self):
        """One boto3 client for the test process (a new one per call leaks its connection pool)."""
        if self._client is None:
            self._client = boto3.client('s3', endpoint_url=self.endpoint, aws_access_key_id='testing',
                                        aws_secret_access_key='testing', region_name='us-east-1')
        return self._client

    def new_bucket(self) -> str:
        """Create a fresh bucket; returns its name."""
        name = f'bucket-{uuid.uuid4().hex[:12]}'
        self.client().create_bucket(Bucket=name)
        return name

    def list_keys(self, bucket: str, prefix: str = '') -> list[str]:
        keys = []
        for page in self.client().get_paginator('list_objects_v2').paginate(Bucket=bucket,
                                                                            Prefix=prefix):
            keys += [o['Key'] for o in page.get('Contents', [])]
        return sorted(keys)

    def launch(self) -> S3Server:
        moto = Path(sys.executable).with_name('moto_server')
        self._moto = subprocess.Popen([str(moto), '-H', '127.0.0.1', '-p', str(self._moto_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self._moto_port)
        self._proxy.open()
        return self

    def stop(self) -> None:
        """The remote goes down: connections are refused until `start()`."""
        self._proxy.close()

    def start(self) -> None:
        """The remote comes back, with everything it held (no-op when it is up)."""
        self._proxy.open()

    def shutdown(self) -> None:
        self._proxy.close()
        if self._moto is not None:
            self._moto.terminate()
            self._moto.wait(10)

    def __enter__(self) -> S3Server:
        return self.launch()

    def __exit__(self, *exc) -> None:
        self.shutdown()
