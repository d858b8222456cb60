"""
Tests for L{rqtwisted.worker}: the environment, argv and script rules, the
worker protocol with a fake transport, real workers on the real reactor, and
the L{Watchdog}.

Real processes are awaited through Deferreds fired by their events, each
bounded by a timeout; nothing sleeps.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

import rqtwisted.worker as worker_module
from rqtwisted import rootlock
from rqtwisted.root import QueueConfig, Root
from rqtwisted.rootlock import LOCK_DIR, RootLocked, lock_root
from rqtwisted.directprocess import DirectProcess
from rqtwisted.protocol import Report
import rqtwisted.spawn as spawn_module
from rqtwisted.spawn import DirectSpawner, SpawnBusy, SpawnFailed
from rqtwisted.worker import (
    ScriptError,
    _SessionProcess,
    Watchdog,
    Worker,
    WorkerProtocol,
    kill_leftover,
    resolve_script,
    script_argv,
    spawn_worker,
    start_line_time,
    worker_environment,
)

#: Seconds a real process gets before the test fails.
TIMEOUT = 15

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_script(path: str, body: str, mode: int = 0o755) -> str:
    """
    Write a C{#!/bin/sh} script and return its path.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, mode)
    return path


# -- resolve_script


class TestResolveScript:
    """
    L{resolve_script}.
    """

    def test_relative_to_root(self, tmp_path: Any) -> None:
        script = make_script(str(tmp_path / "code" / "run.sh"), "exit 0\n")
        assert resolve_script("code/run.sh", str(tmp_path)) == script
        assert resolve_script("./code/run.sh", str(tmp_path)) == script

    def test_absolute(self, tmp_path: Any) -> None:
        script = make_script(str(tmp_path / "run.sh"), "exit 0\n")
        assert resolve_script(script, "/nonexistent") == script

    def test_symlinks_followed(self, tmp_path: Any) -> None:
        real = make_script(str(tmp_path / "real" / "run.sh"), "exit 0\n")
        os.makedirs(tmp_path / "code")
        os.symlink(real, tmp_path / "code" / "link.sh")
        os.symlink(tmp_path / "real", tmp_path / "dirlink")
        assert resolve_script("code/link.sh", str(tmp_path)) == os.path.realpath(real)
        assert resolve_script("dirlink/run.sh", str(tmp_path)) == os.path.realpath(real)

    def test_symlink_switch_applies_at_once(self, tmp_path: Any) -> None:
        """
        A redeploy that switches a symlink (a file's or a directory's)
        applies to the very next call: nothing is cached.
        """
        v1 = make_script(str(tmp_path / "v1" / "run.sh"), "exit 0\n")
        v2 = make_script(str(tmp_path / "v2" / "run.sh"), "exit 0\n")
        os.symlink(tmp_path / "v1", tmp_path / "current")
        os.symlink(tmp_path / "current" / "run.sh", tmp_path / "link.sh")
        assert resolve_script("link.sh", str(tmp_path)) == os.path.realpath(v1)
        os.symlink(tmp_path / "v2", tmp_path / "next")
        os.replace(tmp_path / "next", tmp_path / "current")
        assert resolve_script("link.sh", str(tmp_path)) == os.path.realpath(v2)
        assert resolve_script("current/run.sh", str(tmp_path)) == os.path.realpath(v2)

    def test_target_renamed_behind_the_symlink(self, tmp_path: Any) -> None:
        """
        The same file under a new name (renamed, the symlink switched to
        it): the real path is the new name.
        """
        old = make_script(str(tmp_path / "v1.sh"), "exit 0\n")
        os.symlink("v1.sh", tmp_path / "link.sh")
        assert resolve_script("link.sh", str(tmp_path)) == os.path.realpath(old)
        os.rename(old, tmp_path / "v2.sh")
        os.symlink("v2.sh", tmp_path / "next")
        os.replace(tmp_path / "next", tmp_path / "link.sh")
        assert resolve_script("link.sh", str(tmp_path)) == os.path.realpath(tmp_path / "v2.sh")

    def test_hard_linked_release(self, tmp_path: Any) -> None:
        """
        A release made of hard links (C{cp -al}): the symlink switched to
        it leads to the very same file under a new path, and the real path
        is the new one.
        """
        v1 = make_script(str(tmp_path / "releases" / "1" / "run.sh"), "exit 0\n")
        os.symlink("releases/1", tmp_path / "current")
        assert resolve_script("current/run.sh", str(tmp_path)) == os.path.realpath(v1)
        os.makedirs(tmp_path / "releases" / "2")
        os.link(v1, tmp_path / "releases" / "2" / "run.sh")
        os.symlink("releases/2", tmp_path / "next")
        os.replace(tmp_path / "next", tmp_path / "current")
        assert resolve_script("current/run.sh", str(tmp_path)) == os.path.realpath(tmp_path / "releases" / "2" / "run.sh")

    def test_resolves_as_realpath(self, tmp_path: Any) -> None:
        """
        Chains of relative and absolute links, and C{..} after a link,
        resolve as L{os.path.realpath} resolves them.
        """
        make_script(str(tmp_path / "a" / "b" / "run.sh"), "exit 0\n")
        os.makedirs(tmp_path / "c" / "d")
        os.symlink("../a/b", tmp_path / "c" / "blink")
        os.symlink(tmp_path / "c" / "blink", tmp_path / "abs")
        os.symlink("abs", tmp_path / "rel")
        for script in ("rel/run.sh", "c/d/../blink/run.sh", "rel/../b/run.sh", "./abs/./run.sh"):
            assert resolve_script(script, str(tmp_path)) == os.path.realpath(tmp_path / script), script

    def test_symlink_loop(self, tmp_path: Any) -> None:
        os.symlink("loop2", tmp_path / "loop1")
        os.symlink("loop1", tmp_path / "loop2")
        with pytest.raises(ScriptError):
            resolve_script("loop1/run.sh", str(tmp_path))

    def test_not_found(self, tmp_path: Any) -> None:
        with pytest.raises(ScriptError) as e:
            resolve_script("code/missing.sh", str(tmp_path))
        assert "not found" in e.value.reason

    def test_dangling_symlink(self, tmp_path: Any) -> None:
        os.symlink(tmp_path / "gone.sh", tmp_path / "link.sh")
        with pytest.raises(ScriptError) as e:
            resolve_script("link.sh", str(tmp_path))
        assert "not found" in e.value.reason

    def test_not_executable(self, tmp_path: Any) -> None:
        make_script(str(tmp_path / "run.sh"), "exit 0\n", mode=0o644)
        with pytest.raises(ScriptError) as e:
            resolve_script("run.sh", str(tmp_path))
        assert "not executable" in e.value.reason

    def test_symlink_to_not_executable(self, tmp_path: Any) -> None:
        make_script(str(tmp_path / "run.sh"), "exit 0\n", mode=0o644)
        os.symlink(tmp_path / "run.sh", tmp_path / "link.sh")
        with pytest.raises(ScriptError):
            resolve_script("link.sh", str(tmp_path))

    def test_directory(self, tmp_path: Any) -> None:
        os.makedirs(tmp_path / "code")
        with pytest.raises(ScriptError):
            resolve_script("code", str(tmp_path))

    def test_empty(self, tmp_path: Any) -> None:
        with pytest.raises(ScriptError):
            resolve_script("", str(tmp_path))


# -- script_argv


class TestScriptArgv:
    """
    L{script_argv}: C{exec_prefix} rules.
    """

    def test_missing_prefix(self) -> None:
        assert script_argv(None, "/rq/code/x") == ["bash", "-lc", "/rq/code/x"]

    def test_empty_prefix(self) -> None:
        assert script_argv("", "/rq/code/x") == ["/rq/code/x"]

    def test_blank_prefix(self) -> None:
        assert script_argv("   ", "/rq/code/x") == ["/rq/code/x"]

    def test_prefix_trimmed_and_split(self) -> None:
        assert script_argv("  nice  -n 5 ", "/rq/code/x") == ["nice", "-n", "5", "/rq/code/x"]

    def test_default_spelled_out(self) -> None:
        assert script_argv("bash -lc ", "/rq/code/x") == ["bash", "-lc", "/rq/code/x"]

    def test_shell_quoting(self) -> None:
        assert script_argv("env 'A=b c' \"D=e\"", "/x") == ["env", "A=b c", "D=e", "/x"]

    def test_unbalanced_quote(self) -> None:
        with pytest.raises(ScriptError):
            script_argv("env 'A=b", "/x")

    @pytest.mark.parametrize(
        "prefix", ["env X=$HOME", "env X=`hostname`", "nice -n 5 2>/dev/null", "A=1 nice", "ionice -c3 *"]
    )
    def test_prefix_that_needs_the_shell(self, prefix: str) -> None:
        """
        A prefix with an expansion, a redirection or an assignment first is
        run by C{/bin/sh -c}, as the original ran it; the path stays one
        word.
        """
        assert script_argv(f" {prefix} ", "/rq/my code/x") == ["/bin/sh", "-c", f"{prefix} '/rq/my code/x'"]

    def test_shell_prefix_expands(self, tmp_path: Any) -> None:
        """
        Run for real: the variable is expanded by the shell.
        """
        script = make_script(str(tmp_path / "show.sh"), 'echo "$X"\n')
        argv = script_argv("env X=$HOME", script)
        out = subprocess.run(argv, capture_output=True, text=True, env={"HOME": "/home/someone", "PATH": "/bin:/usr/bin"})
        assert out.stdout == "/home/someone\n"


# -- worker_environment


def environment(**overrides: Any) -> dict[str, str]:
    """
    L{worker_environment} with sample arguments.
    """
    kwargs: dict[str, Any] = dict(
        host="rqhost",
        port=3333,
        relative_root="/",
        rq_env="production",
        script="./code/run.sh",
        real_script="/rq/code/run.sh",
        msg={
            "msg_id": "20240131.1345.10.123.7",
            "dest": "test",
            "count": 2,
            "param1": "p1",
            "param2": None,
            "param3": 3,
            "orig_msg_id": "http://rqhost:3333/q/test/20240131.1345.10.123.1",
        },
        full_msg_id="http://rqhost:3333/q/test/20240131.1345.10.123.7",
        job_dir="/rq/queue/test/run/20240131.1345.10.123.7/job",
        env_vars={},
    )
    base = overrides.pop("base_env", {"PATH": "/usr/bin:/bin", "HOME": "/home/rq"})
    kwargs.update(overrides)
    return worker_environment(base, **kwargs)


class TestWorkerEnvironment:
    """
    L{worker_environment}: the table of script-api.md.
    """

    def test_table(self) -> None:
        assert environment() == {
            "PATH": "/usr/bin:/bin",
            "HOME": "/home/rq",
            "RQ_VER": "1.18.3",
            "RQ_SCRIPT": "./code/run.sh",
            "RQ_REALSCRIPT": "/rq/code/run.sh",
            "RQ_HOST": "http://rqhost:3333/",
            "RQ_DEST": "http://rqhost:3333/q/test",
            "RQ_DEST_QUEUE": "test",
            "RQ_MSG_ID": "20240131.1345.10.123.7",
            "RQ_FULL_MSG_ID": "http://rqhost:3333/q/test/20240131.1345.10.123.7",
            "RQ_MSG_DIR": "/rq/queue/test/run/20240131.1345.10.123.7/job",
            "RQ_WRITE": "3",
            "RQ_READ": "4",
            "RQ_PIPE": "3",
            "RQ_COUNT": "2",
            "RQ_PARAM1": "p1",
            "RQ_PARAM2": "",
            "RQ_PARAM3": "3",
            "RQ_PARAM4": "",
            "RQ_ORIG_MSG_ID": "http://rqhost:3333/q/test/20240131.1345.10.123.1",
            "RQ_ENV": "production",
            "RQ_PORT": "3333",
        }

    def test_relative_root(self) -> None:
        env = environment(relative_root="/rq/")
        assert env["RQ_HOST"] == "http://rqhost:3333/rq/"
        # quirks 20: RQ_DEST ignores relative_root.
        assert env["RQ_DEST"] == "http://rqhost:3333/q/test"

    def test_relative_root_without_slash(self) -> None:
        assert environment(relative_root="/rq")["RQ_HOST"] == "http://rqhost:3333/rq/"

    @pytest.mark.parametrize(
        "dest, url, queue",
        [
            ("other", "http://rqhost:3333/q/other", "other"),
            ("/q/other", "http://rqhost:3333/q/other", "other"),
            ("http://peer:4444/q/far", "http://peer:4444/q/far", "far"),
        ],
    )
    def test_dest(self, dest: str, url: str, queue: str) -> None:
        env = environment(msg={"msg_id": "1", "dest": dest})
        assert (env["RQ_DEST"], env["RQ_DEST_QUEUE"]) == (url, queue)

    def test_absent_fields(self) -> None:
        env = environment(msg={"msg_id": "1", "dest": "q"})
        assert env["RQ_COUNT"] == "0"
        assert env["RQ_ORIG_MSG_ID"] == ""
        assert [env[f"RQ_PARAM{n}"] for n in range(1, 5)] == ["", "", "", ""]
        assert "RQ_FORCE_REMOTE" not in env

    @pytest.mark.parametrize("value", [True, 1, "yes", 0, ""])
    def test_force_remote(self, value: Any) -> None:
        """
        Set as the original (Ruby) told truth: C{0} and C{""} too.
        """
        env = environment(msg={"msg_id": "1", "dest": "q", "force_remote": value})
        assert env["RQ_FORCE_REMOTE"] == "1"

    @pytest.mark.parametrize("value", [False, None])
    def test_force_remote_falsy(self, value: Any) -> None:
        env = environment(
            msg={"msg_id": "1", "dest": "q", "force_remote": value},
            base_env={"RQ_FORCE_REMOTE": "1"},
        )
        assert "RQ_FORCE_REMOTE" not in env

    def test_env_vars_from_a_queue_config(self) -> None:
        """
        A queue's C{env_vars} keep their JSON values until the worker's
        environment is made: C{true} is C{true}, C{null} empty.
        """
        config = QueueConfig.fromDict(
            {"name": "q", "script": "s", "env_vars": {"FLAG": True, "OFF": False, "NONE": None, "NUM": 3}}
        )
        env = environment(env_vars=config.env_vars)
        assert (env["FLAG"], env["OFF"], env["NONE"], env["NUM"]) == ("true", "false", "", "3")
        assert QueueConfig.fromDict(config.toDict()) == config

    def test_rubyopt_removed(self) -> None:
        env = environment(base_env={"RUBYOPT": "-rbundler/setup", "TMPDIR": "/rq/tmp"})
        assert "RUBYOPT" not in env
        assert env["TMPDIR"] == "/rq/tmp"

    def test_env_vars(self) -> None:
        env = environment(
            env_vars={"FOO": "bar", "NUM": 5, "FLAG": True, "NONE": None, "HOME": "/elsewhere"}
        )
        assert env["FOO"] == "bar"
        assert env["NUM"] == "5"
        assert env["FLAG"] == "true"
        assert env["NONE"] == ""
        assert env["HOME"] == "/elsewhere"

    def test_env_vars_rq_names_ignored(self) -> None:
        env = environment(env_vars={"RQ_MSG_ID": "forged", "RQ_NEW": "x", "rq_lower": "y"})
        assert env["RQ_MSG_ID"] == "20240131.1345.10.123.7"
        assert "RQ_NEW" not in env
        assert env["rq_lower"] == "y"

    @pytest.mark.parametrize("env_vars", [None, [], "FOO=bar", 3, ["FOO", "bar"]])
    def test_env_vars_not_a_dict(self, env_vars: Any) -> None:
        assert environment(env_vars=env_vars) == environment()

    def test_env_vars_unusable_names(self) -> None:
        env = environment(env_vars={"A=B": "x", "": "y", "NUL\0": "z", "V": "nul\0"})
        assert env == environment()


# -- WorkerProtocol with a fake transport


class FakePipe:
    """
    A transport pipe: only its fd matters.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


class FakeTransport:
    """
    The parts of a Twisted process transport L{WorkerProtocol} uses.
    """

    def __init__(self, status_fd: int = -1, pid: int = 4242, reply_fd: int = -1) -> None:
        self.pid = pid
        self.pipes: dict[int, FakePipe] = {4: FakePipe(reply_fd)}
        if status_fd >= 0:
            self.pipes[3] = FakePipe(status_fd)
        self.closed: list[int] = []
        self.written: list[tuple[int, bytes]] = []

    def closeChildFD(self, fd: int) -> None:
        self.closed.append(fd)
        self.pipes.pop(fd, None)

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.pipes[fd]  # KeyError once closed, like Process.writeToChild
        self.written.append((fd, data))


class Recorder:
    """
    L{WorkerEvents} that records, and fires C{exited} at the exit.
    """

    def __init__(self, on_report: Callable[[Report], None] | None = None) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.reports: list[Report] = []
        self.exit: tuple[int | None, int | None] | None = None
        self.exited: Deferred[Recorder] = Deferred()
        self.on_report = on_report
        self._waiting: list[tuple[Callable[[Report], bool], Deferred[Report]]] = []
        #: Pids given by workerStarted (a direct spawn's pid comes later).
        self.pids: list[int] = []

    def workerStarted(self, pid: int) -> None:
        assert self.events == [], "started after a report or the exit"
        self.pids.append(pid)

    def reportReceived(self, report: Report) -> None:
        self.events.append(("report", report))
        self.reports.append(report)
        if self.on_report is not None:
            self.on_report(report)
        for entry in list(self._waiting):
            match, d = entry
            if match(report):
                self._waiting.remove(entry)
                d.callback(report)

    def workerExited(self, exit_code: int | None, signal: int | None) -> None:
        self.events.append(("exit", exit_code, signal))
        self.exit = (exit_code, signal)
        self.exited.callback(self)

    def report(self, verb: str) -> Deferred[Report]:
        """
        A Deferred firing at the first report with C{verb} (from now on).
        """
        d: Deferred[Report] = Deferred()
        self._waiting.append((lambda r: r.verb == verb, d))
        return d.addTimeout(TIMEOUT, reactor)

    def wait_exit(self) -> Deferred[Recorder]:
        """
        The exit, bounded by L{TIMEOUT}.
        """
        return self.exited.addTimeout(TIMEOUT, reactor)


def connected(transport: FakeTransport) -> tuple[WorkerProtocol, Recorder]:
    events = Recorder()
    protocol = WorkerProtocol(events)
    protocol.makeConnection(transport)
    return protocol, events


def done() -> Failure:
    return Failure(ProcessDone(0))


class TestWorkerProtocol:
    """
    L{WorkerProtocol} against a fake transport.
    """

    def test_reports(self) -> None:
        protocol, events = connected(FakeTransport())
        protocol.childDataReceived(3, b"run one\nru")
        protocol.childDataReceived(3, b"n two\n")
        assert events.reports == [Report("run", "one"), Report("run", "two")]

    def test_other_fds_ignored(self) -> None:
        protocol, events = connected(FakeTransport())
        protocol.childDataReceived(1, b"done nope\n")
        protocol.childDataReceived(4, b"done nope\n")
        assert events.reports == []

    def test_exit_code(self) -> None:
        protocol, events = connected(FakeTransport())
        protocol.processExited(Failure(ProcessTerminated(exitCode=3)))
        assert events.exit == (3, None)
        assert (protocol.exit_code, protocol.exit_signal) == (3, None)

    def test_exit_signal(self) -> None:
        protocol, events = connected(FakeTransport())
        protocol.processExited(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        assert events.exit == (None, signal.SIGKILL)

    def test_exit_done(self) -> None:
        protocol, events = connected(FakeTransport())
        protocol.processExited(done())
        assert events.exit == (0, None)
        assert protocol.exited

    def test_partial_line_flushed_at_exit(self) -> None:
        protocol, events = connected(FakeTransport())
        protocol.childDataReceived(3, b"run a\nerr no newline")
        protocol.processExited(done())
        assert events.events == [
            ("report", Report("run", "a")),
            ("report", Report("err", "no newline")),
            ("exit", 0, None),
        ]

    def test_drain_until_eagain(self) -> None:
        """
        At the exit, what is still in the status pipe is read (up to EAGAIN:
        a grandchild may hold the write end) before the exit is reported.
        """
        r, w = os.pipe()
        try:
            transport = FakeTransport(status_fd=r)
            protocol, events = connected(transport)
            protocol.childDataReceived(3, b"run fir")
            os.write(w, b"st\ndone ok\nrun par")
            protocol.processExited(done())
            assert events.events == [
                ("report", Report("run", "first")),
                ("report", Report("done", "ok")),
                ("report", Report("run", "par")),
                ("exit", 0, None),
            ]
            assert sorted(transport.closed) == [3, 4]
        finally:
            os.close(r)
            os.close(w)

    def test_drain_until_eof(self) -> None:
        r, w = os.pipe()
        try:
            protocol, events = connected(FakeTransport(status_fd=r))
            os.write(w, b"relayed http://h:1/q/x/1\n" * 3)
            os.close(w)
            w = -1
            protocol.processExited(Failure(ProcessTerminated(exitCode=1)))
            assert events.events == [("report", Report("relayed", "http://h:1/q/x/1"))] * 3 + [
                ("exit", 1, None)
            ]
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def test_drain_more_than_a_read(self) -> None:
        r, w = os.pipe()
        try:
            protocol, events = connected(FakeTransport(status_fd=r))
            line = b"run " + b"z" * 995 + b"\n"
            for _ in range(60):
                os.write(w, line)
            protocol.processExited(done())
            assert len(events.reports) == 60
        finally:
            os.close(r)
            os.close(w)

    def test_exit_once(self) -> None:
        protocol, events = connected(FakeTransport())
        protocol.processExited(done())
        protocol.processExited(Failure(ProcessTerminated(exitCode=2)))
        protocol.processEnded(Failure(ProcessTerminated(exitCode=2)))
        assert events.events == [("exit", 0, None)]

    def test_ended_without_exited(self) -> None:
        """
        C{processEnded} alone still records the exit.
        """
        protocol, events = connected(FakeTransport())
        protocol.childDataReceived(3, b"done x")
        protocol.processEnded(done())
        assert events.events == [("report", Report("done", "x")), ("exit", 0, None)]

    def test_reports_after_exit_ignored(self) -> None:
        protocol, events = connected(FakeTransport())
        protocol.processExited(done())
        protocol.childDataReceived(3, b"done late\n")
        assert events.events == [("exit", 0, None)]

    def test_reply(self) -> None:
        transport = FakeTransport()
        protocol, events = connected(transport)
        protocol.reply("ok http://h:1/q/x/2")
        assert transport.written == [(4, b"ok http://h:1/q/x/2\n")]

    def test_reply_one_line(self) -> None:
        transport = FakeTransport()
        protocol, events = connected(transport)
        protocol.reply("fail a\nb")
        assert transport.written == [(4, b"fail a b\n")]

    def test_reply_after_exit_ignored(self) -> None:
        transport = FakeTransport()
        protocol, events = connected(transport)
        protocol.processExited(done())
        protocol.reply("ok late")
        assert transport.written == []

    def test_reply_after_fd4_closed(self) -> None:
        transport = FakeTransport()
        protocol, events = connected(transport)
        del transport.pipes[4]
        protocol.reply("ok nobody")
        assert transport.written == []

    def test_handler_errors_contained(self) -> None:
        """
        An event handler that raises does not stop the next reports.
        """

        def boom(report: Report) -> None:
            if report.verb == "run":
                raise RuntimeError("handler bug")

        events = Recorder(on_report=boom)
        protocol = WorkerProtocol(events)
        protocol.makeConnection(FakeTransport())
        protocol.childDataReceived(3, b"run a\ndone b\n")
        protocol.processExited(done())
        assert [e[0] for e in events.events] == ["report", "report", "exit"]


# -- spawn_worker with a fake spawner


class FakeSpawn:
    """
    A spawner that records its arguments, inspects the fds it is given, and
    can make the process exit at once.
    """

    def __init__(self, exit_at_once: bool = False) -> None:
        self.exit_at_once = exit_at_once
        self.calls: list[dict[str, Any]] = []
        # The pipe behind the fake fd 4.
        self.reply_r, self.reply_w = os.pipe()
        os.set_blocking(self.reply_r, False)

    def close(self) -> None:
        os.close(self.reply_r)
        os.close(self.reply_w)

    def __call__(
        self,
        reactor: Any,
        protocol: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str],
        childFDs: dict[int, Any],
    ) -> int:
        fds = {}
        for child, target in childFDs.items():
            if isinstance(target, int):
                info = os.fstat(target)
                flags = fcntl.fcntl(target, fcntl.F_GETFL)
                fds[child] = (info.st_dev, info.st_ino, info.st_mode, flags)
        self.calls.append(
            dict(executable=executable, args=args, env=env, childFDs=childFDs, fds=fds)
        )
        transport = FakeTransport(pid=777, reply_fd=self.reply_w)
        protocol.makeConnection(transport)
        if self.exit_at_once:
            protocol.childDataReceived(3, b"done quick\n")
            protocol.processExited(done())
        return transport.pid


@pytest.fixture
def spawners() -> Any:
    """
    Make L{FakeSpawn}s; their pipes are closed after the test.
    """
    made: list[FakeSpawn] = []

    def make(**kwargs: Any) -> FakeSpawn:
        made.append(FakeSpawn(**kwargs))
        return made[-1]

    yield make
    for spawner in made:
        spawner.close()


def launch(clock: Any, spawner: Any, job_dir: Any, events: Recorder, **kwargs: Any) -> Worker:
    """
    L{spawn_worker} of the script C{x} through the launcher, started by
    C{spawner}.
    """
    return spawn_worker(
        clock, argv=["x"], env={}, job_dir=str(job_dir), real_script="x", events=events, spawner=spawner, **kwargs
    )


class TestSpawnWorker:
    """
    L{spawn_worker} with an injected spawner.
    """

    def test_launch(self, tmp_path: Any, spawners: Any) -> None:
        clock = Clock()
        spawner = spawners()
        job = tmp_path / "job"
        job.mkdir()
        worker = spawn_worker(
            clock,
            argv=["bash", "-lc", "/rq/code/x"],
            env={"A": "b"},
            job_dir=str(job),
            real_script="/rq/code/x",
            events=Recorder(),
            now=1_700_000_000.0,
            spawner=spawner,
        )
        assert isinstance(worker, Worker)
        assert worker.pid == 777
        assert not worker.exited
        (call,) = spawner.calls
        assert call["executable"] == "/bin/sh"
        args = call["args"]
        assert args[:2] == ["/bin/sh", "-c"]
        assert args[3:] == [
            "rq-worker",
            str(job),
            start_line_time(1_700_000_000.0),
            "/rq/code/x",
            "bash",
            "-lc",
            "/rq/code/x",
        ]
        assert call["env"] == {"A": "b"}
        fds = call["childFDs"]
        assert (fds[3], fds[4]) == ("r", "w")
        # stdio on /dev/null (the launcher opens stdio.log).
        assert fds[0] == fds[1] == fds[2]
        null = os.stat(os.devnull)
        dev, ino, mode, flags = call["fds"][0]
        assert (dev, ino) == (null.st_dev, null.st_ino)
        # The go line for the launcher, written at once.
        assert os.read(spawner.reply_r, 100) == b"\n"

    def test_no_event_before_return(self, tmp_path: Any, spawners: Any) -> None:
        """
        A worker that exits during the spawn is reported only after
        L{spawn_worker} returned, in order.
        """
        clock = Clock()
        events = Recorder()
        spawner = spawners(exit_at_once=True)
        worker = launch(clock, spawner, tmp_path, events)
        assert events.events == []
        assert worker.exited
        clock.advance(0)
        assert events.events == [("report", Report("done", "quick")), ("exit", 0, None)]
        # Gone already: no go line (our end of fd 4 is closed).
        with pytest.raises(BlockingIOError):
            os.read(spawner.reply_r, 100)

    def test_spawn_failure(self, tmp_path: Any) -> None:
        def failing(*args: Any) -> Any:
            raise OSError("no more processes")

        with pytest.raises(OSError):
            spawn_worker(
                Clock(),
                argv=["x"],
                env={},
                job_dir=str(tmp_path),
                real_script="x",
                events=Recorder(),
                spawner=failing,
            )


    def test_hold_go_line_waits_for_go(self, tmp_path: Any, spawners: Any, monkeypatch: Any) -> None:
        """
        Held, the launcher gets no go line until L{Worker.go}, and is told
        to enter C{go_dir} (where the job dir will be by then), made
        absolute; once it went, L{Worker.cancel} does nothing; events are
        delivered as usual.
        """
        sent = []
        monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append((pid, sig)))
        clock = Clock()
        spawner = spawners()
        job = tmp_path / "que" / "m1" / "job"
        job.mkdir(parents=True)
        events = Recorder()
        go_dir = os.path.relpath(tmp_path / "run" / "m1" / "job")
        worker = launch(clock, spawner, job, events, hold=True, go_dir=go_dir)
        assert worker.waiting and worker.pid == 777
        (call,) = spawner.calls
        assert call["args"][3:5] == ["rq-worker", str(tmp_path / "run" / "m1" / "job")]
        clock.advance(0)
        with pytest.raises(BlockingIOError):
            os.read(spawner.reply_r, 100)
        worker.go()
        assert not worker.waiting
        # The go line carries the time for the start line: that of the go.
        assert re.fullmatch(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\n", os.read(spawner.reply_r, 100))
        worker.go()
        worker.cancel()
        assert sent == []
        with pytest.raises(BlockingIOError):
            os.read(spawner.reply_r, 100)
        worker._protocol.childDataReceived(3, b"done ok\n")
        worker._protocol.processExited(done())
        assert events.events == [("report", Report("done", "ok")), ("exit", 0, None)]

    @pytest.mark.parametrize("hold, go_dir, entered", [(True, None, "job"), (False, "run", "job")])
    def test_go_dir_only_when_held(
        self, tmp_path: Any, spawners: Any, hold: bool, go_dir: str | None, entered: str
    ) -> None:
        """
        The launcher enters C{go_dir} only when held with one; without
        hold it is told to go at once.
        """
        spawner = spawners()
        go_path = None if go_dir is None else str(tmp_path / go_dir)
        worker = launch(Clock(), spawner, tmp_path / "job", Recorder(), hold=hold, go_dir=go_path)
        (call,) = spawner.calls
        assert call["args"][4] == str(tmp_path / entered)
        assert worker.waiting == hold
        if hold:
            with pytest.raises(BlockingIOError):
                os.read(spawner.reply_r, 100)
        else:
            assert os.read(spawner.reply_r, 100) == b"\n"

    def test_hold_cancel_kills_launcher_silently(self, tmp_path: Any, spawners: Any, monkeypatch: Any) -> None:
        """
        L{Worker.cancel} of a held launcher SIGKILLs its group without a go
        line; nothing it does after is delivered.
        """
        sent = []
        monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append((pid, sig)))
        clock = Clock()
        spawner = spawners()
        events = Recorder()
        worker = launch(clock, spawner, tmp_path, events, hold=True, go_dir=str(tmp_path / "run"))
        worker.cancel()
        assert not worker.waiting
        assert sent == [(777, signal.SIGKILL)]
        worker.go()
        worker.cancel()
        assert sent == [(777, signal.SIGKILL)]
        with pytest.raises(BlockingIOError):
            os.read(spawner.reply_r, 100)
        worker._protocol.childDataReceived(3, b"done late\n")
        worker._protocol.processExited(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        clock.advance(0)
        assert worker.exited
        assert events.events == [] and events.pids == []


class TestWorkerSignal:
    """
    L{Worker.signal} signals the process group.
    """

    def test_killpg(self, monkeypatch: Any) -> None:
        sent = []
        monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append((pid, sig)))
        Worker(1234, WorkerProtocol(Recorder())).signal(signal.SIGTERM)
        assert sent == [(1234, signal.SIGTERM)]

    def test_gone(self, monkeypatch: Any) -> None:
        """
        A group that is gone is ignored: the signal was tried, nothing raised.
        """
        tried = []

        def gone(pid: int, sig: int) -> None:
            tried.append((pid, sig))
            raise ProcessLookupError(pid)

        monkeypatch.setattr(os, "killpg", gone)
        assert Worker(1234, WorkerProtocol(Recorder())).signal(signal.SIGKILL) is None
        assert tried == [(1234, signal.SIGKILL)]


# -- real workers


def stat_fields(text: str) -> list[str]:
    """
    The fields of a C{/proc/<pid>/stat} text after the command name: index
    0 is the state, 2 the process group, 3 the session, 16 the nice value.
    """
    return text[text.rindex(")") + 2 :].split()


def proc_stat(pid: int) -> list[str]:
    """
    L{stat_fields} of a live process.
    """
    with open(f"/proc/{pid}/stat") as f:
        return stat_fields(f.read())


def saved_stat(job: str) -> list[str]:
    """
    L{stat_fields} of the C{stat.txt} a script saved in its job dir.
    """
    with open(os.path.join(job, "stat.txt")) as f:
        return stat_fields(f.read())


def real_spawn(
    tmp_path: Any, body: str, events: Recorder, job: str = "job", **kwargs: Any
) -> tuple[Worker, str, str]:
    """
    Write a script, spawn it for real; the worker, its script, its job dir.
    """
    script = make_script(str(tmp_path / "code" / "script.sh"), body)
    job_dir = str(tmp_path / job)
    os.makedirs(job_dir, exist_ok=True)
    real = resolve_script("code/script.sh", str(tmp_path))
    worker = spawn_worker(
        reactor,
        argv=script_argv("", real),
        env=dict(os.environ, RQ_VER="1.18.3"),
        job_dir=job_dir,
        real_script=real,
        events=events,
        **kwargs,
    )
    return worker, script, job_dir


def spawn_executable(
    tmp_path: Any, name: str, text: str, events: Recorder, job: Any = None, **kwargs: Any
) -> tuple[Worker, Any, Any]:
    """
    Write the executable C{<tmp_path>/<name>} and spawn it as it is (its
    path the whole command line) in C{job} (default C{<tmp_path>/job}),
    made here; the worker, the file, the job dir. C{kwargs} go to
    L{spawn_worker}.
    """
    script = tmp_path / name
    script.write_text(text)
    script.chmod(0o755)
    job = tmp_path / "job" if job is None else job
    job.mkdir(parents=True)
    worker = spawn_worker(
        reactor,
        argv=[str(script)],
        env=dict(os.environ),
        job_dir=str(job),
        real_script=str(script),
        events=events,
        **kwargs,
    )
    return worker, script, job


@pytest.fixture(params=["direct", "launcher"])
def spawn_path(request: Any, monkeypatch: Any) -> str:
    """
    Run a real-worker test with the direct spawner, then with the C{/bin/sh}
    launcher it falls back to.
    """
    if request.param == "launcher":
        monkeypatch.setattr(worker_module, "_direct", False)
    elif worker_module._direct_spawner() is None:
        pytest.skip("no direct spawner on this system")
    return str(request.param)


BASICS = r"""
echo "cwd:$(pwd)"
if read line; then echo "stdin:$line"; else echo "stdin:eof"; fi
cat /proc/$$/stat > stat.txt
grep -E '^SigIgn' /proc/$$/status > signals.txt
echo "run working" >&3
echo "dup 0-X-other" >&3
read reply <&4
echo "reply:$reply"
echo "to stderr" >&2
echo "done all good" >&3
"""


@pytest_twisted.ensureDeferred
async def test_real_worker(tmp_path: Any, spawn_path: str) -> None:
    """
    A real worker: cwd, stdin, stdio.log, fd 3 reports, fd 4 reply, nice
    19, its own session and process group, no other inherited fds.
    """
    holder: list[Worker] = []

    def on_report(report: Report) -> None:
        if report.verb == "dup":
            holder[0].reply("ok http://rqhost:3333/q/other/1")

    events = Recorder(on_report=on_report)
    now = 1_700_000_000.5
    worker, script, job = real_spawn(tmp_path, BASICS, events, now=now)
    holder.append(worker)
    await events.wait_exit()
    assert events.exit == (0, None)
    assert worker.exited
    assert events.reports == [
        Report("run", "working"),
        Report("dup", "0-X-other"),
        Report("done", "all good"),
    ]
    with open(os.path.join(job, "stdio.log")) as f:
        log = f.read()
    assert log == (
        f"\n{worker.pid} - {start_line_time(now)} - RQ START - {script}\n"
        f"cwd:{job}\n"
        "stdin:eof\n"
        "reply:ok http://rqhost:3333/q/other/1\n"
        "to stderr\n"
    )
    fields = saved_stat(job)
    assert int(fields[2]) == worker.pid, "own process group"
    assert int(fields[3]) == worker.pid, "own session"
    assert int(fields[16]) == 19, "nice 19"
    assert int(fields[38]) == os.sched_getscheduler(0), "the daemon's scheduling policy"
    # No standard signal ignored (Python ignores SIGPIPE, for one; 32 and
    # up belong to the C library).
    with open(os.path.join(job, "signals.txt")) as f:
        assert int(f.read().split()[1], 16) & 0x7FFFFFFF == 0


FDS = """
exec "$TEST_PYTHON" -c '
import os
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
os.write(3, ("done " + repr(sorted(fds.items()))).encode() + b"\\n")
'
"""


@pytest_twisted.ensureDeferred
async def test_real_worker_fds(tmp_path: Any, spawn_path: str) -> None:
    """
    The script gets fds 0 to 4 and nothing else from the daemon.
    """
    events = Recorder()
    script = make_script(str(tmp_path / "code" / "script.sh"), FDS)
    job = tmp_path / "job"
    job.mkdir()
    spawn_worker(
        reactor,
        argv=[script],
        env=dict(os.environ, TEST_PYTHON=sys.executable),
        job_dir=str(job),
        real_script=script,
        events=events,
    )
    await events.wait_exit()
    assert events.exit == (0, None), (job / "stdio.log").read_text()
    fds = dict(eval(events.reports[0].text))
    assert sorted(fds) == ["0", "1", "2", "3", "4"]
    assert fds["0"] == os.devnull
    assert fds["1"] == fds["2"] == str(job / "stdio.log")
    assert fds["3"].startswith("pipe:") and fds["4"].startswith("pipe:")
    assert fds["3"] != fds["4"]


@pytest_twisted.ensureDeferred
async def test_real_exit_status_and_partial_line(tmp_path: Any, spawn_path: str) -> None:
    events = Recorder()
    real_spawn(tmp_path, "printf 'run a\\nerr no newline' >&3\nexit 3\n", events)
    await events.wait_exit()
    assert events.events == [
        ("report", Report("run", "a")),
        ("report", Report("err", "no newline")),
        ("exit", 3, None),
    ]


@pytest.mark.parametrize("hold", [False, True])
@pytest_twisted.ensureDeferred
async def test_real_worker_freed_at_once(tmp_path: Any, spawn_path: str, hold: bool) -> None:
    """
    Once a worker's exit is reported, nothing of it (worker, protocol,
    process transport, spawn request) is left in a reference cycle:
    reference counting frees it all as soon as its owner lets go, without
    the cyclic collector (which would otherwise walk every finished worker).
    """
    gc.collect()
    gc.disable()
    try:
        events = Recorder()
        worker, _, _ = real_spawn(tmp_path, "echo 'done ok' >&3\n", events, hold=hold)
        transport = worker._protocol.transport
        refs = [weakref.ref(worker), weakref.ref(worker._protocol), weakref.ref(transport)]
        request = getattr(transport, "_request", None)
        if request is not None:
            refs.append(weakref.ref(request))
        del request
        if hold:
            worker.go()
        await events.wait_exit()
        assert events.exit == (0, None)
        del worker, transport
        # Out of the exit's call stack, and once the spawn thread is done
        # with its request (it may finish after the script exited).
        await _until(lambda: all(ref() is None for ref in refs), "the finished worker to be freed")
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_real_quick_exits(tmp_path: Any, spawn_path: str) -> None:
    """
    Workers that exit at once, maybe before the spawn returned, report
    their exit once, after the spawn returned; their pid is known when the
    spawn returns (launcher) or given before any report (direct spawn).
    """
    script = make_script(str(tmp_path / "quick.sh"), "echo 'done' >&3\n")
    all_events = []
    for n in range(20):
        job = tmp_path / f"job{n}"
        job.mkdir()
        events = Recorder()
        worker = spawn_worker(
            reactor,
            argv=[script],
            env=dict(os.environ),
            job_dir=str(job),
            real_script=script,
            events=events,
        )
        if spawn_path == "direct":
            assert worker.pid is None
        else:
            assert isinstance(worker.pid, int)
        assert events.events == [] and events.pids == []
        all_events.append((worker, events))
    for worker, events in all_events:
        await events.wait_exit()
        assert events.events == [("report", Report("done", "")), ("exit", 0, None)]
        assert isinstance(worker.pid, int)
        assert events.pids == ([worker.pid] if spawn_path == "direct" else [])


@pytest_twisted.ensureDeferred
async def test_real_many_reports_then_exit(tmp_path: Any) -> None:
    """
    Every report written before the exit arrives before the exit.
    """
    events = Recorder()
    body = 'i=0\nwhile [ $i -lt 2000 ]; do echo "run $i" >&3; i=$((i+1)); done\n'
    real_spawn(tmp_path, body, events)
    await events.wait_exit()
    assert events.reports == [Report("run", str(i)) for i in range(2000)]
    assert events.exit == (0, None)


@pytest_twisted.ensureDeferred
async def test_real_exec_failure(tmp_path: Any) -> None:
    """
    A command that cannot be executed: the worker exits 127, the shell's
    message is in stdio.log.
    """
    events = Recorder()
    job = tmp_path / "job"
    job.mkdir()
    spawn_worker(
        reactor,
        argv=["no-such-command-rq", "/x"],
        env=dict(os.environ),
        job_dir=str(job),
        real_script="/x",
        events=events,
    )
    await events.wait_exit()
    assert events.exit == (127, None)
    assert "no-such-command-rq" in (job / "stdio.log").read_text()


@pytest_twisted.ensureDeferred
async def test_real_missing_job_dir(tmp_path: Any) -> None:
    """
    A job dir that cannot be entered: the worker exits 126.
    """
    events = Recorder()
    spawn_worker(
        reactor,
        argv=["true"],
        env=dict(os.environ),
        job_dir=str(tmp_path / "nope"),
        real_script="true",
        events=events,
    )
    await events.wait_exit()
    assert events.exit == (126, None)


@pytest_twisted.ensureDeferred
async def test_real_stdio_log_unwritable(tmp_path: Any) -> None:
    """
    A C{stdio.log} that cannot be opened: the worker exits 126.
    """
    events = Recorder()
    (tmp_path / "stdio.log").mkdir()
    spawn_worker(
        reactor,
        argv=["true"],
        env=dict(os.environ),
        job_dir=str(tmp_path),
        real_script="true",
        events=events,
    )
    await events.wait_exit()
    assert events.exit == (126, None)


@pytest_twisted.ensureDeferred
async def test_real_signal_kills_group(tmp_path: Any, spawn_path: str) -> None:
    """
    L{Worker.signal} reaches the worker and its children.
    """
    events = Recorder()
    started = events.report("run")
    body = 'sleep 60 &\necho "run $!" >&3\nwait\n'
    worker, _, _ = real_spawn(tmp_path, body, events)
    report = await started
    child = int(report.text)
    assert int(proc_stat(child)[2]) == worker.pid
    child_fd = os.pidfd_open(child)
    try:
        worker.signal(signal.SIGTERM)
        await events.wait_exit()
        assert events.exit == (None, signal.SIGTERM)
        # The child got the SIGTERM too: its pidfd becomes readable when it
        # terminates.
        assert select.select([child_fd], [], [], TIMEOUT)[0] == [child_fd]
    finally:
        os.close(child_fd)


@pytest_twisted.ensureDeferred
async def test_real_grandchild_holding_fd3(tmp_path: Any, spawn_path: str) -> None:
    """
    A background grandchild that keeps fds 3 and 4 open does not delay the
    exit report; it stays in the worker's process group.
    """
    events = Recorder()
    body = "sleep 60 &\necho $! > grandchild.pid\necho 'done ok' >&3\nexit 0\n"
    worker, _, job = real_spawn(tmp_path, body, events)
    try:
        await events.wait_exit()
        assert events.events == [("report", Report("done", "ok")), ("exit", 0, None)]
        with open(os.path.join(job, "grandchild.pid")) as f:
            grandchild = int(f.read())
        fields = proc_stat(grandchild)
        assert fields[0] != "Z"
        assert int(fields[2]) == worker.pid
        fds = os.listdir(f"/proc/{grandchild}/fd")
        assert "3" in fds and "4" in fds
    finally:
        worker.signal(signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_real_fork_path(tmp_path: Any, monkeypatch: Any) -> None:
    """
    Where C{posix_spawn} is not used, the fork path gives the same worker.
    """
    monkeypatch.setattr(reactor, "_neverUseSpawn", True, raising=False)
    events = Recorder()
    body = "cat /proc/$$/stat > stat.txt\necho \"done $(pwd)\" >&3\n"
    worker, script, job = real_spawn(tmp_path, body, events)
    monkeypatch.undo()
    await events.wait_exit()
    assert events.events == [("report", Report("done", job)), ("exit", 0, None)]
    fields = saved_stat(job)
    assert (int(fields[2]), int(fields[3]), int(fields[16])) == (worker.pid, worker.pid, 19)
    with open(os.path.join(job, "stdio.log")) as f:
        assert f.read().startswith(f"\n{worker.pid} - ")


# -- the direct spawner


def test_gate_hang_up_seen_above_fd_1024(tmp_path: Any) -> None:
    """
    L{_GateWatcher.hung_up} tells whether the child came to the gate (a
    writer opened FIFO C{in} and closed it) without the reactor watching,
    also for an fd number select() could not take.
    """
    fifo = str(tmp_path / "in")
    os.mkfifo(fifo)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048 and (hard == resource.RLIM_INFINITY or hard >= 2048):
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    low = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        high = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, 1500)
    except OSError:
        pytest.skip("no fd number above 1024 allowed here")
    finally:
        os.close(low)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    watcher = spawn_module._GateWatcher(None, high)  # type: ignore[arg-type]
    try:
        assert high > 1024 and not watcher.hung_up()
        writer = os.open(fifo, os.O_WRONLY)
        assert not watcher.hung_up()
        os.close(writer)
        assert watcher.hung_up()
    finally:
        os.close(high)


def direct_only() -> DirectSpawner:
    """
    The process's L{DirectSpawner}, or skip the test.
    """
    spawner = worker_module._direct_spawner()
    if spawner is None:
        pytest.skip("no direct spawner on this system")
    return spawner


@pytest_twisted.ensureDeferred
async def test_real_direct_no_launcher(tmp_path: Any) -> None:
    """
    With the direct spawner the worker is the script itself (no shell in
    between), a child of the daemon, reniced before it ran.
    """
    direct_only()
    events = Recorder()
    body = "cat /proc/$$/stat > stat.txt\ncat /proc/$$/cmdline > cmdline.txt\necho 'done ok' >&3\n"
    worker, script, job = real_spawn(tmp_path, body, events)
    await events.wait_exit()
    assert events.events == [("report", Report("done", "ok")), ("exit", 0, None)]
    with open(os.path.join(job, "cmdline.txt"), "rb") as f:
        assert f.read().split(b"\0")[:2] == [b"/bin/sh", os.fsencode(script)]
    fields = saved_stat(job)
    assert int(fields[1]) == os.getpid()
    assert (int(fields[2]), int(fields[3]), int(fields[16])) == (worker.pid, worker.pid, 19)


@pytest_twisted.ensureDeferred
async def test_real_no_shebang(tmp_path: Any) -> None:
    """
    An executable without C{#!} runs as a shell script, as with a shell.
    """
    direct_only()
    events = Recorder()
    spawn_executable(tmp_path, "plain", "echo 'done plain' >&3\n", events)
    await events.wait_exit()
    assert events.events == [("report", Report("done", "plain")), ("exit", 0, None)]


@pytest_twisted.ensureDeferred
async def test_real_exec_fails_after_start_line(tmp_path: Any) -> None:
    """
    A script whose interpreter is missing fails in the exec itself: exit
    127, one start line and the reason in C{stdio.log}.
    """
    direct_only()
    events = Recorder()
    worker, script, job = spawn_executable(tmp_path, "broken.sh", "#!/nonexistent/rq-interpreter\n", events)
    await events.wait_exit()
    assert events.exit == (127, None)
    lines = (job / "stdio.log").read_text().splitlines()
    assert lines[0] == ""
    assert lines[1].startswith(f"{worker.pid} - ") and lines[1].endswith(f" - RQ START - {script}")
    assert lines[2:] == [f"rq: {script}: No such file or directory"]


# -- workers made ready ahead (spawn_worker with hold)


class _Time:
    """
    The L{time} module as L{rqtwisted.worker} sees it, its C{time()} set by
    the test.
    """

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _spawn_request(worker: Worker) -> Any:
    """
    The spawner's ticket of a worker spawned directly.
    """
    process = worker._protocol.transport
    assert isinstance(process, DirectProcess)
    return process._request


async def _held_pid(worker: Worker) -> int:
    """
    Wait until a directly spawned held worker is at its gate; its pid.
    """
    return await _gate_child(_spawn_request(worker))


async def _gate_child(request: Any) -> int:
    """
    Wait until the child of a held spawn is at its gate; its pid. Nobody
    watches that gate: its FIFO hangs up, the spawn stays C{waiting}, and
    the child is the newest of its spawn thread.
    """
    await _until(lambda: request.watcher.hung_up(), "the held child reaching the gate")
    assert request.state == "waiting" and not request.watcher.registered
    with open(f"/proc/self/task/{request.thread.tid}/children") as f:
        return int(f.read().split()[-1])


@pytest_twisted.ensureDeferred
async def test_real_direct_hold_go(tmp_path: Any, monkeypatch: Any) -> None:
    """
    A worker spawned with C{hold} waits at the gate: no event, an empty
    C{stdio.log}, nothing of its script run. L{Worker.go} lets it run: its
    pid comes with C{workerStarted}, its start line (with the time of the
    go) first in C{stdio.log}, then its reports and its exit, at nice 19.
    """
    direct_only()
    clock = _Time(1_700_000_000.0)
    monkeypatch.setattr(worker_module, "time", clock)
    events = Recorder()
    body = "cat /proc/$$/stat > stat.txt\necho 'done ok' >&3\n"
    worker, script, job = real_spawn(tmp_path, body, events, hold=True)
    assert worker.waiting and worker.pid is None
    pid = await _held_pid(worker)
    # Some reactor turns later, still nothing.
    await deferLater(reactor, 0.02, lambda: None)
    assert worker.waiting and worker.pid is None and not worker.exited
    assert events.events == [] and events.pids == []
    log = os.path.join(job, "stdio.log")
    with open(log) as f:
        assert f.read() == ""
    assert not os.path.exists(os.path.join(job, "stat.txt"))
    clock.now += 100
    worker.go()
    assert not worker.waiting
    assert events.pids == [pid] and worker.pid == pid
    await events.wait_exit()
    assert events.events == [("report", Report("done", "ok")), ("exit", 0, None)]
    real = resolve_script("code/script.sh", str(tmp_path))
    with open(log) as f:
        assert f.read() == f"\n{pid} - {start_line_time(1_700_000_100.0)} - RQ START - {real}\n"
    fields = saved_stat(job)
    assert (int(fields[2]), int(fields[3]), int(fields[16])) == (pid, pid, 19)
    worker.go()
    assert events.pids == [pid]


@pytest_twisted.ensureDeferred
async def test_real_direct_hold_go_at_once(tmp_path: Any) -> None:
    """
    A held worker let go before it reached its gate starts as an ordinary
    one; with C{now} given, its start line has that time.
    """
    direct_only()
    events = Recorder()
    worker, script, job = real_spawn(tmp_path, "echo 'done ok' >&3\n", events, hold=True, now=1_600_000_000.0)
    assert _spawn_request(worker).state == "waiting"
    worker.go()
    assert not worker.waiting
    await events.wait_exit()
    assert events.events == [("report", Report("done", "ok")), ("exit", 0, None)]
    assert events.pids == [worker.pid]
    with open(os.path.join(job, "stdio.log")) as f:
        assert f.read().startswith(f"\n{worker.pid} - {start_line_time(1_600_000_000.0)} - RQ START - ")


@pytest_twisted.ensureDeferred
async def test_real_direct_hold_cancel(tmp_path: Any) -> None:
    """
    L{Worker.cancel} of a held worker kills it at the gate (reaped, not
    even a zombie left) before anything of its script ran: no event at
    all, nothing in C{stdio.log}, our pipe ends closed.
    """
    direct_only()
    events = Recorder()
    worker, script, job = real_spawn(tmp_path, "touch ran\necho 'done ok' >&3\n", events, hold=True)
    pid = await _held_pid(worker)
    process = worker._protocol.transport
    request = _spawn_request(worker)
    worker.cancel()
    assert not worker.waiting
    assert process.ended and process.pipes == {}
    assert request.state == "cancelled"
    await _until(lambda: not _alive(pid), f"worker {pid} being reaped")
    await deferLater(reactor, 0.01, lambda: None)
    assert events.events == [] and events.pids == []
    assert worker.pid is None
    with open(os.path.join(job, "stdio.log")) as f:
        assert f.read() == ""
    assert not os.path.exists(os.path.join(job, "ran"))
    # Neither going nor cancelling does anything now.
    worker.go()
    worker.cancel()
    await deferLater(reactor, 0.01, lambda: None)
    assert events.events == [] and events.pids == []
    assert request.state == "cancelled"


@pytest_twisted.ensureDeferred
async def test_real_direct_cancel_before_the_gate(tmp_path: Any, monkeypatch: Any) -> None:
    """
    A held worker cancelled before it reached its gate is killed there:
    the same outcome, and the next worker runs.
    """
    spawner = direct_only()
    found: list[int | None] = []
    real_find = spawner._find_child

    def find(request: Any) -> Any:
        found.append(real_find(request))
        return found[-1]

    monkeypatch.setattr(spawner, "_find_child", find)
    events = Recorder()
    worker, script, job = real_spawn(tmp_path, "touch ran\necho 'done ok' >&3\n", events, hold=True)
    worker.cancel()
    assert not worker.waiting
    await _until(lambda: found and found[-1] is not None and not _alive(found[-1]), "the worker being reaped")
    await deferLater(reactor, 0.01, lambda: None)
    assert events.events == [] and events.pids == []
    with open(os.path.join(job, "stdio.log")) as f:
        assert f.read() == ""
    assert not os.path.exists(os.path.join(job, "ran"))
    other = Recorder()
    real_spawn(tmp_path, "echo 'done next' >&3\n", other, job="job2")
    await other.wait_exit()
    assert other.events == [("report", Report("done", "next")), ("exit", 0, None)]


def move_to_run(tmp_path: Any) -> None:
    """
    Move message C{m1} from C{que/} to C{run/}, as a queue does before its
    ready worker goes.
    """
    (tmp_path / "run").mkdir()
    os.rename(tmp_path / "que" / "m1", tmp_path / "run" / "m1")


@pytest_twisted.ensureDeferred
async def test_real_direct_hold_job_dir_moved(tmp_path: Any) -> None:
    """
    A held worker made ready in C{que/<id>/job}, its message moved to
    C{run/} before it goes, runs in the moved directory, its C{stdio.log}
    there.
    """
    direct_only()
    events = Recorder()
    go_dir = tmp_path / "run" / "m1" / "job"
    body = "pwd -P > where.txt\necho 'done ok' >&3\n"
    worker, script, job = real_spawn(tmp_path, body, events, job="que/m1/job", hold=True, go_dir=str(go_dir))
    pid = await _held_pid(worker)
    move_to_run(tmp_path)
    worker.go()
    await events.wait_exit()
    assert events.events == [("report", Report("done", "ok")), ("exit", 0, None)]
    assert (go_dir / "where.txt").read_text() == os.path.realpath(go_dir) + "\n"
    assert (go_dir / "stdio.log").read_text().startswith(f"\n{pid} - ")


@pytest_twisted.ensureDeferred
async def test_real_direct_hold_exec_fails_after_move(tmp_path: Any) -> None:
    """
    A held worker whose exec fails after its directory moved gets the
    reason in its C{stdio.log}, where it is now.
    """
    direct_only()
    events = Recorder()
    go_dir = tmp_path / "run" / "m1" / "job"
    worker, script, job = spawn_executable(
        tmp_path, "broken.sh", "#!/nonexistent/rq-interpreter\n", events, tmp_path / "que" / "m1" / "job",
        hold=True, go_dir=str(go_dir),
    )
    await _held_pid(worker)
    move_to_run(tmp_path)
    worker.go()
    await events.wait_exit()
    assert events.exit == (127, None)
    lines = (go_dir / "stdio.log").read_text().splitlines()
    assert lines[2:] == [f"rq: {script}: No such file or directory"]


@pytest_twisted.ensureDeferred
async def test_real_launcher_hold_go(tmp_path: Any) -> None:
    """
    Through the real launcher, a held worker waits (its pid known, nothing
    of the script run, no C{stdio.log}) until L{Worker.go}; it then enters
    C{go_dir}, where its job directory was moved meanwhile.
    """
    events = Recorder()
    go_dir = tmp_path / "run" / "m1" / "job"
    body = "pwd -P > where.txt\necho 'done ok' >&3\n"
    worker, script, job = real_spawn(
        tmp_path, body, events, job="que/m1/job", hold=True, go_dir=str(go_dir),
        spawner=worker_module._spawn_session_process,
    )
    assert worker.waiting and worker.pid is not None
    pid = worker.pid

    def cmdline() -> bytes:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()

    # Empty while its exec is still under way (on a loaded machine).
    await _until(lambda: cmdline() != b"", "the launcher's exec")
    assert cmdline().split(b"\0")[:2] == [b"/bin/sh", b"-c"]
    await deferLater(reactor, 0.02, lambda: None)
    assert events.events == []
    assert os.listdir(job) == []
    move_to_run(tmp_path)
    worker.go()
    await events.wait_exit()
    assert events.events == [("report", Report("done", "ok")), ("exit", 0, None)]
    assert (go_dir / "where.txt").read_text() == os.path.realpath(go_dir) + "\n"
    real = resolve_script("code/script.sh", str(tmp_path))
    lines = (go_dir / "stdio.log").read_text().splitlines()
    assert lines[0] == "" and lines[1].startswith(f"{pid} - ") and lines[1].endswith(f" - RQ START - {real}")


@pytest_twisted.ensureDeferred
async def test_real_launcher_hold_cancel(tmp_path: Any) -> None:
    """
    Through the real launcher, L{Worker.cancel} kills the held worker
    before anything of its script ran; no event is delivered, not even
    its exit.
    """
    events = Recorder()
    worker, script, job = real_spawn(
        tmp_path, "touch ran\necho 'done ok' >&3\n", events, hold=True, go_dir=str(tmp_path / "job"),
        spawner=worker_module._spawn_session_process,
    )
    pid = worker.pid
    assert pid is not None and _alive(pid)
    worker.cancel()
    assert not worker.waiting
    await _until(lambda: worker.exited, "the launcher's exit")
    await _until(lambda: not _alive(pid), f"launcher {pid} being reaped")
    await deferLater(reactor, 0.01, lambda: None)
    assert events.events == [] and events.pids == []
    assert os.listdir(job) == []


@pytest_twisted.ensureDeferred
async def test_real_launcher_hold_start_line_time(tmp_path: Any, monkeypatch: Any) -> None:
    """
    Through the launcher too, a held worker's start line has the time of
    its go when C{now} is not given.
    """
    clock = _Time(1_700_000_000.0)
    monkeypatch.setattr(worker_module, "time", clock)
    events = Recorder()
    worker, script, job = real_spawn(
        tmp_path, "echo 'done ok' >&3\n", events, hold=True, spawner=worker_module._spawn_session_process
    )
    clock.now += 100
    worker.go()
    await events.wait_exit()
    lines = (tmp_path / "job" / "stdio.log").read_text().splitlines()
    assert lines[1].startswith(f"{worker.pid} - {start_line_time(1_700_000_100.0)} - RQ START - ")



class _Handler:
    """
    A L{rqtwisted.spawn.SpawnHandler} that records, and fires C{done} once
    the spawn started or failed.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.done: Deferred[_Handler] = Deferred()
        self.exec_failed: Deferred[tuple[int, int]] = Deferred()
        #: The spawn's ticket (for L{DirectSpawner.go} and L{DirectSpawner.cancel}).
        self.request: Any = None
        #: Our fds the spawn was given to close.
        self.owned: list[int] = []

    def spawnStarted(self, pid: int) -> None:
        self.events.append(("started", pid))
        self.done.callback(self)

    def spawnFailed(self, error: SpawnFailed) -> None:
        self.events.append(("failed", error))
        self.done.callback(self)

    def execFailed(self, pid: int, code: int) -> None:
        self.events.append(("exec failed", pid, code))
        self.exec_failed.callback((pid, code))

    @property
    def pid(self) -> int:
        assert self.events and self.events[0][0] == "started", self.events
        return int(self.events[0][1])


def _reaped(pid: int) -> Deferred[int]:
    """
    The wait status of child C{pid}, waited for off the reactor.
    """
    from twisted.internet.threads import deferToThread

    return deferToThread(lambda: os.waitpid(pid, 0)[1]).addTimeout(TIMEOUT, reactor)


def _alive(pid: int) -> bool:
    """
    Whether process C{pid} exists (a zombie does).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _until(condition: Callable[[], Any], what: str, turns: int = 1000) -> None:
    """
    Wait, polling through the reactor every 5 ms, until C{condition()} is
    true; fail after C{turns} polls.
    """
    for _ in range(turns):
        if condition():
            return
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError(f"waited in vain for {what}")


class TestDirectSpawner:
    """
    L{DirectSpawner} on its own, on the real reactor: L{spawn} returns at
    once; the handler hears the start (after the gate) or the failure.
    """

    def spawn(
        self,
        spawner: DirectSpawner,
        tmp_path: Any,
        cwd: str,
        argv: list[str],
        hold: bool = False,
        stdin: int | None = None,
    ) -> _Handler:
        log = os.open(str(tmp_path / "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        handler = _Handler()
        handler.owned = [log, null]
        handler.request = spawner.spawn(
            reactor,
            argv[0],
            argv,
            {"PATH": os.defpath},
            {0: null if stdin is None else stdin, 1: log, 2: log, 3: null, 4: null},
            cwd,
            log,
            lambda pid: b"start %d\n" % pid,
            19,
            handler,
            [log, null],
            hold=hold,
        )
        assert handler.events == [], "nothing before spawn returned"
        handler.done.addTimeout(TIMEOUT, reactor)
        return handler

    @pytest.fixture
    def spawner(self) -> Any:
        if not DirectSpawner.available():
            pytest.skip("no direct spawner on this system")
        spawner = DirectSpawner()
        yield spawner
        spawner.close()

    @pytest_twisted.ensureDeferred
    async def test_spawn_wait(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        The start line comes first; the child runs in C{cwd}, at nice 19,
        leading its own session; a spawn thread and a gate are reused.
        """
        pids = []
        for n in range(3):
            handler = await self.spawn(
                spawner, tmp_path, str(tmp_path), ["/bin/sh", "-c", "echo $(pwd) $$; cat /proc/$$/stat"]
            ).done
            assert await _reaped(handler.pid) == 0
            assert handler.events == [("started", handler.pid)]
            pids.append(handler.pid)
        lines = (tmp_path / "log").read_text().splitlines()
        assert len(lines) == 9
        for n, pid in enumerate(pids):
            start, where, stat_line = lines[3 * n : 3 * n + 3]
            assert start == f"start {pid}"
            assert where == f"{tmp_path} {pid}"
            fields = stat_fields(stat_line)
            assert (int(fields[2]), int(fields[3]), int(fields[16])) == (pid, pid, 19)
            # Scheduled as the reactor thread is, not as the spawn thread.
            assert int(fields[38]) == os.sched_getscheduler(0)
        assert len(spawner._threads) == 1
        [thread] = spawner._threads
        # Batch spawn threads where the reactor thread has the default policy.
        assert spawner.batch_threads == (os.sched_getscheduler(0) == os.SCHED_OTHER)
        expected = os.SCHED_BATCH if spawner.batch_threads else os.sched_getscheduler(0)
        assert thread.tid is not None and os.sched_getscheduler(thread.tid) == expected

    @pytest_twisted.ensureDeferred
    async def test_policy_change_refused(self, spawner: DirectSpawner, tmp_path: Any, monkeypatch: Any) -> None:
        """
        Where setting a scheduling policy is refused (a seccomp filter, say),
        neither the spawn threads nor the children try: spawns still work.
        """

        def refused(*args: Any) -> None:
            raise PermissionError(errno.EPERM, "refused")

        monkeypatch.setattr(os, "sched_setscheduler", refused)
        handler = await self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/sh", "-c", "cat /proc/$$/stat"]).done
        assert await _reaped(handler.pid) == 0
        assert not spawner.batch_threads
        fields = stat_fields((tmp_path / "log").read_text().splitlines()[1])
        assert int(fields[38]) == os.sched_getscheduler(0)
        [thread] = spawner._threads
        assert thread.tid is not None and os.sched_getscheduler(thread.tid) == os.sched_getscheduler(0)

    @pytest_twisted.ensureDeferred
    async def test_other_policy_inherited(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        A daemon run with another scheduling policy than the default (with
        C{chrt}, say) keeps its spawn threads as they are, and its workers
        inherit the policy.
        """
        main = threading.get_native_id()
        original = os.sched_getscheduler(main)
        if original not in (os.SCHED_OTHER, os.SCHED_BATCH):
            pytest.skip("the tests run with a policy they may not leave")
        os.sched_setscheduler(main, os.SCHED_BATCH, os.sched_param(0))
        try:
            handler = await self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/sh", "-c", "cat /proc/$$/stat"]).done
        finally:
            os.sched_setscheduler(main, original, os.sched_param(0))
        assert await _reaped(handler.pid) == 0
        assert not spawner.batch_threads
        fields = stat_fields((tmp_path / "log").read_text().splitlines()[1])
        assert int(fields[38]) == os.SCHED_BATCH
        [thread] = spawner._threads
        assert thread.tid is not None and os.sched_getscheduler(thread.tid) == os.SCHED_BATCH

    @pytest_twisted.ensureDeferred
    async def test_many_at_once(self, spawner: DirectSpawner, tmp_path: Any, monkeypatch: Any) -> None:
        """
        Spawns asked for together all start, each with its own start line
        before its output; beyond L{MAX_THREADS} they wait for a thread.
        """
        monkeypatch.setattr(spawn_module, "MAX_THREADS", 2)
        handlers = [
            self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/sh", "-c", f"echo out {n} $$"]) for n in range(6)
        ]
        for handler in handlers:
            await handler.done
        statuses = [await _reaped(h.pid) for h in handlers]
        assert statuses == [0] * 6
        assert len(spawner._threads) == 2
        lines = (tmp_path / "log").read_text().splitlines()
        assert sorted(lines) == sorted([f"start {h.pid}" for h in handlers] + [f"out {n} {h.pid}" for n, h in enumerate(handlers)])
        for n, handler in enumerate(handlers):
            assert lines.index(f"start {handler.pid}") < lines.index(f"out {n} {handler.pid}")

    @pytest_twisted.ensureDeferred
    async def test_failure_before_the_gate(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        A directory that cannot be entered fails the spawn at once (the
        child enters it through an fd we open): L{SpawnFailed}, nothing in
        the log, and the next spawn works.
        """
        with pytest.raises(SpawnFailed) as caught:
            self.spawn(spawner, tmp_path, str(tmp_path / "missing"), ["/bin/true"])
        assert caught.value.errno == errno.ENOENT
        assert (tmp_path / "log").read_text() == ""
        handler = await self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"]).done
        assert await _reaped(handler.pid) == 0
        assert (tmp_path / "log").read_text() == f"start {handler.pid}\n"

    @pytest_twisted.ensureDeferred
    async def test_fifos_removed(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        If its FIFOs are removed, the spawn fails without anything run, the
        spawner says it is broken, and later spawns fail at once.
        """
        handler = await self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"]).done
        assert await _reaped(handler.pid) == 0
        await self.idle(spawner)
        assert spawner._dir is not None
        shutil.rmtree(spawner._dir)
        try:
            failed = self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"])
        except SpawnFailed:
            pass
        else:
            await failed.done
            [(what, error)] = failed.events
            assert what == "failed" and isinstance(error, SpawnFailed)
        assert spawner.broken
        with pytest.raises(SpawnFailed):
            self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"])
        assert (tmp_path / "log").read_text() == f"start {handler.pid}\n"

    @pytest_twisted.ensureDeferred
    async def test_stale_fifo_dirs_removed(self, tmp_path: Any, monkeypatch: Any) -> None:
        """
        The FIFO directories of dead processes are removed when a spawner
        makes its own; those of live processes stay.
        """
        if not DirectSpawner.available():
            pytest.skip("no direct spawner on this system")
        monkeypatch.setattr(spawn_module, "_SHM", str(tmp_path))
        dead = os.fork()
        if dead == 0:
            os._exit(0)
        os.waitpid(dead, 0)
        (tmp_path / f"rq-spawn-{dead}-abc").mkdir()
        (tmp_path / f"rq-spawn-{os.getpid()}-abc").mkdir()
        (tmp_path / "rq-spawn-junk").mkdir()
        spawner = DirectSpawner()
        try:
            handler = await self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"]).done
            assert await _reaped(handler.pid) == 0
            names = sorted(n for n in os.listdir(tmp_path) if n.startswith("rq-spawn-"))
            assert f"rq-spawn-{dead}-abc" not in names
            assert f"rq-spawn-{os.getpid()}-abc" in names and "rq-spawn-junk" in names
            assert len(names) == 3
        finally:
            spawner.close()

    @pytest_twisted.ensureDeferred
    async def test_exec_failure_reported(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        An exec that fails after the gate is reported to the handler, with
        the pid, after the start.
        """
        handler = self.spawn(spawner, tmp_path, str(tmp_path), [str(tmp_path / "nothing-here")])
        await handler.done
        pid, code = await handler.exec_failed.addTimeout(TIMEOUT, reactor)
        assert handler.events == [("started", pid), ("exec failed", pid, errno.ENOENT)]
        assert code == errno.ENOENT

    async def idle(self, spawner: DirectSpawner) -> None:
        """
        Wait until the spawn threads are done (and the gates given back).
        """
        for _ in range(1000):
            if spawner._idle_count == len(spawner._threads):
                return
            await deferLater(reactor, 0.005, lambda: None)
        raise AssertionError("the spawn threads stay busy")

    @pytest_twisted.ensureDeferred
    async def test_stale_copies_of_the_fifos(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        Copies of our ends of a gate's FIFOs left open (as a child holds
        ours until it closes its inherited fds) do not let the next child
        through the gate unchecked: C{out} is new by then.
        """
        handler = await self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"]).done
        assert await _reaped(handler.pid) == 0
        await self.idle(spawner)
        [gate] = spawner._gates
        # Readers of the FIFOs as they are now, as a stale copy would be.
        stale = [os.open(path, os.O_RDONLY | os.O_NONBLOCK) for path in (gate.fifo_in, gate.fifo_out)]
        real_find = spawner._find_child
        execd: list[bool] = []

        def find(request: Any) -> Any:
            pid = real_find(request)
            # Held at the gate, the child has not exec'd even a while later.
            threading.Event().wait(0.05)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                execd.append(f.read().startswith(b"/bin/sleep"))
            return pid

        spawner._find_child = find  # type: ignore[method-assign]
        try:
            for _ in range(3):
                handler = await self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/sleep", "0.2"]).done
                assert await _reaped(handler.pid) == 0
                await self.idle(spawner)
        finally:
            spawner._find_child = real_find  # type: ignore[method-assign]
            for fd in stale:
                os.close(fd)
        # The first child went through the FIFOs the copies are of.
        assert execd[1:] == [False] * 2

    @pytest_twisted.ensureDeferred
    async def test_child_gone_at_the_gate(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        A child that is not the newest child of its spawn thread any more
        when the gate opens (it died there) is not taken for another one:
        the spawn fails, and the earlier child keeps its pid.
        """
        first = await self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/sh", "-c", "sleep 30"]).done
        # The second child's gate is seen as if the child were gone: the
        # newest child listed is still the first one.
        real_find = spawner._find_child
        calls = []

        def find_with_first_newest(request: Any) -> Any:
            calls.append(request)
            thread = request.thread
            thread.given.add(first.pid)
            thread.list_children = lambda: b"%d " % first.pid
            try:
                return real_find(request)
            finally:
                del thread.list_children

        spawner._find_child = find_with_first_newest  # type: ignore[method-assign]
        try:
            second = await self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"]).done
        finally:
            spawner._find_child = real_find  # type: ignore[method-assign]
            os.kill(first.pid, signal.SIGKILL)
            await _reaped(first.pid)
        assert len(calls) == 1
        [(what, error)] = second.events
        assert what == "failed" and isinstance(error, SpawnFailed)
        # The abandoned child was killed and reaped by the spawn thread.
        assert (tmp_path / "log").read_text() == f"start {first.pid}\n"

    # -- held spawns (go / cancel)

    async def held(self, handler: _Handler) -> int:
        """
        Wait until the child of C{handler}'s held spawn is at the gate; its
        pid.
        """
        return await _gate_child(handler.request)

    @pytest_twisted.ensureDeferred
    async def test_hold_then_go(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        A held child stops at the gate: not exec'd (our command
        line), already in its directory, not reniced, no start line, the
        handler told nothing. L{DirectSpawner.go} sets it up then: reniced,
        start line with its pid, handler told, and the script runs.
        """
        job = tmp_path / "job"
        job.mkdir()
        script = "echo ran > ran; pwd -P; cat /proc/$$/stat"
        handler = self.spawn(spawner, tmp_path, str(job), ["/bin/sh", "-c", script], hold=True)
        request = handler.request
        assert request.state == "waiting"
        pid = await self.held(handler)
        assert _alive(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f, open("/proc/self/cmdline", "rb") as ours:
            assert f.read() == ours.read(), "exec'd at the gate"
        assert os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(job)
        fields = proc_stat(pid)
        assert int(fields[16]) == os.getpriority(os.PRIO_PROCESS, 0), "reniced before go"
        assert int(fields[3]) == pid, "its own session"
        # Some reactor turns later it still waits, and nothing was said.
        await deferLater(reactor, 0.02, lambda: None)
        assert request.state == "waiting" and request.pid is None
        assert handler.events == []
        assert (tmp_path / "log").read_text() == ""
        assert not (job / "ran").exists()
        for fd in handler.owned:
            os.fstat(fd)  # still ours until it goes
        spawner.go(request)
        assert handler.events == [("started", pid)]
        assert request.state == "started"
        assert (tmp_path / "log").read_text().startswith(f"start {pid}\n")
        assert await _reaped(pid) == 0
        start, where, stat_line = (tmp_path / "log").read_text().splitlines()
        assert (start, where) == (f"start {pid}", os.path.realpath(job))
        fields = stat_fields(stat_line)
        assert (int(fields[2]), int(fields[3]), int(fields[16])) == (pid, pid, 19)
        assert (job / "ran").read_text() == "ran\n"
        # Going again does nothing more.
        spawner.go(request)
        assert handler.events == [("started", pid)]
        assert (tmp_path / "log").read_text().count("start") == 1

    @pytest_twisted.ensureDeferred
    async def test_go_before_the_gate(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        A held spawn let go before its child reached the gate goes on like
        an ordinary one when it gets there.
        """
        handler = self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/sh", "-c", "echo out $$"], hold=True)
        request = handler.request
        # The reactor has not run: the gate's hang-up cannot have been seen.
        assert request.state == "waiting"
        spawner.go(request)
        assert handler.events == [] and request.state == "waiting"
        await handler.done
        pid = handler.pid
        assert handler.events == [("started", pid)]
        assert request.state == "started" and request.pid == pid
        assert await _reaped(pid) == 0
        assert (tmp_path / "log").read_text() == f"start {pid}\nout {pid}\n"

    async def gone(self, spawner: DirectSpawner, pid: int) -> None:
        """
        Wait until C{pid} is reaped (not even a zombie is left: its spawn
        thread waited for it) and the spawn threads are idle.
        """
        await _until(lambda: not _alive(pid), f"child {pid} being reaped")
        assert not os.path.exists(f"/proc/{pid}")
        await self.idle(spawner)

    @pytest_twisted.ensureDeferred
    async def test_cancel_held(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        A held child cancelled is killed at the gate and reaped by its
        spawn thread: nothing in the log, nothing of the script ran, the
        handler heard nothing, our fds are closed at once, and the next
        spawn works.
        """
        job = tmp_path / "job"
        job.mkdir()
        handler = self.spawn(spawner, tmp_path, str(job), ["/bin/sh", "-c", "echo ran > ran"], hold=True)
        request = handler.request
        pid = await self.held(handler)
        spawner.cancel(request)
        assert request.state == "cancelled"
        for fd in handler.owned:
            with pytest.raises(OSError):
                os.fstat(fd)
        await self.gone(spawner, pid)
        # Neither going nor cancelling again does anything now.
        spawner.go(request)
        spawner.cancel(request)
        assert request.state == "cancelled"
        assert handler.events == []
        assert (tmp_path / "log").read_text() == ""
        assert not (job / "ran").exists()
        assert pid not in spawner._given
        after = await self.spawn(spawner, tmp_path, str(job), ["/bin/sh", "-c", "echo next $$"]).done
        assert await _reaped(after.pid) == 0
        assert (tmp_path / "log").read_text() == f"start {after.pid}\nnext {after.pid}\n"
        assert handler.events == []

    @pytest_twisted.ensureDeferred
    async def test_cancel_before_the_gate(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        A spawn cancelled before its child reached the gate (held or not):
        the child is killed when it gets there, with the same outcome.
        """
        found: list[int] = []
        real_find = spawner._find_child

        def find(request: Any) -> Any:
            pid = real_find(request)
            found.append(pid)
            return pid

        spawner._find_child = find  # type: ignore[method-assign]
        job = tmp_path / "job"
        job.mkdir()
        try:
            for hold in (True, False):
                handler = self.spawn(spawner, tmp_path, str(job), ["/bin/sh", "-c", "echo ran > ran"], hold=hold)
                request = handler.request
                assert request.state == "waiting"
                spawner.cancel(request)
                await _until(lambda: request.state != "waiting", "the child reaching the gate")
                assert request.state == "cancelled"
                pid = found[-1]
                assert pid is not None
                await self.gone(spawner, pid)
                spawner.go(request)
                assert handler.events == []
                assert (tmp_path / "log").read_text() == ""
                assert not (job / "ran").exists()
            assert len(found) == 2
        finally:
            spawner._find_child = real_find  # type: ignore[method-assign]
        after = await self.spawn(spawner, tmp_path, str(job), ["/bin/true"]).done
        assert await _reaped(after.pid) == 0
        assert (tmp_path / "log").read_text() == f"start {after.pid}\n"

    @pytest_twisted.ensureDeferred
    async def test_cancelled_child_not_found_runs_nothing(
        self, spawner: DirectSpawner, tmp_path: Any, monkeypatch: Any
    ) -> None:
        """
        A cancelled spawn whose child cannot be told at the gate runs
        nothing of its script, however late its spawn thread gets to kill
        it after the gate opened (here: never, it is only reaped).
        """
        killed: list[int] = []
        monkeypatch.setattr(spawner, "_find_child", lambda request: None)
        monkeypatch.setattr(spawn_module.os, "killpg", lambda pid, sig: killed.append(pid))
        job = tmp_path / "job"
        job.mkdir()
        handler = self.spawn(spawner, tmp_path, str(job), ["/bin/sh", "-c", "echo ran > ran"], hold=True)
        spawner.cancel(handler.request)
        await _until(lambda: handler.request.state != "waiting", "the child reaching the gate")
        await self.idle(spawner)
        monkeypatch.undo()
        assert handler.events == []
        assert (tmp_path / "log").read_text() == ""
        assert not (job / "ran").exists()

    @pytest_twisted.ensureDeferred
    async def test_directory_renamed_while_held(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        The child entered its directory before the gate: renamed while the
        child is held (que to run), it is the child's cwd where it is now.
        """
        que = tmp_path / "que" / "m1" / "job"
        que.mkdir(parents=True)
        (tmp_path / "run").mkdir()
        handler = self.spawn(spawner, tmp_path, str(que), ["/bin/sh", "-c", "pwd -P; echo ran > ran"], hold=True)
        pid = await self.held(handler)
        os.rename(tmp_path / "que" / "m1", tmp_path / "run" / "m1")
        moved = os.path.realpath(tmp_path / "run" / "m1" / "job")
        assert os.readlink(f"/proc/{pid}/cwd") == moved
        spawner.go(handler.request)
        assert handler.events == [("started", pid)]
        assert await _reaped(pid) == 0
        assert (tmp_path / "log").read_text() == f"start {pid}\n{moved}\n"
        assert (tmp_path / "run" / "m1" / "job" / "ran").exists()

    @pytest_twisted.ensureDeferred
    async def test_go_and_cancel_after_the_start(self, spawner: DirectSpawner, tmp_path: Any) -> None:
        """
        Once started, a spawn is not touched by L{DirectSpawner.go} (no
        second start line) nor by L{DirectSpawner.cancel} (not killed).
        """
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            handler = self.spawn(
                spawner, tmp_path, str(tmp_path), ["/bin/sh", "-c", "read x; echo got $x"], stdin=read_end
            )
            await handler.done
        finally:
            os.close(read_end)
        request = handler.request
        spawner.cancel(request)
        spawner.go(request)
        assert request.state == "started"
        os.write(write_end, b"hi\n")
        os.close(write_end)
        assert await _reaped(handler.pid) == 0
        assert handler.events == [("started", handler.pid)]
        assert (tmp_path / "log").read_text() == f"start {handler.pid}\ngot hi\n"

    @pytest_twisted.ensureDeferred
    async def test_held_children_leave_a_thread_for_other_spawns(
        self, spawner: DirectSpawner, tmp_path: Any, monkeypatch: Any
    ) -> None:
        """
        Children held at their gates (one per busy queue, for as long as its
        slots stay busy) never take every spawn thread: past L{MAX_HELD} a
        held spawn is refused (L{SpawnBusy}), and an ordinary spawn starts.
        """
        monkeypatch.setattr(spawn_module, "MAX_THREADS", 2)
        monkeypatch.setattr(spawn_module, "MAX_HELD", 1)
        held = [self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"], hold=True)]
        with pytest.raises(SpawnBusy):
            self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"], hold=True)
        assert spawner.holding == 1
        pids = [await self.held(handler) for handler in held]
        other = self.spawn(spawner, tmp_path, str(tmp_path), ["/bin/true"])
        try:
            await _until(lambda: other.events != [], "the ordinary spawn starting", turns=100)
            assert other.events == [("started", other.pid)]
            assert await _reaped(other.pid) == 0
        finally:
            for handler in held:
                spawner.cancel(handler.request)
            for pid in pids:
                await _until(lambda: not _alive(pid), f"child {pid} being reaped")
            if not other.events:
                await other.done
                await _reaped(other.pid)


# -- the watchdog


def write_pid(root: Any, queue: str, msg_id: str, pid: int, newline: bool = True) -> None:
    run = root / "queue" / queue / "run" / msg_id
    run.mkdir(parents=True, exist_ok=True)
    (run / "pid").write_text(f"{pid}\n" if newline else str(pid))


async def running_worker(root: Any, name: str, body: str) -> tuple[Worker, Recorder]:
    """
    Spawn a worker under C{root} that reports C{run} once its script runs;
    list it in a C{run/<name>/pid} file.
    """
    events = Recorder()
    started = events.report("run")
    worker, _, _ = real_spawn(root, body, events, job=f"queue/q/run/{name}/job")
    await started
    write_pid(root, "q", name, worker.pid, newline=name.endswith("1"))
    return worker, events


class _Watched(ProcessProtocol):
    """
    A process whose stdout lines and end are Deferreds.
    """

    def __init__(self) -> None:
        self.line: Deferred[bytes] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        if b"\n" in self._buffer and not self.line.called:
            self.line.callback(self._buffer.split(b"\n")[0])

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_watchdog_kills_groups_at_eof(tmp_path: Any) -> None:
    """
    When its pipe closes without C{stop}, the watchdog SIGTERMs every
    listed process group, and SIGKILLs those still there after the grace.
    """
    soft, soft_events = await running_worker(tmp_path, "m1", 'sleep 60 &\necho "run up" >&3\nwait\n')
    hard, hard_events = await running_worker(
        tmp_path,
        "m2",
        "trap '' TERM\necho \"run up\" >&3\nwhile :; do sleep 60; done\n",
    )
    write_pid(tmp_path, "q", "m3", 999999999)  # no such group
    (tmp_path / "queue" / "q" / "run" / "m4").mkdir()
    (tmp_path / "queue" / "q" / "run" / "m4" / "pid").write_text("junk\n")
    watchdog = Watchdog(reactor, str(tmp_path), grace=1)
    watchdog.start()
    try:
        assert watchdog.pid is not None
        fields = proc_stat(watchdog.pid)
        assert int(fields[3]) == watchdog.pid, "own session"
        # Ignored (what is sent to the daemon must not stop the watchdog).
        first = watchdog.pid
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(watchdog.pid, sig)
        # The daemon "dies": its end of the pipe closes, no "stop".
        watchdog._process.closeStdin()
        await soft_events.wait_exit()
        assert soft_events.exit == (None, signal.SIGTERM)
        await hard_events.wait_exit()
        assert hard_events.exit == (None, signal.SIGKILL)
        assert watchdog.pid in (first, None)
    finally:
        soft.signal(signal.SIGKILL)
        hard.signal(signal.SIGKILL)
        await watchdog.stop().addTimeout(TIMEOUT, reactor)



@pytest_twisted.ensureDeferred
async def test_watchdog_holds_the_root_lock(tmp_path: Any, monkeypatch: Any) -> None:
    """
    Given the root's lock, the watchdog holds it with the daemon: when the
    daemon dies, no other daemon can take the root until the watchdog has
    killed the workers and ended.
    """
    monkeypatch.setattr(rootlock, "_held", {})
    (tmp_path / "config").mkdir()
    root = Root(str(tmp_path))
    hard, hard_events = await running_worker(
        tmp_path, "m1", "trap '' TERM\necho \"run up\" >&3\nwhile :; do sleep 60; done\n"
    )
    lock = lock_root(root)
    watchdog = Watchdog(reactor, str(tmp_path), grace=1, lock_fd=lock)
    watchdog.start()
    try:
        pid = watchdog.pid
        assert pid is not None
        assert os.readlink(f"/proc/{pid}/fd/3") == root.join(LOCK_DIR)
        # The daemon dies: its lock and its end of the pipe close.
        os.close(lock)
        rootlock._held.clear()
        watchdog._stopping = True
        watchdog._process.closeStdin()
        with pytest.raises(RootLocked):
            lock_root(root)
        await hard_events.wait_exit()
        assert hard_events.exit == (None, signal.SIGKILL)
        for _ in range(1000):
            if watchdog.pid is None:
                break
            await deferLater(reactor, 0.005, lambda: None)
        assert watchdog.pid is None
        os.close(lock_root(root))
    finally:
        hard.signal(signal.SIGKILL)


def test_kill_leftover(tmp_path: Any) -> None:
    """
    A worker left running in its job directory is killed with its group;
    a process elsewhere (a pid used again) and a pid that is gone are left
    alone.
    """
    job = tmp_path / "run" / "m1" / "job"
    job.mkdir(parents=True)
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    left = subprocess.Popen(["sleep", "30"], cwd=job, start_new_session=True)
    other = subprocess.Popen(["sleep", "30"], cwd=elsewhere, start_new_session=True)
    try:
        assert not kill_leftover(other.pid, str(job))
        assert kill_leftover(left.pid, str(job))
        assert left.wait(10) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    assert not kill_leftover(left.pid, str(job))

@pytest_twisted.ensureDeferred
async def test_watchdog_stop_kills_nothing(tmp_path: Any) -> None:
    """
    L{Watchdog.stop} ends the watchdog; the workers keep running.
    """
    worker, events = await running_worker(
        tmp_path, "m1", 'echo "run up" >&3\nread x <&4\necho "done $x" >&3\n'
    )
    watchdog = Watchdog(reactor, str(tmp_path), grace=1)
    watchdog.start()
    try:
        await watchdog.stop().addTimeout(TIMEOUT, reactor)
        assert watchdog.pid is None
        # Still alive after the watchdog is gone: it answers.
        worker.reply("pong")
        await events.wait_exit()
        assert events.events[-2:] == [("report", Report("done", "pong")), ("exit", 0, None)]
    finally:
        worker.signal(signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_watchdog_restarted(tmp_path: Any, monkeypatch: Any) -> None:
    """
    A watchdog that dies while the daemon lives is started again.
    """
    watchdog = Watchdog(reactor, str(tmp_path))
    watchdog.restartDelay = 0
    respawned: Deferred[None] = Deferred()
    original = watchdog._respawn

    def respawn() -> None:
        original()
        respawned.callback(None)

    monkeypatch.setattr(watchdog, "_respawn", respawn)
    watchdog.start()
    first = watchdog.pid
    assert first is not None
    try:
        os.kill(first, signal.SIGKILL)
        await respawned.addTimeout(TIMEOUT, reactor)
        assert watchdog.pid not in (None, first)
    finally:
        await watchdog.stop().addTimeout(TIMEOUT, reactor)
    assert watchdog.pid is None


class _Output(ProcessProtocol):
    """
    Collect a process's stdout; C{ended} fires with it.
    """

    def __init__(self) -> None:
        self.data = b""
        self.ended: Deferred[bytes] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.data += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(self.data)


@pytest.mark.parametrize("fork", [False, True])
@pytest_twisted.ensureDeferred
async def test_session_process_signals(monkeypatch: Any, fork: bool) -> None:
    """
    A L{_SessionProcess} leads its own session; the signals it is given are
    blocked (posix_spawn) or ignored (fork path) when it starts.
    """
    if fork:
        monkeypatch.setattr(reactor, "_neverUseSpawn", True, raising=False)
    out = _Output()
    process = _SessionProcess(
        reactor,
        "/bin/sh",
        ["/bin/sh", "-c", "exec cat /proc/self/status /proc/self/stat"],
        dict(os.environ),
        out,
        {0: "w", 1: "r", 2: 2},
        blockedSignals=frozenset({signal.SIGTERM, signal.SIGHUP}),
    )
    monkeypatch.undo()
    data = (await out.ended.addTimeout(TIMEOUT, reactor)).decode()
    *lines, stat_line = data.strip().split("\n")
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    # exec keeps the mask and the ignored signals.
    mask = int(status["SigIgn" if fork else "SigBlk"], 16)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        assert mask & (1 << (sig - 1))
    assert not mask & (1 << (signal.SIGINT - 1))
    fields = stat_fields(stat_line)
    assert int(fields[3]) == process.spawnedPid


def ends_within_timeout(pidfd: int) -> Deferred[bool]:
    """
    Whether the process of C{pidfd} ends within L{TIMEOUT} seconds (waited
    for off the reactor).
    """
    from twisted.internet.threads import deferToThread

    def wait() -> bool:
        try:
            return bool(select.select([pidfd], [], [], TIMEOUT)[0])
        finally:
            os.close(pidfd)

    return deferToThread(wait)


#: Polls of L{_until} for what a loaded machine may take seconds to do:
#: at least L{TIMEOUT} seconds.
SLOW_TURNS = TIMEOUT * 200


def _cwd(pid: int) -> str | None:
    """
    The working directory of process C{pid}, if it can be told.
    """
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _reading_stdin(pid: int) -> bool:
    """
    Whether process C{pid}, a shell, waits in its C{read} builtin on its
    standard input: blocked in a call on fd 0 for one byte (C{read} takes a
    pipe a byte at a time), as C{/proc/<pid>/syscall} shows (C{<number>
    <arguments...>}, or C{running}), whatever the number of C{read} on this
    machine.
    """
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 3 and fields[1] == "0x0" and fields[3] == "0x1"


DAEMON = """
import os, sys, time
os.setsid()
# A child left at a spawn gate: not exec'd, in its own session, already in
# a job directory (of run/, or of que/ when made ready ahead), no pid file.
job = os.path.join(sys.argv[1], "queue", "q", sys.argv[2], "m9", "job")
os.makedirs(job)
gated = os.fork()
if gated == 0:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.chdir(job)
    time.sleep(60)
    os._exit(0)
from twisted.internet import reactor
from rqtwisted.worker import Watchdog
watchdog = Watchdog(reactor, sys.argv[1], grace=1)
def go():
    watchdog.start()
    os.write(1, b"%d %d\\n" % (watchdog.pid, gated))
reactor.callWhenRunning(go)
reactor.run()
"""


@pytest.mark.parametrize(
    "how, gate_in",
    [("SIGTERM to the daemon's group", "run"), ("SIGKILL to the daemon", "run"), ("SIGKILL to the daemon", "que")],
)
@pytest_twisted.ensureDeferred
async def test_watchdog_daemon_death(tmp_path: Any, how: str, gate_in: str) -> None:
    """
    A real daemon process dies (its whole process group SIGTERMed, or
    itself SIGKILLed): its watchdog survives it and kills the workers, and
    the child it left at a spawn gate (in a job directory of C{run/}, or
    of C{que/} for a worker made ready ahead).
    """
    worker, events = await running_worker(tmp_path, "m1", 'echo "run up" >&3\nsleep 60\n')
    daemon = _Watched()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT, env.get("PYTHONPATH")]))
    process = reactor.spawnProcess(
        daemon, sys.executable, [sys.executable, "-c", DAEMON, str(tmp_path), gate_in], env
    )
    try:
        watchdog_pid, gated = (int(x) for x in (await daemon.line.addTimeout(TIMEOUT, reactor)).split())
        gated_fd = os.pidfd_open(gated)
        # The daemon dies only once its watchdog has noted its command line
        # and waits for the end of its pipe (a real daemon's watchdog starts
        # long before the daemon could die), and once the child it left at
        # the gate is in its job directory. Both can take seconds on a
        # loaded machine: they are waited for, not assumed.
        job = os.path.realpath(os.path.join(tmp_path, "queue", "q", gate_in, "m9", "job"))
        await _until(lambda: _cwd(gated) == job, "the gated child in its job directory", turns=SLOW_TURNS)
        await _until(lambda: _reading_stdin(watchdog_pid), "the watchdog reading its pipe", turns=SLOW_TURNS)
        fields = proc_stat(watchdog_pid)
        assert int(fields[2]) != process.pid and int(fields[3]) != process.pid
        if how.startswith("SIGTERM"):
            os.killpg(process.pid, signal.SIGTERM)
        else:
            os.kill(process.pid, signal.SIGKILL)
        await daemon.ended.addTimeout(TIMEOUT, reactor)
        await events.wait_exit()
        assert events.exit == (None, signal.SIGTERM)
        # The gated child is gone (a zombie until init reaps it).
        ready = await ends_within_timeout(gated_fd)
        assert ready, "the child left at the gate outlived the daemon"
    finally:
        worker.signal(signal.SIGKILL)
        try:
            os.kill(gated, signal.SIGKILL)
        except (OSError, UnboundLocalError):
            pass
        if process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_real_fallback_after_gate_failure(tmp_path: Any, monkeypatch: Any) -> None:
    """
    A direct spawn that fails at its gate (after spawn_worker returned)
    falls back to the launcher: the worker runs once, its pid is given
    before its reports, its exit is reported.
    """
    spawner = direct_only()
    monkeypatch.setattr(spawner, "_find_child", lambda request: None)
    events = Recorder()
    worker, script, job = real_spawn(tmp_path, "echo 'done fine' >&3\n", events)
    assert worker.pid is None
    await events.wait_exit()
    assert events.events == [("report", Report("done", "fine")), ("exit", 0, None)]
    assert events.pids == [worker.pid]
    with open(os.path.join(job, "stdio.log")) as f:
        assert f.read().count("RQ START") == 1


def test_environment_encoded_once() -> None:
    """
    The spawner's C{envp} of a worker environment holds the same strings as
    the environment itself (the daemon's part encoded once and reused, the
    names set on top of it, RQ_* and env_vars, taken from the worker's).
    """
    base = {"PATH": "/bin", "RQ_ENV": "stale", "HOME": "/root", "RUBYOPT": "-w", "KEEP": "é"}

    def env_for(msg_id: str, env_vars: Any) -> Any:
        return environment(base_env=base, rq_env="prod", msg={"msg_id": msg_id, "dest": "q"}, env_vars=env_vars)

    for msg_id, env_vars in (("a", {"HOME": "/home/x"}), ("b", {"HOME": "/home/x"}), ("c", None)):
        env = env_for(msg_id, env_vars)
        envp = spawn_module._environ(env)
        assert sorted(envp) == sorted(f"{k}={v}".encode() for k, v in env.items())
        assert len(envp) == len(env)
        assert b"RQ_ENV=prod" in envp and b"RQ_ENV=stale" not in envp and b"RUBYOPT=-w" not in envp
        assert (b"HOME=/home/x" in envp) == (env_vars is not None)
        assert f"RQ_MSG_ID={msg_id}".encode() in envp


def test_exit_127_held_while_the_failed_exec_is_on_its_way() -> None:
    """
    A child reaped with status 127 after its spawn returned a failed exec
    that the reactor has not heard yet: the status is held, so that the
    failure (with its reason in C{stdio.log}) is reported first, and the
    exit only once. A spawn that returned without failing holds nothing.
    """
    spawner = DirectSpawner.__new__(DirectSpawner)

    class Request:
        lock = threading.Lock()
        returned = True
        spawn_failed = True
        early_status: int | None = None

    request = Request()
    assert spawner.early_exit(request, 127 << 8)
    assert request.early_status == 127 << 8
    request.spawn_failed = False
    request.early_status = None
    assert not spawner.early_exit(request, 127 << 8)
    assert request.early_status is None


def test_stale_fifo_directories_of_dead_and_zombie_daemons_go(tmp_path: Any) -> None:
    """
    The FIFO directory of a daemon that died, or that is a zombie not yet
    reaped (killed, its parent not done with it), is removed; a live
    daemon's is kept.
    """
    zombie = subprocess.Popen(["true"])
    try:
        spawn_module.os.waitid(spawn_module.os.P_PID, zombie.pid, spawn_module.os.WEXITED | spawn_module.os.WNOWAIT)
        live = os.getpid()
        dead = 2**22 + 1  # above the kernel's pid_max: never a process
        for pid in (zombie.pid, live, dead):
            os.makedirs(tmp_path / f"{spawn_module._DIR_PREFIX}{pid}-abc")
        spawn_module._remove_stale(str(tmp_path))
        assert os.listdir(tmp_path) == [f"{spawn_module._DIR_PREFIX}{live}-abc"]
    finally:
        zombie.wait()
