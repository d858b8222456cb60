"""
A C{multipart/form-data} body parsed while it arrives.

L{FormSink} feeds each chunk of the body to the C{multipart} package's push
parser: small fields are collected in memory (bounded), the file part of the
upload goes to a L{web.spool.Spool} chunk by chunk, and file parts of other
names are skipped. No part of the body is ever held whole. L{form_args}
parses the (size-capped) form body of another route with the same parser,
as Twisted's C{request.args} holds it. This module does no network I/O and
does not import Twisted.
"""

from __future__ import annotations

from typing import IO, Callable

from multipart import (
    MultipartError,
    MultipartSegment,
    PushMultipartParser,
    content_disposition_unquote,
    parse_options_header,
)

from rqtwisted.web.spool import Spool

#: Total bytes of the non-file fields of one form.
MAX_FIELD_BYTES = 1 << 20


class FormError(Exception):
    """
    The body cannot be accepted: C{code} is the HTTP status, C{reason} the
    text for the client.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def media_type(content_type: str) -> str:
    """
    The media type of a C{Content-Type} value, lower case, without its
    parameters (C{multipart/form-data; boundary=x} -> C{multipart/form-data}).
    """
    return str(parse_options_header(content_type)[0]).lower()


def boundary_of(content_type: str | None) -> str:
    """
    The boundary of a C{multipart/form-data} content type.

    @raise FormError: another type, or no boundary (400).
    """
    if not content_type:
        raise FormError(400, "multipart/form-data body expected")
    kind, options = parse_options_header(content_type)
    if kind != "multipart/form-data":
        raise FormError(400, f"multipart/form-data body expected, not {kind}")
    boundary = options.get("boundary")
    if not boundary:
        raise FormError(400, "multipart/form-data body without boundary")
    return boundary


def filename_of(segment: MultipartSegment) -> str | None:
    """
    The file name of a part as its C{Content-Disposition} gives it, its
    quoting undone (a browser's C{%0A}, C{%0D} and C{%22}, or backslash
    escapes of a quoted string holding C{\\"}).

    The C{multipart} package takes a name with a backslash in a place a
    Windows path has one (C{C:\\dir\\f}, C{\\\\host\\f}) for a full path and
    keeps its last part; here the name stays whole, so that a form upload
    names its attachment as a C{PUT} does, and the name check refuses it.
    """
    if segment.filename is None:
        return None
    header = segment.header("Content-Disposition", "")
    if "\\" not in header:
        return segment.filename
    _, options = parse_options_header(header, unquote=lambda value, _: content_disposition_unquote(value))
    return str(options.get("filename", segment.filename))


class FormSink:
    """
    Receives a multipart body chunk by chunk.

    @ivar fields: the non-file fields, C{{name: [values]}}.
    @ivar file: the spooled file part, if one arrived (closed once complete).
    @ivar filename: its filename.
    """

    def __init__(
        self,
        boundary: str,
        open_file: Callable[[str], Spool],
        file_field: str = "filedata",
        max_field_bytes: int = MAX_FIELD_BYTES,
    ) -> None:
        """
        @param boundary: from the request's content type (L{boundary_of}).
        @param open_file: called with the file part's filename when its
            headers arrive; returns the spool its content goes to. It may
            raise L{FormError} to refuse the name.
        @param file_field: the field name of the file part.
        @param max_field_bytes: bound on the non-file fields together.
        """
        try:
            self._parser = PushMultipartParser(boundary)
        except MultipartError as e:
            raise FormError(400, f"malformed multipart body: {e}")
        self._open_file = open_file
        self._file_field = file_field
        self._max_field_bytes = max_field_bytes
        self._field_bytes = 0
        self.fields: dict[str, list[str]] = {}
        self.file: Spool | None = None
        self.filename: str | None = None
        # The part being received: a spool, a field buffer, or None (skipped).
        self._target: Spool | bytearray | None = None
        self._name = ""

    def feed(self, data: bytes) -> None:
        """
        Parse one chunk of the body.

        @raise FormError: malformed body (400), fields too large (413), or
            what C{open_file} raised.
        """
        if not data:
            return
        try:
            for event in self._parser.parse(data):
                if isinstance(event, MultipartSegment):
                    self._start(event)
                elif event is None:
                    self._end()
                else:
                    self._payload(event)
        except MultipartError as e:
            raise FormError(400, f"malformed multipart body: {e}")

    def _start(self, segment: MultipartSegment) -> None:
        self._name = segment.name or ""
        if segment.filename is None:
            self._target = bytearray()
        elif self._name == self._file_field and segment.filename and self.file is None:
            self.filename = filename_of(segment) or segment.filename
            self.file = self._open_file(self.filename)
            self._target = self.file
        else:
            # A second file, an empty file input, or a file field we do not
            # store: its content is skipped.
            self._target = None

    def _payload(self, chunk: bytes) -> None:
        target = self._target
        if isinstance(target, Spool):
            target.write(chunk)
        elif isinstance(target, bytearray):
            self._field_bytes += len(chunk)
            if self._field_bytes > self._max_field_bytes:
                raise FormError(413, f"form fields larger than {self._max_field_bytes} bytes")
            target.extend(chunk)

    def _end(self) -> None:
        target = self._target
        if isinstance(target, Spool):
            target.close()
        elif isinstance(target, bytearray):
            self.fields.setdefault(self._name, []).append(target.decode("utf-8", "replace"))
        self._target = None

    def close(self) -> None:
        """
        The body ended: it must have been a complete multipart stream.

        @raise FormError: it was not (400).
        """
        try:
            self._parser.close()
        except MultipartError as e:
            raise FormError(400, f"malformed multipart body: {e}")
        if self.file is not None:
            self.file.close()


def form_args(content_type: str | None, body: IO[bytes], chunk_size: int = 1 << 16) -> dict[bytes, list[bytes]]:
    """
    The named parts of a whole C{multipart/form-data} body, as Twisted's
    C{request.args} holds a form: C{{name: [value, ...]}}, values as sent
    (a file part's value is its content).

    @param body: the body, read from where it is to its end.
    @raise FormError: no boundary, or a malformed or truncated body (400).
    """
    try:
        parser = PushMultipartParser(boundary_of(content_type))
    except MultipartError as e:
        raise FormError(400, f"malformed multipart body: {e}")
    args: dict[bytes, list[bytes]] = {}
    value: bytearray | None = None
    name = b""
    try:
        for data in iter(lambda: body.read(chunk_size), b""):
            for event in parser.parse(data):
                if isinstance(event, MultipartSegment):
                    name = (event.name or "").encode("utf-8")
                    value = bytearray() if name else None
                elif event is None:
                    if value is not None:
                        args.setdefault(name, []).append(bytes(value))
                    value = None
                elif value is not None:
                    value.extend(event)
        parser.close()
    except MultipartError as e:
        raise FormError(400, f"malformed multipart body: {e}")
    return args
