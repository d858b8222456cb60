"""
C{rq console [--root DIR]}: an interactive admin shell on the daemon's admin
socket.

Every C{rq} verb is typed without the C{rq} prefix and runs through the
command line's own dispatch (L{rqtwisted.cli.run}), so its options follow the
same rules and its output lines are the same, byte for byte. On top of that
the console offers line editing and history (C{readline}; the history lives
in C{$RQ_CONSOLE_HISTORY}, else C{~/.rq_console_history}), tab completion of
verbs, options and queue names, C{help [verb]}, a readable C{status}
(C{status --json} prints what C{rq status} prints) and C{quit}, C{exit} or
end of input to leave. Ctrl-C cancels the line being typed, or the command
waiting for its answer.

The console keeps one connection to the admin socket (L{SessionClient}) for
the whole session. When the daemon goes away, the command that notices it
prints the usual C{fail rq daemon not running at ...} line, and the next
command connects again.

Without a terminal on stdin (C{rq console < commands}), there is no prompt
and no history: each line runs in turn (blank lines and C{#} comments are
skipped) and the exit status is 1 if any line failed, so the console also
serves scripts that send many commands over one connection.

Like the command line, this module never imports Twisted.
"""

from __future__ import annotations

import cmd
import errno
import json
import os
import re
import select
import shlex
import socket
import sys
import time
from typing import IO, Any, Callable, Iterable, Mapping

from rqtwisted import cli
from rqtwisted.admincommands import SOCKET
from rqtwisted.ampclient import (
    AdminClient,
    ProtocolError,
    answer_result,
    encode_box,
    request_box,
)

__all__ = [
    "Console",
    "HISTORY_ENV",
    "HISTORY_LENGTH",
    "SessionClient",
    "VERB_HELP",
    "history_path",
    "main",
    "verb_options",
]

#: The environment variable naming the history file (empty: no history).
HISTORY_ENV = "RQ_CONSOLE_HISTORY"

#: The history file when L{HISTORY_ENV} is not set.
DEFAULT_HISTORY = "~/.rq_console_history"

#: Lines kept in the history file.
HISTORY_LENGTH = 1000

#: Seconds a list of queue names is reused for completion.
QUEUE_CACHE_SECONDS = 5.0

#: The words that end the session.
QUIT_WORDS = ("quit", "exit", "EOF")

_SENDING = "--dest Q [--src S] [--param1..4 V] [--due EPOCH] [--count N] [--max_count N] [--force_remote] [--relay-ok]"
_BY_ID = "--msg_id ID"
_BY_NAME = "--name N"

#: verb -> (options, what it does): the text of C{help <verb>}, and the
#: options offered by completion. A verb missing here still runs.
VERB_HELP: dict[str, tuple[str, str]] = {
    "sendmesg": (_SENDING, "Queue a message: ok <full msg id>."),
    "prepmesg": (_SENDING, "Prepare a message; it stays in prep until commitmesg: ok <full msg id>."),
    "single_que": (_SENDING, "Queue a message unless one is queued already: ok <the queued full msg id>."),
    "attachmesg": (
        "--msg_id ID --pathname P [--name N]",
        "Attach a file to a prep message: ok <md5>-Attached successfully for Message: <id> attachment.",
    ),
    "commitmesg": (_BY_ID, "Commit a prep message: ok msg commited."),
    "statusmesg": (_BY_ID, "A message's status: ok que, ok done - <text>, ok relayed - <remote id>, ..."),
    "state": (_BY_ID, "A message's state: ok <state>."),
    "statuscountmesg": (_BY_ID, "A message's count: ok <count>."),
    "attachstatusmesg": (_BY_ID, "A message's attachments: ok <n>, then one <name> <md5> <size> <path> per line."),
    "clone": (_BY_ID, "Copy a message into its queue: ok <new full msg id>."),
    "show": (_BY_ID, "A message as JSON, with its path below the root."),
    "run_now": (_BY_ID, "Make a queued message due first."),
    "delete": (_BY_ID, "Delete a message (prep, que, err, done or relayed)."),
    "destroy": (_BY_ID, "SIGTERM the worker running a message."),
    "verify_rules": (
        "--path F [--verbose]",
        "Check a router rules file: ok, or fail bad router rules file (the reason with --verbose).",
    ),
    "create_queue": (
        "--name N --script S [--num_workers K] [--exec_prefix P]",
        "Create a queue: ok queue created - awesome.",
    ),
    "delete_queue": (_BY_NAME, "Delete a queue."),
    "queues": ("", "The queue names: ok <n>, then one name per line."),
    "up": (_BY_NAME, "Set a queue UP: it runs its messages."),
    "down": (_BY_NAME, "Set a queue DOWN: it refuses new messages and runs none."),
    "pause": (_BY_NAME, "Pause a queue: it takes messages but runs none."),
    "resume": (_BY_NAME, "Resume a paused queue."),
    "restart_queue": (_BY_NAME, "Restart a queue."),
    "status": (
        "[--json]",
        "The daemon and its queues at a glance; --json prints the JSON of rq status.",
    ),
    "ping": ("", "Is the daemon there? ok pong."),
    "reload": ("", "Re-read the queue configs, timers and scandir now."),
    "restart": ("", "Restart every queue."),
    "search": (
        "[--name Q] --query FIELD=VALUE [--query ...] [--exact]",
        "Messages of every state whose fields contain (--exact: equal) the values: ok <n>, then one JSON per line.",
    ),
    "init": (
        "[--force] [--host H] [--port P] [--env E] [--addr A] [--tmpdir D]"
        " [--allow-new-queue | --no-allow-new-queue]",
        "Lay out a root without starting the daemon.",
    ),
}

#: Help of the console's own commands.
_CONSOLE_HELP = {
    "help": ("[verb]", "List the commands, or describe one."),
    "quit": ("", "Leave the console (also exit, or Ctrl-D)."),
    "exit": ("", "Leave the console (also quit, or Ctrl-D)."),
}

#: Verbs whose C{--name} is an existing queue.
_QUEUE_NAME_VERBS = frozenset({"delete_queue", "up", "down", "pause", "resume", "restart_queue", "search"})

#: Verbs whose C{--dest} is a queue.
_QUEUE_DEST_VERBS = frozenset({"sendmesg", "prepmesg", "single_que"})


def verb_options(verb: str) -> list[str]:
    """
    The options a verb takes, as C{--name} words, from L{VERB_HELP}
    (C{--param1..4} stands for C{--param1} to C{--param4}).
    """
    usage = (VERB_HELP.get(verb) or _CONSOLE_HELP.get(verb) or ("", ""))[0]
    options: list[str] = []
    for name, first, last in re.findall(r"--([A-Za-z_-]*?)(?:(\d)\.\.(\d)|(?=[\s\]|]|$))", usage):
        if first:
            options += [f"--{name}{i}" for i in range(int(first), int(last) + 1)]
        elif f"--{name}" not in options:
            options.append(f"--{name}")
    return options


def history_path(environ: Mapping[str, str]) -> str | None:
    """
    The history file: C{$RQ_CONSOLE_HISTORY}, else C{~/.rq_console_history};
    C{None} when the variable is set but empty (no history kept).
    """
    path = environ.get(HISTORY_ENV)
    if path is None:
        return os.path.expanduser(DEFAULT_HISTORY)
    return os.path.expanduser(path) if path else None


# -- one connection for the whole session ------------------------------------------


def _peer_closed(sock: socket.socket) -> bool:
    """
    Whether an idle admin connection is no longer usable: between two
    requests the daemon sends nothing, so anything readable (the end of the
    stream, most likely) means the connection is gone.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)



def _uncommented(line: str) -> str:
    """
    C{line} without its comment: from a C{#} that starts a word, outside
    quotes, as the shell reads it (C{shlex}'s comments also start inside a
    word, which would cut C{http://host/page#part} short).
    """
    quote = ""
    escaped = False
    previous = " "
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif quote:
            if char == quote:
                quote = ""
            elif char == "\\" and quote == '"':
                escaped = True
        elif char == "\\":
            escaped = True
        elif char in "'\"":
            quote = char
        elif char == "#" and previous.isspace():
            return line[:i]
        previous = char
    return line

class SessionClient(AdminClient):
    """
    An admin client that keeps its connection open across calls.

    A connection found closed before a request (the daemon restarted since
    the last command) is replaced at once, since nothing was sent on it;
    one that breaks during a request raises, as L{AdminClient} does, and the
    next call connects again. A request is never sent twice.

    @ivar connections: How many connections were opened so far.
    """

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        super().__init__(socket_path, timeout)
        self._sock: socket.socket | None = None
        self.connections = 0

    @property
    def connected(self) -> bool:
        """
        Whether a connection is open (it may still turn out to be closed
        by the daemon).
        """
        return self._sock is not None

    def call(self, command: str, **args: str) -> tuple[str, str]:
        """
        Ask C{command} on the session's connection; see L{AdminClient.call}.
        """
        self._tags += 1
        tag = str(self._tags).encode("ascii")
        data = encode_box(request_box(command, args, tag))
        sock = self._session()
        deadline = time.monotonic() + self.timeout
        try:
            sock.sendall(data)
            answer = self._read_answer(sock, tag, deadline)
        except TimeoutError:
            self.close()
            raise ProtocolError(f"no answer to {command} from {self.socket_path} within {self.timeout:g}s") from None
        except OSError as e:
            error = self._broke(sock, e)
            self.close()
            raise error from None
        except BaseException:
            # A closed stream, a malformed answer or Ctrl-C: the connection
            # may hold a late answer, so it is not used again.
            self.close()
            raise
        return answer_result(command, answer)

    def close(self) -> None:
        """
        Close the connection, if open; the next call opens a new one.
        """
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _session(self) -> socket.socket:
        if self._sock is not None and _peer_closed(self._sock):
            self.close()
        if self._sock is None:
            self._sock = self._connect()
            self.connections += 1
        return self._sock


# -- the shell -------------------------------------------------------------------------


ClientFactory = Callable[[str], cli.AdminCaller]


class Console(cmd.Cmd):
    """
    The shell: reads lines, runs them as C{rq} verbs, prints their output.

    @ivar root: The absolute RQ root.
    @ivar interactive: Whether a person is typing (prompt, history, notes).
    @ivar failures: How many lines failed so far.
    """

    def __init__(
        self,
        root: str,
        client_factory: ClientFactory = SessionClient,
        stdin: IO[str] | None = None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        @param root: The RQ root whose daemon the console talks to.
        @param client_factory: Builds the admin client of a socket path;
            the console asks it once per socket and keeps the client.
        @param interactive: Default: whether C{stdin} is a terminal.
        @param clock: Monotonic seconds, for the queue-name cache.
        """
        super().__init__(stdin=stdin, stdout=stdout)
        self.stdin: IO[str] = self.stdin
        self.stdout: IO[str] = self.stdout
        self.stderr: IO[str] = sys.stderr if stderr is None else stderr
        self.root = root
        if interactive is None:
            interactive = _isatty(self.stdin)
        self.interactive = interactive
        self.use_rawinput = interactive
        self.prompt = "rq> " if interactive else ""
        self.failures = 0
        self._client_factory = client_factory
        self._clients: dict[str, cli.AdminCaller] = {}
        self._clock = clock
        self._queue_cache: tuple[float, list[str]] | None = None
        self._connections_seen = 0

    # -- the daemon

    @property
    def socket_path(self) -> str:
        """
        The admin socket of the console's root.
        """
        return os.path.join(self.root, SOCKET)

    def client(self, socket_path: str) -> cli.AdminCaller:
        """
        The session's client for a socket (the root's, or another root's
        given with C{--root} on a line), made on first use.
        """
        client = self._clients.get(socket_path)
        if client is None:
            client = self._clients[socket_path] = self._client_factory(socket_path)
        return client

    def close(self) -> None:
        """
        Close every connection of the session.
        """
        for client in self._clients.values():
            close = getattr(client, "close", None)
            if close is not None:
                close()
        self._clients.clear()

    def dispatch(self, verb: str, args: list[str]) -> tuple[bool, str]:
        """
        Run one C{rq} verb through the command line's dispatch, the root
        defaulting to the console's.
        """
        return cli.run(verb, args, self.client, environ={"RQ_ROOT": self.root})

    def greeting(self) -> str:
        """
        The first lines of an interactive session: where it is connected.
        """
        try:
            ok, output = self.dispatch("ping", [])
        except KeyboardInterrupt:
            ok, output = False, "fail cancelled"
        self._note_reconnect()
        if ok:
            where = f"connected to the rq daemon of {self.root}"
        else:
            where = f"{output}\n(the console connects again at each command)"
        return f"rq console: {where}\ntype help for the commands, quit or Ctrl-D to leave"

    # -- running lines

    def onecmd(self, line: str) -> bool:
        """
        Run one line; return C{True} to end the session.
        """
        try:
            words = shlex.split(_uncommented(line))
        except ValueError as e:
            self._fail_line(f"fail cannot read the line: {e}")
            return False
        if not words:
            return False
        verb, args = words[0], words[1:]
        if verb in QUIT_WORDS:
            if verb == "EOF" and self.interactive:
                self._out("")
            return True
        if verb in ("help", "?"):
            self.do_help(" ".join(args))
            return False
        if verb not in cli.VERBS:
            self._fail_line(f"Command not found: {verb} (cmd_{verb})", self.stderr)
            return False
        try:
            ok, output = self.dispatch(verb, args)
        except KeyboardInterrupt:
            self._fail_line("cancelled", self.stderr)
            return False
        self._note_reconnect()
        if ok and verb == "status" and "json" not in cli.parse_options(args):
            output = _pretty_status(output)
        self._out(output)
        if not ok:
            self.failures += 1
        return False

    def default(self, line: str) -> bool:
        """
        Lines go through L{onecmd}; nothing reaches here.
        """
        return self.onecmd(line)

    def emptyline(self) -> bool:
        """
        An empty line does nothing (not a repeat of the last command).
        """
        return False

    def run(self) -> int:
        """
        Read and run lines until the end; the exit status: 1 if a line
        failed when not interactive, else 0 (130 when a script is
        interrupted).
        """
        intro = self.greeting() if self.interactive else None
        try:
            while True:
                try:
                    self.cmdloop(intro)
                    break
                except KeyboardInterrupt:
                    if not self.interactive:
                        return 130
                    # Ctrl-C while typing: drop the line, prompt again.
                    self._out("^C")
                    intro = self.intro = None
        except Exception as e:  # never a traceback (e.g. stdin unreadable)
            if isinstance(e, OSError) and e.errno in _WRITE_ERRORS:
                # (Standard output is full or gone: cmd writes the prompt
                # there itself, not through _out.)
                cli._write_failed(self.stdout, e)
            else:
                self._out(f"fail internal error: {e.__class__.__name__}: {e}", self.stderr)
            return 1
        finally:
            self.close()
        return 1 if self.failures and not self.interactive else 0

    # -- help

    def do_help(self, arg: str) -> None:
        """
        C{help}: the commands; C{help <verb>}: one command.
        """
        topic = arg.strip()
        if not topic:
            self._out("rq verbs (as on the rq command line, without 'rq'):")
            self.columnize(list(cli.VERBS), 78)
            self._out("console: help [verb], status [--json], quit, exit, Ctrl-D; Ctrl-C cancels the line")
            return
        entry = VERB_HELP.get(topic) or _CONSOLE_HELP.get(topic)
        if topic not in cli.VERBS and topic not in _CONSOLE_HELP:
            self._fail_line(f"Command not found: {topic} (cmd_{topic})", self.stderr)
            return
        if entry is None:
            self._out(f"{topic} [--option value ...]\n  See the rq command line documentation.")
            return
        usage, text = entry
        self._out(f"{topic} {usage}".rstrip() + f"\n  {text}")

    # -- completion

    def completenames(self, text: str, *ignored: Any) -> list[str]:
        """
        Complete the first word: verbs and the console's commands.
        """
        return [name + " " for name in self._names() if name.startswith(text)]

    def complete_help(self, text: str, *ignored: Any) -> list[str]:
        """
        Complete C{help <verb>}.
        """
        return self.completenames(text)

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        """
        Complete a word after the verb: a queue name where C{--name} or
        C{--dest} expects one (C{--dest q} or C{--dest=q}), else an option
        of the verb.
        """
        before = line[:begidx].split()
        if not before:
            return []
        verb = before[0]
        for option in self._queue_options(verb):
            if text.startswith(option + "="):
                prefix = option + "="
                return [prefix + q for q in self.queue_names() if q.startswith(text[len(prefix) :])]
        if len(before) > 1 and before[-1] in self._queue_options(verb):
            return [q + " " for q in self.queue_names() if q.startswith(text)]
        if text.startswith("-"):
            return [o + " " for o in verb_options(verb) if o.startswith(text)]
        return []

    def queue_names(self) -> list[str]:
        """
        The daemon's queues (from C{queues}), kept a few seconds; empty when
        the daemon does not answer.
        """
        now = self._clock()
        if self._queue_cache is not None and now - self._queue_cache[0] < QUEUE_CACHE_SECONDS:
            return self._queue_cache[1]
        try:
            ok, output = self.dispatch("queues", [])
        except KeyboardInterrupt:
            return []
        names = output.splitlines()[1:] if ok else []
        self._queue_cache = (now, names)
        return names

    def preloop(self) -> None:
        """
        Complete whole words (options hold C{-} and C{=}), with libedit too.
        """
        if not (self.use_rawinput and self.completekey):
            return
        try:
            import readline
        except ImportError:
            return
        readline.set_completer_delims(" \t\n")
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")

    # -- helpers

    def _names(self) -> list[str]:
        return [*cli.VERBS, "help", "quit", "exit"]

    def _queue_options(self, verb: str) -> tuple[str, ...]:
        options = []
        if verb in _QUEUE_NAME_VERBS:
            options.append("--name")
        if verb in _QUEUE_DEST_VERBS:
            options.append("--dest")
        return tuple(options)

    def _note_reconnect(self) -> None:
        """
        Tell the person at the keyboard when the session had to connect
        again (the daemon restarted).
        """
        client = self._clients.get(self.socket_path)
        connections = getattr(client, "connections", 0)
        if connections > self._connections_seen:
            if self._connections_seen and self.interactive:
                self._out("(connected again to the rq daemon)", self.stderr)
            self._connections_seen = connections

    def _fail_line(self, text: str, stream: IO[str] | None = None) -> None:
        self.failures += 1
        self._out(text, stream)

    def _out(self, text: str, stream: IO[str] | None = None) -> None:
        cli._write(self.stdout if stream is None else stream, text)


#: Errors only a write gives (a full disk or quota, a reader gone): the
#: session's output cannot be written.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE})


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# -- status, for people -------------------------------------------------------------


def _when(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _table(rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = set(right)
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


_STATES = ("prep", "que", "run", "done", "err", "relayed")
_KNOWN_KEYS = {
    "status", "version", "rqtwisted", "pid", "uptime", "time", "root", "sync_rounds",
    "queues", "config_errors", "timers", "scandir",
}  # fmt: skip


def _pretty_status(text: str) -> str:
    """
    The JSON of C{rq status} as a summary for people; the JSON itself if it
    is not shaped as expected.
    """
    try:
        return "\n".join(_status_lines(json.loads(text)))
    except Exception:
        return text


def _status_lines(status: dict[str, Any]) -> list[str]:
    lines = [
        f"{status.get('status', '?')}  rq {status.get('version', '?')} (rqtwisted {status.get('rqtwisted', '?')})"
        f"  pid {status.get('pid', '?')}  up {_duration(status.get('uptime'))}"
        f"  sync rounds {status.get('sync_rounds', '?')}",
        f"root {status.get('root', '?')}",
    ]
    queues = status.get("queues") or []
    if queues:
        rows = [["queue", "status", "workers", *_STATES, "up"]]
        for q in queues:
            counts = q.get("counts") or {}
            if "counts" in q:
                rows.append(
                    [
                        str(q.get("name")),
                        str(q.get("status")),
                        str(q.get("num_workers", "-")),
                        *(str(counts.get(s, "-")) for s in _STATES),
                        _duration(q.get("uptime")),
                    ]
                )
            else:
                failures = q.get("failures")
                note = f"failed {failures} times" if failures is not None else ""
                rows.append([str(q.get("name")), str(q.get("status")), "-", *("-" for _ in _STATES), note])
        lines += ["", *_table(rows, right=range(2, 2 + 1 + len(_STATES)))]
    schedule = [
        [str(q.get("name")), str(e.get("cron")), _when(e.get("next_run")), json.dumps(e.get("params") or {})]
        for q in queues
        for e in q.get("schedule") or []
    ]
    if schedule:
        lines += ["", "schedules:", *("  " + line for line in _table([["queue", "cron", "next run", "params"], *schedule]))]
    timers = status.get("timers") or []
    if timers:
        rows = [["timer", "period", "next run", "last run", "error"]]
        rows += [
            [
                str(t.get("name")),
                _duration(t.get("period")),
                _when(t.get("next_run")),
                _when(t.get("last_run")),
                str(t.get("error") or ""),
            ]
            for t in timers
        ]
        lines += ["", "timers:", *("  " + line for line in _table(rows))]
    scandir = status.get("scandir") or []
    if scandir:
        rows = [["entry", "target", "queue", "error"]]
        rows += [
            [str(s.get("name")), str(s.get("target") or ""), str(s.get("queue") or ""), str(s.get("error") or "")]
            for s in scandir
        ]
        lines += ["", "scandir:", *("  " + line for line in _table(rows))]
    errors = status.get("config_errors") or {}
    if errors:
        lines += ["", "config errors:", *(f"  {name}: {reason}" for name, reason in errors.items())]
    others = {k: v for k, v in status.items() if k not in _KNOWN_KEYS and v not in (None, [], {})}
    if others:
        lines += ["", *(f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in others.items())]
    return lines


# -- history ---------------------------------------------------------------------------


def _load_history(path: str | None) -> Any:
    """
    Set up readline's history from C{path}; the readline module, or
    C{None} without readline.
    """
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(HISTORY_LENGTH)
    if path is not None:
        try:
            readline.read_history_file(path)
        except OSError:
            pass
    return readline


def _save_history(readline: Any, path: str | None) -> None:
    if readline is None or path is None:
        return
    try:
        # The history may hold message parameters: keep it private.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        readline.write_history_file(path)
    except OSError:
        pass


# -- entry point -------------------------------------------------------------------------


_USAGE = """usage: rq console [--root DIR]

An admin shell on the rq daemon of DIR (default $RQ_ROOT, else the root rq
is run from as DIR/bin/rq, else the current directory): type rq verbs
without 'rq', help for the list, quit to leave. With commands piped on
stdin, runs each line; exit status 1 if any failed."""


def main(
    argv: list[str],
    client_factory: ClientFactory | None = None,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    program: str | None = None,
) -> int:
    """
    C{rq console [--root DIR]}: run the console; its exit status. With
    stdout closed nothing is run: one note on stderr and exit 1, as for
    every C{rq} verb.

    @param argv: The words after C{console}.
    @param client_factory: Builds the admin client of a socket path
        (default L{SessionClient}).
    @param program: The path C{rq} was run by, where the root may be found
        (L{cli.program_root}).
    """
    environ = os.environ if environ is None else environ
    stdout = sys.stdout if stdout is None else stdout
    if not cli.check_open(stdout):
        return 1
    options = cli.parse_options(argv)
    if "help" in options:
        return 0 if cli._write(stdout, _USAGE) else 1
    try:
        root = cli.resolve_root(options, environ, program)
    except cli.CommandFailed as e:
        cli._write(stdout, f"fail {e.reason}")
        return 1
    if stdin is None:
        # Bytes that are not UTF-8 reach the verbs, which refuse them.
        try:
            sys.stdin.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    console = Console(root, client_factory or SessionClient, stdin=stdin, stdout=stdout, stderr=stderr)
    history = history_path(environ) if console.interactive else None
    readline = _load_history(history) if console.interactive else None
    try:
        return console.run()
    finally:
        _save_history(readline, history)
