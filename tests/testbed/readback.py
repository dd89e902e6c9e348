"""Read any MDS output back the way a user does: with streaming's StreamingDataset."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import tempfile

from streaming import StreamingDataset
from streaming.base.shared import memory


@contextlib.contextmanager
def environ(env: dict[str, str] | None):
    """Set `env` in os.environ for the duration of a with-block, then restore what was there."""
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def released_shared_memory():
    """StreamingDataset's shared-memory blocks are closed only at exit (atexit), ~600 descriptors per
    dataset read: a test process that reads hundreds of datasets runs out of them. Close the blocks
    opened inside the with-block when it ends."""
    opened = []
    init = memory.SharedMemory.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self)

    memory.SharedMemory.__init__ = tracked
    try:
        yield
    finally:
        memory.SharedMemory.__init__ = init
        for shm in opened:
            shm.cleanup()
            atexit.unregister(shm.cleanup)


@contextlib.contextmanager
def one_opening_at_a_time():
    """Hold a machine-wide lock while a StreamingDataset is constructed. streaming 0.13 picks its
    shared-memory prefix by looking for the first free one and then creating it
    (streaming/base/shared/prefix.py, get_shm_prefix), so two processes that open a dataset at the same
    moment (the test workers, `pytest -n 2`) can pick the same prefix and one fails with FileExistsError."""
    with open(os.path.join(tempfile.gettempdir(), 'testbed-streaming-open.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_mds(path: str, env: dict[str, str] | None = None) -> list[dict]:
    """All samples of the MDS dataset at `path` (a folder or a remote like s3://bucket/prefix), in
    index order. `env` is applied while reading (e.g. S3Server.env)."""
    where = {'remote': str(path), 'local': tempfile.mkdtemp(prefix='readback-')} if '://' in str(path) \
        else {'local': str(path)}
    with environ(env), released_shared_memory():
        with one_opening_at_a_time():
            ds = StreamingDataset(**where, shuffle=False, batch_size=1)
        try:
            return [ds[i] for i in range(ds.num_samples)]
        finally:
            del ds



def read_streams(paths: list[str]) -> list[dict]:
    """All samples of one StreamingDataset over a Stream per folder in `paths` (as a trainer reads
    several buckets together), in stream order."""
    from streaming import Stream
    with released_shared_memory():
        with one_opening_at_a_time():
            ds = StreamingDataset(streams=[Stream(local=str(p)) for p in paths], shuffle=False, batch_size=1)
        try:
            return [ds[i] for i in range(ds.num_samples)]
        finally:
            del ds
