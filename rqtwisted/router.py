"""
The router: C{config/rq_router_rules.rb} parsed as data, and the C{rq_router}
queue that forwards each message by the first rule it matches
(special-queues.md).

The original evaluated each line of the rules file as Ruby (quirks 27). Here
the file is read as data: each statement is a name followed by literal
arguments (strings, symbols, regular expressions, integers, C{true},
C{false}, C{nil} and arrays of those), with or without parentheses. Anything
else (an expression, an unknown statement, a wrong number of arguments) makes
the file invalid, with the number of the offending line. A statement whose
argument has the wrong type is skipped, as in the original.

The parser, the matching and the choice of destinations are pure code (no
I/O, no Twisted) so that C{rq verify_rules} stays fast and every rule is
tested with plain text. L{RouterHandler} is the C{rq_router} queue's
in-process handler; it imports Twisted only when it runs.
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

#: Where the rules live, relative to the root; its presence turns router
#: mode on.
RULES_PATH = os.path.join("config", "rq_router_rules.rb")

#: The router's log, relative to the root.
LOG_PATH = os.path.join("log", "rq_router.log")

#: Routing actions.
ACTIONS = ("relay", "balance", "done", "err")

#: Queues router mode leaves alone (http.md).
NOT_ROUTED = frozenset({"relay", "cleaner"})

#: Port added to a route host without one.
DEFAULT_PORT = 3333

#: Seconds a message may take to route (the original script's alarm).
MAX_RUN = 60

#: The longest rules file read (bytes); a larger one is refused.
MAX_RULES_SIZE = 1 << 20


class RulesError(Exception):
    """
    The rules file is invalid: C{line} (1-based, 0 for the file as a whole)
    and C{reason} say where and why.
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}" if line else reason)
        self.line = line
        self.reason = reason


# -- literals -----------------------------------------------------------------


@dataclass(frozen=True)
class Symbol:
    """
    A Ruby symbol literal, C{:name}.
    """

    name: str


@dataclass(frozen=True)
class Regex:
    """
    A Ruby regular expression literal, C{/source/flags}, compiled for Python.
    """

    source: str
    flags: str
    pattern: re.Pattern[str] = field(compare=False, repr=False)

    def search(self, text: str) -> bool:
        """
        Does the expression match somewhere in C{text} (Ruby's C{=~})?
        """
        return self.pattern.search(text) is not None


class _Syntax(Exception):
    """
    A statement is not in the literal subset (caught per line).
    """


_IDENT = re.compile(r"[a-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"-?\d+(?:_\d+)*(\.\d+(?:_\d+)*)?(?![A-Za-z_.\d])")
_SYMBOL = re.compile(r":([A-Za-z_][A-Za-z0-9_]*[?!]?)")
_DQ_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "s": " ", "e": "\x1b", "0": "\0", "a": "\a", "b": "\b",
               "f": "\f", "v": "\v"}


def _convert_regex(source: str) -> str:
    """
    Ruby regular expression syntax to Python's, for the common subset:
    C{\\z}, C{\\Z}, C{\\h} and named groups.
    """
    out = []
    i = 0
    while i < len(source):
        c = source[i]
        if c == "\\" and i + 1 < len(source):
            nxt = source[i + 1]
            out.append({"z": r"\Z", "Z": r"(?=\n?\Z)", "h": "[0-9a-fA-F]", "H": "[^0-9a-fA-F]"}.get(nxt, c + nxt))
            i += 2
            continue
        if source.startswith("(?<", i) and not source.startswith(("(?<=", "(?<!"), i):
            out.append("(?P<")
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _compile_regex(source: str, flags: str) -> Regex:
    value = re.MULTILINE  # Ruby's ^ and $ always match at line boundaries
    for f in flags:
        value |= {"i": re.IGNORECASE, "m": re.DOTALL, "x": re.VERBOSE}.get(f, 0)
    try:
        pattern = re.compile(_convert_regex(source), value)
    except (re.error, ValueError, OverflowError, RecursionError) as e:
        raise _Syntax(f"invalid regular expression /{source}/: {e}")
    return Regex(source, flags, pattern)


class _Reader:
    """
    Reads the literal arguments of one statement.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text) or self.text[self.pos] == "#"

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _Syntax(f"expected {char!r} at column {self.pos + 1}")
        self.pos += 1

    def value(self, depth: int = 0) -> Any:
        c = self.peek()
        rest = self.text[self.pos :]
        if c in "\"'":
            return self._string(c)
        if c == "/":
            return self._regex()
        if c == "[":
            if depth > 8:
                raise _Syntax("arrays nested too deeply")
            self.pos += 1
            items: list[Any] = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.value(depth + 1))
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return items
        match = _SYMBOL.match(rest)
        if match:
            self.pos += match.end()
            return Symbol(match.group(1))
        match = _NUMBER.match(rest)
        if match:
            self.pos += match.end()
            digits = match.group(0).replace("_", "")
            return float(digits) if match.group(1) else int(digits)
        match = _IDENT.match(rest)
        if match and match.group(0) in ("true", "false", "nil"):
            end = match.end()
            if end == len(rest) or not (rest[end].isalnum() or rest[end] in "_?!.([:"):
                self.pos += end
                return {"true": True, "false": False, "nil": None}[match.group(0)]
        snippet = rest[:30] or "end of line"
        raise _Syntax(f"not a literal value: {snippet}")

    def _string(self, quote: str) -> str:
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text):
                raise _Syntax("unterminated string")
            c = self.text[self.pos]
            if c == quote:
                self.pos += 1
                return "".join(out)
            if c == "\\" and self.pos + 1 < len(self.text):
                nxt = self.text[self.pos + 1]
                self.pos += 2
                if quote == "'":
                    out.append(nxt if nxt in "\\'" else "\\" + nxt)
                else:
                    out.append(_DQ_ESCAPES.get(nxt, nxt))
                continue
            if quote == '"' and c == "#" and self.text[self.pos + 1 : self.pos + 2] in ("{", "@", "$"):
                raise _Syntax("string interpolation is not allowed")
            out.append(c)
            self.pos += 1

    def _regex(self) -> Regex:
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text):
                raise _Syntax("unterminated regular expression")
            c = self.text[self.pos]
            if c == "/":
                self.pos += 1
                break
            if c == "\\" and self.pos + 1 < len(self.text):
                nxt = self.text[self.pos + 1]
                out.append("/" if nxt == "/" else c + nxt)
                self.pos += 2
                continue
            if c == "#" and self.text[self.pos + 1 : self.pos + 2] in ("{", "@", "$"):
                raise _Syntax("regular expression interpolation is not allowed")
            out.append(c)
            self.pos += 1
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isalpha():
            self.pos += 1
        flags = self.text[start : self.pos]
        if any(f not in "imxo" for f in flags):
            raise _Syntax(f"unknown regular expression flags {flags!r}")
        return _compile_regex("".join(out), flags)


def parse_statement(text: str) -> tuple[str, list[Any]]:
    """
    Parse one statement line: C{name arg, arg...} or C{name(arg, ...)},
    optionally followed by a C{#} comment.

    @raise _Syntax: the line is not a statement of the literal subset.
    """
    reader = _Reader(text)
    reader.skip_space()
    match = _IDENT.match(text, reader.pos)
    if match is None:
        raise _Syntax(f"not a statement: {text.strip()[:30]}")
    name = match.group(0)
    reader.pos = match.end()
    args: list[Any] = []
    parens = False
    if reader.pos < len(text) and text[reader.pos] == "(":
        parens = True
        reader.pos += 1
    elif reader.pos < len(text) and text[reader.pos] not in " \t#":
        raise _Syntax(f"not a statement: {text.strip()[:30]}")
    if parens and reader.peek() == ")":
        reader.pos += 1
    elif not (not parens and reader.at_end()):
        while True:
            args.append(reader.value())
            if reader.peek() == ",":
                reader.pos += 1
                continue
            break
        if parens:
            reader.expect(")")
    if not reader.at_end():
        raise _Syntax(f"unexpected {text[reader.pos:reader.pos + 30]!r}")
    return name, args


# -- rules ----------------------------------------------------------------------


@dataclass
class Rule:
    """
    One rule of the file.

    @ivar route: for C{relay}, hosts (C{str}) or groups of hosts (C{tuple});
        for C{balance}, the entries to pick one from.
    @ivar line: where the rule starts in the file (0: built in).
    """

    desc: str | None = None
    action: str | None = None
    src: Regex | None = None
    dest: Regex | None = None
    route: tuple[Any, ...] = ()
    delay: int = 0
    log: bool = False
    line: int = 0

    @property
    def is_default(self) -> bool:
        """
        Is this a C{default} rule (the catch-all)?
        """
        return self.desc == "default"

    def matches(self, msg: Mapping[str, Any]) -> bool:
        """
        Do the rule's C{src} and C{dest} expressions match the message? A
        missing (or non-text) field fails the match.
        """
        for key, regex in (("src", self.src), ("dest", self.dest)):
            if regex is None:
                continue
            value = msg.get(key)
            if not isinstance(value, str) or not regex.search(value):
                return False
        return True

    def describe(self) -> str:
        """
        A one-line summary, for C{rq verify_rules --verbose}.
        """
        parts = [f"rule {self.desc!r} (line {self.line})", f"action {self.action}"]
        if self.src is not None:
            parts.append(f"src /{self.src.source}/{self.src.flags}")
        if self.dest is not None:
            parts.append(f"dest /{self.dest.source}/{self.dest.flags}")
        if self.route:
            parts.append("route " + ", ".join(map(_show_route, self.route)))
        if self.delay:
            parts.append(f"delay {self.delay}")
        if self.log:
            parts.append("log true")
        return ": ".join(parts[:1]) + ": " + ", ".join(parts[1:])


def _show_route(entry: Any) -> str:
    if isinstance(entry, tuple):
        return "[" + ", ".join(entry) + "]"
    return str(entry)


def builtin_default() -> Rule:
    """
    The catch-all used when the file names no C{default} rule: C{err}.
    """
    return Rule(desc="default", action="err", log=True)


@dataclass
class RuleSet:
    """
    The rules of a file, in order, and the catch-all.
    """

    rules: list[Rule]
    default: Rule = field(default_factory=builtin_default)

    def match(self, msg: Mapping[str, Any]) -> Rule:
        """
        The first rule matching C{msg}, else the default one.
        """
        for rule in self.rules:
            if rule.matches(msg):
                return rule
        return self.default

    def describe(self) -> str:
        """
        Every rule, one per line, the catch-all last.
        """
        lines = [r.describe() for r in self.rules]
        default = self.default.describe() if self.default.line else "default: built in, action err"
        return "\n".join([*lines, default])


def _arity(name: str, args: list[Any], count: int) -> None:
    if len(args) != count:
        raise _Syntax(f"wrong number of arguments for {name} (given {len(args)}, expected {count})")


def _route(args: list[Any]) -> tuple[Any, ...] | None:
    """
    C{route} arguments as hosts or groups of hosts, or C{None} when
    wrongly typed.
    """
    route: list[Any] = []
    for a in args:
        if isinstance(a, str):
            route.append(a)
        elif isinstance(a, list) and a and all(isinstance(h, str) for h in a):
            route.append(tuple(a))
        else:
            return None
    return tuple(route)


def _apply(rule: Rule, name: str, args: list[Any]) -> None:
    """
    Apply one statement to the rule being read. A wrongly typed argument
    skips the statement.

    @raise _Syntax: unknown statement or wrong number of arguments.
    """
    if name == "rule":
        _arity(name, args, 1)
        if isinstance(args[0], str):
            rule.desc = args[0]
    elif name == "action":
        _arity(name, args, 1)
        if isinstance(args[0], Symbol) and args[0].name in ACTIONS:
            rule.action = args[0].name
    elif name in ("src", "dest"):
        _arity(name, args, 1)
        if isinstance(args[0], Regex):
            setattr(rule, name, args[0])
    elif name == "route":
        route = _route(args)
        if route is not None:
            rule.route = route
    elif name == "delay":
        _arity(name, args, 1)
        if isinstance(args[0], int) and not isinstance(args[0], bool):
            rule.delay = max(0, args[0])
    elif name == "log":
        _arity(name, args, 1)
        if isinstance(args[0], bool):
            rule.log = args[0]
    else:
        raise _Syntax(f"unknown statement {name!r}")


def _finish(rule: Rule) -> Rule:
    """
    Check a complete rule.

    @raise RulesError: at the rule's first line.
    """
    name = f"rule {rule.desc!r}" if rule.desc is not None else "rule"
    if rule.action is None:
        raise RulesError(rule.line, f"{name} needs an action (:relay, :balance, :done or :err)")
    if not rule.is_default and rule.src is None and rule.dest is None:
        raise RulesError(rule.line, f"{name} needs a src or a dest")
    if rule.action in ("relay", "balance") and not rule.route:
        raise RulesError(rule.line, f"{name} with action :{rule.action} needs a route")
    if rule.action == "err":
        rule.log = True
    return rule


def parse_rules(text: str) -> RuleSet:
    """
    Parse the text of a rules file.

    A rule starts at a line beginning C{rule } and ends at an empty line or
    the next C{rule } line (or the end of the file: quirks 29); lines
    outside rules are ignored; C{#} starts a comment anywhere outside a
    literal.

    @raise RulesError: the file is invalid; C{line} tells where.
    """
    rules: list[Rule] = []
    current: Rule | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.strip()
        if not stripped:
            if current is not None:
                rules.append(_finish(current))
                current = None
            continue
        if stripped.startswith("#"):
            continue
        starts = stripped.startswith("rule ") or stripped.startswith("rule\t")
        if starts:
            if current is not None:
                rules.append(_finish(current))
            current = Rule(line=number)
        if current is None:
            continue
        try:
            name, args = parse_statement(stripped)
            _apply(current, name, args)
        except _Syntax as e:
            raise RulesError(number, str(e)) from None
    if current is not None:
        rules.append(_finish(current))
    ordered = [r for r in rules if not r.is_default]
    defaults = [r for r in rules if r.is_default]
    return RuleSet(ordered, defaults[-1] if defaults else builtin_default())


def load_rules(path: str) -> RuleSet:
    """
    Read and parse a rules file.

    @raise RulesError: missing, unreadable, too large, not UTF-8 or invalid.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RULES_SIZE + 1)
    except OSError as e:
        raise RulesError(0, f"cannot read {path}: {e.strerror or e}")
    if len(data) > MAX_RULES_SIZE:
        raise RulesError(0, f"{path} is larger than {MAX_RULES_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RulesError(line, "not UTF-8 text")
    return parse_rules(text)


def verify_rules_file(path: str, verbose: bool = False) -> tuple[bool, str]:
    """
    C{rq verify_rules}: C{(ok, text)} where C{text} is the rules (ok) or
    C{line N: reason} (invalid).
    """
    try:
        rules = load_rules(path)
    except RulesError as e:
        return False, str(e)
    return True, rules.describe()


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


#: The admin marker that stops C{rq_router} when its rules are bad.
def down_marker(root: str) -> str:
    """
    C{config/rq_router.down}.
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
    ) -> None:
        """
        @param root: the root directory (rules file, log, markers).
        @param clock: an C{IReactorTime} (delays, log times).
        """
        self.root = root
        self.clock = clock
        self.choice = choice
        self.pid = pid
        self._cache: tuple[tuple[int, int, int], RuleSet] | None = None

    def rules(self) -> RuleSet:
        """
        The rules, re-read whenever the file changes.

        @raise RulesError: missing or invalid.
        """
        path = rules_path(self.root)
        try:
            st = os.stat(path)
        except OSError as e:
            raise RulesError(0, f"cannot read {path}: {e.strerror or e}")
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        rules = load_rules(path)
        self._cache = (key, rules)
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
        original script's alarm made it.
        """
        from twisted.internet.defer import TimeoutError, ensureDeferred

        routing = ensureDeferred(self.route(job))
        routing.addTimeout(MAX_RUN, self.clock)
        try:
            await routing
        except TimeoutError:
            job.report(f"err router ran over {MAX_RUN} seconds")

    async def route(self, job: Any) -> None:
        """
        Route one message, without the time limit.
        """
        from twisted.internet.task import deferLater
        from twisted.logger import Logger

        _log = Logger()

        path = rules_path(self.root)
        try:
            rules = self.rules()
        except RulesError as e:
            with open(down_marker(self.root), "a"):
                pass
            _log.error("rq_router: bad rules file {path}: {reason}", path=path, reason=str(e))
            job.report(f"err Bad rule file at: {path}")
            return
        msg = job.msg
        rule = rules.match(msg)
        if rule.log:
            self._log(rule, msg)
        if rule.delay > 0:
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
        if rule.action == "balance":
            ok, detail = _dup_reply(await job.dup(f"0-X-{new_dest(hosts[0], dest)}"))
            if ok:
                job.report(f"done DUP to {detail}")
            else:
                job.report(f"err DUP failed - {detail}")
            return
        for host in hosts:
            ok, detail = _dup_reply(await job.dup(f"0-X-{new_dest(host, dest)}"))
            if not ok:
                job.report(f"err DUP relay failed - {detail}")
                return
            job.report(f"run DUP relay to {detail}")
        job.report(f"done done relay of {len(hosts)} messages")


def _dup_reply(line: str) -> tuple[bool, str]:
    """
    A dup reply line (C{ok <id>} / C{fail <reason>}) as C{(ok, detail)}.
    """
    status, _, detail = line.partition(" ")
    return status == "ok", detail


def make_handler(instance: Any) -> RouterHandler:
    """
    The C{rq_router} handler of a running instance (L{rqtwisted.builtin}).
    """
    return RouterHandler(instance.root.path, instance.clock)
