"""
The C{rq} command line: C{rq <command> [--key=value | --key value | --flag] ...}.

Every command but C{init} and C{verify_rules} asks the daemon one admin
command (L{rqtwisted.admincommands}) over C{<root>/config/rq.sock} and prints
one line C{<status> <detail>}; the exit status is 0 iff the status is C{ok}.
The original's verbs keep its exact output (cli.md); nothing prints a
traceback: refusals, missing options and an absent daemon all print
C{fail <reason>} and exit 1; output that cannot be written is a short note
on stderr and exit 1; Ctrl-C exits 130.

This module must start fast: it imports neither Twisted nor anything that
does, on every path that talks to the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, Callable, Iterator, Mapping, Protocol

from rqtwisted.admincommands import MAX_MESSAGE_FILE, SOCKET, SPILL_DIR
from rqtwisted.ampclient import MAX_VALUE_LENGTH, AdminClient, AdminClientError, DaemonNotReachable
from rqtwisted.fsync import remove_quietly
from rqtwisted.message import PARAM_KEYS, not_unicode

__all__ = [
    "AdminCaller",
    "CommandFailed",
    "EXIT_INTERRUPTED",
    "Invocation",
    "MESSAGE_KEYS",
    "VERBS",
    "asks_help",
    "main",
    "parse_options",
    "program_root",
    "resolve_root",
    "run",
]

#: Option values: text, or C{True} for a lone C{--flag}.
Options = dict[str, "str | bool"]

#: The only options copied into a new message (cli.md).
MESSAGE_KEYS = (
    "dest",
    "src",
    "count",
    "max_count",
    *PARAM_KEYS,
    "due",
    "force_remote",
)


class AdminCaller(Protocol):
    """
    What the command line needs of an admin client (L{AdminClient}).
    """

    def call(self, command: str, **args: str) -> tuple[str, str]:
        """
        Ask one admin command; return C{(status, detail)}.
        """


#: Builds an admin client for a socket path.
ClientFactory = Callable[[str], AdminCaller]


class CommandFailed(Exception):
    """
    The command cannot go on; the user sees C{fail <reason>}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_options(args: list[str]) -> Options:
    """
    Parse the words after the command the way the original does (cli.md).

    A word containing C{--} is an option named by what follows its first
    C{--}: C{--k=v} sets C{k} to C{v} (split at the first C{=});
    C{--k v} takes the next word unless it contains C{--}; a lone C{--k} is
    C{True}. Other words are ignored; a later option overrides an earlier
    one.
    """
    return dict(_option_pairs(args))


def _option_pairs(args: list[str]) -> Iterator[tuple[str, str | bool]]:
    """
    Each option of C{args} as C{(name, value)}, in order, by the rules of
    L{parse_options}.
    """
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if "--" not in word:
            continue
        name = word.split("--", 1)[1]
        if "=" in name:
            key, value = name.split("=", 1)
            yield key, value
        elif i < len(args) and "--" not in args[i]:
            yield name, args[i]
            i += 1
        else:
            yield name, True


def asks_help(args: list[str]) -> bool:
    """
    Whether the words after a command ask for the list of commands: a word
    C{--help} or C{-h} (cli.md), where C{-h} is not the value an option
    takes by the rules of L{parse_options} (C{--param1 -h} sends C{-h}).
    """
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if word in ("-h", "--help"):
            return True
        if "--" in word and "=" not in word.split("--", 1)[1] and i < len(args) and "--" not in args[i]:
            # The option's value, whatever it says.
            i += 1
    return False


def resolve_root(
    options: Options, environ: Mapping[str, str] | None = None, program: str | None = None
) -> str:
    """
    The RQ root, absolute: C{--root}, else C{$RQ_ROOT}, else the root the
    program lives in (L{program_root}), else the current directory.

    @param program: The path the program was run by (C{sys.argv[0]}), if
        known.
    @raise CommandFailed: C{--root} was given without a value.
    """
    environ = os.environ if environ is None else environ
    root = options.get("root")
    if root is True:
        raise CommandFailed("option --root needs a value")
    return os.path.abspath(root or environ.get("RQ_ROOT") or program_root(program) or os.getcwd())


def program_root(program: str | None) -> str | None:
    """
    The root a program run as C{<root>/bin/rq} lives in, found from its own
    path as the original's C{bin/rq} found it (cli.md), so that a link
    C{<root>/bin/rq} to this program works from any directory: the parent
    of the program's directory, if it holds C{config/config.json}; else
    L{None}. The path is taken as run, links not followed (the link's
    directory is the root's, its target's is not).
    """
    if not program:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(program)))
    if os.path.isfile(os.path.join(root, "config", "config.json")):
        return root
    return None


class Invocation:
    """
    One run of a command: its options, its root, and the daemon.

    @ivar verb: The command as typed, e.g. C{sendmesg}.
    @ivar root: The absolute RQ root.
    @ivar options: The parsed options.
    """

    def __init__(
        self, verb: str, root: str, options: Options, client_factory: ClientFactory, args: list[str] | None = None
    ) -> None:
        self.verb = verb
        self.root = root
        self.options = options
        #: The argument words as typed (for repeatable options).
        self.args = list(args or [])
        self._client_factory = client_factory
        self._client: AdminCaller | None = None

    @property
    def socket_path(self) -> str:
        """
        The daemon's admin socket below the root.
        """
        return os.path.join(self.root, SOCKET)

    def text(self, name: str) -> str:
        """
        A required text option.

        @raise CommandFailed: it is missing, or given without a value.
        """
        value = self.optional_text(name)
        if value is None:
            raise CommandFailed(f"missing required --{name} option")
        return value

    def optional_text(self, name: str) -> str | None:
        """
        A text option, or C{None} when absent.

        @raise CommandFailed: it was given without a value.
        """
        value = self.options.get(name)
        if value is True:
            raise CommandFailed(f"option --{name} needs a value")
        return value

    def flag(self, name: str) -> bool:
        """
        Whether an option was given at all (any value counts, as in the
        original).
        """
        return name in self.options

    def call(self, command: str, *, timeout: float | None = None, **args: str) -> tuple[str, str]:
        """
        Ask the daemon an admin command.

        @param timeout: seconds the daemon may take to answer this command
            at least, when longer than the client's own C{timeout} (as
            L{AdminClient} has one; a console's client keeps its own for
            the next commands).
        @raise CommandFailed: the daemon is not running, or the exchange
            failed.
        """
        if self._client is None:
            self._client = self._client_factory(self.socket_path)
        client: Any = self._client
        usual = getattr(client, "timeout", None)
        longer = timeout is not None and isinstance(usual, (int, float)) and usual < timeout
        if longer:
            client.timeout = timeout
        try:
            return client.call(command, **args)
        except DaemonNotReachable as e:
            raise CommandFailed(f"rq daemon not running at {self.root}: {e.reason}") from None
        except AdminClientError as e:
            raise CommandFailed(str(e)) from None
        finally:
            if longer:
                client.timeout = usual


#: What a command handler returns: success, and the text to print.
Outcome = tuple[bool, str]
Handler = Callable[[Invocation], Outcome]

_HANDLERS: dict[str, Handler] = {}


def _verbs(*names: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        for name in names:
            _HANDLERS[name] = handler
        return handler

    return register


def _reply(status: str, detail: str) -> Outcome:
    return status == "ok", f"{status} {detail}"


def _json_reply(detail: str, kind: type) -> Any:
    try:
        value = json.loads(detail)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise CommandFailed(f"invalid reply from the rq daemon: {detail[:200]}")
    return value


# -- the original's verbs ---------------------------------------------------


@_verbs("sendmesg", "prepmesg", "single_que")
def _create_message(inv: Invocation) -> Outcome:
    method = {"sendmesg": "commit", "prepmesg": "prep", "single_que": "single_que"}[inv.verb]
    message: dict[str, str | bool] = {"dest": inv.text("dest")}
    for key in MESSAGE_KEYS[1:]:
        if key in inv.options:
            message[key] = inv.options[key]
    bad = not_unicode(message)
    if bad is not None:
        raise CommandFailed(f"argument {bad[0]!r} is not valid Unicode: {bad[1]}")
    text = json.dumps(message)
    relay_ok = "1" if inv.flag("relay-ok") else ""
    if len(text) <= MAX_VALUE_LENGTH:
        return _reply(*inv.call("CreateMessage", message=text, method=method, relay_ok=relay_ok))
    # Too large for AMP (the original's frame took up to 8 digits of
    # length): handed over in a file the daemon reads and removes.
    if len(text) > MAX_MESSAGE_FILE:
        raise CommandFailed(f"message is {len(text)} bytes long; at most {MAX_MESSAGE_FILE} are accepted")
    path = _message_file(inv.root, text)
    try:
        return _reply(*inv.call("CreateMessage", message="", method=method, relay_ok=relay_ok, message_file=path))
    finally:
        remove_quietly(path)


def _message_file(root: str, text: str) -> str:
    """
    Write C{text} (ASCII: C{json.dumps} escapes the rest) to a new file of
    the root's spill directory, readable by its owner only; its path.
    """
    import tempfile

    directory = os.path.join(root, SPILL_DIR)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="message-", suffix=".json", dir=directory)
    except OSError as e:
        raise CommandFailed(f"cannot hand the message over: {e}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
    return path


#: Seconds an attach may take whatever the file's size (the admin client's
#: usual timeout), and the slowest rate (bytes a second) the daemon is
#: allowed to copy and hash a file at before an attach is given up.
ATTACH_BASE_TIMEOUT = 30.0
ATTACH_MIN_RATE = 16 << 20


def attach_timeout(size: int) -> float:
    """
    Seconds to wait for the daemon to attach a file of C{size} bytes: it
    may copy it and reads it whole for its md5.
    """
    return ATTACH_BASE_TIMEOUT + size / ATTACH_MIN_RATE


@_verbs("attachmesg")
def _attach_message(inv: Invocation) -> Outcome:
    msg_id = inv.text("msg_id")
    pathname = os.path.abspath(inv.text("pathname"))
    args = {"msg_id": msg_id, "pathname": pathname}
    name = inv.optional_text("name")
    if name is not None:
        args["name"] = name
    try:
        size = os.stat(pathname).st_size
    except (OSError, ValueError):
        # The daemon says what is wrong with it.
        size = 0
    status, detail = inv.call("AttachMessage", timeout=attach_timeout(size), **args)
    return status == "ok", f"{status} {detail} for Message: {msg_id} attachment"


_MESSAGE_ACTIONS = {
    "commitmesg": "commit",
    "statusmesg": "status",
    "state": "state",
    "clone": "clone",
    "delete": "delete",
    "run_now": "run_now",
    "destroy": "destroy",
}


@_verbs(*_MESSAGE_ACTIONS)
def _message_action(inv: Invocation) -> Outcome:
    action = _MESSAGE_ACTIONS[inv.verb]
    return _reply(*inv.call("MessageAction", action=action, msg_id=inv.text("msg_id")))


def _get_message(inv: Invocation) -> tuple[str, str, dict[str, Any] | None]:
    status, detail = inv.call("GetMessage", msg_id=inv.text("msg_id"))
    if status != "ok":
        return status, detail, None
    return status, detail, _json_reply(detail, dict)


@_verbs("statuscountmesg")
def _status_count(inv: Invocation) -> Outcome:
    status, detail, message = _get_message(inv)
    if message is None:
        return _reply(status, detail)
    return True, f"ok {message.get('count', 0)}"


@_verbs("attachstatusmesg")
def _attach_status(inv: Invocation) -> Outcome:
    status, detail, message = _get_message(inv)
    if message is None:
        return _reply(status, detail)
    attachments = message.get("_attachments") or {}
    try:
        lines = [
            f"{name} {a['md5']} {a['size']} {a['path']}" for name, a in sorted(attachments.items())
        ]
    except (AttributeError, KeyError, TypeError):
        raise CommandFailed(f"invalid reply from the rq daemon: {detail[:200]}") from None
    return True, "\n".join([f"ok {len(lines)}", *lines])


@_verbs("verify_rules")
def _verify_rules(inv: Invocation) -> Outcome:
    path = inv.text("path")
    verbose = inv.flag("verbose")
    from rqtwisted.rules import verify_rules_file

    ok, text = verify_rules_file(path, verbose)
    lines = ["ok" if ok else "fail bad router rules file"]
    if verbose and text:
        lines.append(text)
    elif not ok and text:
        # stdout keeps the original's exact line; where and why go to stderr.
        _write(sys.stderr, text)
    return bool(ok), "\n".join(lines)


# -- administration -----------------------------------------------------------


@_verbs("init")
def _init(inv: Invocation) -> Outcome:
    options = {name: inv.optional_text(name) for name in ("host", "port", "env", "addr", "tmpdir")}
    if inv.flag("no-allow-new-queue"):
        options["allow_new_queue"] = False
    elif inv.flag("allow-new-queue"):
        options["allow_new_queue"] = True
    from rqtwisted.root import init_root

    try:
        init_root(inv.root, force=inv.flag("force"), **options)
    except Exception as e:
        raise CommandFailed(getattr(e, "reason", None) or str(e)) from None
    return True, f"ok {inv.root}"


@_verbs("ping")
def _ping(inv: Invocation) -> Outcome:
    return _reply(*inv.call("Ping"))


@_verbs("restart")
def _restart(inv: Invocation) -> Outcome:
    return _reply(*inv.call("Restart"))


@_verbs("reload")
def _reload(inv: Invocation) -> Outcome:
    return _reply(*inv.call("Reload"))


@_verbs("status")
def _status(inv: Invocation) -> Outcome:
    status, detail = inv.call("Status")
    if status != "ok":
        return _reply(status, detail)
    return True, json.dumps(_json_reply(detail, object), indent=2, ensure_ascii=False)


@_verbs("queues")
def _queues(inv: Invocation) -> Outcome:
    status, detail = inv.call("Queues")
    if status != "ok":
        return _reply(status, detail)
    names = _json_reply(detail, list)
    return True, "\n".join([f"ok {len(names)}", *map(str, names)])


@_verbs("create_queue")
def _create_queue(inv: Invocation) -> Outcome:
    config = {"name": inv.text("name"), "script": inv.text("script")}
    for key in ("num_workers", "exec_prefix"):
        value = inv.optional_text(key)
        if value is not None:
            config[key] = value
    status, detail = inv.call("CreateQueue", config=json.dumps(config))
    return _reply("ok" if status == "success" else status, detail)


@_verbs("delete_queue")
def _delete_queue(inv: Invocation) -> Outcome:
    return _reply(*inv.call("DeleteQueue", name=inv.text("name")))


_QUEUE_ACTIONS = {"up": "up", "down": "down", "pause": "pause", "resume": "resume", "restart_queue": "restart"}


@_verbs(*_QUEUE_ACTIONS)
def _queue_admin(inv: Invocation) -> Outcome:
    return _reply(*inv.call("QueueAdmin", action=_QUEUE_ACTIONS[inv.verb], name=inv.text("name")))


def repeated_option(args: list[str], name: str) -> list[str | bool]:
    """
    Every value of a repeatable option, by the rules of L{parse_options}.
    """
    return [value for key, value in _option_pairs(args) if key == name]


@_verbs("search")
def _search(inv: Invocation) -> Outcome:
    query: dict[str, str] = {}
    for pair in repeated_option(inv.args, "query"):
        if pair is True or "=" not in pair:
            raise CommandFailed("--query takes field=value")
        field, value = pair.split("=", 1)
        if not field:
            raise CommandFailed("--query takes field=value")
        query[field] = value
    args = {"query": json.dumps(query), "exact": "1" if inv.flag("exact") else ""}
    name = inv.optional_text("name")
    if name is not None:
        args["name"] = name
    status, detail = inv.call("Search", **args)
    if status != "ok":
        return _reply(status, detail)
    found = _json_reply(detail, list)
    return True, "\n".join([f"ok {len(found)}", *(json.dumps(m, ensure_ascii=False) for m in found)])


@_verbs("show")
def _show(inv: Invocation) -> Outcome:
    status, detail, message = _get_message(inv)
    if message is None:
        return _reply(status, detail)
    return True, json.dumps(message, indent=2, ensure_ascii=False)


#: Every command, in the order C{rq --help} lists them.
VERBS: tuple[str, ...] = tuple(_HANDLERS)


def _usage() -> str:
    return "\n".join(["Valid commands are:", *VERBS, "console"])


def _write(stream: Any, text: str) -> bool:
    """
    Write C{text} and a newline to C{stream} and flush it; whether that
    worked.

    When it does not (the stream was closed before C{rq} started, the disk
    is full, the reader went away), the stream's descriptor is pointed at
    C{/dev/null}, so that the interpreter's own flush at exit has nothing
    to complain about, and a short note goes to stderr, unless the stream
    is stderr or the reader just stopped reading (C{rq queues | head -1}).
    """
    if not check_open(stream):
        return False
    try:
        stream.write(text + "\n")
        stream.flush()
        return True
    except (OSError, ValueError) as e:
        _write_failed(stream, e)
        return False


def check_open(stream: Any) -> bool:
    """
    Whether C{stream} is open. One closed before C{rq} started (C{rq
    console >&-} leaves C{sys.stdout} L{None}) gets the note on stderr that
    L{_write} gives for any stream it cannot write.
    """
    if stream is None:
        _write_failed(stream, OSError(errno.EBADF, "it is closed"))
        return False
    return True


def _write_failed(stream: Any, error: Exception) -> None:
    _discard(stream)
    if stream is not sys.stderr and not isinstance(error, BrokenPipeError):
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        _write(sys.stderr, f"rq: cannot write to {_stream_name(stream)}: {reason}")


def _stream_name(stream: Any) -> str:
    if stream is sys.stdout:
        return "standard output"
    if stream is sys.stderr:
        return "standard error"
    return str(getattr(stream, "name", "the output"))


def _discard(stream: Any) -> None:
    """
    Point C{stream}'s descriptor at C{/dev/null}: what it still buffers,
    and anything written later, is dropped without an error.
    """
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (AttributeError, OSError, ValueError):
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


def run(
    verb: str,
    args: list[str],
    client_factory: ClientFactory,
    environ: Mapping[str, str] | None = None,
    program: str | None = None,
) -> Outcome:
    """
    Run one known command with its argument words; never raises. The one
    dispatch of the command line and of C{rq console}.

    @param environ: Where C{RQ_ROOT} is looked up (default C{os.environ}).
    @param program: The path C{rq} was run by, for L{resolve_root}.
    """
    try:
        options = parse_options(args)
        invocation = Invocation(verb, resolve_root(options, environ, program), options, client_factory, args)
        return _HANDLERS[verb](invocation)
    except CommandFailed as e:
        return False, f"fail {e.reason}"
    except Exception as e:  # never a traceback
        return False, f"fail internal error: {e.__class__.__name__}: {e}"


#: The exit status after Ctrl-C: 128 + SIGINT, as shells report it.
EXIT_INTERRUPTED = 130


def main(
    argv: list[str] | None = None, client_factory: ClientFactory | None = None, program: str | None = None
) -> int:
    """
    The C{rq} entry point. Ctrl-C ends it with L{EXIT_INTERRUPTED} and no
    traceback; output that cannot be written makes it fail (exit 1).

    @param argv: The words after the program name (default C{sys.argv[1:]}).
    @param client_factory: Builds the admin client from the socket path
        (default L{AdminClient}); tests inject fakes here.
    @param program: The path the program was run by, where its root may be
        found (L{program_root}); default C{sys.argv[0]} when C{argv} is
        not given, else none.
    @return: The exit status: 0 iff the command succeeded.
    """
    if argv is None:
        argv = sys.argv[1:]
        if program is None:
            program = sys.argv[0]
    try:
        return _main(list(argv), client_factory, program)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _main(args: list[str], client_factory: ClientFactory | None, program: str | None) -> int:
    if not args or args[0] in ("-h", "--help"):
        _write(sys.stdout, _usage())
        return 1
    verb = args[0]
    if verb == "console":
        from rqtwisted.console import main as console

        return console(args[1:], client_factory, program=program)
    if asks_help(args[1:]):
        # Nothing is done (C{rq init -h} lays out no root).
        _write(sys.stdout, _usage())
        return 1
    if verb not in _HANDLERS:
        _write(sys.stderr, f"Command not found: {verb} (cmd_{verb})")
        return 1
    ok, output = run(verb, args[1:], client_factory or AdminClient, program=program)
    written = _write(sys.stdout, output)
    return 0 if ok and written else 1
