"""
What the benchmarks share: finding C{twistd} and C{rq} next to the running
interpreter, starting a daemon on a root, reading C{/proc} and py-spy's
samples, laying out stored messages, and a scratch directory that goes away
afterwards.

The benchmarks run as scripts (C{python bench/<name>.py}), so this module is
imported as C{_common} from the directory they live in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator, Mapping


def collapsed_stacks(path: str) -> Iterator[tuple[list[str], int]]:
    """
    The stacks of a py-spy C{--format raw} file (C{frame;frame;... count}
    per line), outermost frame first, each with its sample count.

    @raise OSError: the file cannot be read.
    @raise ValueError: a count is not a number.
    """
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack:
                yield stack.split(";"), int(count)


def bin_next_to_python(name: str) -> str | None:
    """
    The console script C{name} installed next to the running interpreter.
    """
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.access(path, os.X_OK) else None


def twistd_argv() -> list[str]:
    """
    How to run twistd with this interpreter's environment.
    """
    path = bin_next_to_python("twistd")
    return [path] if path else [sys.executable, "-m", "twisted"]


def rq_argv() -> list[str]:
    """
    How to run the rq command line with this interpreter's environment.
    """
    path = bin_next_to_python("rq")
    return [path] if path else [sys.executable, "-m", "rqtwisted"]


def free_port() -> int:
    """
    A free TCP port on loopback.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, key: str) -> int | None:
    """
    A kB figure of C{/proc/<pid>/status} (e.g. C{VmHWM}), or None when unknown.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def start_daemon(
    root: str,
    port: int,
    log: IO[bytes],
    cwd: str,
    ready: Callable[[], bool],
    what: str = "daemon",
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> subprocess.Popen[bytes]:
    """
    Start C{twistd -n --pidfile= rq --root ROOT --port PORT} in a session
    of its own (output to C{log}) and wait until C{ready()} says it answers.

    @raise SystemExit: the daemon exited, or was not ready in C{timeout} s.
    """
    proc = subprocess.Popen(
        [*twistd_argv(), "-n", "--pidfile=", "rq", "--root", root, "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} while starting; see {log.name}")
        if ready():
            return proc
        time.sleep(0.05)
    raise SystemExit(f"{what} did not answer within {timeout:.0f} s; see {log.name}")


def store_message(
    qdir: str, state: str, msg: Mapping[str, Any], status: Mapping[str, Any], log: str | None = None
) -> str:
    """
    Lay out a stored message as the daemon keeps it: C{<qdir>/<state>/<hashed
    id>/msg} and C{status} (JSON), and C{job/stdio.log} when C{log} is given.
    Its directory.
    """
    from rqtwisted.message import hashed_subpath

    mdir = os.path.join(qdir, state, hashed_subpath(msg["msg_id"]))
    os.makedirs(os.path.join(mdir, "job") if log is not None else mdir)
    with open(os.path.join(mdir, "msg"), "w") as f:
        json.dump(msg, f)
    with open(os.path.join(mdir, "status"), "w") as f:
        json.dump(status, f)
    if log is not None:
        with open(os.path.join(mdir, "job", "stdio.log"), "w") as f:
            f.write(log)
    return mdir


def bench_options(description: str, messages: int) -> argparse.Namespace:
    """
    The options of a bench that lays out one root: C{--messages N} (default
    C{messages}) and C{--root DIR}.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=messages)
    parser.add_argument("--root", help="lay out the root in DIR (kept); default: a temporary directory")
    return parser.parse_args()


@contextmanager
def scratch(keep: str | None, prefix: str) -> Iterator[str]:
    """
    The directory a bench lays its roots out in: C{keep} (the C{--root}
    option; left in place) or a fresh temporary one, removed afterwards.
    """
    base = keep or tempfile.mkdtemp(prefix=prefix)
    try:
        yield base
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
