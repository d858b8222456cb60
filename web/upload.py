"""
Attachment uploads that stream to disk.

Twisted's L{twisted.web.server.Request} keeps a whole request body (in memory
or a temp file) and parses C{multipart/form-data} in memory. For the two
upload routes L{UploadRequest} replaces that, as soon as the request headers
are in (C{gotLength}):

  - C{POST <root>q/<name>/<id>/attach/new}: a curl/browser multipart form;
    the C{filedata} part (its filename is the attachment name) is spooled to
    the queue's C{tmp/} directory while it arrives, its md5 computed on the
    way (L{rqtwisted.web.formdata.FormSink});
  - C{PUT <root>q/<name>/<id>/attach/<att>}: the raw body (C{curl -T}) is the
    attachment C{<att>}; with C{Content-Range: bytes S-E/T} it is one chunk of
    a resumable upload, appended to C{tmp/partial/<id>/<att>} (kept across
    requests and restarts; see L{attach_put} for the protocol).

Spooled files are on the queue's filesystem, so the store attaches them by
hard link. A body larger than C{max_upload_size} (config.json) is refused
with 413 as soon as C{Content-Length} shows it, else when the limit is
crossed; an attachment name that could leave C{attach/} with 400
(quirks 9). Refusals that come before the body is read answer at once and
close the connection. Temp files are removed when the request ends, however
it ends. Every other request keeps Twisted's behaviour, with bodies capped
at L{MAX_FORM_BODY}.

L{mount_uploads} adds the two routes to the klein app (L{attach_new} /
L{render_attach_new} and L{attach_put}, which find the spooled upload on
C{request.upload}) and returns the site's request factory.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from rqtwisted.message import MessageError, valid_queue_name
from rqtwisted.store import check_attachment_name, md5_file
from rqtwisted.web.formdata import FormError, FormSink, boundary_of
from rqtwisted.web.security import check_access, client_ip
from rqtwisted.web.spool import Spool

if TYPE_CHECKING:
    from rqtwisted.queue import QueueService
    from rqtwisted.supervisor import Instance

_log = Logger()

#: Largest body (bytes) accepted by any route other than the two uploads:
#: Twisted keeps those bodies and parses their forms in memory.
MAX_FORM_BODY = 64 * 1024 * 1024

#: Running md5s of partial uploads remembered (each a few hundred bytes).
MAX_DIGESTS = 1024

#: Queues that router mode never redirects (http.md, "Router mode").
_NOT_ROUTED = ("relay", "cleaner")

# -- routing ------------------------------------------------------------------


@dataclass(frozen=True)
class UploadTarget:
    """
    An upload route matched from a request line.

    @ivar kind: C{"form"} (POST .../attach/new) or C{"put"}.
    @ivar queue: the queue name in the URL.
    @ivar msg_id: the short message id in the URL.
    @ivar name: the attachment name in the URL (C{"put"} only).
    """

    kind: str
    queue: str
    msg_id: str
    name: str | None = None


def path_segments(uri: bytes) -> list[str]:
    """
    The decoded segments of a request target's path, resolved as the app
    resolves them: an absolute URI is cut to its path, the query dropped,
    each segment percent-decoded (UTF-8), then empty and C{.} segments
    skipped and C{..} applied. An encoded C{%2F} stays inside its segment
    (where an attachment name refuses it).
    """
    path = uri.split(b"?", 1)[0].split(b"#", 1)[0]
    if b"://" in path[:10]:
        rest = path.split(b"://", 1)[1]
        path = b"/" + rest.split(b"/", 1)[1] if b"/" in rest else b"/"
    out: list[str] = []
    for raw in path.split(b"/"):
        segment = unquote_to_bytes(raw).decode("utf-8", "replace")
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return out


def match_upload(method: bytes, uri: bytes, relative_root: str) -> UploadTarget | None:
    """
    The upload route a request line names, or C{None} for every other
    request.
    """
    if method not in (b"POST", b"PUT") or b"attach" not in uri:
        return None
    segments = path_segments(uri)
    prefix = [s for s in relative_root.split("/") if s]
    if segments[: len(prefix)] != prefix:
        return None
    rest = segments[len(prefix) :]
    if len(rest) != 5 or rest[0] != "q" or rest[3] != "attach":
        return None
    if method == b"POST":
        return UploadTarget("form", rest[1], rest[2]) if rest[4] == "new" else None
    return UploadTarget("put", rest[1], rest[2], rest[4])


# -- refusals -----------------------------------------------------------------


class UploadRefused(Exception):
    """
    A request the upload routes answer without attaching anything.
    """

    def __init__(
        self,
        code: int,
        body: Any,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "application/json",
    ) -> None:
        """
        @param body: a JSON value (or text when C{content_type} is not JSON).
        """
        super().__init__(code, body)
        self.code = code
        self.body = body
        self.headers = tuple(headers)
        self.content_type = content_type

    def encoded(self) -> bytes:
        """
        The response body.
        """
        if self.content_type == "application/json":
            return compact_json(self.body)
        return str(self.body).encode("utf-8")


def fail(code: int, reason: str, headers: Iterable[tuple[str, str]] = ()) -> UploadRefused:
    """
    A refusal with the JSON body C{["fail", reason]}.
    """
    return UploadRefused(code, ["fail", reason], headers)


# -- Content-Range ------------------------------------------------------------


@dataclass(frozen=True)
class ContentRange:
    """
    A request's C{Content-Range: bytes S-E/T}; C{start} and C{end} are
    C{None} for the status probe C{bytes */T}.
    """

    start: int | None
    end: int | None
    total: int

    @classmethod
    def parse(cls, value: str) -> "ContentRange":
        """
        @raise UploadRefused: not C{bytes S-E/T} with S <= E < T, nor
            C{bytes */T} (400).
        """
        unit, _, spec = value.strip().partition(" ")
        span, _, total_text = spec.strip().partition("/")
        try:
            if unit != "bytes":
                raise ValueError(unit)
            total = int(total_text)
            if span == "*":
                if total < 0:
                    raise ValueError(total_text)
                return cls(None, None, total)
            start_text, _, end_text = span.partition("-")
            start, end = int(start_text), int(end_text)
            if not 0 <= start <= end < total:
                raise ValueError(span)
        except ValueError:
            raise fail(400, f"invalid Content-Range: {value}")
        return cls(start, end, total)


def held_range(held: int) -> tuple[tuple[str, str], ...]:
    """
    The C{Range} header describing C{held} bytes (none when nothing is held).
    """
    return (("Range", f"bytes=0-{held - 1}"),) if held else ()


# -- the uploads of one daemon ------------------------------------------------


class Uploads:
    """
    What the upload requests of one daemon share: the instance (queues,
    settings, syncer), a way to hash files in a thread, the partial uploads
    being written and the running md5 of each partial file.
    """

    def __init__(self, instance: "Instance", runInThread: Callable[..., Deferred[Any]]) -> None:
        """
        @param instance: the daemon's queues and settings.
        @param runInThread: runs a blocking callable off the reactor thread
            and returns a Deferred of its result (L{threads_of}).
        """
        self.instance = instance
        self.runInThread = runInThread
        self._busy: set[str] = set()
        # path -> (size, mtime_ns, md5 object) of partial files.
        self._digests: dict[str, tuple[int, int, Any]] = {}

    @property
    def max_size(self) -> int:
        """
        C{max_upload_size} from config.json (bytes).
        """
        return self.instance.settings.max_upload_size

    @property
    def relative_root(self) -> str:
        """
        The URL prefix (config.json C{relative_root}).
        """
        return self.instance.settings.relative_root

    def queue(self, name: str) -> "QueueService":
        """
        The queue an upload URL addresses (router mode sends every queue but
        C{relay} and C{cleaner} to C{rq_router}).

        @raise UploadRefused: no such queue (404), not running or DOWN (503).
        """
        if name not in _NOT_ROUTED and os.path.exists(
            self.instance.root.join("config", "rq_router_rules.rb")
        ):
            name = "rq_router"
        if not valid_queue_name(name) or not os.path.isdir(self.instance.root.queue_path(name)):
            raise fail(404, "Queue not found")
        queue = self.instance.queues.get(name)
        if queue is None or not queue.running:
            raise fail(503, f"queue {name} is not running")
        if queue.admin_status() == "DOWN":
            raise fail(503, "status: DOWN")
        return queue

    def admit(self, request: Request) -> None:
        """
        C{allowed_ips} and C{basic_auth}, checked before a byte is spooled.

        @raise UploadRefused: 403 / 401 as the app answers them.
        """
        settings = self.instance.settings
        denied = check_access(
            settings.allowed_ips,
            settings.basic_auth,
            client_ip(request),
            request.getHeader(b"authorization"),
        )
        if denied is not None:
            raise UploadRefused(denied.code, denied.body, denied.headers, "text/plain; charset=utf-8")

    def begin(self, target: UploadTarget, headers: Headers, length: int | None) -> "Upload":
        """
        Start receiving the body of an upload request whose headers are in.

        @param length: C{Content-Length}, or C{None} for a chunked body.
        @raise UploadRefused: it is refused before its body is read.
        """
        queue = self.queue(target.queue)
        if target.kind == "form":
            return self._begin_form(queue, target, headers, length)
        assert target.name is not None
        try:
            check_attachment_name(target.name)
        except MessageError as e:
            raise fail(400, e.reason)
        if target.msg_id not in queue.prep:
            raise fail(404, "cannot find message")
        crange = _header(headers, b"content-range")
        if crange is None:
            if length is not None and length > self.max_size:
                raise self.too_large()
            spool = Spool.create(queue.store.state_dir("tmp"))
            return RawUpload(self, queue, target, spool, _header(headers, b"x-rq-md5"))
        content_range = ContentRange.parse(crange)
        if content_range.total > self.max_size:
            raise self.too_large()
        return self._begin_range(queue, target, content_range, headers, length)

    def _begin_form(
        self, queue: "QueueService", target: UploadTarget, headers: Headers, length: int | None
    ) -> "Upload":
        if length is not None and length > self.max_size:
            raise self.too_large()
        try:
            boundary = boundary_of(_header(headers, b"content-type"))
        except FormError as e:
            raise fail(e.code, e.reason)
        tmp = queue.store.state_dir("tmp")

        def open_file(filename: str) -> Spool:
            try:
                check_attachment_name(filename)
            except MessageError as e:
                raise FormError(400, e.reason)
            return Spool.create(tmp)

        try:
            sink = FormSink(boundary, open_file)
        except FormError as e:
            raise fail(e.code, e.reason)
        return FormUpload(self, queue, target, sink)

    def _begin_range(
        self,
        queue: "QueueService",
        target: UploadTarget,
        content_range: ContentRange,
        headers: Headers,
        length: int | None,
    ) -> "Upload":
        assert target.name is not None
        path = queue.store.partial_path(target.msg_id, target.name)
        if path in self._busy:
            raise self.busy()
        held = _size(path)
        if content_range.start is None:
            if length:
                raise fail(400, "a Content-Range */T status probe has no body")
            return RangeUpload(self, queue, target, content_range, path, None, _header(headers, b"x-rq-md5"))
        assert content_range.end is not None
        if content_range.start != held:
            raise fail(
                416,
                f"chunk starts at {content_range.start} but {held} bytes are held",
                held_range(held),
            )
        expected = content_range.end - content_range.start + 1
        if length is not None and length != expected:
            raise fail(400, f"Content-Length {length} does not match Content-Range ({expected} bytes)")
        digest = hashlib.md5() if held == 0 else self._digest(path, held)
        spool = Spool.append(path, held, digest.copy() if digest is not None else None)
        self.claim(path)
        return RangeUpload(self, queue, target, content_range, path, spool, _header(headers, b"x-rq-md5"))

    def too_large(self) -> UploadRefused:
        """
        The 413 refusal.
        """
        return fail(413, f"upload larger than max_upload_size ({self.max_size} bytes)")

    # -- partial files

    @staticmethod
    def busy() -> UploadRefused:
        """
        The 409 refusal of a second writer of one partial file.
        """
        return fail(409, "another upload of this attachment is in progress")

    def claim(self, path: str) -> bool:
        """
        Mark the partial file C{path} as being written; C{False} if it is
        already.
        """
        if path in self._busy:
            return False
        self._busy.add(path)
        return True

    def release(self, path: str, spool: Spool | None) -> None:
        """
        A chunk request on C{path} ended: remember where its md5 stands.
        """
        self._busy.discard(path)
        if spool is None:
            return
        digest = spool.digest()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if digest is not None and st.st_size == spool.size:
            self._digests.pop(path, None)
            self._digests[path] = (st.st_size, st.st_mtime_ns, digest)
            while len(self._digests) > MAX_DIGESTS:
                del self._digests[next(iter(self._digests))]

    def _digest(self, path: str, size: int) -> Any:
        """
        The running md5 of the partial file C{path} if it is known and the
        file is as it was left (C{size} bytes, same mtime).
        """
        cached = self._digests.get(path)
        if cached is None:
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if (st.st_size, st.st_mtime_ns) != cached[:2] or size != st.st_size:
            return None
        return cached[2]

    def forget(self, path: str) -> None:
        """
        Remove the partial file C{path} and what is known about it.
        """
        self._digests.pop(path, None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass

    def partial_md5(self, path: str, size: int) -> Deferred[str]:
        """
        The md5 of a complete partial file: from the running digest if it
        covers the whole file, else read in a thread.
        """
        digest = self._digest(path, size)
        if digest is not None:
            return succeed(digest.hexdigest())
        return self.runInThread(md5_file, path)


def threads_of(reactor: Any) -> Callable[..., Deferred[Any]]:
    """
    C{deferToThreadPool} on the reactor's thread pool; without a reactor
    (in-memory tests) the call runs at once.
    """
    if reactor is None:
        return maybeDeferred

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def upload_request_factory(instance: "Instance", reactor: Any) -> Callable[..., "UploadRequest"]:
    """
    The C{requestFactory} of the daemon's L{twisted.web.server.Site}.
    """
    return UploadRequest.factory(Uploads(instance, threads_of(reactor)))


def _header(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1").strip() if values else None


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


# -- one upload ---------------------------------------------------------------


@dataclass
class Upload:
    """
    The body of one upload request, being received.

    @ivar fields: form fields to merge into C{request.args}.
    """

    uploads: Uploads
    queue: "QueueService"
    target: UploadTarget
    received: int = field(default=0, init=False)
    fields: dict[str, list[str]] = field(default_factory=dict, init=False)

    def write(self, data: bytes) -> None:
        """
        A chunk of the body.

        @raise UploadRefused: the upload cannot go on.
        """
        self.received += len(data)
        if self.received > self.uploads.max_size:
            raise self.uploads.too_large()

    def finish(self) -> None:
        """
        The whole body arrived.

        @raise UploadRefused: it is not acceptable.
        """

    def discard(self) -> None:
        """
        The request ended: remove temp files. Idempotent.
        """


@dataclass
class FormUpload(Upload):
    """
    C{POST .../attach/new}: a multipart form.
    """

    sink: FormSink | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        assert self.sink is not None
        try:
            self.sink.feed(data)
        except FormError as e:
            raise fail(e.code, e.reason)

    def finish(self) -> None:
        assert self.sink is not None
        try:
            self.sink.close()
        except FormError as e:
            raise fail(e.code, e.reason)
        self.fields = self.sink.fields

    @property
    def file(self) -> Spool | None:
        """
        The spooled C{filedata} part.
        """
        return self.sink.file if self.sink is not None else None

    @property
    def filename(self) -> str | None:
        """
        Its filename: the attachment name.
        """
        return self.sink.filename if self.sink is not None else None

    def discard(self) -> None:
        if self.sink is not None and self.sink.file is not None:
            self.sink.file.discard()


@dataclass
class RawUpload(Upload):
    """
    C{PUT .../attach/<att>} without C{Content-Range}: the body is the file.
    """

    spool: Spool | None = None
    expected_md5: str | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        assert self.spool is not None
        self.spool.write(data)

    def finish(self) -> None:
        assert self.spool is not None
        self.spool.close()

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()


@dataclass
class RangeUpload(Upload):
    """
    C{PUT .../attach/<att>} with C{Content-Range}: one chunk of a resumable
    upload (C{spool} is C{None} for a status probe).
    """

    content_range: ContentRange | None = None
    path: str = ""
    spool: Spool | None = None
    expected_md5: str | None = None
    _released: bool = field(default=False, init=False)

    def write(self, data: bytes) -> None:
        assert self.content_range is not None
        if self.spool is None:
            raise fail(400, "a Content-Range */T status probe has no body")
        assert self.content_range.start is not None and self.content_range.end is not None
        if self.spool.size + len(data) > self.content_range.end + 1:
            raise fail(400, "body longer than its Content-Range")
        self.received += len(data)
        self.spool.write(data)

    def finish(self) -> None:
        self.discard()

    @property
    def held(self) -> int:
        """
        Bytes of the partial file now.
        """
        return self.spool.size if self.spool is not None else _size(self.path)

    def discard(self) -> None:
        if self._released:
            return
        self._released = True
        if self.spool is not None:
            self.spool.close()
        self.uploads.release(self.path, self.spool)


# -- the request --------------------------------------------------------------


class UploadRequest(Request):
    """
    A L{twisted.web.server.Request} that streams the bodies of the upload
    routes to disk (module docstring); C{request.upload} is the L{Upload}
    of such a request, C{None} for others.
    """

    upload: Upload | None = None

    def __init__(self, channel: Any, *args: Any, uploads: Uploads, **kwargs: Any) -> None:
        """
        @param uploads: the daemon's L{Uploads}.
        """
        super().__init__(channel, *args, **kwargs)
        self.uploads = uploads
        self.upload = None
        self._refused = False
        self._bodyBytes = 0

    @classmethod
    def factory(cls, uploads: Uploads) -> Callable[..., "UploadRequest"]:
        """
        A C{requestFactory} for a L{twisted.web.server.Site}.
        """

        def make(channel: Any, *args: Any, **kwargs: Any) -> UploadRequest:
            return cls(channel, *args, uploads=uploads, **kwargs)

        return make

    def gotLength(self, length: int | None) -> None:
        """
        The headers are in: decide how the body is received.
        """
        channel = self.channel
        target = match_upload(channel._command, channel._path, self.uploads.relative_root)
        if target is None:
            if length is not None and length > MAX_FORM_BODY:
                self.content = BytesIO()
                self._refuse(fail(413, f"request body larger than {MAX_FORM_BODY} bytes"))
                return
            super().gotLength(length)
            return
        self.content = BytesIO()
        try:
            self.uploads.admit(self)
            self.upload = self.uploads.begin(target, self.requestHeaders, length)
        except UploadRefused as e:
            self._refuse(e)
        except Exception:
            _log.failure("upload to {uri} could not start", uri=channel._path)
            self._refuse(fail(500, "upload could not start"))

    def handleContentChunk(self, data: bytes) -> None:
        """
        A piece of the body: to the upload, or Twisted's content file.
        """
        if self._refused:
            return
        if self.upload is None:
            self._bodyBytes += len(data)
            if self._bodyBytes > MAX_FORM_BODY:
                self._refuse(fail(413, f"request body larger than {MAX_FORM_BODY} bytes"))
                return
            super().handleContentChunk(data)
            return
        try:
            self.upload.write(data)
        except UploadRefused as e:
            self._refuse(e)
        except Exception:
            _log.failure("upload to {uri} failed", uri=self.channel._path)
            self._refuse(fail(500, "upload failed"))

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The body is complete: finish the upload, then route as usual.
        """
        if self._refused:
            return
        if self.upload is not None:
            try:
                self.upload.finish()
            except UploadRefused as e:
                self._refuse(e, (command, path, version))
                return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """
        Add the upload's form fields to C{args}, then route.
        """
        if self.upload is not None:
            for name, values in self.upload.fields.items():
                self.args.setdefault(name.encode("utf-8"), []).extend(v.encode("utf-8") for v in values)
        super().process()

    def _refuse(self, refusal: UploadRefused, line: tuple[bytes, bytes, bytes] | None = None) -> None:
        """
        Answer now, before (or instead of) reading the rest of the body, and
        close the connection: the client may still be sending.
        """
        self._refused = True
        self._discard()
        channel = self.channel
        if channel is None or self.startedWriting:
            return
        if line is None:
            line = (channel._command, channel._path, channel._version)
        self.method, self.uri, self.clientproto = line
        self.path = self.uri.split(b"?", 1)[0]
        # No "100 Continue" after this answer.
        self.requestHeaders.removeHeader(b"expect")
        body = refusal.encoded()
        self.setResponseCode(refusal.code)
        for name, value in refusal.headers:
            self.setHeader(name, value)
        self.setHeader(b"content-type", refusal.content_type.encode("latin-1"))
        self.setHeader(b"content-length", b"%d" % len(body))
        self.setHeader(b"connection", b"close")
        self.write(body)
        channel.loseConnection()

    def _discard(self) -> None:
        if self.upload is not None:
            self.upload.discard()

    def finish(self) -> None:
        """
        The response is complete: temp files go.
        """
        try:
            super().finish()
        finally:
            self._discard()

    def connectionLost(self, reason: Failure) -> None:
        """
        The client went away: temp files go.
        """
        try:
            super().connectionLost(reason)
        finally:
            self._discard()


# -- the routes ---------------------------------------------------------------


@dataclass(frozen=True)
class AttachOutcome:
    """
    What an attach request came to: the HTTP status and the JSON reply
    (C{["ok", "<md5>-Attached successfully"]} or C{["fail", reason]}).
    """

    code: int
    reply: list[str]

    @property
    def ok(self) -> bool:
        """
        Was the file attached?
        """
        return self.reply[0] == "ok"


def _reply_of(d: Deferred[str]) -> Deferred[AttachOutcome]:
    def failed(f: Failure) -> AttachOutcome:
        if f.check(MessageError):
            return AttachOutcome(200, ["fail", f.value.reason])
        _log.failure("attach failed", f)
        return AttachOutcome(500, ["fail", f"attach failed: {f.getErrorMessage()}"])

    return d.addCallbacks(lambda result: AttachOutcome(200, ["ok", result]), failed)


def _attach(queue: "QueueService", msg_id: str, path: str, name: str, md5: str | None) -> Deferred[AttachOutcome]:
    try:
        d = queue.attach(msg_id, path, name, md5)
    except MessageError as e:
        return succeed(AttachOutcome(200, ["fail", e.reason]))
    return _reply_of(d)


def received_upload(request: Any, uploads: Uploads, target: UploadTarget) -> Upload:
    """
    The upload a request carries: the one L{UploadRequest} streamed, or, for
    a request made by another factory (in-memory tests), its buffered body
    received the same way here.

    @raise UploadRefused: unknown queue, DOWN, malformed body, ...
    """
    upload = getattr(request, "upload", None)
    if isinstance(upload, Upload):
        return upload
    content = request.content
    content.seek(0, os.SEEK_END)
    length = content.tell()
    content.seek(0)
    upload = uploads.begin(target, request.requestHeaders, length)
    try:
        for chunk in iter(lambda: content.read(1 << 16), b""):
            upload.write(chunk)
        upload.finish()
    except BaseException:
        upload.discard()
        raise
    request.notifyFinish().addBoth(lambda _: upload.discard())
    return upload


def attach_new(request: Any, uploads: Uploads, name: str, msg_id: str) -> Deferred[AttachOutcome]:
    """
    C{POST .../<id>/attach/new}: attach the spooled C{filedata} part under
    its filename. No C{filedata} -> 404.
    """
    try:
        form = received_upload(request, uploads, UploadTarget("form", name, msg_id))
    except UploadRefused as e:
        return succeed(AttachOutcome(e.code, e.body if isinstance(e.body, list) else ["fail", str(e.body)]))
    assert isinstance(form, FormUpload)
    if form.file is None or form.filename is None:
        return succeed(AttachOutcome(404, ["fail", "missing filedata"]))
    d = _attach(form.queue, msg_id, form.file.path, form.filename, form.file.md5())
    return d.addBoth(_discarding(form))


def _discarding(upload: Upload) -> Callable[[Any], Any]:
    def discard(result: Any) -> Any:
        upload.discard()
        return result

    return discard


def render_json(request: Any, code: int, body: Any, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """
    Set the status, C{Content-Type: application/json} and C{headers}; the
    encoded body.
    """
    request.setResponseCode(code)
    for k, v in headers:
        request.setHeader(k, v)
    request.setHeader(b"content-type", b"application/json")
    return compact_json(body)


def compact_json(value: Any) -> bytes:
    """
    JSON without spaces, as the original answers: C{["ok","..."]}.
    """
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def ruby_inspect(reply: list[str]) -> str:
    """
    A reply array as the original printed it in texts:
    C{["fail", "cannot find message"]}.
    """
    return json.dumps(reply, ensure_ascii=False)


def render_attach_new(
    request: Any,
    outcome: AttachOutcome,
    name: str,
    msg_id: str,
    redirect_ok: Callable[[Any, str], bytes] | None = None,
) -> bytes:
    """
    The answer of C{attach/new} (http.md): JSON for C{x_format=json}; HTML
    otherwise: success -> C{redirect_ok(request, "Attached message
    successfully")} (flash + 303 to the message page, from the app), failure
    -> 200 text C{Commit <name>/<id> got <result>}.
    """
    x_format = (request.args.get(b"x_format") or [b"html"])[-1]
    if x_format == b"json" or outcome.code != 200:
        return render_json(request, outcome.code, outcome.reply)
    if outcome.ok and redirect_ok is not None:
        return redirect_ok(request, "Attached message successfully")
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"text/plain;charset=utf-8")
    if outcome.ok:
        return f"Attached message successfully: {outcome.reply[1]}".encode("utf-8")
    return f"Commit {name}/{msg_id} got {ruby_inspect(outcome.reply)}".encode("utf-8")


def attach_put(request: Any, uploads: Uploads, name: str, msg_id: str, att: str) -> Deferred[bytes]:
    """
    C{PUT .../<id>/attach/<att>}: always answered in JSON.

    Without C{Content-Range} the body is the whole file: attached, 200
    C{["ok","<md5>-Attached successfully"]} (a partial upload of the same
    name is dropped).

    Resumable (the Google resumable-upload convention): C{Content-Range:
    bytes S-E/T} appends the body at offset S of the partial file, where S
    must equal the bytes held (else 416 with C{Range} and the reason; 409 if
    another chunk of it is being received). While incomplete: 308 with
    C{Range: bytes=0-<held-1>} (no C{Range} when nothing is held) and
    C{["partial","<held>"]}. C{Content-Range: bytes */T} with an empty body
    asks for that status; it answers 200 C{["ok","<md5>-Attached
    successfully"]} when nothing is held but the attachment is there already
    with T bytes (and the C{X-RQ-MD5} given, if any): a lost answer. With the last byte the file is checked against an
    optional C{X-RQ-MD5: <hex>} (mismatch: 422 C{["fail","md5 mismatch ..."]},
    partial dropped), attached, and answered as above. A C{X-RQ-MD5} on a
    whole-file C{PUT} is checked the same way.
    """
    try:
        upload = received_upload(request, uploads, UploadTarget("put", name, msg_id, att))
    except UploadRefused as e:
        return succeed(render_json(request, e.code, e.body, e.headers))
    if isinstance(upload, RawUpload) and upload.spool is not None:
        return _put_whole(request, uploads, upload)
    if isinstance(upload, RangeUpload):
        return _put_range(request, uploads, upload)
    return succeed(render_json(request, 400, ["fail", "upload not received"]))


def _md5_mismatch(expected: str | None, actual: str) -> str | None:
    if expected is None or expected.lower() == actual:
        return None
    return f"md5 mismatch: received {actual}, expected {expected.lower()}"


def _put_whole(request: Any, uploads: Uploads, upload: RawUpload) -> Deferred[bytes]:
    assert upload.spool is not None and upload.target.name is not None
    md5 = upload.spool.md5()
    assert md5 is not None
    mismatch = _md5_mismatch(upload.expected_md5, md5)
    if mismatch is not None:
        upload.discard()
        return succeed(render_json(request, 422, ["fail", mismatch]))
    d = _attach(upload.queue, upload.target.msg_id, upload.spool.path, upload.target.name, md5)

    def done(outcome: AttachOutcome) -> bytes:
        upload.discard()
        if outcome.ok:
            uploads.forget(upload.queue.store.partial_path(upload.target.msg_id, upload.target.name or ""))
        return render_json(request, _put_code(outcome), outcome.reply)

    return d.addCallback(done)


def _put_code(outcome: AttachOutcome) -> int:
    if outcome.ok or outcome.code != 200:
        return outcome.code
    reason = outcome.reply[1] if len(outcome.reply) > 1 else ""
    if reason == "cannot find message":
        return 404
    if reason == "status: DOWN":
        return 503
    return 400


def _put_range(request: Any, uploads: Uploads, upload: RangeUpload) -> Deferred[bytes]:
    assert upload.content_range is not None and upload.target.name is not None
    held = upload.held
    total = upload.content_range.total
    path = upload.path
    if upload.spool is None and held == 0 and total > 0:
        return _probe_attached(request, uploads, upload, total)
    if held < total:
        partial = render_json(request, 308, ["partial", str(held)], held_range(held))
        if upload.spool is None or upload.received == 0:
            return succeed(partial)
        parents = [os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
        return uploads.instance.syncer.sync(path, *parents).addCallback(lambda _: partial)
    if held > total:
        uploads.forget(path)
        return succeed(render_json(request, 416, ["fail", f"{held} bytes held for a {total} byte file; start again"]))
    if not uploads.claim(path):
        refusal = uploads.busy()
        return succeed(render_json(request, refusal.code, refusal.body))
    if total == 0:
        # An empty file is complete as soon as it is asked for.
        Spool.append(path, 0).close()

    def check(md5: str) -> Deferred[AttachOutcome] | AttachOutcome:
        mismatch = _md5_mismatch(upload.expected_md5, md5)
        if mismatch is not None:
            uploads.forget(path)
            return AttachOutcome(422, ["fail", mismatch])
        return _attach(upload.queue, upload.target.msg_id, path, upload.target.name or "", md5)

    def done(outcome: AttachOutcome) -> bytes:
        if outcome.ok:
            uploads.forget(path)
        return render_json(request, _put_code(outcome), outcome.reply)

    def unbusy(result: Any) -> Any:
        uploads.release(path, None)
        return result

    d = uploads.partial_md5(path, held)
    d.addCallback(check)
    d.addBoth(unbusy)
    return d.addCallback(done)


def _probe_attached(request: Any, uploads: Uploads, upload: RangeUpload, total: int) -> Deferred[bytes]:
    """
    A status probe when nothing is held: if the message already has this
    attachment with C{total} bytes (and the C{X-RQ-MD5} given, if any), the
    upload is complete (an earlier answer was lost): 200 with its md5.
    Else 308, nothing held.
    """
    assert upload.target.name is not None
    nothing = render_json(request, 308, ["partial", "0"])
    existing = os.path.join(upload.queue.store.msg_dir("prep", upload.target.msg_id), "attach", upload.target.name)
    if not os.path.isfile(existing) or _size(existing) != total:
        return succeed(nothing)

    def answer(md5: str) -> bytes:
        if _md5_mismatch(upload.expected_md5, md5) is not None:
            return nothing
        return render_json(request, 200, ["ok", f"{md5}-Attached successfully"])

    return uploads.runInThread(md5_file, existing).addCallback(answer)


def mount_uploads(app: Any, web: Any) -> Callable[..., UploadRequest]:
    """
    Add the upload routes to the klein C{app} of C{web} (an
    L{rqtwisted.web.app.RQWeb}: its instance, reactor, flash notices and
    redirects) and return the L{UploadRequest} factory for the site.
    """
    uploads = Uploads(web.instance, threads_of(web.reactor))

    @app.route("/q/<name>/<msg_id>/attach/new", methods=["POST"], endpoint="attach_new:POST")
    def post_attachment(request: Any, name: str, msg_id: str) -> Deferred[bytes]:
        """
        C{POST /q/<name>/<id>/attach/new} (R): a multipart upload.
        """

        def redirect_ok(request: Any, text: str) -> bytes:
            web._notify(request, text)
            return web._redirect(request, web._url("q", form_queue(request, name), msg_id))

        d = attach_new(request, uploads, name, msg_id)
        return d.addCallback(lambda outcome: render_attach_new(request, outcome, name, msg_id, redirect_ok))

    @app.route("/q/<name>/<msg_id>/attach/<att>", methods=["PUT"], endpoint="attach_put:PUT")
    def put_attachment(request: Any, name: str, msg_id: str, att: str) -> Deferred[bytes]:
        """
        C{PUT /q/<name>/<id>/attach/<att>} (R): a raw or resumable upload.
        """
        return attach_put(request, uploads, name, msg_id, att)

    def form_queue(request: Any, name: str) -> str:
        upload = getattr(request, "upload", None)
        return upload.queue.name if isinstance(upload, Upload) else name

    return UploadRequest.factory(uploads)
