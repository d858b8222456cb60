"""
What the benchmarks share: finding C{twistd} and C{rq} next to the running
interpreter, starting and stopping a daemon on a root, reading C{/proc},
sampling a process with py-spy and reading its samples, laying out stored
messages, and a scratch directory that goes away afterwards.

The benchmarks run as scripts (C{python bench/<name>.py}), so this module is
imported as C{_common} from the directory they live in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator, Mapping


_CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    # Not "python -m twisted": that is twist, which takes no twistd options.
    return [path] if path else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


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


def stat_cpu(path: str) -> tuple[float, float]:
    """
    CPU seconds (user + system) of a C{/proc} stat file (C{/proc/<pid>/stat},
    all threads, or C{/proc/<pid>/task/<tid>/stat}, one thread): its own,
    and its reaped children's.

    @raise OSError: the file cannot be read (the process is gone).
    """
    with open(path) as f:
        # After "(comm)": fields[0] is field 3 (state), utime is field 14.
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / _CLK_TCK, (cutime + cstime) / _CLK_TCK


def proc_cpu(pid: int) -> float:
    """
    CPU seconds (user + system, all threads) of a process.

    @raise OSError: the process is gone.
    """
    return stat_cpu(f"/proc/{pid}/stat")[0]


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


def stop_daemon(proc: subprocess.Popen[bytes] | None, timeout: float, group: bool = True) -> None:
    """
    SIGTERM a daemon and wait up to C{timeout} s for it to exit; if it
    lingers, SIGKILL it and reap it. Nothing if it is not running.

    @param group: SIGKILL the process group it leads (L{start_daemon}
        starts it in a session of its own); False: the process alone.
    """
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()


def start_py_spy(pid: int, output: str, rate: int = 250, threads: bool = False) -> subprocess.Popen[bytes] | None:
    """
    Sample process C{pid} with C{py-spy record} (collapsed stacks, C{--format
    raw}, into C{output}; C{threads}: each stack under its thread) until
    L{stop_py_spy}. None, after a warning on stderr, where py-spy is
    neither next to the interpreter nor on C{PATH}.
    """
    spy = bin_next_to_python("py-spy") or shutil.which("py-spy")
    if spy is None:
        print("py-spy not found next to the interpreter nor on PATH; not sampling", file=sys.stderr)
        return None
    argv = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate)]
    if threads:
        argv.append("--threads")
    return subprocess.Popen(
        [*argv, "--output", output, "--nonblocking"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    """
    Stop a L{start_py_spy} (it writes its file on SIGINT); SIGKILL it if it
    has not finished within 30 s.
    """
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def store_message(
    qdir: str,
    state: str,
    msg: Mapping[str, Any],
    status: Mapping[str, Any] | None = None,
    log: str | None = None,
) -> str:
    """
    Lay out a stored message as the daemon keeps it: C{<qdir>/<state>/<hashed
    id>/msg} (JSON), C{status} (JSON) when C{status} is given, and
    C{job/stdio.log} when C{log} is given. Its directory.
    """
    from rqtwisted.message import hashed_subpath

    mdir = os.path.join(qdir, state, hashed_subpath(msg["msg_id"]))
    os.makedirs(os.path.join(mdir, "job") if log is not None else mdir)
    with open(os.path.join(mdir, "msg"), "w") as f:
        json.dump(msg, f)
    if status is not None:
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
    option; created if missing, left in place) or a fresh temporary one,
    removed afterwards.
    """
    if keep:
        os.makedirs(keep, exist_ok=True)
    base = keep or tempfile.mkdtemp(prefix=prefix)
    try:
        yield base
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
