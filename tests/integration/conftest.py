"""
Integration fixtures: a real C{twistd rq} daemon on a temporary root, the
real C{rq} command line, and real bash queue scripts.

Executables are found next to the running interpreter (a virtualenv's
C{bin/}), falling back to C{python -m twisted} / C{python -m rqtwisted}.

Fixtures and helpers:

  - C{daemon}: a started L{Daemon} on C{<tmp_path>/root} (stopped at
    teardown; its log is attached to the report of a failing test).
  - C{Daemon.rq(*args)} -> C{(exit code, stdout lines)}.
  - C{Daemon.wait_state(full_id, states, timeout)}.
  - C{Daemon.script(name, body)}: a bash script in C{<root>/code/}.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pytest

BIN_DIR = Path(sys.executable).parent

#: Bounds of the waits (seconds).
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
CLI_TIMEOUT = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: runs the real rq daemon, CLI and bash queue scripts (slow-ish)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """
    Attach the daemon log of a failing test to its report.
    """
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    daemon = getattr(item, "funcargs", {}).get("daemon")
    if isinstance(daemon, Daemon):
        report.sections.append(("rq daemon log", daemon.log_text()))


def _command(name: str, module: str) -> list[str]:
    exe = BIN_DIR / name
    if exe.exists() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", module]


RQ_CMD = _command("rq", "rqtwisted")
TWISTD_CMD = _command("twistd", "twisted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition") -> object:
    """
    Poll C{predicate} until it returns something truthy (returned) or
    C{timeout} seconds pass (AssertionError).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- processes ----------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """
    C{(state, ppid, pgrp)} of a live process, or C{None} when it is gone (or
    a zombie: it runs nothing any more).
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    state, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
    if state in ("Z", "X"):
        return None
    return state, ppid, pgrp


def alive(pid: int) -> bool:
    return proc_stat(pid) is not None


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def processes_where(test: Callable[[int, tuple[str, int, int]], bool]) -> list[int]:
    found = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None and test(pid, st):
            found.append(pid)
    return found


def group_members(pgrp: int) -> list[int]:
    """
    Live processes of process group C{pgrp}.
    """
    return processes_where(lambda pid, st: st[2] == pgrp)


def children_of(ppid: int) -> list[int]:
    return processes_where(lambda pid, st: st[1] == ppid)


def processes_with_env(key: str, prefix: str) -> list[int]:
    """
    Live processes (of ours) whose environment has C{key} starting with
    C{prefix} -- the workers of a root and everything they started.
    """
    needle = f"{key}={prefix}".encode()
    found = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(needle) for item in env.split(b"\0")) and alive(pid):
            found.append(pid)
    return found


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# -- the daemon ---------------------------------------------------------------


class Daemon:
    """
    One C{twistd -n rq} on a root, in its own process group.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.log_path = base / "daemon.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        #: pids to SIGKILL at teardown (grandchildren the tests started).
        self.cleanup_pids: list[int] = []
        self.env = dict(os.environ)
        self.env["RQ_ROOT"] = str(self.root)
        self.env.pop("RQ_ENV", None)

    # -- lifecycle

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, env: dict[str, str] | None = None) -> None:
        """
        Start the daemon and wait for its answer; C{env}: the daemon's own
        environment (default L{env}, which the tests' C{rq} calls use).
        """
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== starting daemon at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*TWISTD_CMD, "-n", "--pidfile=", "rq", "--root", str(self.root), "--port", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env if env is None else env,
                cwd=str(self.base),
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} while starting:\n{self.log_text()}")
            if self.root.joinpath("config", "rq.sock").exists():
                code, out = self.rq("ping")
                if (code, out) == (0, ["ok pong"]):
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(f"daemon did not answer ping within {START_TIMEOUT}s:\n{self.log_text()}")
            time.sleep(0.05)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """
        SIGTERM, wait, SIGKILL the group if needed; the exit status.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        return self.proc.returncode

    def kill_group(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)

    def kill9(self) -> None:
        """
        SIGKILL the daemon itself (only it: the watchdog must notice).
        """
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def teardown(self) -> None:
        self.terminate()
        # Whatever the workers of this root left behind.
        kill_pids(self.cleanup_pids)
        kill_pids(processes_with_env("RQ_MSG_DIR", str(self.root) + os.sep))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no daemon log)"

    # -- the command line

    def rq_full(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*RQ_CMD, *args],
            env=self.env if env is None else env,
            cwd=str(cwd or self.base),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )

    def rq(self, *args: str, **kwargs: object) -> tuple[int, list[str]]:
        """
        Run C{rq <args>} with C{RQ_ROOT} set: C{(exit code, stdout lines)}.
        A traceback on stderr always fails the test.
        """
        result = self.rq_full(*args, **kwargs)  # type: ignore[arg-type]
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, result.stdout.splitlines()

    def ok(self, *args: str) -> str:
        """
        C{rq <args>} that must succeed with one C{ok <detail>} line: the detail.
        """
        code, out = self.rq(*args)
        assert code == 0 and len(out) == 1 and out[0].startswith("ok "), (args, code, out)
        return out[0][3:]

    # -- queues and messages

    @property
    def base_url(self) -> str:
        return f"http://localhost:{self.port}/"

    def full_id(self, queue: str, short: str) -> str:
        return f"{self.base_url}q/{queue}/{short}"

    def script(self, name: str, body: str, executable: bool = True) -> Path:
        """
        Write C{<root>/code/<name>}: C{#!/bin/bash} plus C{body} (dedented).
        """
        path = self.root / "code" / name
        path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip("\n"))
        mode = 0o755 if executable else 0o644
        os.chmod(path, mode)
        return path

    def create_queue(self, name: str, script: Path, *extra: str) -> None:
        code, out = self.rq(
            "create_queue", "--name", name, "--script", str(script), "--exec_prefix", "", *extra
        )
        assert (code, out) == (0, ["ok queue created - awesome"]), out

    def queue_with_script(self, name: str, body: str, *extra: str) -> Path:
        path = self.script(f"{name}.sh", body)
        self.create_queue(name, path, *extra)
        return path

    def send(self, dest: str, *args: str) -> str:
        """
        C{rq sendmesg --dest <dest> ...}: the full id.
        """
        full = self.ok("sendmesg", "--dest", dest, *args)
        assert full.startswith(f"{self.base_url}q/{dest}/"), full
        return full

    def state(self, full_id: str) -> str | None:
        code, out = self.rq("state", "--msg_id", full_id)
        if code == 0 and len(out) == 1 and out[0].startswith("ok "):
            return out[0][3:]
        return None

    def wait_state(self, full_id: str, states: str | Iterable[str], timeout: float = 10.0) -> str:
        """
        Poll C{rq state} until the message is in one of C{states}.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        seen: list[str | None] = []

        def check() -> str | None:
            state = self.state(full_id)
            if not seen or seen[-1] != state:
                seen.append(state)
            return state if state in wanted else None

        try:
            return wait_for(check, timeout, interval=0.05, what=f"{full_id} in {sorted(wanted)}")  # type: ignore[return-value]
        except AssertionError as e:
            raise AssertionError(f"{e}; states seen: {seen}; status: {self.rq('statusmesg', '--msg_id', full_id)}")

    def statusmesg(self, full_id: str) -> list[str]:
        code, out = self.rq("statusmesg", "--msg_id", full_id)
        assert code == 0, out
        return out

    def show(self, full_id: str) -> dict:
        code, out = self.rq("show", "--msg_id", full_id)
        assert code == 0, out
        return json.loads("\n".join(out))

    def msg_dir(self, full_id: str) -> Path:
        """
        The message directory, as C{rq show} reports it.
        """
        return self.root / self.show(full_id)["path"]

    def queue_dir(self, name: str) -> Path:
        return self.root / "queue" / name

    def run_dir(self, queue: str, full_id: str) -> Path:
        return self.queue_dir(queue) / "run" / full_id.rsplit("/", 1)[1]

    def status_json(self) -> dict:
        code, out = self.rq("status")
        assert code == 0, out
        return json.loads("\n".join(out))

    def queue_status(self, name: str) -> str | None:
        for q in self.status_json()["queues"]:
            if q["name"] == name:
                return q["status"]
        return None


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """
    A running daemon on C{<tmp_path>/root}.
    """
    d = Daemon(tmp_path)
    try:
        d.start()
        yield d
    finally:
        d.teardown()


@pytest.fixture
def no_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """
    A L{Daemon} helper whose daemon is not started for the test; one the
    test starts itself is stopped at teardown like the C{daemon} fixture's.
    """
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.teardown()


@pytest.fixture
def read_pid() -> Callable[[Path, float], int]:
    """
    Wait for a file holding a pid (written by a script) and return it.
    """

    def read(path: Path, timeout: float = 10.0) -> int:
        def get() -> int | None:
            try:
                text = path.read_text().strip()
            except FileNotFoundError:
                return None
            return int(text) if text.isdigit() else None

        return wait_for(get, timeout, what=f"pid in {path}")  # type: ignore[return-value]

    return read


__all__ = [
    "Daemon",
    "alive",
    "children_of",
    "group_members",
    "kill_pids",
    "md5_of",
    "processes_with_env",
    "wait_for",
]
