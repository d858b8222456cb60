"""
Deliveries to other hosts: the built-in C{relay} queue, run in-process.

A message whose C{dest} is a queue URL (C{http://host:port/q/<name>})
reaches the local queue C{relay} (C{rq sendmesg --relay-ok}, a script's
C{dup} to a URL). Its handler, L{Relayer.handle}, speaks the original wire
protocol (relay.md), byte-compatible with original RQ hosts:

 1. give up when C{count} > 15 (C{fail RQ_COUNT > 15 FAIL});
 2. refuse a loop: C{orig_msg_id} starts with C{dest};
 3. I{prep}: C{POST <dest>/new_message} with C{x_format=json} and C{mesg} =
    the message's fields with C{count + 1} and C{_method=prep}; the remote
    full id is kept in C{job/relay_id} (durably) so that every retry reuses
    it;
 4. I{attach}: one upload per attachment, checked against
    C{<md5>-Attached successfully};
 5. I{commit}: C{POST <remote id>} with C{_method=commit};
 6. report C{relayed <remote full id>}: the message ends in C{relayed} with
    status C{relayed - <remote full id>}.

What rqtwisted adds, without changing the wire:

 - I{Idempotence.} When C{job/relay_id} exists (an earlier attempt got that
   far, or the daemon died after the remote commit), the remote is asked
   for that message's state (C{GET <remote id>/state.json}) first: a
   committed message is not sent again; a prep one gets the attachments it
   lacks (its read form, C{GET <remote id>.json}, lists those it has with
   their md5) and the commit; an unknown one (404) is prepared anew.
 - I{Resumable uploads} between rqtwisted hosts: attachments of at least
   L{RelayConfig.resumable_min} bytes are sent with C{PUT <remote
   id>/attach/<name>} and C{Content-Range}; a probe (C{Content-Range:
   bytes */T}) tells how much the remote holds already, and only the rest is
   sent. A peer that answers the probe with anything but 308/200 (an
   original RQ host) gets the multipart upload, and is remembered as such
   for an hour.
 - I{Streaming.} Attachments are read from disk in 64 KiB pieces with
   back-pressure (L{MultipartFileProducer}, L{RangeFileProducer}); answers
   are capped at L{MAX_ANSWER} bytes; md5 sums are computed in a thread.
 - I{Retries} use exponential back-off with jitter and a cap
   (L{backoff}) through C{resend <seconds>-<reason>}: the message waits in
   C{relay}'s C{que} with the last error as its status; C{max_count} ends it
   in err.
 - I{Bad peers}: connect timeout, idle timeout (no byte moved either way),
   garbage answers, a connection closed mid-upload and a wrong md5 are all
   soft failures: nothing is committed with a wrong copy.
 - I{Local destinations}: a C{dest} on this host (same base URL) is
   delivered through the queue API (prep with hard-linked attachments, then
   commit) unless the message has C{force_remote}.

Settings (optional) come from C{config.json} key C{relay}: C{retry_base},
C{retry_cap}, C{connect_timeout}, C{idle_timeout} (seconds) and
C{resumable_min} (bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol
from urllib.parse import quote, urlencode

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol as _Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from rqtwisted.durable import replace_file
from rqtwisted.message import MessageError, dest_queue, split_full_id

if TYPE_CHECKING:
    from rqtwisted.builtin import InProcessJob
    from rqtwisted.supervisor import Instance

_log = Logger()

#: Keys of the local message sent with the prep request (relay.md, exact).
PREP_KEYS = (
    "dest",
    "src",
    "count",
    "max_count",
    "param1",
    "param2",
    "param3",
    "param4",
    "post_run_webhook",
    "orig_msg_id",
)

#: The largest answer body read from a peer.
MAX_ANSWER = 64 * 1024

#: Bytes read from an attachment at a time.
READ_SIZE = 64 * 1024

#: The relay's give-up rule (relay.md step 1).
MAX_RELAY_COUNT = 15

#: The file in C{job/} holding the remote full id.
RELAY_ID = "relay_id"

#: Seconds a peer without resumable uploads is remembered as such.
NO_RESUME_MEMORY = 3600.0

LOOP_REASON = "Relay loop detected: RQ_DEST queue same as RQ_ORIG_MSG_ID"
CANNOT_FIND = "cannot find message"


# -- errors


class SoftFailure(Exception):
    """
    An attempt failed; the message is retried later. C{reason} becomes its
    status text.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RemoteLost(SoftFailure):
    """
    The remote does not know the prepared message (any more): the next
    attempt prepares a new one.
    """


# -- settings


@dataclass(frozen=True)
class RelayConfig:
    """
    Tunables of the relay (C{config.json} key C{relay}).
    """

    retry_base: float = 10.0
    retry_cap: float = 600.0
    connect_timeout: float = 10.0
    idle_timeout: float = 120.0
    resumable_min: int = 1024 * 1024

    @classmethod
    def fromSettings(cls, raw: Mapping[str, Any]) -> "RelayConfig":
        """
        Read the C{relay} object of C{config.json}, ignoring bad values.
        """
        data = raw.get("relay") if isinstance(raw, Mapping) else None
        if not isinstance(data, dict):
            return cls()
        values: dict[str, Any] = {}
        for name, kind in (
            ("retry_base", float),
            ("retry_cap", float),
            ("connect_timeout", float),
            ("idle_timeout", float),
            ("resumable_min", int),
        ):
            if name in data:
                try:
                    value = kind(data[name])
                except (TypeError, ValueError):
                    continue
                if value >= 0:
                    values[name] = value
        return cls(**values)


# -- the protocol steps, as pure functions


def backoff(count: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> int:
    """
    Seconds before retry number C{count + 1}: C{base * 2**count}, capped at
    C{cap}, then scaled by a random factor in [0.5, 1) (jitter). At least 1.
    """
    exponent = min(max(count, 0), 30)
    delay = min(cap, base * (2**exponent))
    return max(1, int(delay * (0.5 + rand() / 2)))


def loop_detected(msg: Mapping[str, Any]) -> bool:
    """
    Does the message come from the queue it is sent to (C{orig_msg_id}
    starts with C{dest})?
    """
    orig = msg.get("orig_msg_id") or ""
    dest = msg.get("dest") or ""
    return bool(dest) and isinstance(orig, str) and orig.startswith(dest)


def prep_fields(msg: Mapping[str, Any]) -> dict[str, Any]:
    """
    The message object of the prep request: the present L{PREP_KEYS}, with
    C{count + 1} and C{_method=prep} (C{force_remote} is not forwarded).
    """
    out = {k: msg[k] for k in PREP_KEYS if k in msg}
    try:
        count = int(msg.get("count") or 0)
    except (TypeError, ValueError):
        count = 0
    out["count"] = count + 1
    out["_method"] = "prep"
    return out


def new_message_url(dest: str) -> str:
    """
    C{<dest without trailing />/new_message}.
    """
    return dest.rstrip("/") + "/new_message"


def form_body(fields: list[tuple[str, str]]) -> bytes:
    """
    An C{application/x-www-form-urlencoded} body.
    """
    return urlencode(fields).encode("ascii")


def prep_request(msg: Mapping[str, Any]) -> tuple[str, bytes]:
    """
    The URL and form body of the prep request.
    """
    mesg = json.dumps(prep_fields(msg), separators=(",", ":"))
    return new_message_url(msg["dest"]), form_body([("x_format", "json"), ("mesg", mesg)])


def commit_request(remote_id: str) -> tuple[str, bytes]:
    """
    The URL and form body of the commit request.
    """
    short = remote_id.rstrip("/").rsplit("/", 1)[-1]
    return remote_id, form_body([("msg_id", short), ("_method", "commit"), ("x_format", "json")])


def fail_reason(body: bytes) -> str | None:
    """
    The reason of a C{["fail", reason]} body, or L{None} when the body is
    not one.
    """
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(value, list) and len(value) >= 2 and value[0] == "fail" and isinstance(value[1], str):
        return value[1][:200]
    return None


def parse_answer(code: int, body: bytes, step: str) -> tuple[str, str]:
    """
    An RQ JSON answer C{["ok"|"fail", text]}.

    @raise SoftFailure: not 200, or not such a pair.
    """
    if code != 200:
        reason = fail_reason(body)
        if reason == CANNOT_FIND:
            raise RemoteLost(f"{step} failed - {reason}")
        raise SoftFailure(f"{step} failed - HTTP {code}" + (f" {reason}" if reason else ""))
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SoftFailure(f"{step} failed - garbage answer")
    if (
        not isinstance(value, list)
        or len(value) < 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], str)
    ):
        raise SoftFailure(f"{step} failed - garbage answer")
    return value[0], value[1]


def expect_ok(code: int, body: bytes, step: str) -> str:
    """
    The text of an C{["ok", text]} answer.

    @raise RemoteLost: C{["fail","cannot find message"]}.
    @raise SoftFailure: anything else.
    """
    status, text = parse_answer(code, body, step)
    if status != "ok":
        if text == CANNOT_FIND:
            raise RemoteLost(f"{step} failed - {text}")
        raise SoftFailure(f"{step} failed - {text}")
    return text


def parse_prep(code: int, body: bytes, dest: str) -> str:
    """
    The remote full id from a prep answer; it must name a message of the
    queue C{dest} names.
    """
    remote_id = expect_ok(code, body, "prep")
    try:
        queue, short = split_full_id(remote_id)
    except MessageError:
        raise SoftFailure("prep failed - garbage answer")
    if not remote_id.startswith("http") or "/" in short or not short:
        raise SoftFailure("prep failed - garbage answer")
    return remote_id


def check_attached(code: int, body: bytes, md5: str, name: str) -> None:
    """
    An attach answer must be C{["ok","<md5>-Attached successfully"]} with
    the local md5.
    """
    text = expect_ok(code, body, f"attach {name}")
    if text != f"{md5}-Attached successfully":
        raise SoftFailure(f"attach {name} failed - md5 mismatch ({text[:80]})")


def parse_state(code: int, body: bytes) -> str | None:
    """
    A remote message's state from C{state.json} (C{["que"]}), or L{None}
    when the remote does not know it (404).
    """
    if code == 404:
        return None
    if code != 200:
        raise SoftFailure(f"state failed - HTTP {code}")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SoftFailure("state failed - garbage answer")
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    raise SoftFailure("state failed - garbage answer")


def parse_attached(code: int, body: bytes) -> dict[str, str]:
    """
    C{{name: md5}} of the C{_attachments} of a message's read form
    (C{GET <id>.json}); empty for anything else.
    """
    if code != 200:
        return {}
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    attachments = value.get("_attachments") if isinstance(value, dict) else None
    if not isinstance(attachments, dict):
        return {}
    return {
        name: info["md5"]
        for name, info in attachments.items()
        if isinstance(name, str) and isinstance(info, dict) and isinstance(info.get("md5"), str)
    }


_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*0-(\d+)\s*$")


def parse_held(code: int, headers: Headers, body: bytes, total: int) -> int | None:
    """
    Bytes of an attachment the remote holds, from a resumable-upload answer:
    308 with C{Range: bytes=0-<held-1>} (no C{Range}: nothing held); 200:
    all of it. L{None}: the peer does not do resumable uploads.
    """
    if code == 200:
        return total
    if code != 308:
        return None
    values = headers.getRawHeaders("range") or []
    if not values:
        return 0
    match = _RANGE_RE.match(values[-1])
    if match is None:
        raise SoftFailure("resumable upload failed - garbage Range")
    held = int(match.group(1)) + 1
    if held > total:
        raise SoftFailure("resumable upload failed - remote holds too much")
    return held


def attachment_files(msg_dir: str) -> list[tuple[str, str]]:
    """
    C{(name, path)} of every regular non-dot file in C{attach/}, by name.
    """
    adir = os.path.join(msg_dir, "attach")
    try:
        entries = sorted(os.scandir(adir), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    return [
        (e.name, e.path)
        for e in entries
        if not e.name.startswith(".") and not e.name.endswith(".tmp") and e.is_file(follow_symlinks=False)
    ]


def same_host(dest: str, base_url: str) -> bool:
    """
    Does the queue URL C{dest} point at this host (base URL C{base_url})?
    """
    return dest.startswith(base_url + "q/") or dest.startswith(base_url.rstrip("/") + "/q/")


def md5_file(path: str) -> str:
    """
    The hex md5 of a file, read in 1 MiB pieces.
    """
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- body producers


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


@implementer(IBodyProducer)
class RangeFileProducer:
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

    def pauseProducing(self) -> None:
        """
        Stop reading until L{resumeProducing} (back-pressure).
        """
        self._file.pauseProducing()

    def resumeProducing(self) -> None:
        """
        Go on reading.
        """
        self._file.resumeProducing()

    def stopProducing(self) -> None:
        """
        Stop for good (the request was abandoned).
        """
        self._file.stopProducing()
        self._raw.close()


def _quote_param(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


@implementer(IBodyProducer)
class MultipartFileProducer:
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

    def pauseProducing(self) -> None:
        """
        Stop reading until L{resumeProducing} (back-pressure).
        """
        self._file.pauseProducing()

    def resumeProducing(self) -> None:
        """
        Go on reading.
        """
        self._file.resumeProducing()

    def stopProducing(self) -> None:
        """
        Stop for good (the request was abandoned).
        """
        self._file.stopProducing()


# -- the HTTP transport


class _IdleWatch:
    """
    Call C{expire} when L{touch} was not called for C{timeout} seconds.
    """

    def __init__(self, clock: IReactorTime, timeout: float, expire: Callable[[], None]) -> None:
        self._clock = clock
        self._timeout = timeout
        self._expire = expire
        self.expired = False
        self._call = clock.callLater(timeout, self._fire) if timeout > 0 else None

    def _fire(self) -> None:
        self._call = None
        self.expired = True
        self._expire()

    def touch(self, n: int = 0) -> None:
        if self._call is not None and self._call.active():
            self._call.reset(self._timeout)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _Collector(_Protocol):
    """
    Read a response body up to C{limit} bytes; abort beyond that or when
    asked.
    """

    def __init__(self, limit: int, progress: Callable[[int], None]) -> None:
        self.done: Deferred[bytes] = Deferred(lambda d: self._cancel())
        self._cancelled = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._progress = progress
        self._failed: str | None = None

    def dataReceived(self, data: bytes) -> None:
        self._progress(len(data))
        self._size += len(data)
        if self._size > self._limit:
            self.abort("answer too long")
            return
        self._chunks.append(data)

    def abort(self, why: str) -> None:
        if self._failed is None:
            self._failed = why
            if self.transport is not None:
                self.transport.stopProducing()

    def _cancel(self) -> None:
        self._cancelled = True
        self.abort("cancelled")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if self._cancelled:
            self.done.errback(CancelledError())
            return
        if self._failed is not None:
            self.done.errback(SoftFailure(self._failed))
            return
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(SoftFailure(f"connection lost - {reason.getErrorMessage()}"))


@dataclass
class Answer:
    """
    A peer's answer: status code, headers, body (at most L{MAX_ANSWER}).
    """

    code: int
    headers: Headers
    body: bytes


def _cancelled(error: BaseException) -> bool:
    """
    Is C{error} (or what it wraps) a cancellation?
    """
    if isinstance(error, CancelledError):
        return True
    return any(r.check(CancelledError) for r in getattr(error, "reasons", None) or [])


def _describe(failure: Failure) -> str:
    """
    A short reason for a failed request.
    """
    from twisted.internet.error import ConnectError, TimeoutError
    from twisted.web._newclient import RequestNotSent, ResponseFailed

    value = failure.value
    if isinstance(value, SoftFailure):
        return value.reason
    text = failure.getErrorMessage() or type(value).__name__
    reasons = getattr(value, "reasons", None)
    if reasons:
        text = "; ".join(r.getErrorMessage() or type(r.value).__name__ for r in reasons)
    if isinstance(value, TimeoutError):
        prefix = "connect timed out"
    elif isinstance(value, ConnectError):
        prefix = "cannot connect"
    elif isinstance(value, (ResponseFailed, RequestNotSent)):
        prefix = "connection lost"
    else:
        prefix = "request failed"
    return f"{prefix} - {text}".replace("\n", " ")[:200]


class HttpPeer:
    """
    Requests to peers through a treq L{HTTPClient}, with an idle timeout on
    every exchange (no byte sent or received for C{idle_timeout} seconds).
    """

    def __init__(self, client: HTTPClient, clock: IReactorTime, idle_timeout: float) -> None:
        self.client = client
        self._clock = clock
        self._idle = idle_timeout

    async def request(
        self,
        method: bytes,
        url: str,
        headers: dict[bytes, bytes] | None = None,
        body: Callable[[Callable[[int], None]], IBodyProducer] | None = None,
    ) -> Answer:
        """
        One exchange. C{body} makes the producer, given the progress
        callback.

        @raise SoftFailure: any failure, with a short reason.
        """
        hdrs = Headers({k: [v] for k, v in (headers or {}).items()})
        hdrs.setRawHeaders(b"user-agent", [b"rqtwisted-relay"])
        pending: list[Deferred[Any]] = []

        def expire() -> None:
            for d in pending:
                d.cancel()

        watch = _IdleWatch(self._clock, self._idle, expire)
        try:
            producer = body(watch.touch) if body is not None else None
            d = self.client.request(
                method.decode("ascii"),
                url,
                headers=hdrs,
                data=producer,
                allow_redirects=False,
                unbuffered=True,
            )
            pending.append(d)
            try:
                response: IResponse = await d
            except Exception as e:
                if watch.expired:
                    raise SoftFailure(f"timed out after {self._idle:g}s idle")
                if _cancelled(e):
                    raise CancelledError()
                raise SoftFailure(_describe(Failure()))
            pending.clear()
            watch.touch()
            collector = _Collector(MAX_ANSWER, watch.touch)
            pending.append(collector.done)

            def cancel_body() -> None:
                collector.abort(f"timed out after {self._idle:g}s idle")

            watch._expire = cancel_body
            response.deliverBody(collector)
            try:
                data = await collector.done
            except SoftFailure:
                raise
            except Exception as e:
                if _cancelled(e):
                    raise CancelledError()
                raise SoftFailure(_describe(Failure()))
            return Answer(response.code, response.headers, data)
        except OSError as e:
            raise SoftFailure(f"cannot read attachment - {e.strerror or e}")
        finally:
            watch.stop()

    async def post_form(self, url: str, body: bytes) -> Answer:
        """
        POST an urlencoded form.
        """
        return await self.request(
            b"POST",
            url,
            {b"content-type": b"application/x-www-form-urlencoded"},
            lambda progress: BytesProducer(body),
        )


# -- deliveries


@dataclass
class _Attachment:
    name: str
    path: str
    size: int
    md5: str


class Peer(Protocol):
    """
    Where a delivery goes: the steps of the exchange, each raising
    L{SoftFailure} (or L{RemoteLost}) when it fails.
    """

    async def state(self, remote_id: str) -> str | None:
        """
        The state of the prepared message, or L{None} when it is unknown.
        """

    async def prep(self, job: "InProcessJob") -> str:
        """
        Prepare the copy; its full id.
        """

    async def attached(self, remote_id: str) -> dict[str, str]:
        """
        C{{name: md5}} of the attachments the prepared copy has already
        (empty when unknown).
        """

    async def attach(self, remote_id: str, attachment: _Attachment) -> None:
        """
        Add one attachment to the prepared copy.
        """

    async def commit(self, remote_id: str) -> None:
        """
        Commit the prepared copy.
        """


class LocalPeer:
    """
    Deliveries to a queue of this host through the queue API (prep with
    hard-linked attachments, then commit).
    """

    def __init__(self, instance: "Instance") -> None:
        self._instance = instance

    def _queue(self, name: str) -> Any:
        queue = self._instance.queues.get(name)
        if queue is None or not queue.running:
            raise SoftFailure(f"couldn't connect to queue - {name}")
        return queue

    async def state(self, remote_id: str) -> str | None:
        """
        The state of a local message, or L{None} when it is gone.
        """
        name, short = split_full_id(remote_id)
        try:
            return self._queue(name).locate(short)
        except MessageError:
            return None

    async def prep(self, job: "InProcessJob") -> str:
        """
        Create the copy in prep, attachments hard-linked; its full id.
        """
        fields = prep_fields(job.msg)
        method = fields.pop("_method")
        queue = self._queue(dest_queue(job.msg["dest"]))
        source = self._instance.queue(job.queue).store
        try:
            return await queue.create(fields, method, attachments_from=(source, "run", job.msg_id))
        except MessageError as e:
            raise SoftFailure(f"prep failed - {e.reason}")

    async def attached(self, remote_id: str) -> dict[str, str]:
        """
        Nothing to skip: L{attach} does nothing.
        """
        return {}

    async def attach(self, remote_id: str, attachment: _Attachment) -> None:
        """
        Nothing to do: the attachments were linked by L{prep}.
        """

    async def commit(self, remote_id: str) -> None:
        """
        Commit the copy.
        """
        name, short = split_full_id(remote_id)
        try:
            await self._queue(name).commit(short)
        except MessageError as e:
            if e.reason == CANNOT_FIND:
                raise RemoteLost(f"commit failed - {e.reason}")
            raise SoftFailure(f"commit failed - {e.reason}")


class RemotePeer:
    """
    Deliveries over HTTP, in the original wire format.
    """

    def __init__(self, relayer: "Relayer", job: "InProcessJob") -> None:
        self._relayer = relayer
        self._http = relayer.http
        self._job = job

    async def state(self, remote_id: str) -> str | None:
        """
        The remote message's state (C{GET <id>/state.json}), or L{None} on 404.
        """
        answer = await self._http.request(b"GET", remote_id.rstrip("/") + "/state.json")
        return parse_state(answer.code, answer.body)

    async def prep(self, job: "InProcessJob") -> str:
        """
        Prepare the remote message; its full id.
        """
        url, body = prep_request(job.msg)
        answer = await self._http.post_form(url, body)
        return parse_prep(answer.code, answer.body, job.msg["dest"])

    async def attached(self, remote_id: str) -> dict[str, str]:
        """
        C{{name: md5}} from the remote message's read form (C{GET
        <id>.json}); empty when it cannot be had.
        """
        try:
            answer = await self._http.request(b"GET", remote_id.rstrip("/") + ".json")
        except SoftFailure:
            return {}
        return parse_attached(answer.code, answer.body)

    async def commit(self, remote_id: str) -> None:
        """
        Commit the remote message.
        """
        url, body = commit_request(remote_id)
        answer = await self._http.post_form(url, body)
        expect_ok(answer.code, answer.body, "commit")

    async def attach(self, remote_id: str, attachment: _Attachment) -> None:
        """
        Upload one attachment: resumable C{PUT} when the peer has it and the file is big enough, else multipart.
        """
        relayer = self._relayer
        peer = remote_id.split("/q/", 1)[0]
        if attachment.size >= relayer.config.resumable_min and not relayer.lacks_resume(peer):
            if await self._attach_resumable(remote_id, attachment):
                return
            relayer.no_resume(peer)
        await self._attach_multipart(remote_id, attachment)

    async def _attach_multipart(self, remote_id: str, a: _Attachment) -> None:
        short = remote_id.rstrip("/").rsplit("/", 1)[-1]
        cooperator = self._relayer.cooperator
        self._job.log(f"attach {a.name} ({a.size} bytes, multipart)")
        # The boundary is in the Content-Type header and in the body.
        boundary = "rq-" + os.urandom(12).hex()

        def make(progress: Callable[[int], None]) -> IBodyProducer:
            producer = MultipartFileProducer(
                [("pathname", a.name), ("msg_id", short), ("x_format", "json")],
                "filedata",
                a.name,
                a.path,
                cooperator,
                progress,
                boundary,
            )
            return producer

        answer = await self._http.request(
            b"POST",
            remote_id.rstrip("/") + "/attach/new",
            {b"content-type": b"multipart/form-data; boundary=" + boundary.encode("ascii")},
            make,
        )
        check_attached(answer.code, answer.body, a.md5, a.name)

    async def _attach_resumable(self, remote_id: str, a: _Attachment) -> bool:
        """
        Upload through C{PUT}; L{False} when the peer does not support it.
        """
        url = remote_id.rstrip("/") + "/attach/" + quote(a.name, safe="")
        probe = await self._http.request(
            b"PUT",
            url,
            {b"content-range": f"bytes */{a.size}".encode("ascii")},
            lambda progress: BytesProducer(b""),
        )
        if probe.code not in (200, 308):
            # An rqtwisted host refuses in JSON (unknown message, busy,
            # DOWN...); anything else does not know resumable uploads (an
            # original RQ host answers PUT with 500).
            reason = fail_reason(probe.body)
            if reason is None:
                return False
            if reason == CANNOT_FIND:
                raise RemoteLost(f"attach {a.name} failed - {reason}")
            raise SoftFailure(f"attach {a.name} failed - HTTP {probe.code} {reason}")
        held = parse_held(probe.code, probe.headers, probe.body, a.size)
        assert held is not None
        if held == a.size:
            if probe.code == 200:
                try:
                    check_attached(probe.code, probe.body, a.md5, a.name)
                    self._job.log(f"attach {a.name}: already complete on the remote")
                    return True
                except SoftFailure:
                    pass
            held = 0 if probe.code == 200 else held
        self._job.log(f"attach {a.name} ({a.size} bytes, resumable from {held})")
        cooperator = self._relayer.cooperator
        length = a.size - held
        headers = {
            b"content-type": b"application/octet-stream",
            b"x-rq-md5": a.md5.encode("ascii"),
        }
        if length > 0:
            headers[b"content-range"] = f"bytes {held}-{a.size - 1}/{a.size}".encode("ascii")
        else:
            headers[b"content-range"] = f"bytes */{a.size}".encode("ascii")
        answer = await self._http.request(
            b"PUT",
            url,
            headers,
            lambda progress: RangeFileProducer(a.path, held, length, cooperator, progress),
        )
        if answer.code == 308:
            raise SoftFailure(f"attach {a.name} failed - upload incomplete")
        check_attached(answer.code, answer.body, a.md5, a.name)
        return True


class Relayer:
    """
    The C{relay} queue's handler (see the module docstring).

    @ivar http: the transport to peers.
    @ivar config: the tunables.
    """

    def __init__(
        self,
        instance: "Instance",
        client: HTTPClient,
        clock: IReactorTime,
        cooperator: Cooperator,
        hasher: Callable[[str], Deferred[str]],
        config: RelayConfig | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """
        @param client: the HTTP client (a treq L{HTTPClient} on a real
            L{Agent}, or on the in-memory agent of C{treq.testing} in tests).
        @param clock: timers (idle timeout).
        @param cooperator: schedules file reads of uploads.
        @param hasher: md5 of a file path, as a L{Deferred} (in a thread).
        @param rand: jitter source.
        """
        self.instance = instance
        self.config = config or RelayConfig.fromSettings(instance.settings.raw)
        self.clock = clock
        self.cooperator = cooperator
        self.http = HttpPeer(client, clock, self.config.idle_timeout)
        self._hasher = hasher
        self._rand = rand
        self._no_resume: dict[str, float] = {}

    # -- peers without resumable uploads

    def lacks_resume(self, peer: str) -> bool:
        """
        Was C{peer} found to lack resumable uploads within the last hour?
        """
        since = self._no_resume.get(peer)
        return since is not None and self.clock.seconds() - since < NO_RESUME_MEMORY

    def no_resume(self, peer: str) -> None:
        """
        Remember that C{peer} lacks resumable uploads.
        """
        self._no_resume[peer] = self.clock.seconds()

    # -- relay_id

    @staticmethod
    def _relay_id_path(job: "InProcessJob") -> str:
        return os.path.join(job.job_dir, RELAY_ID)

    def read_relay_id(self, job: "InProcessJob") -> str | None:
        """
        The remote full id an earlier attempt prepared, if any.
        """
        try:
            with open(self._relay_id_path(job), encoding="utf-8") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text or None

    def save_relay_id(self, job: "InProcessJob", remote_id: str) -> Deferred[None]:
        """
        Keep the remote id in C{job/relay_id} (temp file and rename), durably.
        """
        path = self._relay_id_path(job)
        replace_file(path, remote_id.encode("utf-8"))
        return self.instance.syncer.sync(path, job.job_dir)

    def drop_relay_id(self, job: "InProcessJob") -> None:
        """
        Forget the remote id.
        """
        try:
            os.unlink(self._relay_id_path(job))
        except FileNotFoundError:
            pass

    # -- the handler

    async def handle(self, job: "InProcessJob") -> None:
        """
        Deliver one message (relay.md); failures become C{resend}.
        """
        msg = job.msg
        dest = str(msg.get("dest") or "")
        job.log(f"dest - {dest}")
        force = bool(msg.get("force_remote"))
        if force:
            job.log("FORCE REMOTE")
        try:
            count = int(msg.get("count") or 0)
        except (TypeError, ValueError):
            count = 0
        if count > MAX_RELAY_COUNT:
            job.report(f"fail RQ_COUNT > {MAX_RELAY_COUNT} FAIL")
            return
        if not dest.startswith("http"):
            job.report(f"err not a queue URL: {dest}")
            return
        if loop_detected(msg):
            job.log(LOOP_REASON)
            job.report(f"fail {LOOP_REASON}")
            return
        local = not force and same_host(dest, self.instance.settings.base_url)
        peer: Peer = LocalPeer(self.instance) if local else RemotePeer(self, job)
        job.log(f"attempting {'local' if local else 'remote'} {dest}")
        try:
            remote_id = await self._deliver(job, peer)
        except RemoteLost as e:
            self.drop_relay_id(job)
            self._retry(job, count, e.reason)
            return
        except SoftFailure as e:
            self._retry(job, count, e.reason)
            return
        self.drop_relay_id(job)
        job.log(f"relayed {remote_id}")
        job.report(f"relayed {remote_id}")

    def _retry(self, job: "InProcessJob", count: int, reason: str) -> None:
        delay = backoff(count, self.config.retry_base, self.config.retry_cap, self._rand)
        job.log(f"attempt failed: {reason}; retry in {delay}s")
        job.report(f"resend {delay}-{reason}")

    async def _deliver(self, job: "InProcessJob", peer: Peer) -> str:
        remote_id = self.read_relay_id(job)
        have: dict[str, str] = {}
        if remote_id is not None:
            state = await peer.state(remote_id)
            job.log(f"remote {remote_id} is {state or 'unknown'}")
            if state is None:
                self.drop_relay_id(job)
                remote_id = None
            elif state != "prep":
                return remote_id
            else:
                have = await peer.attached(remote_id)
        saved: Deferred[None] = succeed(None)
        if remote_id is None:
            job.report("run prep")
            remote_id = await peer.prep(job)
            # Durable before the commit is sent (a crash after the remote
            # commit must find it); the uploads need not wait for it.
            saved = self.save_relay_id(job, remote_id)
            job.log(f"prepped {remote_id}")
        try:
            attachments = await self._attachments(job)
            for a in attachments:
                if have.get(a.name) == a.md5:
                    job.log(f"attach {a.name}: on the remote already")
                    continue
                job.report(f"run attach {a.name}")
                await peer.attach(remote_id, a)
        finally:
            await saved
        job.report("run commit")
        await peer.commit(remote_id)
        return remote_id

    async def _attachments(self, job: "InProcessJob") -> list[_Attachment]:
        out = []
        for name, path in attachment_files(job.msg_dir):
            try:
                size = os.stat(path).st_size
                md5 = await self._hasher(path)
            except OSError as e:
                raise SoftFailure(f"cannot read attachment {name} - {e.strerror or e}")
            out.append(_Attachment(name, path, size, md5))
        return out


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    The HTTP client factory, without its "Starting factory" log lines.
    """

    noisy = False


def make_handler(instance: "Instance") -> Callable[["InProcessJob"], Any]:
    """
    The C{relay} queue's handler for a running daemon: a real HTTP agent on
    the instance's reactor, md5 sums in the reactor's thread pool.
    """
    from twisted.internet.threads import deferToThreadPool
    from twisted.web.client import Agent, HTTPConnectionPool

    reactor: Any = instance.clock
    config = RelayConfig.fromSettings(instance.settings.raw)
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietClientFactory  # no log line per connection
    agent = Agent(reactor, connectTimeout=config.connect_timeout or None, pool=pool)
    cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))

    def hasher(path: str) -> Deferred[str]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), md5_file, path)

    relayer = Relayer(instance, HTTPClient(agent), reactor, cooperator, hasher, config)
    return relayer.handle
