"""
Post-run webhooks (special-queues.md, "webhook").

When a message with C{post_run_webhook} URLs leaves run for done, err or
relayed, L{WebhookFeeder} (one of the instance's C{finishedHooks}) queues one
message per URL in the local C{webhook} queue: C{param1} is the URL,
C{param2} the finished message as JSON. So each call is a visible message,
retried with back-off like any other.

L{WebhookHandler} is the C{webhook} queue's in-process handler
(L{rqtwisted.builtin}): it POSTs C{x_format=json} and C{payload=<param2>} as
a form with treq, reports C{done successfull post <code>} (the original's
spelling) on a 2xx answer and C{resend <count²·60>-<reason>} otherwise, and
gives up with C{fail RQ_COUNT > 15 - failing} after 15 retries. A URL that
can never be posted to (L{url_problem}, or one the HTTP client refuses before
any I/O) ends the message in err at once, with the URL and why: retries
cannot help it, and the spec's C{resend} is for the outcomes of a POST. The
HTTP client is injected, so tests use L{treq.testing.StubTreq}.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.message import MessageError, count_of, normalize_webhooks

if TYPE_CHECKING:
    from rqtwisted.queue import QueueService
    from rqtwisted.supervisor import Instance

_log = Logger()

#: The local queue webhook calls go through.
WEBHOOK_QUEUE = "webhook"

#: States whose arrival fires the webhooks.
FIRING_STATES = frozenset({"done", "err", "relayed"})

#: Seconds to establish the connection.
CONNECT_TIMEOUT = 15.0

#: Seconds from sending the request to the response headers.
REQUEST_TIMEOUT = 60.0

#: Seconds to read the response body (it is discarded).
BODY_TIMEOUT = 30.0

#: A webhook message whose C{count} exceeds this gives up.
MAX_TRIES = 15

#: Keys of the finished message left out of the payload: the read form's
#: computed keys and bookkeeping (any key starting with C{_}).
_DROPPED_KEYS = frozenset({"status", "path"})


def webhook_payload(msg: Mapping[str, Any], state: str, full_id: str) -> str:
    """
    The C{param2} of a webhook message: the finished message as JSON, with
    C{msg_id} replaced by its full id and C{state} set to the new state;
    C{status}, C{path} and bookkeeping keys (C{_...}) removed.
    """
    data = {k: v for k, v in msg.items() if k not in _DROPPED_KEYS and not k.startswith("_")}
    data["msg_id"] = full_id
    data["state"] = state
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def webhook_messages(msg: Mapping[str, Any], state: str, full_id: str) -> list[dict[str, Any]]:
    """
    The C{webhook} queue messages for a message that just reached C{state}:
    one per URL of its C{post_run_webhook}, none for other states.
    """
    if state not in FIRING_STATES:
        return []
    try:
        urls = normalize_webhooks(msg.get("post_run_webhook"))
    except MessageError:
        return []
    if not urls:
        return []
    payload = webhook_payload(msg, state, full_id)
    return [{"dest": WEBHOOK_QUEUE, "param1": url, "param2": payload} for url in urls]


class WebhookFeeder:
    """
    An instance C{finishedHook}: queues the webhook calls of each finished
    message in the C{webhook} queue.
    """

    def __init__(self, instance: "Instance") -> None:
        self.instance = instance

    def __call__(self, queue: "QueueService", msg: Mapping[str, Any], state: str) -> None:
        """
        C{msg} of C{queue} left run for C{state}.
        """
        messages = webhook_messages(msg, state, queue.full_id(str(msg.get("msg_id"))))
        if not messages:
            return
        target = self.instance.queues.get(WEBHOOK_QUEUE)
        for fields in messages:
            if target is None or not target.running:
                _log.error(
                    "webhook {url} of {msg_id} not sent: there is no running {queue} queue",
                    url=fields["param1"],
                    msg_id=msg.get("msg_id"),
                    queue=WEBHOOK_QUEUE,
                )
                continue
            try:
                d = target.create(fields, "commit")
            except MessageError as e:
                _log.error(
                    "webhook {url} of {msg_id} not sent: {reason}",
                    url=fields["param1"],
                    msg_id=msg.get("msg_id"),
                    reason=e.reason,
                )
                continue
            except Exception:
                self._failed(Failure(), fields["param1"], msg.get("msg_id"))
                continue
            d.addErrback(self._failed, fields["param1"], msg.get("msg_id"))

    def _failed(self, failure: Failure, url: str, msg_id: object) -> None:
        _log.failure("webhook {url} of {msg_id} not queued", failure, url=url, msg_id=msg_id)


def install(instance: "Instance") -> None:
    """
    Feed the instance's webhooks from its finished messages.
    """
    if not any(isinstance(h, WebhookFeeder) for h in instance.finishedHooks):
        instance.finishedHooks.append(WebhookFeeder(instance))


def backoff(count: int) -> int:
    """
    Seconds before the next try after C{count} failed ones: C{count²·60}.
    """
    return count * count * 60


def url_problem(url: object) -> str | None:
    """
    Why C{url} can never be posted to, or C{None} when it may be: it must
    be an C{http://} or C{https://} URL with a host and, if it gives one, a
    port from 1 to 65535. (Other faults, such as characters a host name
    cannot hold, are found by the HTTP client before any I/O.)
    """
    if not isinstance(url, str) or not url:
        return "param1 must be the URL to post to"
    if not url.startswith(("http://", "https://")):
        return "not an http:// or https:// URL"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return str(e)
    if not parts.hostname:
        return "no host"
    if port == 0:
        return "port 0"
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(failure: Failure) -> str:
    if failure.check(TimeoutError):
        return f"no answer within {REQUEST_TIMEOUT:g} seconds"
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"


class WebhookHandler:
    """
    The C{webhook} queue's handler: one POST per message.
    """

    def __init__(self, http: Any, clock: IReactorTime) -> None:
        """
        @param http: a treq-like client (C{post(url, data=..., ...)});
            L{treq.testing.StubTreq} in tests.
        @param clock: the reactor's time functions (request timeouts).
        """
        self.http = http
        self.clock = clock

    async def __call__(self, job: Any) -> None:
        """
        POST C{param2} to C{param1}; report the outcome.
        """
        msg = job.msg
        count = count_of(msg, "count", 0)
        if count > MAX_TRIES:
            job.report(f"fail RQ_COUNT > {MAX_TRIES} - failing")
            return
        url = msg.get("param1")
        problem = url_problem(url)
        if problem is not None:
            job.report(f"err invalid webhook URL: {url!r} - {problem}")
            return
        assert isinstance(url, str)
        payload = msg.get("param2")
        data = {"x_format": "json", "payload": payload if isinstance(payload, str) else ""}
        job.log(f"POST {url}")
        try:
            request: Deferred[Any] = self.http.post(url, data=data, allow_redirects=False)
        except Exception as e:
            # Raised before any I/O (a host name that is no host name, ...):
            # retrying cannot help.
            job.report(f"err invalid webhook URL: {url!r} - {_one_line(str(e))}")
            return
        request.addTimeout(REQUEST_TIMEOUT, self.clock)
        try:
            response = await request
        except CancelledError:
            raise
        except Exception:
            reason = _reason(Failure())
            job.log(f"POST {url} failed: {reason}")
            job.report(f"resend {backoff(count)}-post to {url} failed: {reason}")
            return
        code = response.code
        await self._discard_body(response)
        job.log(f"POST {url}: {code}")
        if 200 <= code < 300:
            job.report(f"done successfull post {code}")
        else:
            job.report(f"resend {backoff(count)}-post to {url} answered {code}")

    async def _discard_body(self, response: Any) -> None:
        """
        Read and drop the response body, giving up after
        L{BODY_TIMEOUT} seconds.
        """
        d: Deferred[bytes] = response.content()
        d.addTimeout(BODY_TIMEOUT, self.clock)
        try:
            await d
        except CancelledError:
            raise
        except Exception:
            pass


def make_http_client(reactor: Any) -> Any:
    """
    A treq client for webhook calls: no connection reuse, a connect timeout.
    """
    from rqtwisted.relayhttp import make_client

    return make_client(reactor, CONNECT_TIMEOUT, persistent=False)


def make_handler(instance: "Instance") -> WebhookHandler:
    """
    The C{webhook} handler of a running instance (L{rqtwisted.builtin}).
    """
    return WebhookHandler(make_http_client(instance.clock), instance.clock)
