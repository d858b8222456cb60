"""
Start a worker process directly, without a shell in between.

A worker must run in its own session, in its job directory, at nice 19,
and its C{stdio.log} must start with a line holding its pid before anything
the script writes. C{os.posix_spawn} cannot change directory and holds the
GIL until the child has exec'd; a shell launcher can do all of it but costs
one more exec per worker. L{DirectSpawner} calls the C library's
C{posix_spawn} through C{ctypes} (which releases the GIL), with these file
actions run in the child before the exec:

 1. C{dup2} of fds 0 to 4, C{chdir} to the job directory;
 2. open a FIFO for writing: this meets the L{DirectSpawner}'s gate thread,
    blocked opening it for reading;
 3. open a second FIFO for reading: this blocks until the gate thread opens
    it for writing;
 4. close every fd from 5 up; exec.

Between 2 and 3, while the child waits, the gate thread finds the child's
pid (the newest entry of C{/proc/self/task/<tid>/children} of the spawning
thread, checked against the FIFO the child holds), renices it and writes the
start line to C{stdio.log}. Nothing of the script runs before that.

This needs Linux, C{/proc}, and a C library with C{posix_spawn_file_actions_addchdir_np},
C{posix_spawn_file_actions_addclosefrom_np} and C{POSIX_SPAWN_SETSID}
(glibc 2.34 and later); L{DirectSpawner.available} says whether they are
there.
"""

from __future__ import annotations

import _signal as _csignal
import ctypes
import errno
import os
import queue as _queue
import shutil
import stat
import tempfile
import threading
import time
from typing import Callable

from twisted.internet import process as _twprocess
from twisted.logger import Logger

_log = Logger()

# <spawn.h> flags (glibc).
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
_POSIX_SPAWN_SETSID = 0x80

#: Opaque C structures, allocated larger than any C library needs.
_STRUCT_SIZE = 1024

#: The fds the child opens the two FIFOs on (before closing every fd from
#: 5 up).
_GATE_FD_IN, _GATE_FD_OUT = 5, 6

#: How long the gate thread waits for the child's fd before giving up.
_FIND_TIMEOUT = 5.0

#: How long the spawning thread waits for the gate thread once the spawn
#: returned before it unblocks it.
_GATE_GRACE = 0.05


class SpawnFailed(OSError):
    """
    The child could not be started; C{started} says whether it got past the
    gate (its start line was written, then removed again).
    """

    def __init__(self, code: int, message: str, started: bool) -> None:
        super().__init__(code, message)
        self.started = started


class _Libc:
    """
    The C library's posix_spawn functions.

    @raise AttributeError, OSError: one of them is missing.
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        p, c = ctypes.c_void_p, ctypes.c_char_p
        i = ctypes.c_int
        self.spawn = libc.posix_spawn
        self.spawn.argtypes = [ctypes.POINTER(ctypes.c_int), c, p, p, p, p]
        self.fa_init = libc.posix_spawn_file_actions_init
        self.fa_init.argtypes = [p]
        self.fa_destroy = libc.posix_spawn_file_actions_destroy
        self.fa_destroy.argtypes = [p]
        self.fa_dup2 = libc.posix_spawn_file_actions_adddup2
        self.fa_dup2.argtypes = [p, i, i]
        self.fa_close = libc.posix_spawn_file_actions_addclose
        self.fa_close.argtypes = [p, i]
        self.fa_open = libc.posix_spawn_file_actions_addopen
        self.fa_open.argtypes = [p, i, c, i, ctypes.c_uint]
        self.fa_chdir = libc.posix_spawn_file_actions_addchdir_np
        self.fa_chdir.argtypes = [p, c]
        self.fa_closefrom = libc.posix_spawn_file_actions_addclosefrom_np
        self.fa_closefrom.argtypes = [p, i]
        self.attr_init = libc.posix_spawnattr_init
        self.attr_init.argtypes = [p]
        self.attr_setflags = libc.posix_spawnattr_setflags
        self.attr_setflags.argtypes = [p, ctypes.c_short]
        self.attr_setsigmask = libc.posix_spawnattr_setsigmask
        self.attr_setsigmask.argtypes = [p, p]
        self.attr_setsigdefault = libc.posix_spawnattr_setsigdefault
        self.attr_setsigdefault.argtypes = [p, p]
        self.sigemptyset = libc.sigemptyset
        self.sigemptyset.argtypes = [p]
        self.sigaddset = libc.sigaddset
        self.sigaddset.argtypes = [p, i]


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(result, f"{what}: {os.strerror(result)}")


def _cstrings(items: list[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    array = (ctypes.c_char_p * (len(items) + 1))()
    array[: len(items)] = items
    return array


class _GateRequest:
    """
    One spawn, as the gate thread sees it.
    """

    def __init__(self, tid: int, log_fd: int, line: Callable[[int], bytes], niceness: int) -> None:
        self.tid = tid
        self.log_fd = log_fd
        self.line = line
        self.niceness = niceness
        self.aborted = False
        self.pid: int | None = None
        self.line_at: int | None = None
        self.error: BaseException | None = None
        self.release_fd: int | None = None
        self.done = threading.Event()


def _retry(call: Callable[[], int]) -> int:
    """
    Open a FIFO end, waiting out a transient lack of fds.
    """
    delay = 0.001
    while True:
        try:
            return call()
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            threading.Event().wait(delay)
            delay = min(delay * 2, 0.1)


class DirectSpawner:
    """
    Spawn processes with C{posix_spawn} and a gate (see the module
    docstring); one per process, used from one thread at a time.
    """

    def __init__(self) -> None:
        self._libc = _Libc()
        self._lock = threading.Lock()
        self._requests: _queue.SimpleQueue[_GateRequest | None] = _queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._dir: str | None = None
        self._fifo_in = self._fifo_out = b""
        self._fifo_in_ino = 0
        self._attr = ctypes.create_string_buffer(_STRUCT_SIZE)
        self._attr_ready = False

    @staticmethod
    def available() -> bool:
        """
        Whether this system has what L{DirectSpawner} needs.
        """
        try:
            _Libc()
        except (AttributeError, OSError):
            return False
        tid = threading.get_native_id()
        return os.path.exists(f"/proc/self/task/{tid}/children")

    # -- set-up

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="rq-spawn-")
            fifo_in = os.path.join(self._dir, "in")
            fifo_out = os.path.join(self._dir, "out")
            os.mkfifo(fifo_in, 0o600)
            os.mkfifo(fifo_out, 0o600)
            self._fifo_in, self._fifo_out = os.fsencode(fifo_in), os.fsencode(fifo_out)
            self._fifo_in_ino = os.stat(fifo_in).st_ino
        self._thread = threading.Thread(target=self._gate, name="rq-spawn-gate", daemon=True)
        self._thread.start()

    def _make_attr(self) -> None:
        """
        Spawn attributes: new session, no signal blocked, ignored signals
        back to their default.
        """
        libc, attr = self._libc, self._attr
        _check(libc.attr_init(attr), "posix_spawnattr_init")
        empty = ctypes.create_string_buffer(_STRUCT_SIZE)
        libc.sigemptyset(empty)
        _check(libc.attr_setsigmask(attr, empty), "posix_spawnattr_setsigmask")
        ignored = ctypes.create_string_buffer(_STRUCT_SIZE)
        libc.sigemptyset(ignored)
        for sig in range(1, _csignal.NSIG):
            try:
                if _csignal.getsignal(sig) == _csignal.SIG_IGN:
                    libc.sigaddset(ignored, sig)
            except (OSError, ValueError):
                pass
        _check(libc.attr_setsigdefault(attr, ignored), "posix_spawnattr_setsigdefault")
        flags = _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGMASK | _POSIX_SPAWN_SETSIGDEF
        _check(libc.attr_setflags(attr, flags), "posix_spawnattr_setflags")
        self._attr_ready = True

    def close(self) -> None:
        """
        Stop the gate thread and remove the FIFOs.
        """
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join(5)
            self._thread = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- the gate thread

    def _gate(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            child = False
            try:
                fd = _retry(lambda: os.open(self._fifo_in, os.O_RDONLY | os.O_CLOEXEC))
                os.close(fd)
                child = not request.aborted
                if child:
                    pid = self._find_child(request.tid)
                    os.setpriority(os.PRIO_PROCESS, pid, request.niceness)
                    line = request.line(pid)
                    os.write(request.log_fd, line)
                    request.line_at = os.fstat(request.log_fd).st_size - len(line)
                    request.pid = pid
            except BaseException as e:
                request.error = e
            finally:
                if child:
                    try:
                        request.release_fd = _retry(
                            lambda: os.open(self._fifo_out, os.O_WRONLY | os.O_CLOEXEC)
                        )
                    except BaseException as e:
                        request.error = request.error or e
                request.done.set()

    def _find_child(self, tid: int) -> int:
        """
        The child waiting at the gate: the newest child of thread C{tid}
        that holds the in FIFO on L{_GATE_FD_IN}.
        """
        wait = threading.Event()
        deadline = time.monotonic() + _FIND_TIMEOUT
        tries = 0
        while True:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids = f.read().split()
            for text in reversed(pids):
                pid = int(text)
                try:
                    info = os.stat(f"/proc/{pid}/fd/{_GATE_FD_IN}")
                except OSError:
                    continue
                if info.st_ino == self._fifo_in_ino and stat.S_ISFIFO(info.st_mode):
                    return pid
            # The child has not installed the fd yet (it met us inside its
            # open call).
            if time.monotonic() > deadline:
                raise OSError(errno.ESRCH, "the spawned child was not found")
            tries += 1
            if tries < 50:
                os.sched_yield()
            else:
                wait.wait(0.0002)

    # -- spawning

    def spawn(
        self,
        executable: str,
        args: list[str],
        env: dict[str, str],
        fdmap: dict[int, int],
        cwd: str,
        log_fd: int,
        line: Callable[[int], bytes],
        niceness: int,
    ) -> int:
        """
        Start C{executable} (a path) with C{args} and C{env}, child fds from
        C{fdmap} (child fd -> our fd; nothing else is inherited), in C{cwd},
        in a new session, at C{niceness}; C{line(pid)} is appended to
        C{log_fd} before it runs.

        @raise SpawnFailed: it could not be started (nothing runs then).
        """
        with self._lock:
            return self._spawn(executable, args, env, fdmap, cwd, log_fd, line, niceness)

    def _spawn(
        self,
        executable: str,
        args: list[str],
        env: dict[str, str],
        fdmap: dict[int, int],
        cwd: str,
        log_fd: int,
        line: Callable[[int], bytes],
        niceness: int,
    ) -> int:
        self._start()
        if not self._attr_ready:
            self._make_attr()
        libc = self._libc
        fsencode = os.fsencode
        argv = _cstrings([fsencode(a) for a in args])
        envp = _cstrings([fsencode(f"{k}={v}") for k, v in env.items()])
        actions = ctypes.create_string_buffer(_STRUCT_SIZE)
        _check(libc.fa_init(actions), "posix_spawn_file_actions_init")
        try:
            sources = {fd: True for fd in fdmap.values()}
            for action in _twprocess._getFileActions(
                list(sources.items()), fdmap, doClose=0, doDup2=1
            ):
                if action[0] == 1:
                    _check(libc.fa_dup2(actions, action[1], action[2]), "adddup2")
                else:
                    _check(libc.fa_close(actions, action[1]), "addclose")
            # Every other fd closed, so that the FIFOs land on 5 and 6.
            _check(libc.fa_closefrom(actions, _GATE_FD_IN), "addclosefrom")
            _check(libc.fa_chdir(actions, fsencode(cwd)), "addchdir")
            _check(libc.fa_open(actions, _GATE_FD_IN, self._fifo_in, os.O_WRONLY, 0), "addopen")
            _check(libc.fa_open(actions, _GATE_FD_OUT, self._fifo_out, os.O_RDONLY, 0), "addopen")
            _check(libc.fa_closefrom(actions, _GATE_FD_IN), "addclosefrom")
            path = fsencode(executable)
            pid = ctypes.c_int(0)
            request = _GateRequest(threading.get_native_id(), log_fd, line, niceness)
            self._requests.put(request)
            try:
                result = libc.spawn(ctypes.byref(pid), path, actions, self._attr, argv, envp)
            finally:
                self._settle(request)
        finally:
            libc.fa_destroy(actions)
        if result != 0:
            started = request.line_at is not None
            if started:
                # Nothing of the child ran: take its start line back.
                try:
                    os.ftruncate(log_fd, request.line_at)
                except OSError:
                    pass
            raise SpawnFailed(result, f"{executable}: {os.strerror(result)}", started)
        if request.error is not None or request.pid != pid.value:
            # It runs, but without its start line or niceness: stop it.
            try:
                os.killpg(pid.value, 9)
            except OSError:
                pass
            os.waitpid(pid.value, 0)
            error = request.error or OSError(errno.ESRCH, "the spawned child was not found")
            raise SpawnFailed(getattr(error, "errno", None) or errno.EIO, f"gate: {error}", False)
        return pid.value

    def _settle(self, request: _GateRequest) -> None:
        """
        Once the spawn returned: wait for the gate thread (unblocking it if
        the child never reached the gate) and close its FIFO end.
        """
        if not request.done.wait(_GATE_GRACE):
            # The child never reached the gate (or died there): meet the
            # gate thread at both FIFOs ourselves.
            request.aborted = True
            extra = [os.open(self._fifo_out, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)]
            wait = threading.Event()
            while not request.done.is_set():
                if len(extra) == 1:
                    try:
                        extra.append(os.open(self._fifo_in, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                    except OSError as e:
                        # ENXIO: the gate thread is not at the FIFO yet.
                        if e.errno != errno.ENXIO:
                            raise
                wait.wait(0.001)
            for fd in extra:
                os.close(fd)
        if request.release_fd is not None:
            os.close(request.release_fd)
