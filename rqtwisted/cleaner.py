"""
The cleaner (special-queues.md, "cleaner"): removes old finished messages.

A C{cleaner} message names a queue (C{param1}, or C{ALLQUEUES}) and the days
to keep (C{param2}, default 2). For each queue it removes the C{done/} and
C{relayed/} messages older than that, by whole C{YYYYMMDD} and C{HH} buckets
of the hashed layout, and the acknowledged errors (C{err/.<id>}) as old; then
it trims C{queue/relay/relayed} to the newest 60 000 messages. It works on
the daemon's own root (quirks 30). The legacy C{queue.log} rotation is gone:
nothing writes that file.

A root may hold hundreds of thousands of done messages, so the reactor
thread only renames whole expired buckets out of the way (one C{rename}
each, into the queue's C{tmp/}, which a restarting queue empties anyway) and
the deletions run in a thread, a bounded batch at a time; after each batch
the queue's counts drop by what was removed.

The bucket arithmetic is pure (L{expired_buckets}); L{CleanerHandler} is the
C{cleaner} queue's in-process handler (L{rqtwisted.builtin}).
"""

from __future__ import annotations

import calendar
import itertools
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from twisted.logger import Logger

from rqtwisted.fsync import remove_quietly
from rqtwisted.message import HASHED_STATES, valid_msg_id, valid_queue_name
from rqtwisted.search import forget_bucket, forget_ids
from rqtwisted.threads import ThreadRunner, reactor_pool

if TYPE_CHECKING:
    from rqtwisted.supervisor import Instance

_log = Logger()

#: C{param1} value that cleans every queue.
ALL_QUEUES = "ALLQUEUES"

#: Days kept when C{param2} is absent or not a number.
DEFAULT_DAYS = 2

#: The most days C{param2} keeps: more keeps everything as well (and a
#: count such as 10**400 days is no time a clock can subtract).
MAX_DAYS = 100 * 366

#: Relayed messages kept in C{queue/relay/relayed}.
RELAYED_KEEP = 60_000

#: Message directories removed per thread call.
BATCH = 1000

#: Prefix of the buckets set aside in a queue's C{tmp/}.
TRASH_PREFIX = "cleaner-"

_DAY = re.compile(r"^\d{8}$")
_HOUR = re.compile(r"^\d{2}$")
_ID_TIME = re.compile(r"^(\d{8})\.(\d{2})(\d{2})\.(\d{2})")


def parse_days(value: object) -> int:
    """
    The days to keep from C{param2}: its leading digits (the whole number,
    not only the first digit: quirks 30), else L{DEFAULT_DAYS}; at most
    L{MAX_DAYS}.
    """
    match = re.match(r"\s*(\d+)", value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, MAX_DAYS)
    if match is None:
        return DEFAULT_DAYS
    return min(int(match.group(1)), MAX_DAYS)


def day_start(day: str) -> float | None:
    """
    Epoch seconds of 00:00 UTC of a C{YYYYMMDD} bucket (ids are UTC), or
    L{None} if it is not a date.
    """
    try:
        return float(calendar.timegm(time.strptime(day, "%Y%m%d")))
    except (ValueError, OverflowError):
        return None


def id_time(msg_id: str) -> float | None:
    """
    When a message id was made (epoch seconds, UTC), or L{None}.
    """
    match = _ID_TIME.match(msg_id)
    if match is None:
        return None
    start = day_start(match.group(1))
    if start is None:
        return None
    hour, minute, second = (int(g) for g in match.groups()[1:])
    return start + hour * 3600 + minute * 60 + second


@dataclass(frozen=True)
class Bucket:
    """
    An expired part of a hashed state: a whole day, or one hour of a day.
    """

    day: str
    hour: str | None = None

    def path(self, state_dir: str) -> str:
        """
        Its directory below C{state_dir}.
        """
        if self.hour is None:
            return os.path.join(state_dir, self.day)
        return os.path.join(state_dir, self.day, self.hour)

    @property
    def label(self) -> str:
        """
        C{YYYYMMDD} or C{YYYYMMDD-HH}.
        """
        return self.day if self.hour is None else f"{self.day}-{self.hour}"


def expired_buckets(
    days: Iterable[str],
    hours_of: Callable[[str], Iterable[str]],
    now: float,
    keep_days: int,
) -> list[Bucket]:
    """
    The buckets of a hashed state whose every message is older than
    C{keep_days} days: whole days that ended before the cut-off, and in the
    day the cut-off falls in, the hours that ended before it.

    @param days: the C{YYYYMMDD} entries of the state directory.
    @param hours_of: lists the C{HH} entries of a day (called only for the
        day holding the cut-off).
    """
    cutoff = now - keep_days * 86400
    out: list[Bucket] = []
    for day in sorted(days):
        if not _DAY.match(day):
            continue
        start = day_start(day)
        if start is None:
            continue
        if start + 86400 <= cutoff:
            out.append(Bucket(day))
        elif start < cutoff:
            for hour in sorted(hours_of(day)):
                if _HOUR.match(hour) and start + (int(hour) + 1) * 3600 <= cutoff:
                    out.append(Bucket(day, hour))
    return out


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def purge(path: str, budget: int) -> tuple[int, bool]:
    """
    Remove up to C{budget} message directories (directories named as a
    message id) below C{path}, and the directories left empty, C{path}
    included once everything is gone. Blocking: run it in a thread.

    @return: C{(messages removed, whether C{path} is gone)}.
    """
    removed = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0, True
    except NotADirectoryError:
        os.unlink(path)
        return 0, True
    for entry in entries:
        if removed >= budget:
            return removed, False
        if entry.is_dir(follow_symlinks=False):
            if valid_msg_id(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
            else:
                more, gone = purge(entry.path, budget - removed)
                removed += more
                if not gone:
                    return removed, False
        else:
            remove_quietly(entry.path)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return removed, False
    return removed, True


def oldest_beyond(state_dir: str, keep: int) -> list[str]:
    """
    Paths of the messages of a hashed state beyond the newest C{keep}
    (newest first, as listings walk). Blocking: run it in a thread.
    """
    paths: list[str] = []
    seen = 0
    for day in sorted((d for d in _listdir(state_dir) if _DAY.match(d)), reverse=True):
        for hour in sorted((h for h in _listdir(os.path.join(state_dir, day)) if _HOUR.match(h)), reverse=True):
            hour_dir = os.path.join(state_dir, day, hour)
            for minute in sorted((m for m in _listdir(hour_dir) if _HOUR.match(m)), reverse=True):
                minute_dir = os.path.join(hour_dir, minute)
                for name in sorted((n for n in _listdir(minute_dir) if valid_msg_id(n)), reverse=True):
                    seen += 1
                    if seen > keep:
                        paths.append(os.path.join(minute_dir, name))
    return paths


def remove_messages(paths: list[str]) -> int:
    """
    Remove message directories; how many existed. Blocking.
    """
    removed = 0
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


class CleanerHandler:
    """
    The C{cleaner} queue's handler.
    """

    def __init__(self, instance: "Instance", run_in_thread: ThreadRunner, batch: int = BATCH) -> None:
        """
        @param instance: the daemon (its root and queues).
        @param run_in_thread: runs the blocking deletions off the reactor
            thread (C{deferToThreadPool} bound to the reactor's pool).
        @param batch: message directories removed per thread call.
        """
        self.instance = instance
        self.run_in_thread = run_in_thread
        self.batch = batch
        self._serial = itertools.count(1)

    async def __call__(self, job: Any) -> None:
        """
        Clean the queue(s) a message names.
        """
        msg = job.msg
        target = msg.get("param1")
        if not target:
            job.report("fail need to specify a PARAM1")
            return
        keep_days = parse_days(msg.get("param2"))
        root = self.instance.root
        if target == ALL_QUEUES:
            names = root.queue_names()
        elif valid_queue_name(target) and os.path.isdir(root.queue_path(target)):
            names = [target]
        else:
            job.report(f"fail the specified queue {target} does not exist")
            return
        now = job.clock.seconds()
        total = 0
        for name in names:
            job.report(f"run status: cleaning {name}, keeping {keep_days} days")
            removed = await self.clean_queue(name, now, keep_days)
            if removed:
                job.log(f"{name}: removed {removed} messages")
            total += removed
        if "relay" in names:
            job.report(f"run status: trimming relay/relayed to {RELAYED_KEEP} messages")
            total += await self.trim_relayed()
        job.log(f"removed {total} messages")
        job.report("done successfully ran this script")

    # -- one queue

    def _queue(self, name: str) -> Any:
        return self.instance.queues.get(name)

    def _drop_count(self, name: str, queue: Any, state: str, n: int) -> None:
        """
        C{n} messages of C{state} are gone: lower the queue's count, unless
        the queue restarted meanwhile (it counted the disk again).
        """
        if n and queue is not None and self._queue(name) is queue and state in queue.counts:
            queue.counts[state] = max(0, queue.counts[state] - n)

    def set_aside(self, name: str, now: float, keep_days: int) -> list[tuple[str, str]]:
        """
        Rename the expired buckets and acknowledged errors of queue C{name}
        into its C{tmp/}, in the reactor thread (one rename each), so no
        queue ever moves a message into a directory being deleted.

        @return: C{(state, path in tmp/)} of each bucket set aside.
        """
        qpath = self.instance.root.queue_path(name)
        tmp = os.path.join(qpath, "tmp")
        os.makedirs(tmp, exist_ok=True)
        queue = self._queue(name)
        aside: list[tuple[str, str]] = []
        for state in sorted(HASHED_STATES):
            state_dir = os.path.join(qpath, state)
            buckets = expired_buckets(
                _listdir(state_dir),
                lambda day: _listdir(os.path.join(state_dir, day)),
                now,
                keep_days,
            )
            for bucket in buckets:
                source = bucket.path(state_dir)
                trash = os.path.join(tmp, f"{TRASH_PREFIX}{state}-{bucket.label}-{next(self._serial)}")
                try:
                    os.rename(source, trash)
                except FileNotFoundError:
                    continue
                if queue is not None:
                    queue.store.forget_dirs(source)
                    forget_bucket(queue, state, bucket.day, bucket.hour)
                aside.append((state, trash))
        cutoff = now - keep_days * 86400
        err_dir = os.path.join(qpath, "err")
        acked = [
            n for n in _listdir(err_dir)
            if n.startswith(".") and valid_msg_id(n[1:]) and (id_time(n[1:]) or now) <= cutoff
        ]
        if acked:
            trash = os.path.join(tmp, f"{TRASH_PREFIX}errack-{next(self._serial)}")
            os.mkdir(trash)
            for n in acked:
                try:
                    os.rename(os.path.join(err_dir, n), os.path.join(trash, n[1:]))
                except FileNotFoundError:
                    continue
            if queue is not None:
                forget_ids(queue, [n[1:] for n in acked] + acked)
            aside.append(("errack", trash))
        return aside

    async def clean_queue(self, name: str, now: float, keep_days: int) -> int:
        """
        Remove the expired messages of queue C{name}; how many.
        """
        queue = self._queue(name)
        total = 0
        for state, trash in self.set_aside(name, now, keep_days):
            gone = False
            while not gone:
                removed, gone = await self.run_in_thread(purge, trash, self.batch)
                self._drop_count(name, queue, state, removed)
                total += removed
        return total

    async def trim_relayed(self) -> int:
        """
        Keep the newest L{RELAYED_KEEP} messages of C{queue/relay/relayed}.
        """
        state_dir = os.path.join(self.instance.root.queue_path("relay"), "relayed")
        queue = self._queue("relay")
        paths = await self.run_in_thread(oldest_beyond, state_dir, RELAYED_KEEP)
        if queue is not None and paths:
            forget_ids(queue, [os.path.basename(p) for p in paths])
        total = 0
        for start in range(0, len(paths), self.batch):
            removed = await self.run_in_thread(remove_messages, paths[start : start + self.batch])
            self._drop_count("relay", queue, "relayed", removed)
            total += removed
        return total


def make_handler(instance: "Instance") -> CleanerHandler:
    """
    The C{cleaner} handler of a running instance (L{rqtwisted.builtin}).
    """
    return CleanerHandler(instance, reactor_pool(instance.clock))
