"""
Tests for the streaming uploads (L{rqtwisted.web.upload}, L{rqtwisted.web.upload_request},
L{rqtwisted.web.upload_routes}, with L{rqtwisted.web.formdata} and
L{rqtwisted.web.spool}): a real L{HTTPChannel} on a L{StringTransport}, fed
requests byte by byte or in arbitrary pieces, in front of a small resource
that routes the two upload requests to the upload handlers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from io import BytesIO
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rqtwisted.store import PARTIAL_MAX_AGE
from rqtwisted.testing import syncNow
from rqtwisted.web.formdata import FormError, FormSink, form_args
from rqtwisted.web.spool import Spool
from rqtwisted.web.upload import ContentRange, UploadRefused, Uploads, match_upload, path_segments
from rqtwisted.web.upload_request import UploadRequest
from rqtwisted.web.upload_routes import attach_new, attach_put, render_attach_new
from tests.httphead import parse_head

BOUNDARY = "------------------------d74496d66958873e"


class Routes(Resource):
    """
    The upload routes of the app, reduced to what the handlers need.
    """

    isLeaf = True

    def __init__(self, uploads: Uploads) -> None:
        super().__init__()
        self.uploads = uploads
        self.processed: list[Any] = []
        self.bodies: list[bytes] = []

    def _segments(self, request: Any) -> list[str]:
        return [s.decode() for s in request.postpath if s]

    def render_POST(self, request: Any) -> Any:
        self.processed.append(request)
        self.bodies.append(request.content.read())
        _, name, msg_id, _, _ = self._segments(request)
        d = attach_new(request, self.uploads, name, msg_id)
        d.addCallback(lambda outcome: render_attach_new(request, outcome, name, msg_id))
        return self._write(request, d)

    def render_PUT(self, request: Any) -> Any:
        self.processed.append(request)
        _, name, msg_id, _, att = self._segments(request)
        return self._write(request, attach_put(request, self.uploads, name, msg_id, att))

    def render_GET(self, request: Any) -> bytes:
        self.processed.append(request)
        return b"hello"

    @staticmethod
    def _write(request: Any, d: Any) -> Any:
        def write(body: bytes) -> None:
            request.write(body)
            request.finish()

        d.addCallback(write)
        return NOT_DONE_YET


@dataclasses.dataclass
class Env:
    instance: Any
    uploads: Uploads
    routes: Routes
    site: Site
    tmp: str

    @property
    def queue(self) -> Any:
        return self.instance.queue("test")

    def prep(self) -> str:
        out: list[Any] = []
        self.instance.create_message({"dest": "test"}, "prep").addBoth(out.append)
        return out[0].rsplit("/", 1)[1]

    def attachment(self, msg_id: str, name: str) -> bytes:
        with open(os.path.join(self.queue.store.msg_dir("prep", msg_id), "attach", name), "rb") as f:
            return f.read()

    def temp_files(self) -> list[str]:
        found = []
        for top, dirs, files in os.walk(self.tmp):
            found.extend(os.path.relpath(os.path.join(top, f), self.tmp) for f in files)
        return sorted(f for f in found if f.startswith(("upload-", "partial/")))

    def cap(self, size: int) -> None:
        self.instance.settings = dataclasses.replace(self.instance.settings, max_upload_size=size)


@pytest.fixture
def env(started: tuple[Any, Any, Any]) -> Env:
    instance = started[0]
    uploads = Uploads(instance, syncNow)
    routes = Routes(uploads)
    site = Site(routes, reactor=MemoryReactorClock())
    site.requestFactory = UploadRequest.factory(uploads)
    return Env(instance, uploads, routes, site, instance.queue("test").store.state_dir("tmp"))


class Connection:
    """
    One client connection to the site.
    """

    def __init__(self, site: Site) -> None:
        self.transport = StringTransport()
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes, cuts: list[int] | None = None) -> None:
        start = 0
        for cut in sorted(set(cuts or [])) + [len(data)]:
            if cut > start:
                self.channel.dataReceived(data[start:cut])
                start = cut

    def responses(self) -> list[tuple[int, dict[str, str], bytes]]:
        return parse_responses(self.transport.value())

    def response(self) -> tuple[int, dict[str, str], bytes]:
        [only] = self.responses()
        return only

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionError("client went away")))


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        code, headers = parse_head(head)
        if code == 100:
            continue
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body += data[:size]
                data = data[size + 2 :]
                if size == 0:
                    break
        else:
            n = int(headers.get("content-length", "0"))
            body, data = data[:n], data[n:]
        out.append((code, headers, body))
    return out


def multipart(filename: str | None, content: bytes, **fields: str) -> bytes:
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    if filename is not None:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="filedata"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts)


def http(
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    chunked_sizes: list[int] | None = None,
) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    for k, v in (headers or {}).items():
        head.append(f"{k}: {v}")
    if chunked_sizes is None:
        head.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body
    head.append("Transfer-Encoding: chunked")
    out = [("\r\n".join(head) + "\r\n\r\n").encode()]
    start = 0
    for size in chunked_sizes + [len(body)]:
        piece = body[start : start + size] if size else b""
        if piece:
            out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            start += len(piece)
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def form_post(msg_id: str, body: bytes, **kw: Any) -> bytes:
    return http(
        "POST",
        f"/q/test/{msg_id}/attach/new",
        body,
        {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        **kw,
    )


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


PAYLOAD = bytes(range(256)) * 40 + b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n\r\n"


# -- routing -------------------------------------------------------------------


def test_routes_matched() -> None:
    assert match_upload(b"POST", b"/q/test/1/attach/new", "/").kind == "form"
    put = match_upload(b"PUT", b"/q/test/1/attach/a.bin?x=1", "/")
    assert (put.kind, put.queue, put.msg_id, put.name) == ("put", "test", "1", "a.bin")
    assert match_upload(b"POST", b"/therq/q/test/1/attach/new", "/therq/").kind == "form"
    assert match_upload(b"POST", b"http://h:1//q/./test/x/../1/attach/new", "/").msg_id == "1"
    assert match_upload(b"POST", b"/q/test/1/attach/new", "/therq/") is None
    assert match_upload(b"GET", b"/q/test/1/attach/new", "/") is None
    assert match_upload(b"POST", b"/q/test/1/attach/a.bin", "/") is None
    assert match_upload(b"POST", b"/q/test/new_message", "/") is None


def test_encoded_slash_stays_in_its_segment() -> None:
    assert path_segments(b"/q/t/1/attach/..%2F..%2Fx") == ["q", "t", "1", "attach", "../../x"]


def test_content_range_parsing() -> None:
    assert ContentRange.parse("bytes 0-9/20") == ContentRange(0, 9, 20)
    assert ContentRange.parse("bytes */20") == ContentRange(None, None, 20)
    for bad in ("bytes 5-4/20", "bytes 0-20/20", "items 0-1/2", "bytes x-1/2", "bytes 0-1"):
        with pytest.raises(UploadRefused) as e:
            ContentRange.parse(bad)
        assert e.value.code == 400


# -- the form parser -------------------------------------------------------------


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(multipart("f.bin", PAYLOAD, x_format="json")))))
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_form_sink_any_split(tmp_path_factory: Any, cuts: list[int]) -> None:
    body = multipart("f.bin", PAYLOAD, x_format="json", pathname="/x/f.bin")
    directory = str(tmp_path_factory.mktemp("spool"))
    sink = FormSink(BOUNDARY, lambda name: Spool.create(directory))
    start = 0
    for cut in sorted(set(cuts)) + [len(body)]:
        sink.feed(body[start:cut])
        start = max(start, cut)
    sink.close()
    assert sink.filename == "f.bin"
    assert sink.fields == {"x_format": ["json"], "pathname": ["/x/f.bin"]}
    assert sink.file is not None and sink.file.md5() == md5(PAYLOAD)
    with open(sink.file.path, "rb") as f:
        assert f.read() == PAYLOAD


def test_form_sink_truncated(tmp_path: Any) -> None:
    sink = FormSink(BOUNDARY, lambda name: Spool.create(str(tmp_path)))
    sink.feed(multipart("f.bin", PAYLOAD)[:-10])
    with pytest.raises(FormError) as e:
        sink.close()
    assert e.value.code == 400


# -- multipart uploads -----------------------------------------------------------


@given(
    tcp_cuts=st.lists(st.integers(min_value=0, max_value=12000), max_size=12),
    chunk_sizes=st.one_of(st.none(), st.lists(st.integers(min_value=1, max_value=4000), max_size=8)),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_multipart_any_split(env: Env, tcp_cuts: list[int], chunk_sizes: list[int] | None) -> None:
    msg_id = env.prep()
    body = multipart("data.bin", PAYLOAD, x_format="json", pathname="/tmp/data.bin", msg_id="x")
    request = form_post(msg_id, body, chunked_sizes=chunk_sizes)
    conn = Connection(env.site)
    conn.send(request, [c for c in tcp_cuts if c < len(request)])
    code, headers, body = conn.response()
    assert (code, json.loads(body)) == (200, ["ok", f"{md5(PAYLOAD)}-Attached successfully"])
    assert headers["content-type"] == "application/json"
    assert env.attachment(msg_id, "data.bin") == PAYLOAD
    assert env.temp_files() == []


def test_body_never_reaches_twisted_content(env: Env) -> None:
    msg_id = env.prep()
    conn = Connection(env.site)
    conn.send(form_post(msg_id, multipart("a", PAYLOAD, x_format="json")))
    [request] = env.routes.processed
    assert env.routes.bodies == [b""]
    assert request.args[b"x_format"] == [b"json"]
    assert conn.response()[0] == 200


def test_keep_alive_after_upload(env: Env) -> None:
    msg_id = env.prep()
    conn = Connection(env.site)
    conn.send(form_post(msg_id, multipart("a", b"one", x_format="json")) + http("GET", "/hello"))
    [(c1, _, b1), (c2, _, b2)] = conn.responses()
    assert c1 == 200 and json.loads(b1)[0] == "ok"
    assert (c2, b2) == (200, b"hello")


@pytest.mark.parametrize("x_format", ["json", "html"])
def test_answers_carry_their_length(env: Env, x_format: str) -> None:
    # Like every other answer of the web interface: a whole body with its
    # Content-Length, not chunks (a peer may read the answer to its close).
    msg_id = env.prep()
    for target in (msg_id, "20260101.0000.00.000.1"):
        conn = Connection(env.site)
        conn.send(form_post(target, multipart("a", b"x", x_format=x_format)))
        code, headers, body = conn.response()
        assert code == 200 and body
        assert "transfer-encoding" not in headers and headers["content-length"] == str(len(body))


def test_html_failure_text(env: Env) -> None:
    conn = Connection(env.site)
    conn.send(form_post("20260101.0000.00.000.1", multipart("a", b"x")))
    code, headers, body = conn.response()
    assert code == 200
    assert body == b'Commit test/20260101.0000.00.000.1 got ["fail", "cannot find message"]'
    assert env.temp_files() == []


def test_not_prep_json(env: Env) -> None:
    conn = Connection(env.site)
    conn.send(form_post("20260101.0000.00.000.1", multipart("a", b"x", x_format="json")))
    code, _, body = conn.response()
    assert (code, json.loads(body)) == (200, ["fail", "cannot find message"])


def test_missing_filedata_is_404(env: Env) -> None:
    msg_id = env.prep()
    conn = Connection(env.site)
    conn.send(form_post(msg_id, multipart(None, b"", x_format="json")))
    assert conn.response()[0] == 404
    conn = Connection(env.site)
    conn.send(form_post(msg_id, multipart("", b"", x_format="json")))
    assert conn.response()[0] == 404


def test_form_that_is_not_multipart_has_no_filedata(env: Env) -> None:
    # http.md: missing filedata -> 404, whatever the form; a POST without a
    # Content-Type stays 400 (Server-wide: POST needs one).
    msg_id = env.prep()
    conn = Connection(env.site)
    conn.send(http("POST", f"/q/test/{msg_id}/attach/new", b"x_format=json&filedata=abc",
                   {"Content-Type": "application/x-www-form-urlencoded"}))
    code, headers, body = conn.response()
    assert (code, json.loads(body)) == (404, ["fail", "missing filedata"])
    conn = Connection(env.site)
    conn.send(http("POST", f"/q/test/{msg_id}/attach/new"))
    code, headers, body = conn.response()
    assert (code, json.loads(body)) == (400, ["fail", "multipart/form-data body expected"])
    conn = Connection(env.site)
    conn.send(http("POST", f"/q/test/{msg_id}/attach/new", b"--x--\r\n", {"Content-Type": "multipart/form-data"}))
    assert conn.response()[0] == 400
    attach = os.path.join(env.queue.store.msg_dir("prep", msg_id), "attach")
    assert not os.path.isdir(attach) or os.listdir(attach) == []
    assert env.temp_files() == []


def test_unknown_queue_is_404_before_the_body(env: Env) -> None:
    conn = Connection(env.site)
    request = form_post("1", multipart("a", PAYLOAD)).replace(b"/q/test/", b"/q/nosuch/")
    conn.send(request[: request.index(b"\r\n\r\n") + 4])
    code, _, body = conn.response()
    assert (code, json.loads(body)) == (404, ["fail", "Queue not found"])
    assert conn.transport.disconnecting


@pytest.mark.parametrize("name", ["../../evil", "a/b", ".hidden", "x|y"])
def test_escaping_filename_is_400(env: Env, name: str) -> None:
    msg_id = env.prep()
    conn = Connection(env.site)
    conn.send(form_post(msg_id, multipart(name, PAYLOAD, x_format="json")))
    code, _, body = conn.response()
    assert code == 400
    reply = json.loads(body)
    assert reply[0] == "fail" and name in reply[1]
    assert env.temp_files() == []
    assert not os.path.exists(os.path.join(env.queue.store.msg_dir("prep", msg_id), "attach"))
    assert not os.path.exists(os.path.join(env.queue.store.path, "evil"))


@pytest.mark.parametrize("name", ["a\\b", "a\nb", "a\rb", "C:\\dir\\f", "\\\\host\\f"])
def test_name_no_upload_carries_is_refused_alike_on_both_paths(env: Env, name: str) -> None:
    """
    A name with a backslash or a line break is refused with the same 400 by
    a form upload (its name encoded as browsers and the relay encode it) and
    by a C{PUT}, rather than arriving renamed on one path only (a line break
    or a Windows-like path cut to its last part).
    """
    msg_id = env.prep()
    encoded = name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    answers = []
    for request in (
        form_post(msg_id, multipart(encoded, PAYLOAD, x_format="json")),
        http("PUT", f"/q/test/{msg_id}/attach/{quote(name, safe='')}", PAYLOAD),
    ):
        conn = Connection(env.site)
        conn.send(request)
        code, _, body = conn.response()
        answers.append((code, json.loads(body)))
    reply = (400, ["fail", f"Attachment name has invalid character. not allowed: {name}"])
    assert answers == [reply, reply]
    assert env.queue.store.attachments("prep", msg_id) == {}
    assert env.temp_files() == []


def test_escaping_put_name_is_400(env: Env) -> None:
    msg_id = env.prep()
    conn = Connection(env.site)
    conn.send(http("PUT", f"/q/test/{msg_id}/attach/x%2F..%2F..%2Fevil", b"data"))
    code, _, body = conn.response()
    assert code == 400
    assert json.loads(body) == ["fail", "Attachment name has invalid character. not allowed: x/../../evil"]
    assert env.temp_files() == []


# -- the size cap --------------------------------------------------------------------


def test_content_length_over_cap_refused_before_body(env: Env) -> None:
    env.cap(1000)
    msg_id = env.prep()
    conn = Connection(env.site)
    request = form_post(msg_id, multipart("a", PAYLOAD))
    head = request[: request.index(b"\r\n\r\n")] + b"\r\nExpect: 100-continue\r\n\r\n"
    conn.send(head)
    code, headers, body = conn.response()
    assert code == 413
    assert headers["connection"] == "close"
    assert json.loads(body) == ["fail", "upload larger than max_upload_size (1000 bytes)"]
    assert b"100 Continue" not in conn.transport.value()
    assert conn.transport.disconnecting
    assert env.temp_files() == []


class HalfCloseTransport(StringTransport):
    """
    A TCP-like transport: it can shut its write side and be aborted.
    """

    write_closed = False
    aborted = False
    disconnected = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True


def test_refused_connection_lingers(env: Env) -> None:
    """
    A refused upload's connection sends the answer, shuts its write side
    and reads and drops what the client still sends (closing with unread
    bytes would reset the connection, and the client could lose the 413);
    it is aborted after LINGER seconds if the client does not close.
    """
    from rqtwisted.web.upload_request import LINGER

    env.cap(1000)
    msg_id = env.prep()
    conn = Connection(env.site)
    conn.transport = HalfCloseTransport()
    conn.channel.makeConnection(conn.transport)
    request = http("PUT", f"/q/test/{msg_id}/attach/a", PAYLOAD * 3)
    conn.send(request[:2000])
    code, headers, body = conn.response()
    assert (code, headers["connection"]) == (413, "close")
    assert conn.transport.write_closed and not conn.transport.disconnecting
    conn.send(request[2000:] + http("PUT", f"/q/test/{msg_id}/attach/b", b"more"))
    assert len(conn.responses()) == 1
    clock = env.site.reactor
    clock.advance(LINGER - 0.1)
    assert not conn.transport.aborted
    clock.advance(0.1)
    assert conn.transport.aborted
    assert env.temp_files() == []


@pytest.mark.parametrize("kind", ["form", "put"])
def test_chunked_body_crossing_cap(env: Env, kind: str) -> None:
    env.cap(5000)
    msg_id = env.prep()
    conn = Connection(env.site)
    if kind == "form":
        request = form_post(msg_id, multipart("a", PAYLOAD), chunked_sizes=[1000] * 20)
    else:
        request = http("PUT", f"/q/test/{msg_id}/attach/a", PAYLOAD, chunked_sizes=[1000] * 20)
    conn.send(request[:4000])
    assert conn.transport.value() == b""
    assert len(env.temp_files()) == 1
    conn.send(request[4000:])
    code, _, body = conn.response()
    assert code == 413 and json.loads(body)[0] == "fail"
    assert conn.transport.disconnecting
    assert env.temp_files() == []
    conn.lose()
    assert env.temp_files() == []


def test_other_requests_keep_twisted_bodies(env: Env) -> None:
    conn = Connection(env.site)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    conn.send(http("POST", "/q/test/new_message", b"mesg=%7B%7D", form))
    [request] = env.routes.processed
    assert request.upload is None
    assert request.args[b"mesg"] == [b"{}"]


def test_other_requests_capped(env: Env) -> None:
    conn = Connection(env.site)
    conn.send(b"POST /q/test/new_message HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n")
    assert conn.response()[0] == 413
    assert env.routes.processed == []


# -- disconnects ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["form", "put"])
def test_disconnect_mid_body_removes_temp(env: Env, kind: str) -> None:
    msg_id = env.prep()
    conn = Connection(env.site)
    if kind == "form":
        request = form_post(msg_id, multipart("a", PAYLOAD))
    else:
        request = http("PUT", f"/q/test/{msg_id}/attach/a", PAYLOAD)
    conn.send(request[: len(request) // 2])
    assert len(env.temp_files()) == 1
    conn.lose()
    assert env.temp_files() == []
    assert env.routes.processed == []
    assert env.queue.store.attachments("prep", msg_id) == {}


# -- PUT ---------------------------------------------------------------------------------


def test_put_whole_file(env: Env) -> None:
    msg_id = env.prep()
    conn = Connection(env.site)
    conn.send(http("PUT", f"/q/test/{msg_id}/attach/raw.bin", PAYLOAD, {"X-RQ-MD5": md5(PAYLOAD).upper()}))
    code, _, body = conn.response()
    assert (code, json.loads(body)) == (200, ["ok", f"{md5(PAYLOAD)}-Attached successfully"])
    assert env.attachment(msg_id, "raw.bin") == PAYLOAD
    assert env.temp_files() == []


def test_put_md5_mismatch(env: Env) -> None:
    msg_id = env.prep()
    conn = Connection(env.site)
    conn.send(http("PUT", f"/q/test/{msg_id}/attach/raw.bin", PAYLOAD, {"X-RQ-MD5": "0" * 32}))
    code, _, body = conn.response()
    assert code == 422 and json.loads(body)[1].startswith("md5 mismatch")
    assert env.queue.store.attachments("prep", msg_id) == {}
    assert env.temp_files() == []


def test_put_not_prep(env: Env) -> None:
    conn = Connection(env.site)
    conn.send(http("PUT", "/q/test/20260101.0000.00.000.1/attach/a", b"x"))
    code, _, body = conn.response()
    assert (code, json.loads(body)) == (404, ["fail", "cannot find message"])


def test_down_queue_refuses(env: Env) -> None:
    msg_id = env.prep()
    env.instance.set_admin("down", "test")
    conn = Connection(env.site)
    conn.send(http("PUT", f"/q/test/{msg_id}/attach/a", b"x"))
    assert conn.response()[0] == 503


def chunk(
    env: Env, msg_id: str, data: bytes, start: int, total: int, **headers: str
) -> tuple[int, dict[str, str], Any]:
    conn = Connection(env.site)
    end = start + len(data) - 1
    crange = f"bytes {start}-{end}/{total}" if data else f"bytes */{total}"
    conn.send(http("PUT", f"/q/test/{msg_id}/attach/big.bin", data, {"Content-Range": crange, **headers}))
    code, h, body = conn.response()
    return code, h, json.loads(body)


def counting(uploads: Uploads) -> list[Any]:
    calls: list[Any] = []

    def run(f: Any, *args: Any) -> Any:
        calls.append(f)
        return syncNow(f, *args)

    uploads.runInThread = run
    return calls


def test_resumable_upload(env: Env) -> None:
    msg_id = env.prep()
    hashed_in_thread = counting(env.uploads)
    data = PAYLOAD * 3
    total = len(data)
    a, b = total // 3, 2 * total // 3
    assert chunk(env, msg_id, b"", 0, total)[::2] == (308, ["partial", "0"])
    assert "range" not in chunk(env, msg_id, b"", 0, total)[1]
    code, headers, reply = chunk(env, msg_id, data[:a], 0, total)
    assert (code, headers["range"], reply) == (308, f"bytes=0-{a - 1}", ["partial", str(a)])
    # A repeated or skipped chunk is refused with what is held.
    code, headers, reply = chunk(env, msg_id, data[b:], b, total)
    assert (code, headers["range"], reply[0]) == (416, f"bytes=0-{a - 1}", "fail")
    code, headers, reply = chunk(env, msg_id, data[a:b], a, total)
    assert (code, headers["range"], reply) == (308, f"bytes=0-{b - 1}", ["partial", str(b)])
    code, headers, reply = chunk(env, msg_id, b"", 0, total)
    assert (code, headers["range"]) == (308, f"bytes=0-{b - 1}")
    code, _, reply = chunk(env, msg_id, data[b:], b, total, **{"X-RQ-MD5": md5(data)})
    assert (code, reply) == (200, ["ok", f"{md5(data)}-Attached successfully"])
    assert env.attachment(msg_id, "big.bin") == data
    assert env.temp_files() == []
    # The md5 was kept up to date chunk by chunk: the file was not re-read.
    assert hashed_in_thread == []


def test_resumable_md5_without_running_digest(env: Env) -> None:
    """
    After a restart the running md5 is gone: the whole file is hashed.
    """
    msg_id = env.prep()
    data = PAYLOAD * 2
    half = len(data) // 2
    assert chunk(env, msg_id, data[:half], 0, len(data))[0] == 308
    fresh = Uploads(env.instance, syncNow)
    env.routes.uploads = fresh
    env.site.requestFactory = UploadRequest.factory(fresh)
    hashed_in_thread = counting(fresh)
    code, _, reply = chunk(env, msg_id, data[half:], half, len(data), **{"X-RQ-MD5": md5(data)})
    assert (code, reply) == (200, ["ok", f"{md5(data)}-Attached successfully"])
    assert len(hashed_in_thread) == 1


def test_resumable_md5_mismatch_drops_partial(env: Env) -> None:
    msg_id = env.prep()
    data = PAYLOAD
    assert chunk(env, msg_id, data[:100], 0, len(data))[0] == 308
    code, _, reply = chunk(env, msg_id, data[100:], 100, len(data), **{"X-RQ-MD5": "f" * 32})
    assert code == 422 and reply[1].startswith("md5 mismatch")
    assert env.temp_files() == []
    assert chunk(env, msg_id, b"", 0, len(data))[::2] == (308, ["partial", "0"])


def test_resumable_total_over_cap(env: Env) -> None:
    env.cap(1000)
    msg_id = env.prep()
    assert chunk(env, msg_id, b"abc", 0, 1001)[0] == 413


def test_partial_kept_while_busy_refused(env: Env) -> None:
    msg_id = env.prep()
    first = Connection(env.site)
    crange = {"Content-Range": f"bytes 0-{len(PAYLOAD) - 1}/{len(PAYLOAD) * 2}"}
    request = http("PUT", f"/q/test/{msg_id}/attach/big.bin", PAYLOAD, crange)
    first.send(request[:-10])
    code, _, reply = chunk(env, msg_id, b"", 0, len(PAYLOAD) * 2)
    assert code == 409
    first.lose()
    # What arrived before the disconnect is kept and reported.
    code, _, reply = chunk(env, msg_id, b"", 0, len(PAYLOAD) * 2)
    assert (code, reply) == (308, ["partial", str(len(PAYLOAD) - 10)])


def test_partials_dropped_on_commit_and_delete(env: Env) -> None:
    for op in ("commit", "delete"):
        msg_id = env.prep()
        assert chunk(env, msg_id, b"abc", 0, 10)[0] == 308
        assert env.temp_files() == [f"partial/{msg_id}/big.bin"]
        getattr(env.queue, op)(msg_id)
        assert env.temp_files() == []


def test_stale_partials_removed_at_start(env: Env) -> None:
    old, fresh = env.prep(), env.prep()
    assert chunk(env, old, b"abc", 0, 10)[0] == 308
    assert chunk(env, fresh, b"abc", 0, 10)[0] == 308
    with open(os.path.join(env.tmp, "upload-leftover"), "w"):
        pass
    stale = env.instance.clock.seconds() - PARTIAL_MAX_AGE - 10
    os.utime(os.path.join(env.tmp, "partial", old, "big.bin"), (stale, stale))
    env.queue.store.open()
    assert env.temp_files() == [f"partial/{fresh}/big.bin"]


# -- mounted on the app ------------------------------------------------------------------


@pytest.fixture
def app_site(env: Env) -> Site:
    from rqtwisted.web.app import make_site

    site = make_site(env.instance)
    site.reactor = MemoryReactorClock()
    return site


def test_mounted_on_the_app(env: Env, app_site: Site) -> None:
    msg_id = env.prep()
    conn = Connection(app_site)
    conn.send(form_post(msg_id, multipart("a.bin", PAYLOAD, x_format="json")))
    code, _, body = conn.response()
    assert (code, body) == (200, f'["ok","{md5(PAYLOAD)}-Attached successfully"]'.encode())
    conn = Connection(app_site)
    conn.send(form_post(msg_id, multipart("b.bin", b"html")))
    code, headers, _ = conn.response()
    assert code == 303
    assert headers["location"] == f"http://localhost/q/test/{msg_id}"
    assert "rq_flash=" in headers["set-cookie"]
    conn = Connection(app_site)
    conn.send(http("PUT", f"/q/test/{msg_id}/attach/c.bin", b"raw"))
    assert json.loads(conn.response()[2]) == ["ok", f"{md5(b'raw')}-Attached successfully"]
    assert sorted(env.queue.store.attachments("prep", msg_id)) == ["a.bin", "b.bin", "c.bin"]
    assert env.temp_files() == []


def test_names_that_are_not_utf8(env: Env, app_site: Site) -> None:
    """
    Bytes of the path that are not UTF-8 reach the upload routes in their
    percent form, as the other routes see them: such an attachment name is
    refused before the body (not stored as U+FFFD), such a queue is
    unknown; no plain-text 400 from klein.
    """
    msg_id = env.prep()
    conn = Connection(app_site)
    conn.send(http("PUT", f"/q/test/{msg_id}/attach/a%ffb", b"data"))
    code, headers, body = conn.response()
    assert (code, headers["content-type"]) == (400, "application/json")
    assert json.loads(body) == ["fail", "Attachment name has invalid character. not allowed: a%FFb"]
    conn = Connection(app_site)
    conn.send(form_post(msg_id, multipart("a.bin", b"x", x_format="json")).replace(b"/q/test/", b"/q/t%ff/"))
    code, _, body = conn.response()
    assert (code, json.loads(body)) == (404, ["fail", "Queue not found"])
    assert env.queue.store.attachments("prep", msg_id) == {}
    assert env.temp_files() == []


def test_multipart_form_of_other_routes(env: Env, app_site: Site) -> None:
    """
    The multipart body of a route other than the uploads is parsed by the
    uploads' parser into C{args} (file parts included); as with Twisted, a
    form field replaces the query field of its name.
    """
    body = multipart("f.txt", b"file\r\ncontent", mesg='{"dest": "test", "param1": "p"}', x_format="json")
    args = form_args(f"multipart/form-data; boundary={BOUNDARY}", BytesIO(body), chunk_size=7)
    assert args == {b"mesg": [b'{"dest": "test", "param1": "p"}'], b"x_format": [b"json"],
                    b"filedata": [b"file\r\ncontent"]}
    conn = Connection(app_site)
    conn.send(http("POST", "/q/test/new_message?x_format=html", body,
                   {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}))
    code, _, reply = conn.response()
    assert (code, json.loads(reply)[0]) == (200, "ok")
    [msg_id] = env.queue.messages("que") + env.queue.messages("run")
    assert env.queue.get(msg_id)["param1"] == "p"


@pytest.mark.parametrize("path,content_type,body,code,content,reply", [
    ("/q/test/new_message", f"multipart/form-data; boundary={BOUNDARY}", b"--" + BOUNDARY.encode() + b"\r\nbad",
     400, "application/json", ["fail", "malformed multipart body: Unexpected end of multipart stream (parser closed)"]),
    ("/q/test/new_message", "multipart/form-data", b"mesg=x",
     400, "application/json", ["fail", "multipart/form-data body without boundary"]),
    ("/q/test/adminoper", f"multipart/form-data; boundary={BOUNDARY}", b"--" + BOUNDARY.encode() + b"\r\nbad",
     400, "text/plain;charset=utf-8",
     "400 - Malformed multipart body: Unexpected end of multipart stream (parser closed)"),
    ("/q/test/adminoper?x_format=json", "multipart/form-data", b"pause=pause",
     400, "application/json", ["fail", "multipart/form-data body without boundary"]),
    ("/delete_queue", f"multipart/form-data; boundary={BOUNDARY}",
     multipart(None, b"", queue_name="test")[:-30], 400, "text/plain;charset=utf-8",
     "400 - Malformed multipart body: Unexpected end of multipart stream (parser closed)"),
])
def test_malformed_multipart_of_other_routes_is_400_with_reason(
    env: Env, app_site: Site, path: str, content_type: str, body: bytes, code: int, content: str, reply: Any
) -> None:
    """
    A multipart body that cannot be parsed is answered by its route, as
    its other 400s: C{["fail", reason]} where JSON is asked for or the
    default, else C{400 - <Reason>} (Twisted answered an empty 400); the
    route does nothing.
    """
    conn = Connection(app_site)
    conn.send(http("POST", path, body, {"Content-Type": content_type}))
    answer_code, headers, answer = conn.response()
    assert (answer_code, headers["content-type"]) == (code, content)
    assert (json.loads(answer) if content == "application/json" else answer.decode()) == reply
    assert env.queue.admin_status() == "UP"
    assert env.queue.messages("que") + env.queue.messages("run") == []
    assert env.instance.queues.get("test") is not None


def test_auth_checked_before_the_body(env: Env, app_site: Site) -> None:
    env.instance.settings = dataclasses.replace(
        env.instance.settings, basic_auth={"realm": "RQ", "users": {"ops": "secret"}}
    )
    msg_id = env.prep()
    conn = Connection(app_site)
    request = form_post(msg_id, multipart("a.bin", PAYLOAD, x_format="json"))
    conn.send(request[: request.index(b"\r\n\r\n") + 4])
    code, headers, _ = conn.response()
    assert (code, headers["www-authenticate"]) == (401, 'Basic realm="RQ"')
    assert env.temp_files() == []
    conn = Connection(app_site)
    authorized = request.replace(b"Host: localhost", b"Host: localhost\r\nAuthorization: Basic b3BzOnNlY3JldA==")
    conn.send(authorized)
    assert json.loads(conn.response()[2])[0] == "ok"


def test_buffered_requests_handled_alike(env: Env) -> None:
    """
    Requests of Twisted's own factory (as in-memory route tests make them)
    have their buffered bodies received the same way.
    """
    plain = Site(env.routes, reactor=MemoryReactorClock())
    msg_id = env.prep()
    conn = Connection(plain)
    conn.send(form_post(msg_id, multipart("a.bin", PAYLOAD, x_format="json")))
    assert json.loads(conn.response()[2]) == ["ok", f"{md5(PAYLOAD)}-Attached successfully"]
    conn = Connection(plain)
    conn.send(http("PUT", f"/q/test/{msg_id}/attach/b.bin", PAYLOAD))
    assert json.loads(conn.response()[2]) == ["ok", f"{md5(PAYLOAD)}-Attached successfully"]
    conn = Connection(plain)
    conn.send(form_post(msg_id, multipart("../x", PAYLOAD, x_format="json")))
    assert conn.response()[0] == 400
    assert env.attachment(msg_id, "a.bin") == env.attachment(msg_id, "b.bin") == PAYLOAD
    assert env.temp_files() == []


def test_probe_after_completion_reports_attached(env: Env) -> None:
    msg_id = env.prep()
    data = PAYLOAD
    assert chunk(env, msg_id, data, 0, len(data))[0] == 200
    code, _, reply = chunk(env, msg_id, b"", 0, len(data), **{"X-RQ-MD5": md5(data)})
    assert (code, reply) == (200, ["ok", f"{md5(data)}-Attached successfully"])
    # Another file of that name: start from nothing.
    code, headers, reply = chunk(env, msg_id, b"", 0, len(data), **{"X-RQ-MD5": "0" * 32})
    assert (code, reply, "range" in headers) == (308, ["partial", "0"], False)
    assert chunk(env, msg_id, b"", 0, len(data) + 1)[::2] == (308, ["partial", "0"])


def test_empty_file_by_probe(env: Env) -> None:
    msg_id = env.prep()
    code, _, reply = chunk(env, msg_id, b"", 0, 0)
    assert (code, reply) == (200, ["ok", f"{md5(b'')}-Attached successfully"])
    assert env.attachment(msg_id, "big.bin") == b""
    assert env.temp_files() == []
