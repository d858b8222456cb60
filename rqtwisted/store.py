"""
One queue's directory as a state machine: prep -> que -> run -> done/err/relayed.

The store owns every path of C{queue/<name>/} (layout.md) and every change on
disk: creating a message, writing its C{msg} and C{status} files, attaching
files and moving the message directory between states by one C{rename}.
Durability goes through a shared L{Syncer}: a write the user is told about is
synced before the returned L{Deferred} fires; other writes are synced with the
next round without anyone waiting.

The store keeps no scheduling state: the queue service (L{rqtwisted.queue})
holds the in-memory lists and calls the store in the order it decides.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.durable import NONBLOCKING, Syncer, dumps, read_file, replace_file, write_file
from rqtwisted.fsync import remove_quietly
from rqtwisted.message import (
    HASHED_STATES,
    JSON_READ_ERRORS,
    MessageError,
    hashed_subpath,
    make_msg_id,
    not_unicode,
    stored,
    valid_msg_id,
)
from rqtwisted.root import QUEUE_STATE_DIRS, make_dirs
from rqtwisted.threads import ThreadRunner, run_here

_log = Logger()

#: Directories of a queue, created at start: those a new queue gets
#: (L{rqtwisted.root.QUEUE_STATE_DIRS}), and where unreadable messages go.
STATE_DIRS = (*QUEUE_STATE_DIRS, "corrupt")

_BAD_ATTACH_CHARS = set("~?[]%|$&<>")

#: Characters a multipart upload cannot carry in a file name as they are: a
#: backslash is an escape to some clients and a Windows path separator to
#: parsers, a line break ends the header. A name holding one would arrive
#: renamed by a form upload but not by a C{PUT} (whose name is in the URL),
#: so it is refused on every path.
_UNSENDABLE_ATTACH_CHARS = set("\\\r\n")

#: Sub-directory of C{tmp/} that keeps resumable uploads across restarts:
#: C{tmp/partial/<msg id>/<attachment name>} (web uploads, relay peers).
PARTIAL_DIR = "partial"

#: Partial uploads untouched this long (seconds) are removed at queue start.
PARTIAL_MAX_AGE = 86400.0
#: Serial numbers of attachment staging files, C{tmp/.attach.<n>}: one
#: counter for the process, so that the store of a restarted queue never
#: picks the name of a file an earlier store may still be writing. Dot
#: names: no attachment, part upload or message id can have one.
_STAGING_SERIAL = itertools.count(1)
_DIGITS8 = re.compile(r"^\d{8}$")
_DIGITS2 = re.compile(r"^\d{2}$")


@dataclass
class Recovered:
    """
    What a queue finds on disk when it starts.

    @ivar que: queued messages by id (messages found in C{run/} included:
        they went back to C{que/}).
    @ivar prep: ids of messages in prep.
    @ivar corrupt: ids moved aside to C{corrupt/}.
    @ivar counts: messages in C{done}, C{relayed} and C{err}.
    """

    que: dict[str, dict[str, Any]] = field(default_factory=dict)
    prep: set[str] = field(default_factory=set)
    corrupt: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def md5_file(path: str) -> str:
    """
    The lowercase hex md5 of a file's content, read in chunks.
    """
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: md5s of attachments already hashed, by C{(device, inode, size, mtime)}:
#: an attachment keeps its inode when its message changes state, and a
#: message page must not re-read a multi-GiB file on the reactor each time.
_MD5_CACHE: "OrderedDict[tuple[int, int, int, int], str]" = OrderedDict()
_MD5_CACHE_SIZE = 4096


def _md5_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def remember_md5(path: str, digest: str) -> None:
    """
    Record the md5 of the file at C{path} (known from its upload).
    """
    _MD5_CACHE[_md5_key(os.stat(path))] = digest
    while len(_MD5_CACHE) > _MD5_CACHE_SIZE:
        _MD5_CACHE.popitem(last=False)


def cached_md5(path: str) -> str:
    """
    The md5 of the file at C{path}, hashed only when the file is new to
    this process or has changed since.
    """
    key = _md5_key(os.stat(path))
    digest = _MD5_CACHE.get(key)
    if digest is None:
        digest = md5_file(path)
        remember_md5(path, digest)
    else:
        _MD5_CACHE.move_to_end(key)
    return digest


def known_md5(path: str) -> str | None:
    """
    The md5 of the file at C{path} if this process knows it already (see
    L{cached_md5}), without reading the file; L{None} otherwise.
    """
    return _MD5_CACHE.get(_md5_key(os.stat(path)))


def md5_off_reactor(path: str, run_in_thread: Callable[..., Deferred[str]]) -> Deferred[str]:
    """
    The md5 of the file at C{path}: at once when this process knows it
    (L{known_md5}), else read with C{run_in_thread} and remembered (in the
    calling thread: the cache is the reactor's).
    """
    try:
        digest = known_md5(path)
    except OSError:
        # Gone or unreadable: the read in the thread says so, as a failure.
        digest = None
    if digest is not None:
        return succeed(digest)

    def remember(digest: str) -> str:
        try:
            remember_md5(path, digest)
        except OSError:
            pass
        return digest

    return run_in_thread(md5_file, path).addCallback(remember)


#: The longest attachment name, in bytes: the longest file name Linux
#: filesystems take.
MAX_ATTACHMENT_NAME = 255


def check_attachment_name(name: str) -> None:
    """
    Refuse attachment names that are dot-files, hold a reserved character or
    could leave C{attach/} (quirks 9), or that an upload could not carry as
    they are (a backslash, a line break).

    @raise MessageError: with the original's reason texts.
    """
    if not name or name.startswith("."):
        raise MessageError(f"Attachment name as a dot-file not allowed: {name}")
    if "/" in name or "\0" in name or any(c in _BAD_ATTACH_CHARS or c in _UNSENDABLE_ATTACH_CHARS for c in name):
        raise MessageError(f"Attachment name has invalid character. not allowed: {name}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_ATTACHMENT_NAME:
        raise MessageError(f"Attachment name too long (over {MAX_ATTACHMENT_NAME} bytes): {name[:64]}...")


def attachment_entries(adir: str) -> list[os.DirEntry[str]]:
    """
    The attachments of an C{attach/} directory, by name: every entry but
    the dot ones (message.md) that is a regular file, a symbolic link
    followed (one left by an older version). Every listing of attachments
    (the read form, relay, clone) goes by this.
    """
    try:
        entries = sorted(os.scandir(adir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [e for e in entries if not e.name.startswith(".") and e.is_file()]


#: What C{link(2)} fails with where a copy can do: another filesystem
#: (C{EXDEV}), one without hard links or a link the kernel's
#: C{protected_hardlinks} forbids (C{EPERM}), a file at its link limit
#: (C{EMLINK}).
_LINK_REFUSALS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK})


def link_or_copy(source: str, target: str) -> None:
    """
    Put the content of regular file C{source} at the new path C{target}: a
    hard link, or a copy where the link is refused (L{_LINK_REFUSALS}).
    Blocking: run in a thread. Attachments are placed by this (attach,
    clone, dup).

    @raise OSError: the link failed for another reason (nothing is copied
        then), or the copy failed.
    """
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in _LINK_REFUSALS:
            raise
        shutil.copyfile(source, target)


def _stage_attachment(source: str, staging: str) -> None:
    """
    L{link_or_copy} C{source} to C{staging}, for an attach.

    @raise MessageError: C{source} cannot be read (gone or not allowed
        since it was checked); other errors (no space left...) are raised
        as they are.
    """
    try:
        link_or_copy(source, staging)
    except (FileNotFoundError, PermissionError):
        raise MessageError(f"Attachment currently cannot be read: {source}")


#: The length assumed of a pid file nobody knows the content of.
_UNKNOWN_LENGTH = 1 << 20


class QueueStore:
    """
    The directory of one queue.
    """

    def __init__(
        self, path: str, syncer: Syncer, now: Callable[[], float], run_in_thread: ThreadRunner = run_here
    ) -> None:
        """
        @param path: C{queue/<name>}, absolute.
        @param syncer: the instance's group-commit syncer.
        @param now: the clock (epoch seconds).
        @param run_in_thread: runs the long file work of an attach (copy,
            md5) off the reactor; by default in the calling thread.
        """
        self.path = path
        self._run_in_thread = run_in_thread
        # Paths are joined by hand on the hot path: ids and state names
        # hold no separator, and os.path.join costs a microsecond a call.
        self._prefix = path.rstrip(os.sep) + os.sep
        self._syncer = syncer
        self._now = now
        self._suffix = random.randrange(1, 10**9)
        self._hashdirs: set[str] = set()
        #: Former pid files parked in C{tmp/} with the length of what they
        #: hold, reused by L{write_pid}: on some filesystems creating and
        #: deleting a file per message costs more than all the rest of the
        #: message's disk work.
        self._spare_pids: list[tuple[str, int]] = []
        self._spare_serial = 0
        #: Running message -> the length of the pid L{write_pid} wrote.
        self._pid_lengths: dict[str, int] = {}
        #: Told of every change of a message (the search index,
        #: L{rqtwisted.search.QueueIndex}); C{None}: nobody listens.
        self.observer: Any = None

    # -- paths

    def state_dir(self, state: str) -> str:
        """
        The directory of a state: C{queue/<name>/<state>}.
        """
        return self._prefix + state

    def msg_dir(self, state: str, msg_id: str) -> str:
        """
        Where a message in C{state} lives (hashed for done and relayed).
        """
        if state in HASHED_STATES:
            return f"{self._prefix}{state}/{hashed_subpath(msg_id)}"
        return f"{self._prefix}{state}/{msg_id}"

    # -- start-up

    def open(self) -> Recovered:
        """
        Create missing state directories, move C{run/} back to C{que/}
        (at-least-once), load C{que/}, list C{prep/}, move unreadable messages
        of both to C{corrupt/}, and count the finished states (whose messages
        are not read here).
        """
        made: list[str] = []
        for state in STATE_DIRS:
            made.extend(make_dirs(self.state_dir(state)))
        self._clear_tmp()
        found = Recovered()
        for msg_id in self._ids("run"):
            try:
                self._requeue(msg_id)
            except OSError as e:
                # Not a message directory, or the same id in que/ too.
                self._move_aside("run", msg_id, e)
                found.corrupt.append(msg_id)
            else:
                found.requeued.append(msg_id)
        found.que = self._readable("que", found.corrupt)
        # (prep is read only to find the unreadable ones: it holds few.)
        found.prep = set(self._readable("prep", found.corrupt))
        found.counts = {
            "done": self.count_hashed("done"),
            "relayed": self.count_hashed("relayed"),
            "err": len(self._ids("err")),
        }
        # (With the directories whose entries the state directories made
        # above changed.)
        self._syncer.later(self.state_dir("run"), self.state_dir("que"), self.state_dir("corrupt"), *made)
        return found

    def _clear_tmp(self) -> None:
        """
        Empty C{tmp/} but for the partial uploads of prep messages that were
        written to in the last L{PARTIAL_MAX_AGE} seconds.
        """
        tmp = self.state_dir("tmp")
        self._spare_pids = []
        self._pid_lengths = {}
        for entry in os.listdir(tmp):
            if entry != PARTIAL_DIR:
                path = os.path.join(tmp, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
        partial = os.path.join(tmp, PARTIAL_DIR)
        if not os.path.isdir(partial):
            return
        oldest = self._now() - PARTIAL_MAX_AGE
        for msg_id in os.listdir(partial):
            mdir = os.path.join(partial, msg_id)
            if not valid_msg_id(msg_id) or not os.path.isdir(self.msg_dir("prep", msg_id)):
                shutil.rmtree(mdir, ignore_errors=True)
                continue
            for name in os.listdir(mdir):
                path = os.path.join(mdir, name)
                if os.lstat(path).st_mtime < oldest:
                    os.unlink(path)
            try:
                os.rmdir(mdir)
            except OSError:
                pass

    def partial_path(self, msg_id: str, name: str) -> str:
        """
        Where a resumable upload of attachment C{name} of prep message
        C{msg_id} collects its bytes (same filesystem as C{attach/}).
        """
        check_attachment_name(name)
        return os.path.join(self.state_dir("tmp"), PARTIAL_DIR, msg_id, name)

    def drop_partials(self, msg_id: str) -> None:
        """
        Remove every partial upload of a message (committed or deleted).
        """
        shutil.rmtree(os.path.join(self.state_dir("tmp"), PARTIAL_DIR, msg_id), ignore_errors=True)

    def _ids(self, state: str) -> list[str]:
        try:
            names = os.listdir(self.state_dir(state))
        except FileNotFoundError:
            return []
        return [n for n in names if valid_msg_id(n)]

    def _requeue(self, msg_id: str) -> None:
        """
        Move a message left in C{run/} back to C{que/}, without its pid file.

        @raise OSError: it is not a message directory, or C{que/} holds a
            message of that id already.
        """
        source = self.msg_dir("run", msg_id)
        remove_quietly(source + "/pid")
        target = self.msg_dir("que", msg_id)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "que/ holds a message of that id", target)
        os.rename(source, target)

    def _readable(self, state: str, corrupt: list[str]) -> dict[str, dict[str, Any]]:
        """
        The messages of C{state} by id; the unreadable ones are moved to
        C{corrupt/} and their ids added to C{corrupt}.
        """
        found = {}
        for msg_id in self._ids(state):
            try:
                found[msg_id] = self.read(state, msg_id)
            except MessageError as e:
                self._move_aside(state, msg_id, e)
                corrupt.append(msg_id)
        return found

    def _move_aside(self, state: str, msg_id: str, reason: Exception) -> None:
        """
        Move an unusable entry of C{state} to C{corrupt/} (under a new name
        if C{corrupt/} holds one of that name already), and say so; an
        entry that cannot even be moved is left where it is, and said so.
        """
        source = self.msg_dir(state, msg_id)
        target = os.path.join(self.state_dir("corrupt"), msg_id)
        n = 0
        while os.path.lexists(target):
            n += 1
            target = os.path.join(self.state_dir("corrupt"), f"{msg_id}.{n}")
        try:
            os.rename(source, target)
        except OSError as e:
            _log.error("queue {path}: message {msg_id} in {state} cannot be used ({reason}) nor moved aside: {error}",
                       path=self.path, msg_id=msg_id, state=state, reason=reason, error=e)
            return
        _log.warn(
            "queue {path}: message {msg_id} in {state} cannot be used ({reason}); moved to {target}",
            path=self.path,
            msg_id=msg_id,
            state=state,
            reason=reason,
            target=os.path.relpath(target, self.path),
        )

    # -- reading

    def read(self, state: str, msg_id: str) -> dict[str, Any]:
        """
        The stored message (stale keys dropped).

        @raise MessageError: C{msg not found} or C{msg couldn't be read}.
        """
        try:
            data = json.loads(read_file(os.path.join(self.msg_dir(state, msg_id), "msg")))
        except FileNotFoundError:
            raise MessageError("msg not found")
        except JSON_READ_ERRORS:
            raise MessageError("msg couldn't be read")
        if not isinstance(data, dict):
            raise MessageError("msg couldn't be read")
        return stored(data)

    def read_status(self, state: str, msg_id: str) -> tuple[bool, str | None]:
        """
        C{(has_status_file, job_status)} of a message.
        """
        try:
            data = json.loads(read_file(os.path.join(self.msg_dir(state, msg_id), "status")))
        except FileNotFoundError:
            return (False, None)
        except JSON_READ_ERRORS:
            return (True, None)
        text = data.get("job_status") if isinstance(data, dict) else None
        return (True, text if isinstance(text, str) else None)

    def exists(self, state: str, msg_id: str) -> bool:
        """
        Is there a message C{msg_id} in C{state} on disk?
        """
        return os.path.isdir(self.msg_dir(state, msg_id))

    def attachments(self, state: str, msg_id: str) -> dict[str, dict[str, Any]]:
        """
        C{{name: {md5, size, path}}} for the non-dot entries of C{attach/}.
        """
        adir = os.path.join(self.msg_dir(state, msg_id), "attach")
        out: dict[str, dict[str, Any]] = {}
        for entry in attachment_entries(adir):
            out[entry.name] = {
                "md5": cached_md5(entry.path),
                "size": entry.stat().st_size,
                "path": entry.path,
            }
        return out

    def hash_attachments(self, state: str, msg_id: str) -> Deferred[None]:
        """
        Have the md5 of every attachment of a message known to this process,
        those not known yet read in threads: then L{attachments} reads no
        file (a multi-GiB one would hold the reactor for seconds, the first
        time after a start). Fires once done; an attachment that cannot be
        read is left to L{attachments} to report.
        """
        adir = os.path.join(self.msg_dir(state, msg_id), "attach")
        # (md5_off_reactor answers at once for an md5 known already.)
        hashing = [md5_off_reactor(entry.path, self._run_in_thread) for entry in attachment_entries(adir)]
        return DeferredList(hashing, consumeErrors=True).addCallback(lambda _: None)

    def list_hashed(self, state: str, limit: int | None = None) -> Iterator[str]:
        """
        Ids in a hashed state, newest first (each level sorted descending).
        """
        top = self.state_dir(state)
        produced = 0
        for day in self._sorted_desc(top, _DIGITS8):
            for hour in self._sorted_desc(os.path.join(top, day), _DIGITS2):
                for minute in self._sorted_desc(os.path.join(top, day, hour), _DIGITS2):
                    try:
                        names = os.listdir(os.path.join(top, day, hour, minute))
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    for name in sorted((n for n in names if valid_msg_id(n)), reverse=True):
                        yield name
                        produced += 1
                        if limit is not None and produced >= limit:
                            return

    @staticmethod
    def _sorted_desc(path: str, pattern: re.Pattern[str]) -> list[str]:
        try:
            return sorted((n for n in os.listdir(path) if pattern.match(n)), reverse=True)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def count_hashed(self, state: str) -> int:
        """
        How many messages a hashed state holds.
        """
        return sum(1 for _ in self.list_hashed(state))

    def list_flat(self, state: str) -> list[str]:
        """
        Ids in a flat state (prep, que, run, err), newest first.
        """
        return sorted(self._ids(state), reverse=True)

    # -- writing

    def new_id(self) -> str:
        """
        Allocate a message id unique in this queue.
        """
        self._suffix += 1
        return make_msg_id(self._now(), self._suffix)

    def create(
        self,
        msg: dict[str, Any],
        state: str,
        fill: Callable[[str], None] | None = None,
    ) -> Deferred[None]:
        """
        Store a new message C{msg} (its C{msg_id} set) directly in C{state}
        (C{prep} or C{que}): built in C{tmp/}, renamed into place, and synced
        (message file, its directory, the state directory) in one round.

        @param fill: called with the staging directory before the rename, to
            add attachments (clone, dup).

        @raise MessageError: a text of C{msg} is not valid Unicode (a lone
            surrogate, as from an undecodable command-line argument);
            nothing is written.
        """
        msg_id = msg["msg_id"]
        try:
            data = dumps(msg)
        except UnicodeEncodeError:
            bad = not_unicode(msg)
            raise MessageError(
                f"invalid {bad[0]} field: not valid Unicode" if bad is not None else "message is not valid Unicode"
            ) from None
        staging = f"{self._prefix}tmp/{msg_id}"
        os.mkdir(staging)
        target = self.msg_dir(state, msg_id)
        try:
            write_file(staging + "/msg", data)
            if fill is not None:
                fill(staging)
            os.rename(staging, target)
        except BaseException:
            # A full disk, say: no half-made message is left in tmp/.
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.observer is not None:
            self.observer.created(state, msg)
        paths = [target + "/msg", target, self.state_dir(state)]
        if fill is not None and os.path.isdir(os.path.join(target, "attach")):
            paths.append(os.path.join(target, "attach"))
        return self._syncer.sync(*paths)

    def write_msg(self, state: str, msg_id: str, msg: dict[str, Any]) -> Deferred[None]:
        """
        Replace a message's C{msg} file; the result fires once durable.
        """
        mdir = self.msg_dir(state, msg_id)
        replace_file(os.path.join(mdir, "msg"), dumps(msg))
        if self.observer is not None:
            self.observer.msg_written(state, msg_id, msg)
        return self._syncer.sync(os.path.join(mdir, "msg"), mdir)

    def write_status(self, state: str, msg_id: str, text: str | None) -> None:
        """
        Replace the C{status} file (C{{"job_status": text}}), synced later.
        """
        mdir = self.msg_dir(state, msg_id)
        path = mdir + "/status"
        replace_file(path, dumps({"job_status": text}))
        if self.observer is not None:
            self.observer.status_written(state, msg_id, text)
        self._syncer.later(path, mdir)

    def write_pid(self, msg_id: str, pid: int) -> None:
        """
        Record a running message's worker pid (C{run/<id>/pid}): written
        to a spare file in C{tmp/} (or C{pid.tmp}) and renamed into place.
        """
        target = self.msg_dir("run", msg_id) + "/pid"
        data = str(pid).encode("ascii")
        while self._spare_pids:
            spare, held = self._spare_pids.pop()
            # Truncating costs more than writing: only when the old pid
            # was longer.
            # (Parked from run/, where a script may have put anything: no
            # link followed, no FIFO waited on.)
            flags = os.O_WRONLY | os.O_NOFOLLOW | NONBLOCKING | (os.O_TRUNC if held > len(data) else 0)
            try:
                fd = os.open(spare, flags)
            except OSError:
                continue
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.rename(spare, target)
            self._pid_lengths[msg_id] = len(data)
            return
        replace_file(target, data)
        self._pid_lengths[msg_id] = len(data)

    def left_running(self) -> list[tuple[str, int]]:
        """
        The messages of C{run/} with a pid file: C{(msg_id, pid)}. Before
        L{open} puts them back in C{que/}, the workers they name may still
        run (see L{rqtwisted.worker.kill_leftover}).
        """
        found = []
        for msg_id in self._ids("run"):
            pid = self.read_pid(msg_id)
            if pid is not None and pid > 1:
                found.append((msg_id, pid))
        return found

    def read_pid(self, msg_id: str) -> int | None:
        """
        The worker pid recorded for a running message, if any.
        """
        try:
            return int(read_file(os.path.join(self.msg_dir("run", msg_id), "pid")).strip() or 0) or None
        except (OSError, ValueError):
            return None

    def clear_pid(self, msg_id: str) -> None:
        """
        Remove C{run/<id>/pid} (parked in C{tmp/} for L{write_pid}).
        """
        path = self.msg_dir("run", msg_id) + "/pid"
        # A file written by someone else may hold anything: truncated on reuse.
        held = self._pid_lengths.pop(msg_id, _UNKNOWN_LENGTH)
        if len(self._spare_pids) < 64:
            self._spare_serial += 1
            spare = f"{self._prefix}tmp/pid.{self._spare_serial}"
            try:
                os.rename(path, spare)
            except FileNotFoundError:
                return
            except OSError:
                pass
            else:
                self._spare_pids.append((spare, held))
                return
        remove_quietly(path)

    def job_path(self, state: str, msg_id: str) -> str:
        """
        The C{job/} directory of a message in C{state} (not created).
        """
        return self.msg_dir(state, msg_id) + "/job"

    def job_dir(self, msg_id: str, state: str = "run") -> str:
        """
        Create (if needed) and return C{<state>/<id>/job} (C{run/} by
        default).
        """
        path = self.job_path(state, msg_id)
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        return path

    def forget_dirs(self, prefix: str) -> None:
        """
        Forget the hashed directories created below C{prefix} (for instance a
        bucket the cleaner set aside), so that they are created again when a
        message next moves there.
        """
        below = prefix.rstrip(os.sep) + os.sep
        self._hashdirs.difference_update(
            {p for p in self._hashdirs if p == prefix or p.startswith(below)}
        )

    def move(self, msg_id: str, source: str, target: str) -> Deferred[None]:
        """
        Move a message between states by one C{rename}; the result fires once
        both directory entries are durable.
        """
        return self._syncer.sync(*self._move(msg_id, source, target))

    def move_soon(self, msg_id: str, source: str, target: str) -> None:
        """
        L{move}, for a move nobody waits for (the queue's own moves to and
        from C{run/}): its directories are synced with a later round.
        """
        self._syncer.later(*self._move(msg_id, source, target))

    def _move(self, msg_id: str, source: str, target: str) -> list[str]:
        """
        Rename a message's directory; the directories to sync, the one that
        gained the entry first.
        """
        dest = self.msg_dir(target, msg_id)
        sync = []
        if target in HASHED_STATES:
            parent = os.path.dirname(dest)
            if parent not in self._hashdirs:
                sync.extend(make_dirs(parent))
                self._hashdirs.add(parent)
            sync.append(parent)
        else:
            sync.append(self.state_dir(target))
        sync.append(self.state_dir(source))
        os.rename(self.msg_dir(source, msg_id), dest)
        if self.observer is not None:
            self.observer.moved(msg_id, source, target)
        if source == "prep":
            self.drop_partials(msg_id)
        if source in HASHED_STATES:
            sync.append(os.path.dirname(self.msg_dir(source, msg_id)))
        return sync

    def delete(self, state: str, msg_id: str) -> Deferred[None]:
        """
        Remove a message: renamed into C{tmp/} (atomic), then deleted.
        """
        source = self.msg_dir(state, msg_id)
        trash = os.path.join(self.state_dir("tmp"), f"deleted-{msg_id}")
        os.rename(source, trash)
        shutil.rmtree(trash, ignore_errors=True)
        if self.observer is not None:
            self.observer.deleted(state, msg_id)
        if state == "prep":
            self.drop_partials(msg_id)
        return self._syncer.sync(os.path.dirname(source))

    def attach(
        self,
        state: str,
        msg_id: str,
        source: str,
        name: str,
        md5: str | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> Deferred[str]:
        """
        Attach file C{source} (a symbolic link: the file it leads to) as
        C{name}: hard linked, or copied when on another filesystem, to a
        staging file of C{tmp/}, hashed, then renamed over C{attach/<name>}.
        The copy and the md5 run in a thread: meanwhile the message may
        change state, so it must still be in C{state} (and C{still_wanted}
        must say yes) when the file is renamed into place; otherwise the
        result fails with C{cannot find message}. No staging file survives.
        Fires with the md5 once durable.

        Cancelling the result (the client that asked went away) abandons
        the attachment if its file is not in place yet: the result fails
        with L{CancelledError} at once, the staging file is removed once
        the thread is done with it and the message is left as it was. A
        cancel that comes after the rename changes nothing but the result.

        @param md5: the content's md5 when the caller computed it already
            (web uploads hash while they receive); else it is read here.
        @raise MessageError: with the original's reason texts.
        """
        check_attachment_name(name)
        if not os.path.isabs(source) or os.path.normpath(source) != source:
            raise MessageError(f"Invalid pathname, must be normalized {source} (ie. must start with /")
        try:
            os.stat(source)
        except FileNotFoundError:
            raise MessageError(f"No such file {source} to attach to message")
        except OSError:
            raise MessageError(f"Attachment currently cannot be read: {source}")
        if os.path.isdir(source):
            raise MessageError(f"Attachment currently cannot be a directory {source}")
        if not os.path.isfile(source):
            raise MessageError(f"Attachment currently not of supported type: {source}")
        if not os.access(source, os.R_OK):
            raise MessageError(f"Attachment currently cannot be read: {source}")
        # link(2) would link a symbolic link itself: the file it leads to
        # is what gets attached (a snapshot, as for any file).
        real = os.path.realpath(source)
        staging = f"{self._prefix}tmp/.attach.{next(_STAGING_SERIAL)}"
        cancelled = False

        def cancel(_: Deferred[str]) -> None:
            nonlocal cancelled
            cancelled = True

        result: Deferred[str] = Deferred(cancel)

        def place(digest: str) -> str:
            if cancelled:
                raise CancelledError()
            if not self.exists(state, msg_id) or (still_wanted is not None and not still_wanted()):
                raise MessageError("cannot find message")
            adir = os.path.join(self.msg_dir(state, msg_id), "attach")
            try:
                os.mkdir(adir)
            except FileExistsError:
                pass
            final = os.path.join(adir, name)
            # (When C{final} is already a link of the same file, rename
            # does nothing: the staging name is removed below.)
            os.rename(staging, final)
            remember_md5(final, digest)
            return digest

        def discard(result: Any) -> Any:
            remove_quietly(staging)
            return result

        def durable(digest: str) -> Deferred[str]:
            mdir = self.msg_dir(state, msg_id)
            d = self._syncer.sync(os.path.join(mdir, "attach", name), os.path.join(mdir, "attach"), mdir)
            return d.addCallback(lambda _: digest)

        d = self._run_in_thread(_stage_attachment, real, staging)
        if md5 is None:
            d.addCallback(lambda _: md5_off_reactor(staging, self._run_in_thread))
        else:
            d.addCallback(lambda _: md5)
        d.addCallback(place)
        d.addBoth(discard)
        d.addCallback(durable)

        def deliver(outcome: Any) -> None:
            # (A cancelled result has failed already.)
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)

        d.addBoth(deliver)
        return result

    def delete_attachment(self, state: str, msg_id: str, name: str) -> Deferred[None]:
        """
        Remove C{attach/<name>} of a message.

        @raise MessageError: with the original's reason texts.
        """
        adir = os.path.join(self.msg_dir(state, msg_id), "attach")
        if not os.path.isdir(adir):
            raise MessageError("No attach directory for msg")
        if "/" in name or name.startswith(".") or not os.path.isfile(os.path.join(adir, name)):
            raise MessageError("No attachment with that named for msg")
        os.unlink(os.path.join(adir, name))
        return self._syncer.sync(adir)

    def link_attachments(self, state: str, msg_id: str, target_dir: str) -> None:
        """
        Hard-link every attachment of a message (L{attachment_entries})
        into C{target_dir}/attach (clone, dup); copies across filesystems.
        """
        entries = attachment_entries(os.path.join(self.msg_dir(state, msg_id), "attach"))
        if not entries:
            return
        out = os.path.join(target_dir, "attach")
        os.makedirs(out, exist_ok=True)
        for entry in entries:
            # A symbolic link (left by an older version) is followed, as
            # the listing does.
            source = os.path.realpath(entry.path) if entry.is_symlink() else entry.path
            link_or_copy(source, os.path.join(out, entry.name))
