"""
Cron schedules of a queue: the C{schedule} list of its C{config.json}.

An entry is C{{"cron": <spec>, "params": {"param1".."param4"}}} (what
C{create_queue} writes) or C{{"cron": <spec>, "param1".."param4"}} (what the
original's loader reads); both are accepted (quirks 14) and normalised to the
first shape by L{normalize_schedule}. A spec is five cron fields or one of
C{@yearly @annually @monthly @weekly @daily @midnight @hourly}, in local time,
evaluated by C{croniter}; invalid entries are dropped.

While the queue is C{UP}, each scheduling pass calls L{QueueCron.tick}: for
each entry whose next fire time is less than L{LOOKAHEAD} seconds away and not
queued yet, a message C{{src: "cron", due: <fire time>, param1..4}} is
created. So a job is queued up to a minute early with the exact C{due}, and
nothing is queued while the queue is PAUSE, DOWN or SCRIPTERROR (a fire time
that passes meanwhile is skipped, as cron skips jobs while it is stopped).

"Already queued" is tracked per entry (quirks 13), on two levels:

  - C{queue/<name>/cron.json} maps each entry's key (a digest of its spec and
    params) to the last fire time queued for it, written durably after each
    creation (a temp file synced before it is renamed over the record, so a
    crash leaves the old record or the new one, never an empty or partial
    one; one write at a time, the records made meanwhile go with the next);
  - the message id of a cron job is derived from the entry's key and the fire
    minute (L{cron_msg_id}), and is looked up before creating: a crash between
    creating the message and recording it cannot queue the job twice.

Daylight saving time follows Vixie cron: in the hour repeated when clocks go
back, a job with a fixed minute and hour runs once (the second occurrence is
skipped) while a job whose minute or hour field starts with C{*} runs on real
time; a fixed time skipped when clocks go forward runs at the first minute
after the change (croniter's behaviour).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.durable import dumps, replace_durably, replace_file
from rqtwisted.fsync import read_config
from rqtwisted.message import JSON_READ_ERRORS, PARAM_KEYS, MessageError, make_msg_id

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from rqtwisted.durable import Syncer

#: Named specs accepted besides five fields (queues.md).
NAMED_SPECS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")

#: Jobs are queued at most this many seconds before their fire time.
LOOKAHEAD = 60.0

#: A fire time this many seconds in the past is still queued (a queue that
#: comes UP right at the fire time).
GRACE = 1.0

#: The per-entry record of queued fire times, in the queue directory.
STATE_FILE = "cron.json"

#: Message id suffixes of cron jobs start here, far above the store's range.
_CRON_SUFFIX_BASE = 2_000_000_000


_log = Logger()


def _param_value(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


#: A value of croniter's own random (C{R}) or hashed (C{H}) kind: no cron
#: value starts with either letter (month and day names do not).
_RANDOM_VALUE = re.compile(r"(?:^|[\s,/-])[HhRr]")


def valid_spec(spec: Any) -> bool:
    """
    Is C{spec} five cron fields or one of L{NAMED_SPECS}? croniter's
    random and hashed values (C{R}, C{H}) are not cron: each evaluation
    would pick another time, so an entry would fire at no fixed time, and
    more than once per period.
    """
    if not isinstance(spec, str):
        return False
    spec = spec.strip()
    if spec.startswith("@"):
        return spec in NAMED_SPECS
    return len(spec.split()) == 5 and not _RANDOM_VALUE.search(spec) and croniter.is_valid(spec)


def normalize_schedule(raw: Any) -> tuple[dict[str, Any], ...]:
    """
    The C{schedule} of a queue config as C{({"cron", "params"}, ...)}.

    Accepts params nested under C{params} and at the top level of an entry
    (quirks 14; top-level values win); drops entries that are not objects or
    whose spec is invalid.
    """
    if not isinstance(raw, list):
        return ()
    out = []
    for item in raw:
        if not isinstance(item, dict) or not valid_spec(item.get("cron")):
            continue
        params: dict[str, str | None] = {}
        nested = item.get("params")
        for source in (nested if isinstance(nested, dict) else {}, item):
            for key in PARAM_KEYS:
                if key in source:
                    params[key] = _param_value(source[key])
        out.append({"cron": item["cron"].strip(), "params": {k: params[k] for k in PARAM_KEYS if k in params}})
    return tuple(out)


@dataclass(frozen=True)
class CronEntry:
    """
    One schedule entry.

    @ivar cron: the spec.
    @ivar params: C{param1..4} of its messages.
    @ivar key: its identity: a digest of spec and params (plus a counter
        for identical entries), stable across reloads and reorderings.
    """

    cron: str
    params: Mapping[str, str | None]
    key: str

    @property
    def fixed_time(self) -> bool:
        """
        Does the entry fire at a fixed minute and hour (Vixie cron's rule
        for the repeated hour at the end of DST)?
        """
        spec = self.cron
        if spec == "@hourly":
            return False
        if spec.startswith("@"):
            return True
        minute, hour = spec.split()[:2]
        return not (minute.startswith("*") or hour.startswith("*"))


def entries_of(schedule: Iterable[Mapping[str, Any]]) -> list[CronEntry]:
    """
    L{CronEntry}s of a normalised schedule (L{normalize_schedule}).
    """
    seen: dict[str, int] = {}
    out = []
    for item in schedule:
        params = dict(item.get("params") or {})
        digest = hashlib.sha1(
            json.dumps([item["cron"], params], sort_keys=True).encode("utf-8")
        ).hexdigest()[:16]
        n = seen.get(digest, 0)
        seen[digest] = n + 1
        out.append(CronEntry(item["cron"], params, f"{digest}-{n}"))
    return out


def local_zone() -> tzinfo:
    """
    The local time zone with its DST rules: C{$TZ}, else
    C{/etc/localtime}, else UTC.
    """
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return ZoneInfo("UTC")


def next_fire(entry: CronEntry, after: float, tz: tzinfo) -> float | None:
    """
    The first fire time of C{entry} strictly after epoch C{after}, or
    C{None} if it never fires (e.g. C{0 0 31 2 *}).
    """
    it = croniter(entry.cron, datetime.fromtimestamp(after, tz))
    for _ in range(4):
        try:
            when: datetime = it.get_next(datetime)
        except CroniterBadDateError:
            return None
        if when.fold and entry.fixed_time:
            # The second occurrence of an ambiguous wall-clock time.
            continue
        return when.timestamp()
    return None


def cron_msg_id(entry: CronEntry, fire: float) -> str:
    """
    The id of the message of C{entry} firing at C{fire}: unique per entry and
    minute, so it can be looked up before creating it again.
    """
    minute = int(fire // 60 * 60)
    digest = hashlib.sha1(f"{entry.key}@{minute}".encode()).hexdigest()
    suffix = _CRON_SUFFIX_BASE + int(digest[:12], 16) % 1_000_000_000
    return make_msg_id(minute - LOOKAHEAD, suffix)


class CronQueue(Protocol):
    """
    What L{QueueCron} needs of its queue (L{rqtwisted.queue.QueueService}).
    """

    name: str

    def status(self) -> str:
        """
        C{UP}, C{PAUSE}, C{DOWN} or C{SCRIPTERROR}.
        """

    def create(self, data: Mapping[str, Any], method: str = "commit", *, msg_id: str | None = None) -> Any:
        """
        Create a message; a Deferred firing with its full id.
        """

    def locate(self, msg_id: str) -> str:
        """
        The state of a message; raises L{rqtwisted.message.MessageError}.
        """


class QueueCron:
    """
    The schedule of one queue, driven by the queue's scheduling passes.

    @ivar entries: the schedule.
    @ivar last: entry key -> last fire time queued (persisted).
    """

    def __init__(
        self,
        queue: CronQueue,
        schedule: Iterable[Mapping[str, Any]],
        clock: "IReactorTime",
        state_path: str,
        syncer: "Syncer | None" = None,
        tz: tzinfo | None = None,
    ) -> None:
        """
        @param queue: the queue (see L{CronQueue}).
        @param schedule: its normalised schedule.
        @param clock: time source.
        @param state_path: where the per-entry record lives (L{STATE_FILE}).
        @param syncer: makes the record durable (none: written, not synced).
        @param tz: the zone specs are read in (default L{local_zone}).
        """
        self.queue = queue
        self.entries = entries_of(schedule)
        self.clock = clock
        self.state_path = state_path
        self.syncer = syncer
        self.tz = tz if tz is not None else local_zone()
        self.last: dict[str, float] = self._load()
        self._inflight: set[str] = set()
        self._never: set[str] = set()
        #: entry key -> its first fire time after some earlier start: still
        #: the first one after any later start before it (passes are cheap).
        self._next: dict[str, float] = {}
        #: A write of the record is under way (L{_save}).
        self._writing = False
        #: Records were made while it was: write again once it is done.
        self._again = False

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(read_config(self.state_path))
        except FileNotFoundError:
            return {}
        except JSON_READ_ERRORS as e:
            _log.warn("cron record {path} unreadable ({error}); starting afresh", path=self.state_path, error=e)
            return {}
        if not isinstance(data, dict):
            return {}
        out: dict[str, float] = {}
        for key, value in data.items():
            if not isinstance(value, (int, float)):
                continue
            try:
                fire = float(value)
            except OverflowError:
                continue
            # (An infinity would stop the entry for good.)
            if math.isfinite(fire):
                out[str(key)] = fire
        return out

    def _record_data(self) -> bytes:
        keys = {e.key for e in self.entries}
        return dumps({k: v for k, v in sorted(self.last.items()) if k in keys})

    def _save(self) -> None:
        """
        Write the record durably (L{replace_durably}: its C{fsync}s off the
        reactor thread), one write at a time: while one is under way, the
        next starts once it is done, with the records of then. (Until a
        record is on disk, a restart finds its job by its message id.)
        """
        if self.syncer is None:
            replace_file(self.state_path, self._record_data())
            return
        if self._writing:
            self._again = True
            return
        self._writing = True
        self._again = False
        try:
            d = replace_durably(self.syncer, self.state_path, self._record_data())
        except OSError:
            self._writing = False
            _log.failure("queue {queue}: cron record {path} not written", queue=self.queue.name, path=self.state_path)
            return

        def done(result: object) -> None:
            self._writing = False
            if isinstance(result, Failure):
                _log.failure(
                    "queue {queue}: cron record {path} not written", result, queue=self.queue.name, path=self.state_path
                )
            if self._again:
                self._save()

        d.addBoth(done)

    def fire_after(self, entry: CronEntry, after: float) -> float | None:
        """
        The next fire time of C{entry} after C{after} (C{None}: never).
        """
        if entry.key in self._never:
            return None
        when = next_fire(entry, after, self.tz)
        if when is None:
            self._never.add(entry.key)
        return when

    def tick(self) -> None:
        """
        Queue every job due within L{LOOKAHEAD} seconds that is not queued
        yet; nothing unless the queue is C{UP}. Never raises.
        """
        if not self.entries or self.queue.status() != "UP":
            return
        now = self.clock.seconds()
        for entry in self.entries:
            if entry.key in self._inflight:
                continue
            try:
                self._check(entry, now)
            except Exception:
                _log.failure("queue {queue}: cron entry '{cron}' failed", queue=self.queue.name, cron=entry.cron)

    def _check(self, entry: CronEntry, now: float) -> None:
        start = max(now - GRACE, self.last.get(entry.key, -math.inf))
        fire = self._next.get(entry.key)
        if fire is None or fire <= start:
            fire = self.fire_after(entry, start)
            if fire is None:
                return
            self._next[entry.key] = fire
        if fire - now >= LOOKAHEAD:
            return
        msg_id = cron_msg_id(entry, fire)
        try:
            self.queue.locate(msg_id)
        except MessageError:
            pass
        else:
            self._record(entry, fire)
            return
        fields: dict[str, Any] = {"dest": self.queue.name, "src": "cron", "due": int(fire)}
        fields.update(entry.params)
        self._inflight.add(entry.key)
        try:
            d = self.queue.create(fields, "commit", msg_id=msg_id)
        except BaseException:
            self._inflight.discard(entry.key)
            raise

        def created(full: str) -> None:
            self._inflight.discard(entry.key)
            self._record(entry, fire)
            _log.info("queue {queue}: cron '{cron}' queued {msg}", queue=self.queue.name, cron=entry.cron, msg=full)

        def failed(failure: Any) -> None:
            self._inflight.discard(entry.key)
            _log.failure("queue {queue}: cron '{cron}' could not queue", failure, queue=self.queue.name, cron=entry.cron)

        d.addCallbacks(created, failed)

    def _record(self, entry: CronEntry, fire: float) -> None:
        if self.last.get(entry.key, -math.inf) < fire:
            self.last[entry.key] = fire
            self._save()

    def status(self) -> list[dict[str, Any]]:
        """
        C{[{"cron", "params", "next_run"}]}: each entry and its next fire
        time (epoch seconds; C{None} if it never fires).
        """
        now = self.clock.seconds()
        out = []
        for entry in self.entries:
            fire = self.fire_after(entry, now - GRACE)
            out.append(
                {
                    "cron": entry.cron,
                    "params": dict(entry.params),
                    "next_run": None if fire is None else int(fire),
                }
            )
        return out


def make_cron(
    queue: CronQueue,
    schedule: Iterable[Mapping[str, Any]],
    clock: "IReactorTime",
    queue_dir: str,
    syncer: "Syncer | None" = None,
    previous: QueueCron | None = None,
) -> QueueCron:
    """
    The L{QueueCron} of a queue whose directory is C{queue_dir}; with
    C{previous} (a reload), its zone and records carry over.
    """
    cron = QueueCron(
        queue,
        schedule,
        clock,
        os.path.join(queue_dir, STATE_FILE),
        syncer,
        tz=previous.tz if previous is not None else None,
    )
    if previous is not None:
        for key, fire in previous.last.items():
            cron.last[key] = max(fire, cron.last.get(key, -math.inf))
        cron._inflight = previous._inflight
    return cron


__all__ = [
    "CronEntry",
    "CronQueue",
    "GRACE",
    "LOOKAHEAD",
    "NAMED_SPECS",
    "QueueCron",
    "STATE_FILE",
    "cron_msg_id",
    "entries_of",
    "local_zone",
    "make_cron",
    "next_fire",
    "normalize_schedule",
    "valid_spec",
]
