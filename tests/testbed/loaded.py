"""What a loaded machine does to a process's threads, forced so that a test sees it every time.

`exit_race_env(folder)`: the environment of a child Python whose ProcessPoolExecutor, when its workers
are killed, meets CPython 3.11's exit race at its worst interleaving: the executor's manager thread
(starved, as on a busy machine) closes its wakeup pipe only once the interpreter exits, just after
`concurrent.futures.process._python_exit` checked that pipe open and just before it writes to it
(unlocked in 3.11). A script that returns while that thread still runs then prints `OSError: handle is
closed` from `threading._shutdown` after its last line; one that joins the thread first does not (the
thread waits at most a second for the exit, then goes on).
"""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = '''
import concurrent.futures.process as p
import time

_wakeup, _join = p._ThreadWakeup.wakeup, p._ExecutorManagerThread.join_executor_internals


def _wait(cond, seconds=1.0):
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.01)


def wakeup(self):
    if p._global_shutdown and not self._closed:  # checked open at exit; the manager thread runs now
        _wait(lambda: self._closed)
        self._writer.send_bytes(b'')
    else:
        _wakeup(self)


def join_executor_internals(self):
    _wait(lambda: p._global_shutdown)  # still here when the interpreter exits
    _join(self)


p._ThreadWakeup.wakeup = wakeup
p._ExecutorManagerThread.join_executor_internals = join_executor_internals
'''


def exit_race_env(folder: Path) -> dict[str, str]:
    """os.environ with a sitecustomize in `folder` on PYTHONPATH that forces the race (module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'sitecustomize.py').write_text(SITECUSTOMIZE)
    return {**os.environ, 'PYTHONPATH': str(folder)}
