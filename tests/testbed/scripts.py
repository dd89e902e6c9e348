"""Load one of the project's scripts as a module, to call its functions or its main() in-process."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
TESTS = ROOT / 'tests'


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


# A fresh interpreter's warning filters (Python 3.11, `python -W` unset), first to last.
FRESH_FILTERS = (('default', DeprecationWarning, '__main__'), ('ignore', DeprecationWarning, ''),
                 ('ignore', PendingDeprecationWarning, ''), ('ignore', ImportWarning, ''),
                 ('ignore', ResourceWarning, ''))
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning as a fresh interpreter's: the formatted warning on stderr."""
    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def _library_state(saved: tuple | None = None) -> tuple:
    """What a fresh process's libraries hold that outlives a run in this one: fsspec's settings (read
    from FSSPEC_* variables on import) and its cached filesystems (an S3FileSystem keeps the endpoint
    and credentials it was made with), boto3's default session. Returns the state as it was and sets it
    to a fresh process's for the environment now (or back to `saved`). What other libraries read from
    the environment on import (huggingface_hub's HF_HUB_OFFLINE) stays as this process has it: a test
    of those settings needs a process of its own."""
    fsspec, boto3 = sys.modules.get('fsspec'), sys.modules.get('boto3')
    was = (copy.deepcopy(fsspec.config.conf) if fsspec else None,
           boto3.DEFAULT_SESSION if boto3 else None)
    if fsspec:
        import fsspec.config
        import fsspec.spec

        fsspec.config.conf.clear()
        if saved is None or saved[0] is None:  # as read on import
            fsspec.config.set_conf_files(fsspec.config.conf_dir, fsspec.config.conf)
            fsspec.config.set_conf_env(fsspec.config.conf)
        else:
            fsspec.config.conf.update(saved[0])
        classes = [fsspec.spec.AbstractFileSystem]
        while classes:
            cls = classes.pop()
            cls.clear_instance_cache()
            classes += cls.__subclasses__()
    if boto3:
        boto3.DEFAULT_SESSION = saved[1] if saved else None
    return was


@contextlib.contextmanager
def _as_a_fresh_process(env: dict[str, str] | None, cwd: str | Path | None,
                        argv: list[str]) -> Iterator[list[str]]:
    """This process dressed, for a with-block, as `python argv...` would start: `env` as the whole
    environment, `cwd`, sys.argv and sys.path, file descriptors 1 and 2 on temporary files (sys.stdout
    and sys.stderr write there too, so forked workers and C libraries land in the same place), a fresh
    interpreter's warning filters printing to stderr, no root log handlers and every stream handler on
    that stderr, fsspec and boto3 as a fresh process has them (_library_state). The list yielded holds
    what was written to 1 and 2, as text, once the block ends; everything else is restored then."""
    saved_env, saved_cwd, saved_argv, saved_path = dict(os.environ), os.getcwd(), sys.argv, sys.path
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    torch = sys.modules.get('torch')
    threads = torch.get_num_threads() if torch else None
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    kept = {lg: (lg.handlers[:], lg.level, lg.disabled) for lg in loggers}
    streams = [(h, h.stream) for lg in loggers[1:] for h in lg.handlers
               if type(h) is logging.StreamHandler and h.stream not in (sys.stdout, sys.__stdout__)]
    py_out, py_err = sys.stdout, sys.stderr
    py_out.flush()
    py_err.flush()
    fds = os.dup(1), os.dup(2)
    said: list[str] = []
    libraries = None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, warnings.catch_warnings():
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, 'w', closefd=False), 'utf-8', line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, 'w', closefd=False), 'utf-8', 'backslashreplace',
                                          line_buffering=True)
            warnings.resetwarnings()
            for action, category, module in reversed(FRESH_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _show_warning
            logging.getLogger().handlers = []
            for handler, _ in streams:  # not setStream: it flushes the old one, which may be closed
                handler.stream = sys.stderr
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            if cwd is not None:
                os.chdir(cwd)
            libraries = _library_state()
            sys.argv = argv
            # As `python script.py` has it: the script's folder first, not the tests' (no test bed).
            sys.path = [str(Path(argv[0]).parent)] + [p for p in saved_path if p and Path(p) != TESTS]
            yield said
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = py_out, py_err
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            for fd in fds:
                os.close(fd)
            sys.argv, sys.path = saved_argv, saved_path
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            if libraries is not None:
                _library_state(libraries)
            for handler, stream in streams:
                handler.stream = stream
            for lg, (hs, level, disabled) in kept.items():
                lg.handlers, lg.level, lg.disabled = hs, level, disabled
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if threads is not None:
                torch.set_num_threads(threads)
            for f in (out, err):
                f.seek(0)
                said.append(f.read().decode(errors='replace'))


def run_script(name: str, *args, env: dict[str, str] | None = None,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """`python ROOT/name args...` run in this process, for a test that is not about the process (a kill,
    a signal or torchrun needs one of its own): no interpreter, torch and streaming start-up, ~3-6 s of
    CPU a run. As the command runs: as __main__ (runpy), with sys.argv, the environment `env` (else
    this one) and `cwd` (see _as_a_fresh_process); its exit code as the interpreter makes it (sys.exit's
    code; 1 and the message for a string; 1 and the traceback for an exception); what it writes to file
    descriptors 1 and 2 as stdout and stderr. streaming's shared memory it opened is closed after (a
    process's is at its exit). Returns what subprocess.run(..., capture_output=True, text=True) would."""
    from testbed.readback import released_shared_memory  # imports streaming: only where a test runs one

    argv = [str(ROOT / name), *map(str, args)]
    code = 0
    with _as_a_fresh_process(env, cwd, argv) as said:
        try:
            with released_shared_memory():
                runpy.run_path(argv[0], run_name='__main__')
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, *said)


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


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch in this process on one thread, as ENV gives the scripts' own processes: the same float math in
    in-process runs, reference model calls and subprocesses (and no spinning threads on loaded cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
