"""Load one of the project's scripts as a module, to call its functions or its main() in-process."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def load_script(name: str):
    """The module of ROOT/`name` (e.g. 'laion_cloudwriter.py'), freshly executed."""
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a script look their module up here
    spec.loader.exec_module(module)
    return module


def run_main(name: str, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of script `name`'s main() on this command line, run in this process
    (no interpreter and torch start-up per run), as its command line runs it. The signal handlers main()
    installs and torch's thread count it sets are restored after."""
    script = load_script(name)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch = sys.modules.get('torch')
    threads = torch.get_num_threads() if torch else None
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            script.main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code or 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if threads is not None:
            sys.modules['torch'].set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def c_stderr() -> Iterator[list[str]]:
    """What is written to file descriptor 2 inside the with-block (C libraries such as libtiff print
    there, past sys.stderr): the list yielded holds it, as text, once the block ends."""
    said: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            said.append(tmp.read().decode(errors='replace'))
