"""
The request that streams upload bodies to disk.

L{UploadRequest} is the daemon's C{requestFactory}: as soon as the headers of
a request are in (C{gotLength}) it asks L{rqtwisted.web.upload.match_upload}
whether the request is one of the two upload routes; if so the body goes,
chunk by chunk, to an L{rqtwisted.web.upload.Upload} (spooled to the queue's
C{tmp/}, hashed on the way) instead of Twisted's in-memory content, refusals
are answered before the body is read, and temp files go when the request
ends, however it ends. Other requests keep Twisted's behaviour, with bodies
capped at L{rqtwisted.web.upload.MAX_FORM_BODY}, except that a
C{multipart/form-data} POST body is parsed by the upload routes' parser
(L{rqtwisted.web.formdata.form_args}): a malformed one leaves its reason in
C{request.form_error} for the route to answer (Twisted answers an empty 400
and closes the connection).
"""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING, Any, Callable

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from rqtwisted.web.formdata import FormError, form_args, media_type
from rqtwisted.web.upload import MAX_FORM_BODY, Upload, UploadRefused, Uploads, fail, match_upload, threads_of

if TYPE_CHECKING:
    from rqtwisted.supervisor import Instance

_log = Logger()

#: Seconds a connection whose request was refused keeps reading (and
#: dropping) what the client still sends, after the answer (L{linger}).
LINGER = 5.0


def _drop(data: bytes) -> None:
    """
    Ignore bytes a lingering connection receives.
    """


def linger(channel: Any) -> None:
    """
    Close the connection of a request refused while its client may still be
    sending the body: send the answer, shut the write side (FIN), and read
    and drop whatever still arrives until the client closes, at most
    L{LINGER} seconds.

    Closing at once while unread bytes are in flight makes the kernel answer
    them with a reset, and a client still sending (one that does not wait for
    C{100 Continue}, as relay peers) often loses the answer it had not read
    yet: it sees "connection reset" instead of the 413.
    """
    transport = channel.transport
    half_close = getattr(transport, "loseWriteConnection", None)
    if transport is None or half_close is None:
        channel.loseConnection()
        return
    channel.dataReceived = _drop
    resume = getattr(transport, "resumeProducing", None)
    if resume is not None:
        # Reading may be paused (a request being handled): drain.
        resume()
    half_close()

    def close() -> None:
        if not getattr(transport, "disconnected", False):
            transport.abortConnection()

    call_later = getattr(channel, "callLater", None)
    if call_later is not None:
        call_later(LINGER, close)


class UploadRequest(Request):
    """
    A L{twisted.web.server.Request} that streams the bodies of the upload
    routes to disk (module docstring); C{request.upload} is the L{Upload}
    of such a request, C{None} for others.

    @ivar form_error: why the C{multipart/form-data} body of another POST
        could not be parsed (its fields are then not in C{args}), else
        C{None}.
    """

    upload: Upload | None = None
    form_error: str | None = None

    def __init__(self, channel: Any, *args: Any, uploads: Uploads, **kwargs: Any) -> None:
        """
        @param uploads: the daemon's L{Uploads}.
        """
        super().__init__(channel, *args, **kwargs)
        self.uploads = uploads
        self.upload = None
        self.form_error = None
        self._refused = False
        self._bodyBytes = 0
        # The content type of a multipart body process() parses.
        self._form_type: str | None = None

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
        elif command == b"POST" and self.content.tell():
            content_type = self.getHeader(b"content-type")
            form_type = None if content_type is None else content_type.decode("latin-1")
            if form_type is not None and media_type(form_type) == "multipart/form-data":
                # Parsed in process(), not by Twisted.
                self._form_type = form_type
                self._parsePOSTFormSubmission = False
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """
        Add the form fields of the upload, or of a multipart body, to
        C{args}, then route.
        """
        if self.upload is not None:
            for name, values in self.upload.fields.items():
                self.args.setdefault(name.encode("utf-8"), []).extend(v.encode("utf-8") for v in values)
        elif self._form_type is not None:
            self.content.seek(0)
            try:
                # As Twisted does: form fields replace query fields of the same name.
                self.args.update(form_args(self._form_type, self.content))
            except FormError as e:
                self.form_error = e.reason
            self.content.seek(0)
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
        linger(channel)

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


def upload_request_factory(instance: "Instance", reactor: Any) -> Callable[..., "UploadRequest"]:
    """
    The C{requestFactory} of the daemon's L{twisted.web.server.Site}.
    """
    return UploadRequest.factory(Uploads(instance, threads_of(reactor)))
