"""
The C{rq_router} queue (special-queues.md, "rq_router"): router mode, and
the in-process handler that forwards each message by the first rule of
C{config/rq_router_rules.rb} it matches.

The rules file itself is read by L{rqtwisted.rules}, as data, and checked
in the daemon; the matching of a message against them runs in a child
process (L{rqtwisted.matcher}), so that a rule's expression cannot hang the
daemon. This module picks the destinations (L{new_dest}, L{select_hosts}:
pure code) and runs the routing steps of one message (L{RouterHandler}). It is imported by
C{rq verify_rules} for L{verify_rules_file} (re-exported from
L{rqtwisted.rules}), so it imports Twisted only when a message is routed.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from rqtwisted.filekey import FileKey, file_key
from rqtwisted.rules import Rule, RulesError, RuleSet, load_rules, verify_rules_file

_logger = Logger()

#: Where the rules live, relative to the root; its presence turns router
#: mode on.
RULES_PATH = os.path.join("config", "rq_router_rules.rb")

#: The router's log, relative to the root.
LOG_PATH = os.path.join("log", "rq_router.log")

#: Queues router mode leaves alone (http.md).
NOT_ROUTED = frozenset({"relay", "cleaner"})

#: Port added to a route host without one.
DEFAULT_PORT = 3333

#: Seconds a message may take to route (the original script's alarm); a
#: match still running then has its child killed.
MAX_RUN = 60

#: Matches a message against rules: the first rule matching, else the
#: default one (L{rqtwisted.matcher.ProcessMatcher}).
Matcher = Callable[[RuleSet, Mapping[str, Any]], Deferred[Rule]]


def rules_path(root: str) -> str:
    """
    The rules file of a root.
    """
    return os.path.join(root, RULES_PATH)


def router_mode(root: str) -> bool:
    """
    Is the root in router mode (its rules file exists)? The web's routes
    marked (R) then address C{rq_router} instead of the named queue.
    """
    return os.path.exists(rules_path(root))


def routed_queue(root: str, name: str) -> str:
    """
    The queue a route marked (R) addresses for queue C{name}.
    """
    if name in NOT_ROUTED or not router_mode(root):
        return name
    return "rq_router"


# -- destinations ---------------------------------------------------------------


def new_dest(host: str, dest: str) -> str:
    """
    The destination of a copy sent to C{host}: a host starting with
    C{http} is used verbatim; else C{:3333} is added when it has no port,
    and a URL C{dest} keeps what follows its first C{/q/}, a bare name
    becomes C{http://<host>/q/<dest>}.
    """
    if host.startswith("http"):
        return host
    if ":" not in host:
        host = f"{host}:{DEFAULT_PORT}"
    if dest.startswith("http") or "/q/" in dest:
        _, found, rest = dest.partition("/q/")
        if found:
            return f"http://{host}/q/{rest}"
    return f"http://{host}/q/{dest}"


def select_hosts(rule: Rule, choice: Callable[[Sequence[str]], str] = random.choice) -> list[str]:
    """
    The hosts a rule sends to: C{relay}, every host (one at random per
    group); C{balance}, one entry at random (one of its hosts if a group).
    """
    if rule.action == "balance":
        if not rule.route:
            return []
        entry = choice(list(rule.route))  # type: ignore[arg-type]
        return [choice(list(entry)) if isinstance(entry, tuple) else entry]
    if rule.action == "relay":
        return [choice(list(e)) if isinstance(e, tuple) else e for e in rule.route]
    return []


def log_line(pid: int, when: float, rule: Rule, msg: Mapping[str, Any]) -> str:
    """
    A line of C{log/rq_router.log}:
    C{<pid> - <time> - <desc> - <action> - <msg_id> - <src>}.
    """
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(when))
    return f"{pid} - {stamp} - {rule.desc} - {rule.action} - {msg.get('msg_id')} - {msg.get('src')}\n"


# -- the rq_router queue ----------------------------------------------------------


def down_marker(root: str) -> str:
    """
    C{config/rq_router.down}: the admin marker that stops C{rq_router} when
    its rules are bad.
    """
    return os.path.join(root, "config", "rq_router.down")


class RouterHandler:
    """
    The C{rq_router} queue's handler: forwards each message by the first
    rule it matches.

    @ivar choice: picks a random element (tests make it deterministic).
    """

    def __init__(
        self,
        root: str,
        clock: Any,
        choice: Callable[[Sequence[Any]], Any] = random.choice,
        pid: Callable[[], int] = os.getpid,
        *,
        set_down: Callable[[], Awaitable[object]],
        match: Matcher,
    ) -> None:
        """
        @param root: the root directory (rules file, log).
        @param clock: an C{IReactorTime} (delays, log times).
        @param set_down: sets C{rq_router} DOWN as C{rq down rq_router}
            does (its marker, L{down_marker}, made and synced); done once
            its result is.
        @param match: matches a message against the rules; cancelled when
            the routing runs over L{MAX_RUN} seconds or is cancelled.
        """
        self.root = root
        self.clock = clock
        self.choice = choice
        self.pid = pid
        self.set_down = set_down
        self.match = match
        self._cache: tuple[FileKey, RuleSet] | None = None

    def rules(self) -> RuleSet:
        """
        The rules, re-read whenever the file changes.

        @raise RulesError: missing or invalid.
        """
        path = rules_path(self.root)
        key = file_key(path)
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        rules = load_rules(path)
        self._cache = (key, rules) if key is not None else None
        return rules

    def _log(self, rule: Rule, msg: Mapping[str, Any]) -> None:
        path = os.path.join(self.root, LOG_PATH)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(log_line(self.pid(), self.clock.seconds(), rule, msg))

    async def __call__(self, job: Any) -> None:
        """
        Route one message (special-queues.md, rq_router steps 1-3); a
        routing that runs over L{MAX_RUN} seconds ends in err, as the
        original script's alarm made it (a match still running is
        cancelled: its child killed).
        """
        routing = ensureDeferred(self.route(job))
        routing.addTimeout(MAX_RUN, self.clock)
        try:
            await routing
        except TimeoutError:
            job.report(f"err router ran over {MAX_RUN} seconds")

    async def route(self, job: Any) -> None:
        """
        Route one message, without the time limit. What it does goes to the
        job's C{stdio.log} too: the rule taken, the delay, each copy.
        """
        path = rules_path(self.root)
        try:
            rules = self.rules()
        except RulesError as e:
            _logger.error("rq_router: bad rules file {path}: {reason}", path=path, reason=str(e))
            # DOWN on disk before the message is reported err.
            try:
                await self.set_down()
            except Exception:
                _logger.failure("rq_router: could not be set DOWN")
            job.log(f"bad rules file {path}: {e}; rq_router set DOWN")
            job.report(f"err Bad rule file at: {path}")
            return
        msg = job.msg
        rule = await self.match(rules, msg)
        where = f"line {rule.line}" if rule.line else "built in"
        job.log(f"rule {rule.desc!r} ({where}): action {rule.action}")
        if rule.log:
            self._log(rule, msg)
        if rule.delay > 0:
            job.log(f"delay {rule.delay} seconds")
            job.report(f"run router delay {rule.delay} seconds")
            await deferLater(self.clock, rule.delay, lambda: None)
        if rule.action == "done":
            job.report("done router processed a done")
            return
        if rule.action == "err":
            job.report("err router processed an err")
            return
        hosts = select_hosts(rule, self.choice)
        dest = str(msg.get("dest") or "")
        sent = 0
        for host in hosts:
            target = new_dest(host, dest)
            ok, detail = _dup_reply(await job.dup(f"0-X-{target}"))
            job.log(f"copy to {target}: {'ok ' if ok else 'failed: '}{detail}")
            if rule.action == "balance":
                job.report(f"done DUP to {detail}" if ok else f"err DUP failed - {detail}")
                return
            if not ok:
                job.report(f"err DUP relay failed - {detail}")
                return
            job.report(f"run DUP relay to {detail}")
            sent += 1
        job.report(f"done done relay of {sent} messages")


def _dup_reply(line: str) -> tuple[bool, str]:
    """
    A dup reply line (C{ok <id>} / C{fail <reason>}) as C{(ok, detail)}.
    """
    status, _, detail = line.partition(" ")
    return status == "ok", detail


def make_handler(instance: Any) -> RouterHandler:
    """
    The C{rq_router} handler of a running instance (L{rqtwisted.builtin}):
    bad rules set the queue DOWN through
    L{rqtwisted.supervisor.Instance.set_admin}, as an
    C{rq down rq_router} would; messages are matched in a child process
    started on the instance's reactor.
    """
    from rqtwisted.matcher import ProcessMatcher

    return RouterHandler(
        instance.root.path,
        instance.clock,
        set_down=lambda: instance.set_admin("down", "rq_router"),
        match=ProcessMatcher(instance.clock),
    )


__all__ = [
    "DEFAULT_PORT",
    "LOG_PATH",
    "MAX_RUN",
    "Matcher",
    "NOT_ROUTED",
    "RULES_PATH",
    "RouterHandler",
    "down_marker",
    "log_line",
    "make_handler",
    "new_dest",
    "routed_queue",
    "router_mode",
    "rules_path",
    "select_hosts",
    "verify_rules_file",
]
