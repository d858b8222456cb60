"""
The router's rules file, C{config/rq_router_rules.rb}, read as data
(special-queues.md, "Rules file").

The original evaluated each line of the file as Ruby (quirks 27). Here each
statement is a name followed by literal arguments (strings, symbols, regular
expressions, integers, C{true}, C{false}, C{nil} and arrays of those), with
or without parentheses. Anything else (an expression, an unknown statement,
a wrong number of arguments) makes the file invalid, with the number of the
offending line. A statement whose argument has the wrong type is skipped, as
in the original.

This module is sans I/O apart from L{load_rules} reading the file, and
imports neither Twisted nor anything of the daemon: C{rq verify_rules} uses
it from the command line, and every rule is tested with plain text. The
C{rq_router} queue that routes by these rules is L{rqtwisted.router}.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

#: Routing actions.
ACTIONS = ("relay", "balance", "done", "err")

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


def _sq_escape(c: str) -> str:
    # In single quotes only \\ and \' are escapes.
    return c if c in "\\'" else "\\" + c


def _dq_escape(c: str) -> str:
    return _DQ_ESCAPES.get(c, c)


def _regex_escape(c: str) -> str:
    # \/ is a slash; every other escape is the regular expression's own.
    return "/" if c == "/" else "\\" + c


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
        """
        Move past blanks.
        """
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def at_end(self) -> bool:
        """
        Is only a comment (or nothing) left?
        """
        self.skip_space()
        return self.pos >= len(self.text) or self.text[self.pos] == "#"

    def peek(self) -> str:
        """
        The next character that is not a blank (C{""} at the end).
        """
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        """
        Consume C{char}, which must come next.
        """
        if self.peek() != char:
            raise _Syntax(f"expected {char!r} at column {self.pos + 1}")
        self.pos += 1

    def value(self, depth: int = 0) -> Any:
        """
        Read one literal: a string, regular expression, array, symbol,
        number, C{true}, C{false} or C{nil}.
        """
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

    def _delimited(self, close: str, what: str, escape: Callable[[str], str], interpolating: bool) -> str:
        """
        The text of a literal whose opening character is at C{pos}, up to
        C{close}; C{\\x} becomes C{escape(x)}.

        @raise _Syntax: it is not terminated, or (when C{interpolating}) it
            interpolates.
        """
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text):
                raise _Syntax(f"unterminated {what}")
            c = self.text[self.pos]
            if c == close:
                self.pos += 1
                return "".join(out)
            if c == "\\" and self.pos + 1 < len(self.text):
                out.append(escape(self.text[self.pos + 1]))
                self.pos += 2
                continue
            if interpolating and c == "#" and self.text[self.pos + 1 : self.pos + 2] in ("{", "@", "$"):
                raise _Syntax(f"{what} interpolation is not allowed")
            out.append(c)
            self.pos += 1

    def _string(self, quote: str) -> str:
        if quote == "'":
            return self._delimited(quote, "string", _sq_escape, interpolating=False)
        return self._delimited(quote, "string", _dq_escape, interpolating=True)

    def _regex(self) -> Regex:
        source = self._delimited("/", "regular expression", _regex_escape, interpolating=True)
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isalpha():
            self.pos += 1
        flags = self.text[start : self.pos]
        if any(f not in "imxo" for f in flags):
            raise _Syntax(f"unknown regular expression flags {flags!r}")
        return _compile_regex(source, flags)


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
    #: The lines outside every rule that are not blank or comments: ignored,
    #: as the original ignored them, but told by C{rq verify_rules
    #: --verbose} (a misspelt C{Rule "x"} makes a whole rule vanish).
    ignored: list[int] = field(default_factory=list)

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
        ignored = [f"line {n}: ignored: outside a rule (a rule starts at a line beginning 'rule ')"
                   for n in self.ignored]
        return "\n".join([*lines, default, *ignored])


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
    ignored: list[int] = []
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
            ignored.append(number)
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
    return RuleSet(ordered, defaults[-1] if defaults else builtin_default(), ignored)


def load_rules(path: str) -> RuleSet:
    """
    Read and parse a rules file.

    Anything but a regular file (a FIFO, a device, a directory) is refused
    without reading it: opening a FIFO would block until a writer came.

    @raise RulesError: missing, not a regular file, unreadable, too large,
        not UTF-8 or invalid.
    """
    try:
        # O_NONBLOCK: the open of a FIFO returns at once, for fstat to refuse.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise RulesError(0, f"cannot read {path}: {e.strerror or e}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RulesError(0, f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_RULES_SIZE + 1)
    except OSError as e:
        raise RulesError(0, f"cannot read {path}: {e.strerror or e}")
    finally:
        os.close(fd)
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


__all__ = [
    "ACTIONS",
    "MAX_RULES_SIZE",
    "Regex",
    "Rule",
    "RuleSet",
    "RulesError",
    "Symbol",
    "builtin_default",
    "load_rules",
    "parse_rules",
    "parse_statement",
    "verify_rules_file",
]
