"""
Attachment uploads that stream to disk.

Twisted's L{twisted.web.server.Request} keeps a whole request body (in memory
or a temp file) and parses C{multipart/form-data} in memory. For the two
upload routes L{rqtwisted.web.upload_request.UploadRequest} replaces that, as soon as the request headers
are in (C{gotLength}):

  - C{POST <root>q/<name>/<id>/attach/new}: a curl/browser multipart form;
    the C{filedata} part (its filename is the attachment name) is spooled to
    the queue's C{tmp/} directory while it arrives, its md5 computed on the
    way (L{rqtwisted.web.formdata.FormSink});
  - C{PUT <root>q/<name>/<id>/attach/<att>}: the raw body (C{curl -T}) is the
    attachment C{<att>}; with C{Content-Range: bytes S-E/T} it is one chunk of
    a resumable upload, appended to C{tmp/partial/<id>/<att>} (kept across
    requests and restarts; see L{rqtwisted.web.upload_routes.attach_put} for
    the protocol).

Spooled files are on the queue's filesystem, so the store attaches them by
hard link. A body larger than C{max_upload_size} (config.json) is refused
with 413 as soon as C{Content-Length} shows it, else when the limit is
crossed; an attachment name that could leave C{attach/} with 400
(quirks 9). Refusals that come before the body is read answer at once and
close the connection. Temp files are removed when the request ends, however
it ends. Every other request keeps Twisted's behaviour, with bodies capped
at L{MAX_FORM_BODY}.

This module decides how an upload body is received (L{Uploads},
L{Upload} and its kinds); L{rqtwisted.web.upload_request.UploadRequest}
feeds it the body as it arrives; L{rqtwisted.web.upload_routes} answers the
two routes (multipart and raw/resumable C{PUT}) once the body is in.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from rqtwisted.message import MessageError, valid_queue_name
from rqtwisted.router import routed_queue
from rqtwisted.store import check_attachment_name, md5_file
from rqtwisted.threads import reactor_pool
from rqtwisted.web.answers import dumps
from rqtwisted.web.formdata import FormError, FormSink, boundary_of, media_type
from rqtwisted.web.security import check_request
from rqtwisted.web.site import percent_undecodable
from rqtwisted.web.spool import Spool

if TYPE_CHECKING:
    from rqtwisted.queue import QueueService
    from rqtwisted.supervisor import Instance

#: Largest body (bytes) accepted by any route other than the two uploads:
#: Twisted keeps those bodies and parses their forms in memory.
MAX_FORM_BODY = 64 * 1024 * 1024

#: Running md5s of partial uploads remembered (each a few hundred bytes).
MAX_DIGESTS = 1024

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
    each segment percent-decoded (UTF-8; bytes that are not UTF-8 keep
    their percent form, as the app's routes see them:
    L{rqtwisted.web.site.percent_undecodable}), then empty and C{.} segments
    skipped and C{..} applied. An encoded C{%2F} stays inside its segment
    (where an attachment name refuses it).
    """
    path = uri.split(b"?", 1)[0].split(b"#", 1)[0]
    if b"://" in path[:10]:
        rest = path.split(b"://", 1)[1]
        path = b"/" + rest.split(b"/", 1)[1] if b"/" in rest else b"/"
    out: list[str] = []
    for raw in path.split(b"/"):
        segment = percent_undecodable(unquote_to_bytes(raw)).decode("utf-8")
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
            return dumps(self.body)
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
        name = routed_queue(self.instance.root.path, name)
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
        denied = check_request(self.instance.settings, request)
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
        content_type = _header(headers, b"content-type")
        if content_type and media_type(content_type) != "multipart/form-data":
            # A form of another kind (urlencoded) holds no file: its
            # filedata is missing (http.md: 404), as for a multipart form
            # without it. No Content-Type at all stays 400.
            raise fail(404, "missing filedata")
        try:
            boundary = boundary_of(content_type)
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
        held = file_size(path)
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

    return reactor_pool(reactor)


def _header(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1").strip() if values else None


def file_size(path: str) -> int:
    """
    The size of C{path}, 0 when it does not exist.
    """
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
        """
        Feed a chunk to the multipart parser.
        """
        super().write(data)
        assert self.sink is not None
        try:
            self.sink.feed(data)
        except FormError as e:
            raise fail(e.code, e.reason)

    def finish(self) -> None:
        """
        End the form; its fields are then in C{fields}.
        """
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
        """
        Remove the spooled file part, if any.
        """
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
        """
        Spool a chunk of the file.
        """
        super().write(data)
        assert self.spool is not None
        self.spool.write(data)

    def finish(self) -> None:
        """
        Close the spool: the file is complete.
        """
        assert self.spool is not None
        self.spool.close()

    def discard(self) -> None:
        """
        Remove the spooled file.
        """
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
        """
        Append a chunk to the partial file, within its C{Content-Range}.
        """
        assert self.content_range is not None
        if self.spool is None:
            raise fail(400, "a Content-Range */T status probe has no body")
        assert self.content_range.start is not None and self.content_range.end is not None
        if self.spool.size + len(data) > self.content_range.end + 1:
            raise fail(400, "body longer than its Content-Range")
        self.received += len(data)
        self.spool.write(data)

    def finish(self) -> None:
        """
        The chunk is in: release the partial file.
        """
        self.discard()

    @property
    def held(self) -> int:
        """
        Bytes of the partial file now.
        """
        return self.spool.size if self.spool is not None else file_size(self.path)

    def discard(self) -> None:
        """
        The chunk request is over: free its partial file for the next one
        (L{Uploads.release}). Idempotent.
        """
        if self._released:
            return
        self._released = True
        if self.spool is not None:
            self.spool.close()
        self.uploads.release(self.path, self.spool)
