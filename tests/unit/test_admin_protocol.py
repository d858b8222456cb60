"""
Tests for L{rqtwisted.admin.AdminProtocol} on a L{StringTransport}: its own
parsing and answering of command boxes must put on the wire exactly what
Twisted's plain L{amp.AMP} puts there for the same bytes, however they are
chunked, and hand everything unusual over to Twisted.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure

from rqtwisted.admin import (
    MAX_INLINE,
    MAX_PENDING_BOX,
    SPILL_MAX_AGE,
    TURNED_AWAY_WARNING_INTERVAL,
    AdminAPI,
    AdminFactory,
    AdminProtocol,
    TurnedAway,
    cancelled_on_hang_up,
    commands,
    sweep_spills,
)
from rqtwisted.ampclient import BoxDecoder, turned_away
from rqtwisted.message import MessageError
from rqtwisted.testing import HeldThreads, instance_for, result_of


class Reference(amp.AMP):
    """
    The admin protocol on Twisted's own AMP code paths only: what the wire
    must look like.
    """

    def __init__(self, api: Any, spillDir: str) -> None:
        super().__init__()
        self._api = api
        self._spillDir = spillDir

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    # AdminProtocol's own Twisted path (locateResponder is what Twisted's
    # dispatch calls; the fast path never does).
    locateResponder = AdminProtocol.locateResponder
    ampBoxReceived = AdminProtocol.ampBoxReceived
    _hangUp = AdminProtocol._hangUp
    _closing = False
    _reply = AdminProtocol._reply
    _failed = AdminProtocol._failed
    _settled = AdminProtocol._settled
    _closeIfIdle = AdminProtocol._closeIfIdle
    _cancelOnHangUp = AdminProtocol._cancelOnHangUp
    _cancellable = None
    _inflight = 0
    _closing = False


class API:
    """
    An admin API recording its calls; C{status} answers later, C{queues}
    answers C{result}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.later: list[Deferred[Any]] = []
        self.result: Any = ("ok", "[]")

    def ping(self) -> tuple[str, str]:
        self.calls.append(("ping", {}))
        return ("ok", "pong")

    def create_message(self, message: str, method: str, relay_ok: str = "<absent>") -> tuple[str, str]:
        self.calls.append(("create_message", {"message": message, "method": method, "relay_ok": relay_ok}))
        return ("ok", f"{message}|{method}|{relay_ok}")

    def queue_admin(self, action: str, name: str) -> tuple[str, str]:
        self.calls.append(("queue_admin", {"action": action, "name": name}))
        return ("ok", f"{action} {name}")

    def delete_queue(self, name: str) -> tuple[str, str]:
        self.calls.append(("delete_queue", {"name": name}))
        raise MessageError(f"no queue {name}")

    def restart(self) -> tuple[str, str]:
        self.calls.append(("restart", {}))
        raise RuntimeError("boom")

    def status(self) -> Deferred[tuple[str, str]]:
        self.calls.append(("status", {}))
        d: Deferred[tuple[str, str]] = Deferred()
        self.later.append(d)
        return d

    def queues(self) -> Any:
        self.calls.append(("queues", {}))
        return self.result


@dataclass
class Outcome:
    """
    What one connection did: bytes written, whether it hung up, the
    exception its C{dataReceived} raised, the API calls and the types of the
    failures logged.
    """

    written: bytes
    disconnecting: bool
    raised: str | None
    calls: list[tuple[str, dict[str, str]]]
    logged: list[str] = field(default_factory=list)


class Connection:
    """
    One protocol on a L{StringTransport}, fed like a reactor would: a
    connection that hung up or raised gets no more bytes.
    """

    def __init__(self, protocol: type[amp.AMP], api: API | None = None, spillDir: str = "") -> None:
        self.api = api or API()
        self.transport = StringTransport()
        self.protocol = protocol(self.api, spillDir or tempfile.gettempdir())  # type: ignore[call-arg]
        self.protocol.makeConnection(self.transport)
        self.raised: str | None = None
        self.logged: list[str] = []

    def _observe(self, event: dict[str, Any]) -> None:
        if "log_failure" in event:
            self.logged.append(type(event["log_failure"].value).__name__)

    def feed(self, *chunks: bytes) -> Connection:
        """
        Deliver chunks, one read each, noting what is raised and logged.
        """
        globalLogPublisher.addObserver(self._observe)
        try:
            for chunk in chunks:
                if self.transport.disconnecting or self.raised:
                    break
                try:
                    self.protocol.dataReceived(chunk)
                except Exception as e:
                    self.raised = type(e).__name__
        finally:
            globalLogPublisher.removeObserver(self._observe)
        return self

    def fire(self, result: Any) -> Connection:
        """
        Fire the oldest pending C{status} call.
        """
        globalLogPublisher.addObserver(self._observe)
        try:
            d = self.api.later.pop(0)
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        finally:
            globalLogPublisher.removeObserver(self._observe)
        return self

    def outcome(self) -> Outcome:
        """
        What the connection did so far.
        """
        return Outcome(
            self.transport.value(), bool(self.transport.disconnecting), self.raised, self.api.calls, self.logged
        )


def both(*chunks: bytes) -> tuple[Connection, Connection]:
    """
    Feed the same chunks to an L{AdminProtocol} and a L{Reference}; assert
    they did the same and return both.
    """
    fast = Connection(AdminProtocol).feed(*chunks)
    reference = Connection(Reference).feed(*chunks)
    assert fast.outcome() == reference.outcome()
    return fast, reference


def box(**items: bytes | str) -> bytes:
    """
    The wire bytes of a box, as Twisted serializes it (text is UTF-8).
    """
    return amp.AmpBox({k.encode(): v.encode() if isinstance(v, str) else v for k, v in items.items()}).serialize()


def answer(ask: str, status: str, detail: str) -> bytes:
    """
    The wire bytes of an answer.
    """
    return box(_answer=ask, status=status, detail=detail)


def error(ask: str, code: str, description: str) -> bytes:
    """
    The wire bytes of an AMP error box.
    """
    return box(_error=ask, _error_code=code, _error_description=description)


PING = box(_command="Ping", _ask="1")
MESSAGE = box(_command="CreateMessage", _ask="2", message='{"dest": "caf\u00e9"}', method="commit")
UNKNOWN_ERROR = "Unknown Error"

#: Boxes of every kind, for streams of boxes.
SAMPLES = [
    PING,
    MESSAGE,
    box(_command="CreateMessage", _ask="3", message="{}", method="prep", relay_ok=""),
    box(_command="CreateMessage", _ask="4", message="\u2603", method="x", relay_ok="1", extra="ignored"),
    box(_command="CreateMessage", message="no ask", method="commit"),
    box(_command="QueueAdmin", _ask="5", action="up", name="\U0001d11e"),
    box(_command="QueueAdmin", _ask="6", action="up"),
    box(_command="QueueAdmin", _ask="7", action="up", name=b"\xff"),
    box(_command="Bogus", _ask="8"),
    box(_command="DeleteQueue", _ask="9", name="nope"),
    box(_command="Restart", _ask="a"),
    box(_command="Ping", _ask="b", _answer="b"),
    box(_answer="c", status="ok", detail=""),
    b"\x00\x08_command\x00\x04Ping\x00\x04_ask\x00\x01d\x00\x04_ask\x00\x01e\x00\x00",
]


# -- the common case --------------------------------------------------------


def test_commandInOneRead() -> None:
    """
    A command in one read is answered at once, in one write, with the API's
    status and detail.
    """
    fast, _ = both(PING)
    assert fast.transport.value() == answer("1", "ok", "pong")
    assert fast.transport.io.getvalue().count(b"_answer") == 1
    assert fast.api.calls == [("ping", {})]
    assert not fast.transport.disconnecting


def test_byteByByte() -> None:
    """
    A command arriving one byte at a time is answered once its last byte
    arrives.
    """
    fast = Connection(AdminProtocol).feed(*[MESSAGE[i : i + 1] for i in range(len(MESSAGE) - 1)])
    assert fast.transport.value() == b""
    fast.feed(MESSAGE[-1:])
    assert fast.transport.value() == answer("2", "ok", '{"dest": "caf\u00e9"}|commit|<absent>')
    both(*[MESSAGE[i : i + 1] for i in range(len(MESSAGE))])


def test_twoBoxesInOneRead() -> None:
    """
    Two commands in one read are both answered, in order.
    """
    fast, _ = both(PING + MESSAGE)
    assert fast.transport.value() == answer("1", "ok", "pong") + answer(
        "2", "ok", '{"dest": "caf\u00e9"}|commit|<absent>'
    )


def test_optionalArguments() -> None:
    """
    An optional argument reaches the API when given, even empty; extra keys
    are ignored.
    """
    fast, _ = both(SAMPLES[2] + SAMPLES[3])
    assert [c[1]["relay_ok"] for c in fast.api.calls] == ["", "1"]


def test_noAsk() -> None:
    """
    A command without C{_ask} is run and gets no answer.
    """
    fast, _ = both(SAMPLES[4] + PING)
    assert fast.transport.value() == answer("1", "ok", "pong")
    called = {"message": "no ask", "method": "commit", "relay_ok": "<absent>"}
    assert fast.api.calls == [("create_message", called), ("ping", {})]


@settings(max_examples=150)
@given(st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=5), st.data())
def test_anyChunking(boxes: list[bytes], data: st.DataObject) -> None:
    """
    Whatever the boxes and however their bytes are split into reads, the
    protocol does what Twisted's own AMP does.
    """
    stream = b"".join(boxes)
    cuts = sorted(set(data.draw(st.lists(st.integers(min_value=1, max_value=len(stream) - 1), max_size=12))))
    edges = [0, *cuts, len(stream)]
    both(*[stream[a:b] for a, b in zip(edges, edges[1:])])


# -- failures ---------------------------------------------------------------


def test_messageError() -> None:
    """
    A L{MessageError} of the API is a C{fail <reason>} answer; nothing is
    logged.
    """
    fast, _ = both(SAMPLES[9])
    assert fast.transport.value() == answer("9", "fail", "no queue nope")
    assert fast.logged == []


def test_unexpectedException() -> None:
    """
    Any other exception is a C{fail internal error: ...} answer and is
    logged.
    """
    fast, _ = both(SAMPLES[10])
    assert fast.transport.value() == answer("a", "fail", "internal error: boom")
    assert fast.logged == ["RuntimeError"]
    assert not fast.transport.disconnecting


@pytest.mark.parametrize(
    "result, logged",
    [
        (None, "TypeError"),
        (("ok",), "ValueError"),
        (("ok", 7), "AttributeError"),
        (("\udcff", "x"), "BadLocalReturn"),
    ],
)
def test_resultNotAnAnswer(result: Any, logged: str) -> None:
    """
    A result that cannot become an answer is Twisted's C{UNKNOWN} error box,
    logged, and the connection is dropped.
    """
    outcomes = []
    for protocol in (AdminProtocol, Reference):
        api = API()
        api.result = result
        outcomes.append(Connection(protocol, api).feed(box(_command="Queues", _ask="q")).outcome())
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].written == error("q", "UNKNOWN", UNKNOWN_ERROR)
    assert outcomes[0].disconnecting
    assert outcomes[0].logged[-1] == logged


def test_resultNotAnAnswerNoAsk() -> None:
    """
    Without C{_ask}, a result that cannot become an answer is logged and the
    connection dropped, as by Twisted.
    """
    outcomes = []
    for protocol in (AdminProtocol, Reference):
        api = API()
        api.result = None
        outcomes.append(Connection(protocol, api).feed(box(_command="Queues")).outcome())
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0].written, outcomes[0].disconnecting, outcomes[0].logged) == (b"", True, ["TypeError"])


def test_detailTooLongToSend() -> None:
    """
    A C{fail} reason too long for AMP (it is not spilled) drops the
    connection without an answer, as Twisted does.
    """
    outcomes = []
    for protocol in (AdminProtocol, Reference):
        api = API()
        api.result = Failure(MessageError("x" * 70000))
        outcomes.append(Connection(protocol, api).feed(box(_command="Queues", _ask="q") + PING).outcome())
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0].disconnecting, outcomes[0].logged) == (True, ["TooLong"])
    assert outcomes[0].written == answer("1", "ok", "pong")


# -- answers later ------------------------------------------------------------


def test_deferredFiresLater() -> None:
    """
    A Deferred result is answered when it fires; commands after it are
    answered meanwhile.
    """
    conns = [Connection(p).feed(box(_command="Status", _ask="s") + PING) for p in (AdminProtocol, Reference)]
    assert [c.transport.value() for c in conns] == [answer("1", "ok", "pong")] * 2
    for c in conns:
        c.fire(("ok", '{"queues": 0}'))
    assert conns[0].outcome() == conns[1].outcome()
    assert conns[0].transport.value() == answer("1", "ok", "pong") + answer("s", "ok", '{"queues": 0}')


def test_deferredFails() -> None:
    """
    A Deferred failing with a L{MessageError} answers C{fail <reason>}.
    """
    conns = [Connection(p).feed(box(_command="Status", _ask="s")) for p in (AdminProtocol, Reference)]
    for c in conns:
        c.fire(Failure(MessageError("later")))
    assert conns[0].outcome() == conns[1].outcome()
    assert conns[0].transport.value() == answer("s", "fail", "later")


def test_deferredAfterConnectionLost() -> None:
    """
    A result ready after the connection is gone is dropped quietly.
    """
    conns = [Connection(p).feed(box(_command="Status", _ask="s")) for p in (AdminProtocol, Reference)]
    for c in conns:
        c.protocol.connectionLost(Failure(ConnectionDone()))
        c.fire(("ok", "late"))
        assert c.protocol.transport is None
    assert conns[0].outcome() == conns[1].outcome()
    assert conns[0].outcome().written == b""
    assert conns[0].logged == []


# -- spill --------------------------------------------------------------------


@pytest.fixture
def spillDir() -> Iterator[str]:
    """
    An empty spill directory, removed after the test.
    """
    path = tempfile.mkdtemp(prefix="rqspill")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def test_spill(spillDir: str) -> None:
    """
    A detail too large for AMP is written to a file of the spill directory
    and its path sent instead, in the box Twisted would send.
    """
    big = json.dumps([f"queue-\u00e9-{i}" for i in range(10000)])
    assert len(big.encode("utf-8")) > MAX_INLINE
    answers = []
    for protocol in (AdminProtocol, Reference):
        api = API()
        api.result = ("ok", big)
        conn = Connection(protocol, api, spillDir).feed(box(_command="Queues", _ask="q"))
        (sent,) = BoxDecoder().feed(conn.transport.value())
        assert sorted(sent) == [b"_answer", b"detail", b"spill", b"status"]
        path = sent[b"spill"].decode("utf-8")
        assert os.path.dirname(path) == spillDir
        with open(path, encoding="utf-8") as f:
            assert f.read() == big
        assert conn.transport.value() == box(_answer="q", status="ok", detail="", spill=path)
        answers.append({**sent, b"spill": b""})
    assert answers[0] == answers[1]



def test_noSpillWithoutReader(spillDir: str) -> None:
    """
    A large answer ready after the client went away is not written to the
    spill directory: nobody would read and remove it.
    """
    api = API()
    answer_later: Deferred[tuple[str, str]] = Deferred()
    api.result = answer_later
    conn = Connection(AdminProtocol, api, spillDir).feed(box(_command="Queues", _ask="q"))
    conn.protocol.connectionLost(Failure(ConnectionDone()))
    answer_later.callback(("ok", "d" * (MAX_INLINE + 1)))
    assert os.listdir(spillDir) == []


def test_noSpillWithoutAsk(spillDir: str) -> None:
    """
    A request without C{_ask} wants no answer: a large detail is not
    spilled to a file nobody would read and remove (on either path).
    """
    big = "d" * (MAX_INLINE + 1)
    for protocol in (AdminProtocol, Reference):
        api = API()
        api.result = ("ok", big)
        conn = Connection(protocol, api, spillDir).feed(box(_command="Queues") * 3)
        assert conn.transport.value() == b""
        assert not conn.transport.disconnecting
    assert os.listdir(spillDir) == []


def test_sweepSpills(spillDir: str) -> None:
    """
    Files of the spill directory older than L{SPILL_MAX_AGE} are removed
    (when the factory starts, and before each new spill); newer ones stay.
    """
    old, new = os.path.join(spillDir, "spill-old.json"), os.path.join(spillDir, "message-new.json")
    for path in (old, new):
        with open(path, "w") as f:
            f.write("{}")
    os.utime(old, (0, time.time() - SPILL_MAX_AGE - 5))
    AdminFactory(API(), spillDir).startFactory()
    assert os.listdir(spillDir) == ["message-new.json"]
    sweep_spills(spillDir, now=time.time() + SPILL_MAX_AGE + 5)
    assert os.listdir(spillDir) == []

def test_detailAtLimit() -> None:
    """
    A detail of exactly L{MAX_INLINE} bytes is sent inline.
    """
    for protocol in (AdminProtocol, Reference):
        api = API()
        api.result = ("ok", "d" * MAX_INLINE)
        conn = Connection(protocol, api).feed(box(_command="Queues", _ask="q"))
        assert conn.transport.value() == answer("q", "ok", "d" * MAX_INLINE)


# -- handed over to Twisted -----------------------------------------------------


def test_unknownCommand() -> None:
    """
    An unknown command gets Twisted's C{UNHANDLED} error box; the commands
    after it are still answered.
    """
    fast, _ = both(PING + SAMPLES[8] + MESSAGE)
    unhandled = error("8", "UNHANDLED", "Unhandled Command: b'Bogus'")
    assert fast.transport.value().startswith(answer("1", "ok", "pong") + unhandled)
    assert fast.transport.value().endswith(answer("2", "ok", '{"dest": "caf\u00e9"}|commit|<absent>'))
    assert fast.protocol._twisted


def test_missingArgument() -> None:
    """
    A command missing a required argument is refused with C{fail} and the
    reason, nothing logged; the connection goes on.
    """
    fast, _ = both(SAMPLES[6] + PING)
    assert fast.transport.value() == answer("6", "fail", "missing argument 'name'") + answer("1", "ok", "pong")
    assert not fast.transport.disconnecting
    assert fast.logged == []
    assert fast.api.calls == [("ping", {})]


def test_argumentNotUTF8() -> None:
    """
    An argument that is not UTF-8 is refused with C{fail} and the reason.
    """
    fast, _ = both(SAMPLES[7])
    assert fast.transport.value() == answer("7", "fail", "argument 'name' is not valid UTF-8")
    assert fast.logged == []
    assert fast.api.calls == []


@pytest.mark.parametrize(
    "data",
    [
        box(_answer="c", status="ok", detail=""),
        box(_error="c", _error_code="X", _error_description="y"),
        box(_command="Ping", _ask="d", _answer="d"),
        b"\x00\x00",
    ],
)
def test_notACommand(data: bytes) -> None:
    """
    A box that is not a request (an answer or an error the daemon never
    asked for, an empty box) closes the connection with one warning, no
    traceback; what came before is answered, what comes after ignored.
    """
    fast, _ = both(PING + data + box(_command="Ping", _ask="e"))
    assert fast.raised is None
    assert fast.transport.disconnecting
    assert fast.transport.value() == answer("1", "ok", "pong")


def test_keyTooLong() -> None:
    """
    A key length over 255 drops the connection as soon as it is read, even
    before the key arrives.
    """
    fast, _ = both(PING + b"\x01\x00abc")
    assert fast.transport.disconnecting
    assert fast.transport.value() == answer("1", "ok", "pong")


def test_boxThatNeverEnds() -> None:
    """
    An unfinished box over L{MAX_PENDING_BOX} bytes (no admin request is
    that large) closes the connection, instead of being kept and parsed
    again at every read.
    """
    pair = b"\x00\x01k\xff\xff" + b"v" * 0xFFFF
    conn = Connection(AdminProtocol)
    conn.feed(PING + pair * 8)
    assert not conn.transport.disconnecting
    for _ in range(MAX_PENDING_BOX // len(pair)):
        conn.feed(pair)
    assert conn.transport.disconnecting
    assert conn.transport.value() == answer("1", "ok", "pong")


def test_paused() -> None:
    """
    A paused connection answers nothing until resumed, as Twisted's does.
    """
    conns = [Connection(p) for p in (AdminProtocol, Reference)]
    for c in conns:
        c.protocol.pauseProducing()
        c.feed(PING)
        assert c.transport.value() == b""
        c.protocol.resumeProducing()
        assert c.transport.value() == answer("1", "ok", "pong")


def test_commandTableReplaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A command removed from L{commands} is unknown, as to Twisted.
    """
    monkeypatch.delitem(commands, "Ping")
    fast, _ = both(PING)
    assert fast.transport.value() == error("1", "UNHANDLED", "Unhandled Command: b'Ping'")


# -- per-connection state --------------------------------------------------------


def test_ampStateOnlyWhenNeeded() -> None:
    """
    A connection answered on the fast path never builds AMP's state and
    ends quietly; one handed over to Twisted builds it and ends as AMP does.
    """
    fast = Connection(AdminProtocol).feed(PING)
    assert not fast.protocol._ampInitialized
    fast.protocol.connectionLost(Failure(ConnectionDone()))
    assert fast.protocol.transport is None

    slow = Connection(AdminProtocol).feed(SAMPLES[8])
    assert slow.protocol._ampInitialized
    assert slow.protocol.boxSender is slow.protocol
    slow.protocol.connectionLost(Failure(ConnectionDone()))
    assert slow.protocol._failAllReason is not None
    assert slow.protocol.transport is None


def test_fileDescriptorReceived() -> None:
    """
    A file descriptor sent by the peer is closed at once (no command takes
    one); the connection goes on.
    """
    conn = Connection(AdminProtocol)
    r, w = os.pipe()
    try:
        conn.protocol.fileDescriptorReceived(w)
        # Our only writer is gone: the reader sees the end of the pipe.
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
    conn.feed(PING)
    assert conn.transport.value() == answer("1", "ok", "pong")
    assert not conn.protocol._ampInitialized



def test_backlogStopsReading() -> None:
    """
    A connection that asks more than once gets a streaming producer on its
    transport that stops and restarts its reading: the transport pauses it
    while the answers are not read. One that asks once (the command line)
    gets none.
    """
    once = Connection(AdminProtocol).feed(PING)
    assert once.transport.producer is None
    conn = Connection(AdminProtocol).feed(PING + PING + PING)
    assert conn.transport.value() == answer("1", "ok", "pong") * 3
    producer = conn.transport.producer
    assert producer is not None and conn.transport.streaming
    producer.pauseProducing()
    assert conn.transport.producerState == "paused"
    producer.resumeProducing()
    assert conn.transport.producerState == "producing"
    slow = Connection(AdminProtocol).feed(SAMPLES[8])
    assert slow.transport.producer is not None


def _connected(factory: AdminFactory) -> tuple[AdminProtocol, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_drainAnswersThenCloses() -> None:
    """
    A stopping daemon's admin connections: an idle one is closed at once,
    one waiting for an answer gets it and is closed after, whatever arrives
    meanwhile is not read; the drain fires when all are closed.
    """
    api = API()
    factory = AdminFactory(api, "")
    idle, idle_transport = _connected(factory)
    busy, busy_transport = _connected(factory)
    busy.dataReceived(box(_command="Status", _ask="s"))
    assert factory.connections == {idle, busy}
    drained = factory.drain(Clock())
    assert idle_transport.disconnecting and not busy_transport.disconnecting
    busy.dataReceived(PING)
    assert busy_transport.value() == b""
    api.later[0].callback(("ok", "up"))
    assert busy_transport.value() == answer("s", "ok", "up")
    assert busy_transport.disconnecting
    assert api.calls == [("status", {})]
    fired: list[object] = []
    drained.addCallback(fired.append)
    idle.connectionLost(Failure(ConnectionDone()))
    assert fired == []
    busy.connectionLost(Failure(ConnectionDone()))
    assert fired == [None]
    assert factory.connections == set()


def test_drainCutsAfterTimeout() -> None:
    """
    A request that is still not answered after the timeout: its
    connection is cut.
    """
    api = API()
    factory = AdminFactory(api, "")
    busy, transport = _connected(factory)
    busy.dataReceived(box(_command="Status", _ask="s"))
    clock = Clock()
    drained = factory.drain(clock, timeout=10)
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    busy.connectionLost(Failure(ConnectionDone()))
    assert drained.called
    assert factory.drain(clock).called

def test_factorySharesMethods() -> None:
    """
    The connections of one L{AdminFactory} look the API's methods up once.
    """
    api = API()
    factory = AdminFactory(api, tempfile.gettempdir())
    for _ in range(2):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(PING)
        assert transport.value() == answer("1", "ok", "pong")
    assert factory._methods == {b"Ping": api.ping}
    assert api.calls == [("ping", {})] * 2


class AttachingAPI(API):
    """
    An L{API} whose C{attach_message} (marked L{cancelled_on_hang_up})
    answers later and records its cancellation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[str] = []
        self.attaching: list[Deferred[tuple[str, str]]] = []

    @cancelled_on_hang_up
    def attach_message(self, msg_id: str, pathname: str) -> Deferred[tuple[str, str]]:
        self.calls.append(("attach_message", {"msg_id": msg_id, "pathname": pathname}))
        d: Deferred[tuple[str, str]] = Deferred(lambda d: self.cancelled.append(msg_id))
        self.attaching.append(d)
        return d


@pytest.mark.parametrize("path", ["fast", "twisted"])
def test_hangUpCancelsMarkedRequestsOnly(path: str) -> None:
    """
    A connection lost before its requests are answered cancels those of
    methods marked L{cancelled_on_hang_up} (quietly: nothing written,
    nothing logged), on either parsing path; the others run on.
    """
    conn = Connection(AdminProtocol, AttachingAPI())
    first = box(_command="Nope", _ask="0") if path == "twisted" else b""
    conn.feed(first + box(_command="AttachMessage", _ask="1", msg_id="m1", pathname="/f") + box(_command="Status", _ask="2"))
    assert [name for name, _ in conn.api.calls] == ["attach_message", "status"]
    written = conn.transport.value()
    globalLogPublisher.addObserver(conn._observe)
    try:
        conn.protocol.connectionLost(Failure(ConnectionDone()))
    finally:
        globalLogPublisher.removeObserver(conn._observe)
    assert conn.api.cancelled == ["m1"]
    status = conn.api.later[0]
    assert not status.called
    conn.fire(("ok", "up"))
    assert conn.transport.value() == written
    assert conn.logged == []
    assert conn.protocol._inflight == 0


def test_answeredRequestIsNotCancelled() -> None:
    """
    A marked request answered before the connection is lost is not
    cancelled afterwards.
    """
    conn = Connection(AdminProtocol, AttachingAPI())
    conn.feed(box(_command="AttachMessage", _ask="1", msg_id="m1", pathname="/f"))
    [request] = conn.api.attaching
    request.callback(("ok", "md5-Attached successfully"))
    assert conn.transport.value() == answer("1", "ok", "md5-Attached successfully")
    conn.protocol.connectionLost(Failure(ConnectionDone()))
    assert conn.api.cancelled == []


def test_attachAbandonedWhenItsClientGoesAway(tmp_path) -> None:
    """
    Through the real API: an C{AttachMessage} whose connection is lost
    while the file is still copied in a thread attaches nothing, leaves no
    staging file and answers nobody.
    """
    threads = HeldThreads()
    instance, spawner, clock = instance_for(str(tmp_path / "root"), run_in_thread=threads)
    instance.create_queue({"name": "q", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    full = result_of(instance.create_message({"dest": "q"}, "prep"))
    source = tmp_path / "payload"
    source.write_bytes(b"x" * 1000)
    conn = Connection(AdminProtocol, AdminAPI(instance), str(tmp_path / "spill"))  # type: ignore[arg-type]
    conn.feed(box(_command="AttachMessage", _ask="1", msg_id=full, pathname=str(source)))
    assert threads.calls and conn.transport.value() == b""
    conn.protocol.connectionLost(Failure(ConnectionDone()))
    threads.run()
    queue = instance.queue("q")
    msg_id = full.rsplit("/", 1)[1]
    assert queue.store.attachments("prep", msg_id) == {}
    assert [n for n in os.listdir(queue.store.state_dir("tmp")) if n != "partial"] == []
    assert conn.transport.value() == b""
    assert queue.locate(msg_id) == "prep"


def test_connectionsOverTheCapAreTurnedAway() -> None:
    """
    With C{maxConnections} open, a new connection is told why in one AMP
    error box (code C{BUSY}, answering no request), closed at once and
    never read or counted; one closing makes room again.
    """
    factory = AdminFactory(API(), "", Clock(), maxConnections=2)
    first, _ = _connected(factory)
    second, _ = _connected(factory)
    turned = factory.buildProtocol(None)
    assert isinstance(turned, TurnedAway)
    transport = StringTransport()
    turned.makeConnection(transport)
    assert transport.disconnecting
    [notice] = BoxDecoder().feed(transport.value())
    assert turned_away(notice) == "too many admin connections open (2); try again later"
    assert notice[b"_error"] == b"" and notice[b"_error_code"] == b"BUSY"
    turned.dataReceived(PING)
    assert factory.api.calls == []
    assert factory.connections == {first, second}
    first.connectionLost(Failure(ConnectionDone()))
    assert isinstance(factory.buildProtocol(None), AdminProtocol)


def test_turnedAwayWarningIsRateLimited() -> None:
    """
    A flood of connections turned away logs one warning, then at most one
    every L{TURNED_AWAY_WARNING_INTERVAL} seconds, counting those turned
    away since the last one.
    """
    clock = Clock()
    factory = AdminFactory(API(), "", clock, maxConnections=1)
    _connected(factory)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(1000):
            factory.buildProtocol(None)
        clock.advance(TURNED_AWAY_WARNING_INTERVAL - 1)
        factory.buildProtocol(None)
        warned = [e for e in events if e.get("log_namespace") == "rqtwisted.admin"]
        assert [(e["count"], e["open"]) for e in warned] == [(1, 1)]
        clock.advance(1)
        factory.buildProtocol(None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warned = [e for e in events if e.get("log_namespace") == "rqtwisted.admin"]
    assert [e["count"] for e in warned] == [1, 1001]
    assert all(e["log_level"].name == "warn" for e in warned)
