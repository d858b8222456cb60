"""
Start a worker process directly, without a shell in between, without
blocking the reactor.

A worker must run in its own session, in its job directory, at nice 19, and
its C{stdio.log} must start with a line holding its pid before anything the
script writes. C{os.posix_spawn} cannot change directory and holds the GIL
until the child has exec'd; a shell launcher can do all of it but costs one
more exec per worker. L{DirectSpawner} calls the C library's C{posix_spawn}
through C{ctypes} (which releases the GIL) from a spawn thread (a
C{SCHED_BATCH} one: see L{_batch_thread}), with these file actions run in
the child before the exec:

 1. C{fchdir} to the job directory (opened by us: the child's cwd is
    that directory wherever it is renamed to meanwhile), C{dup2} of fds 0
    to 4, close every other fd;
 2. open FIFO C{in} for writing and close it again;
 3. open FIFO C{out} for writing: this blocks until somebody opens it for
    reading (the gate);
 4. close every fd from 5 up; exec.

Before handing the spawn to a thread, the reactor opens C{in} for reading
(without waiting) and watches it: when the child closes its end in step 2,
the reactor sees a hang-up. The child is then at the gate: the reactor finds
its pid (the newest entry of C{/proc/self/task/<tid>/children} of the spawn
thread), renices it, writes the start line to C{stdio.log}, opens C{out} for
reading (which lets the child go on) and tells the caller. Nothing of the
script runs before that, and neither the reactor nor the caller ever waits
for the child. The spawn thread waits for the exec, then closes our end of
C{out}. Each FIFO pair (a gate) serves one spawn at a time and is reused;
its C{out} is made anew after each use (see L{_Gate}).

A spawn may be I{held}: its child waits at the gate until
L{DirectSpawner.go} sets it up and lets it go, or L{DirectSpawner.cancel}
kills it there, before anything of the script ran. A queue uses this to
have the next worker ready when a slot frees. The reactor does not watch
the gate of a held spawn: at the go (or the cancel) it looks whether the
child got there (and deals with it at once), and only watches if not yet.
That spares a wake-up of the reactor per worker, and the child the cost
of waking it. A child the reactor
cannot set up (its pid cannot be told for sure, the start line cannot be
written) is let go with the path it is about to exec emptied (it shares
our memory until its exec), so that its exec fails and nothing of it runs;
the caller hears that the spawn failed.

This needs Linux, C{/proc}, and a C library with
C{posix_spawn_file_actions_addfchdir_np},
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
import select
import shutil
import sys
import tempfile
import threading
from typing import Any, Callable, Protocol

from twisted.internet import process as _twprocess
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()

# <spawn.h> flags (glibc).
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
_POSIX_SPAWN_SETSCHEDULER = 0x20
_POSIX_SPAWN_SETSID = 0x80

#: Opaque C structures are allocated larger than any C library needs.
_STRUCT_SIZE = 1024

#: The fd the child opens the FIFOs on.
_FD_GATE = 5

_ENCODING = sys.getfilesystemencoding()
_ERRORS = sys.getfilesystemencodeerrors()

#: The most spawn threads (spawns whose exec is under way at once); more
#: spawns wait for a thread.
MAX_THREADS = 16

#: Bytes read at once from a spawn thread's C{/proc} children file.
_CHILDREN_READ = 65536

#: The most spawns held at their gates at once (each keeps a spawn thread
#: waiting): at most half the threads, so that held spawns never make the
#: others wait.
MAX_HELD = MAX_THREADS // 2


class SpawnFailed(OSError):
    """
    The child could not be started; nothing of it ran and nothing was
    written to its log.
    """


class SpawnBusy(SpawnFailed):
    """
    A held spawn was refused: L{MAX_HELD} spawns are held already.
    """


class SpawnHandler(Protocol):
    """
    What a L{DirectSpawner} tells about one spawn, on the reactor thread.
    """

    def spawnStarted(self, pid: int) -> None:
        """
        The child passed the gate: reniced, its start line written; it
        execs next.
        """

    def spawnFailed(self, error: SpawnFailed) -> None:
        """
        The child could not be started (nothing of it ran).
        """

    def execFailed(self, pid: int, code: int) -> None:
        """
        The exec of a started child failed with errno C{code}; the C
        library reaped it.
        """

    def exitedEarly(self, status: int) -> None:
        """
        The started child, whose exit (wait status C{status}) was held back
        by L{DirectSpawner.early_exit}, had exec'd after all.
        """


class _Libc:
    """
    The C library's posix_spawn functions, and the few system calls a
    spawn thread makes.

    Only C{spawn} releases the GIL while it runs (it waits for the child).
    Every other function is quick and keeps it: a call that released it
    would have to take it back, and while the reactor thread holds it that
    means a wait and two thread switches, for a call of a microsecond or
    two. (L{os} functions always release it.)

    @raise AttributeError, OSError: one of them is missing.
    """

    def __init__(self) -> None:
        p, c, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        waiting = ctypes.CDLL(None, use_errno=True)
        self.spawn = waiting.posix_spawn
        self.spawn.argtypes = [ctypes.POINTER(ctypes.c_int), c, p, p, p, p]
        libc = ctypes.PyDLL(None, use_errno=True)
        functions: dict[str, tuple[str, list[Any]]] = {
            "close": ("close", [i]),
            "unlink": ("unlink", [c]),
            "mkfifo": ("mkfifo", [c, ctypes.c_uint]),
            "fa_init": ("posix_spawn_file_actions_init", [p]),
            "fa_destroy": ("posix_spawn_file_actions_destroy", [p]),
            "fa_dup2": ("posix_spawn_file_actions_adddup2", [p, i, i]),
            "fa_close": ("posix_spawn_file_actions_addclose", [p, i]),
            "fa_open": ("posix_spawn_file_actions_addopen", [p, i, c, i, ctypes.c_uint]),
            "fa_fchdir": ("posix_spawn_file_actions_addfchdir_np", [p, i]),
            "fa_closefrom": ("posix_spawn_file_actions_addclosefrom_np", [p, i]),
            "attr_init": ("posix_spawnattr_init", [p]),
            "attr_setflags": ("posix_spawnattr_setflags", [p, ctypes.c_short]),
            "attr_setsigmask": ("posix_spawnattr_setsigmask", [p, p]),
            "attr_setsigdefault": ("posix_spawnattr_setsigdefault", [p, p]),
            "attr_setschedpolicy": ("posix_spawnattr_setschedpolicy", [p, i]),
            "sigemptyset": ("sigemptyset", [p]),
            "sigaddset": ("sigaddset", [p, i]),
        }
        for attribute, (name, argtypes) in functions.items():
            function = getattr(libc, name)
            function.argtypes = argtypes
            setattr(self, attribute, function)


def close_all(fds: list[int]) -> None:
    """
    Close every fd of C{fds}, whatever happens to each.
    """
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(result, f"{what}: {os.strerror(result)}")


def _cstrings(items: list[bytes]) -> "ctypes.Array[ctypes.c_char_p]":
    array = (ctypes.c_char_p * (len(items) + 1))()
    array[: len(items)] = items
    return array


#: (id(base), overrides) -> (base, its C{envp} strings but the overridden).
_bases: dict[tuple[int, tuple[str, ...]], tuple[Any, list[bytes]]] = {}


def _environ(env: dict[str, str]) -> list[bytes]:
    """
    C{env} as C{envp} strings. For a
    L{WorkerEnvironment<rqtwisted.worker.WorkerEnvironment>}, the daemon's
    part is encoded once.
    """
    base = getattr(env, "base", None)
    if base is not None:
        overrides: tuple[str, ...] = env.overrides  # type: ignore[attr-defined]
        key = (id(base), overrides)
        cached = _bases.get(key)
        if cached is None or cached[0] is not base:
            if len(_bases) > 64:
                _bases.clear()
            skip = set(overrides)
            cached = _bases[key] = (base, [_encode(k, v) for k, v in base.items() if k not in skip])
        return cached[1] + [_encode(k, env[k]) for k in overrides if k in env]
    return [_encode(k, v) for k, v in env.items()]


def _encode(name: str, value: str) -> bytes:
    return f"{name}={value}".encode(_ENCODING, _ERRORS)


#: The FIFOs' directory: C{<dir>/rq-spawn-<pid>-<random>} (see L{_fifo_parent}).
_DIR_PREFIX = "rq-spawn-"


#: Where the FIFOs' directory goes if it can: a memory filesystem, where
#: making a FIFO costs no disk write.
_SHM = "/dev/shm"


def _fifo_parent() -> str:
    """
    The directory to make the FIFOs' directory in: C{/dev/shm} where it is
    a writable directory, else the temporary directory.
    """
    if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK | os.X_OK):
        return _SHM
    return tempfile.gettempdir()


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
        except ValueError:
            continue
        if not _running(pid):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _running(pid: int) -> bool:
    """
    Whether process C{pid} exists and is not a zombie (a daemon killed
    with C{SIGKILL} stays one until its parent reaps it).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


class _Gate:
    """
    A pair of FIFOs one spawn at a time goes through.

    Every child starts with a copy of all our fds, until it closes them
    (step 1): for a moment it holds our reader of some gate's C{out}, which
    would let another child through that gate unchecked. So C{out} is made
    anew (a new FIFO under the same name) after every use: an old copy
    holds the old one. C{in} needs no such care (we never hold a writer of
    it).
    """

    def __init__(self, directory: str, n: int) -> None:
        self.fifo_in = os.fsencode(os.path.join(directory, f"in{n}"))
        self.fifo_out = os.fsencode(os.path.join(directory, f"out{n}"))
        os.mkfifo(self.fifo_in, 0o600)
        os.mkfifo(self.fifo_out, 0o600)

    def renew(self, libc: _Libc) -> None:
        """
        Replace FIFO C{out} with a new one (without releasing the GIL).

        @raise OSError: it cannot be made.
        """
        if libc.unlink(self.fifo_out) != 0 or libc.mkfifo(self.fifo_out, 0o600) != 0:  # type: ignore[attr-defined]
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), os.fsdecode(self.fifo_out))


#: The states of a L{_Request}.
_WAITING, _STARTED, _FAILED, _CANCELLED = "waiting", "started", "failed", "cancelled"


class _Request:
    """
    One spawn, from the reactor's request to the spawn thread's return.

    The reactor thread owns everything but the fields the spawn thread sets
    (C{thread}, C{returned}) and C{release_fd} and C{holders}, which both
    touch under C{lock}.
    """

    def __init__(
        self,
        spawner: "DirectSpawner",
        reactor: Any,
        gate: _Gate,
        path: bytes,
        actions: "ctypes.Array[ctypes.c_char]",
        argv: "ctypes.Array[ctypes.c_char_p]",
        envp: "ctypes.Array[ctypes.c_char_p]",
        log_fd: int,
        line: Callable[[int], bytes],
        niceness: int,
        handler: SpawnHandler,
        owned: list[int],
        hold: bool = False,
    ) -> None:
        self.spawner = spawner
        self.reactor = reactor
        self.gate = gate
        #: The executable's path, in memory the child shares until its exec
        #: (see L{let_go}).
        self.path = ctypes.create_string_buffer(path)
        self.actions = actions
        self.argv = argv
        self.envp = envp
        self.log_fd = log_fd
        self.line = line
        self.niceness = niceness
        self.handler = handler
        #: Our fds the child gets copies of: closed once it has them.
        self.owned = owned
        self.state = _WAITING
        #: Stop at the gate until L{DirectSpawner.go}; while set, the spawn
        #: counts among the spawner's held ones (L{DirectSpawner.holding}).
        self.hold = hold
        #: Cancelled before the child reached the gate: kill it there.
        self.cancelled = False
        self.pid: int | None = None
        #: Set when the reactor let the child go without setting it up: its
        #: exec fails (see L{let_go}), or the spawn thread kills and reaps
        #: it.
        self.abandoned = False
        #: The wait status of a child reaped with exit status 127 before the
        #: spawn returned (see L{DirectSpawner.early_exit}).
        self.early_status: int | None = None
        #: The spawn thread, set before it calls posix_spawn.
        self.thread: _SpawnThread | None = None
        self.lock = threading.Lock()
        #: Our end of FIFO C{out}, open from the gate until the exec.
        self.release_fd: int | None = None
        self.returned = False
        #: Set with C{returned} when C{posix_spawn} failed: its failure is
        #: on its way to the reactor (L{DirectSpawner._spawn_error}).
        self.spawn_failed = False
        #: Of the hang-up watch and the spawn thread, the one that is done
        #: second gives the gate back.
        self.holders = 2
        self.watcher: _GateWatcher | None = None

    def close_owned(self) -> None:
        """
        Close our copies of the child's fds.
        """
        owned, self.owned = self.owned, []
        close_all(owned)

    def let_go(self) -> None:
        """
        Open FIFO C{out} for reading: the child at the gate goes on. Our end
        stays open until the exec (a child that has not reached the FIFO yet
        would otherwise wait for another reader forever).

        An abandoned child must not run anything: until its exec it shares
        our memory, so emptying the path it is about to exec makes the exec
        fail (and the C library reap it).
        """
        if self.abandoned:
            self.path[0] = b"\0"
        fd = os.open(self.gate.fifo_out, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with self.lock:
            if not self.returned:
                self.release_fd, fd = fd, -1
        if fd >= 0:
            os.close(fd)

    def release_gate(self) -> None:
        """
        One of the two users of the gate is done with it.
        """
        with self.lock:
            self.holders -= 1
            last = self.holders == 0
        if last:
            self.spawner._free_gate(self.gate)


class _GateWatcher:
    """
    Our end of FIFO C{in} of a waiting spawn: its hang-up means the child
    is at the gate.

    The reactor watches it from the spawn on, except for a held spawn: its
    child waits at the gate anyway, so it is looked at only when the spawn
    goes or is cancelled (L{DirectSpawner._watch}). Nobody is then woken
    when the child gets there.
    """

    def __init__(self, request: _Request, fd: int) -> None:
        self._request = request
        self.fd = fd
        #: Whether the reactor watches it.
        self.registered = False

    def watch(self) -> None:
        """
        Have the reactor watch the FIFO (a hang-up already there is seen
        at once).
        """
        if self.fd >= 0 and not self.registered:
            self.registered = True
            self._request.reactor.addReader(self)

    def hung_up(self) -> bool:
        """
        Whether the child is at the gate already (the FIFO hung up).
        """
        if self.fd < 0:
            return False
        # poll, not select: the fd may be above select's limit of 1024.
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(0))

    def fileno(self) -> int:
        """
        The FIFO's fd (-1 once closed).
        """
        return self.fd

    def logPrefix(self) -> str:
        """
        The log prefix the reactor uses.
        """
        return "rq-spawn"

    def doRead(self) -> None:
        """
        Nothing is ever written to the FIFO.
        """

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor saw the hang-up (and stopped watching).
        """
        self.registered = False
        self.close()
        self._request.spawner._at_gate(self._request)

    def close(self) -> None:
        """
        Stop watching and close the fd, once; the gate is then free of it.
        """
        if self.fd < 0:
            return
        if self.registered:
            self.registered = False
            self._request.reactor.removeReader(self)
        os.close(self.fd)
        self.fd = -1
        # The request and its watcher refer to each other: let go, so that
        # both are freed as soon as nothing else needs them.
        self._request.watcher = None
        self._request.release_gate()


def _batch_thread() -> None:
    """
    Schedule the calling thread as C{SCHED_BATCH}; nothing if the system
    refuses.

    A spawn thread wakes up twice per spawn (a request, the exec) and then
    needs the GIL, which the reactor thread mostly holds. With the default
    policy each wake-up preempts the reactor thread on its CPU, only to
    wait for the GIL and switch back: about two involuntary switches of the
    reactor per message. A batch thread does not preempt the running one
    when it wakes up; it runs when a CPU is free or the reactor waits.
    (Its children set the default policy back themselves: see
    L{DirectSpawner._make_attr}.)
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass


class _SpawnThread:
    """
    A thread that runs C{posix_spawn} calls and waits for their execs.
    """

    def __init__(self, owner: "DirectSpawner", n: int) -> None:
        self._owner = owner
        self.tid: int | None = None
        #: The C{/proc} file listing the thread's children.
        self.children = ""
        #: That file, opened by the reactor at its first look.
        self._children_fd = -1
        #: Pids this thread's children were given at their gates, until they
        #: are reaped (see L{DirectSpawner._find_child} and L{DirectSpawner.forget}).
        self.given: set[int] = set()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rq-spawn-{n}", daemon=True)
        self._thread.start()
        self._started.wait()

    def join(self) -> None:
        """
        Wait (a little) for the thread to end; close its children file.
        """
        self._thread.join(5)
        fd, self._children_fd = self._children_fd, -1
        if fd >= 0:
            os.close(fd)

    def list_children(self) -> bytes:
        """
        The thread's children file now: each read from its start lists the
        children anew, so it is opened once and read with C{pread}.
        """
        if self._children_fd < 0:
            self._children_fd = os.open(self.children, os.O_RDONLY | os.O_CLOEXEC)
        chunks = [os.pread(self._children_fd, _CHILDREN_READ, 0)]
        while len(chunks[-1]) == _CHILDREN_READ:
            chunks.append(os.pread(self._children_fd, _CHILDREN_READ, _CHILDREN_READ * len(chunks)))
        return b"".join(chunks)

    def _run(self) -> None:
        try:
            self.tid = threading.get_native_id()
            self.children = f"/proc/self/task/{self.tid}/children"
            if self._owner.batch_threads:
                _batch_thread()
        finally:
            # The reactor thread waits for this.
            self._started.set()
        owner = self._owner
        libc = owner._libc
        attr = owner._attr
        requests = owner._requests
        while True:
            request = requests.get()
            if request is None:
                return
            request.thread = self
            pid = ctypes.c_int(0)
            try:
                result = libc.spawn(ctypes.byref(pid), request.path, request.actions, attr, request.argv, request.envp)
            except BaseException:
                result = errno.EINVAL
            # From here on the GIL is released only where this thread has to
            # wait (a reap), or on an error: see _Libc.
            libc.fa_destroy(request.actions)
            with request.lock:
                request.returned = True
                request.spawn_failed = result != 0
                fd, request.release_fd = request.release_fd, None
                early = request.early_status
            if fd is not None:
                libc.close(fd)
            if result == 0 and request.abandoned:
                try:
                    os.killpg(pid.value, 9)
                except OSError:
                    pass
                try:
                    os.waitpid(pid.value, 0)
                except OSError:
                    pass
            elif result != 0 and not request.abandoned:
                try:
                    request.reactor.callFromThread(owner._spawn_error, request, result)
                except BaseException:
                    pass
            elif early is not None:
                # The exec worked: the exit reaped before we got here was
                # the script's own.
                try:
                    request.reactor.callFromThread(request.handler.exitedEarly, early)
                except BaseException:
                    pass
            try:
                request.gate.renew(libc)
            except OSError:
                # The gate is lost (its directory removed?): spawn some
                # other way from now on.
                owner.broken = True
            else:
                request.release_gate()
            # Not kept alive (with its handler, the worker) until the next
            # request comes.
            del request
            owner._thread_done()


class DirectSpawner:
    """
    Spawn processes with C{posix_spawn} and a gate (see the module
    docstring). L{spawn} is called on the reactor thread and returns at
    once; the L{SpawnHandler} hears the rest there.

    @ivar broken: set when the FIFOs cannot be used: the caller should
        spawn some other way.
    """

    def __init__(self) -> None:
        self._libc = _Libc()
        self._requests: _queue.SimpleQueue[_Request | None] = _queue.SimpleQueue()
        self._threads: list[_SpawnThread] = []
        self._count_lock = threading.Lock()
        self._idle_count = 0
        self._backlog = 0
        self._gates: list[_Gate] = []
        self._free_gates: list[_Gate] = []
        self._gate_lock = threading.Lock()
        #: pid -> the thread whose child was given it, until reaped.
        self._given: dict[int, _SpawnThread] = {}
        #: Spawns made with C{hold} that did not go on nor end yet.
        self.holding = 0
        self._dir: str | None = None
        self._attr = ctypes.create_string_buffer(_STRUCT_SIZE)
        self._attr_ready = False
        #: Whether the spawn threads run as C{SCHED_BATCH} (see
        #: L{_batch_thread}): only where the daemon runs with the default
        #: policy, which the children then set back.
        self.batch_threads = False
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
        for _ in self._threads:
            self._requests.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._idle_count = 0
        self._backlog = 0
        self.holding = 0
        self._gates = []
        self._free_gates = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _make_attr(self) -> None:
        """
        Spawn attributes: new session, no signal blocked, signals we ignore
        back to their default. Where the reactor thread runs with the
        default scheduling policy, the spawn threads run as C{SCHED_BATCH}
        and the children set the default policy back before anything else,
        so that workers are scheduled as if the reactor thread had spawned
        them. Any other policy (the daemon started with C{chrt}, say) is
        left to be inherited as it is.
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
        try:
            default_policy = os.sched_getscheduler(0) == os.SCHED_OTHER
            if default_policy:
                # What each child does first: make sure it is allowed (a
                # seccomp filter could refuse it, failing every spawn).
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except (AttributeError, OSError):
            default_policy = False
        if default_policy and libc.attr_setschedpolicy(attr, os.SCHED_OTHER) == 0:
            # The priority (0, the only one of SCHED_OTHER) is the
            # attributes' initial one.
            flags |= _POSIX_SPAWN_SETSCHEDULER
            self.batch_threads = True
        _check(libc.attr_setflags(attr, flags), "posix_spawnattr_setflags")
        self._attr_ready = True

    def _take_gate(self) -> _Gate:
        """
        A free gate (a new one if none is free).
        """
        with self._gate_lock:
            if self._free_gates:
                return self._free_gates.pop()
        if self._dir is None:
            parent = _fifo_parent()
            _remove_stale(parent)
            self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=parent)
            # The spawn threads are daemon threads: nothing else ends them.
            atexit.register(shutil.rmtree, self._dir, True)
        gate = _Gate(self._dir, len(self._gates))
        self._gates.append(gate)
        return gate

    def _free_gate(self, gate: _Gate) -> None:
        with self._gate_lock:
            self._free_gates.append(gate)

    def _reserve_thread(self) -> None:
        """
        Make sure a spawn thread will take the next request: an idle one,
        a new one, or (with L{MAX_THREADS} busy) the first to be done.
        """
        with self._count_lock:
            if self._idle_count > 0:
                self._idle_count -= 1
                return
            if len(self._threads) >= MAX_THREADS:
                self._backlog += 1
                return
        self._threads.append(_SpawnThread(self, len(self._threads)))

    def _thread_done(self) -> None:
        """
        A spawn thread finished a request: it takes a waiting one, or idles.
        """
        with self._count_lock:
            if self._backlog > 0:
                self._backlog -= 1
            else:
                self._idle_count += 1

    def spawn(
        self,
        reactor: Any,
        executable: str,
        args: list[str],
        env: dict[str, str],
        fdmap: dict[int, int],
        cwd: str,
        log_fd: int,
        line: Callable[[int], bytes],
        niceness: int,
        handler: SpawnHandler,
        owned: list[int],
        hold: bool = False,
    ) -> "_Request":
        """
        Start C{executable} (a path) with C{args} and C{env}, child fds from
        C{fdmap} (child fd -> our fd; nothing else is inherited), in C{cwd},
        in a new session, at C{niceness}; C{line(pid)} is appended to
        C{log_fd} before it runs. Returns at once, with the spawn's ticket
        (for L{go} and L{cancel}); C{handler} hears the rest, on the
        reactor thread, never before this returned.

        @param owned: our fds to close once the child has its copies (or
            the spawn failed); C{log_fd} may be one of them, it is closed
            after the start line is written. They are closed here when this
            raises. Every other fd of C{fdmap} must stay open until
            C{handler} heard of the start or the failure.
        @param hold: keep the child at the gate until L{go} (or L{cancel}).

        @raise SpawnFailed: the child could not be started.
        @raise SpawnBusy: with C{hold}, when L{MAX_HELD} spawns are held.
        """
        if hold and self.holding >= MAX_HELD:
            close_all(owned)
            raise SpawnBusy(errno.EAGAIN, f"{MAX_HELD} spawns are held already")
        try:
            if not self._attr_ready:
                self._make_attr()
            gate = self._take_gate()
        except OSError as e:
            self.broken = True
            close_all(owned)
            raise SpawnFailed(e.errno or errno.EIO, f"spawn gate: {e}")
        try:
            cwd_fd = os.open(cwd, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            self._free_gate(gate)
            close_all(owned)
            raise SpawnFailed(e.errno or errno.EIO, f"{cwd}: {e.strerror}")
        owned = owned + [cwd_fd]
        try:
            actions, argv, envp = self._prepare(gate, executable, args, env, fdmap, cwd_fd)
        except BaseException:
            self._free_gate(gate)
            close_all(owned)
            raise
        request = _Request(self, reactor, gate, os.fsencode(executable), actions, argv, envp, log_fd, line,
                           niceness, handler, owned, hold)
        try:
            watch_fd = os.open(gate.fifo_in, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            # The FIFOs were removed (a cleaner of $TMPDIR?).
            self.broken = True
            self._libc.fa_destroy(actions)
            request.close_owned()
            raise SpawnFailed(e.errno or errno.EIO, f"spawn gate: {e}")
        try:
            self._reserve_thread()
        except BaseException as e:
            os.close(watch_fd)
            self._libc.fa_destroy(actions)
            self._free_gate(gate)
            request.close_owned()
            raise SpawnFailed(getattr(e, "errno", None) or errno.EAGAIN, f"spawn thread: {e}")
        request.watcher = _GateWatcher(request, watch_fd)
        if hold:
            self.holding += 1
        else:
            request.watcher.watch()
        self._requests.put(request)
        return request

    def _unhold(self, request: "_Request") -> None:
        """
        A held spawn goes on or ends: it no longer waits, nor counts as
        held.
        """
        if request.hold:
            request.hold = False
            self.holding -= 1

    def go(self, request: "_Request") -> None:
        """
        Let a held spawn go on: at once if its child is at the gate, else
        as soon as it gets there.
        """
        self._unhold(request)
        if request.state == _WAITING:
            self._watch(request)

    def _watch(self, request: "_Request") -> None:
        """
        A spawn made without watching its gate (a held one) goes on or is
        cancelled: deal with its child now if it is at the gate, else watch
        for it to get there.
        """
        watcher = request.watcher
        if watcher is None or watcher.registered:
            return
        if watcher.hung_up():
            watcher.close()
            self._at_gate(request)
        else:
            watcher.watch()

    def cancel(self, request: "_Request") -> None:
        """
        Give up a spawn that has not started: its child is killed at the
        gate (at once if it is there), before anything of the script ran,
        and reaped by its spawn thread. Its handler hears nothing more; our
        copies of its fds are closed.
        """
        self._unhold(request)
        if request.state == _WAITING:
            request.cancelled = True
            self._watch(request)

    def _prepare(
        self,
        gate: _Gate,
        executable: str,
        args: list[str],
        env: dict[str, str],
        fdmap: dict[int, int],
        cwd_fd: int,
    ) -> tuple["ctypes.Array[ctypes.c_char]", "ctypes.Array[ctypes.c_char_p]", "ctypes.Array[ctypes.c_char_p]"]:
        """
        The file actions, C{argv} and C{envp} of a spawn.

        @raise SpawnFailed: the C library refused an action.
        """
        libc = self._libc
        actions = ctypes.create_string_buffer(_STRUCT_SIZE)
        if libc.fa_init(actions) != 0:
            raise SpawnFailed(errno.ENOMEM, "posix_spawn_file_actions_init failed")
        try:
            # First, while every fd of ours is still there.
            _check(libc.fa_fchdir(actions, cwd_fd), "addfchdir")
            if min(fdmap.values()) > max(fdmap):
                # No source is also a target: plain dup2s, in any order.
                for target, source in fdmap.items():
                    _check(libc.fa_dup2(actions, source, target), "adddup2")
            else:
                sources = [(fd, True) for fd in set(fdmap.values())]
                for action in _twprocess._getFileActions(sources, fdmap, doClose=0, doDup2=1):
                    if action[0] == 1:
                        _check(libc.fa_dup2(actions, action[1], action[2]), "adddup2")
                    else:
                        _check(libc.fa_close(actions, action[1]), "addclose")
            # Every other fd closed, so that the FIFOs land on fd 5.
            _check(libc.fa_closefrom(actions, _FD_GATE), "addclosefrom")
            _check(libc.fa_open(actions, _FD_GATE, gate.fifo_in, os.O_WRONLY, 0), "addopen")
            _check(libc.fa_close(actions, _FD_GATE), "addclose")
            _check(libc.fa_open(actions, _FD_GATE, gate.fifo_out, os.O_WRONLY, 0), "addopen")
            _check(libc.fa_close(actions, _FD_GATE), "addclose")
            argv = _cstrings([a.encode(_ENCODING, _ERRORS) for a in args])
            envp = _cstrings(_environ(env))
        except BaseException as e:
            libc.fa_destroy(actions)
            if isinstance(e, OSError) and not isinstance(e, SpawnFailed):
                raise SpawnFailed(e.errno or errno.EIO, str(e))
            raise
        return actions, argv, envp

    def _at_gate(self, request: _Request) -> None:
        """
        The child of C{request} is at the gate (FIFO C{in} hung up): set it
        up, let it go on.
        """
        if request.state != _WAITING:
            return
        if request.cancelled:
            try:
                pid = self._find_child(request)
            except OSError:
                pid = None
            self._kill_at_gate(request, pid)
            return
        self._set_up(request)

    def _kill_at_gate(self, request: _Request, pid: int | None) -> None:
        """
        Give up the child at the gate before anything of it runs: killed
        there (its spawn thread reaps it), or, when its pid cannot be told,
        let go with its exec made to fail (see L{_Request.let_go}).
        """
        request.state = _CANCELLED
        request.abandoned = True
        if pid is None:
            self._let_go(request)
        else:
            self.forget(pid)
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        request.close_owned()

    def _let_go(self, request: _Request) -> OSError | None:
        """
        Open the gate; the error if it cannot be (the child then fails
        before its exec).
        """
        try:
            request.let_go()
        except OSError as e:
            self.broken = True
            request.abandoned = True
            return e
        return None

    def _set_up(self, request: _Request) -> None:
        """
        Find the child at the gate, set it up and let it go; tell the
        handler.
        """
        # A held spawn is looked at only once it goes (or is cancelled).
        assert not request.hold
        pid: int | None = None
        try:
            pid = self._find_child(request)
            if pid is not None:
                os.setpriority(os.PRIO_PROCESS, pid, request.niceness)
                os.write(request.log_fd, request.line(pid))
        except OSError as e:
            error: OSError | None = e
        else:
            error = None if pid is not None else OSError(errno.ESRCH, "the spawned child cannot be found")
        request.abandoned = error is not None
        if pid is not None and request.abandoned:
            # The spawn thread reaps it.
            self.forget(pid)
        gate_error = self._let_go(request)
        error = error or gate_error
        request.close_owned()
        if error is not None:
            request.state = _FAILED
            request.handler.spawnFailed(SpawnFailed(error.errno or errno.EIO, f"cannot set the child up: {error}"))
            return
        assert pid is not None
        request.state = _STARTED
        request.pid = pid
        request.handler.spawnStarted(pid)

    def _spawn_error(self, request: _Request, code: int) -> None:
        """
        The spawn thread's C{posix_spawn} failed with C{code}: before the
        gate (nothing ran), or in the exec itself.
        """
        if request.state == _WAITING:
            request.state = _FAILED
            self._unhold(request)
            if request.watcher is not None:
                request.watcher.close()
            request.close_owned()
            if not request.cancelled:
                request.handler.spawnFailed(SpawnFailed(code, os.strerror(code)))
        elif request.state == _STARTED and request.pid is not None:
            # The C library reaped it.
            self.forget(request.pid)
            request.handler.execFailed(request.pid, code)

    def _find_child(self, request: _Request) -> int | None:
        """
        The child at the gate: the newest child of the spawn thread (the
        kernel lists a thread's children oldest first; orphans are given to
        the main thread, never to a spawn thread, which only makes workers),
        unless that one was given its pid at an earlier gate (the child at
        this gate is gone then): L{None}.
        """
        thread = request.thread
        if thread is None:
            return None
        pids = [int(p) for p in thread.list_children().split()]
        if not pids:
            _log.warn("spawn: no child listed for thread {tid}", tid=thread.tid)
            return None
        pid = pids[-1]
        if pid in thread.given:
            _log.warn("spawn: newest child {pid} of thread {tid} already started ({pids}; {given})",
                      pid=pid, tid=thread.tid, pids=pids, given=sorted(thread.given))
            return None
        thread.given.add(pid)
        self._given[pid] = thread
        return pid

    def early_exit(self, request: "_Request", status: int) -> bool:
        """
        The child of C{request} was reaped with exit status 127: if its spawn
        has not returned yet, or returned the exec's failure that the reactor
        has not heard yet, the exec itself may have failed (the C library
        would have reaped it, and C{execFailed} reports why). Then keep the
        status and return True: the handler hears either C{execFailed} or,
        when the exec worked, C{exitedEarly(status)}.
        """
        with request.lock:
            if request.returned and not request.spawn_failed:
                return False
            request.early_status = status
            return True

    def forget(self, pid: int) -> None:
        """
        The child C{pid} started by this spawner was reaped: its pid may be
        given to a new child.
        """
        thread = self._given.pop(pid, None)
        if thread is not None:
            thread.given.discard(pid)
