"""
The queue-script pipe protocol (script-api.md) as pure code.

Bytes a worker writes on fd 3 go in, L{Report}s come out; the exit status and
the first completion verb go in, an L{Outcome} comes out. No I/O happens here,
so every rule is tested with plain bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Verbs that complete a message; the first one received wins.
COMPLETION_VERBS = frozenset({"done", "err", "fails", "relayed", "resend"})

#: The longest line kept; a longer one is cut (its status text would be
#: useless and it must not grow the daemon's memory without bound).
MAX_LINE = 64 * 1024

#: C{resend <seconds>[-<reason>]}: the seconds are the leading number, as
#: the original read them (Ruby's C{to_i}: C{60 waiting}, C{10s} are 60 and 10).
_RESEND_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)(.*)$", re.S)
#: C{dup <due>-<flag>-<newdest>}, the due read the same way.
_DUP_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)[^-]*-([^-]*)-(.+)$", re.S)


@dataclass(frozen=True)
class Report:
    """
    One line from a worker: C{<verb> <text>}.
    """

    verb: str
    text: str

    @classmethod
    def fromLine(cls, line: bytes) -> "Report":
        """
        Parse one line (without its newline): the verb runs to the first
        space, the rest is the text.
        """
        decoded = line.decode("utf-8", "replace").rstrip("\r")
        verb, _, text = decoded.partition(" ")
        return cls(verb, text)


class ReportParser:
    """
    Split a byte stream into L{Report}s, carrying partial lines across reads
    (quirks 3).

    A line longer than L{MAX_LINE} bytes is cut to its first L{MAX_LINE}
    bytes and the rest of it, up to its newline, is dropped: the reports do
    not depend on how the stream was chunked.
    """

    def __init__(self) -> None:
        self._buffer = b""
        # Inside an over-long line already reported: drop bytes up to its
        # newline.
        self._skipping = False

    def feed(self, data: bytes) -> list[Report]:
        """
        Add C{data}; return the reports of every line it completes.
        """
        reports: list[Report] = []
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return reports
            self._skipping = False
            data = data[end + 1 :]
        self._buffer += data
        if b"\n" in data:
            *lines, self._buffer = self._buffer.split(b"\n")
            reports.extend(Report.fromLine(line[:MAX_LINE]) for line in lines)
        if len(self._buffer) > MAX_LINE:
            reports.append(Report.fromLine(self._buffer[:MAX_LINE]))
            self._buffer = b""
            self._skipping = True
        return reports

    def close(self) -> list[Report]:
        """
        The stream ended: a last line without its newline still counts.
        """
        rest, self._buffer = self._buffer, b""
        self._skipping = False
        return [Report.fromLine(rest)] if rest else []


@dataclass(frozen=True)
class Resend:
    """
    A parsed C{resend <seconds>[-<reason>]} text.
    """

    delay: float
    reason: str


#: The longest delay a C{resend} or C{dup} asks for that is kept (about
#: 100 years): longer ones, up to numbers of hundreds of digits, are cut to
#: it, so that a due time stays a number.
MAX_DELAY = 100 * 365 * 86400.0


def _delay(digits: str) -> float:
    return max(-MAX_DELAY, min(float(digits), MAX_DELAY))


def parse_resend(text: str) -> Resend:
    """
    Parse the text of a C{resend} report: the delay is its leading number
    (C{60-busy}, C{60 busy}, C{60s}: 60 s); text without one counts as 0, a
    negative delay too, one over L{MAX_DELAY} as L{MAX_DELAY}. The reason
    is what follows the C{-} (or, without one, the rest).
    """
    match = _RESEND_RE.match(text)
    if match is None:
        return Resend(0.0, text)
    rest = match.group(2).strip()
    return Resend(max(0.0, _delay(match.group(1))), rest[1:] if rest.startswith("-") else rest)


@dataclass(frozen=True)
class Dup:
    """
    A parsed C{dup <due>-<flag>-<newdest>} text.
    """

    delay: float
    flag: str
    dest: str


def parse_dup(text: str) -> Dup | None:
    """
    Parse the text of a C{dup} report, or L{None} when malformed; a delay
    beyond L{MAX_DELAY} either way is cut to it.
    """
    match = _DUP_RE.match(text)
    if match is None:
        return None
    dest = match.group(3).strip()
    if not dest:
        return None
    return Dup(_delay(match.group(1)), match.group(2), dest)


@dataclass(frozen=True)
class Outcome:
    """
    Where a message goes when its worker exits, and the status text to write
    (L{None}: keep the last text the script reported).
    """

    state: str
    status: str | None = None
    delay: float = 0.0


def describe_exit(exit_code: int | None, signal: int | None) -> str:
    """
    Describe an exit the way Ruby's C{Process::Status#to_s} does, e.g.
    C{pid 42 exit 3} without the pid: C{exit 3}, C{SIGKILL (signal 9)}.
    """
    if signal is not None:
        import signal as _signal

        try:
            name = _signal.Signals(signal).name
        except ValueError:
            name = f"signal {signal}"
        return f"{name} (signal {signal})"
    return f"exit {exit_code}"


def outcome(
    completion: Report | None,
    exit_code: int | None,
    signal: int | None,
    count: int,
    max_count: int,
) -> Outcome:
    """
    Apply the completion table of script-api.md.

    @param completion: the first completion report, if any.
    @param exit_code: the exit status, or L{None} when killed by a signal.
    @param signal: the signal that killed the worker, if any.
    @param count: the message's C{count} (already incremented by C{resend}).
    @param max_count: the message's C{max_count}.
    """
    verb = completion.verb if completion is not None else ""
    if verb == "fails":
        verb = "err"
    if verb == "err":
        return Outcome("err")
    if exit_code != 0:
        return Outcome(
            "err",
            "PROCESS EXITED IMPROPERLY - MOVING TO ERR - Completion was "
            f"{verb} but exit status was {describe_exit(exit_code, signal)}",
        )
    if verb == "done":
        return Outcome("done")
    if verb == "relayed":
        return Outcome("relayed")
    if verb == "resend":
        if count >= max_count:
            return Outcome("err", "HIT MAX RESEND COUNT - MOVING TO ERR")
        assert completion is not None
        return Outcome("que", delay=parse_resend(completion.text).delay)
    return Outcome("err")
