"""
Request bodies of the relay, streamed from disk with back-pressure: the
C{multipart/form-data} upload of the original wire format
(L{MultipartFileProducer}), a byte range of a file for resumable uploads
(L{RangeFileProducer}) and small in-memory bodies (L{BytesProducer}).
Each tells a C{progress} callable of every write (the idle timeout).
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Cooperator, NotPaused, TaskFinished
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

#: Bytes read from an attachment at a time.
READ_SIZE = 64 * 1024


class _CountingConsumer:
    """
    Pass writes on to C{consumer}, telling C{progress} each time.
    """

    def __init__(self, consumer: IConsumer, progress: Callable[[int], None]) -> None:
        self._consumer = consumer
        self._progress = progress

    def write(self, data: bytes) -> None:
        self._progress(len(data))
        self._consumer.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()


@implementer(IBodyProducer)
class BytesProducer:
    """
    A small body, written at once.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """
        Start writing the body to C{consumer}; fires when all is written.
        """
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """
        Stop reading until L{resumeProducing} (back-pressure).
        """
        pass

    def resumeProducing(self) -> None:
        """
        Go on reading.
        """
        pass

    def stopProducing(self) -> None:
        """
        Stop for good (the request was abandoned).
        """
        pass


class _LimitedFile(io.RawIOBase):
    """
    A read-only view of C{length} bytes of an open file from its current
    position (what L{FileBodyProducer} reads).
    """

    def __init__(self, f: io.BufferedReader, length: int) -> None:
        self._f = f
        self._left = length
        self._length = length

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            size = self._left
        data = self._f.read(size)
        self._left -= len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        # Only what FileBodyProducer's length check does: tell and seek to
        # the end and back.
        if whence == 2:
            return self._length
        return self._length - self._left

    def tell(self) -> int:
        return self._length - self._left

    def close(self) -> None:
        self._f.close()
        super().close()


class _FileProducer:
    """
    Back-pressure for a body read from a file: pausing and resuming are
    passed on to the producer in C{_file}, and do nothing once the file is
    read (the transport may still pause the producer while it sends what
    follows the file, such as the closing boundary of a multipart body).
    """

    _file: Any

    def pauseProducing(self) -> None:
        """
        Stop reading until L{resumeProducing} (back-pressure).
        """
        try:
            self._file.pauseProducing()
        except TaskFinished:
            pass

    def resumeProducing(self) -> None:
        """
        Go on reading.
        """
        try:
            self._file.resumeProducing()
        except (TaskFinished, NotPaused):
            pass


@implementer(IBodyProducer)
class RangeFileProducer(_FileProducer):
    """
    Stream bytes C{[start, start + length)} of a file, with back-pressure;
    C{progress(n)} is told of every write.
    """

    def __init__(
        self,
        path: str,
        start: int,
        length: int,
        cooperator: Cooperator,
        progress: Callable[[int], None] = lambda n: None,
    ) -> None:
        f = open(path, "rb")
        f.seek(start)
        self._file = FileBodyProducer(_LimitedFile(f, length), cooperator, READ_SIZE)
        self._raw = f
        self._progress = progress
        self.length = length

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """
        Start writing the body to C{consumer}; fires when all is written.
        """
        d = self._file.startProducing(_CountingConsumer(consumer, self._progress))
        return d.addBoth(self._closed)

    def _closed(self, result: Any) -> Any:
        self._raw.close()
        return result

    def stopProducing(self) -> None:
        """
        Stop for good (the request was abandoned).
        """
        self._file.stopProducing()
        self._raw.close()

    def close(self) -> None:
        """
        Close the file (the exchange is over, or never started).
        """
        self._raw.close()


def _quote_param(value: str) -> str:
    """
    C{value} for a quoted C{Content-Disposition} parameter, as browsers and
    curl write it (WHATWG HTML): C{"}, CR and LF percent-encoded, the rest as
    it is. The receiving parser undoes it, so the peer sees the name itself
    (and refuses it if it must) instead of a renamed one.
    """
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


@implementer(IBodyProducer)
class MultipartFileProducer(_FileProducer):
    """
    A C{multipart/form-data} body of some text fields and one file field,
    the file streamed from disk (the shape of the original relay's upload).
    """

    def __init__(
        self,
        fields: list[tuple[str, str]],
        file_field: str,
        filename: str,
        path: str,
        cooperator: Cooperator,
        progress: Callable[[int], None] = lambda n: None,
        boundary: str | None = None,
    ) -> None:
        self.boundary = boundary or "rq-" + os.urandom(12).hex()
        b = self.boundary.encode("ascii")
        parts = []
        for name, value in fields:
            parts.append(
                b"--" + b + b"\r\n"
                + f'Content-Disposition: form-data; name="{_quote_param(name)}"\r\n\r\n'.encode("utf-8")
                + value.encode("utf-8") + b"\r\n"
            )
        size = os.stat(path).st_size
        parts.append(
            b"--" + b + b"\r\n"
            + (
                f'Content-Disposition: form-data; name="{_quote_param(file_field)}"; '
                f'filename="{_quote_param(filename)}"\r\n'
            ).encode("utf-8")
            + b"Content-Type: application/octet-stream\r\n\r\n"
        )
        self._head = b"".join(parts)
        self._tail = b"\r\n--" + b + b"--\r\n"
        self._file = RangeFileProducer(path, 0, size, cooperator, progress)
        self.length = len(self._head) + size + len(self._tail)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """
        Start writing the body to C{consumer}; fires when all is written.
        """
        consumer.write(self._head)
        d = self._file.startProducing(consumer)
        d.addCallback(lambda _: consumer.write(self._tail))
        return d

    def stopProducing(self) -> None:
        """
        Stop for good (the request was abandoned).
        """
        self._file.stopProducing()

    def close(self) -> None:
        """
        Close the file (the exchange is over, or never started).
        """
        self._file.close()

