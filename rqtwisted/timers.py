"""
Timers: periodic messages from C{<root>/timers/} (special-queues.md).

Each C{timers/<name>.json} (a file or a symlink to one; exactly one C{.} in
the file name) holds C{{"period": <seconds, int from 60 to L{MAX_PERIOD}>,
"msg": {"dest": <queue or URL>, "param1".."param4": optional}}}. A due timer
creates a message with that C{dest} and those params (a URL C{dest} goes
through the local C{relay} queue) and becomes due again C{period} seconds
later.

L{TimerService} rescans the directory every L{RESCAN_INTERVAL} seconds (and
on C{rq reload} / SIGHUP): a new timer is due at once (each further new one
of the same scan 2 s later), a changed file (size, mtime, inode: recorded,
so an unchanged timer never fires again at the next scan, quirks 31) is due
at once with its new content, a removed file drops its timer. Files that
cannot be read or are invalid are listed with their error and never fire.
Due times live in memory: after a restart every timer is new, so it fires
once at start.

Due times are wall-clock times, as the reactor's calls are: when the clock
steps back, the pending calls (the next run, the next rescan) wait for the
size of the step. A rescan that runs meanwhile (C{rq reload}) makes a timer
that has run due one period later at the latest (L{Timer.catch_up}).

C{rq status} shows every timer (L{TimerService.status}):
C{{"name", "period", "dest", "next_run", "last_run", "sent", "error"}}; the
home page lists them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import internet
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.filekey import FileKey, file_key
from rqtwisted.fsync import read_config
from rqtwisted.message import JSON_READ_ERRORS, MessageError

_log = Logger()

#: Seconds between rescans of C{timers/} (the spec asks for at most 60).
RESCAN_INTERVAL = 10.0

#: Seconds between the first runs of timers found by the same scan.
STAGGER = 2.0

#: The shortest period accepted.
MIN_PERIOD = 60

#: The longest period accepted (100 years): due times stay exact floats.
MAX_PERIOD = 100 * 365 * 86400

#: Keys of C{msg} copied into the message.
MSG_KEYS = ("dest", "param1", "param2", "param3", "param4")

#: Creates a message (the instance's C{create_message} with relaying allowed);
#: fires with the full id.
Send = Callable[[dict[str, Any]], "Deferred[str]"]


class TimerError(Exception):
    """
    A timer file is invalid; C{reason} says why.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_timer(data: Any) -> tuple[int, dict[str, Any]]:
    """
    Validate the content of a timer file: C{(period, message fields)}.

    @raise TimerError: not a valid timer.
    """
    if not isinstance(data, dict):
        raise TimerError("timer must be a JSON object")
    period = data.get("period")
    if isinstance(period, bool) or not isinstance(period, int):
        raise TimerError("period must be an integer number of seconds")
    if period < MIN_PERIOD:
        raise TimerError(f"period must be at least {MIN_PERIOD} seconds")
    if period > MAX_PERIOD:
        raise TimerError(f"period must be at most {MAX_PERIOD} seconds (100 years)")
    msg = data.get("msg")
    if not isinstance(msg, dict):
        raise TimerError("msg must be a JSON object")
    dest = msg.get("dest")
    if not isinstance(dest, str) or not dest:
        raise TimerError('msg is missing "dest"')
    fields: dict[str, Any] = {}
    for key in MSG_KEYS:
        if key in msg:
            value = msg[key]
            if value is not None and not isinstance(value, (str, int, float)):
                raise TimerError(f"msg {key} must be text")
            fields[key] = value if value is None or isinstance(value, str) else str(value)
    return period, fields


def timer_name(filename: str) -> str | None:
    """
    The timer a file of C{timers/} defines: C{<name>} of C{<name>.json}
    (exactly one dot), else C{None}.
    """
    if filename.count(".") != 1 or not filename.endswith(".json"):
        return None
    name = filename[: -len(".json")]
    return name or None


@dataclass
class Timer:
    """
    One timer file and its schedule.

    @ivar stat: the L{file_key} of the file when last read.
    @ivar next_run: epoch seconds of its next run (C{None}: invalid).
    @ivar last_run: epoch seconds of its last run, if any.
    @ivar error: why the file is invalid or why the last send failed.
    """

    name: str
    path: str
    stat: FileKey
    period: int | None = None
    msg: dict[str, Any] | None = None
    next_run: float | None = None
    last_run: float | None = None
    error: str | None = None
    sent: int = 0

    def load(self, now: float) -> None:
        """
        (Re-)read the file; a valid timer is due at C{now}.
        """
        self.period = self.msg = self.next_run = None
        try:
            # (A FIFO or a huge file in timers/ must not block the reactor:
            # see read_config.)
            data = json.loads(read_config(self.path))
            self.period, self.msg = parse_timer(data)
        except JSON_READ_ERRORS as e:
            self.error = f"cannot read {os.path.basename(self.path)}: {e}"
        except TimerError as e:
            self.error = e.reason
        else:
            self.error = None
            self.next_run = now

    def catch_up(self, now: float) -> None:
        """
        After the wall clock went back (C{now} is before the last run): be
        due one period from C{now} at the latest, rather than that period
        plus the size of the step.
        """
        if self.last_run is None or self.next_run is None or self.period is None:
            return
        if self.last_run > now and self.next_run > now + self.period:
            self.next_run = now + self.period

    def status(self) -> dict[str, Any]:
        """
        C{{"name", "period", "dest", "next_run", "last_run", "sent",
        "error"}}: C{dest} is that of its message (C{None} while invalid),
        C{sent} how many messages it created since the daemon started.
        """
        return {
            "name": self.name,
            "period": self.period,
            "dest": None if self.msg is None else self.msg.get("dest"),
            "next_run": None if self.next_run is None else int(self.next_run),
            "last_run": None if self.last_run is None else int(self.last_run),
            "sent": self.sent,
            "error": self.error,
        }


class TimerService(internet.TimerService):
    """
    Runs the timers of C{timers/}: L{rescan} every C{rescan_interval}
    seconds from start, and a delayed call for the next due timer.

    @ivar timers: the known timers by name.
    """

    def __init__(
        self,
        directory: str,
        send: Send,
        clock: IReactorTime,
        rescan_interval: float = RESCAN_INTERVAL,
    ) -> None:
        """
        @param directory: C{<root>/timers}.
        @param send: creates a message from C{{dest, param1..4}}.
        @param clock: time source.
        @param rescan_interval: seconds between rescans.
        """
        super().__init__(rescan_interval, self.rescan)
        self.clock = clock
        self.directory = directory
        self.send = send
        self.rescan_interval = rescan_interval
        self.timers: dict[str, Timer] = {}
        self._call: IDelayedCall | None = None

    def stopService(self) -> Any:
        """
        Stop scanning and firing.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return super().stopService()

    def _files(self) -> dict[str, tuple[str, FileKey | None]]:
        """
        C{{name: (path, L{file_key} or None for a dangling link)}}.
        """
        try:
            names = sorted(os.listdir(self.directory))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found: dict[str, tuple[str, FileKey | None]] = {}
        for filename in names:
            name = timer_name(filename)
            if name is not None:
                path = os.path.join(self.directory, filename)
                found[name] = (path, file_key(path))
        return found

    def rescan(self) -> None:
        """
        Pick up new, changed and removed timer files.
        """
        now = self.clock.seconds()
        files = self._files()
        for name in list(self.timers):
            if name not in files:
                _log.info("timer {timer} removed", timer=name)
                del self.timers[name]
        fresh = 0
        for name, (path, stat) in files.items():
            timer = self.timers.get(name)
            key = stat if stat is not None else (-1, -1, -1)
            if timer is not None and timer.stat == key and timer.path == path:
                timer.catch_up(now)
                continue
            if timer is None:
                timer = self.timers[name] = Timer(name, path, key)
                due = now + STAGGER * fresh
                fresh += 1
            else:
                timer.path, timer.stat = path, key
                due = now
            if stat is None:
                timer.period = timer.msg = timer.next_run = None
                timer.error = f"cannot read {os.path.basename(path)}: dangling link"
            else:
                timer.load(due)
            if timer.error is not None:
                _log.error("timer {timer} invalid: {reason}", timer=name, reason=timer.error)
            else:
                _log.info("timer {timer} loaded: every {period}s", timer=name, period=timer.period)
        self._arm()

    def _arm(self) -> None:
        if not self.running:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        dues = [t.next_run for t in self.timers.values() if t.next_run is not None]
        if dues:
            delay = max(0.0, min(dues) - self.clock.seconds())
            self._call = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = None
        now = self.clock.seconds()
        for timer in list(self.timers.values()):
            if timer.next_run is None or timer.next_run > now or timer.period is None or timer.msg is None:
                continue
            timer.last_run = now
            timer.next_run += timer.period
            if timer.next_run <= now:
                timer.next_run = now + timer.period
            self._send(timer)
        self._arm()

    def _send(self, timer: Timer) -> None:
        assert timer.msg is not None
        d = maybeDeferred(self.send, dict(timer.msg))

        def sent(full_id: str) -> None:
            timer.sent += 1
            timer.error = None
            _log.info("timer {timer} sent {msg}", timer=timer.name, msg=full_id)

        def failed(failure: Failure) -> None:
            reason = failure.value.reason if failure.check(MessageError) else failure.getErrorMessage()
            timer.error = f"send failed: {reason}"
            _log.error("timer {timer}: {reason}", timer=timer.name, reason=timer.error)

        d.addCallbacks(sent, failed)

    def status(self) -> list[dict[str, Any]]:
        """
        Every timer, by name (L{Timer.status}).
        """
        return [self.timers[name].status() for name in sorted(self.timers)]
