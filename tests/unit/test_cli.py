"""
Tests for L{rqtwisted.cli}: the option rules, every verb's admin request and
output against a fake client, the error paths, and a few runs against the
real admin protocol and in a fresh interpreter.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread

from rqtwisted.admin import AdminFactory, AdminProtocol
from rqtwisted.admincommands import SOCKET
from rqtwisted.ampclient import DaemonNotReachable, ProtocolError, RemoteError
from rqtwisted.cli import VERBS, main, parse_options, resolve_root
from rqtwisted.message import MessageError
from tests.unit.fake_admin import FakeDaemon

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL_ID = "http://localhost:3333/q/test/20100625.0127.35.122.7"


# -- the option rules -----------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], {}),
        (["word", "other"], {}),
        (["--k=v"], {"k": "v"}),
        (["--k=a=b"], {"k": "a=b"}),
        (["--k="], {"k": ""}),
        (["--k", "v"], {"k": "v"}),
        (["--k"], {"k": True}),
        (["--k", "--j"], {"k": True, "j": True}),
        (["--k", "a--b"], {"k": True, "b": True}),
        (["--k", "v", "w"], {"k": "v"}),
        (["w", "--k", "v"], {"k": "v"}),
        (["--k=v", "w"], {"k": "v"}),
        (["--k=1", "--k", "2"], {"k": "2"}),
        (["--relay-ok", "--dest", "q"], {"relay-ok": True, "dest": "q"}),
        (["--k=v--w"], {"k": "v--w"}),
        (["--k", ""], {"k": ""}),
        (["--k", "-v"], {"k": "-v"}),
    ],
)
def test_parseExamples(args: list[str], expected: dict[str, Any]) -> None:
    """
    The examples of every rule of cli.md.
    """
    assert parse_options(args) == expected


names = st.text(st.characters(blacklist_characters="=-", blacklist_categories=("Cs",)), min_size=1)
values = st.text(st.characters(blacklist_categories=("Cs",))).filter(lambda v: "--" not in v)
words = values


@given(st.lists(words))
def test_plainWordsIgnored(args: list[str]) -> None:
    """
    Words without C{--} are ignored.
    """
    assert parse_options(args) == {}


@given(names, st.text(st.characters(blacklist_categories=("Cs",))))
def test_equalsForm(name: str, value: str) -> None:
    """
    C{--k=v} sets C{k} to everything after the first C{=}.
    """
    assert parse_options([f"--{name}={value}"]) == {name: value}


@given(names, values, st.lists(words))
def test_spaceForm(name: str, value: str, rest: list[str]) -> None:
    """
    C{--k v} takes the next word; the words after it are ignored.
    """
    assert parse_options([f"--{name}", value, *rest]) == {name: value}


@given(st.lists(names, min_size=1))
def test_loneFlags(flags: list[str]) -> None:
    """
    Options followed by options are C{True}, and so is a last lone option.
    """
    assert parse_options([f"--{f}" for f in flags]) == {f: True for f in flags}


@given(st.lists(st.tuples(names, values)), st.lists(words))
def test_wordsAfterEqualsIgnored(pairs: list[tuple[str, str]], noise: list[str]) -> None:
    """
    Plain words after C{--k=v} options change nothing; the last setting of
    a name wins.
    """
    args: list[str] = []
    for (name, value), word in zip(pairs, noise + [""] * len(pairs)):
        args += [f"--{name}={value}", word]
    assert parse_options(args) == dict(pairs)


def test_resolveRoot(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The root is C{--root}, else C{$RQ_ROOT}, else the current directory,
    made absolute.
    """
    monkeypatch.chdir(tmp_path)
    assert resolve_root({"root": "r"}, {"RQ_ROOT": "/e"}) == str(tmp_path / "r")
    assert resolve_root({}, {"RQ_ROOT": "/e"}) == "/e"
    assert resolve_root({}, {"RQ_ROOT": ""}) == str(tmp_path)
    assert resolve_root({}, {}) == str(tmp_path)


def test_resolveRootFromProgram(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Without C{--root} or C{$RQ_ROOT}, a program run as C{<root>/bin/rq}
    finds its root from its own path (cli.md), the path as run, not the
    target of a link; a program elsewhere, or in a C{bin/} whose parent is
    no root, leaves the current directory.
    """
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    (root / "config" / "config.json").write_text("{}")
    (root / "bin").mkdir()
    elsewhere = tmp_path / "venv" / "bin"
    elsewhere.mkdir(parents=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    program = str(root / "bin" / "rq")
    assert resolve_root({}, {}, program) == str(root)
    assert resolve_root({}, {}, os.path.relpath(program)) == str(root)
    assert resolve_root({}, {"RQ_ROOT": "/e"}, program) == "/e"
    assert resolve_root({"root": "/r"}, {"RQ_ROOT": "/e"}, program) == "/r"
    assert resolve_root({}, {}, str(elsewhere / "rq")) == str(cwd)
    assert resolve_root({}, {}, None) == str(cwd)
    (root / "config" / "config.json").unlink()
    assert resolve_root({}, {}, program) == str(cwd)


def test_mainFindsRootFromProgram(
    capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    C{rq} run as C{<root>/bin/rq} talks to that root's daemon from any
    directory: C{main} takes the program from C{sys.argv[0]}.
    """
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    (root / "config" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RQ_ROOT", raising=False)
    monkeypatch.setattr(sys, "argv", [str(root / "bin" / "rq"), "ping"])
    daemon = FakeDaemon(Ping=("ok", "pong"))
    assert main(client_factory=daemon) == 0
    assert capsys.readouterr().out == "ok pong\n"
    assert daemon.sockets == [os.path.join(str(root), SOCKET)]


# -- a fake daemon --------------------------------------------------------------


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def rq(capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Run:
    """
    Run C{main} with a fake daemon (C{None}: the real client) in an empty
    root, the current directory; returns C{(exit status, stdout, stderr)}.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RQ_ROOT", raising=False)

    def run(daemon: FakeDaemon | None, *argv: str) -> tuple[int, str, str]:
        code = main(list(argv), client_factory=daemon)
        out, err = capsys.readouterr()
        return code, out, err

    return run


# -- help and dispatch ----------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-h"],
        ["--help"],
        ["--help", "ping"],
        ["init", "--help"],
        ["sendmesg", "--dest", "q", "--help"],
        ["init", "-h"],
        ["init", "-h", "--force"],
        ["queues", "-h"],
        ["sendmesg", "--dest", "q", "-h"],
        ["sendmesg", "--dest=q", "-h", "--param1", "x"],
    ],
)
def test_help(rq: Run, argv: list[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    No command, C{-h}/C{--help}, or C{-h}/C{--help} after a command lists
    the commands, exit 1, and does nothing (C{rq init -h} lays out no root).
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RQ_ROOT", raising=False)
    daemon = FakeDaemon()
    code, out, err = rq(daemon, *argv)
    assert (code, err) == (1, "")
    assert out.splitlines() == ["Valid commands are:", *VERBS, "console"]
    assert daemon.sockets == []
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv, param1",
    [
        (["--dest", "q", "--param1", "-h"], "-h"),
        (["--param1", "-h", "--dest", "q"], "-h"),
        (["--dest", "q", "--param1=-h"], "-h"),
    ],
)
def test_helpWordAsValue(rq: Run, argv: list[str], param1: str) -> None:
    """
    C{-h} taken as an option's value is that value, not a call for help.
    """
    daemon = FakeDaemon(CreateMessage=("ok", FULL_ID))
    assert rq(daemon, "sendmesg", *argv) == (0, f"ok {FULL_ID}\n", "")
    [(command, args)] = daemon.requests
    assert command == "CreateMessage"
    assert json.loads(args["message"]) == {"dest": "q", "param1": param1}


def test_verbs() -> None:
    """
    The original's verbs and the new ones are all listed.
    """
    original = "sendmesg prepmesg single_que attachmesg commitmesg statusmesg state statuscountmesg"
    original += " attachstatusmesg clone verify_rules"
    new = "create_queue delete_queue queues status up down pause resume restart_queue restart reload show ping init search"
    new += " delete run_now destroy"
    assert sorted(VERBS) == sorted((original + " " + new).split())


def test_unknownCommand(rq: Run) -> None:
    """
    An unknown command is reported on stderr, exit 1.
    """
    daemon = FakeDaemon()
    assert rq(daemon, "frob", "--x") == (1, "", "Command not found: frob (cmd_frob)\n")
    assert daemon.sockets == []


def test_socket(rq: Run, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The client talks to C{<root>/config/rq.sock}, the root from C{--root},
    C{$RQ_ROOT} or the current directory.
    """
    daemon = FakeDaemon()
    rq(daemon, "ping")
    rq(daemon, "ping", "--root", "sub")
    rq(daemon, "ping", "--root=/abs/root")
    monkeypatch.setenv("RQ_ROOT", "/env/root")
    rq(daemon, "ping")
    assert daemon.sockets == [
        os.path.join(str(tmp_path), SOCKET),
        os.path.join(str(tmp_path), "sub", SOCKET),
        "/abs/root/" + SOCKET,
        "/env/root/" + SOCKET,
    ]


def test_rootWithoutValue(rq: Run) -> None:
    """
    A lone C{--root} fails.
    """
    assert rq(FakeDaemon(), "ping", "--root") == (1, "fail option --root needs a value\n", "")


# -- messages -------------------------------------------------------------------


@pytest.mark.parametrize("verb, method", [("sendmesg", "commit"), ("prepmesg", "prep"), ("single_que", "single_que")])
def test_createMessage(rq: Run, verb: str, method: str) -> None:
    """
    The message holds only the listed keys, as given; the method follows the
    verb; the full id is printed.
    """
    daemon = FakeDaemon(CreateMessage=("ok", FULL_ID))
    argv = [verb, "--dest", "test", "--src=me", "--count", "3", "--max_count=9"]
    argv += ["--param1", "a b", "--param2=", "--param3=x=y", "--param4", "\u00e9"]
    argv += ["--due", "1700000000", "--force_remote", "--msg_id", "nope", "--path=p", "stray"]
    assert rq(daemon, *argv) == (0, f"ok {FULL_ID}\n", "")
    [(command, args)] = daemon.requests
    assert command == "CreateMessage"
    assert args["method"] == method
    assert args["relay_ok"] == ""
    assert json.loads(args["message"]) == {
        "dest": "test",
        "src": "me",
        "count": "3",
        "max_count": "9",
        "param1": "a b",
        "param2": "",
        "param3": "x=y",
        "param4": "\u00e9",
        "due": "1700000000",
        "force_remote": True,
    }


@pytest.mark.parametrize("option", ["--relay-ok", "--relay-ok=1", "--relay-ok=yes"])
def test_relayOk(rq: Run, option: str) -> None:
    """
    C{--relay-ok} in any form sets C{relay_ok} and is not a message key.
    """
    daemon = FakeDaemon(CreateMessage=("ok", FULL_ID))
    rq(daemon, "sendmesg", "--dest", "http://h:3333/q/x", option)
    [(_, args)] = daemon.requests
    assert args["relay_ok"] == "1"
    assert json.loads(args["message"]) == {"dest": "http://h:3333/q/x"}


def test_createMessageFail(rq: Run) -> None:
    """
    A refusal prints C{fail <reason>}, exit 1.
    """
    daemon = FakeDaemon(CreateMessage=("fail", "Cannot relay message"))
    assert rq(daemon, "sendmesg", "--dest", "http://h/q/x") == (1, "fail Cannot relay message\n", "")



class _ReadsMessageFile(FakeDaemon):
    """
    Reads the message file as the daemon would, while the call is made.
    """

    handed: str | None = None

    def call(self, command: str, **args: str) -> tuple[str, str]:
        if args.get("message_file"):
            with open(args["message_file"]) as f:
                self.handed = f.read()
        return super().call(command, **args)


def test_createMessageTooLargeForAMP(rq: Run, tmp_path: Any) -> None:
    """
    A message too large for one AMP value (64 KiB) is handed over in a file
    of the root's C{config/spill/}, gone after the call; smaller ones go
    inline.
    """
    daemon = _ReadsMessageFile(CreateMessage=("ok", FULL_ID))
    big = "x" * 70_000
    assert rq(daemon, "sendmesg", "--dest", "test", "--param1", big, "--relay-ok") == (0, f"ok {FULL_ID}\n", "")
    [(command, args)] = daemon.requests
    assert (args["message"], args["method"], args["relay_ok"]) == ("", "commit", "1")
    assert os.path.dirname(args["message_file"]) == str(tmp_path / "config" / "spill")
    assert daemon.handed is not None and json.loads(daemon.handed) == {"dest": "test", "param1": big}
    assert os.listdir(tmp_path / "config" / "spill") == []
    rq(daemon, "sendmesg", "--dest", "test", "--param1", "x" * 60_000)
    assert "message_file" not in daemon.requests[1][1]

def test_createMessageNotUnicode(rq: Run) -> None:
    """
    An argument that is not valid Unicode (bytes the file system encoding
    could not decode) is refused before anything is asked.
    """
    daemon = FakeDaemon(CreateMessage=("ok", FULL_ID))
    code, out, err = rq(daemon, "sendmesg", "--dest", "test", "--param1", "\udcff\udcfe")
    assert (code, err) == (1, "")
    assert out.startswith("fail argument 'param1' is not valid Unicode: "), out
    assert daemon.requests == []


@pytest.mark.parametrize("argv", [["sendmesg"], ["prepmesg", "--src", "x"], ["single_que", "--dest"]])
def test_createMessageNoDest(rq: Run, argv: list[str]) -> None:
    """
    Without a C{--dest} value nothing is asked.
    """
    daemon = FakeDaemon()
    code, out, err = rq(daemon, *argv)
    assert (code, err) == (1, "")
    assert out in ("fail missing required --dest option\n", "fail option --dest needs a value\n")
    assert daemon.requests == []


def test_attach(rq: Run, tmp_path: Any) -> None:
    """
    C{attachmesg} sends the path made absolute against the current directory
    and keeps the original's suffix; C{--local_fs_only} is ignored.
    """
    daemon = FakeDaemon(AttachMessage=("ok", "0123abcd-Attached successfully"))
    code, out, _ = rq(daemon, "attachmesg", "--msg_id", FULL_ID, "--pathname", "dir/../f.txt", "--local_fs_only")
    assert (code, out) == (0, f"ok 0123abcd-Attached successfully for Message: {FULL_ID} attachment\n")
    assert daemon.requests == [("AttachMessage", {"msg_id": FULL_ID, "pathname": str(tmp_path / "f.txt")})]


def test_attachNameAndFail(rq: Run) -> None:
    """
    C{--name} is passed on; a failure keeps the suffix, exit 1.
    """
    daemon = FakeDaemon(AttachMessage=("fail", "cannot find message"))
    code, out, _ = rq(daemon, "attachmesg", "--msg_id=/q/test/1", "--pathname=/a/b", "--name=x")
    assert (code, out) == (1, "fail cannot find message for Message: /q/test/1 attachment\n")
    assert daemon.requests == [("AttachMessage", {"msg_id": "/q/test/1", "pathname": "/a/b", "name": "x"})]


class TimedDaemon(FakeDaemon):
    """
    A fake daemon with a client's C{timeout}, recorded at each request.
    """

    timeout = 30.0

    def call(self, command: str, **args: str) -> tuple[str, str]:
        self.timeouts = getattr(self, "timeouts", []) + [self.timeout]
        return super().call(command, **args)


@pytest.mark.parametrize("size, timeout", [(0, 30.0), (1 << 30, 30.0 + 64), (40 << 30, 30.0 + 2560)])
def test_attach_waits_longer_for_a_bigger_file(rq: Run, tmp_path: Any, size: int, timeout: float) -> None:
    """
    The daemon copies and hashes a file before it answers: C{attachmesg}
    waits 30 s plus a second per 16 MiB of the file; the client keeps its
    own timeout for the next commands (a console's).
    """
    with open(tmp_path / "big", "wb") as f:
        f.truncate(size)
    daemon = TimedDaemon(AttachMessage=("ok", "0123abcd-Attached successfully"))
    code, _, _ = rq(daemon, "attachmesg", "--msg_id", FULL_ID, "--pathname", "big")
    assert code == 0
    assert daemon.timeouts == [timeout]
    assert daemon.timeout == 30.0


def test_attach_missing_file_keeps_the_usual_timeout(rq: Run) -> None:
    """
    A file the command cannot stat is the daemon's to refuse, within the
    usual timeout.
    """
    daemon = TimedDaemon(AttachMessage=("fail", "No such file /nope to attach to message"))
    code, _, _ = rq(daemon, "attachmesg", "--msg_id", FULL_ID, "--pathname", "/nope")
    assert code == 1
    assert daemon.timeouts == [30.0]


@pytest.mark.parametrize("argv", [["attachmesg", "--pathname", "/a"], ["attachmesg", "--msg_id", "m"]])
def test_attachMissing(rq: Run, argv: list[str]) -> None:
    """
    C{--msg_id} and C{--pathname} are required.
    """
    code, out, _ = rq(FakeDaemon(), *argv)
    assert code == 1
    assert out.startswith("fail missing required --")


@pytest.mark.parametrize(
    "verb, action, reply",
    [
        ("commitmesg", "commit", "msg commited"),
        ("statusmesg", "status", "done - all files copied"),
        ("state", "state", "que"),
        ("clone", "clone", FULL_ID),
    ],
)
def test_messageActions(rq: Run, verb: str, action: str, reply: str) -> None:
    """
    The message verbs ask C{MessageAction} with the full id as given.
    """
    daemon = FakeDaemon(MessageAction=("ok", reply))
    assert rq(daemon, verb, "--msg_id", FULL_ID) == (0, f"ok {reply}\n", "")
    assert daemon.requests == [("MessageAction", {"action": action, "msg_id": FULL_ID})]


@pytest.mark.parametrize("verb", ["commitmesg", "statusmesg", "state", "clone", "statuscountmesg", "attachstatusmesg", "show"])
def test_messageVerbsNeedId(rq: Run, verb: str) -> None:
    """
    Every message verb requires C{--msg_id}.
    """
    daemon = FakeDaemon()
    assert rq(daemon, verb) == (1, "fail missing required --msg_id option\n", "")
    assert daemon.requests == []


def test_messageActionFail(rq: Run) -> None:
    """
    A refusal is printed as is, exit 1.
    """
    daemon = FakeDaemon(MessageAction=("fail", "cannot clone message in que state"))
    assert rq(daemon, "clone", "--msg_id", FULL_ID) == (1, "fail cannot clone message in que state\n", "")


MESSAGE = {
    "msg_id": "20100625.0127.35.122.7",
    "dest": "test",
    "count": 4,
    "state": "done",
    "status": "done",
    "_attachments": {
        "zeta": {"md5": "bb", "size": 12, "path": "/r/queue/test/done/z/attach/zeta"},
        "alpha": {"md5": "aa", "size": 3, "path": "/r/queue/test/done/z/attach/alpha"},
    },
}


def test_statusCount(rq: Run) -> None:
    """
    C{statuscountmesg} prints the message's count.
    """
    daemon = FakeDaemon(GetMessage=("ok", json.dumps(MESSAGE)))
    assert rq(daemon, "statuscountmesg", "--msg_id", FULL_ID) == (0, "ok 4\n", "")
    assert daemon.requests == [("GetMessage", {"msg_id": FULL_ID})]


def test_attachStatus(rq: Run) -> None:
    """
    C{attachstatusmesg} prints the number of attachments, then one line per
    attachment, sorted by name.
    """
    daemon = FakeDaemon(GetMessage=("ok", json.dumps(MESSAGE)))
    code, out, _ = rq(daemon, "attachstatusmesg", "--msg_id", FULL_ID)
    assert code == 0
    assert out.splitlines() == [
        "ok 2",
        "alpha aa 3 /r/queue/test/done/z/attach/alpha",
        "zeta bb 12 /r/queue/test/done/z/attach/zeta",
    ]


def test_attachStatusNone(rq: Run) -> None:
    """
    A message without attachments has C{ok 0}.
    """
    daemon = FakeDaemon(GetMessage=("ok", json.dumps({"count": 0})))
    assert rq(daemon, "attachstatusmesg", "--msg_id", FULL_ID) == (0, "ok 0\n", "")


@pytest.mark.parametrize("verb", ["statuscountmesg", "attachstatusmesg", "show"])
def test_getMessageFail(rq: Run, verb: str) -> None:
    """
    C{msg not found} is printed as the original does.
    """
    daemon = FakeDaemon(GetMessage=("fail", "msg not found"))
    assert rq(daemon, verb, "--msg_id", FULL_ID) == (1, "fail msg not found\n", "")


@pytest.mark.parametrize("detail", ["not json", "[1]", json.dumps({"_attachments": {"a": 1}})])
def test_getMessageInvalid(rq: Run, detail: str) -> None:
    """
    A detail that is not a message is a C{fail}, not a traceback.
    """
    daemon = FakeDaemon(GetMessage=("ok", detail))
    code, out, err = rq(daemon, "attachstatusmesg", "--msg_id", FULL_ID)
    assert (code, err) == (1, "")
    assert out.startswith("fail invalid reply from the rq daemon: ")


def test_show(rq: Run) -> None:
    """
    C{show} prints the message JSON indented, exit 0.
    """
    daemon = FakeDaemon(GetMessage=("ok", json.dumps(MESSAGE)))
    code, out, _ = rq(daemon, "show", "--msg_id", FULL_ID)
    assert code == 0
    assert json.loads(out) == MESSAGE
    assert out.startswith('{\n  "msg_id": "20100625.0127.35.122.7",\n')


# -- verify_rules -------------------------------------------------------------------


def _router(monkeypatch: pytest.MonkeyPatch, result: tuple[bool, str]) -> list[tuple[str, bool]]:
    calls: list[tuple[str, bool]] = []
    module = types.ModuleType("rqtwisted.rules")

    def verify_rules_file(path: str, verbose: bool) -> tuple[bool, str]:
        calls.append((path, verbose))
        return result

    module.verify_rules_file = verify_rules_file  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rqtwisted.rules", module)
    return calls


def test_verifyRulesOk(rq: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Good rules print C{ok}; the router's text shows only with C{--verbose}.
    """
    calls = _router(monkeypatch, (True, "rule 1: ok"))
    daemon = FakeDaemon()
    assert rq(daemon, "verify_rules", "--path", "rules.rb") == (0, "ok\n", "")
    assert rq(daemon, "verify_rules", "--path", "rules.rb", "--verbose") == (0, "ok\nrule 1: ok\n", "")
    assert calls == [("rules.rb", False), ("rules.rb", True)]
    assert daemon.sockets == []


def test_verifyRulesBad(rq: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Bad rules print C{fail bad router rules file}, exit 1.
    """
    _router(monkeypatch, (False, "line 3: syntax error"))
    assert rq(FakeDaemon(), "verify_rules", "--path=r") == (1, "fail bad router rules file\n", "line 3: syntax error\n")
    code, out, _ = rq(FakeDaemon(), "verify_rules", "--path=r", "--verbose")
    assert (code, out) == (1, "fail bad router rules file\nline 3: syntax error\n")


def test_verifyRulesMissingFile(rq: Run, tmp_path: Path) -> None:
    """
    A rules file that cannot be read is bad rules: the original's line,
    exit 1, the reason on stderr, no traceback.
    """
    code, out, err = rq(FakeDaemon(), "verify_rules", "--path", str(tmp_path / "nope.rb"))
    assert (code, out) == (1, "fail bad router rules file\n")
    assert "nope.rb" in err and "Traceback" not in err


def test_verifyRulesFifo(rq: Run, tmp_path: Path, no_hang: None) -> None:
    """
    A FIFO is refused at once (its open used to block until a writer
    came): the original's line, exit 1, why on stderr.
    """
    fifo = tmp_path / "rules.rb"
    os.mkfifo(fifo)
    expected = (1, "fail bad router rules file\n", f"{fifo} is not a regular file\n")
    assert rq(FakeDaemon(), "verify_rules", "--path", str(fifo)) == expected


def test_verifyRulesNeedsPath(rq: Run) -> None:
    """
    C{--path} is required.
    """
    assert rq(FakeDaemon(), "verify_rules") == (1, "fail missing required --path option\n", "")


# -- administration ---------------------------------------------------------------


def test_createQueue(rq: Run) -> None:
    """
    C{create_queue} sends the config; the original's C{success} prints as
    C{ok}, exit 0.
    """
    daemon = FakeDaemon(CreateQueue=("success", "queue created - awesome"))
    argv = ["create_queue", "--name", "q1", "--script", "./s.sh", "--num_workers", "3", "--exec_prefix="]
    assert rq(daemon, *argv) == (0, "ok queue created - awesome\n", "")
    [(command, args)] = daemon.requests
    assert command == "CreateQueue"
    assert json.loads(args["config"]) == {"name": "q1", "script": "./s.sh", "num_workers": "3", "exec_prefix": ""}


def test_createQueueMinimal(rq: Run) -> None:
    """
    Optional config keys are left out; a refusal exits 1.
    """
    daemon = FakeDaemon(CreateQueue=("fail", "already created"))
    assert rq(daemon, "create_queue", "--name=q1", "--script=s") == (1, "fail already created\n", "")
    assert json.loads(daemon.requests[0][1]["config"]) == {"name": "q1", "script": "s"}


@pytest.mark.parametrize("argv", [["create_queue", "--name", "q"], ["create_queue", "--script", "s"]])
def test_createQueueMissing(rq: Run, argv: list[str]) -> None:
    """
    C{--name} and C{--script} are required.
    """
    code, out, _ = rq(FakeDaemon(), *argv)
    assert code == 1
    assert out.startswith("fail missing required --")


def test_deleteQueue(rq: Run) -> None:
    """
    C{delete_queue} asks C{DeleteQueue}.
    """
    daemon = FakeDaemon(DeleteQueue=("ok", "started deleting queue"))
    assert rq(daemon, "delete_queue", "--name", "q1") == (0, "ok started deleting queue\n", "")
    assert daemon.requests == [("DeleteQueue", {"name": "q1"})]
    assert rq(daemon, "delete_queue") == (1, "fail missing required --name option\n", "")


@pytest.mark.parametrize(
    "verb, action",
    [("up", "up"), ("down", "down"), ("pause", "pause"), ("resume", "resume"), ("restart_queue", "restart")],
)
def test_queueAdmin(rq: Run, verb: str, action: str) -> None:
    """
    The queue verbs ask C{QueueAdmin}.
    """
    daemon = FakeDaemon(QueueAdmin=("ok", "q1"))
    assert rq(daemon, verb, "--name", "q1") == (0, "ok q1\n", "")
    assert daemon.requests == [("QueueAdmin", {"action": action, "name": "q1"})]


def test_queueAdminFail(rq: Run) -> None:
    """
    A refusal exits 1.
    """
    daemon = FakeDaemon(QueueAdmin=("fail", "invalid queue name"))
    assert rq(daemon, "up", "--name", "nope") == (1, "fail invalid queue name\n", "")


def test_queues(rq: Run) -> None:
    """
    C{queues} prints the count, then one name per line.
    """
    daemon = FakeDaemon(Queues=("ok", json.dumps(["test", "relay"])))
    assert rq(daemon, "queues") == (0, "ok 2\ntest\nrelay\n", "")
    assert daemon.requests == [("Queues", {})]


def test_status(rq: Run) -> None:
    """
    C{status} prints the daemon's JSON indented, exit 0.
    """
    status = {"version": "1.18.3", "queues": {"test": {"status": "UP"}}}
    daemon = FakeDaemon(Status=("ok", json.dumps(status)))
    code, out, _ = rq(daemon, "status")
    assert code == 0
    assert out == json.dumps(status, indent=2) + "\n"


@pytest.mark.parametrize("verb, command", [("status", "Status"), ("queues", "Queues")])
def test_statusFail(rq: Run, verb: str, command: str) -> None:
    """
    A refusal prints C{fail <reason>}.
    """
    daemon = FakeDaemon(**{command: ("fail", "shutting down")})
    assert rq(daemon, verb) == (1, "fail shutting down\n", "")


@pytest.mark.parametrize("verb, command", [("ping", "Ping"), ("restart", "Restart"), ("reload", "Reload")])
def test_simple(rq: Run, verb: str, command: str) -> None:
    """
    The argument-less verbs print the answer as is.
    """
    daemon = FakeDaemon(**{command: ("ok", "pong")})
    assert rq(daemon, verb) == (0, "ok pong\n", "")
    assert daemon.requests == [(command, {})]


# -- init -------------------------------------------------------------------------


def _fakeRoot(monkeypatch: pytest.MonkeyPatch, error: Exception | None = None) -> list[tuple[str, dict[str, Any]]]:
    calls: list[tuple[str, dict[str, Any]]] = []
    module = types.ModuleType("rqtwisted.root")

    def init_root(path: str, **kwargs: Any) -> None:
        calls.append((path, kwargs))
        if error is not None:
            raise error

    module.init_root = init_root  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rqtwisted.root", module)
    return calls


def test_init(rq: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """
    C{init} lays out the root without a daemon, passing its options on.
    """
    calls = _fakeRoot(monkeypatch)
    daemon = FakeDaemon()
    argv = ["init", "--root", "r", "--force", "--host", "h", "--port=4000", "--env", "e", "--addr", "a", "--tmpdir", "t"]
    assert rq(daemon, *argv) == (0, f"ok {tmp_path / 'r'}\n", "")
    assert rq(daemon, "init", "--no-allow-new-queue") == (0, f"ok {tmp_path}\n", "")
    assert calls == [
        (str(tmp_path / "r"), {"force": True, "host": "h", "port": "4000", "env": "e", "addr": "a", "tmpdir": "t"}),
        (
            str(tmp_path),
            {"force": False, "host": None, "port": None, "env": None, "addr": None, "tmpdir": None, "allow_new_queue": False},
        ),
    ]
    assert daemon.sockets == []


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@pytest.mark.parametrize("error", [_Refused("Already installed"), ValueError("Already installed")])
def test_initFail(rq: Run, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """
    The reason init_root raises is printed as C{fail <reason>}, exit 1.
    """
    _fakeRoot(monkeypatch, error)
    assert rq(FakeDaemon(), "init") == (1, "fail Already installed\n", "")


def test_initReal(rq: Run, tmp_path: Any) -> None:
    """
    The real init_root takes the options the command line passes, and
    refuses a second install without C{--force}.
    """
    root = tmp_path / "root"
    assert rq(FakeDaemon(), "init", "--root", str(root), "--host", "h.example", "--port", "4000") == (0, f"ok {root}\n", "")
    with open(root / "config" / "config.json") as f:
        config = json.load(f)
    assert (config["host"], config["port"]) == ("h.example", 4000)
    assert rq(FakeDaemon(), "init", "--root", str(root)) == (1, "fail Already installed\n", "")
    assert rq(FakeDaemon(), "init", "--root", str(root), "--force", "--host=h") == (0, f"ok {root}\n", "")


@pytest.mark.parametrize("port", ["abc", "99999", "-1", "", "3.5"])
def test_initBadPort(rq: Run, tmp_path: Path, port: str) -> None:
    """
    A C{--port} that is not a port is refused by name before anything is
    created (it used to leave a root without config, or a config the
    daemon could not listen with).
    """
    root = tmp_path / "root"
    expected = (1, f"fail --port must be an integer from 0 to 65535, not {port!r}\n", "")
    assert rq(FakeDaemon(), "init", "--root", str(root), f"--port={port}") == expected
    assert not root.exists()


# -- errors -----------------------------------------------------------------------


def test_notRunning(rq: Run, tmp_path: Any) -> None:
    """
    An unreachable daemon is one C{fail} line naming the root.
    """
    daemon = FakeDaemon(Ping=DaemonNotReachable("/x/config/rq.sock", "Connection refused"))
    assert rq(daemon, "ping") == (1, f"fail rq daemon not running at {tmp_path}: Connection refused\n", "")


def test_notRunningReal(rq: Run, tmp_path: Any) -> None:
    """
    With the default client and no daemon, the message says the socket is
    missing.
    """
    expected = f"fail rq daemon not running at {tmp_path}: No such file or directory\n"
    assert rq(None, "statusmesg", "--msg_id", FULL_ID) == (1, expected, "")


@pytest.mark.parametrize(
    "error, expected",
    [
        (RemoteError("Ping", "UNKNOWN", "Unknown Error"), "fail Ping failed in the rq daemon (UNKNOWN): Unknown Error"),
        (ProtocolError("no answer"), "fail no answer"),
        (RuntimeError("boom"), "fail internal error: RuntimeError: boom"),
        (MessageError("odd"), "fail internal error: MessageError: odd"),
    ],
)
def test_neverTraceback(rq: Run, error: Exception, expected: str) -> None:
    """
    Any failure is one C{fail} line, exit 1, nothing on stderr.
    """
    assert rq(FakeDaemon(Ping=error), "ping") == (1, expected + "\n", "")


def test_unicodeOutput(rq: Run) -> None:
    """
    Non-ASCII details are printed as text.
    """
    daemon = FakeDaemon(MessageAction=("ok", "done - caf\u00e9 \u2603"))
    assert rq(daemon, "statusmesg", "--msg_id", FULL_ID) == (0, "ok done - caf\u00e9 \u2603\n", "")


def test_interrupted(rq: Run) -> None:
    """
    Ctrl-C (here while waiting for the daemon) exits 130, the shell's
    status for it, and prints nothing.
    """
    try:
        result = rq(FakeDaemon(Ping=KeyboardInterrupt()), "ping")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main")
    assert result == (130, "", "")


class _FullStream:
    """
    A stdout whose writes fail like a full disk's, on descriptor C{fd}.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self) -> int:
        return self.fd


def _is_devnull(fd: int) -> bool:
    mine, null = os.fstat(fd), os.stat(os.devnull)
    return (mine.st_dev, mine.st_ino) == (null.st_dev, null.st_ino)


def test_stdoutWriteError(rq: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Output that cannot be written fails the command (exit 1) with a short
    note on stderr, and stdout's descriptor then points at C{/dev/null} so
    that the interpreter's own flush at exit cannot complain again.
    """
    with open(tmp_path / "out", "w") as f:
        monkeypatch.setattr(sys, "stdout", _FullStream(f.fileno()))
        assert rq(FakeDaemon(), "ping") == (1, "", "rq: cannot write to standard output: No space left on device\n")
        assert _is_devnull(f.fileno())


def test_stdoutClosed(rq: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Without a stdout at all (C{rq ping >&-}) the command fails the same way.
    """
    monkeypatch.setattr(sys, "stdout", None)
    assert rq(FakeDaemon(), "ping") == (1, "", "rq: cannot write to standard output: it is closed\n")


# -- against the real admin protocol --------------------------------------------------


class RealishAPI:
    """
    Enough of the daemon's admin API for a few end-to-end runs.
    """

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def create_message(self, message: str, method: str, relay_ok: str = "") -> tuple[str, str]:
        self.messages.append(json.loads(message))
        return ("ok", FULL_ID)

    def get_message(self, msg_id: str) -> tuple[str, str]:
        if msg_id != FULL_ID:
            raise MessageError("msg not found")
        return ("ok", json.dumps({"count": 7, "pad": "x" * 70000}))


@pytest.fixture
def daemon() -> Iterator[tuple[str, RealishAPI]]:
    """
    A real L{AdminProtocol} on C{<root>/config/rq.sock}; yields the root.
    """
    root = tempfile.mkdtemp(prefix="rqc")
    os.mkdir(os.path.join(root, "config"))
    api = RealishAPI()
    factory = Factory()
    factory.protocol = lambda: AdminProtocol(api, os.path.join(root, "spill"))  # type: ignore[assignment]
    port = reactor.listenUNIX(os.path.join(root, SOCKET), factory)  # type: ignore[attr-defined]
    yield root, api
    pytest_twisted.blockon(port.stopListening())
    shutil.rmtree(root, ignore_errors=True)


@pytest_twisted.inlineCallbacks
def test_endToEnd(daemon: tuple[str, RealishAPI], capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """
    The command line, its real client and the real admin protocol agree,
    including a spilled detail and a refusal.
    """
    root, api = daemon
    code = yield deferToThread(main, ["sendmesg", "--root", root, "--dest", "test", "--param1=\u00e9"])
    assert (code, capsys.readouterr().out) == (0, f"ok {FULL_ID}\n")
    assert api.messages == [{"dest": "test", "param1": "\u00e9"}]
    code = yield deferToThread(main, ["statuscountmesg", "--root", root, "--msg_id", FULL_ID])
    assert (code, capsys.readouterr().out) == (0, "ok 7\n")
    code = yield deferToThread(main, ["statuscountmesg", "--root", root, "--msg_id", "/q/x/1"])
    assert (code, capsys.readouterr().out) == (1, "fail msg not found\n")
    assert os.listdir(os.path.join(root, "spill")) == []


@pytest_twisted.inlineCallbacks
def test_turnedAwayIsOneFailLine(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """
    A daemon that turns the connection away (too many admin connections
    open) gets one C{fail} line saying so, exit 1, no traceback.
    """
    root = tempfile.mkdtemp(prefix="rqc")
    os.mkdir(os.path.join(root, "config"))
    factory = AdminFactory(RealishAPI(), os.path.join(root, "spill"), maxConnections=0)
    port = reactor.listenUNIX(os.path.join(root, SOCKET), factory)  # type: ignore[attr-defined]
    try:
        code = yield deferToThread(main, ["ping", "--root", root])
    finally:
        yield port.stopListening()
        shutil.rmtree(root, ignore_errors=True)
    out, err = capsys.readouterr()
    sock = os.path.join(root, SOCKET)
    assert (code, out, err) == (
        1,
        f"fail rq daemon at {sock} turned the connection away: too many admin connections open (0); try again later\n",
        "",
    )


# -- a fresh interpreter ------------------------------------------------------------


def _python(*args: str, cwd: str = PROJECT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=PROJECT)
    env.pop("RQ_ROOT", None)
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_moduleHelp() -> None:
    """
    C{python -m rqtwisted} is the command line.
    """
    result = _python("-m", "rqtwisted")
    assert (result.returncode, result.stderr) == (1, "")
    assert result.stdout.splitlines()[0] == "Valid commands are:"


def test_outputErrorsFreshInterpreter(tmp_path: Path) -> None:
    """
    In a real interpreter, a full disk or a closed stdout gives exit 1 and
    one line on stderr: no traceback, no "Exception ignored" from the
    final flush.
    """
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "rqtwisted", "ping", "--root", str(tmp_path)],
            env=dict(os.environ, PYTHONPATH=PROJECT), stdout=full, stderr=subprocess.PIPE, text=True,
        )
    assert (result.returncode, result.stderr) == (1, "rq: cannot write to standard output: No space left on device\n")
    result = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "-m", "rqtwisted", "ping", "--root", str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=PROJECT), stderr=subprocess.PIPE, text=True,
    )
    assert (result.returncode, result.stderr) == (1, "rq: cannot write to standard output: it is closed\n")


def test_interruptedFreshInterpreter(tmp_path: Path) -> None:
    """
    A real SIGINT while the command waits for the daemon: exit 130, no
    output, no traceback.
    """
    code = (
        "import signal, sys\n"
        "from rqtwisted.cli import main\n"
        "class Waiting:\n"
        "    def __init__(self, path): pass\n"
        "    def call(self, command, **args):\n"
        f"        signal.raise_signal({int(signal.SIGINT)})\n"
        "        return ('ok', 'not interrupted')\n"
        "sys.exit(main(['ping'], Waiting))\n"
    )
    result = _python("-c", code, cwd=str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "")


def test_daemonPathsImportNoTwisted(tmp_path: Any) -> None:
    """
    Running daemon verbs (here without a daemon) loads no Twisted module,
    and prints no traceback.
    """
    code = (
        "import sys\n"
        "from rqtwisted.cli import main\n"
        "codes = [main(a.split()) for a in sys.argv[1:]]\n"
        "print(codes, [m for m in sys.modules if m == 'twisted' or m.startswith('twisted.')])\n"
    )
    verbs = [
        "ping",
        "status",
        "queues",
        "sendmesg --dest q",
        "statusmesg --msg_id m",
        "attachstatusmesg --msg_id m",
        "show --msg_id m",
        "up --name q",
        "create_queue --name q --script s",
    ]
    result = _python("-c", code, *verbs, cwd=str(tmp_path))
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[:-1] == [f"fail rq daemon not running at {tmp_path}: No such file or directory"] * len(verbs)
    assert lines[-1] == f"{[1] * len(verbs)} []"
