"""
Tests for L{rqtwisted.webhook}: feeding the C{webhook} queue from finished
messages, and the in-process handler posting with a stubbed treq, driven by
a L{Clock} through the real queue service.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.web.resource import Resource

from rqtwisted.builtin import register_handler
from rqtwisted.testing import instance_for, result_of
from rqtwisted.webhook import (
    MAX_TRIES,
    REQUEST_TIMEOUT,
    WebhookFeeder,
    WebhookHandler,
    backoff,
    webhook_messages,
    webhook_payload,
)



class Receiver(Resource):
    """
    Records each POST; answers with the next code of C{codes}.
    """

    isLeaf = True

    def __init__(self, codes: list[int]) -> None:
        super().__init__()
        self.codes = codes
        self.requests: list[tuple[bytes, bytes, dict, bytes]] = []

    def render_POST(self, request) -> bytes:
        body = request.content.read()
        self.requests.append((request.uri, request.getHeader("content-type"), parse_qs(body.decode()), body))
        request.setResponseCode(self.codes.pop(0) if self.codes else 200)
        return b"thanks"


class FakeHTTP:
    """
    A treq-like client whose C{post} returns what the test decides.
    """

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[str] = []

    def post(self, url, **kwargs):
        self.calls.append(url)
        return self.answer()


@pytest.fixture
def hooked(tmp_path, handlers):
    """
    An instance with queue C{test} (fake workers) whose C{webhook} queue runs
    the handler in-process; returns a function installing the HTTP client.
    """
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    holder: dict = {}
    register_handler("webhook", lambda inst: WebhookHandler(holder["http"], clock))
    instance.create_queue({"name": "test", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    return instance, spawner, clock, holder


def finish(instance, spawner, clock, verb="done all good", code=0, **fields):
    fields.setdefault("dest", "test")
    full = result_of(instance.create_message(fields))
    worker = spawner.workers[-1]
    worker.say(verb)
    worker.exit(code)
    return full


def hooks(instance):
    q = instance.queue("webhook")
    return [q.get(m) for m in sorted(q.messages("que") + q.messages("run") + q.messages("done")
                                     + q.messages("err"))]


# -- pure parts ---------------------------------------------------------------------


def test_payload_shape() -> None:
    msg = {"msg_id": "20240101.0000.00.000.1", "dest": "test", "param1": "a", "status": "x", "path": "p",
           "_attachments": {}, "_internal": 1, "count": 0}
    payload = json.loads(webhook_payload(msg, "done", "http://h:3333/q/test/20240101.0000.00.000.1"))
    assert payload == {"msg_id": "http://h:3333/q/test/20240101.0000.00.000.1", "dest": "test", "param1": "a",
                       "count": 0, "state": "done"}


def test_messages_per_url_and_state() -> None:
    msg = {"msg_id": "1", "post_run_webhook": ["http://a/x", "http://b/y"]}
    out = webhook_messages(msg, "err", "F")
    assert [(m["dest"], m["param1"]) for m in out] == [("webhook", "http://a/x"), ("webhook", "http://b/y")]
    assert json.loads(out[0]["param2"])["state"] == "err"
    assert webhook_messages(msg, "que", "F") == []
    assert webhook_messages({"msg_id": "1"}, "done", "F") == []
    assert len(webhook_messages({"msg_id": "1", "post_run_webhook": "http://a http://b"}, "relayed", "F")) == 2


@pytest.mark.parametrize("count, delay", [(0, 0), (1, 60), (2, 240), (15, 13500)])
def test_backoff(count: int, delay: int) -> None:
    assert backoff(count) == delay


# -- feeding ------------------------------------------------------------------------


@pytest.mark.parametrize("verb, code, state", [("done ok", 0, "done"), ("err bad", 0, "err"),
                                               ("relayed http://x:3333/q/a/1", 0, "relayed"),
                                               ("done but", 3, "err")])
def test_finished_message_feeds_webhook_queue(hooked, verb, code, state) -> None:
    instance, spawner, clock, holder = hooked
    instance.set_admin("pause", "webhook")
    full = finish(instance, spawner, clock, verb, code, param1="p1",
                  post_run_webhook=["http://a.example/hook", "http://b.example/hook"])
    [a, b] = hooks(instance)
    assert (a["dest"], a["param1"], a["state"]) == ("webhook", "http://a.example/hook", "que")
    assert b["param1"] == "http://b.example/hook"
    payload = json.loads(a["param2"])
    assert payload["msg_id"] == full and payload["state"] == state and payload["param1"] == "p1"
    assert "status" not in payload and "_attachments" not in payload
    assert payload["post_run_webhook"] == ["http://a.example/hook", "http://b.example/hook"]


def test_no_webhook_without_urls(hooked) -> None:
    instance, spawner, clock, holder = hooked
    instance.set_admin("pause", "webhook")
    finish(instance, spawner, clock)
    assert hooks(instance) == []


def test_resend_and_coalesced_dups_do_not_fire(hooked) -> None:
    instance, spawner, clock, holder = hooked
    instance.set_admin("pause", "webhook")
    finish(instance, spawner, clock, "resend 60", post_run_webhook=["http://a/"])
    assert hooks(instance) == []


def test_missing_or_down_webhook_queue_is_logged_not_fatal(hooked) -> None:
    instance, spawner, clock, holder = hooked
    instance.set_admin("down", "webhook")
    full = finish(instance, spawner, clock, post_run_webhook=["http://a/"])
    q = instance.queue("test")
    assert q.locate(full.rsplit("/", 1)[1]) == "done"
    result_of(instance.delete_queue("webhook"))
    finish(instance, spawner, clock, post_run_webhook=["http://a/"])
    assert "test" in instance.queues and instance.queue("test").running
    assert sum(isinstance(h, WebhookFeeder) for h in instance.finishedHooks) == 1


# -- delivering ----------------------------------------------------------------------


def test_post_form_fields_and_done(hooked) -> None:
    instance, spawner, clock, holder = hooked
    receiver = Receiver([201])
    holder["http"] = StubTreq(receiver)
    full = finish(instance, spawner, clock, post_run_webhook=["http://hooks.example/in?k=1"])
    clock.advance(0)
    [hook] = hooks(instance)
    assert (hook["state"], hook["status"]) == ("done", "done - successfull post 201")
    [(uri, ctype, form, body)] = receiver.requests
    assert uri == b"/in?k=1"
    assert ctype == "application/x-www-form-urlencoded"
    assert sorted(form) == ["payload", "x_format"]
    assert form["x_format"] == ["json"]
    assert json.loads(form["payload"][0])["msg_id"] == full
    assert json.loads(form["payload"][0]) == json.loads(hook["param2"])


def test_non_2xx_resends_with_backoff(hooked) -> None:
    instance, spawner, clock, holder = hooked
    receiver = Receiver([500, 404, 200])
    holder["http"] = StubTreq(receiver)
    finish(instance, spawner, clock, post_run_webhook=["http://hooks.example/in"])
    clock.advance(0)
    [hook] = hooks(instance)
    # First failure: count 0 -> resend 0 seconds: retried at once.
    assert len(receiver.requests) == 2
    assert (hook["state"], hook["count"]) == ("que", 2)
    assert hook["status"] == "que - 60-post to http://hooks.example/in answered 404"
    clock.advance(59)
    assert len(receiver.requests) == 2
    clock.advance(1)
    [hook] = hooks(instance)
    assert len(receiver.requests) == 3
    assert (hook["state"], hook["status"], hook["count"]) == ("done", "done - successfull post 200", 2)


def test_connection_error_resends(hooked) -> None:
    instance, spawner, clock, holder = hooked
    http = FakeHTTP(lambda: fail(ConnectionRefusedError("nobody home")))
    holder["http"] = http
    instance.set_admin("pause", "webhook")
    finish(instance, spawner, clock, post_run_webhook=["http://down.example/"])
    [hook] = hooks(instance)
    q = instance.queue("webhook")
    result_of(q.store.write_msg("que", hook["msg_id"], {**{k: v for k, v in hook.items() if k not in
                                                          ("state", "status", "path")}, "count": 3}))
    result_of(instance.restart_queue("webhook"))
    instance.set_admin("resume", "webhook")
    clock.advance(0)
    [hook] = hooks(instance)
    assert hook["state"] == "que" and hook["count"] == 4
    assert hook["status"].startswith("que - 540-post to http://down.example/ failed: ConnectionRefusedError")


def test_timeout_resends(hooked) -> None:
    instance, spawner, clock, holder = hooked
    pending: list[Deferred] = []

    def never():
        d = Deferred()
        pending.append(d)
        return d

    holder["http"] = FakeHTTP(never)
    finish(instance, spawner, clock, post_run_webhook=["http://slow.example/"])
    clock.advance(0)
    [hook] = hooks(instance)
    assert hook["state"] == "run"
    clock.advance(REQUEST_TIMEOUT)
    # count 0: resent after 0 seconds, so it runs again at once.
    [hook] = hooks(instance)
    assert (hook["state"], hook["count"], len(pending)) == ("run", 1, 2)
    assert hook["status"] == (
        f"run - 0-post to http://slow.example/ failed: no answer within {REQUEST_TIMEOUT:g} seconds"
    )


def test_gives_up_after_15(hooked) -> None:
    instance, spawner, clock, holder = hooked
    holder["http"] = http = FakeHTTP(lambda: fail(RuntimeError("unused")))
    instance.set_admin("pause", "webhook")
    result_of(instance.queue("webhook").create(
        {"dest": "webhook", "param1": "http://x/", "param2": "{}", "count": MAX_TRIES + 1, "max_count": 99}))
    instance.set_admin("resume", "webhook")
    clock.advance(0)
    [hook] = hooks(instance)
    assert (hook["state"], hook["status"]) == ("err", f"err - RQ_COUNT > {MAX_TRIES} - failing")
    assert http.calls == []


@pytest.mark.parametrize("url,why", [
    ("ftp://x/", "not an http:// or https:// URL"),
    ("", "param1 must be the URL to post to"),
    ("http:///path", "no host"),
    ("http://", "no host"),
    ("https://user@:443/", "no host"),
    ("http://h:99999/", "Port out of range 0-65535"),
    ("http://h:0/", "port 0"),
    ("http://h:x/", "Port could not be cast to integer value as 'x'"),
    ("http://[::1/", "Invalid IPv6 URL"),
])
def test_url_that_can_never_be_posted_to_is_err_at_once(hooked, url, why) -> None:
    """
    A URL no retry can help goes to err at once, saying which URL and why,
    without a POST (special-queues.md: resend is for the outcomes of a
    POST). A host-less URL or a port out of range failed only at connect
    time, and was resent 15 times over some 20 hours.
    """
    instance, spawner, clock, holder = hooked
    holder["http"] = http = FakeHTTP(lambda: fail(ValueError("invalid hostname: ")))
    result_of(instance.queue("webhook").create({"dest": "webhook", "param1": url, "param2": "{}"}))
    clock.advance(0)
    [hook] = hooks(instance)
    assert (hook["state"], hook["status"]) == ("err", f"err - invalid webhook URL: {url!r} - {why}")
    assert http.calls == []


def test_webhook_without_url_is_err(hooked) -> None:
    instance, spawner, clock, holder = hooked
    holder["http"] = http = FakeHTTP(lambda: fail(RuntimeError("unused")))
    result_of(instance.queue("webhook").create({"dest": "webhook", "param2": "{}"}))
    clock.advance(0)
    [hook] = hooks(instance)
    assert hook["state"] == "err"
    assert hook["status"] == "err - invalid webhook URL: None - param1 must be the URL to post to"
    assert http.calls == []


def test_url_treq_cannot_build_is_err(hooked) -> None:
    """
    A URL the HTTP client refuses before any I/O (a host that is no host
    name) ends the webhook message in err, without a traceback.
    """
    instance, spawner, clock, holder = hooked
    holder["http"] = StubTreq(Receiver([200]))
    url = 'http://a"><script>x</script>/'
    result_of(instance.queue("webhook").create({"dest": "webhook", "param1": url, "param2": "{}"}))
    clock.advance(0)
    [hook] = hooks(instance)
    assert hook["state"] == "err"
    assert hook["status"].startswith(f"err - invalid webhook URL: {url!r} - ")
    assert "U+0022" in hook["status"]


def test_stop_cancels_a_pending_post(hooked) -> None:
    instance, spawner, clock, holder = hooked
    holder["http"] = FakeHTTP(lambda: Deferred())
    finish(instance, spawner, clock, post_run_webhook=["http://slow.example/"])
    clock.advance(0)
    [hook] = hooks(instance)
    q = instance.queue("webhook")
    result_of(q.stopService())
    assert q.store.exists("run", hook["msg_id"])


def test_registered_factory_builds_a_treq_handler(tmp_path) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from rqtwisted.builtin import handler_factory

    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    reactor = MemoryReactorClock()
    instance.clock = reactor
    handler = handler_factory("webhook")(instance)
    assert isinstance(handler, WebhookHandler) and handler.clock is reactor
    # The request goes out through the reactor: a TCP connection attempt
    # with the connect timeout.
    handler.http.post("http://127.0.0.1:9/x", data={"a": "b"})
    [(host, port, factory, timeout, bind)] = reactor.tcpClients
    assert (host, port, timeout) == ("127.0.0.1", 9, 15.0)
