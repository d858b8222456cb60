"""
C{rq console} with the real daemon: commands piped in (one connection for
the session, the same lines as C{rq}, the exit status), a daemon that goes
away and comes back mid-session, and a person typing in a terminal (tmux).
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.conftest import CLI_TIMEOUT, RQ_CMD, Daemon, wait_for

pytestmark = pytest.mark.integration

HELLO = 'echo "run saying hello" >&3\necho "done greeted $RQ_PARAM1" >&3\n'
FULL_ID = re.compile(r"^ok (http://localhost:\d+/q/hello/\S+)$")


def console_run(daemon: Daemon, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """
    Pipe C{text} into C{rq console}.
    """
    result = subprocess.run(
        [*RQ_CMD, "console", *args],
        input=text,
        env=daemon.env,
        cwd=str(daemon.base),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


class Piped:
    """
    A C{rq console} fed one line at a time through a pipe, its answers read
    as they come.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.proc = subprocess.Popen(
            [*RQ_CMD, "console"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=daemon.env,
            cwd=str(daemon.base),
        )
        self._buffer = b""

    def ask(self, line: str, count: int = 1) -> list[str]:
        """
        Send a line; return the next C{count} lines of output.
        """
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + CLI_TIMEOUT
        while self._buffer.count(b"\n") < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no answer to {line!r}; got {self._buffer!r}"
            readable, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if readable:
                data = os.read(self.proc.stdout.fileno(), 65536)
                assert data, f"console exited after {line!r}; got {self._buffer!r}"
                self._buffer += data
        lines = self._buffer.split(b"\n")
        self._buffer = b"\n".join(lines[count:])
        return [line.decode() for line in lines[:count]]

    def finish(self) -> tuple[int, str, str]:
        """
        Close stdin: the exit status, the rest of stdout, and stderr.
        """
        out, err = self.proc.communicate(timeout=CLI_TIMEOUT)
        return self.proc.returncode, (self._buffer + out).decode(), err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def piped(daemon: Daemon) -> Iterator[Piped]:
    p = Piped(daemon)
    try:
        yield p
    finally:
        p.kill()


def test_pipedCommands(daemon: Daemon) -> None:
    """
    Commands piped in print what C{rq} prints, one after the other; all ok
    is exit 0.
    """
    script = daemon.script("hello.sh", HELLO)
    commands = f"""
        queues
        create_queue --name hello --script {script} --exec_prefix ""
        queues
        sendmesg --dest hello --param1 world
    """
    result = console_run(daemon, commands.replace("\n        ", "\n"))
    lines = result.stdout.splitlines()
    assert (result.returncode, result.stderr) == (0, ""), result
    assert lines[:5] == ["ok 4", "cleaner", "relay", "rq_router", "webhook"]
    assert lines[5] == "ok queue created - awesome"
    assert lines[6] == "ok 5" and sorted(lines[7:12]) == ["cleaner", "hello", "relay", "rq_router", "webhook"]
    assert lines[6:12] == daemon.rq("queues")[1]
    match = FULL_ID.match(lines[12])
    assert match and len(lines) == 13, lines
    full_id = match.group(1)
    daemon.wait_state(full_id, "done")
    result = console_run(daemon, f"statusmesg --msg_id {full_id}\nstate --msg_id '{full_id}'\n")
    assert (result.returncode, result.stdout) == (0, "ok done - greeted world\nok done\n")
    assert daemon.rq("statusmesg", "--msg_id", full_id) == (0, ["ok done - greeted world"])


def test_pipedFailureExitStatus(daemon: Daemon) -> None:
    """
    A failed line does not stop the others, and the exit status is 1.
    """
    daemon.queue_with_script("hello", HELLO)
    missing = daemon.full_id("hello", "20240101.0000.00.000.000000000")
    result = console_run(daemon, f"sendmesg --dest nope\nstatusmesg --msg_id {missing}\nfrobnicate\nping\n")
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["fail Queue not found", "fail msg not found", "ok pong"]
    assert result.stderr == "Command not found: frobnicate (cmd_frobnicate)\n"


def test_bashScript(daemon: Daemon) -> None:
    """
    A bash script sends several commands over one console and checks its
    exit status.
    """
    daemon.queue_with_script("hello", HELLO)
    rq = " ".join(shlex.quote(word) for word in RQ_CMD)
    script = f"""
        {rq} console > out.txt <<'EOF'
        sendmesg --dest hello --param1 one
        sendmesg --dest hello --param1 two
        ping
        EOF
        echo "exit $?"
        {rq} console <<'EOF'
        sendmesg --dest nope
        EOF
        echo "exit $?"
    """
    result = subprocess.run(
        ["bash", "-c", script.replace("\n        ", "\n")],
        env=daemon.env,
        cwd=str(daemon.base),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert result.stdout == "exit 0\nfail Queue not found\nexit 1\n", result
    lines = (daemon.base / "out.txt").read_text().splitlines()
    assert [bool(FULL_ID.match(line)) for line in lines] == [True, True, False]
    assert lines[2] == "ok pong"
    for line in lines[:2]:
        full_id = FULL_ID.match(line).group(1)  # type: ignore[union-attr]
        daemon.wait_state(full_id, "done")
    assert daemon.statusmesg(full_id) == ["ok done - greeted two"]


def test_daemonGoneAndBack(daemon: Daemon, piped: Piped) -> None:
    """
    The session survives the daemon: a command while it is down says so,
    the next one once it is back works, and a restart between two commands
    goes unnoticed.
    """
    assert piped.ask("ping") == ["ok pong"]
    daemon.terminate()
    (line,) = piped.ask("ping")
    assert line.startswith(f"fail rq daemon not running at {daemon.root}: "), line
    daemon.proc = None
    daemon.start()
    assert piped.ask("ping") == ["ok pong"]
    daemon.terminate()
    daemon.start()
    assert piped.ask("queues", 5) == ["ok 4", "cleaner", "relay", "rq_router", "webhook"]
    code, rest, err = piped.finish()
    assert (code, rest, err) == (1, "", "")


# -- a person at a terminal --------------------------------------------------------------------


class Tmux:
    """
    A private tmux server running one console.
    """

    def __init__(self, directory: str) -> None:
        self.socket = os.path.join(directory, "tmux.sock")

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", self.socket, "-f", os.devnull, *args], capture_output=True, text=True, timeout=10
        )

    def keys(self, *keys: str) -> None:
        """
        Type keys (tmux key names such as C{Tab}, C{Enter}, C{C-c}).
        """
        result = self("send-keys", "-t", "console", "--", *keys)
        assert result.returncode == 0, result.stderr

    def screen(self) -> str:
        """
        The text on the screen (trailing spaces are not kept).
        """
        return self("capture-pane", "-p", "-t", "console").stdout

    def wait_screen(self, pattern: str, what: str) -> str:
        found: list[str] = []

        def check() -> bool:
            found[:] = [self.screen()]
            return re.search(pattern, found[0], re.MULTILINE) is not None

        try:
            wait_for(check, 10, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; screen:\n{found[0] if found else ''}") from None
        return found[0]

    def alive(self) -> bool:
        return self("has-session", "-t", "console").returncode == 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_interactive(daemon: Daemon) -> None:
    """
    In a terminal: a greeting and a prompt, tab completion of verbs,
    options and queue names, the answer of a typed command, Ctrl-C to drop
    a line, Ctrl-D to leave, and the history written.
    """
    daemon.queue_with_script("hello", HELLO)
    directory = tempfile.mkdtemp(prefix="rqt")  # tmux socket paths must be short
    history = Path(directory) / "history"
    tmux = Tmux(directory)
    env = {"RQ_ROOT": str(daemon.root), "RQ_CONSOLE_HISTORY": str(history), "PATH": os.environ.get("PATH", "")}
    command = " ".join(["env", *(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, RQ_CMD), "console"])
    try:
        started = tmux("new-session", "-d", "-s", "console", "-x", "160", "-y", "50", command)
        assert started.returncode == 0, started.stderr
        tmux.wait_screen(r"^rq>$", "the prompt")
        assert f"connected to the rq daemon of {daemon.root}" in tmux.screen()

        tmux.keys("sendm", "Tab")
        tmux.wait_screen(r"^rq> sendmesg$", "the verb completed")
        tmux.keys("--de", "Tab")
        tmux.wait_screen(r"^rq> sendmesg --dest$", "the option completed")
        tmux.keys("hel", "Tab")
        tmux.wait_screen(r"^rq> sendmesg --dest hello$", "the queue name completed")
        tmux.keys("--param1 typed", "Enter")
        screen = tmux.wait_screen(r"^ok http://\S+/q/hello/\S+$", "the answer")
        full_id = re.search(r"^ok (http://\S+)$", screen, re.MULTILINE).group(1)  # type: ignore[union-attr]
        daemon.wait_state(full_id, "done")
        assert daemon.show(full_id)["param1"] == "typed"

        tmux.keys("delete_queue --name hello", "C-c")
        tmux.wait_screen(r"^rq> .*\^C$", "the line dropped")
        tmux.keys(f"statusmesg --msg_id {full_id}", "Enter")
        tmux.wait_screen(r"^ok done - greeted typed$", "the status")
        assert daemon.queue_status("hello") == "UP"

        tmux.keys("status", "Enter")
        tmux.wait_screen(r"^hello\s+UP\s+1\s+0\s+0\s+0\s+1\s+0\s+0\s", "the status table")

        tmux.keys("C-d")
        wait_for(lambda: not tmux.alive(), 10, what="the console to exit")
        assert history.read_text().splitlines() == [
            "sendmesg --dest hello --param1 typed",
            f"statusmesg --msg_id {full_id}",
            "status",
        ]
        assert history.stat().st_mode & 0o777 == 0o600
    finally:
        tmux("kill-server")
        shutil.rmtree(directory, ignore_errors=True)
