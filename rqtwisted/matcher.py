"""
Matching a message against the router's rules out of the daemon's process.

A rule's regular expression is the user's own: one with catastrophic
backtracking (C{/^(a+)+$/} against forty C{a} and a C{!}) runs for ages,
and Python's C{re} can neither be interrupted nor let another thread run
meanwhile. The original routed each message in a process of its own, under
a 60 s alarm. Here the rules are still read and checked in the daemon
(L{rqtwisted.rules}); only the matching of a message runs in a long-lived
child, C{python -m rqtwisted.matcher <daemon pid>}, one request at a time,
over a line protocol:

  - in, one JSON object per line: C{{"rules": [[src, dest], ...], "src":
    ..., "dest": ...}}, where a rule's C{src} and C{dest} are C{[pattern,
    flags]} (its expression as compiled for Python) or C{null}, and the
    message's fields are strings or C{null} (missing, or not text);
  - out, one JSON object per line: C{{"match": <index of the first rule
    matching, or null for none>}}, or C{{"error": <reason>}}.

L{ProcessMatcher} runs that child on the reactor: started at the first
match, fed the queued requests one at a time, and killed (C{SIGKILL}) when
the match in flight is cancelled (the router's time limit, the message
destroyed, its queue stopping); the next request gets a fresh child. A
child idle for L{IDLE_EXIT} seconds is told to exit (its stdin closed).

The child exits at end of file on its stdin (the daemon closed it, or
died). On Linux it is also killed when the daemon dies
(C{PR_SET_PDEATHSIG}), even in the middle of a match; elsewhere an alarm
(C{SIGALRM} left to its default action, which ends the process even while
C{re} runs) ends any match after L{CHILD_ALARM} seconds.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import os
import re
import signal
import sys
from typing import Any, BinaryIO, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.rules import Regex, Rule, RuleSet

_log = Logger()

#: Seconds an idle child is kept before it is told to exit.
IDLE_EXIT = 30.0

#: Seconds after which a child still matching ends itself: longer than the
#: router lets a message run (L{rqtwisted.router.MAX_RUN}), so only a child
#: whose daemon is gone meets it.
CHILD_ALARM = 120

#: The longest reply line read from the child (bytes).
MAX_REPLY = 4096

#: The child's module (C{python -m MODULE}).
MODULE = "rqtwisted.matcher"

_PR_SET_PDEATHSIG = 1


# -- the request and the match (pure code, run in the child) ------------------------


def _expression(regex: Regex | None) -> list[Any] | None:
    return None if regex is None else [regex.pattern.pattern, regex.pattern.flags]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def request_for(rules: RuleSet, msg: Mapping[str, Any]) -> dict[str, Any]:
    """
    The request matching C{msg} against C{rules}: their expressions (as
    compiled for Python) and the message's C{src} and C{dest}.
    """
    return {
        "rules": [[_expression(rule.src), _expression(rule.dest)] for rule in rules.rules],
        "src": _text(msg.get("src")),
        "dest": _text(msg.get("dest")),
    }


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str, flags: int) -> re.Pattern[str]:
    return re.compile(pattern, flags)


def first_match(request: Mapping[str, Any]) -> int | None:
    """
    The index of the first rule of C{request} (L{request_for}) matching
    its message, as L{rqtwisted.rules.Rule.matches} decides: every
    expression the rule has must be found in its field, and a missing field
    fails the match. L{None} when no rule matches.

    @raise ValueError, TypeError, re.error: not a well-formed request.
    """
    fields = (request.get("src"), request.get("dest"))
    for index, rule in enumerate(request["rules"]):
        for expr, value in zip(rule, fields):
            if expr is None:
                continue
            pattern, flags = expr
            if not isinstance(value, str) or _compiled(pattern, flags).search(value) is None:
                break
        else:
            return index
    return None


def serve(stdin: BinaryIO, stdout: BinaryIO, alarm: int = CHILD_ALARM) -> None:
    """
    Answer requests, one JSON line in, one out, until end of file on
    C{stdin}. Each match runs under an alarm of C{alarm} seconds (0: none).
    """
    for line in stdin:
        try:
            request = json.loads(line)
            if alarm:
                signal.alarm(alarm)
            try:
                reply: dict[str, Any] = {"match": first_match(request)}
            finally:
                if alarm:
                    signal.alarm(0)
        except (ValueError, TypeError, KeyError, AttributeError, re.error, RecursionError) as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps(reply).encode("ascii") + b"\n")
        stdout.flush()


def _die_with(parent: int) -> None:
    """
    Be killed when process C{parent} ends (Linux); exit at once if it
    already has.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent and os.getppid() != parent:
        sys.exit(0)


def main(argv: list[str]) -> None:
    """
    The child: C{python -m rqtwisted.matcher [<daemon pid>]}.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C to the daemon's group is the daemon's
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    _die_with(int(argv[1]) if len(argv) > 1 else 0)
    serve(sys.stdin.buffer, sys.stdout.buffer)


# -- the daemon's side -----------------------------------------------------------------


class MatcherError(Exception):
    """
    The matcher child failed: it could not start, died, or answered
    something else than a match.
    """


class _Pending:
    """
    A request waiting for, or in, the child.
    """

    def __init__(self, line: bytes, count: int) -> None:
        self.line = line
        self.count = count
        self.deferred: Deferred[int | None] = Deferred()


class _ChildProtocol(ProcessProtocol):
    """
    One matcher child: reply lines and its end go to its L{ProcessMatcher}.
    """

    def __init__(self, owner: "ProcessMatcher") -> None:
        self.owner = owner
        self.buffer = b""

    def outReceived(self, data: bytes) -> None:
        """
        Split the child's output into reply lines.
        """
        self.buffer += data
        while b"\n" in self.buffer and self.owner._protocol is self:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.owner._replied(self, line)
        if len(self.buffer) > MAX_REPLY:
            self.owner._broken(self, f"a reply longer than {MAX_REPLY} bytes")

    def errReceived(self, data: bytes) -> None:
        """
        Log what the child writes to its stderr.
        """
        _log.warn("rule matcher: {text}", text=data.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason: Failure) -> None:
        """
        Tell the owner the child is gone.
        """
        self.owner._ended(self, reason)


class ProcessMatcher:
    """
    Match messages against rules in a child process (the module's
    docstring): called as C{matcher(rules, msg)}, it returns a L{Deferred}
    firing with the first rule matching (C{rules.default} when none does),
    or failing with L{MatcherError}. Cancelling it kills the child if it is
    the match running.
    """

    def __init__(
        self,
        reactor: Any,
        argv: list[str] | None = None,
        env: Mapping[str, str] | None = None,
        idle_exit: float = IDLE_EXIT,
    ) -> None:
        """
        @param reactor: an C{IReactorProcess} and C{IReactorTime}.
        @param argv: the child's command line (default: this interpreter
            running L{MODULE}, given this process's pid).
        @param env: the child's environment (default: ours, with this
            package importable).
        @param idle_exit: seconds an idle child is kept.
        """
        self._reactor = reactor
        self._argv = argv if argv is not None else [sys.executable, "-m", MODULE, str(os.getpid())]
        self._env = dict(env) if env is not None else _child_env()
        self._idle_exit = idle_exit
        self._queue: collections.deque[_Pending] = collections.deque()
        self._current: _Pending | None = None
        self._process: Any = None
        self._protocol: _ChildProtocol | None = None
        self._idle: Any = None

    @property
    def pid(self) -> int | None:
        """
        The running child's pid, if one runs.
        """
        return None if self._process is None else self._process.pid

    def __call__(self, rules: RuleSet, msg: Mapping[str, Any]) -> Deferred[Rule]:
        """
        The first rule of C{rules} matching C{msg}, else C{rules.default}.
        """
        line = json.dumps(request_for(rules, msg)).encode("utf-8") + b"\n"
        pending = _Pending(line, len(rules.rules))
        result: Deferred[Rule] = Deferred(lambda _: self._cancel(pending))
        pending.deferred.addCallbacks(
            lambda index: result.callback(rules.default if index is None else rules.rules[index]),
            result.errback,
        )
        self._queue.append(pending)
        self._next()
        return result

    def _next(self) -> None:
        """
        Send the next request, starting a child if none runs.
        """
        if self._current is not None:
            return
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        while self._queue:
            pending = self._queue.popleft()
            if self._process is None:
                try:
                    self._spawn()
                except OSError as e:
                    pending.deferred.errback(MatcherError(f"cannot start the rule matcher: {e}"))
                    continue
            self._current = pending
            self._process.write(pending.line)
            return
        if self._process is not None:
            self._idle = self._reactor.callLater(self._idle_exit, self._close)

    def _spawn(self) -> None:
        protocol = _ChildProtocol(self)
        self._process = self._reactor.spawnProcess(protocol, self._argv[0], self._argv, self._env)
        self._protocol = protocol

    def _close(self) -> None:
        """
        Let an idle child go: it exits at end of file.
        """
        self._idle = None
        process, self._process, self._protocol = self._process, None, None
        if process is not None:
            process.closeStdin()

    def _kill(self) -> None:
        """
        Forget the child and SIGKILL it.
        """
        process, self._process, self._protocol = self._process, None, None
        if process is None:
            return
        try:
            process.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        except OSError as e:
            _log.warn("rule matcher: cannot kill pid {pid}: {error}", pid=process.pid, error=e)

    def _cancel(self, pending: _Pending) -> None:
        if pending is self._current:
            _log.warn("rule matcher: match cancelled; killing pid {pid}", pid=self.pid)
            self._current = None
            self._kill()
            # The next request gets a fresh child, after this cancellation.
            self._reactor.callLater(0, self._next)
        elif pending in self._queue:
            self._queue.remove(pending)

    def _replied(self, protocol: _ChildProtocol, line: bytes) -> None:
        current = self._current
        try:
            reply = json.loads(line)
            if current is None or not isinstance(reply, dict):
                raise ValueError
            error = reply.get("error")
            index = None if error is not None else reply["match"]
            if not (index is None or (type(index) is int and 0 <= index < current.count)):
                raise ValueError
        except (ValueError, KeyError):
            self._broken(protocol, f"unexpected reply {line[:200]!r}")
            return
        self._current = None
        if error is not None:
            current.deferred.errback(MatcherError(f"rule matcher: {error}"))
        else:
            current.deferred.callback(index)
        self._next()

    def _broken(self, protocol: _ChildProtocol, why: str) -> None:
        if protocol is not self._protocol:
            return
        _log.error("rule matcher: {why}; killing pid {pid}", why=why, pid=self.pid)
        current, self._current = self._current, None
        self._kill()
        if current is not None:
            current.deferred.errback(MatcherError(f"rule matcher failed: {why}"))
        self._next()

    def _ended(self, protocol: _ChildProtocol, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self._process = self._protocol = None
        current, self._current = self._current, None
        if current is not None:
            current.deferred.errback(MatcherError(f"rule matcher ended: {reason.getErrorMessage()}"))
        self._next()


def _child_env() -> dict[str, str]:
    """
    Our environment, with this package importable by the child wherever it
    was imported from.
    """
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


__all__ = [
    "CHILD_ALARM",
    "IDLE_EXIT",
    "MAX_REPLY",
    "MODULE",
    "MatcherError",
    "ProcessMatcher",
    "first_match",
    "main",
    "request_for",
    "serve",
]


if __name__ == "__main__":
    main(sys.argv)
