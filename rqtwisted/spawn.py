"""
Start a worker process directly, without a shell in between.

A worker must run in its own session, in its job directory, at nice 19, and
its C{stdio.log} must start with a line holding its pid before anything the
script writes. C{os.posix_spawn} cannot change directory and holds the GIL
until the child has exec'd; a shell launcher can do all of it but costs one
more exec per worker. L{DirectSpawner} calls the C library's C{posix_spawn}
through C{ctypes} (which releases the GIL) from a spawn thread, with these
file actions run in the child before the exec:

 1. C{dup2} of fds 0 to 4, close every other fd, C{chdir} to the job
    directory;
 2. open FIFO C{in} for writing: this meets the caller, blocked opening it
    for reading;
 3. open FIFO C{out} for writing: this blocks until the caller opens it for
    reading;
 4. close every fd from 5 up; exec.

Between 2 and 3 the caller finds the child's pid (the newest entry of
C{/proc/self/task/<tid>/children} of the spawn thread), renices it and writes the start line to
C{stdio.log}; then it opens C{out} for reading, without waiting, and returns
the pid. Nothing of the script runs before that, and the caller never waits
for the child at nice 19 (the spawn thread waits for the exec). Each spawn
thread has its own FIFOs; idle ones are reused.

This needs Linux, C{/proc}, and a C library with
C{posix_spawn_file_actions_addchdir_np},
C{posix_spawn_file_actions_addclosefrom_np} and C{POSIX_SPAWN_SETSID} (glibc
2.34 and later); L{DirectSpawner.available} says whether they are there.
"""

from __future__ import annotations

import _signal as _csignal
import atexit
import ctypes
import errno
import os
import queue as _queue
import shutil
import sys
import tempfile
import threading
import time
from typing import Callable

from twisted.internet import process as _twprocess

# <spawn.h> flags (glibc).
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
_POSIX_SPAWN_SETSID = 0x80

#: Opaque C structures are allocated larger than any C library needs.
_STRUCT_SIZE = 1024

#: The fds the child opens the two FIFOs on.
_FD_IN, _FD_OUT = 5, 6

_ENCODING = sys.getfilesystemencoding()
_ERRORS = sys.getfilesystemencodeerrors()

#: The most spawn threads (spawns whose exec is still under way).
MAX_THREADS = 16


class SpawnFailed(OSError):
    """
    The child could not be started; nothing of it ran and nothing was
    written to its log.
    """


class _Libc:
    """
    The C library's posix_spawn functions.

    @raise AttributeError, OSError: one of them is missing.
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        p, c, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
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


def _cstrings(items: list[bytes]) -> "ctypes.Array[ctypes.c_char_p]":
    array = (ctypes.c_char_p * (len(items) + 1))()
    array[: len(items)] = items
    return array


def _open_fifo(path: bytes, flags: int) -> int:
    """
    Open our end of a FIFO; a child waits at the other end, so a lack of
    fds is waited out rather than raised.
    """
    delay = 0.001
    while True:
        try:
            return os.open(path, flags)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


#: The FIFOs' directory: C{<tmp>/rq-spawn-<pid>-<random>}.
_DIR_PREFIX = "rq-spawn-"


def _remove_stale(directory: str) -> None:
    """
    Remove the FIFO directories of processes that died without removing
    theirs (killed with C{SIGKILL}).
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        try:
            pid = int(name[len(_DIR_PREFIX) :].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        except (ValueError, OSError):
            continue


class _Request:
    """
    One spawn handed to a spawn thread.
    """

    def __init__(
        self,
        path: bytes,
        actions: "ctypes.Array[ctypes.c_char]",
        argv: "ctypes.Array[ctypes.c_char_p]",
        envp: "ctypes.Array[ctypes.c_char_p]",
        failed: Callable[[int, int], None],
    ) -> None:
        self.path = path
        self.actions = actions
        self.argv = argv
        self.envp = envp
        self.failed = failed
        #: Set by the spawn thread when the child never reached the gate.
        self.early: int | None = None
        #: Set by the caller: the child's pid and our end of FIFO C{out},
        #: which must stay open until the child exec'd.
        self.pid: int | None = None
        self.release_fd: int | None = None
        #: Set by the caller when it let the child go without setting it
        #: up: the spawn thread kills and reaps it.
        self.abandoned = False
        self.passed = threading.Event()


class _SpawnThread:
    """
    A thread that runs C{posix_spawn} calls, with its own pair of FIFOs.
    """

    def __init__(self, owner: "DirectSpawner", directory: str, n: int) -> None:
        self._owner = owner
        self.fifo_in = os.fsencode(os.path.join(directory, f"in{n}"))
        self.fifo_out = os.fsencode(os.path.join(directory, f"out{n}"))
        os.mkfifo(self.fifo_in, 0o600)
        os.mkfifo(self.fifo_out, 0o600)
        self._requests: _queue.SimpleQueue[_Request | None] = _queue.SimpleQueue()
        self.tid: int | None = None
        #: The C{/proc} file listing the thread's children.
        self.children = ""
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rq-spawn-{n}", daemon=True)
        self._thread.start()
        self._started.wait()

    def submit(self, request: _Request | None) -> None:
        """
        Hand a spawn to the thread (L{None} ends it).
        """
        self._requests.put(request)

    def join(self) -> None:
        """
        Wait (a little) for the thread to end.
        """
        self._thread.join(5)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self.children = f"/proc/self/task/{self.tid}/children"
        self._started.set()
        libc = self._owner._libc
        attr = self._owner._attr
        while True:
            request = self._requests.get()
            if request is None:
                return
            pid = ctypes.c_int(0)
            try:
                result = libc.spawn(
                    ctypes.byref(pid), request.path, request.actions, attr, request.argv, request.envp
                )
            except BaseException:
                result = errno.EINVAL
            if result != 0 and not request.passed.is_set():
                # Never at the gate (the fork or a first action failed), or
                # died there: let the caller go on.
                request.early = result
                self._unblock(request)
            # The child exec'd, failed or died: our end of "out" can go.
            request.passed.wait()
            if request.release_fd is not None:
                os.close(request.release_fd)
            if result == 0 and request.abandoned:
                try:
                    os.killpg(pid.value, 9)
                except OSError:
                    pass
                os.waitpid(pid.value, 0)
            elif result != 0 and request.pid is not None:
                request.failed(request.pid, result)
            self._owner._libc.fa_destroy(request.actions)
            self._owner._idle(self)

    def _unblock(self, request: _Request) -> None:
        """
        Meet the caller, blocked opening FIFO C{in}, ourselves.
        """
        wait = threading.Event()
        while not request.passed.is_set():
            try:
                fd = os.open(self.fifo_in, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                # ENXIO: the caller is not at the FIFO yet.
                if e.errno not in (errno.ENXIO, errno.EMFILE, errno.ENFILE, errno.EINTR):
                    # The FIFO is gone: the caller cannot be waiting on it.
                    request.passed.wait()
                    return
                wait.wait(0.001)
                continue
            request.passed.wait()
            os.close(fd)
            return


class DirectSpawner:
    """
    Spawn processes with C{posix_spawn} and a gate (see the module
    docstring). Spawns are started from one thread at a time.
    """

    def __init__(self) -> None:
        self._libc = _Libc()
        self._lock = threading.Lock()
        self._idle_lock = threading.Lock()
        self._threads: list[_SpawnThread] = []
        self._idle_threads: list[_SpawnThread] = []
        self._free = threading.Semaphore(MAX_THREADS)
        self._dir: str | None = None
        self._attr = ctypes.create_string_buffer(_STRUCT_SIZE)
        self._attr_ready = False
        #: Set when the FIFOs went missing: the caller should spawn some
        #: other way.
        self.broken = False

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

    def close(self) -> None:
        """
        Stop the spawn threads and remove the FIFOs.
        """
        for thread in self._threads:
            thread.submit(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._idle_threads = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _make_attr(self) -> None:
        """
        Spawn attributes: new session, no signal blocked, signals we ignore
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

    def _take(self) -> _SpawnThread:
        """
        An idle spawn thread (a new one if none is idle).
        """
        self._free.acquire()
        with self._idle_lock:
            if self._idle_threads:
                return self._idle_threads.pop()
        try:
            if self._dir is None:
                _remove_stale(tempfile.gettempdir())
                self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
                # The spawn threads are daemon threads: nothing else ends them.
                atexit.register(shutil.rmtree, self._dir, True)
            thread = _SpawnThread(self, self._dir, len(self._threads))
        except OSError as e:
            self._free.release()
            self.broken = True
            raise SpawnFailed(e.errno or errno.EIO, f"spawn thread: {e}")
        self._threads.append(thread)
        return thread

    def _idle(self, thread: _SpawnThread) -> None:
        with self._idle_lock:
            self._idle_threads.append(thread)
        self._free.release()

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
        failed: Callable[[int, int], None],
    ) -> int:
        """
        Start C{executable} (a path) with C{args} and C{env}, child fds from
        C{fdmap} (child fd -> our fd; nothing else is inherited), in C{cwd},
        in a new session, at C{niceness}; C{line(pid)} is appended to
        C{log_fd} before it runs. Returns once that is done, maybe before
        the exec.

        @param failed: called with the pid and an errno, from another
            thread, when the exec itself fails after this returned (the
            child is then gone, reaped by the C library).

        @raise SpawnFailed: the child could not be started.
        """
        with self._lock:
            if not self._attr_ready:
                try:
                    self._make_attr()
                except OSError as e:
                    self.broken = True
                    raise SpawnFailed(e.errno or errno.EIO, str(e))
            thread = self._take()
            request = self._request(thread, executable, args, env, fdmap, cwd, failed)
            # The spawn thread destroys the file actions once it is done.
            thread.submit(request)
            try:
                return self._gate(thread, request, log_fd, line, niceness)
            finally:
                request.passed.set()

    def _request(
        self,
        thread: _SpawnThread,
        executable: str,
        args: list[str],
        env: dict[str, str],
        fdmap: dict[int, int],
        cwd: str,
        failed: Callable[[int, int], None],
    ) -> _Request:
        """
        What C{thread} is to spawn: the file actions, C{argv} and C{envp}.
        On failure C{thread} is idle again.
        """
        libc = self._libc
        fsencode = os.fsencode
        actions = ctypes.create_string_buffer(_STRUCT_SIZE)
        if libc.fa_init(actions) != 0:
            self._idle(thread)
            raise SpawnFailed(errno.ENOMEM, "posix_spawn_file_actions_init failed")
        try:
            sources = [(fd, True) for fd in set(fdmap.values())]
            for action in _twprocess._getFileActions(sources, fdmap, doClose=0, doDup2=1):
                if action[0] == 1:
                    _check(libc.fa_dup2(actions, action[1], action[2]), "adddup2")
                else:
                    _check(libc.fa_close(actions, action[1]), "addclose")
            # Every other fd closed, so that the FIFOs land on 5 and 6.
            _check(libc.fa_closefrom(actions, _FD_IN), "addclosefrom")
            _check(libc.fa_chdir(actions, fsencode(cwd)), "addchdir")
            _check(libc.fa_open(actions, _FD_IN, thread.fifo_in, os.O_WRONLY, 0), "addopen")
            _check(libc.fa_open(actions, _FD_OUT, thread.fifo_out, os.O_WRONLY, 0), "addopen")
            _check(libc.fa_closefrom(actions, _FD_IN), "addclosefrom")
            request = _Request(
                fsencode(executable),
                actions,
                _cstrings([a.encode(_ENCODING, _ERRORS) for a in args]),
                _cstrings([f"{k}={v}".encode(_ENCODING, _ERRORS) for k, v in env.items()]),
                failed,
            )
        except BaseException as e:
            libc.fa_destroy(actions)
            self._idle(thread)
            if isinstance(e, OSError) and not isinstance(e, SpawnFailed):
                raise SpawnFailed(e.errno or errno.EIO, str(e))
            raise
        return request

    def _gate(
        self,
        thread: _SpawnThread,
        request: _Request,
        log_fd: int,
        line: Callable[[int], bytes],
        niceness: int,
    ) -> int:
        """
        Meet the child at the gate, set it up, let it go on.
        """
        try:
            fd = _open_fifo(thread.fifo_in, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            # The FIFOs were removed (a cleaner of $TMPDIR?): the child
            # cannot reach them either.
            self.broken = True
            raise SpawnFailed(e.errno or errno.EIO, f"spawn gate: {e}")
        os.close(fd)
        if request.early is not None:
            raise SpawnFailed(request.early, os.strerror(request.early))
        try:
            pid = self._find_child(thread)
            os.setpriority(os.PRIO_PROCESS, pid, niceness)
            os.write(log_fd, line(pid))
        except OSError as e:
            request.abandoned = True
            self._release(thread, request)
            raise SpawnFailed(e.errno or errno.EIO, f"cannot set the child up: {e}")
        request.pid = pid
        self._release(thread, request)
        return pid

    def _release(self, thread: _SpawnThread, request: _Request) -> None:
        """
        Let the child past the gate.
        """
        try:
            request.release_fd = _open_fifo(thread.fifo_out, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            # The child cannot open it either: it fails before its exec.
            self.broken = True
            request.abandoned = True
            raise SpawnFailed(e.errno or errno.EIO, f"spawn gate: {e}")

    def _find_child(self, thread: _SpawnThread) -> int:
        """
        The child at the gate: the newest child of the spawn thread (the
        kernel lists a thread's children oldest first; orphans are given to
        the main thread, never to a spawn thread, which only makes
        workers).
        """
        fd = os.open(thread.children, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = [os.read(fd, 65536)]
            while chunks[-1]:
                chunks.append(os.read(fd, 65536))
        finally:
            os.close(fd)
        pids = b"".join(chunks).split()
        if not pids:
            raise OSError(errno.ESRCH, "the spawned child cannot be found")
        return int(pids[-1])
