"""
The only place that makes writes durable.

A write is durable when its data and the directory entries that name it have
reached the disk: write a temp file, fsync it, rename it over the target,
fsync the directory. C{fsync} blocks, so L{Syncer} runs it in a thread and
batches: every path asked for while a sync round is in flight is synced by the
next round, together (group commit). Callers acknowledge only after the
L{Deferred} of their sync fires. (A round's C{fsync}s are those of
L{rqtwisted.fsync}.)

On a memory filesystem (tmpfs, ramfs) C{fsync} does nothing: there is no
disk behind it. L{syncer_for} then gives a L{Syncer} that skips the rounds
and fires at once, so that a root kept in memory pays no thread hand-off
for nothing.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.fsync import NONBLOCKING, read_file, sync_paths

_log = Logger()

__all__ = [
    "NONBLOCKING",
    "Syncer",
    "dumps",
    "read_file",
    "replace_durably",
    "replace_file",
    "sync_paths",
    "write_file",
]


#: Filesystems whose C{fsync} does nothing (Linux: kept in memory only).
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})

#: Where Linux lists the mounts this process sees.
MOUNTS = "/proc/self/mounts"


#: An octal escape of C{/proc/self/mounts} (C{\\040} for a space).
_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape_mount(field: str) -> str:
    """
    A C{/proc/self/mounts} field with its octal escapes decoded.
    """
    return _MOUNT_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def filesystem_type(path: str, mounts: str = MOUNTS) -> str | None:
    """
    The type of the filesystem C{path} is on (e.g. C{"ext4"}, C{"tmpfs"}):
    that of the mount with the longest mount point above the real path, the
    last one listed where mounts are stacked. L{None} where the mount table
    cannot be read.
    """
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open(mounts, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = _unescape_mount(fields[1])
                inside = point == "/" or real == point or real.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) >= best[0]):
                    best = (len(point), fields[2])
    except OSError:
        return None
    return best[1] if best else None


def write_file(path: str, data: bytes) -> None:
    """
    Write C{data} to C{path} (created or truncated), without syncing; a
    symbolic link or a FIFO at C{path} is refused, not followed or waited on
    (C{OSError} C{ELOOP} or C{ENXIO}).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | NONBLOCKING, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes) -> None:
    """
    Atomically replace C{path} with C{data}: write C{<path>.tmp}, rename.

    Readers see the old or the new content, never a mix. Durability is the
    caller's: sync C{path} and its directory through a L{Syncer}.
    """
    tmp = path + ".tmp"
    _write_temp(tmp, data)
    os.rename(tmp, path)


def _write_temp(tmp: str, data: bytes) -> None:
    """
    Write C{data} to the temp file C{tmp}, replacing whatever else sits
    under that name.
    """
    try:
        write_file(tmp, data)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        # Something else sits under the temp name (a link, a FIFO, a
        # directory, left by a queue script): it goes, once.
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)
        else:
            os.unlink(tmp)
        write_file(tmp, data)


#: Numbers the temp files of L{replace_durably}: two replacements of one
#: file under way at once each have their own.
_TEMP_SERIAL = itertools.count()


def replace_durably(
    syncer: "Syncer", path: str, data: bytes, *also: str, placed: Callable[[], object] | None = None
) -> Deferred[None]:
    """
    Replace C{path} with C{data} in the order that leaves, after a crash at
    any point, the old content or the new one, never an empty or partial
    file: a temp file beside C{path} is written and synced (one round of
    C{syncer}), renamed over C{path}, then C{path}, its directory and
    C{also} are synced (a second round): every C{fsync} is the syncer's,
    off the reactor thread. For rare writes that must never be half done (queue configs,
    markers); L{replace_file} followed by one sync is quicker.

    @param also: more paths to sync with the second round (directories
        the caller made for C{path}, say).
    @param placed: called right after the rename, in the same turn of the
        reactor (to start using the new file before anything else finds
        it); what it raises fails the result, and the second round is not
        run.
    @return: fires once all of it is on disk; fails, with the temp file
        removed, when a step fails.
    """
    tmp = f"{path}.{next(_TEMP_SERIAL)}.tmp"
    _write_temp(tmp, data)

    def rename(_: object) -> Deferred[None]:
        os.rename(tmp, path)
        if placed is not None:
            placed()
        return syncer.sync(path, os.path.dirname(path), *also)

    def failed(failure: Failure) -> Failure:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return failure

    return syncer.sync(tmp).addCallback(rename).addErrback(failed)


def dumps(value: Any) -> bytes:
    """
    The JSON encoding used for every file rqtwisted writes.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Syncer:
    """
    Group commit of C{fsync}s, off the reactor thread.

    Paths somebody waits for (L{sync}) go with the next round. Paths nobody
    waits for (L{later}) go with the next round too when nobody waits, but
    while acknowledgements wait they are held back for up to
    L{lazyRounds} rounds and synced together: an acknowledgement then only
    waits for its own paths (on a disk where an C{fsync} takes
    milliseconds this is most of its latency).

    @ivar rounds: how many sync rounds have run (for benchmarks and tests).
    """

    #: Rounds with waiters that paths synced L{later} may be held back for.
    lazyRounds = 8

    def __init__(
        self,
        runInThread: Callable[..., Deferred[None]],
        sync: Callable[[Iterable[str]], None] = sync_paths,
    ) -> None:
        """
        @param runInThread: runs a callable in a thread and returns a
            Deferred of its result, e.g. C{functools.partial(deferToThreadPool,
            reactor, pool)}; tests pass a synchronous stand-in.
        @param sync: what a round does with its paths.
        """
        self._runInThread = runInThread
        self._sync = sync
        self._pending: dict[str, None] = {}
        self._lazy: dict[str, None] = {}
        self._lazyAge = 0
        self._waiting: list[Deferred[None]] = []
        self._inFlight = False
        self.rounds = 0

    def sync(self, *paths: str) -> Deferred[None]:
        """
        Make C{paths} durable; the result fires once they are.
        """
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        for path in paths:
            self._pending[path] = None
        if not self._inFlight:
            self._startRound()
        return d

    def later(self, *paths: str) -> None:
        """
        Sync C{paths} soon, without anyone waiting on it.
        """
        for path in paths:
            self._lazy[path] = None
        if not self._inFlight:
            self._startRound()

    def _startRound(self) -> None:
        pending = self._pending
        if self._lazy and (not self._waiting or self._lazyAge >= self.lazyRounds):
            for path in self._lazy:
                pending[path] = None
            self._lazy = {}
            self._lazyAge = 0
        elif self._lazy:
            self._lazyAge += 1
        paths = list(pending)
        waiting = self._waiting
        self._pending = {}
        self._waiting = []
        self._inFlight = True
        self.rounds += 1
        d = self._runInThread(self._sync, paths)

        def finished(result: object) -> None:
            if isinstance(result, Failure):
                _log.failure("sync of {count} paths failed", result, count=len(paths))
            self._inFlight = False
            if self._pending or self._waiting or self._lazy:
                self._startRound()
            for w in waiting:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        d.addBoth(finished)


class MemorySyncer(Syncer):
    """
    The L{Syncer} of a root on a memory filesystem, where C{fsync} does
    nothing: every sync has succeeded at once, and no round runs.
    """

    def __init__(self) -> None:
        super().__init__(_unused_runner)

    def sync(self, *paths: str) -> Deferred[None]:
        """
        Nothing to wait for: an already fired L{Deferred}.
        """
        return succeed(None)

    def later(self, *paths: str) -> None:
        """
        Nothing to do.
        """


def _unused_runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    raise AssertionError("a MemorySyncer runs no sync round")


def syncer_for(path: str, makeRunner: Callable[[], Callable[..., Deferred[None]]], mounts: str = MOUNTS) -> Syncer:
    """
    The L{Syncer} for a root at C{path}: a L{MemorySyncer} where it is on a
    memory filesystem (L{MEMORY_FILESYSTEMS}), else one that runs its rounds
    with the runner C{makeRunner()} gives (called only then).
    """
    kind = filesystem_type(path, mounts)
    if kind in MEMORY_FILESYSTEMS:
        _log.info("{path} is on {kind}, where fsync does nothing: no sync rounds", path=path, kind=kind)
        return MemorySyncer()
    return Syncer(makeRunner())
