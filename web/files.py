"""
Files sent from disk: attachments, job logs and static assets.

L{FileResource} streams one regular file with a push producer
(L{FileProducer}): it writes chunks while the connection takes them and
stops when the transport pauses it, so a file is never read whole and no
timer or cooperator is involved. It supports what spec/http.md asks of file
routes: one byte range. C{Range: bytes=N-} (or C{N-M}, C{-N}) gives 206 with
C{Content-Range: bytes N-E/SIZE}; a start at or past the end gives 416 with
C{Content-Range: bytes */SIZE}; no range, a malformed one or several ranges
give the whole file (200).

Files users put there (attachments, job logs) are sent with
C{X-Content-Type-Options: nosniff} and C{Content-Security-Policy: sandbox}:
an attachment named C{page.html} is still shown as HTML, but its scripts
never run with the web interface's origin (the forms have no CSRF token).
"""

from __future__ import annotations

import mimetypes
import os
import re
from typing import Any, BinaryIO

from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from zope.interface import implementer

#: Bytes per write.
CHUNK = 64 * 1024

#: Content type of the files the tail view reads: logs are text.
LOG_TYPE = "text/plain; charset=utf-8"

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


@implementer(IPushProducer)
class FileProducer:
    """
    Writes C{length} bytes of an open file, from its current position, to a
    request, as fast as the connection takes them; closes the file and
    finishes the request at the end.
    """

    def __init__(self, request: Any, f: BinaryIO, length: int) -> None:
        self.request = request
        self.file = f
        self.remaining = length
        self.paused = False
        self.done = False
        self._producing = False

    def start(self) -> None:
        """
        Register with the request and write what the connection takes.
        """
        self.request.notifyFinish().addBoth(lambda _: self._close())
        self.request.registerProducer(self, True)
        self._produce()

    def _produce(self) -> None:
        if self._producing:
            return
        self._producing = True
        try:
            while not self.paused and not self.done:
                data = self.file.read(min(CHUNK, self.remaining)) if self.remaining > 0 else b""
                if not data:
                    self._finish()
                    return
                self.remaining -= len(data)
                self.request.write(data)
        finally:
            self._producing = False

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.file.close()
        self.request.unregisterProducer()
        self.request.finish()

    def _close(self) -> None:
        self.done = True
        self.file.close()

    def pauseProducing(self) -> None:
        """
        The connection's buffer is full.
        """
        self.paused = True

    def resumeProducing(self) -> None:
        """
        The connection drained: go on.
        """
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        """
        The connection is gone.
        """
        self._close()


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None | str:
    """
    The byte range C{(start, end)} (inclusive) of a C{Range} header;
    C{None} for the whole file; C{"unsatisfiable"} for a start past the end.
    """
    if header is None:
        return None
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "," in text:
        return None
    match = _RANGE.match(text)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        length = int(last)
        if length == 0:
            return "unsatisfiable"
        return (max(0, size - length), size - 1) if size else "unsatisfiable"
    start = int(first)
    if start >= size:
        return "unsatisfiable"
    end = int(last) if last else size - 1
    if end < start:
        return None
    return start, min(end, size - 1)


class FileResource(resource.Resource):
    """
    One regular file, streamed, with single-range support.
    """

    isLeaf = True

    def __init__(self, path: str, content_type: str | None = None, sandbox: bool = False) -> None:
        """
        @param path: the file.
        @param content_type: the type to send (default: from the extension,
            else C{application/octet-stream}).
        @param sandbox: a file from users: never sniffed, and shown in a
            sandbox (no scripts, an origin of its own) if a browser renders it.
        """
        super().__init__()
        self.path = path
        self.sandbox = sandbox
        if content_type is None:
            guessed, encoding = mimetypes.guess_type(path)
            content_type = guessed if guessed and not encoding else "application/octet-stream"
            if content_type.startswith("text/") or content_type in ("application/javascript",):
                content_type += "; charset=utf-8"
        self.content_type = content_type

    def render_GET(self, request: Any) -> Any:
        """
        Send the file, or the range asked for.
        """
        try:
            f = open(self.path, "rb")
        except OSError:
            return not_found(request)
        size = os.fstat(f.fileno()).st_size
        if not os.path.isfile(self.path):
            f.close()
            return not_found(request)
        request.setHeader(b"accept-ranges", b"bytes")
        if self.sandbox:
            request.setHeader(b"x-content-type-options", b"nosniff")
            request.setHeader(b"content-security-policy", b"sandbox")
        request.setHeader(b"content-type", self.content_type.encode("ascii"))
        wanted = parse_range(request.getHeader(b"range"), size)
        if wanted == "unsatisfiable":
            f.close()
            request.setResponseCode(416)
            request.setHeader(b"content-range", b"bytes */%d" % size)
            request.setHeader(b"content-length", b"0")
            return b""
        if isinstance(wanted, tuple):
            start, end = wanted
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end, size))
            f.seek(start)
            length = end - start + 1
        else:
            request.setResponseCode(200)
            length = size
        request.setHeader(b"content-length", b"%d" % length)
        if request.method == b"HEAD" or length == 0:
            f.close()
            return b""
        FileProducer(request, f, length).start()
        return server.NOT_DONE_YET

    render_HEAD = render_GET


def file_resource(path: str, text: bool = False, sandbox: bool = False) -> FileResource:
    """
    The resource that sends C{path} (a log when C{text}: plain text whatever
    its extension; see L{FileResource} for C{sandbox}).
    """
    return FileResource(path, LOG_TYPE if text else None, sandbox)


def tail_bytes(path: str, limit: int) -> tuple[bytes, int, int, int]:
    """
    The end of a file for the tail view, cut at a line start.

    @return: C{(data, start offset, file size, total lines)}; C{data} is at
        most C{limit} bytes ending at the end of the file; the line count is
        made in chunks, never reading the file whole.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        total = 0
        for chunk in iter(lambda: f.read(1 << 20), b""):
            total += chunk.count(b"\n")
        size = f.tell()
        start = max(0, size - limit)
        f.seek(start)
        data = f.read(size - start)
    if start > 0:
        cut = data.find(b"\n")
        if cut >= 0:
            data = data[cut + 1 :]
            start += cut + 1
    return data, start, size, total


def not_found(request: Any) -> bytes:
    """
    A plain 404 for a file route.
    """
    request.setResponseCode(404)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"Not Found"


__all__ = ["FileProducer", "FileResource", "file_resource", "parse_range", "tail_bytes", "not_found"]
