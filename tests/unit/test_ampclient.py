"""
Tests for L{rqtwisted.ampclient}: the wire format against Twisted's own AMP
implementation, and whole calls against the real L{AdminProtocol} on a Unix
socket, the synchronous client running in a thread so the reactor keeps
serving.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.protocols import amp

from rqtwisted import ampclient
from rqtwisted.admin import AdminFactory, AdminProtocol
from rqtwisted.admincommands import COMMANDS
from rqtwisted.ampclient import (
    AdminClient,
    BoxDecoder,
    DaemonBusy,
    DaemonNotReachable,
    InvalidRequest,
    ProtocolError,
    RemoteError,
    encode_box,
    request_box,
)
from rqtwisted.message import MessageError

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

keys = st.binary(min_size=1, max_size=255)
values = st.binary(max_size=300)
boxes = st.dictionaries(keys, values, max_size=8)


# -- wire format --------------------------------------------------------------


@given(boxes)
def test_encodeMatchesTwisted(box: dict[bytes, bytes]) -> None:
    """
    L{encode_box} produces the bytes of L{amp.AmpBox.serialize}.
    """
    assert encode_box(box) == amp.AmpBox(box).serialize()


@given(st.lists(boxes, max_size=4), st.integers(min_value=1, max_value=50))
def test_decodeAnyChunking(sent: list[dict[bytes, bytes]], chunk: int) -> None:
    """
    L{BoxDecoder} returns every box, whatever the chunking of the bytes.
    """
    data = b"".join(amp.AmpBox(b).serialize() for b in sent)
    decoder = BoxDecoder()
    received = []
    for i in range(0, len(data), chunk):
        received += decoder.feed(data[i : i + chunk])
    assert received == sent
    assert not decoder.pending


def test_decodeKeyTooLong() -> None:
    """
    A key length over 255 is a protocol error.
    """
    with pytest.raises(ProtocolError, match="malformed"):
        BoxDecoder().feed(b"\x01\x00" + b"k" * 256)


def test_encodeValueTooLong() -> None:
    """
    A value over 65535 bytes is refused.
    """
    with pytest.raises(InvalidRequest, match="65535"):
        encode_box({b"k": b"v" * 65536})
    assert encode_box({b"k": b"v" * 65535})


def test_requestBox() -> None:
    """
    The request carries C{_command}, C{_ask} and the UTF-8 arguments.
    """
    box = request_box("QueueAdmin", {"action": "up", "name": "caf\u00e9"}, b"7")
    assert box == {b"_command": b"QueueAdmin", b"_ask": b"7", b"action": b"up", b"name": "caf\u00e9".encode()}


@pytest.mark.parametrize(
    "command, args, match",
    [
        ("Bogus", {}, "unknown admin command 'Bogus'"),
        ("Ping", {"x": "1"}, "Ping takes no argument x"),
        ("QueueAdmin", {"action": "up"}, "QueueAdmin needs argument name"),
        ("DeleteQueue", {"name": 3}, "must be text"),
        ("DeleteQueue", {"name": "\udcff"}, "not valid Unicode"),
        ("DeleteQueue", {"name": "x" * 65536}, "limited to 65535 bytes"),
        ("DeleteQueue", {"name": "\u00e9" * 40000}, "80000 bytes"),
    ],
)
def test_requestBoxInvalid(command: str, args: dict[str, Any], match: str) -> None:
    """
    Unknown commands, wrong arguments and oversized values are refused.
    """
    with pytest.raises(InvalidRequest, match=match):
        request_box(command, args, b"1")


def test_invalidBeforeConnecting(tmp_path: Any) -> None:
    """
    An invalid request fails before the client connects: no daemon is
    needed to see the error.
    """
    client = AdminClient(str(tmp_path / "missing.sock"))
    with pytest.raises(InvalidRequest):
        client.call("DeleteQueue", name="x" * 70000)
    with pytest.raises(InvalidRequest):
        client.call("Nope")


def test_allCommandsKnown() -> None:
    """
    Every admin command builds a request from its required arguments.
    """
    for command, (required, _) in COMMANDS.items():
        assert request_box(command, {name: "v" for name in required}, b"1")[b"_command"] == command.encode()


# -- not reachable ------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[str]:
    """
    A short directory for Unix sockets (their paths are limited to 108
    bytes, which pytest's tmp_path can exceed).
    """
    path = tempfile.mkdtemp(prefix="rqa")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_socketMissing(sockdir: str) -> None:
    """
    A missing socket raises L{DaemonNotReachable} with the reason.
    """
    path = os.path.join(sockdir, "rq.sock")
    with pytest.raises(DaemonNotReachable) as e:
        AdminClient(path).call("Ping")
    assert e.value.socket_path == path
    assert e.value.reason == "No such file or directory"
    assert str(e.value) == f"rq daemon not reachable at {path}: No such file or directory"


def test_socketRefused(sockdir: str) -> None:
    """
    A socket file nobody listens on raises L{DaemonNotReachable}.
    """
    path = os.path.join(sockdir, "rq.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    with pytest.raises(DaemonNotReachable) as e:
        AdminClient(path).call("Ping")
    assert e.value.reason == "Connection refused"


def test_busyDaemonIsNotMissing(sockdir: str) -> None:
    """
    A daemon whose listen queue is full (too busy to accept) is waited for,
    up to the timeout, and then reported as busy, not as not running.
    """
    path = os.path.join(sockdir, "rq.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(0)
    queued = []
    try:
        # Fill the listen queue: nobody accepts.
        while True:
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(path)
            except BlockingIOError:
                c.close()
                break
            queued.append(c)
        with pytest.raises(ProtocolError, match="did not take the connection within 0.2s"):
            AdminClient(path, timeout=0.2).call("Ping")
    finally:
        for c in queued:
            c.close()
        server.close()


class _Scripted(Protocol):
    """
    A peer answering every request with canned bytes (C{None}: hang up).
    """

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply

    def dataReceived(self, data: bytes) -> None:
        if self.reply is None:
            self.transport.loseConnection()
        else:
            self.transport.write(self.reply)


@pytest.fixture
def scripted(sockdir: str) -> Iterator[Callable[[bytes | None], str]]:
    """
    Start a L{_Scripted} peer on a Unix socket; returns its path.
    """
    ports = []

    def start(reply: bytes | None) -> str:
        factory = Factory()
        factory.protocol = lambda: _Scripted(reply)  # type: ignore[assignment]
        path = os.path.join(sockdir, f"s{len(ports)}.sock")
        ports.append(reactor.listenUNIX(path, factory))  # type: ignore[attr-defined]
        return path

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


@pytest_twisted.inlineCallbacks
def test_closedWithoutAnswer(scripted: Callable[[bytes | None], str]) -> Iterator[Any]:
    """
    A peer closing the connection before answering is a L{ProtocolError}.
    """
    path = scripted(None)
    with pytest.raises(ProtocolError, match="closed the connection without answering"):
        yield _call(path, "Ping")


@pytest_twisted.inlineCallbacks
def test_malformedAnswer(scripted: Callable[[bytes | None], str]) -> Iterator[Any]:
    """
    Bytes that are not AMP are a L{ProtocolError}.
    """
    path = scripted(b"\x01\x00" + b"x" * 300)
    with pytest.raises(ProtocolError, match="malformed AMP box"):
        yield _call(path, "Ping")


@pytest_twisted.inlineCallbacks
def test_otherBoxesSkipped(scripted: Callable[[bytes | None], str]) -> Iterator[Any]:
    """
    Boxes that do not answer the request's tag are skipped.
    """
    other = encode_box({b"_answer": b"99", b"status": b"fail", b"detail": b"not mine"})
    ours = encode_box({b"_answer": b"1", b"status": b"ok", b"detail": b"mine"})
    path = scripted(other + ours)
    assert (yield _call(path, "Ping")) == ("ok", "mine")


# -- against the real AdminProtocol ---------------------------------------------


class FakeAPI:
    """
    An admin API answering from canned values and recording calls.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.big = ""

    def ping(self) -> tuple[str, str]:
        self.calls.append(("ping", {}))
        return ("ok", "pong")

    def queues(self) -> tuple[str, str]:
        return ("ok", self.big)

    def status(self) -> defer.Deferred[tuple[str, str]]:
        return defer.succeed(("ok", json.dumps({"queues": 0})))

    def delete_queue(self, name: str) -> tuple[str, str]:
        self.calls.append(("delete_queue", {"name": name}))
        raise MessageError("no such queue")

    def restart(self) -> tuple[str, str]:
        raise RuntimeError("boom")

    def reload(self) -> defer.Deferred[tuple[str, str]]:
        return defer.Deferred()  # never answers

    def create_queue(self, config: str) -> tuple[str, str]:
        return ("success", "queue created - awesome")

    def create_message(self, message: str, method: str, relay_ok: str = "<absent>") -> tuple[str, str]:
        self.calls.append(("create_message", {"message": message, "method": method, "relay_ok": relay_ok}))
        return ("ok", json.loads(message)["dest"])

    def queue_admin(self, action: str, name: str) -> tuple[str, str]:
        self.calls.append(("queue_admin", {"action": action, "name": name}))
        return ("ok", name)


@pytest.fixture
def server(sockdir: str) -> Iterator[tuple[str, FakeAPI, str]]:
    """
    A real L{AdminProtocol} listening on a Unix socket: yields the socket
    path, the fake API and the spill directory.
    """
    api = FakeAPI()
    spill = os.path.join(sockdir, "spill")
    factory = Factory()
    factory.protocol = lambda: AdminProtocol(api, spill)  # type: ignore[assignment]
    path = os.path.join(sockdir, "rq.sock")
    port = reactor.listenUNIX(path, factory)  # type: ignore[attr-defined]
    yield path, api, spill
    pytest_twisted.blockon(port.stopListening())


def _call(path: str, command: str, timeout: float = 10.0, **args: str) -> defer.Deferred[Any]:
    return deferToThread(AdminClient(path, timeout).call, command, **args)


@pytest_twisted.inlineCallbacks
def test_ok(server: tuple[str, FakeAPI, str]) -> Iterator[Any]:
    """
    An ok answer comes back as C{(status, detail)}.
    """
    path, api, _ = server
    assert (yield _call(path, "Ping")) == ("ok", "pong")
    assert (yield _call(path, "Status")) == ("ok", '{"queues": 0}')
    assert api.calls == [("ping", {})]


@pytest_twisted.inlineCallbacks
def test_success(server: tuple[str, FakeAPI, str]) -> Iterator[Any]:
    """
    The original's C{success} status is passed through.
    """
    path, _, _ = server
    assert (yield _call(path, "CreateQueue", config="{}")) == ("success", "queue created - awesome")


@pytest_twisted.inlineCallbacks
def test_optionalArguments(server: tuple[str, FakeAPI, str]) -> Iterator[Any]:
    """
    Optional arguments reach the API when given (even empty), and are
    absent otherwise.
    """
    path, api, _ = server
    yield _call(path, "CreateMessage", message='{"dest": "q"}', method="prep")
    yield _call(path, "CreateMessage", message='{"dest": "q"}', method="commit", relay_ok="")
    yield _call(path, "CreateMessage", message='{"dest": "q"}', method="commit", relay_ok="1")
    assert [c[1]["relay_ok"] for c in api.calls] == ["<absent>", "", "1"]


@pytest_twisted.inlineCallbacks
def test_fail(server: tuple[str, FakeAPI, str]) -> Iterator[Any]:
    """
    A L{MessageError} of the API is a C{fail} answer with its reason; any
    other exception is C{fail internal error: ...}.
    """
    path, api, _ = server
    assert (yield _call(path, "DeleteQueue", name="nope")) == ("fail", "no such queue")
    assert api.calls == [("delete_queue", {"name": "nope"})]
    status, detail = yield _call(path, "Restart")
    assert (status, detail) == ("fail", "internal error: boom")


@pytest_twisted.inlineCallbacks
def test_unicode(server: tuple[str, FakeAPI, str]) -> Iterator[Any]:
    """
    Text crosses the socket as UTF-8 both ways.
    """
    path, api, _ = server
    name = "caf\u00e9 \u2603 \U0001d11e"
    assert (yield _call(path, "QueueAdmin", action="up", name=name)) == ("ok", name)
    assert api.calls == [("queue_admin", {"action": "up", "name": name})]


@pytest_twisted.inlineCallbacks
def test_spill(server: tuple[str, FakeAPI, str]) -> Iterator[Any]:
    """
    A detail larger than an AMP value is spilled to a file by the server;
    the client returns it whole and removes the file.
    """
    path, api, spill = server
    api.big = json.dumps([f"queue-\u00e9-{i}" for i in range(10000)])
    assert len(api.big.encode("utf-8")) > 65536
    status, detail = yield _call(path, "Queues")
    assert (status, detail) == ("ok", api.big)
    assert os.listdir(spill) == []


@pytest_twisted.inlineCallbacks
def test_valueAtLimit(server: tuple[str, FakeAPI, str]) -> Iterator[Any]:
    """
    A value of exactly 65535 bytes is sent; the answer's detail, too big
    to be inline, is spilled back.
    """
    path, _, spill = server
    name = "n" * 65535
    assert (yield _call(path, "QueueAdmin", action="up", name=name)) == ("ok", name)
    assert os.listdir(spill) == []


@pytest_twisted.inlineCallbacks
def test_unhandledCommand(server: tuple[str, FakeAPI, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """
    A command the daemon does not know is an AMP error box, raised as
    L{RemoteError} with its code and description.
    """
    path, _, _ = server
    monkeypatch.setitem(ampclient.COMMANDS, "Bogus", ((), ()))
    with pytest.raises(RemoteError) as e:
        yield _call(path, "Bogus")
    assert e.value.code == "UNHANDLED"
    assert "Unhandled Command" in e.value.description
    assert str(e.value).startswith("Bogus failed in the rq daemon (UNHANDLED): ")


@pytest_twisted.inlineCallbacks
def test_timeout(server: tuple[str, FakeAPI, str]) -> Iterator[Any]:
    """
    No answer within the timeout is a L{ProtocolError}.
    """
    path, _, _ = server
    with pytest.raises(ProtocolError, match="no answer to Reload"):
        yield _call(path, "Reload", timeout=0.05)


@pytest_twisted.inlineCallbacks
def test_turnedAway(sockdir: str) -> Iterator[Any]:
    """
    A daemon with as many admin connections open as it allows turns a new
    one away: a L{DaemonBusy} saying so, not a broken connection.
    """
    api = FakeAPI()
    factory = AdminFactory(api, os.path.join(sockdir, "spill"), maxConnections=0)
    path = os.path.join(sockdir, "rq.sock")
    port = reactor.listenUNIX(path, factory)  # type: ignore[attr-defined]
    try:
        for _ in range(3):
            with pytest.raises(DaemonBusy) as e:
                yield _call(path, "Ping")
            assert e.value.reason == "too many admin connections open (0); try again later"
            assert str(e.value) == f"rq daemon at {path} turned the connection away: {e.value.reason}"
    finally:
        yield port.stopListening()
    assert api.calls == []


def test_turnedAwayBeforeTheRequestIsSent(sockdir: str) -> None:
    """
    The daemon may turn the connection away (say why, close) before the
    request is sent: the send fails, what it said is read all the same.
    """
    path = os.path.join(sockdir, "rq.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    notice = encode_box({b"_error": b"", b"_error_code": b"BUSY", b"_error_description": b"full"})

    class Early(AdminClient):
        def _connect(self) -> socket.socket:
            sock = super()._connect()
            peer, _ = server.accept()
            peer.sendall(notice)
            peer.close()
            return sock

    try:
        with pytest.raises(DaemonBusy, match="turned the connection away: full"):
            Early(path, timeout=5).call("Ping")
    finally:
        server.close()


def test_readSpillRemovesEvenOnError(sockdir: str) -> None:
    """
    An unreadable spill file is a L{ProtocolError}; a missing one too.
    """
    bad = os.path.join(sockdir, "bad")
    with open(bad, "wb") as f:
        f.write(b"\xff\xfe")
    with pytest.raises(ProtocolError, match="cannot read the spilled detail"):
        ampclient.read_spill(bad)
    assert not os.path.exists(bad)
    with pytest.raises(ProtocolError):
        ampclient.read_spill(bad)


def test_answerResult() -> None:
    """
    Answers missing a key or not UTF-8 are protocol errors.
    """
    assert ampclient.answer_result("Ping", {b"status": b"ok", b"detail": b""}) == ("ok", "")
    with pytest.raises(ProtocolError, match="lacks 'detail'"):
        ampclient.answer_result("Ping", {b"status": b"ok"})
    with pytest.raises(ProtocolError, match="not UTF-8"):
        ampclient.answer_result("Ping", {b"status": b"\xff", b"detail": b""})


# -- import cost ----------------------------------------------------------------


def test_noTwistedImported() -> None:
    """
    Importing the command line and the client in a fresh interpreter loads
    no Twisted module.
    """
    code = (
        "import sys, rqtwisted.cli, rqtwisted.ampclient\n"
        "print([m for m in sys.modules if m == 'twisted' or m.startswith('twisted.')])\n"
    )
    env = dict(os.environ, PYTHONPATH=PROJECT)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
