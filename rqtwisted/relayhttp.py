"""
The relay's HTTP transport: one exchange with a peer through a treq
L{HTTPClient} (L{HttpPeer.request}), with an idle timeout on every
exchange, answers capped at L{MAX_ANSWER} bytes and every failure turned
into a L{SoftFailure} with a short reason. L{make_clients} builds the
clients of a running daemon: a persistent connection pool, so that the
steps of a delivery (and the next deliveries) reuse one connection to a
peer that keeps connections open, and a connection per request for the
others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as _Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from rqtwisted.relaybodies import BytesProducer
from rqtwisted.relaywire import SoftFailure, Unreachable

#: The largest answer body read from a peer.
MAX_ANSWER = 64 * 1024


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


class _RateFloor:
    """
    Call C{expire} when an upload moves fewer than C{rate} bytes a second,
    averaged over each C{window} seconds from its first byte, before all of
    its C{length} bytes are sent (a peer that reads a byte now and then
    keeps the idle timeout away). Off when C{rate} or C{window} is 0.
    """

    def __init__(self, clock: IReactorTime, rate: float, window: float, expire: Callable[[], None]) -> None:
        self._clock = clock
        self._rate = rate
        self._window = window
        self._expire = expire
        self.expired = False
        #: The body's size, when known: once it is sent, the watch stops.
        self.length: int | None = None
        self._sent = 0
        self._mark = 0
        self._done = rate <= 0 or window <= 0
        self._call: Any = None

    def progress(self, n: int) -> None:
        """
        C{n} more bytes of the body were sent.
        """
        if self._done:
            return
        self._sent += n
        if self.length is not None and self._sent >= self.length:
            self.stop()
        elif self._call is None:
            self._call = self._clock.callLater(self._window, self._check)

    def _check(self) -> None:
        self._call = None
        if self._sent - self._mark < self._rate * self._window:
            self._done = True
            self.expired = True
            self._expire()
            return
        self._mark = self._sent
        self._call = self._clock.callLater(self._window, self._check)

    def reason(self) -> str:
        """
        Why the upload was given up.
        """
        return f"upload slower than {self._rate / 1024:g} KiB/s over {self._window:g}s"

    def stop(self) -> None:
        """
        The body is sent, or the exchange is over: watch no more.
        """
        self._done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _Collector(_Protocol):
    """
    Read a response body up to C{limit} bytes; abort beyond that or when
    asked.
    """

    def __init__(self, limit: int) -> None:
        self.done: Deferred[bytes] = Deferred(lambda d: self._cancel())
        self._cancelled = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._failed: str | None = None

    def dataReceived(self, data: bytes) -> None:
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
    from twisted.web._newclient import ResponseFailed

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


class _NoAnswer(Exception):
    """
    The connection closed before any answer (see L{HttpPeer.request}).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def keeps_alive(response: IResponse) -> bool:
    """
    Does the server of C{response} keep its connection open for another
    request (HTTP/1.1 without C{Connection: close})? An HTTP/1.0 server
    closes it, which Twisted's client does not notice before reusing it.
    """
    if tuple(response.version) < (b"HTTP", 1, 1):
        return False
    values = response.headers.getRawHeaders(b"connection") or []
    return not any(b"close" in v.lower() for v in values)


class HttpPeer:
    """
    Requests to peers through a treq L{HTTPClient}, with an idle timeout on
    every exchange (no byte sent or received for C{idle_timeout} seconds
    until the answer's headers; then its body must be in whole within
    C{idle_timeout} seconds), and a floor on the speed of uploads
    (C{min_rate} bytes a second averaged over each C{rate_window} seconds
    from the body's first byte until its last; see L{RelayConfig
    <rqtwisted.relaywire.RelayConfig>}).

    With a C{oneshot} client (one connection per request), a peer is
    reached through it until one of its answers shows that it keeps
    connections open (L{keeps_alive}); from then on through C{client} (a
    persistent pool).
    """

    def __init__(
        self,
        client: HTTPClient,
        clock: IReactorTime,
        idle_timeout: float,
        oneshot: HTTPClient | None = None,
        min_rate: float = 0.0,
        rate_window: float = 0.0,
    ) -> None:
        """
        @param client: the client of peers known to keep connections open.
        @param clock: timers.
        @param idle_timeout: seconds (0: none).
        @param oneshot: the client of the other peers (L{None}: C{client}).
        @param min_rate: the upload speed floor, bytes a second (0: none).
        @param rate_window: seconds it is averaged over (0: no floor).
        """
        self.client = client
        self._oneshot = oneshot
        self._clock = clock
        self._idle = idle_timeout
        self._min_rate = min_rate
        self._rate_window = rate_window
        self._keepalive: dict[str, bool] = {}

    def _client_for(self, origin: str) -> HTTPClient:
        if self._oneshot is None or self._keepalive.get(origin):
            return self.client
        return self._oneshot

    async def request(
        self,
        method: bytes,
        url: str,
        headers: dict[bytes, bytes] | None = None,
        body: Callable[[Callable[[int], None]], IBodyProducer] | None = None,
        retry: bool = True,
    ) -> Answer:
        """
        One exchange. C{body} makes the producer, given the progress
        callback.

        A request that got no answer at all because its connection closed
        under it (a pooled connection the peer had just closed) is sent once
        more on a new connection, unless C{retry} is false (the commit: a
        lost answer there is settled by the next attempt asking the remote
        for the message's state).

        @raise SoftFailure: any failure, with a short reason.
        """
        for attempt in (1, 2):
            try:
                return await self._exchange(method, url, headers, body)
            except _NoAnswer as e:
                if not retry or attempt == 2:
                    raise SoftFailure(e.reason)
        raise AssertionError("unreachable")

    async def _exchange(
        self,
        method: bytes,
        url: str,
        headers: dict[bytes, bytes] | None,
        body: Callable[[Callable[[int], None]], IBodyProducer] | None,
    ) -> Answer:
        hdrs = Headers({k: [v] for k, v in (headers or {}).items()})
        hdrs.setRawHeaders(b"user-agent", [b"rqtwisted-relay"])
        pending: list[Deferred[Any]] = []

        def expire() -> None:
            for d in pending:
                d.cancel()

        watch = _IdleWatch(self._clock, self._idle, expire)
        floor = _RateFloor(self._clock, self._min_rate, self._rate_window, expire)

        def progress(n: int) -> None:
            watch.touch(n)
            floor.progress(n)

        producer: Any = None
        try:
            producer = body(progress) if body is not None else None
            length = getattr(producer, "length", None)
            floor.length = length if isinstance(length, int) else None
            origin = urlsplit(url).netloc
            d = self._client_for(origin).request(
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
                if floor.expired:
                    raise SoftFailure(floor.reason())
                if _cancelled(e):
                    raise CancelledError()
                failure = Failure()
                if failure.check(ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed):
                    raise _NoAnswer(_describe(failure))
                if failure.check(TimeoutError):
                    raise Unreachable(_describe(failure))
                raise SoftFailure(_describe(failure))
            pending.clear()
            floor.stop()
            # The answer (at most MAX_ANSWER bytes) must be in whole within
            # the idle timeout of its headers: a peer dripping it a byte at
            # a time would otherwise hold the relay for as long as it likes.
            watch.touch()
            collector = _Collector(MAX_ANSWER)
            pending.append(collector.done)

            def cancel_body() -> None:
                collector.abort(f"answer not complete within {self._idle:g}s")

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
            self._keepalive[origin] = keeps_alive(response)
            return Answer(response.code, response.headers, data)
        except OSError as e:
            raise SoftFailure(f"cannot read attachment - {e.strerror or e}")
        finally:
            watch.stop()
            floor.stop()
            close = getattr(producer, "close", None)
            if close is not None:
                close()

    async def post_form(self, url: str, body: bytes, retry: bool = True) -> Answer:
        """
        POST an urlencoded form (C{retry}: see L{request}).
        """
        return await self.request(
            b"POST",
            url,
            {b"content-type": b"application/x-www-form-urlencoded"},
            lambda progress: BytesProducer(body),
            retry,
        )


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    The HTTP client factory, without its "Starting factory" log lines.
    """

    noisy = False


#: Idle connections kept per peer (one per relay worker is plenty).
POOL_PER_HOST = 8

#: Seconds an idle pooled connection is kept: well below the idle limits
#: of common servers, so that a peer rarely closes one as it is reused.
POOL_IDLE = 30.0


def make_client(reactor: Any, connect_timeout: float, persistent: bool) -> HTTPClient:
    """
    A treq client on C{reactor} with a connect timeout (none when 0) and no
    log line per connection; with C{persistent}, idle connections are kept
    (L{POOL_PER_HOST} per peer, L{POOL_IDLE} seconds), else each request
    opens its own.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = POOL_PER_HOST
    pool.cachedConnectionTimeout = POOL_IDLE
    pool._factory = _QuietClientFactory
    return HTTPClient(Agent(reactor, connectTimeout=connect_timeout or None, pool=pool))


def make_clients(reactor: Any, connect_timeout: float) -> tuple[HTTPClient, HTTPClient]:
    """
    The relay's HTTP clients on C{reactor}: one with a persistent connection
    pool (peers that keep connections open are reached over one connection
    per worker), and one opening a connection per request (original RQ
    hosts close each one).
    """
    return make_client(reactor, connect_timeout, True), make_client(reactor, connect_timeout, False)
