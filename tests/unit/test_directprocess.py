"""
Tests for L{rqtwisted.directprocess}: the process transport of directly
spawned workers, against real pipes and a fake reactor.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from twisted.internet.task import Clock

from rqtwisted import directprocess
from rqtwisted.directprocess import REPLY_FD, STATUS_FD, DirectProcess


class FakeReactor(Clock):
    """
    A clock that records the readers and writers it is asked to watch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


class Owner:
    """
    A protocol recording what the process tells it.
    """

    def __init__(self) -> None:
        self.transport: Any = None
        self.data: list[bytes] = []
        self.pids: list[int] = []
        self.exits: list[tuple[int | None, int | None]] = []

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def started(self, pid: int) -> None:
        self.pids.append(pid)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        assert childFD == STATUS_FD
        self.data.append(data)

    def exitReceived(self, exit_code: int | None, signal: int | None) -> None:
        self.exits.append((exit_code, signal))


class FakeSpawner:
    """
    Keeps the child's ends of the pipes, as a child would, and lets the test
    start the process.
    """

    def __init__(self) -> None:
        self.fdmap: dict[int, int] = {}
        self.handler: Any = None

    def spawn(self, reactor: Any, executable: str, args: Any, env: Any, fdmap: dict[int, int], cwd: str,
              log_fd: int, line: Any, niceness: int, handler: Any, owned: list[int], hold: bool = False) -> Any:
        # The child's copies of its fds; ours are closed as the spawner would.
        self.fdmap = {child: os.dup(fd) for child, fd in fdmap.items()}
        for fd in owned:
            os.close(fd)
        self.handler = handler
        self.hold = hold
        self.requests = [*getattr(self, "requests", []), ("spawn", hold)]
        return len(self.requests)

    def go(self, request: Any) -> None:
        self.requests = [*self.requests, ("go", request)]

    def cancel(self, request: Any) -> None:
        self.requests = [*self.requests, ("cancel", request)]

    def early_exit(self, request: Any, status: int) -> bool:
        return False

    forgotten: list[int]

    def forget(self, pid: int) -> None:
        self.forgotten = [*getattr(self, "forgotten", []), pid]

    def close(self) -> None:
        for fd in self.fdmap.values():
            os.close(fd)
        self.fdmap = {}


def start_process(hold: bool = False) -> tuple[FakeReactor, Owner, FakeSpawner, DirectProcess]:
    """
    A L{DirectProcess} of C{/bin/true} started on a L{FakeSpawner}; the
    fallback's failures in its C{failures}.
    """
    reactor = FakeReactor()
    owner = Owner()
    spawner = FakeSpawner()
    failures: list[Any] = []
    process = DirectProcess(reactor, owner, failures.append, lambda p, code: None)
    log = os.open(os.devnull, os.O_WRONLY)
    stdin = os.open(os.devnull, os.O_RDONLY)
    process.start(spawner, "/bin/true", ["/bin/true"], {}, "/", stdin, log, lambda pid: b"", 19, hold=hold)
    os.close(stdin)
    process.failures = failures  # type: ignore[attr-defined]
    return reactor, owner, spawner, process


@pytest.fixture
def started() -> Any:
    reactor, owner, spawner, process = start_process()
    # A pid of ours nobody reaps: never registered with the reaper here.
    process.reapProcess = lambda: None  # type: ignore[method-assign]
    yield reactor, owner, spawner, process
    spawner.close()


def test_started_reads_status(started: Any, monkeypatch: Any) -> None:
    """
    Once started, the status pipe is read through the reactor; what the
    child writes reaches the protocol.
    """
    reactor, owner, spawner, process = started
    monkeypatch.setattr(directprocess, "_register_reaper", lambda pid, p: None)
    status = process.pipes[STATUS_FD]
    assert status not in reactor.readers
    process.spawnStarted(4242)
    assert owner.pids == [4242] and process.pid == 4242
    assert status in reactor.readers
    os.write(spawner.fdmap[STATUS_FD], b"done ok\n")
    assert status.doRead() is None
    assert owner.data == [b"done ok\n"]


def test_registered_pipe_closed_at_next_turn(started: Any, monkeypatch: Any) -> None:
    """
    Closing the watched status pipe stops watching it at once but closes
    its fd only at the reactor's next turn, so that its number cannot be
    given to a new file within the same batch of events.
    """
    reactor, owner, spawner, process = started
    monkeypatch.setattr(directprocess, "_register_reaper", lambda pid, p: None)
    process.spawnStarted(4242)
    status = process.pipes[STATUS_FD]
    fd = status.fileno()
    process.closeChildFD(STATUS_FD)
    assert status not in reactor.readers
    assert STATUS_FD not in process.pipes
    os.fstat(fd)  # still open
    reactor.advance(0)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_reply_buffered_when_full(started: Any) -> None:
    """
    A reply that does not fit in the pipe is buffered and written when the
    reactor says the pipe has room; then the pipe is not watched any more.
    """
    reactor, owner, spawner, process = started
    reply = process.pipes[REPLY_FD]
    big = b"x" * (1 << 20)
    process.writeToChild(REPLY_FD, big)
    assert reply in reactor.writers
    child = spawner.fdmap[REPLY_FD]
    got = b""
    while reply in reactor.writers:
        got += os.read(child, 1 << 20)
        assert reply.doWrite() is None
    os.set_blocking(child, False)
    try:
        while True:
            chunk = os.read(child, 1 << 20)
            if not chunk:
                break
            got += chunk
    except BlockingIOError:
        pass
    assert got == big


def test_reply_to_closed_pipe(started: Any) -> None:
    """
    A child that closed its end of the reply pipe makes the pipe vanish;
    later replies raise L{KeyError}, as with Twisted's transports.
    """
    reactor, owner, spawner, process = started
    os.close(spawner.fdmap.pop(REPLY_FD))
    process.writeToChild(REPLY_FD, b"ok 1\n")
    assert REPLY_FD not in process.pipes
    with pytest.raises(KeyError):
        process.writeToChild(REPLY_FD, b"ok 2\n")
    with pytest.raises(KeyError):
        process.writeToChild(STATUS_FD, b"no\n")


@pytest.mark.parametrize(
    "status, expected",
    [(0, (0, None)), (3 << 8, (3, None)), (signal.SIGTERM, (None, signal.SIGTERM))],
)
def test_exit_decoded_once(started: Any, status: int, expected: tuple[int | None, int | None]) -> None:
    """
    A wait status becomes an exit code or a signal, reported once.
    """
    reactor, owner, spawner, process = started
    process.pid = 4242
    process.processEnded(status)
    process.processEnded(0)
    assert owner.exits == [expected]
    # The spawner may give the pid to a new child now.
    assert spawner.forgotten == [4242]


@pytest.mark.parametrize("spawn_returned, status", [(False, 127 << 8), (True, 127 << 8), (False, 3 << 8)])
def test_exit_127_before_the_spawn_returned_waits(
    started: Any, monkeypatch: Any, spawn_returned: bool, status: int
) -> None:
    """
    An exit status 127 reaped while the spawn has not returned may be a
    failed exec (which the spawn then reports, with its reason): the exit
    is held back, and reported by C{exitedEarly} when the exec had worked.
    Any other exit, or one after the spawn returned, is reported at once.
    """
    reactor, owner, spawner, process = started
    asked = []

    def early_exit(request: Any, st: int) -> bool:
        asked.append((request, st))
        return not spawn_returned

    spawner.early_exit = early_exit
    process.pid = 4343
    monkeypatch.setattr(directprocess.os, "waitpid", lambda pid, flags: (pid, status))
    monkeypatch.setattr(directprocess._twprocess, "unregisterReapProcessHandler", lambda pid, p: None)
    del process.reapProcess  # the fixture's stand-in
    request = process._request
    process.reapProcess()
    if status >> 8 != 127:
        assert asked == [] and owner.exits == [(3, None)]
        return
    assert asked == [(request, status)]
    if spawn_returned:
        assert owner.exits == [(127, None)]
        return
    assert owner.exits == []
    process.exitedEarly(status)
    assert owner.exits == [(127, None)]


def test_spawn_failed_falls_back(started: Any) -> None:
    """
    A spawn that failed before anything ran closes our pipe ends and asks
    for the fallback.
    """
    reactor, owner, spawner, process = started
    fds = [p.fileno() for p in process.pipes.values()]
    error = directprocess.SpawnFailed(2, "gone")
    process.spawnFailed(error)
    assert process.failures == [error]
    assert process.pipes == {}
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_start_passes_hold(started: Any) -> None:
    """
    An ordinary start asks the spawner for no hold; the spawn's ticket is
    kept for L{DirectProcess.go} and L{DirectProcess.cancel}.
    """
    reactor, owner, spawner, process = started
    assert spawner.requests == [("spawn", False)]
    assert process._request == 1


@pytest.fixture
def held() -> Any:
    """
    A L{DirectProcess} started with C{hold}, its spawner a L{FakeSpawner}.
    """
    reactor, owner, spawner, process = start_process(hold=True)
    yield reactor, owner, spawner, process
    spawner.close()


def test_go_forwards_the_ticket(held: Any) -> None:
    """
    L{DirectProcess.go} lets the spawner go on with this spawn's ticket;
    nothing is reported until the spawner says the child started.
    """
    reactor, owner, spawner, process = held
    assert spawner.requests == [("spawn", True)]
    process.go()
    assert spawner.requests == [("spawn", True), ("go", 1)]
    assert owner.pids == [] and owner.exits == [] and owner.data == []
    assert not process.ended
    assert set(process.pipes) == {STATUS_FD, REPLY_FD}


def test_cancel_closes_and_reports_nothing(held: Any) -> None:
    """
    L{DirectProcess.cancel} cancels the spawn with its ticket, closes both
    our pipe ends, marks the process ended; the protocol hears nothing,
    not even of a later exit.
    """
    reactor, owner, spawner, process = held
    fds = [pipe.fileno() for pipe in process.pipes.values()]
    assert len(fds) == 2
    process.cancel()
    assert spawner.requests == [("spawn", True), ("cancel", 1)]
    assert process.ended
    assert process.pipes == {}
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    reactor.advance(0)
    assert reactor.readers == set() and reactor.writers == set()
    process.pid = 4242
    process.processEnded(9)
    process.execFailed(4242, 2)
    assert owner.pids == [] and owner.exits == [] and owner.data == []
    assert process.failures == []
    # The child's end of the status pipe sees ours closed.
    with pytest.raises(BrokenPipeError):
        os.write(spawner.fdmap[STATUS_FD], b"done late\n")


def test_go_and_cancel_before_start() -> None:
    """
    A process never started has no spawn to go on with or to cancel.
    """
    owner = Owner()
    process = DirectProcess(FakeReactor(), owner, lambda error: None, lambda p, code: None)
    process.go()
    process.cancel()
    assert process.ended and process.pipes == {}
    assert owner.transport is None


def test_exit_127_before_the_reaper_is_registered_waits_for_the_reason(started: Any) -> None:
    """
    A child whose exec failed while the reactor was still setting it up
    has exited (status 127) before its reaper is registered: that exit is
    held back like any other early 127 (see
    L{test_exit_127_before_the_spawn_returned_waits}) until the spawn says
    why, instead of being reported at once without the reason.
    """
    reactor, owner, spawner, process = started
    del process.reapProcess  # the fixture's stand-in: this test reaps for real
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 127"], {})
    # Exited, not reaped yet.
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    asked = []

    def early_exit(request: Any, status: int) -> bool:
        asked.append(status)
        return True

    spawner.early_exit = early_exit
    reasons: list[int] = []
    process._execFailed = lambda p, code: reasons.append(code)
    try:
        process.spawnStarted(pid)
        assert asked == [127 << 8]
        assert owner.exits == []
        process.execFailed(pid, 2)
    finally:
        directprocess._twprocess.reapProcessHandlers.pop(pid, None)
    assert reasons == [2]
    assert owner.exits == [(127, None)]
    assert pid not in directprocess._twprocess.reapProcessHandlers


def test_a_live_child_is_left_to_the_reaper(started: Any) -> None:
    """
    A child still running when it starts is registered for Twisted's
    C{SIGCHLD} handling, and nothing is reported yet.
    """
    reactor, owner, spawner, process = started
    del process.reapProcess
    pid = os.posix_spawn("/bin/sleep", ["sleep", "30"], {})
    try:
        process.spawnStarted(pid)
        assert directprocess._twprocess.reapProcessHandlers.get(pid) is process
        assert owner.exits == []
    finally:
        directprocess._twprocess.reapProcessHandlers.pop(pid, None)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
