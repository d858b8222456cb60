"""
Launching one queue script for one message, and watching it (script-api.md).

A worker is the script itself, started by L{rqtwisted.spawn.DirectSpawner}
in its own session (so its own process group), in its job directory, at
nice 19, with C{stdio.log} (opened here) on fds 1 and 2 and its C{RQ START}
line written before the script runs. It is wrapped in a Twisted process
transport like any other child.

Where that is not available (not Linux, an older C library), or when it
fails, the worker is started through a tiny C{/bin/sh} launcher spawned with
C{posix_spawn} (Twisted's fast path, which needs C{path=None}), in its own
session. The daemon renices it to 19 and then writes a go line on fd 4; only
then does the launcher change into the job directory, open C{stdio.log},
write the C{RQ START} line and C{exec} the script, so the script and
everything it starts run at nice 19, and the worker's pid is the launcher's
pid.

The status pipe (fd 3) is read through L{ReportParser}; the exit is reported
from C{processExited}, after draining what the dead worker left in the pipe,
so a grandchild that keeps fd 3 open cannot delay it.

L{Watchdog} is the orphan policy: a small shell process, in its own session,
that kills every running worker's process group when the daemon dies.
"""

from __future__ import annotations

import _signal as _csignal
import errno
import fcntl
import functools
import os
import shlex
import signal as _signal
import stat
import time
from typing import Any, Callable, Mapping, Protocol

from twisted.internet import process as _twprocess
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted import RQ_VERSION
from rqtwisted.durable import NONBLOCKING
from rqtwisted.message import base_url, dest_queue, dest_url, truthy
from rqtwisted.protocol import Report, ReportParser
from rqtwisted.directprocess import REPLY_FD, STATUS_FD, DirectProcess
from rqtwisted.spawn import DirectSpawner, SpawnBusy, SpawnFailed

_log = Logger()

#: The niceness of every worker.
WORKER_NICENESS = 19

#: Environment variables removed from the worker environment.
_DROPPED_ENV = ("RUBYOPT",)

#: The most bytes read from a dead worker's status pipe before its exit is
#: reported (a grandchild may keep writing; the pipe itself holds 64 KiB).
_DRAIN_LIMIT = 1024 * 1024

#: The shell the launcher and the watchdog run in.
_SH = "/bin/sh"

#: The worker launcher: C{sh -c LAUNCHER rq-worker <job dir> <local time>
#: <real script> <argv...>}, started with stdin, stdout and stderr on
#: C{/dev/null}. It first waits for the daemon's go line on fd 4 (the time
#: for the start line when it differs from C{<local time>}), written
#: once the launcher has been reniced (so the script and all its children
#: start at nice 19), then opens C{stdio.log} itself (creating a file costs
#: the daemon's thread nothing this way); C{$$} is the worker's pid, which
#: C{exec} keeps. Exit status 126 when it cannot get that far.
_LAUNCHER = (
    "IFS= read -r go <&4 || exit 126\n"
    'cd "$1" || exit 126\n'
    "command exec >>stdio.log 2>&1 || exit 126\n"
    "printf '\\n%s - %s - RQ START - %s\\n' \"$$\" \"${go:-$2}\" \"$3\"\n"
    "shift 3\n"
    'exec "$@"\n'
)

#: The watchdog: C{sh -c WATCHDOG rq-watchdog <root> <grace seconds>}, its
#: stdin the read end of a pipe only the daemon writes to. C{stop} means a
#: clean shutdown; end of file without it means the daemon died. Then it
#: first kills the children the daemon left at a spawn gate (not exec'd
#: yet, so still with the daemon's command line, already in a job
#: directory of C{run/}, or of C{que/} for a worker made ready ahead, with
#: no pid file), then every listed worker's group.
_WATCHDOG = """\
trap '' HUP INT TERM QUIT PIPE
dcmd=$(tr '\\0' '\\n' < "/proc/$PPID/cmdline" 2>/dev/null)
line=
IFS= read -r line
[ "$line" = stop ] && exit 0
cd "$1" || exit 1
root=$(pwd -P)
if [ -n "$dcmd" ]; then
  for c in $(find /proc -mindepth 2 -maxdepth 2 -name cwd \\( -lname "$root/queue*/*/run/*/job" -o -lname "$root/queue*/*/que/*/job" \\) 2>/dev/null); do
    p=${c#/proc/}
    p=${p%/cwd}
    [ "$(tr '\\0' '\\n' < "/proc/$p/cmdline" 2>/dev/null)" = "$dcmd" ] && kill -s KILL -- "$p" 2>/dev/null
  done
fi
pids=
for f in queue/*/run/*/pid; do
  [ -f "$f" ] || continue
  p=
  read -r p < "$f"
  case $p in ''|*[!0-9]*) continue ;; esac
  [ "$p" -gt 1 ] && [ "$p" -ne "$$" ] || continue
  kill -s TERM -- "-$p" 2>/dev/null && pids="$pids $p"
done
i=0
while [ -n "$pids" ] && [ "$i" -lt "$2" ]; do
  sleep 1
  i=$((i + 1))
  alive=
  for p in $pids; do
    kill -s 0 -- "-$p" 2>/dev/null && alive="$alive $p"
  done
  pids=$alive
done
for p in $pids; do
  kill -s KILL -- "-$p" 2>/dev/null
done
exit 0
"""


#: Signals the watchdog ignores. They are blocked from its start until its
#: C{trap} ignores them (dash only unblocks signals when it forks, which
#: the watchdog does after its traps).
_WATCHDOG_SIGNALS = frozenset(
    {_signal.SIGHUP, _signal.SIGINT, _signal.SIGTERM, _signal.SIGQUIT}
)


class ScriptError(Exception):
    """
    A queue script cannot be run; C{reason} says why (oper status
    C{SCRIPTERROR}).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Script path -> (its real path, the identity of the file it leads to,
#: the symbolic links met on the way with their targets).
_realpaths: dict[str, tuple[str, tuple[int, int], tuple[tuple[str, str], ...]]] = {}

#: The most symbolic links followed in one path (as the kernel's limit).
_MAX_LINKS = 40


def _resolve_links(path: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """
    The real path of the absolute C{path} (as L{os.path.realpath}) and the
    symbolic links met on the way, each with the target it had.

    @raise OSError: a component is missing or cannot be read, or there are
        too many links.
    """
    links: list[tuple[str, str]] = []
    pending = path.split("/")[::-1]
    resolved = ""
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = resolved.rpartition("/")[0]
            continue
        candidate = f"{resolved}/{part}"
        try:
            target = os.readlink(candidate)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # Not a link.
            resolved = candidate
            continue
        if len(links) >= _MAX_LINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        links.append((candidate, target))
        if target.startswith("/"):
            resolved = ""
        pending.extend(target.split("/")[::-1])
    return resolved or "/", tuple(links)


def _links_unchanged(links: tuple[tuple[str, str], ...]) -> bool:
    """
    Whether every link of C{links} is still there with the same target.
    """
    for link, target in links:
        try:
            if os.readlink(link) != target:
                return False
        except OSError:
            return False
    return True


def resolve_script(script: str, root: str) -> str:
    """
    The real path of a queue's script: relative to C{root} unless absolute,
    symlinks followed as they are now, so that a symlink switched just
    before a launch (a redeploy) applies to that launch.

    The path is walked again whenever the file it leads to is not the one
    it led to last time, or one of the symbolic links met last time is
    gone or leads elsewhere (a C{readlink} of each: usually one, where a
    full walk takes a system call per path component). Releases made of
    hard links (C{cp -al}, C{rsync --link-dest}), whose script is the same
    file under another path, are told apart by the links.

    @raise ScriptError: when it is not an executable regular file.
    """
    if not script:
        raise ScriptError("script not configured")
    path = script if os.path.isabs(script) else os.path.join(root, script)
    try:
        info = os.stat(path)
    except OSError:
        raise ScriptError(f"script not found: {script}")
    identity = (info.st_dev, info.st_ino)
    cached = _realpaths.get(path)
    if cached is not None and cached[1] == identity and _links_unchanged(cached[2]):
        real = cached[0]
    else:
        try:
            real, links = _resolve_links(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
        except OSError:
            raise ScriptError(f"script not found: {script}")
        if len(_realpaths) > 256:
            _realpaths.clear()
        _realpaths[path] = (real, identity, links)
    if not stat.S_ISREG(info.st_mode):
        raise ScriptError(f"script not a regular file: {real}")
    if not os.access(real, os.X_OK):
        raise ScriptError(f"script not executable: {real}")
    return real


#: Characters for which the original ran its command through C{/bin/sh}
#: (Ruby's C{exec} of one string): expansions, globs, operators. Quotes
#: are left out: L{shlex} splits them as the shell does, without a shell.
_SHELL_META = frozenset("*?{}[]<>()~&|\\$;`\n#")


def script_argv(exec_prefix: str | None, real_script: str) -> list[str]:
    """
    The argv that runs C{real_script}: C{exec_prefix} word-split as by
    C{/bin/sh}, then the script path (L{None} means C{bash -lc}; C{""} runs
    the script directly). A prefix that needs the shell itself (a
    variable, a glob, a redirection, a command substitution, or a
    C{NAME=value} first word), as the original ran it, is run by
    C{/bin/sh -c}.

    The path is kept as one word: the original split C{"<prefix> <path>"}
    as a whole, which only differs for paths with blanks or quotes (which it
    could not run).

    @raise ScriptError: when C{exec_prefix} cannot be split (unbalanced
        quotes).
    """
    if exec_prefix is None:
        exec_prefix = "bash -lc"
    prefix = exec_prefix.strip()
    if _needs_shell(prefix):
        return ["/bin/sh", "-c", f"{prefix} {shlex.quote(real_script)}"]
    try:
        words = _split_prefix(prefix)
    except ValueError as e:
        raise ScriptError(f"invalid exec_prefix: {e}")
    return list(words) + [real_script]


def _needs_shell(prefix: str) -> bool:
    """
    Whether C{prefix} needs C{/bin/sh} to mean what it says (see
    L{_SHELL_META}; a first word C{NAME=value} is an assignment).
    """
    if _SHELL_META.intersection(prefix):
        return True
    words = prefix.split(None, 1)
    return bool(words) and "=" in words[0]


@functools.lru_cache(maxsize=64)
def _split_prefix(exec_prefix: str) -> tuple[str, ...]:
    """
    C{exec_prefix} word-split as by C{/bin/sh} (cached: it is split at
    every start).
    """
    return tuple(shlex.split(exec_prefix))


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _valid_env_name(name: Any) -> bool:
    return isinstance(name, str) and name != "" and "=" not in name and "\0" not in name


def worker_environment(
    base_env: Mapping[str, str],
    *,
    host: str,
    port: str | int,
    relative_root: str,
    rq_env: str,
    script: str,
    real_script: str,
    msg: Mapping[str, Any],
    full_msg_id: str,
    job_dir: str,
    env_vars: Any,
) -> "WorkerEnvironment":
    """
    The environment of a worker (script-api.md, "Environment"): C{base_env}
    minus C{RUBYOPT}, the C{RQ_*} table, then the queue's C{env_vars}
    (ignored unless a dict; names starting with C{RQ_} ignored; values made
    strings, L{None} as C{""}, booleans as C{true}/C{false}).

    @param base_env: the daemon's environment (with C{RQ_ENV}, C{TMPDIR}...).
    @param msg: the message's fields (C{msg_id}, C{dest}, C{count}, params,
        C{orig_msg_id}, C{force_remote}).
    @param job_dir: the absolute C{job/} path.
    """
    base = _filtered_base(base_env)
    env = WorkerEnvironment(base)
    env.base = base
    root = relative_root if relative_root.endswith("/") else relative_root + "/"
    dest = _env_value(msg.get("dest"))
    env.update(
        {
            "RQ_VER": RQ_VERSION,
            "RQ_SCRIPT": script,
            "RQ_REALSCRIPT": real_script,
            "RQ_HOST": base_url(host, port, root),
            "RQ_DEST": dest_url(dest, host, port),
            "RQ_DEST_QUEUE": dest_queue(dest),
            "RQ_MSG_ID": _env_value(msg.get("msg_id")),
            "RQ_FULL_MSG_ID": full_msg_id,
            "RQ_MSG_DIR": job_dir,
            "RQ_WRITE": str(STATUS_FD),
            "RQ_READ": str(REPLY_FD),
            "RQ_PIPE": str(STATUS_FD),
            "RQ_COUNT": _env_value(msg.get("count", 0)),
            "RQ_PARAM1": _env_value(msg.get("param1")),
            "RQ_PARAM2": _env_value(msg.get("param2")),
            "RQ_PARAM3": _env_value(msg.get("param3")),
            "RQ_PARAM4": _env_value(msg.get("param4")),
            "RQ_ORIG_MSG_ID": _env_value(msg.get("orig_msg_id")),
            "RQ_ENV": rq_env,
            "RQ_PORT": str(port),
        }
    )
    if truthy(msg.get("force_remote")):
        env["RQ_FORCE_REMOTE"] = "1"
    else:
        env.pop("RQ_FORCE_REMOTE", None)
    overrides = [*_RQ_NAMES]
    if isinstance(env_vars, dict):
        for name, value in env_vars.items():
            if not _valid_env_name(name) or name.startswith("RQ_"):
                continue
            text = _env_value(value)
            if "\0" not in text:
                env[name] = text
                overrides.append(name)
    env.overrides = tuple(overrides)
    return env


#: The C{RQ_*} names L{worker_environment} sets or removes.
_RQ_NAMES = (
    "RQ_VER", "RQ_SCRIPT", "RQ_REALSCRIPT", "RQ_HOST", "RQ_DEST", "RQ_DEST_QUEUE", "RQ_MSG_ID",
    "RQ_FULL_MSG_ID", "RQ_MSG_DIR", "RQ_WRITE", "RQ_READ", "RQ_PIPE", "RQ_COUNT", "RQ_PARAM1",
    "RQ_PARAM2", "RQ_PARAM3", "RQ_PARAM4", "RQ_ORIG_MSG_ID", "RQ_ENV", "RQ_PORT", "RQ_FORCE_REMOTE",
)


class WorkerEnvironment(dict):  # type: ignore[type-arg]
    """
    A worker's environment, as L{worker_environment} makes it: a plain
    C{dict}, which also says which part of it is the daemon's own
    environment (C{base}, the same object for every worker) and which names
    it set on top (C{overrides}), so that the spawner can encode the
    daemon's part once (L{rqtwisted.spawn}).
    """

    base: Mapping[str, str] | None = None
    overrides: tuple[str, ...] = ()


#: id(base environment) -> (that environment, it without L{_DROPPED_ENV}).
_bases: dict[int, tuple[Mapping[str, str], dict[str, str]]] = {}


def _filtered_base(base_env: Mapping[str, str]) -> dict[str, str]:
    """
    C{base_env} without L{_DROPPED_ENV}, made once per environment object
    (the daemon's is made once and never changed).
    """
    cached = _bases.get(id(base_env))
    if cached is None or cached[0] is not base_env or len(cached[0]) != len(base_env):
        if len(_bases) > 16:
            _bases.clear()
        cached = _bases[id(base_env)] = (base_env, {k: v for k, v in base_env.items() if k not in _DROPPED_ENV})
    return cached[1]


class WorkerEvents(Protocol):
    """
    What a worker tells its owner (the queue service).
    """

    def reportReceived(self, report: Report) -> None:
        """
        The worker wrote one line on fd 3.
        """

    def reportsReceived(self, reports: list[Report]) -> None:
        """
        The worker wrote these lines on fd 3, read at once. Optional: owners
        without it get each through L{reportReceived}; owners with it (the
        queue writes the status text once per read) get only this.
        """

    def workerExited(self, exit_code: int | None, signal: int | None) -> None:
        """
        The worker exited (C{exit_code}) or was killed (C{signal}); called
        exactly once, after every report it wrote.
        """

    def workerStarted(self, pid: int) -> None:
        """
        The worker got its pid after the spawn returned (L{Worker.pid} was
        L{None} until now); called before any of its reports. Optional:
        owners without it learn the pid from L{Worker.pid}.
        """


class _NoEvents:
    """
    The L{WorkerEvents} of a worker given up before it started: none.
    """

    def reportReceived(self, report: Report) -> None:
        pass

    def workerExited(self, exit_code: int | None, signal: int | None) -> None:
        pass

    def workerStarted(self, pid: int) -> None:
        pass


_NO_EVENTS = _NoEvents()


class WorkerProtocol(ProcessProtocol):
    """
    Watch one worker: reports from fd 3, dup replies to fd 4, the exit.

    The exit is taken from C{processExited}, not C{processEnded} (which waits
    for every copy of the pipes to close, so for the worker's grandchildren):
    the pipe is drained, the parser flushed, our pipe ends closed, and then
    L{WorkerEvents.workerExited} is called, once. Later reports are ignored.

    @ivar exited: whether the exit has been recorded.
    @ivar exit_code: the exit status, or L{None} (not exited, or signalled).
    @ivar exit_signal: the signal that killed the worker, if any.
    """

    def __init__(self, events: WorkerEvents) -> None:
        self._events = events
        self._parser = ReportParser()
        self._held: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = None
        self.pid: int | None = None
        self._signals: list[int] = []
        self.exited = False
        self.exit_code: int | None = None
        self.exit_signal: int | None = None

    def started(self, pid: int) -> None:
        """
        The worker started with pid C{pid} after its spawn returned: tell
        the events (L{WorkerEvents.workerStarted}, where they have it) and
        send the signals asked for meanwhile.
        """
        self.pid = pid
        notify = getattr(self._events, "workerStarted", None)
        if notify is not None:
            self._emit(notify, pid)
        signals, self._signals = self._signals, []
        for sig in signals:
            self.signal(sig)

    def signal(self, sig: int) -> None:
        """
        Send C{sig} to the worker's process group, once it has a pid; a
        group that is gone is ignored.
        """
        if self.pid is None:
            if not self.exited:
                self._signals.append(sig)
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def silence(self) -> None:
        """
        Deliver no more events (the worker was given up before it started).
        """
        self._events = _NO_EVENTS
        self._held = None

    def _hold(self) -> None:
        """
        Queue events until L{_release} (while the spawn has not returned).
        """
        self._held = []

    def _release(self) -> None:
        """
        Deliver the queued events, in order, and stop queueing.
        """
        held, self._held = self._held or [], None
        for call, args in held:
            self._call(call, args)

    def _release_soon(self, reactor: Any) -> None:
        """
        Stop queueing; events queued so far are delivered from the reactor
        (after the spawn returned).
        """
        if self._held:
            reactor.callLater(0, self._release)
        else:
            self._held = None

    def _emit(self, call: Callable[..., None], *args: Any) -> None:
        if self._held is not None:
            self._held.append((call, args))
        else:
            self._call(call, args)

    def _call(self, call: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            call(*args)
        except Exception:
            _log.failure("worker event handler failed")

    def _reports(self, reports: list[Report]) -> None:
        if not reports:
            return
        batch = getattr(self._events, "reportsReceived", None)
        if batch is not None:
            self._emit(batch, reports)
            return
        for report in reports:
            self._emit(self._events.reportReceived, report)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """
        Parse fd-3 data into reports (anything else is ignored).
        """
        if childFD != STATUS_FD or self.exited:
            return
        self._reports(self._parser.feed(data))

    def _drain(self) -> bytes:
        """
        Read what is left in the status pipe without blocking.
        """
        pipes = getattr(self.transport, "pipes", None) or {}
        reader = pipes.get(STATUS_FD)
        if reader is None:
            return b""
        try:
            fd = reader.fileno()
            if not getattr(reader, "nonblocking", False):
                os.set_blocking(fd, False)
        except (OSError, ValueError):
            return b""
        chunks: list[bytes] = []
        total = 0
        while total < _DRAIN_LIMIT:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def _go(self, stamp: str = "") -> None:
        """
        Let the launcher go on: one line on fd 4, written at once (not
        through the transport's buffer): the time for its C{RQ START} line,
        or empty for the one it was started with. A worker already gone is
        ignored.
        """
        pipes = getattr(self.transport, "pipes", None) or {}
        writer = pipes.get(REPLY_FD)
        if writer is None:
            return
        try:
            os.write(writer.fileno(), stamp.encode() + b"\n")
        except OSError:
            pass

    def processExited(self, reason: Failure) -> None:
        """
        Record the exit given as a Twisted reason (see L{exitReceived}).
        """
        value = reason.value
        if isinstance(value, ProcessDone):
            self.exitReceived(0, None)
        else:
            self.exitReceived(getattr(value, "exitCode", None), getattr(value, "signal", None))

    def exitReceived(self, exit_code: int | None, signal: int | None) -> None:
        """
        Record the exit: drain fd 3, flush the last partial line, close our
        pipe ends, tell the events (once).
        """
        if self.exited:
            return
        reports = self._parser.feed(self._drain())
        reports += self._parser.close()
        self._reports(reports)
        self.exited = True
        self.exit_code, self.exit_signal = exit_code, signal
        transport = self.transport
        if transport is not None:
            for fd in (STATUS_FD, REPLY_FD):
                try:
                    transport.closeChildFD(fd)
                except Exception:
                    _log.failure("closing worker fd {fd}", fd=fd)
        self._emit(self._events.workerExited, self.exit_code, self.exit_signal)
        # Nothing more is delivered nor written. The events (bound to the
        # job, which holds the worker) and the transport (which holds us)
        # are dropped, so that reference counting frees the whole worker.
        self._events = _NO_EVENTS
        self.transport = None

    def processEnded(self, reason: Failure) -> None:
        """
        Normally the exit was recorded already; make sure it is.
        """
        self.processExited(reason)

    def reply(self, line: str) -> None:
        """
        Write C{line} and a newline to the worker's fd 4 (ignored once it
        exited or closed fd 4).
        """
        if self.exited or self.transport is None:
            return
        data = (line.replace("\n", " ") + "\n").encode("utf-8")
        try:
            self.transport.writeToChild(REPLY_FD, data)
        except KeyError:
            pass


class Worker:
    """
    A running (or finished) worker, as returned by L{spawn_worker}.
    """

    def __init__(self, pid: int | None, protocol: WorkerProtocol) -> None:
        self._protocol = protocol
        if pid is not None:
            protocol.pid = pid
        #: Spawned with C{hold}: waiting at its gate for L{go}.
        self.waiting = False
        self._go: Callable[[], None] = _nothing
        self._cancel: Callable[[], None] = _nothing

    def _use(self, go: Callable[[], None], cancel: Callable[[], None]) -> None:
        """
        How L{go} and L{cancel} reach the process the worker is now.
        """
        self._go, self._cancel = go, cancel

    def go(self) -> None:
        """
        Let a worker spawned with C{hold} run its script (its C{RQ START}
        line is written now); its pid comes with
        L{WorkerEvents.workerStarted} where it is not known yet.
        """
        if self.waiting:
            self.waiting = False
            self._go()

    def cancel(self) -> None:
        """
        Give up a worker spawned with C{hold} that was not let go: it is
        killed before anything of its script ran, and no event is
        delivered for it.
        """
        if self.waiting:
            self.waiting = False
            self._protocol.silence()
            self._cancel()

    @property
    def pid(self) -> int | None:
        """
        The worker's pid, also its process group and session id; L{None}
        until it started (see L{WorkerEvents.workerStarted}).
        """
        return self._protocol.pid

    @property
    def exited(self) -> bool:
        """
        Whether the worker's exit has been recorded.
        """
        return self._protocol.exited

    def reply(self, line: str) -> None:
        """
        Send one reply line to the worker (fd 4).
        """
        self._protocol.reply(line)

    def signal(self, sig: int) -> None:
        """
        Send C{sig} to the worker's process group (so also its children);
        a group that is gone is ignored; a worker that has not started yet
        gets it when it does.

        This still reaches grandchildren after the worker itself exited.
        """
        self._protocol.signal(sig)

    def __repr__(self) -> str:
        return f"<Worker pid={self.pid} exited={self.exited}>"


def _nothing() -> None:
    pass


class _SessionProcess(_twprocess.Process):
    """
    A Twisted process that leads a new session (so a new process group),
    optionally runs at a given niceness, and may start with some signals
    blocked (posix_spawn) or ignored (fork path).

    Spawned with C{posix_spawnp(..., setsid=True)} where available, else
    with Twisted's fork path plus C{setsid()} in the child.
    """

    def __init__(
        self,
        reactor: Any,
        executable: str,
        args: list[str],
        environment: dict[str, str],
        proto: ProcessProtocol,
        childFDs: dict[int, Any],
        niceness: int | None = None,
        blockedSignals: frozenset[int] = frozenset(),
    ) -> None:
        self._niceness = niceness
        self._blocked = blockedSignals
        #: The pid, kept: C{pid} becomes L{None} once the process is reaped,
        #: which can happen before the constructor returns.
        self.spawnedPid: int | None = None
        super().__init__(
            reactor, executable, args, environment, None, proto, childFDs=childFDs
        )

    def _fork(self, *args: Any, **kwargs: Any) -> None:
        super()._fork(*args, **kwargs)
        self.spawnedPid = self.pid

    def _renice(self) -> None:
        if self._niceness is None or self.pid is None:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, self.pid, self._niceness)
        except OSError as e:
            _log.warn("cannot renice {pid}: {error}", pid=self.pid, error=e)

    def _trySpawnInsteadOfFork(
        self,
        path: Any,
        uid: Any,
        gid: Any,
        executable: str,
        args: list[str],
        environment: dict[str, str] | None,
        kwargs: dict[str, Any],
    ) -> bool:
        # Twisted's Process._trySpawnInsteadOfFork plus setsid=True.
        if (
            getattr(os, "posix_spawnp", None) is None
            or uid is not None
            or gid is not None
            or path is not None
            or getattr(self._reactor, "_neverUseSpawn", False)
        ):
            return False
        fdmap = kwargs.get("fdmap")
        fdState = []
        for eachFD in _twprocess._listOpenFDs():
            try:
                isCloseOnExec = _twprocess.fcntl.fcntl(
                    eachFD, _twprocess.fcntl.F_GETFD, _twprocess.fcntl.FD_CLOEXEC
                )
            except OSError:
                pass
            else:
                fdState.append((eachFD, isCloseOnExec))
        if environment is None:
            environment = dict(os.environ)
        # _signal.getsignal: signal.getsignal's enum wrapping costs 0.1 ms.
        ignored = _csignal.SIG_IGN
        getsignal = _csignal.getsignal
        setSigDef = [
            everySignal
            for everySignal in range(1, _signal.NSIG)
            if getsignal(everySignal) == ignored
        ]
        try:
            self.pid = os.posix_spawnp(
                executable,
                args,
                environment,
                file_actions=_twprocess._getFileActions(
                    fdState,
                    fdmap,
                    doClose=_twprocess._PS_CLOSE,
                    doDup2=_twprocess._PS_DUP2,
                ),
                setsigdef=setSigDef,
                setsigmask=self._blocked,
                setsid=True,
            )
        except NotImplementedError:
            # No POSIX_SPAWN_SETSID in this libc: use the fork path.
            return False
        self.status = -1
        # posix_spawn returns once the launcher is exec'd; it waits for the
        # go line before it execs the script.
        self._renice()
        return True

    def _setupChild(self, fdmap: dict[int, int]) -> None:
        # The fork path (runs in the child).
        os.setsid()
        super()._setupChild(fdmap)
        for sig in self._blocked:
            _signal.signal(sig, _signal.SIG_IGN)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
        if self._niceness is not None:
            os.setpriority(os.PRIO_PROCESS, 0, self._niceness)


def _exec_failed(executable: str, cwd: str) -> Callable[[DirectProcess, int], None]:
    """
    What to do when the exec of a directly spawned worker failed after the
    spawn returned: say so in its C{stdio.log} (it then exits 127).
    """

    def report(process: DirectProcess, code: int) -> None:
        try:
            fd = os.open(os.path.join(cwd, "stdio.log"), os.O_WRONLY | os.O_APPEND | NONBLOCKING)
        except OSError:
            return
        try:
            os.write(fd, os.fsencode(f"rq: {executable}: {os.strerror(code)}\n"))
        except OSError:
            pass
        finally:
            os.close(fd)

    return report


#: The L{DirectSpawner} of this process: L{None} until first needed, then
#: L{False} where it cannot be used.
_direct: DirectSpawner | bool | None = None


def _direct_spawner() -> DirectSpawner | None:
    """
    The process-wide L{DirectSpawner}, if this system can use one.
    """
    global _direct
    if _direct is None:
        _direct = DirectSpawner() if DirectSpawner.available() else False
    return _direct or None


def _find_executable(name: str, env: Mapping[str, str]) -> str | None:
    """
    Where C{exec} finds C{name} with the worker's C{PATH} (a name with a
    slash is used as it is), or L{None} (left to the launcher's shell, which
    also reports it).
    """
    if "/" in name:
        return name
    for directory in env.get("PATH", os.defpath).split(":"):
        if not os.path.isabs(directory):
            continue
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    return None


#: path -> (file identity, whether C{exec} runs it by itself).
_executables: dict[str, tuple[tuple[int, int, int, int], bool]] = {}


def _directly_executable(path: str) -> bool:
    """
    Whether C{exec} can run C{path} by itself: a C{#!} script or an ELF
    binary. A shell runs anything else as a shell script, so that is left
    to the launcher. The answer is kept while the file's identity (device,
    inode, size, modification time) stays the same.
    """
    try:
        info = os.stat(path)
    except OSError:
        return False
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    cached = _executables.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        with open(path, "rb", buffering=0) as f:
            magic = f.read(4)
    except OSError:
        return False
    result = magic.startswith(b"#!") or magic == b"\x7fELF"
    if len(_executables) > 256:
        _executables.clear()
    _executables[path] = (key, result)
    return result


#: A C{/dev/null} fd for the workers' stdin (and the launcher's stdio),
#: opened once.
_devnull: int | None = None


def _devnull_fd() -> int:
    """
    The daemon's C{/dev/null} fd: workers' stdin, the launcher's stdio.
    """
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _devnull


def _spawn_direct(
    reactor: Any,
    spawner: DirectSpawner,
    protocol: WorkerProtocol,
    argv: list[str],
    env: dict[str, str],
    job_dir: str,
    line: Callable[[int], bytes],
    fallback: Callable[[], None],
    hold: bool = False,
    log_dir: str | None = None,
) -> DirectProcess | None:
    """
    Start the script itself (see L{DirectSpawner}) with a L{DirectProcess}
    transport, held at the gate with C{hold}; the process if it is under
    way (a failed exec is told in C{stdio.log} of C{log_dir}, by default
    C{job_dir}). Its pid comes later, through L{WorkerProtocol.started}; if it
    turns out it could not be started that way, C{fallback} is called (the
    launcher then tries, and fails the way a shell does).

    @raise SpawnBusy: C{hold} was asked for and too many spawns are held.
    """
    executable = _find_executable(argv[0], env) if argv else None
    if executable is None or not _directly_executable(executable):
        return None
    # (Not waiting on a FIFO a script left there: see NONBLOCKING. The
    # worker gets the file as a plain one again.)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | NONBLOCKING
    try:
        log_fd = os.open(os.path.join(job_dir, "stdio.log"), flags, 0o644)
    except OSError:
        return None
    try:
        fcntl.fcntl(log_fd, fcntl.F_SETFL, os.O_APPEND)
    except OSError:
        os.close(log_fd)
        return None

    def failed(error: SpawnFailed) -> None:
        _log.debug("direct spawn of {argv} failed ({error}); using the launcher", argv=argv, error=error)

    def fall_back(error: SpawnFailed) -> None:
        failed(error)
        fallback()

    process = DirectProcess(reactor, protocol, fall_back, _exec_failed(executable, log_dir or job_dir))
    try:
        process.start(spawner, executable, argv, env, job_dir, _devnull_fd(), log_fd, line, WORKER_NICENESS, hold)
    except SpawnBusy:
        # Not a failure to start: too many are held; the caller starts it later.
        raise
    except SpawnFailed as e:
        failed(e)
        return None
    return process


#: C{spawner(reactor, protocol, executable, args, env, childFDs) -> pid}:
#: starts the process, connects C{protocol} to its transport, returns its pid
#: (childFDs as for C{IReactorProcess.spawnProcess}).
Spawner = Callable[
    [Any, ProcessProtocol, str, list[str], dict[str, str], dict[int, Any]], int
]


def _spawn_session_process(
    reactor: Any,
    protocol: ProcessProtocol,
    executable: str,
    args: list[str],
    env: dict[str, str],
    childFDs: dict[int, Any],
) -> int:
    """
    The default spawner: a L{_SessionProcess} at L{WORKER_NICENESS}.
    """
    process = _SessionProcess(
        reactor, executable, args, env, protocol, childFDs, WORKER_NICENESS
    )
    assert process.spawnedPid is not None
    return process.spawnedPid


def kill_leftover(pid: int, job_dir: str) -> bool:
    """
    Kill the worker a previous daemon left running in C{job_dir}, with its
    whole process group (C{SIGKILL}): the process C{pid}, if it still runs
    with that directory as its working directory (a pid used again by an
    unrelated process is left alone). Before its message runs again, so
    that it never runs twice at once, whatever left the worker behind (a
    watchdog killed together with its daemon, say).

    @return: whether such a worker was found and killed.
    """
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    if cwd != os.path.realpath(job_dir):
        return False
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, _signal.SIGKILL)
        except OSError:
            continue
        _log.warn("killed worker {pid} left running in {job_dir}", pid=pid, job_dir=job_dir)
        return True
    return False


def start_line_time(now: float) -> str:
    """
    The local time of the C{RQ START} line, as Ruby's C{Time#to_s} writes
    it: C{2024-01-31 13:45:10 +0100}.
    """
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now))


def spawn_worker(
    reactor: Any,
    *,
    argv: list[str],
    env: dict[str, str],
    job_dir: str,
    real_script: str,
    events: WorkerEvents,
    now: float | None = None,
    spawner: Spawner | None = None,
    hold: bool = False,
    go_dir: str | None = None,
) -> Worker:
    """
    Start one worker.

    The worker runs C{argv} with environment C{env} in C{job_dir}, stdin on
    C{/dev/null}, stdout and stderr appended to C{job_dir/stdio.log} after
    the C{RQ START} line, fd 3 the status pipe, fd 4 the reply pipe, at nice
    19, leading its own session.

    Events are never delivered before this returns (not even for a worker
    that exits at once).

    With C{hold}, the worker is made ready but waits (L{Worker.waiting})
    before anything of the script runs, until L{Worker.go}, or until
    L{Worker.cancel} kills it. Its C{RQ START} line is written when it goes.
    If its job directory is renamed meanwhile, C{go_dir} says where it is
    by then (a worker that enters it only when it goes needs it).

    @param argv: from L{script_argv}.
    @param env: from L{worker_environment}.
    @param job_dir: the message's C{job/} directory (must exist).
    @param real_script: the resolved script path (for the C{RQ START} line).
    @param now: the time of the C{RQ START} line (default: now).
    @param spawner: how to start the process through the launcher (for
        tests); it must have reniced the process when it returns. By default
        the script is started directly (L{rqtwisted.spawn.DirectSpawner})
        where possible, and through the launcher otherwise or when that
        fails.

    @raise OSError: when the spawn fails (e.g. no more processes or fds);
        nothing is running then. A job dir that cannot be entered or a
        C{stdio.log} that cannot be opened makes the worker exit 126; a
        command that cannot be found or run, 127 (the reason is in
        C{stdio.log}).
    @raise SpawnBusy: C{hold} was asked for and too many spawns are held
        (a L{SpawnFailed}, so an L{OSError}); nothing is running.
    """
    job_dir = os.path.abspath(job_dir)
    stamp = start_line_time(time.time() if now is None else now)
    protocol = WorkerProtocol(events)
    protocol._hold()
    worker = Worker(None, protocol)
    worker.waiting = hold
    # The launcher enters its directory only when it goes.
    launch_dir = os.path.abspath(go_dir) if hold and go_dir else job_dir

    def stamp_now() -> str:
        # The time of a held worker's start line: when it goes.
        return stamp if now is not None else start_line_time(time.time())

    def go_now() -> None:
        protocol._go(stamp_now())

    direct = _direct_spawner() if spawner is None else None
    if direct is not None and not direct.broken:
        script = os.fsencode(real_script)

        def line(pid: int) -> bytes:
            # Written when the worker goes: a held one has its time then.
            when = stamp_now() if hold else stamp
            return b"\n%d - %s - RQ START - %s\n" % (pid, when.encode(), script)

        def fallback() -> None:
            try:
                pid = _spawn_launcher(reactor, protocol, argv, env, launch_dir, stamp, real_script, None,
                                      go=not worker.waiting)
            except OSError as e:
                # As when the spawn fails at once: the message ends in err.
                worker.waiting = False
                protocol._reports([Report("err", f"could not start the queue script: {e}")])
                protocol.exitReceived(127, None)
                return
            worker._use(go_now, functools.partial(protocol.signal, _signal.SIGKILL))
            protocol.started(pid)

        process = _spawn_direct(reactor, direct, protocol, argv, env, job_dir, line, fallback, hold, launch_dir)
        if process is not None:
            # (Its fallback, if it comes to that, comes later: from the reactor.)
            worker._use(process.go, process.cancel)
            protocol._release_soon(reactor)
            return worker
    protocol.pid = _spawn_launcher(reactor, protocol, argv, env, launch_dir, stamp, real_script, spawner, go=not hold)
    worker._use(go_now, functools.partial(protocol.signal, _signal.SIGKILL))
    protocol._release_soon(reactor)
    return worker


def _spawn_launcher(
    reactor: Any,
    protocol: WorkerProtocol,
    argv: list[str],
    env: dict[str, str],
    job_dir: str,
    stamp: str,
    real_script: str,
    spawner: Spawner | None,
    go: bool = True,
) -> int:
    """
    Start the worker through the C{/bin/sh} launcher (see L{_LAUNCHER});
    its pid. Without C{go} it waits for L{WorkerProtocol._go}.

    @raise OSError: the spawn failed.
    """
    if spawner is None:
        spawner = _spawn_session_process
    args = [_SH, "-c", _LAUNCHER, "rq-worker", job_dir, stamp, real_script]
    args += argv
    devnull = _devnull_fd()
    pid = spawner(
        reactor,
        protocol,
        _SH,
        args,
        env,
        {0: devnull, 1: devnull, 2: devnull, STATUS_FD: "r", REPLY_FD: "w"},
    )
    # The launcher has been reniced by now (see _SessionProcess).
    if go:
        protocol._go()
    return pid


class _WatchdogProtocol(ProcessProtocol):
    def __init__(self, watchdog: "Watchdog") -> None:
        self._watchdog = watchdog

    def processEnded(self, reason: Failure) -> None:
        self._watchdog._ended(self, reason)


class Watchdog:
    """
    Kill every worker's process group when the daemon dies.

    A C{/bin/sh} child in its own session (so untouched by signals sent to
    the daemon's process group; it also ignores C{SIGTERM}, C{SIGINT} and
    C{SIGHUP}) blocks reading a pipe only the daemon holds. At end of file
    (the daemon died, even by C{SIGKILL}) it sends C{SIGTERM} to the process
    group of every pid in C{<root>/queue/*/run/*/pid}, gives them C{grace}
    seconds, C{SIGKILL}s what is left and exits. L{stop} ends it without
    killing anything.

    One per root: it kills the workers of every queue under C{root}. If it
    dies while the daemon lives, it is started again after
    L{restartDelay} seconds.
    """

    #: Seconds before a watchdog that died is started again.
    restartDelay = 1.0

    def __init__(self, reactor: Any, root: str, grace: int = 5, lock_fd: int | None = None) -> None:
        """
        @param root: the RQ root directory.
        @param grace: seconds between C{SIGTERM} and C{SIGKILL}.
        @param lock_fd: the root's lock (L{rqtwisted.rootlock.lock_root}):
            the watchdog holds it too (as its fd 3), so that no other daemon
            takes the root before the workers of a killed one are gone.
        """
        self._reactor = reactor
        self._root = os.path.abspath(root)
        self._grace = int(grace)
        self._lock_fd = lock_fd
        self._process: Any = None
        self._protocol: _WatchdogProtocol | None = None
        self._stopping = False
        self._stopped: list[Deferred[None]] = []
        self._restart: Any = None

    @property
    def pid(self) -> int | None:
        """
        The watchdog's pid while it runs.
        """
        return None if self._process is None else self._process.spawnedPid

    def start(self) -> None:
        """
        Start the watchdog (once).
        """
        if self._process is not None:
            return
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._stopping = False
        self._spawn()

    def _respawn(self) -> None:
        self._restart = None
        try:
            self._spawn()
        except OSError as e:
            _log.error("cannot start the watchdog: {error}", error=e)
            self._restart = self._reactor.callLater(self.restartDelay, self._respawn)

    def _spawn(self) -> None:
        self._restart = None
        self._protocol = _WatchdogProtocol(self)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        fds: dict[int, Any] = {0: "w", 1: devnull, 2: devnull}
        if self._lock_fd is not None:
            fds[3] = self._lock_fd
        try:
            self._process = _SessionProcess(
                self._reactor,
                _SH,
                ["rq-watchdog", "-c", _WATCHDOG, "rq-watchdog", self._root, str(self._grace)],
                {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                self._protocol,
                fds,
                blockedSignals=_WATCHDOG_SIGNALS,
            )
        finally:
            os.close(devnull)

    def stop(self) -> Deferred[None]:
        """
        End the watchdog without killing any worker; the result fires once
        it exited.
        """
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
            self._restart = None
        self._stopping = True
        if self._process is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stopped.append(d)
        # Written at once, not through the transport's buffer: the daemon
        # may exit before the reactor would flush it, and EOF without
        # "stop" means "kill everything".
        writer = self._process.pipes.get(0)
        if writer is not None:
            try:
                os.write(writer.fileno(), b"stop\n")
            except OSError as e:
                _log.warn("cannot stop the watchdog: {error}", error=e)
        self._process.closeStdin()
        return d

    def _ended(self, protocol: _WatchdogProtocol, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self._process = None
        self._protocol = None
        if self._stopping:
            stopped, self._stopped = self._stopped, []
            for d in stopped:
                d.callback(None)
            return
        _log.error(
            "watchdog exited unexpectedly ({reason}); restarting it",
            reason=reason.value,
        )
        self._restart = self._reactor.callLater(self.restartDelay, self._respawn)
