"""
Tests for L{rqtwisted.relay} and its modules (L{rqtwisted.relaywire},
L{rqtwisted.relayhttp}, L{rqtwisted.relaypeers}, L{rqtwisted.relaybodies}):
the wire steps as pure functions, and whole deliveries from one in-memory
instance to another through the in-memory HTTP agent of C{treq.testing}
(what C{StubTreq} runs on), with a L{Clock}.

The far side is L{OriginalRQ}: a small klein resource over a second
L{Instance} that answers exactly as an original RQ host does (prep, attach
multipart, commit, state.json), optionally with the resumable C{PUT} of
rqtwisted hosts, and with injectable faults.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from urllib.parse import parse_qs

import multipart
import pytest
from klein import Klein
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock, Cooperator
from twisted.web.http_headers import Headers

from rqtwisted import builtin
from rqtwisted.builtin import register_handler
from rqtwisted.message import creation_fields, MessageError
from rqtwisted.relay import Relayer, attachment_files
from rqtwisted.relaywire import (
    LOOP_REASON,
    RelayConfig,
    SoftFailure,
    backoff,
    check_attached,
    commit_request,
    parse_answer,
    parse_attached,
    parse_held,
    parse_prep,
    parse_state,
    prep_fields,
    prep_request,
    same_host,
)
from rqtwisted.store import md5_file
from rqtwisted.testing import instance_for

FAR = "http://farhost:3333/q/inbox"


# -- the far side


class OriginalRQ:
    """
    The relay-facing routes of an RQ host, over an in-memory instance.

    @ivar log: C{(method, path)} of every request.
    @ivar faults: C{(step, kind)} consumed by the first matching request;
        steps C{prep}, C{attach}, C{put}, C{commit}, C{state}; kinds C{500},
        C{garbage}, C{md5}, C{hang}, C{drop} (close without answer),
        C{lost} (do it, then close without answer), C{fail:<text>},
        C{drip} (do it, then send the answer a byte every 20 s),
        C{page:<code>} (an HTML error page with that code, as a server in
        between sends).
    @ivar resumable: answer C{PUT} like rqtwisted (else 500, like the
        original).
    """

    app = Klein()

    def __init__(self, instance) -> None:
        self.instance = instance
        self.log: list[tuple[str, str]] = []
        self.bodies: dict[str, list[bytes]] = {}
        self.headers: list[Headers] = []
        self.faults: list[tuple[str, str]] = []
        self.resumable = False
        self.flip_put = False
        self.partial: dict[tuple[str, str], bytearray] = {}

    def _fault(self, step, request):
        for i, (s, kind) in enumerate(self.faults):
            if s == step:
                del self.faults[i]
                return kind
        return None

    def _answer(self, request, kind, ok_value, run=None):
        """
        Apply a fault or run the step; the JSON answer.
        """
        if kind == "500":
            request.setResponseCode(500)
            return b"500 - boom"
        if kind == "garbage":
            return b"<html>not json</html>"
        if kind == "hang":
            return Deferred()
        if kind == "stall":
            request.setHeader("content-length", "100")
            request.write(b'["ok",')
            return Deferred()
        if kind == "huge":
            return b"[" * 100_000
        if kind == "drop":
            request.channel.transport.abortConnection()
            return Deferred()
        if kind and kind.startswith("page:"):
            request.setResponseCode(int(kind[5:]))
            request.setHeader("content-type", "text/html")
            return f"<html><body><h1>Error {kind[5:]}</h1></body></html>".encode()
        if kind and kind.startswith("json:"):
            code, reason = kind[5:].split(":", 1)
            request.setResponseCode(int(code))
            return json.dumps(["fail", reason]).encode()
        if kind and kind.startswith("fail:"):
            return json.dumps(["fail", kind[5:]]).encode()
        # A step refused at once (MessageError) is answered like a failed one.
        d = maybeDeferred(run) if run is not None else succeed(ok_value)

        def answered(value):
            if kind == "drip":
                data = json.dumps(["ok", value]).encode()
                request.setHeader("content-length", str(len(data)))
                finished = Deferred()

                def drip(rest):
                    request.write(rest[:1])
                    if rest[1:]:
                        self.instance.clock.callLater(20, drip, rest[1:])
                    else:
                        finished.callback(b"")

                drip(data)
                return finished
            if kind == "lost":
                request.channel.transport.abortConnection()
                return Deferred()
            if kind == "md5":
                value = "0" * 32 + "-Attached successfully"
            return json.dumps(["ok", value]).encode()

        def refused(f):
            f.trap(MessageError)
            return json.dumps(["fail", f.value.reason]).encode()

        return d.addCallbacks(answered, refused)

    def _record(self, request, step):
        self.log.append((step, request.path.decode()))
        self.headers.append(request.requestHeaders)
        body = request.content.read()
        request.content.seek(0)
        self.bodies.setdefault(step, []).append(body)
        return body

    @app.route("/q/<name>/new_message", methods=["POST"])
    def new_message(self, request, name):
        body = self._record(request, "prep")
        kind = self._fault("prep", request)
        form = parse_qs(body.decode())
        mesg = json.loads(form["mesg"][0])
        method = mesg.pop("_method", "commit")
        return self._answer(
            request, kind, None, lambda: self.instance.queue(name).create(creation_fields(mesg), method)
        )

    @app.route("/q/<name>/<msg_id>/attach/new", methods=["POST"])
    def attach(self, request, name, msg_id):
        body = self._record(request, "attach")
        kind = self._fault("attach", request)
        ctype = request.getHeader("content-type")
        boundary = multipart.parse_options_header(ctype)[1]["boundary"]
        fields = {}
        for part in multipart.MultipartParser(io.BytesIO(body), boundary):
            fields[part.name] = part
        part = fields["filedata"]
        path = os.path.join(self.instance.root.path, "tmp", f"upload-{part.filename}")
        data = part.raw
        if kind == "corrupt":
            # Damaged on the way: the far side stores and sums other bytes.
            kind, data = None, bytes([data[0] ^ 1]) + data[1:]
        with open(path, "wb") as f:
            f.write(data)
        assert fields["pathname"].value == part.filename
        assert fields["msg_id"].value == msg_id
        assert fields["x_format"].value == "json"
        return self._answer(request, kind, None, lambda: self.instance.queue(name).attach(msg_id, path, part.filename))

    @app.route("/q/<name>/<msg_id>/attach/<att>", methods=["PUT"])
    def put(self, request, name, msg_id, att):
        body = self._record(request, "put")
        kind = self._fault("put", request)
        if not self.resumable:
            request.setResponseCode(500)
            return b"500 - Internal Server Error"
        if kind is not None:
            return self._answer(request, kind, None)
        queue = self.instance.queue(name)
        if msg_id not in queue.prep:
            request.setResponseCode(404)
            return json.dumps(["fail", "cannot find message"]).encode()
        crange = request.getHeader("content-range")
        spec, total = crange.split(" ", 1)[1].split("/")
        total = int(total)
        held = self.partial.setdefault((msg_id, att), bytearray())
        if spec != "*":
            start = int(spec.split("-")[0])
            assert start == len(held), (start, len(held))
            if self.flip_put and body:
                self.flip_put = False
                body = bytes([body[0] ^ 1]) + body[1:]
            held.extend(body)
        if len(held) < total:
            request.setResponseCode(308)
            if held:
                request.setHeader("range", f"bytes=0-{len(held) - 1}")
            return json.dumps(["partial", str(len(held))]).encode()
        md5 = hashlib.md5(held).hexdigest()
        if request.getHeader("x-rq-md5") not in (None, md5):
            del self.partial[(msg_id, att)]
            request.setResponseCode(422)
            return json.dumps(["fail", "md5 mismatch"]).encode()
        path = os.path.join(self.instance.root.path, "tmp", f"put-{att}")
        with open(path, "wb") as f:
            f.write(held)
        return self._answer(request, None, None, lambda: queue.attach(msg_id, path, att))

    @app.route("/q/<name>/<msg_id>", methods=["POST"])
    def commit(self, request, name, msg_id):
        form = parse_qs(request.content.read().decode())
        request.content.seek(0)
        method = form["_method"][0]
        assert method in ("commit", "delete")
        self._record(request, method)
        kind = self._fault(method, request)
        assert form["x_format"] == ["json"]
        assert form["msg_id"] == [msg_id]
        return self._answer(request, kind, None, lambda: getattr(self.instance.queue(name), method)(msg_id))

    def _lookup(self, request, step, look):
        """
        A GET step: a fault, else C{look()} as JSON (404 for an unknown message).
        """
        self._record(request, step)
        kind = self._fault(step, request)
        if kind is not None:
            return self._answer(request, kind, None)
        try:
            value = look()
        except MessageError:
            request.setResponseCode(404)
            return b"Not Found"
        return json.dumps(value).encode()

    @app.route("/q/<name>/<msg_id>.json", methods=["GET"])
    def read_form(self, request, name, msg_id):
        return self._lookup(request, "json", lambda: self.instance.queue(name).get(msg_id))

    @app.route("/q/<name>/<msg_id>/state.json", methods=["GET"])
    def state(self, request, name, msg_id):
        return self._lookup(request, "state", lambda: [self.instance.queue(name).locate(msg_id)])


# -- fixtures


def md5s(files):
    """
    Name -> md5 of C{(name, data)} pairs.
    """
    return {n: hashlib.md5(d).hexdigest() for n, d in files}


class World:
    """
    A sending instance whose relay queue runs L{Relayer} in-process, and a
    far instance behind L{OriginalRQ}.
    """

    def __init__(self, tmp_path, monkeypatch, **config):
        monkeypatch.setattr(builtin, "HANDLERS", dict(builtin.HANDLERS))
        self.clock = Clock()
        self.far, self.far_spawner, _ = instance_for(str(tmp_path / "far"), clock=self.clock, host="farhost")
        self.far.create_queue({"name": "inbox", "script": "./code/noop", "exec_prefix": ""})
        self.far.startService()
        self.peer = OriginalRQ(self.far)
        self.agent = RequestTraversalAgent(self.peer.app.resource())
        self.near, self.spawner, _ = instance_for(str(tmp_path / "near"), clock=self.clock)
        self.near.create_queue({"name": "local", "script": "./code/noop", "exec_prefix": ""})
        cooperator = Cooperator(scheduler=lambda f: self.clock.callLater(0, f))
        config.setdefault("retry_base", 10)
        config.setdefault("idle_timeout", 30)
        self.relayer = Relayer(
            self.near,
            HTTPClient(self.agent),
            self.clock,
            cooperator,
            lambda path: succeed(md5_file(path)),
            RelayConfig(**config),
            rand=lambda: 0.0,
        )
        register_handler("relay", lambda inst: self.relayer.handle)
        self.near.startService()

    def settle(self, rounds=60):
        for _ in range(rounds):
            self.agent.flush()
            self.clock.advance(0)

    def send(self, dest=FAR, attachments=(), **fields):
        fields["dest"] = dest
        if not attachments:
            full = self.near.create_message(fields, "commit", relay_ok=True)
            return self._result(full).rsplit("/", 1)[1]
        relay = self.near.queue("relay")
        msg_id = self._result(relay.create(creation_fields(fields), "prep")).rsplit("/", 1)[1]
        for name, data in attachments:
            path = os.path.join(self.near.root.path, "tmp", name)
            with open(path, "wb") as f:
                f.write(data)
            self._result(relay.attach(msg_id, path, name))
        self._result(relay.commit(msg_id))
        return msg_id

    @staticmethod
    def _result(d):
        out = []
        d.addBoth(out.append)
        assert out, "not fired"
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    @property
    def relay(self):
        return self.near.queue("relay")

    def state(self, msg_id):
        return self.relay.locate(msg_id)

    def status(self, msg_id):
        return self.relay.get_status(msg_id)["status"]

    def far_messages(self):
        inbox = self.far.queue("inbox")
        return {s: inbox.messages(s) for s in ("prep", "que", "run", "done")}

    def committed(self):
        m = self.far_messages()
        return m["que"] + m["run"] + m["done"]

    def retry(self, msg_id):
        """
        Let the retry of a resent message come due, and run it.
        """
        due = self.relay.que[msg_id]["due"]
        self.clock.advance(max(0, due - self.clock.seconds()))
        self.settle()

    def steps(self):
        return [s for s, _ in self.peer.log]

    def job_file(self, state, msg_id, name):
        """
        The path of C{job/<name>} of a relay message in C{state}.
        """
        return os.path.join(self.relay.store.msg_dir(state, msg_id), "job", name)

    def relay_id(self, state, msg_id):
        """
        The remote id recorded in C{job/relay_id}, or None.
        """
        path = self.job_file(state, msg_id, "relay_id")
        return open(path).read() if os.path.exists(path) else None

    def set_relay_id(self, msg_id, remote):
        """
        Record C{remote} as the relay_id of a running message (an earlier life's).
        """
        path = self.job_file("run", msg_id, "relay_id")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(remote)

    def job_log(self, msg_id):
        """
        The stdio.log of a relayed message.
        """
        return open(self.job_file("relayed", msg_id, "stdio.log")).read()

    def far_md5s(self, remote):
        """
        Attachment name -> md5 of a far message.
        """
        return {n: a["md5"] for n, a in self.far.queue("inbox").get(remote)["_attachments"].items()}


@pytest.fixture
def world(tmp_path, monkeypatch):
    return World(tmp_path, monkeypatch)


# -- pure steps


def test_prep_request_exact():
    msg = {
        "msg_id": "x",
        "dest": FAR + "/",
        "src": "me",
        "count": 2,
        "max_count": 15,
        "param1": "a b",
        "orig_msg_id": "http://near:3333/q/relay/1",
        "force_remote": True,
        "due": 5,
    }
    url, body = prep_request(msg)
    assert url == FAR + "/new_message"
    form = parse_qs(body.decode(), keep_blank_values=True)
    assert form["x_format"] == ["json"]
    mesg = json.loads(form["mesg"][0])
    assert mesg == {
        "dest": FAR + "/",
        "src": "me",
        "count": 3,
        "max_count": 15,
        "param1": "a b",
        "orig_msg_id": "http://near:3333/q/relay/1",
        "_method": "prep",
    }
    assert body.startswith(b"x_format=json&mesg=")


def test_prep_fields_count_default():
    assert prep_fields({"dest": FAR})["count"] == 1
    assert prep_fields({"dest": FAR, "count": "bad"})["count"] == 1


def test_commit_request():
    url, body = commit_request(FAR + "/20200101.0000.00.000.1")
    assert url == FAR + "/20200101.0000.00.000.1"
    assert parse_qs(body.decode()) == {
        "msg_id": ["20200101.0000.00.000.1"],
        "_method": ["commit"],
        "x_format": ["json"],
    }


@pytest.mark.parametrize(
    "code, body, error",
    [
        (500, b'["ok","x"]', "prep failed - HTTP 500"),
        (200, b"<html>", "prep failed - garbage answer"),
        (200, b'{"ok": 1}', "prep failed - garbage answer"),
        (200, b'["ok"]', "prep failed - garbage answer"),
        (200, b'["fail","status: DOWN"]', "prep failed - status: DOWN"),
        (200, b'["ok","not an id"]', "prep failed - garbage answer"),
        (200, b"\xff\xfe", "prep failed - garbage answer"),
    ],
)
def test_parse_prep_refuses(code, body, error):
    with pytest.raises(SoftFailure) as e:
        parse_prep(code, body, FAR)
    assert e.value.reason == error


def test_parse_prep_ok():
    assert parse_prep(200, b'["ok","http://farhost:3333/q/inbox/1.2"]', FAR) == "http://farhost:3333/q/inbox/1.2"


def test_check_attached():
    check_attached(200, b'["ok","abc-Attached successfully"]', "abc", "f")
    with pytest.raises(SoftFailure, match="md5 mismatch"):
        check_attached(200, b'["ok","abd-Attached successfully"]', "abc", "f")
    with pytest.raises(SoftFailure, match="cannot find message") as e:
        check_attached(200, b'["fail","cannot find message"]', "abc", "f")
    assert type(e.value).__name__ == "RemoteLost"


def test_parse_state():
    assert parse_state(200, b'["que"]') == "que"
    assert parse_state(404, b"Not Found") is None
    with pytest.raises(SoftFailure):
        parse_state(503, b"")
    with pytest.raises(SoftFailure):
        parse_state(200, b"[]")


def test_parse_attached():
    body = json.dumps({"msg_id": "1", "_attachments": {"a": {"md5": "x", "size": 1}, "b": {"size": 2}}}).encode()
    assert parse_attached(200, body) == {"a": "x"}
    assert parse_attached(200, b'{"msg_id": "1"}') == {}
    assert parse_attached(200, b"<html>") == {}
    assert parse_attached(200, b"[1]") == {}
    assert parse_attached(404, body) == {}


def test_parse_held():
    h = Headers()
    assert parse_held(200, h, b"", 10) == 10
    assert parse_held(308, h, b"", 10) == 0
    assert parse_held(500, h, b"", 10) is None
    assert parse_held(405, h, b"", 10) is None
    h.setRawHeaders("range", ["bytes=0-3"])
    assert parse_held(308, h, b"", 10) == 4
    with pytest.raises(SoftFailure):
        parse_held(308, h, b"", 3)
    h.setRawHeaders("range", ["lines=1-2"])
    with pytest.raises(SoftFailure):
        parse_held(308, h, b"", 10)


def test_parse_answer_needs_pair():
    assert parse_answer(200, b'["ok","x",1]', "s") == ("ok", "x")


def test_backoff_exponential_jitter_cap():
    assert [backoff(c, 10, 600, lambda: 0.999999) for c in range(8)] == [9, 19, 39, 79, 159, 319, 599, 599]
    assert [backoff(c, 10, 600, lambda: 0.0) for c in range(3)] == [5, 10, 20]
    assert backoff(100, 10, 600, lambda: 0.5) == 450
    assert backoff(0, 0, 600, lambda: 0.5) == 1


def test_same_host():
    assert same_host("http://h:3333/q/x", "http://h:3333/")
    assert same_host("http://h:3333/q/x/", "http://h:3333/")
    assert not same_host("http://h:3334/q/x", "http://h:3333/")
    assert not same_host("http://h:3333/other/q/x", "http://h:3333/")
    # A longer path is what HTTP would not find: not taken as a local queue.
    assert not same_host("http://h:3333/q/x/y", "http://h:3333/")


def test_relay_config_from_settings():
    config = RelayConfig.fromSettings(
        {"relay": {"retry_base": "2", "idle_timeout": -1, "resumable_min": "x", "min_upload_rate": "2048"}}
    )
    assert config.min_upload_rate == 2048
    assert config.upload_rate_window == RelayConfig().upload_rate_window
    assert config.retry_base == 2.0
    assert config.idle_timeout == RelayConfig().idle_timeout
    assert config.resumable_min == RelayConfig().resumable_min
    assert RelayConfig.fromSettings({}) == RelayConfig()


# -- deliveries


def test_plain_message(world):
    msg_id = world.send(src="tester", param1="p1", param4="p4")
    world.settle()
    assert world.state(msg_id) == "relayed"
    [remote] = world.committed()
    remote_id = f"{FAR}/{remote}"
    assert world.status(msg_id) == f"relayed - {remote_id}"
    assert world.steps() == ["prep", "commit"]
    far = world.far.queue("inbox").get(remote)
    assert far["count"] == 1
    assert far["src"] == "tester" and far["param1"] == "p1" and far["param4"] == "p4"
    assert far["dest"] == FAR
    assert far["orig_msg_id"] == world.relay.full_id(msg_id)
    assert world.relay_id("relayed", msg_id) is None
    log = world.job_log(msg_id)
    assert f"dest - {FAR}" in log and f"attempting remote {FAR}" in log


def test_attachments_multipart(world):
    files = [("a.txt", b"alpha"), ("b.bin", os.urandom(200_000)), ("c", b"")]
    msg_id = world.send(attachments=files)
    world.settle()
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    assert world.steps() == ["prep", "attach", "attach", "attach", "commit"]
    [remote] = world.committed()
    assert world.far_md5s(remote) == md5s(files)


def test_attachments_named_tmp_are_relayed(world):
    """
    An attachment whose name ends in C{.tmp} is relayed like any other (it
    was left out while the message was reported relayed).
    """
    files = [("data.tmp", b"one"), ("data", b"two")]
    msg_id = world.send(attachments=files)
    world.settle()
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    [remote] = world.committed()
    assert world.far_md5s(remote) == md5s(files)


def test_attachment_files_lists_what_the_read_form_lists(tmp_path):
    """
    The relay sends every attachment the message's read form lists: every
    regular file whose name does not start with a dot.
    """
    adir = tmp_path / "attach"
    adir.mkdir()
    for name in ("b.tmp", ".hidden", "a"):
        (adir / name).write_bytes(b"x")
    (adir / "sub").mkdir()
    assert attachment_files(str(tmp_path)) == [("a", str(adir / "a")), ("b.tmp", str(adir / "b.tmp"))]


def test_resumable_upload(tmp_path, monkeypatch):
    world = World(tmp_path, monkeypatch, resumable_min=1)
    world.peer.resumable = True
    data = os.urandom(300_000)
    msg_id = world.send(attachments=[("big", data), ("empty", b"")])
    world.settle()
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    # big: probe + upload; empty stays multipart (below resumable_min).
    assert world.steps() == ["prep", "put", "put", "attach", "commit"]
    probe, upload = world.peer.headers[1], world.peer.headers[2]
    assert probe.getRawHeaders("content-range") == ["bytes */300000"]
    assert upload.getRawHeaders("content-range") == ["bytes 0-299999/300000"]
    assert upload.getRawHeaders("x-rq-md5") == [hashlib.md5(data).hexdigest()]
    [remote] = world.committed()
    assert world.far_md5s(remote)["big"] == hashlib.md5(data).hexdigest()


def test_resumable_upload_resumes(tmp_path, monkeypatch):
    """
    An upload cut short is resumed where the remote stopped: the retry
    reuses the prepared message and sends only the missing bytes.
    """
    world = World(tmp_path, monkeypatch, resumable_min=1)
    world.peer.resumable = True
    data = os.urandom(100_000)
    world.peer.faults = [("put", "drop")] * 2  # the probe and its resend are dropped
    msg_id = world.send(attachments=[("big", data)])
    world.settle()
    assert world.state(msg_id) == "que"
    [prepped] = world.far_messages()["prep"]
    world.peer.partial[(prepped, "big")] = bytearray(data[:40_000])
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    assert world.steps() == ["prep", "put", "put", "state", "json", "put", "put", "commit"]
    assert world.peer.headers[-2].getRawHeaders("content-range") == ["bytes 40000-99999/100000"]
    assert world.peer.bodies["put"][-1] == data[40_000:]
    assert world.committed() == [prepped]


def test_original_peer_gets_multipart(tmp_path, monkeypatch):
    """
    A peer that refuses PUT (an original RQ host) gets multipart uploads,
    and is not probed again for a while.
    """
    world = World(tmp_path, monkeypatch, resumable_min=1)
    data = os.urandom(5000)
    first = world.send(attachments=[("x", data)])
    world.settle()
    second = world.send(attachments=[("y", data)])
    world.settle()
    assert world.state(first) == world.state(second) == "relayed"
    assert world.steps() == ["prep", "put", "attach", "commit", "prep", "attach", "commit"]


def test_resumable_refusal_is_not_an_original_peer(tmp_path, monkeypatch):
    """
    A JSON refusal of the probe (another upload in progress) is a soft
    failure, not a sign of an original host: the retry probes again.
    """
    world = World(tmp_path, monkeypatch, resumable_min=1)
    world.peer.resumable = True
    world.peer.faults = [("put", "json:409:another upload of this attachment is in progress")]
    msg_id = world.send(attachments=[("f", b"0123456789")])
    world.settle()
    assert world.state(msg_id) == "que"
    assert "attach f failed - HTTP 409 another upload" in world.status(msg_id)
    assert not world.relayer.lacks_resume("http://farhost:3333")
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert world.steps() == ["prep", "put", "state", "json", "put", "put", "commit"]


@pytest.mark.parametrize("code", [502, 503, 504])
def test_resumable_probe_error_page_in_between_keeps_resume(tmp_path, monkeypatch, code):
    """
    An error page from something in between (a reverse proxy's 502 while
    the peer restarts) answering the probe is not an original host: the
    attempt fails softly, the peer is not remembered as lacking resumable
    uploads, and the retry resumes the upload where the remote stopped.
    """
    world = World(tmp_path, monkeypatch, resumable_min=1)
    world.peer.resumable = True
    world.peer.faults = [("put", f"page:{code}")]
    data = os.urandom(100_000)
    msg_id = world.send(attachments=[("big", data)])
    world.settle()
    assert world.state(msg_id) == "que", world.status(msg_id)
    assert world.status(msg_id).endswith(f"-attach big failed - HTTP {code}")
    assert not world.relayer.lacks_resume("http://farhost:3333")
    [prepped] = world.far_messages()["prep"]
    world.peer.partial[(prepped, "big")] = bytearray(data[:40_000])
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    assert world.steps() == ["prep", "put", "state", "json", "put", "put", "commit"]
    assert world.peer.headers[-2].getRawHeaders("content-range") == ["bytes 40000-99999/100000"]
    assert world.committed() == [prepped]
    assert world.far_md5s(prepped)["big"] == hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("code", [404, 405, 500, 501])
def test_resumable_probe_answers_of_a_peer_without_put(tmp_path, monkeypatch, code):
    """
    A non-JSON 404 or 500 (what an original host answers a PUT), 405 or 501
    shows a peer without resumable uploads: multipart at once, and
    remembered as such.
    """
    world = World(tmp_path, monkeypatch, resumable_min=1)
    world.peer.resumable = True
    world.peer.faults = [("put", f"page:{code}")]
    msg_id = world.send(attachments=[("big", os.urandom(5000))])
    world.settle()
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    assert world.steps() == ["prep", "put", "attach", "commit"]
    assert world.relayer.lacks_resume("http://farhost:3333")


@pytest.mark.parametrize(
    "resumable, fault, steps",
    [
        (True, ("put", "json:404:cannot find message"), ["prep", "put", "prep", "put", "put", "commit"]),
        (False, ("attach", "fail:cannot find message"), ["prep", "attach", "prep", "attach", "commit"]),
    ],
    ids=["resumable-probe", "multipart"],
)
def test_cannot_find_message_preps_again(tmp_path, monkeypatch, resumable, fault, steps):
    """
    A remote that lost the prepared message: the relay_id is dropped and the
    retry prepares a new one.
    """
    world = World(tmp_path, monkeypatch, **({"resumable_min": 1} if resumable else {}))
    world.peer.resumable = resumable
    world.peer.faults = [fault]
    msg_id = world.send(attachments=[("f", b"0123456789")])
    world.settle()
    assert world.state(msg_id) == "que"
    assert world.relay_id("que", msg_id) is None
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert world.steps() == steps


def test_resumable_md5_mismatch_starts_again(tmp_path, monkeypatch):
    """
    Bytes damaged on the way: the remote refuses the finished file (422),
    nothing is committed, and the retry uploads it all again.
    """
    world = World(tmp_path, monkeypatch, resumable_min=1)
    world.peer.resumable = True
    world.peer.flip_put = True
    data = os.urandom(50_000)
    msg_id = world.send(attachments=[("f", data)])
    world.settle()
    assert world.state(msg_id) == "que"
    assert "attach f failed - HTTP 422 md5 mismatch" in world.status(msg_id)
    assert world.committed() == []
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    [remote] = world.committed()
    assert world.far_md5s(remote)["f"] == hashlib.md5(data).hexdigest()
    assert world.peer.headers[-2].getRawHeaders("content-range") == ["bytes 0-49999/50000"]


@pytest.mark.parametrize(
    "fault, reason",
    [
        (("prep", "500"), "prep failed - HTTP 500"),
        (("prep", "garbage"), "prep failed - garbage answer"),
        (("prep", "fail:status: DOWN"), "prep failed - status: DOWN"),
        (("prep", "hang"), "timed out after 30s idle"),
        (("prep", "drop"), "connection lost"),
    ],
)
def test_prep_failures_retry(world, fault, reason):
    # A dropped connection is sent again at once: drop that one too.
    world.peer.faults = [fault] * (2 if fault[1] == "drop" else 1)
    msg_id = world.send()
    world.settle()
    if fault[1] == "hang":
        world.clock.advance(30)
        world.settle()
    assert world.state(msg_id) == "que"
    msg = world.relay.get(msg_id)
    assert msg["count"] == 1
    assert msg["status"].startswith("que - 5-")  # backoff(0, 10, ...) with no jitter
    assert reason in msg["status"]
    assert world.committed() == []
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert len(world.committed()) == 1


@pytest.mark.parametrize(
    "fault, reason",
    [
        (("commit", "stall"), "answer not complete within 30s"),
        (("commit", "huge"), "answer too long"),
        (("commit", "hang"), "timed out after 30s idle"),
        (("commit", "json:503:status: DOWN"), "commit failed - HTTP 503 status: DOWN"),
    ],
)
def test_bad_answers_to_commit(world, fault, reason):
    """
    A peer that stalls mid-answer, answers too much, or refuses: retried,
    and the state check of the retry finds what really happened.
    """
    world.peer.faults = [fault]
    msg_id = world.send()
    world.settle()
    if fault[1] in ("stall", "hang"):
        assert world.state(msg_id) == "run"
        world.clock.advance(30)
        world.settle()
    assert world.state(msg_id) == "que"
    assert reason in world.status(msg_id)
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert len(world.committed()) == 1


def test_dripping_answer_times_out(world):
    """
    An answer trickling in a byte at a time, each within the idle timeout,
    does not hold the relay (one worker for every peer): the whole answer
    must be in within idle_timeout of its headers.
    """
    world.peer.faults = [("prep", "drip")]
    msg_id = world.send()
    world.settle()
    assert world.state(msg_id) == "run", world.status(msg_id)
    world.clock.advance(20)  # a second byte: not idle
    world.settle()
    assert world.state(msg_id) == "run"
    world.clock.advance(10)
    world.settle()
    assert world.state(msg_id) == "que", world.status(msg_id)
    assert "prep failed" not in world.status(msg_id)
    assert "answer not complete within 30s" in world.status(msg_id)
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"


class _SlowReader:
    """
    An HTTP client that reads the body of a big upload (more than 64 KiB)
    as a peer on a very slow link does: one write of it every C{every}
    seconds, each one keeping the idle timeout away. Once it has the whole
    body it passes the request on to C{client}. Its requests, in order, in
    C{uploads} (the bytes read of each, as it goes).
    """

    def __init__(self, client, clock, every):
        self.client = client
        self.clock = clock
        self.every = every
        self.uploads = []

    def request(self, method, url, headers=None, data=None, **kwargs):
        length = getattr(data, "length", 0)
        if not isinstance(length, int) or length <= 64 * 1024:
            return self.client.request(method, url, headers=headers, data=data, **kwargs)
        consumer = _CongestedConsumer()
        self.uploads.append(consumer.data)
        timer = []

        def drain():
            timer.clear()
            consumer.drain()
            if not done.called:
                timer.append(self.clock.callLater(self.every, drain))

        def cancel(d):
            for call in timer:
                if call.active():
                    call.cancel()
            data.stopProducing()

        done = Deferred(cancel)
        consumer.registerProducer(data, True)

        def sent(_):
            for call in timer:
                if call.active():
                    call.cancel()
            from rqtwisted.relaybodies import BytesProducer

            # A producer writing at once (treq would read bytes with the
            # global cooperator, on the reactor that is not running here).
            body = BytesProducer(b"".join(consumer.data))
            forwarded = self.client.request(method, url, headers=headers, data=body, **kwargs)
            forwarded.chainDeferred(done)

        data.startProducing(consumer).addCallback(sent)
        timer.append(self.clock.callLater(self.every, drain))
        return done


def test_upload_slower_than_the_floor_fails(tmp_path, monkeypatch):
    """
    A peer that reads an upload very slowly but steadily (the idle timeout
    never fires) does not hold the relay's one worker: an upload moving
    fewer than min_upload_rate bytes a second over upload_rate_window
    seconds fails softly with the reason, and is retried.
    """
    world = World(tmp_path, monkeypatch, min_upload_rate=8192, upload_rate_window=60)
    slow = _SlowReader(world.relayer.http.client, world.clock, 25)
    world.relayer.http.client = slow
    data = os.urandom(1024 * 1024)
    msg_id = world.send(attachments=[("big", data)])
    world.settle()
    for _ in range(2):
        world.clock.advance(25)  # 64 KiB every 25 s: 2.6 KiB/s, never 30 s idle
        world.settle()
    assert world.state(msg_id) == "run", world.status(msg_id)
    world.clock.advance(10)  # 60 s after the first byte: 192 KiB moved, not 480
    world.settle()
    assert world.state(msg_id) == "que", world.status(msg_id)
    assert "upload slower than 8 KiB/s over 60s" in world.status(msg_id)
    assert len(b"".join(slow.uploads[0])) < len(data)
    assert world.committed() == []
    world.relayer.http.client = slow.client
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    [remote] = world.committed()
    assert world.far_md5s(remote)["big"] == hashlib.md5(data).hexdigest()


def test_slow_upload_above_the_floor_is_not_cut(world):
    """
    A slow but real link (2.6 KiB/s, above the default floor of 1 KiB/s
    over 60 s) gets its upload through, over several windows.
    """
    assert (world.relayer.config.min_upload_rate, world.relayer.config.upload_rate_window) == (1024, 60)
    slow = _SlowReader(world.relayer.http.client, world.clock, 25)
    world.relayer.http.client = slow
    data = os.urandom(600_000)
    msg_id = world.send(attachments=[("big", data)])
    world.settle()
    for _ in range(12):
        world.clock.advance(25)
        world.settle()
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    assert b"".join(slow.uploads[0]).count(data) == 1
    [remote] = world.committed()
    assert world.far_md5s(remote)["big"] == hashlib.md5(data).hexdigest()


def test_peer_never_accepts(tmp_path, monkeypatch):
    """
    A connection that never completes ends with the idle timeout.
    """
    from twisted.internet.testing import MemoryReactorClock
    from twisted.web.client import Agent

    world = World(tmp_path, monkeypatch)
    world.relayer.http.client = HTTPClient(Agent(MemoryReactorClock(), connectTimeout=5))
    msg_id = world.send()
    world.settle()
    assert world.state(msg_id) == "run"
    world.clock.advance(30)
    world.settle()
    assert world.state(msg_id) == "que"
    assert "timed out after 30s idle" in world.status(msg_id)


def test_wrong_md5_never_commits(world):
    """
    A wrong md5 is a soft failure; the retry reuses the prepared message,
    uploads again and commits once.
    """
    world.peer.faults = [("attach", "corrupt")]
    msg_id = world.send(attachments=[("f", b"data")])
    world.settle()
    assert world.state(msg_id) == "que"
    assert "md5 mismatch" in world.status(msg_id)
    assert world.committed() == []
    [prepped] = world.far_messages()["prep"]
    assert world.relay_id("que", msg_id) == f"{FAR}/{prepped}"
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert world.committed() == [prepped]
    assert world.steps() == ["prep", "attach", "state", "json", "attach", "commit"]
    assert world.far_md5s(prepped)["f"] == hashlib.md5(b"data").hexdigest()


def test_md5_answer_mismatch(world):
    """
    An answer with another md5 than ours is a soft failure even when the
    bytes arrived intact.
    """
    world.peer.faults = [("attach", "md5")]
    msg_id = world.send(attachments=[("f", b"data")])
    world.settle()
    assert world.state(msg_id) == "que"
    assert "md5 mismatch" in world.status(msg_id)
    assert world.committed() == []


def test_retry_skips_attachments_the_remote_has(world):
    """
    After a failed commit, the retry finds the prepared remote message with
    its attachments (read form) and only commits.
    """
    world.peer.faults = [("commit", "500")]
    files = [("a", b"first"), ("b", b"second")]
    msg_id = world.send(attachments=files)
    world.settle()
    assert world.state(msg_id) == "que"
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert world.steps() == ["prep", "attach", "attach", "commit", "state", "json", "commit"]
    [remote] = world.committed()
    assert world.far_md5s(remote) == md5s(files)


def test_retry_with_unreadable_read_form_uploads_again(world):
    world.peer.faults = [("commit", "500"), ("json", "garbage")]
    msg_id = world.send(attachments=[("a", b"first")])
    world.settle()
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert world.steps() == ["prep", "attach", "commit", "state", "json", "attach", "commit"]


def test_close_mid_upload(world):
    world.peer.faults = [("attach", "drop")] * 2
    msg_id = world.send(attachments=[("f", os.urandom(300_000))])
    world.settle()
    assert world.state(msg_id) == "que"
    assert "connection lost" in world.status(msg_id)
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert len(world.committed()) == 1


@pytest.mark.parametrize("step", ["prep", "attach"])
def test_dropped_connection_is_sent_again_at_once(world, step):
    """
    A request whose connection closes before any answer (a pooled
    connection the peer had just closed) is sent again on a new connection
    within the same attempt.
    """
    world.peer.faults = [(step, "drop")]
    msg_id = world.send(attachments=[("f", b"data")])
    world.settle()
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    assert world.relay.get(msg_id)["count"] == 0
    assert len(world.committed()) == 1
    assert world.steps().count(step) == 2


def test_commit_is_not_sent_twice(world):
    """
    A commit whose connection closes before any answer is not sent again
    in the same attempt (the remote may have committed): the next attempt
    asks the remote for the state instead.
    """
    world.peer.faults = [("commit", "drop")]
    msg_id = world.send()
    world.settle()
    assert world.state(msg_id) == "que"
    assert world.steps() == ["prep", "commit"]
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert world.steps() == ["prep", "commit", "state", "json", "commit"]
    assert len(world.committed()) == 1


def test_lost_commit_answer_is_not_resent(world):
    """
    The remote committed but its answer was lost: the retry asks the remote
    for the state and finishes without a second message.
    """
    world.peer.faults = [("commit", "lost")]
    msg_id = world.send()
    world.settle()
    assert world.state(msg_id) == "que"
    [remote] = world.committed()
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert world.status(msg_id) == f"relayed - {FAR}/{remote}"
    assert world.committed() == [remote]
    assert world.steps() == ["prep", "commit", "state"]


def test_crash_after_commit_restart(world):
    """
    The daemon died after the remote commit, before recording relayed: on
    restart the message goes back to que, keeps relay_id, and is finished
    without re-sending.
    """
    world.peer.faults = [("commit", "hang")]
    msg_id = world.send()
    world.settle()
    assert world.state(msg_id) == "run"
    # The commit did not run on the far side (hang answers before running);
    # commit it by hand as if the answer was lost in the crash.
    [prepped] = world.far_messages()["prep"]
    world.far.queue("inbox").commit(prepped)
    # The daemon stops (the handler is cancelled mid-commit; on disk this
    # is what kill -9 leaves too) and the relay queue starts again from disk.
    assert world.relay_id("run", msg_id) == f"{FAR}/{prepped}"
    world._result(world.near.restart_queue("relay"))
    world.settle()
    assert world.state(msg_id) == "relayed"
    assert world.committed() == [prepped]
    assert world.steps()[-1] == "state"


def test_state_unknown_preps_again(world):
    world.peer.faults = [("commit", "fail:status: DOWN")]
    msg_id = world.send()
    world.settle()
    [prepped] = world.far_messages()["prep"]
    world.far.queue("inbox").delete(prepped)
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert world.steps() == ["prep", "commit", "state", "prep", "commit"]
    assert len(world.committed()) == 1


def test_state_failure_retries(world):
    world.peer.faults = [("commit", "500"), ("state", "garbage")]
    msg_id = world.send()
    world.settle()
    world.retry(msg_id)
    assert world.state(msg_id) == "que"
    assert "state failed - garbage answer" in world.status(msg_id)
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed"
    assert len(world.committed()) == 1


def test_backoff_grows(world):
    world.peer.faults = [("prep", "500")] * 3
    msg_id = world.send()
    world.settle()
    delays = []
    for _ in range(3):
        msg = world.relay.get(msg_id)
        delays.append(msg["due"] - world.clock.seconds())
        if len(delays) < 3:
            world.retry(msg_id)
    assert delays == [5, 10, 20]


def test_max_count_ends_in_err(world):
    world.peer.faults = [("prep", "500")]
    msg_id = world.send(max_count=1)
    world.settle()
    assert world.state(msg_id) == "err"
    assert world.status(msg_id) == "err - HIT MAX RESEND COUNT - MOVING TO ERR"


def test_last_attempt_deletes_the_remote_prep(world):
    """
    When the last attempt fails (max_count reached) with a prepared remote
    message, that message is deleted: it would never be committed.
    """
    world.peer.faults = [("attach", "500")]
    msg_id = world.send(attachments=[("f", b"data")], max_count=1)
    world.settle()
    assert world.state(msg_id) == "err"
    assert world.status(msg_id) == "err - HIT MAX RESEND COUNT - MOVING TO ERR"
    assert world.steps() == ["prep", "attach", "state", "delete"]
    assert world.far_messages()["prep"] == []
    assert world.committed() == []
    assert world.relay_id("err", msg_id) is None


@pytest.mark.parametrize(
    "resumable, fault, steps, reason",
    [
        (
            False,
            ("attach", "json:413:upload larger than max_upload_size (3 bytes)"),
            ["prep", "attach", "state", "delete"],
            "attach f failed - HTTP 413 upload larger than max_upload_size (3 bytes)",
        ),
        (
            True,
            ("put", "json:413:upload larger than max_upload_size (3 bytes)"),
            ["prep", "put", "state", "delete"],
            "attach f failed - HTTP 413 upload larger than max_upload_size (3 bytes)",
        ),
        (
            False,
            ("prep", "json:413:request body larger than 65536 bytes"),
            ["prep"],
            "prep failed - HTTP 413 request body larger than 65536 bytes",
        ),
    ],
    ids=["multipart", "resumable-probe", "prep"],
)
def test_too_large_for_the_peer_ends_in_err_at_once(tmp_path, monkeypatch, resumable, fault, steps, reason):
    """
    A 413 (larger than the peer takes) cannot change by retrying: the
    message ends in err at once with the peer's reason, after one attempt;
    a remote message prepared for it is deleted, as after the last attempt.
    """
    world = World(tmp_path, monkeypatch, **({"resumable_min": 1} if resumable else {}))
    world.peer.resumable = resumable
    world.peer.faults = [fault]
    msg_id = world.send(attachments=[("f", b"data")])
    world.settle()
    assert world.state(msg_id) == "err", world.status(msg_id)
    assert world.status(msg_id) == f"err - {reason}"
    assert world.relay.get(msg_id)["count"] == 0
    assert world.steps() == steps
    assert world.far_messages()["prep"] == []
    assert world.committed() == []
    assert world.relay_id("err", msg_id) is None
    log = open(world.job_file("err", msg_id, "stdio.log")).read()
    assert f"attempt failed: {reason}; no retry can change it" in log


def test_last_attempt_leaves_an_unreachable_remote_prep(world):
    """
    If the remote cannot be asked, its prepared message stays (and so does
    job/relay_id); the message still ends in err.
    """
    world.peer.faults = [("attach", "500"), ("state", "500")]
    msg_id = world.send(attachments=[("f", b"data")], max_count=1)
    world.settle()
    assert world.state(msg_id) == "err"
    [remote] = world.far_messages()["prep"]
    assert world.relay_id("err", msg_id) == f"{FAR}/{remote}"
    log = open(world.job_file("err", msg_id, "stdio.log")).read()
    assert "left as it is (state failed - HTTP 500)" in log
    assert log.rstrip().endswith("attempt failed: attach f failed - HTTP 500; max_count reached")


def test_last_commit_applied_with_its_answer_lost_is_relayed(world):
    """
    The last attempt's commit reached the remote but its answer was lost:
    the message was delivered, so it ends relayed, not in err (where a clone
    would deliver it twice).
    """
    world.peer.faults = [("commit", "lost")]
    msg_id = world.send(max_count=1)
    world.settle()
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    [remote] = world.committed()
    assert world.status(msg_id) == f"relayed - {FAR}/{remote}"
    assert world.steps() == ["prep", "commit", "state"]


def test_count_over_15_fails(world):
    msg_id = world.send(count=16)
    world.settle()
    assert world.state(msg_id) == "err"
    assert world.status(msg_id) == "err - RQ_COUNT > 15 FAIL"
    assert world.steps() == []


def test_loop_refused(world):
    msg_id = world.send(orig_msg_id=f"{FAR}/20200101.0000.00.000.1")
    world.settle()
    assert world.state(msg_id) == "err"
    assert world.status(msg_id) == f"err - {LOOP_REASON}"
    assert world.steps() == []


def test_local_dest_takes_local_path(world):
    dest = "http://testhost:3333/q/local"
    msg_id = world.send(dest=dest, attachments=[("f", b"local data")], param2="x")
    world.settle()
    assert world.state(msg_id) == "relayed"
    assert world.steps() == []
    local = world.near.queue("local")
    [copy] = local.messages("run")
    assert world.status(msg_id) == f"relayed - {local.full_id(copy)}"
    got = local.get(copy)
    assert got["param2"] == "x" and got["count"] == 1 and got["dest"] == dest
    assert got["_attachments"]["f"]["md5"] == hashlib.md5(b"local data").hexdigest()


def test_local_dest_in_router_mode_goes_to_the_router(world):
    """
    In router mode a URL of this host reaches C{rq_router}, as over HTTP:
    the local path does not skip the rules.
    """
    with open(os.path.join(world.near.root.path, "config", "rq_router_rules.rb"), "w") as f:
        f.write('rule "default"\n  action :done\n')
    world.near.set_admin("pause", "rq_router")
    msg_id = world.send(dest="http://testhost:3333/q/local")
    world.settle()
    assert world.state(msg_id) == "relayed"
    assert "/q/rq_router/" in world.status(msg_id)
    assert world.near.queue("local").messages("que") == world.near.queue("local").messages("run") == []


def test_local_dest_unknown_queue_retries(world):
    msg_id = world.send(dest="http://testhost:3333/q/nosuch")
    world.settle()
    assert world.state(msg_id) == "que"
    assert "couldn't connect to queue - nosuch" in world.status(msg_id)


def test_force_remote_goes_over_http(tmp_path, monkeypatch):
    world = World(tmp_path, monkeypatch)
    # The far side answers for every host: force_remote sends our own URL
    # through it.
    world.far.create_queue({"name": "local", "script": "./code/noop", "exec_prefix": ""})
    msg_id = world.send(dest="http://testhost:3333/q/local", force_remote=True)
    world.settle()
    assert world.state(msg_id) == "relayed"
    assert world.steps() == ["prep", "commit"]
    assert "force_remote" not in json.loads(parse_qs(world.peer.bodies["prep"][0].decode())["mesg"][0])
    assert "FORCE REMOTE" in world.job_log(msg_id)


def test_dup_to_remote_url_relays(world):
    """
    A queue script's dup to a URL goes through relay and reaches the far
    queue with the parent's orig_msg_id.
    """
    full = world._result(world.near.create_message({"dest": "local", "param1": "v"}))
    [worker] = world.spawner.workers
    worker.say(f"dup 0-X-{FAR}")
    [reply] = worker.replies
    assert reply.startswith("ok http://testhost:3333/q/relay/")
    worker.say("done duped")
    worker.exit(0)
    world.settle()
    copy = reply.split()[1].rsplit("/", 1)[1]
    assert world.state(copy) == "relayed"
    [remote] = world.committed()
    far = world.far.queue("inbox").get(remote)
    assert far["param1"] == "v" and far["orig_msg_id"] == full


# -- against the real web app of the far instance


class RealWorld(World):
    """
    L{World} with the far side served by the daemon's own klein app
    (L{rqtwisted.web.app.make_site}, its streaming upload request included).
    """

    def __init__(self, tmp_path, monkeypatch, **config):
        super().__init__(tmp_path, monkeypatch, **config)
        from rqtwisted.web.app import make_site

        with open(self.far.root.join("config", "queuemgr.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
        site = make_site(self.far, self.far.settings, None)
        self.agent = RequestTraversalAgent(site.resource)
        self.agent._serverFactory.requestFactory = site.requestFactory
        self.relayer.http.client = HTTPClient(self.agent)


@pytest.fixture
def real(tmp_path, monkeypatch):
    pytest.importorskip("rqtwisted.web.app")
    return RealWorld(tmp_path, monkeypatch, resumable_min=100_000)


def test_real_app_plain(real):
    msg_id = real.send(param1="p")
    real.settle()
    assert real.state(msg_id) == "relayed", real.status(msg_id)
    [remote] = real.committed()
    assert real.status(msg_id) == f"relayed - {FAR}/{remote}"
    assert real.far.queue("inbox").get(remote)["count"] == 1


def test_real_app_attachments(real):
    """
    Small files go multipart, big ones through the resumable PUT; md5s match
    on the far side.
    """
    files = [("big", os.urandom(250_000)), ("small", b"abc"), ("zero", b"")]
    msg_id = real.send(attachments=files)
    real.settle(200)
    assert real.state(msg_id) == "relayed", real.status(msg_id)
    [remote] = real.committed()
    assert real.far_md5s(remote) == md5s(files)
    log = real.job_log(msg_id)
    assert "attach big (250000 bytes, resumable from 0)" in log
    assert "attach small (3 bytes, multipart)" in log


@pytest.mark.parametrize("size", [3, 250_000])
@pytest.mark.parametrize("name", ["a\nb", "a\\b"])
def test_real_app_refuses_a_name_no_upload_carries_on_both_paths(real, size, name):
    """
    An attachment named with a line break or a backslash (no longer
    accepted, but an older version may have left one) is refused alike by
    the multipart and the resumable upload: the relay retries with the
    reason, and no copy arrives renamed (the multipart one arrived as
    C{a b} or C{a\\\\b}).
    """
    relay = real.relay
    msg_id = real._result(relay.create(creation_fields({"dest": FAR}), "prep")).rsplit("/", 1)[1]
    source = os.path.join(real.near.root.path, "tmp", "f")
    with open(source, "wb") as f:
        f.write(b"x" * size)
    real._result(relay.attach(msg_id, source, "f"))
    attach = os.path.join(relay.store.msg_dir("prep", msg_id), "attach")
    os.rename(os.path.join(attach, "f"), os.path.join(attach, name))
    real._result(relay.commit(msg_id))
    real.settle(200)
    assert real.state(msg_id) == "que", real.status(msg_id)
    assert "Attachment name has invalid character. not allowed: a" in real.status(msg_id)
    [prepped] = real.far_messages()["prep"]
    assert "_attachments" not in real.far.queue("inbox").get(prepped)
    assert real.committed() == []


@pytest.mark.parametrize("size", [3, 250_000])
def test_real_app_upload_larger_than_max_upload_size_ends_in_err(real, size):
    """
    The real app's 413 (larger than its max_upload_size), answered before
    it reads the body, reaches the relay as such on both upload paths: the
    message ends in err at once, and the remote message prepared for it is
    deleted.
    """
    import dataclasses

    real.far.settings = dataclasses.replace(real.far.settings, max_upload_size=2)
    msg_id = real.send(attachments=[("f", b"x" * size)])
    real.settle(200)
    assert real.state(msg_id) == "err", real.status(msg_id)
    assert real.status(msg_id).startswith("err - attach f failed - HTTP 413 ")
    assert "larger than max_upload_size (2 bytes)" in real.status(msg_id)
    assert real.far_messages()["prep"] == []
    assert real.committed() == []


def test_real_app_restart_after_commit(real):
    """
    A relay_id whose remote message is committed already: the state answer
    of the real app finishes the delivery without a second message.
    """
    remote = real._result(real.far.queue("inbox").create({"dest": FAR}, "commit"))
    msg_id = real.send()
    # The message is running now; give it the relay_id of an earlier life.
    real.set_relay_id(msg_id, remote)
    real.settle()
    assert real.state(msg_id) == "relayed", real.status(msg_id)
    assert real.status(msg_id) == f"relayed - {remote}"
    assert len(real.committed()) == 1


def test_stop_while_reading_an_answer(world):
    """
    Stopping the daemon while an answer trickles in cancels the delivery;
    the message runs again at the next start and finishes once.
    """
    world.peer.faults = [("commit", "stall")]
    msg_id = world.send()
    world.settle()
    assert world.state(msg_id) == "run"
    world._result(world.near.restart_queue("relay"))
    world.settle()
    assert world.state(msg_id) == "relayed"
    assert world.steps() == ["prep", "commit", "state", "json", "commit"]
    assert len(world.committed()) == 1
    assert world.relay.get(msg_id)["count"] == 0


def test_real_app_restart_with_prepared_remote(real):
    """
    A relay_id naming a prepared remote message that has the attachment
    already: the retry only commits it.
    """
    data = b"already there"
    path = os.path.join(real.far.root.path, "tmp", "pre")
    with open(path, "wb") as f:
        f.write(data)
    inbox = real.far.queue("inbox")
    remote = real._result(inbox.create({"dest": FAR}, "prep"))
    real._result(inbox.attach(remote.rsplit("/", 1)[1], path, "f"))
    msg_id = real.send(attachments=[("f", data)])
    real.set_relay_id(msg_id, remote)
    real.settle()
    assert real.state(msg_id) == "relayed", real.status(msg_id)
    assert real.committed() == [remote.rsplit("/", 1)[1]]
    assert "attach f: on the remote already" in real.job_log(msg_id)


# -- the transport's connection choice


class _Response:
    def __init__(self, version, connection=None):
        self.version = version
        self.headers = Headers({b"connection": [connection]} if connection else {})


def test_keeps_alive():
    from rqtwisted.relayhttp import keeps_alive

    assert keeps_alive(_Response((b"HTTP", 1, 1)))
    assert keeps_alive(_Response((b"HTTP", 1, 1), b"keep-alive"))
    assert not keeps_alive(_Response((b"HTTP", 1, 1), b"Close"))
    assert not keeps_alive(_Response((b"HTTP", 1, 0)))


def test_pooled_client_only_for_peers_keeping_connections(world):
    """
    A peer is reached with the one-connection-per-request client until it
    shows it keeps connections open; then with the pooled one.
    """
    from rqtwisted.relayhttp import HttpPeer

    used = []

    class Recording(HTTPClient):
        def __init__(self, name, agent):
            super().__init__(agent)
            self.name = name

        def request(self, *args, **kwargs):
            used.append(self.name)
            return super().request(*args, **kwargs)

    http = HttpPeer(Recording("pooled", world.agent), world.clock, 30, Recording("oneshot", world.agent))
    world.relayer.http = http
    world.send()
    world.send()
    world.settle()
    assert used == ["oneshot", "pooled", "pooled", "pooled"]
    assert len(world.committed()) == 2


def test_upload_file_closed_when_never_sent(tmp_path):
    """
    An attachment opened for an upload is closed again when the exchange
    fails before its body was sent (the peer is down).
    """
    from twisted.internet.defer import ensureDeferred, fail
    from twisted.internet.error import ConnectionRefusedError

    from rqtwisted.relaybodies import MultipartFileProducer
    from rqtwisted.relayhttp import HttpPeer

    class Down:
        def request(self, *args, **kwargs):
            return fail(ConnectionRefusedError())

    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    made = []

    def body(progress):
        made.append(MultipartFileProducer([], "filedata", "f", str(path), Cooperator(), progress))
        return made[-1]

    clock = Clock()
    failures = []
    ensureDeferred(HttpPeer(Down(), clock, 30).request(b"POST", "http://far/q/x/1/attach/new", {}, body)).addErrback(
        failures.append
    )
    assert failures and failures[0].check(SoftFailure)
    assert "cannot connect" in failures[0].value.reason
    assert len(made) == 1  # not sent again: nothing was answered, but it never left
    assert made[0]._file._raw.closed


class _CongestedConsumer:
    """
    A transport whose write buffer is full after every write but the first
    (a small head): it pauses its registered producer each time, and
    resumes it later (L{drain}), as Twisted's transports do.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producer = None
        self.paused = False

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.append(data)
        if len(self.data) > 1 and self.producer is not None and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        if self.producer is not None and self.paused:
            self.paused = False
            self.producer.resumeProducing()


def test_multipart_body_survives_back_pressure_after_the_file(tmp_path):
    """
    A transport that pauses the producer when the closing boundary is
    written (its buffer is full once the whole file went out), and resumes
    it later, gets the whole body: pausing or resuming a body whose file
    part is finished does nothing (it raised TaskDone, which failed every
    multipart upload of a big file to a peer reading slower than the disk).
    """
    from twisted.internet.task import Cooperator

    from rqtwisted.relaybodies import MultipartFileProducer

    path = tmp_path / "f"
    content = os.urandom(300 * 1024)
    path.write_bytes(content)
    clock = Clock()
    cooperator = Cooperator(scheduler=lambda f: clock.callLater(0, f), started=True)
    producer = MultipartFileProducer([("x_format", "json")], "filedata", "f", str(path), cooperator)
    consumer = _CongestedConsumer()
    consumer.registerProducer(producer, True)
    done = []
    producer.startProducing(consumer).addBoth(done.append)
    for _ in range(100):
        consumer.drain()
        clock.advance(0)
        if done:
            break
    assert done == [None]
    consumer.drain()  # the transport resumes the producer once more after the last write
    body = b"".join(consumer.data)
    assert len(body) == producer.length
    assert content in body and body.endswith(b"--" + producer.boundary.encode() + b"--\r\n")


def test_relay_id_not_saved_is_retried(world, monkeypatch):
    """
    A disk that cannot take job/relay_id (full) fails the attempt like any
    soft failure: retried, not sent to err at once.
    """
    import errno

    from rqtwisted import relay

    space = []

    def full(path, data):
        if not space:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        replace_file(path, data)

    replace_file = relay.replace_file
    monkeypatch.setattr(relay, "replace_file", full)
    msg_id = world.send()
    world.settle()
    assert world.state(msg_id) == "que", world.status(msg_id)
    assert "cannot save relay_id - No space left on device" in world.status(msg_id)
    assert world.committed() == []
    space.append(True)
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    assert len(world.committed()) == 1


def test_relay_id_not_synced_is_retried(world, monkeypatch):
    """
    An fsync of job/relay_id that fails (EIO) fails the attempt before the
    commit, softly: nothing is committed, the message is retried.
    """
    import errno

    from twisted.internet.defer import fail

    syncer = world.near.syncer
    real_sync = syncer.sync

    def broken(*paths):
        if any(p.endswith("/relay_id") for p in paths):
            return fail(OSError(errno.EIO, os.strerror(errno.EIO)))
        return real_sync(*paths)

    monkeypatch.setattr(syncer, "sync", broken)
    msg_id = world.send()
    world.settle()
    assert world.state(msg_id) == "que", world.status(msg_id)
    assert "cannot save relay_id - Input/output error" in world.status(msg_id)
    assert "commit" not in world.steps()


def test_local_dest_on_a_full_disk_is_retried(world, monkeypatch):
    """
    A copy to a local queue that cannot be written (a full disk while its
    attachments are linked or copied) fails the attempt softly: retried,
    not sent to err at once, and no half-made copy is left behind.
    """
    import errno

    source = world.relay.store
    space = []
    real_link = source.link_attachments

    def link(state, msg_id, target_dir):
        if not space:
            os.makedirs(os.path.join(target_dir, "attach"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_link(state, msg_id, target_dir)

    monkeypatch.setattr(source, "link_attachments", link)
    msg_id = world.send(dest="http://testhost:3333/q/local", attachments=[("f", b"local data")])
    world.settle()
    assert world.state(msg_id) == "que", world.status(msg_id)
    assert "prep failed - No space left on device" in world.status(msg_id)
    local = world.near.queue("local")
    assert local.messages("prep") == []
    assert os.listdir(local.store.state_dir("tmp")) == []  # no half-made copy left
    space.append(True)
    world.retry(msg_id)
    assert world.state(msg_id) == "relayed", world.status(msg_id)
    assert len(world.near.queue("local").messages("run") + world.near.queue("local").messages("que")) == 1


class _Unreachable:
    """
    An HTTP client whose connections to every host in C{down} time out;
    the others are served by C{agent}. The hosts asked, in order, in
    C{asked}.
    """

    def __init__(self, agent, down):
        self.client = HTTPClient(agent)
        self.down = set(down)
        self.refusing = set()
        self.asked = []

    def request(self, method, url, **kwargs):
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError, TimeoutError
        from urllib.parse import urlsplit

        host = urlsplit(url).netloc
        self.asked.append(host)
        if host in self.down:
            return fail(TimeoutError())
        if host in self.refusing:
            return fail(ConnectionRefusedError())
        return self.client.request(method, url, **kwargs)


def test_an_unreachable_peer_is_not_tried_again_at_once(world):
    """
    After a peer's connection timed out, the messages for it whose turn
    comes within UNREACHABLE_MEMORY connect timeouts fail at once, each as
    one attempt (retried later like any failure), without a connection;
    messages for other peers are still tried. Once the memory is over the
    peer is tried again, and a delivery that works clears it.
    """
    from rqtwisted import relay as relay_module
    from rqtwisted.relayhttp import HttpPeer

    client = _Unreachable(world.agent, {"farhost:3333"})
    world.relayer.http = HttpPeer(client, world.clock, 30)
    first = world.send()
    world.settle()
    assert client.asked == ["farhost:3333"]
    assert world.state(first) == "que"
    assert "connect timed out" in world.status(first)
    others = [world.send() for _ in range(3)]
    world.settle()
    # Not one connection for the three: they are back in que at once.
    assert client.asked == ["farhost:3333"]
    for msg_id in others:
        assert world.state(msg_id) == "que"
        assert "(not tried: unreachable 0s ago)" in world.status(msg_id)
        assert world.relay.que[msg_id]["count"] == 1
    world.send(dest="http://otherhost:3333/q/inbox")
    world.settle()
    assert client.asked[1] == "otherhost:3333"
    # The memory is over: the peer, back up, is tried and delivered to.
    client.down.clear()
    world.clock.advance(relay_module.UNREACHABLE_MEMORY * world.relayer.config.connect_timeout)
    world.settle()
    for msg_id in [first, *others]:
        assert world.state(msg_id) == "relayed", world.status(msg_id)
    assert not world.relayer.not_tried("http://farhost:3333")


def test_a_peer_that_answers_is_not_remembered_as_unreachable(world):
    """
    A failure after a connection was made (an HTTP 500, garbage) is not a
    reason to skip the peer: the next message is tried.
    """
    world.peer.faults = [("prep", "500")]
    first = world.send()
    world.settle()
    assert world.state(first) == "que"
    assert not world.relayer.not_tried("http://farhost:3333")
    second = world.send()
    world.settle()
    assert "not tried" not in world.status(second)


def test_a_refused_connection_is_not_remembered(world):
    """
    A refused connection costs nothing: the next message for that peer is
    tried.
    """
    from rqtwisted.relayhttp import HttpPeer

    client = _Unreachable(world.agent, set())
    client.refusing.add("farhost:3333")
    world.relayer.http = HttpPeer(client, world.clock, 30)
    world.send()
    world.settle()
    world.send()
    world.settle()
    assert client.asked == ["farhost:3333", "farhost:3333"]
