"""
The process transport of a worker started by L{rqtwisted.spawn.DirectSpawner}.

A worker needs less than Twisted's general process transport does: one pipe
read through the reactor (the status pipe, the child's fd 3), one pipe
written without it (the reply pipe, the child's fd 4: a reply line fits in
the pipe unless the script never reads, and only then is the reactor asked to
wait until it can be written), and its exit, reaped through Twisted's reap
handlers (so on the reactor's own C{SIGCHLD} handling). L{DirectProcess}
does just that, with a few system calls per worker, and talks to a
L{WorkerProtocol<rqtwisted.worker.WorkerProtocol>}-like protocol:
C{makeConnection}, C{started(pid)}, C{childDataReceived(3, data)} and
C{exitReceived(code, signal)}. It is started through a
L{DirectSpawner<rqtwisted.spawn.DirectSpawner>}, which gives it its pid
once the child passed the spawner's gate. It offers that protocol what it uses of a Twisted process
transport: C{pipes} (by child fd, each with C{fileno()}), C{closeChildFD}
and C{writeToChild}.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, Callable, Protocol

from twisted.internet import process as _twprocess
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.spawn import DirectSpawner, SpawnFailed, close_all

_log = Logger()

#: The child fds of the two pipes.
STATUS_FD = 3
REPLY_FD = 4

#: Bytes read from the status pipe per C{read}.
_READ_SIZE = 65536

_DONE = ConnectionDone()
_LOST = ConnectionLost()


class ProcessOwner(Protocol):
    """
    What L{DirectProcess} drives: a process protocol that takes its exit as
    a code or a signal.
    """

    def makeConnection(self, transport: Any) -> None:
        """
        The process started; C{transport} is the L{DirectProcess}.
        """

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """
        The child wrote C{data} on C{childFD} (always the status fd).
        """

    def started(self, pid: int) -> None:
        """
        The child started with pid C{pid}.
        """

    def exitReceived(self, exit_code: int | None, signal: int | None) -> None:
        """
        The child exited with C{exit_code} or was killed by C{signal}.
        """


#: reactor -> fds to close at its next turn (see L{close_soon}).
_closing: dict[Any, list[int]] = {}


def close_soon(reactor: Any, fd: int) -> None:
    """
    Close C{fd}, which the reactor watched until now, at the reactor's next
    turn rather than at once.

    The reactor may be dispatching a batch of readiness events that holds
    one more for C{fd}; closed at once, C{fd}'s number could be given to a
    new file watched later in the same batch (a connection accepted, a pipe
    made), which would then get that stale event (a hang-up taken for its
    own).
    """
    pending = _closing.get(reactor)
    if pending is None:
        pending = _closing[reactor] = []
        reactor.callLater(0, _close_pending, reactor)
    pending.append(fd)


def _close_pending(reactor: Any) -> None:
    close_all(_closing.pop(reactor, []))


def _nonblocking(fd: int) -> None:
    # A fresh pipe end has no other status flag: one fcntl instead of two.
    fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)


class _Pipe:
    """
    Our end of one of a worker's pipes, as the reactor sees it.
    """

    def __init__(self, process: "DirectProcess", fd: int) -> None:
        self._process = process
        self.fd = fd

    def fileno(self) -> int:
        """
        The pipe's fd (-1 once closed).
        """
        return self.fd

    def logPrefix(self) -> str:
        """
        The log prefix the reactor uses for this pipe.
        """
        return "rq-worker"

    def close(self) -> None:
        """
        Stop the reactor watching the pipe and close the fd (at the
        reactor's next turn if it was watched, see L{close_soon}).
        """
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        if self._unwatch():
            close_soon(self._process.reactor, fd)
        else:
            os.close(fd)

    def _unwatch(self) -> bool:
        """
        Stop the reactor watching the pipe; whether it did.
        """
        return False


class _StatusPipe(_Pipe):
    """
    Our end of the status pipe, read by the reactor.
    """

    #: The fd is non-blocking already.
    nonblocking = True

    def __init__(self, process: "DirectProcess", fd: int) -> None:
        super().__init__(process, fd)
        #: Whether the reactor reads it (from the worker's start).
        self.registered = False

    def doRead(self) -> Exception | None:
        """
        Hand what the child wrote to the protocol; at end of file, let the
        reactor drop the pipe.
        """
        try:
            data = os.read(self.fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return _LOST
        if not data:
            return _DONE
        self._process.proto.childDataReceived(STATUS_FD, data)
        return None

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor dropped the pipe (end of file): close it.
        """
        self.registered = False
        self._process._closePipe(STATUS_FD)

    def _unwatch(self) -> bool:
        if not self.registered:
            return False
        self.registered = False
        self._process.reactor.removeReader(self)
        return True


class _ReplyPipe(_Pipe):
    """
    Our end of the reply pipe: written at once, through the reactor only
    when the pipe is full.
    """

    def __init__(self, process: "DirectProcess", fd: int) -> None:
        super().__init__(process, fd)
        self._buffer = b""

    def write(self, data: bytes) -> None:
        """
        Write C{data} after anything still buffered; a child that closed
        its end makes it vanish.
        """
        if self._buffer:
            self._buffer += data
            return
        try:
            written = os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError:
            self._process._closePipe(REPLY_FD)
            return
        if written < len(data):
            self._buffer = data[written:]
            self._process.reactor.addWriter(self)

    def doWrite(self) -> Exception | None:
        """
        Write more of the buffer now that the pipe has room.
        """
        try:
            written = os.write(self.fd, self._buffer)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return _LOST
        self._buffer = self._buffer[written:]
        if not self._buffer:
            self._process.reactor.removeWriter(self)
        return None

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor dropped the pipe (the child closed its end): close it.
        """
        self._buffer = b""
        self._process._closePipe(REPLY_FD)

    def _unwatch(self) -> bool:
        if not self._buffer:
            return False
        self._buffer = b""
        self._process.reactor.removeWriter(self)
        return True


def _register_reaper(pid: int, process: "DirectProcess") -> None:
    """
    Have Twisted's C{SIGCHLD} handling call C{process.reapProcess} for
    C{pid}, and reap it now if it exited already.

    Not C{registerReapProcessHandler}: that reaps a child that exited
    already and hands its status straight to C{processEnded}, past the wait
    for a failed exec's reason (see L{DirectProcess.reapProcess}). A child
    whose exec failed while the reactor was still setting it up (a loaded
    machine) exits that early, and its reason was lost.
    """
    handlers = _twprocess.reapProcessHandlers
    if pid in handlers:
        raise RuntimeError(f"a reap handler for pid {pid} is registered already")
    handlers[pid] = process
    process.reapProcess()


def _gone(*args: object) -> None:
    """
    What a finished L{DirectProcess} calls instead of its callbacks.
    """


class DirectProcess:
    """
    A worker started by a L{DirectSpawner}: our ends of its pipes, its pid
    once it passed the spawner's gate, its reaping. It is the spawn's
    L{SpawnHandler}.

    @ivar pid: the worker's pid (L{None} until it started); kept after it
        exited.
    @ivar pipes: our ends of the pipes still open, by child fd.
    @ivar ended: whether the exit was reported.
    """

    def __init__(
        self,
        reactor: Any,
        proto: ProcessOwner,
        fallback: Callable[[SpawnFailed], None],
        execFailed: Callable[["DirectProcess", int], None],
    ) -> None:
        """
        @param fallback: called when the spawn failed before anything ran
            (this process is closed then), to start the worker another way.
        @param execFailed: called with this process and the errno when the
            exec failed after the start (before the exit is reported as
            status 127).
        """
        self.reactor = reactor
        self.proto = proto
        self.pid: int | None = None
        self.ended = False
        self._fallback = fallback
        self._execFailed = execFailed
        self.pipes: dict[int, _StatusPipe | _ReplyPipe] = {}
        self._spawner: DirectSpawner | None = None
        self._request: Any = None

    def start(
        self,
        spawner: DirectSpawner,
        executable: str,
        args: list[str],
        env: dict[str, str],
        cwd: str,
        stdin: int,
        log_fd: int,
        line: Callable[[int], bytes],
        niceness: int,
        hold: bool = False,
    ) -> None:
        """
        Make the pipes and hand the spawn to C{spawner}; C{log_fd} (the
        child's stdout and stderr, where C{line(pid)} goes first) is ours to
        close from now on. With C{hold}, the child waits at the spawner's
        gate until L{go} (or L{cancel}).

        @raise OSError: the pipes could not be made or the spawner failed at
            once; nothing is left open.
        """
        self._spawner = spawner
        owned = [log_fd]
        try:
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            owned += [status_r, status_w]
            reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
            owned += [reply_r, reply_w]
            _nonblocking(status_r)
            _nonblocking(reply_w)
        except BaseException:
            close_all(owned)
            raise
        self.pipes = {STATUS_FD: _StatusPipe(self, status_r), REPLY_FD: _ReplyPipe(self, reply_w)}
        self.proto.makeConnection(self)
        fdmap = {0: stdin, 1: log_fd, 2: log_fd, STATUS_FD: status_w, REPLY_FD: reply_r}
        try:
            self._request = spawner.spawn(self.reactor, executable, args, env, fdmap, cwd, log_fd, line,
                                          niceness, self, [status_w, reply_r, log_fd], hold=hold)
        except BaseException:
            self._closePipes()
            raise

    def go(self) -> None:
        """
        Let a held child go on (see L{DirectSpawner.go}).
        """
        if self._spawner is not None and self._request is not None:
            self._spawner.go(self._request)

    def cancel(self) -> None:
        """
        Kill a child that has not started yet (see L{DirectSpawner.cancel})
        and close our pipe ends; nothing more is reported.
        """
        self.ended = True
        if self._spawner is not None and self._request is not None:
            self._spawner.cancel(self._request)
        self._closePipes()
        self._forget_spawn()

    def _forget_spawn(self) -> None:
        """
        Drop what only a live spawn needs once nothing more is reported:
        the spawn request (which refers back to us as its handler) and the
        callbacks (which refer to the worker), so that reference counting
        frees it all at once instead of the cyclic collector, later.
        """
        self._request = None
        self._fallback = _gone
        self._execFailed = _gone

    # -- the spawn's SpawnHandler

    def spawnStarted(self, pid: int) -> None:
        """
        The worker passed the gate: read its status pipe, reap it.
        """
        self.pid = pid
        status = self.pipes.get(STATUS_FD)
        if isinstance(status, _StatusPipe):
            status.registered = True
            self.reactor.addReader(status)
        self.proto.started(pid)
        _register_reaper(pid, self)

    def spawnFailed(self, error: SpawnFailed) -> None:
        """
        Nothing ran: close our pipe ends and start the worker another way.
        """
        self._closePipes()
        self._fallback(error)

    def execFailed(self, pid: int, code: int) -> None:
        """
        The exec failed after the start (the C library reaped the child):
        exit status 127, as a shell reports it.
        """
        if self.ended or pid != self.pid:
            return
        try:
            self._execFailed(self, code)
        except Exception:
            _log.failure("reporting a failed exec")
        try:
            _twprocess.unregisterReapProcessHandler(pid, self)
        except RuntimeError:
            pass
        self.processEnded(127 << 8)

    # -- the transport the protocol sees

    def closeChildFD(self, childFD: int) -> None:
        """
        Close our end of the pipe of C{childFD} (nothing if closed).
        """
        self._closePipe(childFD)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        """
        Write C{data} to the pipe of C{childFD}.

        @raise KeyError: that pipe is closed.
        """
        pipe = self.pipes[childFD]
        if not isinstance(pipe, _ReplyPipe):
            raise KeyError(childFD)
        pipe.write(data)

    def _closePipe(self, childFD: int) -> None:
        pipe = self.pipes.pop(childFD, None)
        if pipe is not None:
            pipe.close()

    def _closePipes(self) -> None:
        self._closePipe(STATUS_FD)
        self._closePipe(REPLY_FD)

    # -- reaping (Twisted's reap handler interface)

    def reapProcess(self) -> None:
        """
        Reap the process if it exited (called on C{SIGCHLD}).
        """
        assert self.pid is not None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped by the C library after a failed exec: execFailed
            # reports it.
            return
        except OSError as e:
            _log.warn("cannot reap worker {pid}: {error}", pid=self.pid, error=e)
            return
        if pid:
            _twprocess.unregisterReapProcessHandler(pid, self)
            spawner, request = self._spawner, self._request
            if (
                spawner is not None
                and request is not None
                and os.waitstatus_to_exitcode(status) == 127
                and spawner.early_exit(request, status)
            ):
                # Maybe a failed exec: execFailed says why, or exitedEarly
                # hands the status back.
                return
            self.processEnded(status)

    def exitedEarly(self, status: int) -> None:
        """
        An exit held back while the spawn had not returned (see
        L{DirectSpawner.early_exit}): report it now.
        """
        self.processEnded(status)

    def processEnded(self, status: int) -> None:
        """
        The process exited with wait status C{status}: report it, once.
        """
        if self.ended:
            return
        self.ended = True
        if self._spawner is not None and self.pid is not None:
            self._spawner.forget(self.pid)
        code = os.waitstatus_to_exitcode(status)
        self._forget_spawn()
        if code < 0:
            self.proto.exitReceived(None, -code)
        else:
            self.proto.exitReceived(code, None)
