"""
Tests for L{rqtwisted.console}: lines run through the command line's dispatch
against a fake daemon (same requests, same output lines), the console's own
commands, completion, exit statuses, and the session client against the real
admin protocol.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from rqtwisted import cli, console
from rqtwisted.admin import AdminFactory, AdminProtocol
from rqtwisted.admincommands import SOCKET
from rqtwisted.ampclient import DaemonBusy, DaemonNotReachable, ProtocolError
from rqtwisted.console import Console, SessionClient, history_path, verb_options
from tests.unit.fake_admin import FakeDaemon

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL_ID = "http://localhost:3333/q/hello/20100625.0127.35.122.7"
ROOT = "/srv/rq"


class Session:
    """
    A console on fake streams: C{run(text)} feeds it lines and returns
    C{(exit status, stdout, stderr)}.
    """

    def __init__(self, daemon: FakeDaemon, interactive: bool = False, clock: Callable[[], float] | None = None) -> None:
        self.daemon = daemon
        self.stdin = io.StringIO()
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.console = Console(
            ROOT,
            daemon,
            stdin=self.stdin,
            stdout=self.stdout,
            stderr=self.stderr,
            interactive=interactive,
            **({"clock": clock} if clock else {}),
        )
        # Interactive sessions read the fake stdin too, not the terminal.
        self.console.use_rawinput = False

    def run(self, text: str) -> tuple[int, str, str]:
        self.stdin.write(text)
        self.stdin.seek(0)
        code = self.console.run()
        return code, self.stdout.getvalue(), self.stderr.getvalue()


def cli_output(daemon: FakeDaemon, verb: str, *args: str) -> tuple[bool, str]:
    """
    What the command line prints for a verb, against the same replies.
    """
    return cli.run(verb, list(args), daemon, environ={"RQ_ROOT": ROOT})


# -- lines as rq verbs ------------------------------------------------------------------


def test_sameOutputAsCommandLine() -> None:
    """
    Each verb prints exactly what C{rq <verb>} prints, after the same
    requests; the console asks for one client, of the root's socket.
    """
    replies = {
        "Queues": ("ok", '["hello", "relay"]'),
        "CreateQueue": ("success", "queue created - awesome"),
        "CreateMessage": ("ok", FULL_ID),
        "MessageAction": ("ok", "done - greeted world"),
    }
    lines = [
        ["queues"],
        ["create_queue", "--name", "hello", "--script", "./code/hello.sh", "--exec_prefix="],
        ["sendmesg", "--dest", "hello", "--param1", "two words"],
        ["statusmesg", "--msg_id", FULL_ID],
    ]
    expected = FakeDaemon(**replies)
    outputs = [cli_output(expected, *words)[1] for words in lines]
    daemon = FakeDaemon(**replies)
    text = "queues\ncreate_queue --name hello --script ./code/hello.sh --exec_prefix=\n"
    text += f"sendmesg --dest hello --param1 'two words'\nstatusmesg --msg_id {FULL_ID}\n"
    code, out, err = Session(daemon).run(text)
    assert (code, err) == (0, "")
    assert out == "".join(o + "\n" for o in outputs)
    assert out.splitlines()[:3] == ["ok 2", "hello", "relay"]
    assert daemon.requests == expected.requests
    assert daemon.requests[2][1]["message"] == json.dumps({"dest": "hello", "param1": "two words"})
    assert daemon.sockets == [os.path.join(ROOT, SOCKET)]
    assert daemon.closed == 1


def test_failedLineExitStatus() -> None:
    """
    Without a terminal every line runs, failed or not; the exit status is 1
    if any failed.
    """
    daemon = FakeDaemon(MessageAction=("fail", "msg not found"), Ping=("ok", "pong"))
    code, out, err = Session(daemon).run(f"state --msg_id {FULL_ID}\nping\n")
    assert (code, out, err) == (1, "fail msg not found\nok pong\n", "")


def test_allOkExitStatus() -> None:
    """
    Lines that all succeed exit 0; blank lines and comments are skipped.
    """
    daemon = FakeDaemon(Ping=("ok", "pong"))
    code, out, err = Session(daemon).run("\n# a comment\n   \nping  # and another\nping\n")
    assert (code, out, err) == (0, "ok pong\nok pong\n", "")
    assert [r[0] for r in daemon.requests] == ["Ping", "Ping"]


def test_hashInsideAWordIsNoComment() -> None:
    """
    As in the shell, C{#} starts a comment only at the start of a word,
    outside quotes: a URL with a fragment is kept whole, and what follows
    it too.
    """
    daemon = FakeDaemon(CreateMessage=("ok", "id"))
    code, out, err = Session(daemon).run(
        "sendmesg --dest q --param1 http://x/page#s --param2 '#two' # a comment\n"
    )
    assert (code, err) == (0, "")
    message = json.loads(daemon.requests[0][1]["message"])
    assert (message["param1"], message["param2"]) == ("http://x/page#s", "#two")


def test_missingOption() -> None:
    """
    A missing option fails as on the command line, nothing asked.
    """
    daemon = FakeDaemon()
    code, out, _ = Session(daemon).run("sendmesg\n")
    assert (code, out) == (1, "fail missing required --dest option\n")
    assert daemon.requests == []


def test_unknownVerb() -> None:
    """
    An unknown word is refused as C{rq} refuses it, on stderr; it counts
    as a failure.
    """
    daemon = FakeDaemon()
    code, out, err = Session(daemon).run("frobnicate --name x\nconsole\n")
    assert (code, out) == (1, "")
    assert err == "Command not found: frobnicate (cmd_frobnicate)\nCommand not found: console (cmd_console)\n"
    assert daemon.requests == []


def test_unbalancedQuote() -> None:
    """
    A line that cannot be split into words fails with a reason.
    """
    code, out, _ = Session(FakeDaemon()).run("sendmesg --dest 'hello\n")
    assert code == 1
    assert out.startswith("fail cannot read the line: ")


@pytest.mark.parametrize("word", ["quit", "exit", "EOF"])
def test_quitStops(word: str) -> None:
    """
    C{quit}, C{exit} (and C{EOF}) end the session: later lines do not run.
    """
    daemon = FakeDaemon(Ping=("ok", "pong"))
    code, out, _ = Session(daemon).run(f"ping\n{word}\nping\n")
    assert (code, out) == (0, "ok pong\n")
    assert len(daemon.requests) == 1


def test_lineRootOverrides() -> None:
    """
    C{--root} on a line talks to that root's daemon, as C{rq --root} does;
    the console's root stays the default.
    """
    daemon = FakeDaemon(Ping=("ok", "pong"))
    code, _, _ = Session(daemon).run("ping --root /other\nping\n")
    assert code == 0
    assert daemon.sockets == [os.path.join("/other", SOCKET), os.path.join(ROOT, SOCKET)]


def test_daemonGoneThenBack() -> None:
    """
    A daemon that cannot be reached gives the command line's message; the
    next command asks again, on the same client (which connects again).
    """
    daemon = FakeDaemon(Ping=[DaemonNotReachable("/s", "Connection refused"), ("ok", "pong")])
    code, out, err = Session(daemon).run("ping\nping\n")
    assert code == 1
    assert out == f"fail rq daemon not running at {ROOT}: Connection refused\nok pong\n"
    assert "Traceback" not in err
    assert len(daemon.sockets) == 1


def test_brokenExchange() -> None:
    """
    A connection lost during a command is a C{fail} line, no traceback.
    """
    daemon = FakeDaemon(Queues=ProtocolError("/s closed the connection without answering"))
    code, out, err = Session(daemon).run("queues\n")
    assert (code, out, err) == (1, "fail /s closed the connection without answering\n", "")


def test_interruptedCommand() -> None:
    """
    Ctrl-C while a command waits cancels that command only.
    """
    daemon = FakeDaemon(Ping=[KeyboardInterrupt(), ("ok", "pong")])
    code, out, err = Session(daemon).run("ping\nping\n")
    assert (code, out, err) == (1, "ok pong\n", "cancelled\n")


class BrokenInput(io.StringIO):
    def readline(self, *args: Any) -> str:  # type: ignore[override]
        raise OSError(5, "Input/output error")


def test_unreadableInput() -> None:
    """
    An input that cannot be read ends the session with a fail line, exit 1.
    """
    session = Session(FakeDaemon())
    session.console.stdin = BrokenInput()
    code, out, err = session.run("")
    assert (code, out) == (1, "")
    assert err == "fail internal error: OSError: [Errno 5] Input/output error\n"


# -- status ---------------------------------------------------------------------------------

STATUS = {
    "status": "OPERATIONAL",
    "version": "1.18.3",
    "rqtwisted": "0.1.0",
    "pid": 42,
    "uptime": 3725,
    "root": ROOT,
    "sync_rounds": 7,
    "queues": [
        {
            "name": "hello",
            "status": "UP",
            "uptime": 65,
            "num_workers": 2,
            "counts": {"prep": 0, "que": 3, "run": 1, "done": 120, "err": 4, "relayed": 0},
            "schedule": [{"cron": "@daily", "params": {"param1": "x"}, "next_run": 1795910400}],
        },
        {"name": "broken", "status": "ERROR", "failures": 3},
    ],
    "config_errors": {"other": "bad JSON"},
    "timers": [{"name": "nightly", "period": 86400, "next_run": None, "last_run": None, "error": "no queue"}],
    "scandir": [],
    "relay": {"peers": 2},
}


def test_statusPretty() -> None:
    """
    C{status} prints a summary: the daemon, a table of queues, schedules,
    timers, config errors and any other section.
    """
    daemon = FakeDaemon(Status=("ok", json.dumps(STATUS)))
    code, out, _ = Session(daemon).run("status\n")
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == "OPERATIONAL  rq 1.18.3 (rqtwisted 0.1.0)  pid 42  up 1h 2m  sync rounds 7"
    assert lines[1] == f"root {ROOT}"
    table = lines[lines.index("") + 1 :][:3]
    assert table[0].split() == ["queue", "status", "workers", "prep", "que", "run", "done", "err", "relayed", "up"]
    assert table[1].split() == ["hello", "UP", "2", "0", "3", "1", "120", "4", "0", "1m", "5s"]
    assert table[2].split() == ["broken", "ERROR", "-", "-", "-", "-", "-", "-", "-", "failed", "3", "times"]
    assert "schedules:" in lines and any("@daily" in line and '{"param1": "x"}' in line for line in lines)
    assert any(line.split()[:3] == ["nightly", "1d", "0h"] and "no queue" in line for line in lines)
    assert "  other: bad JSON" in lines
    assert lines[-1] == 'relay: {"peers": 2}'
    assert "scandir:" not in lines


def test_statusJson() -> None:
    """
    C{status --json} prints exactly what C{rq status} prints.
    """
    daemon = FakeDaemon(Status=("ok", json.dumps(STATUS)))
    code, out, _ = Session(daemon).run("status --json\n")
    assert code == 0
    assert out == cli_output(FakeDaemon(Status=("ok", json.dumps(STATUS))), "status")[1] + "\n"
    assert json.loads(out) == STATUS


def test_statusUnexpectedShape() -> None:
    """
    A status that is not shaped as expected is shown as its JSON.
    """
    daemon = FakeDaemon(Status=("ok", "[1, 2]"))
    assert Session(daemon).run("status\n") == (0, "[\n  1,\n  2\n]\n", "")


def test_statusFail() -> None:
    """
    A failing status is the command line's fail line.
    """
    daemon = FakeDaemon(Status=DaemonNotReachable("/s", "No such file or directory"))
    code, out, _ = Session(daemon).run("status\n")
    assert (code, out) == (1, f"fail rq daemon not running at {ROOT}: No such file or directory\n")


# -- help ------------------------------------------------------------------------------------


def test_helpLists() -> None:
    """
    C{help} lists every verb and the console's commands; asks nothing.
    """
    daemon = FakeDaemon()
    code, out, _ = Session(daemon).run("help\n")
    assert code == 0
    words = out.split()
    assert all(verb in words for verb in cli.VERBS)
    assert "quit," in words
    assert daemon.requests == []


@pytest.mark.parametrize("line", ["help sendmesg", "? sendmesg"])
def test_helpVerb(line: str) -> None:
    """
    C{help <verb>} shows its options and what it does.
    """
    code, out, _ = Session(FakeDaemon()).run(line + "\n")
    assert code == 0
    assert out.splitlines()[0].startswith("sendmesg --dest Q [--src S]")
    assert "ok <full msg id>" in out.splitlines()[1]


def test_helpUnknown() -> None:
    """
    C{help} of an unknown word fails like an unknown verb.
    """
    code, out, err = Session(FakeDaemon()).run("help frobnicate\n")
    assert (code, out, err) == (1, "", "Command not found: frobnicate (cmd_frobnicate)\n")


def test_helpVerbWithoutEntry(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A verb without a help entry still gets a line.
    """
    monkeypatch.delitem(console.VERB_HELP, "ping")
    code, out, _ = Session(FakeDaemon()).run("help ping\n")
    assert code == 0
    assert out.startswith("ping [--option value ...]\n")


def test_helpEntriesAreVerbs() -> None:
    """
    Every help entry is a verb of the command line, and the original's
    verbs all have one.
    """
    assert set(console.VERB_HELP) <= set(cli.VERBS)
    original = "sendmesg prepmesg single_que attachmesg commitmesg statusmesg state statuscountmesg"
    original += " attachstatusmesg clone verify_rules"
    assert set(original.split()) <= set(console.VERB_HELP)


# -- interactive sessions ----------------------------------------------------------------------


class InterruptingInput(io.StringIO):
    """
    Lines to read, C{None} standing for a Ctrl-C at that point.
    """

    def __init__(self, lines: list[str | None]) -> None:
        super().__init__()
        self.lines = lines

    def readline(self, *args: Any) -> str:  # type: ignore[override]
        if not self.lines:
            return ""
        line = self.lines.pop(0)
        if line is None:
            raise KeyboardInterrupt()
        return line


def test_interactiveSession() -> None:
    """
    A person gets a greeting, a prompt per line, C{^C} for a cancelled
    line, and a new line at Ctrl-D; failures do not change the exit status.
    """
    daemon = FakeDaemon(Ping=("ok", "pong"), MessageAction=("fail", "msg not found"))
    session = Session(daemon, interactive=True)
    session.console.stdin = InterruptingInput(["ping\n", None, f"state --msg_id {FULL_ID}\n"])
    code, out, err = session.run("")
    assert (code, err) == (0, "")
    assert out == (
        f"rq console: connected to the rq daemon of {ROOT}\n"
        "type help for the commands, quit or Ctrl-D to leave\n"
        "rq> ok pong\nrq> ^C\nrq> fail msg not found\nrq> \n"
    )


def test_interactiveNoDaemon() -> None:
    """
    Without a daemon the greeting says so, and the session goes on.
    """
    daemon = FakeDaemon(Ping=[DaemonNotReachable("/s", "Connection refused"), ("ok", "pong")])
    session = Session(daemon, interactive=True)
    code, out, _ = session.run("ping\n")
    assert code == 0
    assert out.splitlines()[:2] == [
        f"rq console: fail rq daemon not running at {ROOT}: Connection refused",
        "(the console connects again at each command)",
    ]
    assert "rq> ok pong" in out.splitlines()


def test_interruptedGreeting() -> None:
    """
    Ctrl-C while the greeting waits for the daemon cancels only that.
    """
    daemon = FakeDaemon(Ping=[KeyboardInterrupt(), ("ok", "pong")])
    code, out, _ = Session(daemon, interactive=True).run("ping\n")
    assert code == 0
    assert out.splitlines()[0] == "rq console: fail cancelled"
    assert "rq> ok pong" in out.splitlines()


def test_interruptedScript() -> None:
    """
    Ctrl-C ends a script with status 130.
    """
    session = Session(FakeDaemon())
    session.console.stdin = InterruptingInput(["ping\n", None, "ping\n"])
    assert session.run("")[0] == 130


class Reconnecting(FakeDaemon):
    """
    A client counting connections like L{SessionClient}: each C{Ping}
    counts one more.
    """

    connections = 0

    def call(self, command: str, **args: str) -> tuple[str, str]:
        self.connections += 1
        return super().call(command, **args)


def test_reconnectNote() -> None:
    """
    In an interactive session, a command that had to connect again says so
    on stderr (not the first connection).
    """
    daemon = Reconnecting(Ping=("ok", "pong"))
    code, out, err = Session(daemon, interactive=True).run("ping\n")
    assert code == 0
    assert err == "(connected again to the rq daemon)\n"


# -- completion -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def completing() -> tuple[Console, FakeDaemon, Clock]:
    daemon = FakeDaemon(Queues=("ok", '["hello", "help_desk", "relay"]'))
    clock = Clock()
    return Session(daemon, clock=clock).console, daemon, clock


def test_completeVerbs(completing: tuple[Console, FakeDaemon, Clock]) -> None:
    """
    The first word completes to verbs and the console's commands.
    """
    c, daemon, _ = completing
    assert sorted(c.completenames("se")) == ["search ", "sendmesg "]
    assert c.completenames("qu") == ["queues ", "quit "]
    assert c.complete_help("restart_") == ["restart_queue "]
    assert daemon.requests == []


@pytest.mark.parametrize(
    "line, text, expected",
    [
        ("sendmesg --dest ", "he", ["hello ", "help_desk "]),
        ("prepmesg --param1 x --dest ", "r", ["relay "]),
        ("sendmesg ", "--dest=hel", ["--dest=hello", "--dest=help_desk"]),
        ("up --name ", "", ["hello ", "help_desk ", "relay "]),
        ("search --query a=b ", "--name=r", ["--name=relay"]),
        ("delete_queue --name ", "x", []),
    ],
)
def test_completeQueueNames(completing: tuple[Console, FakeDaemon, Clock], line: str, text: str, expected: list[str]) -> None:
    """
    Where C{--dest} or C{--name} expects a queue, its names complete.
    """
    c, _, _ = completing
    full = line + text
    assert c.completedefault(text, full, len(line), len(full)) == expected


@pytest.mark.parametrize(
    "line, text",
    [("attachmesg --name ", "he"), ("create_queue --name ", "he"), ("sendmesg --src ", "he"), ("sendmesg ", "he")],
)
def test_completeNotQueues(completing: tuple[Console, FakeDaemon, Clock], line: str, text: str) -> None:
    """
    Other values (an attachment's name, a new queue's name) do not
    complete, and the daemon is not asked.
    """
    c, daemon, _ = completing
    assert c.completedefault(text, line + text, len(line), len(line + text)) == []
    assert daemon.requests == []


def test_completeOptions(completing: tuple[Console, FakeDaemon, Clock]) -> None:
    """
    A word starting with C{-} completes to the verb's options.
    """
    c, _, _ = completing
    line = "sendmesg --dest hello "
    assert c.completedefault("--pa", line + "--pa", len(line), len(line) + 4) == [
        "--param1 ",
        "--param2 ",
        "--param3 ",
        "--param4 ",
    ]
    assert c.completedefault("--r", "up --r", 3, 6) == []


def test_queueNamesCached(completing: tuple[Console, FakeDaemon, Clock]) -> None:
    """
    Queue names are asked once per few seconds.
    """
    c, daemon, clock = completing
    c.queue_names()
    clock.now += console.QUEUE_CACHE_SECONDS - 1
    c.queue_names()
    assert [r[0] for r in daemon.requests] == ["Queues"]
    clock.now += 1
    c.queue_names()
    assert [r[0] for r in daemon.requests] == ["Queues", "Queues"]


def test_queueNamesNoDaemon() -> None:
    """
    Without a daemon nothing completes, and nothing is printed.
    """
    session = Session(FakeDaemon(Queues=DaemonNotReachable("/s", "Connection refused")))
    line = "sendmesg --dest "
    assert session.console.completedefault("", line, len(line), len(line)) == []
    assert session.stdout.getvalue() == session.stderr.getvalue() == ""


def test_verbOptions() -> None:
    """
    The options of a verb come from its help entry.
    """
    assert verb_options("sendmesg") == [
        "--dest", "--src", "--param1", "--param2", "--param3", "--param4",
        "--due", "--count", "--max_count", "--force_remote", "--relay-ok",
    ]  # fmt: skip
    assert verb_options("search") == ["--name", "--query", "--exact"]
    assert "--no-allow-new-queue" in verb_options("init")
    assert verb_options("queues") == verb_options("nonesuch") == []


# -- entry point and history ------------------------------------------------------------------


def test_historyPath() -> None:
    """
    C{$RQ_CONSOLE_HISTORY}, else C{~/.rq_console_history}; empty: none.
    """
    assert history_path({"RQ_CONSOLE_HISTORY": "/h/x"}) == "/h/x"
    assert history_path({}) == os.path.expanduser("~/.rq_console_history")
    assert history_path({"RQ_CONSOLE_HISTORY": ""}) is None


def test_saveHistoryPrivate(tmp_path: Any) -> None:
    """
    The history file is created readable by its owner only.
    """
    written = []

    class FakeReadline:
        def write_history_file(self, path: str) -> None:
            written.append(path)

    path = str(tmp_path / "history")
    console._save_history(FakeReadline(), path)
    assert written == [path]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_mainRoot() -> None:
    """
    C{--root}, else C{$RQ_ROOT}; the console's socket is below it.
    """
    daemon = FakeDaemon(Ping=("ok", "pong"))
    out = io.StringIO()
    code = console.main(["--root", "/r1"], daemon, io.StringIO("ping\n"), out, io.StringIO(), {"RQ_ROOT": "/r2"})
    assert (code, out.getvalue()) == (0, "ok pong\n")
    code = console.main([], daemon, io.StringIO("ping\n"), out, io.StringIO(), {"RQ_ROOT": "/r2"})
    assert daemon.sockets == [os.path.join("/r1", SOCKET), os.path.join("/r2", SOCKET)]


def test_mainBadRoot() -> None:
    """
    C{--root} without a value is refused.
    """
    out = io.StringIO()
    assert console.main(["--root"], FakeDaemon(), io.StringIO(), out, io.StringIO(), {}) == 1
    assert out.getvalue() == "fail option --root needs a value\n"


def test_mainHelp() -> None:
    """
    C{rq console --help} describes the console.
    """
    out = io.StringIO()
    assert console.main(["--help"], FakeDaemon(), io.StringIO(), out, io.StringIO(), {}) == 0
    assert out.getvalue().startswith("usage: rq console [--root DIR]\n")


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_stdoutClosed(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """
    Without a stdout at all (C{rq console >&-}) the console fails as every
    C{rq} verb does: exit 1, one note on stderr; no line is run.
    """
    daemon = FakeDaemon(Ping=("ok", "pong"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("ping\n"))
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setenv("RQ_ROOT", ROOT)
    assert cli.main(["console", *argv], client_factory=daemon) == 1
    assert capsys.readouterr().err == "rq: cannot write to standard output: it is closed\n"
    assert daemon.requests == []


def test_rqConsoleVerb(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{rq console} runs the console, with the command line's client factory.
    """
    daemon = FakeDaemon(Ping=("ok", "pong"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("ping\nping\n"))
    monkeypatch.setenv("RQ_ROOT", ROOT)
    assert cli.main(["console"], client_factory=daemon) == 0
    assert capsys.readouterr().out == "ok pong\nok pong\n"
    assert daemon.sockets == [os.path.join(ROOT, SOCKET)]


def test_freshInterpreter(tmp_path: Any) -> None:
    """
    C{python -m rqtwisted console} with nothing to read exits 0 at once
    without importing Twisted; without a daemon, a command fails cleanly;
    with stdout closed, it fails with one line on stderr.
    """
    env = dict(os.environ, PYTHONPATH=PROJECT, RQ_ROOT=str(tmp_path))
    code = (
        "import sys, runpy\n"
        "sys.argv = ['rq', 'console']\n"
        "try:\n"
        "    runpy.run_module('rqtwisted', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, [m for m in sys.modules if m == 'twisted' or m.startswith('twisted.')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert (out.stdout, out.stderr) == ("exit 0 []\n", "")
    out = subprocess.run(
        [sys.executable, "-m", "rqtwisted", "console"], env=env, input="queues\n", capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stdout == f"fail rq daemon not running at {tmp_path}: No such file or directory\n"
    assert out.stderr == ""
    out = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "-m", "rqtwisted", "console"],
        env=env, input="queues\n", stderr=subprocess.PIPE, text=True,
    )
    assert (out.returncode, out.stderr) == (1, "rq: cannot write to standard output: it is closed\n")


# -- the session client against the real admin protocol ---------------------------------------


class API:
    """
    An admin API answering C{Ping}, C{Queues}, and C{Reload} never.
    """

    def ping(self) -> tuple[str, str]:
        return ("ok", "pong")

    def queues(self) -> tuple[str, str]:
        return ("ok", '["a"]')

    def reload(self) -> defer.Deferred[tuple[str, str]]:
        return defer.Deferred()


class Server:
    """
    A real L{AdminProtocol} on a Unix socket, its connections counted and
    closable from the test.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.protocols: list[AdminProtocol] = []
        self.port: Any = None

    def listen(self) -> None:
        factory = Factory()
        factory.protocol = self._protocol  # type: ignore[assignment]
        self.port = reactor.listenUNIX(self.path, factory)  # type: ignore[attr-defined]

    def _protocol(self) -> AdminProtocol:
        protocol = AdminProtocol(API(), os.path.dirname(self.path))
        protocol.lost = defer.Deferred()  # type: ignore[attr-defined]
        lost = protocol.connectionLost

        def connectionLost(reason: Failure) -> None:
            lost(reason)
            protocol.lost.callback(None)  # type: ignore[attr-defined]

        protocol.connectionLost = connectionLost  # type: ignore[method-assign]
        self.protocols.append(protocol)
        return protocol

    def drop(self) -> defer.Deferred[Any]:
        """
        Close every connection; fires once they are closed.
        """
        open_ = [p for p in self.protocols if p.transport is not None]
        for p in open_:
            p.transport.loseConnection()
        return defer.gatherResults([p.lost for p in open_])  # type: ignore[attr-defined]

    def stop(self) -> defer.Deferred[Any]:
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)


@pytest.fixture
def server() -> Iterator[Server]:
    path = tempfile.mkdtemp(prefix="rqc")
    s = Server(os.path.join(path, "rq.sock"))
    s.listen()
    yield s
    pytest_twisted.blockon(s.drop())
    pytest_twisted.blockon(s.stop())
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.inlineCallbacks
def test_sessionOneConnection(server: Server) -> Iterator[Any]:
    """
    Calls share one connection.
    """
    client = SessionClient(server.path, timeout=10)
    for _ in range(3):
        assert (yield deferToThread(client.call, "Ping")) == ("ok", "pong")
    assert (yield deferToThread(client.call, "Queues")) == ("ok", '["a"]')
    assert (client.connections, len(server.protocols), client.connected) == (1, 1, True)
    client.close()
    assert not client.connected


@pytest_twisted.inlineCallbacks
def test_sessionClosedBetweenCalls(server: Server) -> Iterator[Any]:
    """
    A connection the daemon closed since the last call is replaced before
    the request is sent: the call succeeds.
    """
    client = SessionClient(server.path, timeout=10)
    assert (yield deferToThread(client.call, "Ping")) == ("ok", "pong")
    yield server.drop()
    assert (yield deferToThread(client.call, "Ping")) == ("ok", "pong")
    assert (client.connections, len(server.protocols)) == (2, 2)
    client.close()


@pytest_twisted.inlineCallbacks
def test_sessionDaemonGoneAndBack(server: Server) -> Iterator[Any]:
    """
    With the daemon gone a call raises L{DaemonNotReachable}; once it is
    back the next call connects again.
    """
    client = SessionClient(server.path, timeout=10)
    assert (yield deferToThread(client.call, "Ping")) == ("ok", "pong")
    yield server.stop()
    yield server.drop()
    assert not os.path.exists(server.path)
    with pytest.raises(DaemonNotReachable):
        yield deferToThread(client.call, "Ping")
    assert not client.connected
    server.listen()
    assert (yield deferToThread(client.call, "Ping")) == ("ok", "pong")
    assert client.connections == 2
    client.close()


@pytest_twisted.inlineCallbacks
def test_sessionTimeout(server: Server) -> Iterator[Any]:
    """
    No answer in time raises L{ProtocolError} and drops the connection, so
    a late answer is never read as the next one's.
    """
    client = SessionClient(server.path, timeout=0.2)
    with pytest.raises(ProtocolError, match="no answer to Reload"):
        yield deferToThread(client.call, "Reload")
    assert not client.connected
    assert (yield deferToThread(client.call, "Ping")) == ("ok", "pong")
    assert client.connections == 2
    client.close()


@pytest_twisted.inlineCallbacks
def test_sessionTurnedAway() -> Iterator[Any]:
    """
    A daemon with as many admin connections open as it allows turns the
    session's connection away: L{DaemonBusy} saying so, and the next call
    connects again.
    """
    path = tempfile.mkdtemp(prefix="rqc")
    sock = os.path.join(path, "rq.sock")
    port = reactor.listenUNIX(sock, AdminFactory(API(), path, maxConnections=0))  # type: ignore[attr-defined]
    client = SessionClient(sock, timeout=10)
    try:
        for _ in range(2):
            with pytest.raises(DaemonBusy, match=r"turned the connection away: too many admin connections open \(0\)"):
                yield deferToThread(client.call, "Ping")
            assert not client.connected
        assert client.connections == 2
    finally:
        client.close()
        yield port.stopListening()
        shutil.rmtree(path, ignore_errors=True)


def test_stdoutFull(tmp_path: Any) -> None:
    """
    With stdout on a full device (C{rq console >/dev/full}) the console
    says so in one line on stderr and exits 1, as every C{rq} verb does,
    instead of C{fail internal error}.
    """
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    env = dict(os.environ, PYTHONPATH=PROJECT, RQ_ROOT=str(tmp_path))
    out = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >/dev/full', sys.executable, "-m", "rqtwisted", "console"],
        env=env, input="queues\n", stderr=subprocess.PIPE, text=True,
    )
    assert (out.returncode, out.stderr) == (1, "rq: cannot write to standard output: No space left on device\n")
