"""
scandir: queues created from the entries of C{<root>/scandir/}
(special-queues.md).

An entry C{scandir/<name>} (usually a symlink) is a directory holding an
executable C{run} and optionally C{config.json} and C{form.json}. It makes
queue C{<name>} exist with C{config.json}'s settings overlaid by C{name}
and C{script} = the real path of C{run} (defaults C{num_workers} 1 and
C{exec_prefix} C{""}: C{run} is executed directly), and
C{queue/<name>/form.json} a symlink to the entry's C{form.json}. An entry
may also link to a queue config file (as C{create_queue_link} takes): its
settings, with C{name} overlaid, make the queue.

L{ScandirService} scans L{INITIAL_DELAY} seconds after start, then every
L{SCAN_INTERVAL} seconds, and on C{rq reload} / SIGHUP:

  - a new entry creates its queue, or adopts an existing queue of that name
    (its config is rewritten), and sets it UP;
  - a changed C{config.json} (or C{run} moved) rewrites the queue's config,
    applied in place like any config change (running workers go on);
  - a removed entry deletes the queue (the directory is set aside as
    C{queue/<name>.deleted.<inode>}, like C{rq delete_queue}) -- only queues
    made by scandir, which carry the marker file C{queue/<name>/.scandir},
    so this also holds for entries removed while the daemon was stopped;
    a C{scandir/} that cannot be listed (missing, unreadable) removes
    nothing: the scan is skipped;
  - an entry without an executable C{run}, or whose C{config.json} cannot
    be read or is invalid, is reported (C{rq status}, log) and leaves its
    queue as it is. (The fork deletes the queue on bad JSON; a typo while
    editing should not take a queue and its messages away.)

What a scan writes in a queue's directory (its config, the marker, the
C{form.json} link) is made durable off the reactor thread, as any write of
the daemon; a scan is over (its L{Deferred} fires, and the loop schedules
the next) once all of it is on disk and the configs it rewrote are
applied. An entry whose writes are still under way is left alone by
another scan (an C{rq reload} meanwhile).

C{rq status} lists the entries under C{"scandir"}:
C{{"name", "target", "queue", "error"}}.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rqtwisted.durable import replace_durably
from rqtwisted.filekey import file_key
from rqtwisted.fsync import read_config, remove_quietly
from rqtwisted.message import JSON_READ_ERRORS, MessageError, valid_queue_name
from rqtwisted.root import ConfigError, QueueConfig, json_file

if TYPE_CHECKING:
    from rqtwisted.supervisor import Instance

_log = Logger()

#: Seconds between scans.
SCAN_INTERVAL = 15.0

#: Seconds from start to the first scan.
INITIAL_DELAY = 5.0

#: Marker file of queues made by scandir: holds the entry's name.
MARKER = ".scandir"


class ScandirError(Exception):
    """
    An entry cannot make a queue; C{reason} says why.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def entry_config(name: str, target: str) -> QueueConfig:
    """
    The queue config an entry whose real directory is C{target} asks for.

    @raise ScandirError: no executable C{run}, or a bad C{config.json}.
    """
    if os.path.isfile(target):
        return file_config(name, target)
    if not os.path.isdir(target):
        raise ScandirError(f"{target} is not a directory")
    run = os.path.realpath(os.path.join(target, "run"))
    if not os.path.isfile(run) or not os.access(run, os.X_OK):
        raise ScandirError(f"no executable run in {target}")
    path = os.path.join(target, "config.json")
    data = _read_object(path) if os.path.exists(path) else {}
    data = dict(data, name=name, script=run)
    data.setdefault("num_workers", "1")
    data.setdefault("exec_prefix", "")
    return _queue_config(path, data)


def file_config(name: str, path: str) -> QueueConfig:
    """
    The queue config of an entry that links to a queue config file (like
    C{create_queue_link}): the file's settings, C{name} overlaid.

    @raise ScandirError: unreadable or invalid.
    """
    return _queue_config(path, dict(_read_object(path), name=name))


def _read_object(path: str) -> dict[str, Any]:
    """
    The JSON object in file C{path}.

    @raise ScandirError: unreadable, not JSON, or not an object.
    """
    try:
        # (A FIFO or a huge file there must not block the reactor: see
        # read_config.)
        data = json.loads(read_config(path))
    except JSON_READ_ERRORS as e:
        raise ScandirError(f"cannot read {path}: {e}")
    if not isinstance(data, dict):
        raise ScandirError(f"{path} must hold a JSON object")
    return data


def _queue_config(path: str, data: dict[str, Any]) -> QueueConfig:
    """
    Validate the queue config read from C{path}.

    @raise ScandirError: invalid (the reason names C{path}).
    """
    try:
        return QueueConfig.fromDict(data)
    except ConfigError as e:
        raise ScandirError(f"{path}: {e.reason}")


@dataclass
class Entry:
    """
    One entry of C{scandir/}.

    @ivar fingerprint: what was applied last (real path, stats of
        C{config.json}, C{run} and C{form.json}); C{None} until applied.
    @ivar queue: the queue it made, if any.
    @ivar error: why it cannot make its queue.
    """

    name: str
    target: str
    fingerprint: tuple[Any, ...] | None = None
    queue: str | None = None
    error: str | None = None

    def status(self) -> dict[str, Any]:
        """
        C{{"name", "target", "queue", "error"}}.
        """
        return {"name": self.name, "target": self.target, "queue": self.queue, "error": self.error}


class ScandirService(Service):
    """
    Keeps the queues of C{scandir/} in step with its entries.

    @ivar entries: the entries seen by the last scan, by name.
    """

    def __init__(
        self,
        instance: "Instance",
        clock: IReactorTime,
        interval: float = SCAN_INTERVAL,
        initial_delay: float = INITIAL_DELAY,
    ) -> None:
        """
        @param instance: the daemon's queues.
        @param clock: time source.
        @param interval: seconds between scans.
        @param initial_delay: seconds from start to the first scan.
        """
        self.instance = instance
        self.directory = instance.root.join("scandir")
        self.clock = clock
        self.interval = interval
        self.initial_delay = initial_delay
        self.entries: dict[str, Entry] = {}
        #: Entries whose writes are under way (see L{scan}).
        self._writing: set[str] = set()
        self._loop: LoopingCall | None = None
        self._first: IDelayedCall | None = None
        #: Whether the last scan could not list C{scandir/}.
        self._unlisted = False

    def startService(self) -> None:
        """
        Scan after L{initial_delay} seconds, then every L{interval}.
        """
        super().startService()
        self._first = self.clock.callLater(self.initial_delay, self._startLoop)

    def _startLoop(self) -> None:
        self._first = None
        self._loop = LoopingCall(self.scan)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(lambda f: _log.failure("scandir scans stopped", f))

    def stopService(self) -> None:
        """
        Stop scanning.
        """
        super().stopService()
        if self._first is not None and self._first.active():
            self._first.cancel()
        self._first = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # -- scanning

    def _names(self) -> list[str] | None:
        """
        The entries of C{scandir/}, or C{None} when it cannot be listed
        (missing, not a directory, no permission, an I/O error): logged
        once, when it becomes so.
        """
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as e:
            if not self._unlisted:
                _log.warn("scandir: cannot list {path} ({error}); its queues are left alone",
                          path=self.directory, error=e)
            self._unlisted = True
            return None
        self._unlisted = False
        return [n for n in names if not n.startswith(".")]

    def scan(self) -> Deferred[None]:
        """
        Create, update and delete queues after C{scandir/}.

        @return: fires once what the scan wrote is on disk and applied
            (never fails: failures are logged).
        """
        names = self._names()
        if names is None:
            # Not "every entry removed": a directory moved away for a
            # moment, or unmounted, must not delete every queue it made.
            return succeed(None)
        seen: dict[str, Entry] = {}
        changed = False
        writes: list[Deferred[Any]] = []
        for name in names:
            path = os.path.join(self.directory, name)
            entry = self.entries.get(name) or Entry(name, os.path.realpath(path))
            entry.target = os.path.realpath(path)
            seen[name] = entry
            if not valid_queue_name(name):
                entry.error = "queue name has invalid characters"
                continue
            if name in self._writing:
                continue
            mine: list[Deferred[Any]] = []
            try:
                changed |= self._apply(entry, mine)
            except ScandirError as e:
                if entry.error != e.reason:
                    _log.error("scandir {name}: {reason}", name=name, reason=e.reason)
                entry.error = e.reason
            except Exception as e:
                _log.failure("scandir {name} failed", name=name)
                entry.error = f"internal error: {e}"
            if mine:
                writes.append(self._writes(name, mine))
        self.entries = seen
        self._delete_orphans(set(names))
        done: Deferred[Any] = DeferredList(writes, consumeErrors=True)
        if changed:
            done.addCallback(lambda _: self.instance.reload_configs())
        done.addErrback(lambda f: _log.failure("scandir: configs not reloaded", f))
        return done.addCallback(lambda _: None)

    def _writes(self, name: str, writes: list[Deferred[Any]]) -> Deferred[Any]:
        """
        The writes under way for entry C{name}, as one L{Deferred} that
        fires once all are over; other scans leave the entry alone
        meanwhile.
        """
        self._writing.add(name)
        return DeferredList(writes, consumeErrors=True).addCallback(lambda _: self._writing.discard(name))

    @staticmethod
    def _write(name: str, writes: list[Deferred[Any]], d: Deferred[Any]) -> None:
        """
        Add C{d}, a write for entry C{name}, to C{writes}; its failure is
        logged (nobody else waits for it).
        """
        d.addErrback(lambda f: _log.failure("scandir {name}: change not made or not synced", f, name=name))
        writes.append(d)

    def _apply(self, entry: Entry, writes: list[Deferred[Any]]) -> bool:
        """
        Bring the queue of one entry in step, adding the writes under way
        to C{writes}; C{True} if a config file is rewritten (a reload is
        due once it is in place).
        """
        target = entry.target
        fingerprint = (
            target,
            file_key(target) if os.path.isfile(target) else file_key(os.path.join(target, "config.json")),
            file_key(os.path.join(target, "run")),
            os.path.realpath(os.path.join(target, "run")),
            os.path.exists(os.path.join(target, "form.json")),
        )
        root = self.instance.root
        qdir = root.queue_path(entry.name)
        exists = os.path.isfile(os.path.join(qdir, "config.json"))
        if fingerprint == entry.fingerprint and exists:
            return False
        config = entry_config(entry.name, target)
        entry.error = None
        rewritten = False
        name = entry.name
        if not exists:
            try:
                created = self.instance.create_queue(config.toDict())
            except MessageError as e:
                raise ScandirError(f"queue not created: {e.reason}")
            _log.info("scandir {name}: queue created from {target}", name=name, target=target)

            def up(_: object) -> Deferred[Any]:
                marked = self._mark(qdir, name)
                return marked.addCallback(lambda _: self.instance.set_admin("up", name))

            self._write(name, writes, created.addCallback(up))
        else:
            adopted = self._marked(qdir) != name
            if adopted:
                self._write(name, writes, self._mark(qdir, name))
            try:
                current = root.load_queue_config(name)
            except ConfigError:
                current = None
            if current != config:
                path = os.path.join(qdir, "config.json")
                self._write(name, writes, replace_durably(self.instance.syncer, path, json_file(config.toDict())))
                _log.info("scandir {name}: queue config rewritten from {target}", name=name, target=target)
                rewritten = True
            if adopted and name in self.instance.queues:
                self._write(name, writes, self.instance.set_admin("up", name))
        if self._link_form(qdir, target):
            self._write(name, writes, self.instance.syncer.sync(qdir))
        entry.queue = name
        entry.fingerprint = fingerprint
        return rewritten

    def _mark(self, qdir: str, name: str) -> Deferred[None]:
        """
        Write the marker of a queue made by scandir; fires once durable.
        """
        return replace_durably(self.instance.syncer, os.path.join(qdir, MARKER), (name + "\n").encode("utf-8"))

    @staticmethod
    def _marked(qdir: str) -> str | None:
        try:
            with open(os.path.join(qdir, MARKER), encoding="utf-8") as f:
                return f.read().strip()
        except OSError:
            return None

    @staticmethod
    def _link_form(qdir: str, target: str) -> bool:
        """
        Link the queue's C{form.json} to the entry's, or remove the link
        when the entry has none; C{True} if the queue directory changed
        (to be synced).
        """
        form = os.path.join(target, "form.json")
        link = os.path.join(qdir, "form.json")
        if os.path.exists(form):
            if os.path.islink(link) and os.readlink(link) == form:
                return False
            if os.path.lexists(link) and not os.path.islink(link):
                return False  # a form.json of the queue's own: keep it
            tmp = link + ".tmp"
            remove_quietly(tmp)
            os.symlink(form, tmp)
            os.rename(tmp, link)
            return True
        if os.path.islink(link) and os.readlink(link).startswith(target + os.sep):
            os.unlink(link)
            return True
        return False

    def _delete_orphans(self, present: set[str]) -> None:
        """
        Delete the queues made by scandir whose entry is gone.
        """
        root = self.instance.root
        for name in root.queue_names():
            if name in present or self._marked(root.queue_path(name)) != name:
                continue
            if name not in self.instance.queues:
                continue
            _log.info("scandir {name}: entry removed; deleting its queue", name=name)
            d = maybeDeferred(self.instance.delete_queue, name)
            d.addErrback(lambda f, n=name: _log.failure("scandir {name}: queue not deleted", f, name=n))

    def status(self) -> list[dict[str, Any]]:
        """
        Every entry of the last scan (L{Entry.status}).
        """
        return [self.entries[name].status() for name in sorted(self.entries)]
