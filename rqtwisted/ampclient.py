"""
A small synchronous AMP client for the daemon's admin socket.

The C{rq} command line asks one admin command per run. Importing
L{twisted.protocols.amp} alone costs half a second, so this module speaks the
AMP wire format itself with the standard library and never imports Twisted,
directly or indirectly.

The wire format (L{twisted.protocols.amp.AmpBox.serialize}): a box is a
sequence of key/value pairs, each a 16-bit big-endian length followed by that
many bytes (keys 1-255 bytes, values at most 65535 bytes), terminated by a
zero key length. A request carries C{_command} and C{_ask} (a tag); the answer
carries C{_answer} with the same tag, or C{_error}, C{_error_code} and
C{_error_description}. Text arguments (L{twisted.protocols.amp.Unicode}) are
UTF-8.

The vocabulary is L{rqtwisted.admincommands.COMMANDS}; every answer holds
C{status} and C{detail}, or C{spill}: the path of a file holding a detail too
large for one value, which the client reads and removes. A daemon with as
many admin connections open as it allows turns a new one away with an error
box of code L{rqtwisted.admincommands.TURNED_AWAY} (L{DaemonBusy}).
"""

from __future__ import annotations

import os
import socket
import struct
import time

from rqtwisted.admincommands import COMMANDS, TURNED_AWAY

__all__ = [
    "AdminClient",
    "AdminClientError",
    "DaemonBusy",
    "DaemonNotReachable",
    "InvalidRequest",
    "ProtocolError",
    "RemoteError",
    "MAX_KEY_LENGTH",
    "MAX_VALUE_LENGTH",
    "encode_box",
    "BoxDecoder",
    "request_box",
    "answer_result",
    "read_spill",
    "turned_away",
]

#: The largest key AMP accepts, in bytes.
MAX_KEY_LENGTH = 0xFF

#: The largest value AMP accepts, in bytes.
MAX_VALUE_LENGTH = 0xFFFF

_COMMAND = b"_command"
_ASK = b"_ask"
_ANSWER = b"_answer"
_ERROR = b"_error"
_ERROR_CODE = b"_error_code"
_ERROR_DESCRIPTION = b"_error_description"

_LENGTH = struct.Struct("!H")
#: C{struct timeval}, for C{SO_SNDTIMEO}.
_TIMEVAL = struct.Struct("@ll")
_READ_SIZE = 65536

Box = dict[bytes, bytes]


class AdminClientError(Exception):
    """
    Base class of everything L{AdminClient.call} raises.
    """


class InvalidRequest(AdminClientError, ValueError):
    """
    The request was refused before anything was sent: unknown command,
    unknown or missing argument, a value that is not text or is too long for
    AMP.
    """


class DaemonNotReachable(AdminClientError):
    """
    Nothing answers on the admin socket: it is missing, or nobody listens.

    @ivar socket_path: The socket the client tried.
    @ivar reason: Why the connection failed, e.g. C{No such file or
        directory} or C{Connection refused}.
    """

    def __init__(self, socket_path: str, reason: str) -> None:
        super().__init__(f"rq daemon not reachable at {socket_path}: {reason}")
        self.socket_path = socket_path
        self.reason = reason


class DaemonBusy(AdminClientError):
    """
    The daemon turned the connection away before reading the request: it
    has as many admin connections open as it allows. Nothing was done;
    asking again later may work.

    @ivar socket_path: The socket the client tried.
    @ivar reason: What the daemon said.
    """

    def __init__(self, socket_path: str, reason: str) -> None:
        super().__init__(f"rq daemon at {socket_path} turned the connection away: {reason}")
        self.socket_path = socket_path
        self.reason = reason


class ProtocolError(AdminClientError):
    """
    The daemon was reached but no valid answer came back: the connection
    broke or timed out, or the bytes were not a well-formed AMP answer.
    """


class RemoteError(AdminClientError):
    """
    The daemon answered with an AMP error box (e.g. a command it does not
    handle, or a failure its protocol could not turn into C{fail}).

    @ivar code: The C{_error_code}, e.g. C{UNHANDLED} or C{UNKNOWN}.
    @ivar description: The C{_error_description}.
    """

    def __init__(self, command: str, code: str, description: str) -> None:
        super().__init__(f"{command} failed in the rq daemon ({code}): {description}")
        self.code = code
        self.description = description


def encode_box(box: Box) -> bytes:
    """
    Serialize one AMP box, keys sorted as L{twisted.protocols.amp.AmpBox}
    does.

    @raise InvalidRequest: a key is empty or longer than L{MAX_KEY_LENGTH},
        or a value is longer than L{MAX_VALUE_LENGTH}.
    """
    parts = []
    for key, value in sorted(box.items()):
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            raise InvalidRequest(f"AMP key {key!r} must be 1 to {MAX_KEY_LENGTH} bytes long")
        if len(value) > MAX_VALUE_LENGTH:
            raise InvalidRequest(
                f"value of {key.decode('ascii', 'replace')!r} is {len(value)} bytes long;"
                f" AMP values are limited to {MAX_VALUE_LENGTH} bytes"
            )
        parts += [_LENGTH.pack(len(key)), key, _LENGTH.pack(len(value)), value]
    parts.append(_LENGTH.pack(0))
    return b"".join(parts)


def read_box(buffer: bytes, pos: int = 0) -> tuple[Box, int] | None:
    """
    The AMP box that starts at C{pos} in C{buffer}, and where it ends; or
    L{None} while it is incomplete.

    @raise ProtocolError: a key length is over L{MAX_KEY_LENGTH}.
    """
    end = len(buffer)
    box: Box = {}
    while pos + 2 <= end:
        (keyLength,) = _LENGTH.unpack_from(buffer, pos)
        if keyLength == 0:
            return box, pos + 2
        if keyLength > MAX_KEY_LENGTH:
            raise ProtocolError(f"malformed AMP box: key length {keyLength}")
        keyEnd = pos + 2 + keyLength
        if end < keyEnd + 2:
            return None
        (valueLength,) = _LENGTH.unpack_from(buffer, keyEnd)
        valueEnd = keyEnd + 2 + valueLength
        if end < valueEnd:
            return None
        box[buffer[pos + 2 : keyEnd]] = buffer[keyEnd + 2 : valueEnd]
        pos = valueEnd
    return None


class BoxDecoder:
    """
    Incremental AMP box parser: feed it bytes as they arrive, get complete
    boxes back.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Box]:
        """
        Add received bytes; return every box they complete, in order.

        @raise ProtocolError: a key length is over L{MAX_KEY_LENGTH}.
        """
        buffer = self._buffer + data
        boxes: list[Box] = []
        start = 0
        while (found := read_box(buffer, start)) is not None:
            box, start = found
            boxes.append(box)
        self._buffer = buffer[start:]
        return boxes

    @property
    def pending(self) -> bool:
        """
        Whether bytes of an incomplete box are buffered.
        """
        return bool(self._buffer)


def _encode_text(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequest(f"argument {name!r} must be text, not {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"argument {name!r} is not valid Unicode: {e}") from None


def request_box(command: str, args: dict[str, str], tag: bytes) -> Box:
    """
    Build the request box of an admin command, checked against
    L{rqtwisted.admincommands.COMMANDS}.

    @raise InvalidRequest: unknown command, unknown or missing argument,
        non-text value, or a value over L{MAX_VALUE_LENGTH} bytes.
    """
    if command not in COMMANDS:
        raise InvalidRequest(
            f"unknown admin command {command!r}; known commands: {', '.join(sorted(COMMANDS))}"
        )
    required, optional = COMMANDS[command]
    unknown = sorted(set(args) - set(required) - set(optional))
    if unknown:
        raise InvalidRequest(f"{command} takes no argument {', '.join(unknown)}")
    missing = [name for name in required if name not in args]
    if missing:
        raise InvalidRequest(f"{command} needs argument {', '.join(missing)}")
    box = {_COMMAND: command.encode("ascii"), _ASK: tag}
    for name, value in args.items():
        box[name.encode("ascii")] = _encode_text(name, value)
    encode_box(box)  # length checks, before any connection is made
    return box


def _text(box: Box, key: bytes) -> str:
    try:
        return box[key].decode("utf-8")
    except KeyError:
        raise ProtocolError(f"the answer lacks {key.decode('ascii')!r}") from None
    except UnicodeDecodeError as e:
        raise ProtocolError(f"the answer's {key.decode('ascii')!r} is not UTF-8: {e}") from None


def read_spill(path: str) -> str:
    """
    Read a spilled detail and remove its file.

    @raise ProtocolError: the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ProtocolError(f"cannot read the spilled detail {path}: {e}") from None
    finally:
        try:
            os.remove(path)
        except OSError:
            pass


def turned_away(box: Box) -> str | None:
    """
    Why the daemon turned the connection away, if C{box} is the error box
    that says so (code L{TURNED_AWAY}, answering no request); else L{None}.
    """
    if box.get(_ERROR) != b"" or box.get(_ERROR_CODE) != TURNED_AWAY.encode("ascii"):
        return None
    return box.get(_ERROR_DESCRIPTION, b"").decode("utf-8", "replace")


def answer_result(command: str, box: Box) -> tuple[str, str]:
    """
    Turn an answer or error box into C{(status, detail)}.

    @raise RemoteError: C{box} is an error box.
    @raise ProtocolError: C{status} or C{detail} is missing or not UTF-8, or
        a spill file cannot be read.
    """
    if _ERROR in box:
        raise RemoteError(
            command,
            box.get(_ERROR_CODE, b"UNKNOWN").decode("utf-8", "replace"),
            box.get(_ERROR_DESCRIPTION, b"").decode("utf-8", "replace"),
        )
    status = _text(box, b"status")
    if box.get(b"spill"):
        return status, read_spill(_text(box, b"spill"))
    return status, _text(box, b"detail")


class AdminClient:
    """
    Ask the daemon's admin socket one command per connection, synchronously.
    """

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        """
        @param socket_path: The admin socket (C{<root>/config/rq.sock}).
        @param timeout: Seconds allowed for connecting and for the whole
            exchange.
        """
        self.socket_path = socket_path
        self.timeout = timeout
        self._tags = 0

    def call(self, command: str, **args: str) -> tuple[str, str]:
        """
        Ask C{command} with text C{args}; return the answer's
        C{(status, detail)}, the detail read from its spill file if it was
        spilled.

        @raise InvalidRequest: see L{request_box}; nothing was sent.
        @raise DaemonNotReachable: the socket is missing or refuses.
        @raise DaemonBusy: the daemon turned the connection away (too
            many admin connections open).
        @raise RemoteError: the daemon answered an AMP error.
        @raise ProtocolError: the exchange broke, timed out or was malformed.
        """
        self._tags += 1
        tag = str(self._tags).encode("ascii")
        data = encode_box(request_box(command, args, tag))
        deadline = time.monotonic() + self.timeout
        sock = self._connect()
        try:
            try:
                sock.sendall(data)
                answer = self._read_answer(sock, tag, deadline)
            except TimeoutError:
                raise ProtocolError(
                    f"no answer to {command} from {self.socket_path} within {self.timeout:g}s"
                ) from None
            except OSError as e:
                raise self._broke(sock, e) from None
        finally:
            sock.close()
        return answer_result(command, answer)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A blocking connect, bounded by the send timeout: with a Python
        # timeout set first, connect would not wait at all, and a daemon
        # too busy to accept at once (its listen queue full) would look
        # like one that is not running.
        seconds = int(self.timeout)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(seconds, int((self.timeout - seconds) * 1e6))
        )
        try:
            sock.connect(self.socket_path)
        except BlockingIOError:
            sock.close()
            raise ProtocolError(
                f"{self.socket_path} did not take the connection within {self.timeout:g}s (the daemon is busy)"
            ) from None
        except OSError as e:
            sock.close()
            raise DaemonNotReachable(self.socket_path, e.strerror or str(e)) from None
        sock.settimeout(self.timeout)
        return sock

    def _broke(self, sock: socket.socket, error: OSError) -> AdminClientError:
        """
        What to raise for a connection that broke during a call: a
        L{DaemonBusy} if the daemon turned it away (it closes such a
        connection at once: the send, or a read, can fail before what it
        said is read), else a L{ProtocolError}.
        """
        reason = self._turned_away_reason(sock)
        if reason is not None:
            return DaemonBusy(self.socket_path, reason)
        return ProtocolError(f"connection to {self.socket_path} broke: {error}")

    @staticmethod
    def _turned_away_reason(sock: socket.socket) -> str | None:
        """
        Why the daemon turned the connection away, read from what it sent
        so far (without waiting); L{None} if it did not say so.
        """
        decoder = BoxDecoder()
        sock.setblocking(False)
        # (The first read may report the peer's reset; what it wrote before
        # is read after.)
        for _ in range(3):
            try:
                data = sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                continue
            if not data:
                return None
            try:
                boxes = decoder.feed(data)
            except ProtocolError:
                return None
            for box in boxes:
                reason = turned_away(box)
                if reason is not None:
                    return reason
        return None

    def _read_answer(self, sock: socket.socket, tag: bytes, deadline: float) -> Box:
        decoder = BoxDecoder()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            sock.settimeout(remaining)
            data = sock.recv(_READ_SIZE)
            if not data:
                raise ProtocolError(f"{self.socket_path} closed the connection without answering")
            for box in decoder.feed(data):
                if box.get(_ANSWER) == tag or box.get(_ERROR) == tag:
                    return box
                reason = turned_away(box)
                if reason is not None:
                    raise DaemonBusy(self.socket_path, reason)
