"""
Tests for L{rqtwisted.builtin}: built-in queues whose messages run as
in-process handlers, with a L{Clock} and the fake spawner as fallback.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from rqtwisted.builtin import BuiltinSpawner, handler_factory, is_placeholder, register_handler
from rqtwisted.testing import FakeSpawner, instance_for, result_of


def start(tmp_path, handler, name="relay"):
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    register_handler(name, lambda inst: handler)
    instance.create_queue({"name": "test", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    return instance, spawner, clock


def send(instance, queue="relay", **fields):
    fields.setdefault("dest", "http://far:3333/q/x" if queue == "relay" else queue)
    return result_of(instance.queue(queue).create(fields)).rsplit("/", 1)[1]


class Handled(NamedTuple):
    """
    One message sent to the C{relay} queue running an in-process handler.
    """

    instance: Any
    spawner: FakeSpawner
    clock: Clock
    queue: Any
    msg_id: str


def handled(tmp_path, handler):
    """
    Start an instance whose C{relay} queue runs C{handler}, send it one
    message and let the handler start.
    """
    instance, spawner, clock = start(tmp_path, handler)
    msg_id = send(instance)
    clock.advance(0)
    return Handled(instance, spawner, clock, instance.queue("relay"), msg_id)


def stdio(queue, msg_id):
    state = queue.locate(msg_id)
    with open(os.path.join(queue.store.msg_dir(state, msg_id), "job", "stdio.log")) as f:
        return f.read()


def test_handler_done(tmp_path, handlers):
    """
    A handler's reports drive the message like a script's; its log lines go
    to the job's stdio.log; nothing is forked; the pid file holds 0.
    """
    seen = []

    async def handler(job):
        seen.append((job.queue, job.msg_id, job.msg["param1"], job.env["RQ_DEST"], job.full_id))
        assert open(os.path.join(job.msg_dir, "pid")).read() == "0"
        job.log("step one")
        job.report("run half way")
        job.report("done all good")

    instance, spawner, clock = start(tmp_path, handler)
    msg_id = send(instance, param1="p")
    queue = instance.queue("relay")
    assert queue.locate(msg_id) == "run"
    assert seen == []  # nothing before spawn returned
    clock.advance(0)
    assert spawner.workers == []
    assert queue.locate(msg_id) == "done"
    assert queue.get_status(msg_id)["status"] == "done - all good"
    assert seen == [("relay", msg_id, "p", "http://far:3333/q/x", queue.full_id(msg_id))]
    log = stdio(queue, msg_id)
    assert "RQ START - in-process relay" in log
    assert log.rstrip().endswith("- step one")


def test_exception_ends_in_err_with_text(tmp_path, handlers):
    async def handler(job):
        raise RuntimeError("peer exploded")

    h = handled(tmp_path, handler)
    assert h.queue.locate(h.msg_id) == "err"
    assert h.queue.get_status(h.msg_id)["status"] == "err - peer exploded"
    assert "failed: peer exploded" in stdio(h.queue, h.msg_id)


def test_done_then_exception_is_err(tmp_path, handlers):
    async def handler(job):
        job.report("done too early")
        raise ValueError("then broke")

    h = handled(tmp_path, handler)
    assert h.queue.locate(h.msg_id) == "err"
    assert "PROCESS EXITED IMPROPERLY" in h.queue.get_status(h.msg_id)["status"]


def test_resend_requeues(tmp_path, handlers):
    async def handler(job):
        job.report("resend 30-peer down")

    h = handled(tmp_path, handler)
    assert h.queue.locate(h.msg_id) == "que"
    msg = h.queue.get(h.msg_id)
    assert msg["count"] == 1
    assert msg["due"] == int(h.clock.seconds()) + 30
    assert msg["status"] == "que - 30-peer down"


def test_relayed(tmp_path, handlers):
    async def handler(job):
        job.report("relayed http://far:3333/q/x/20200101.0000.00.000.1")

    h = handled(tmp_path, handler)
    assert h.queue.locate(h.msg_id) == "relayed"
    assert h.queue.get_status(h.msg_id)["status"] == "relayed - http://far:3333/q/x/20200101.0000.00.000.1"


def test_dup_reply(tmp_path, handlers):
    """
    L{InProcessJob.dup} fires with the queue's reply line.
    """
    replies = []

    async def handler(job):
        replies.append(await job.dup("0-X-test"))
        replies.append(await job.dup("0-X-nosuchqueue"))
        job.report("done duped")

    h = handled(tmp_path, handler)
    assert replies[0].startswith("ok http://testhost:3333/q/test/")
    assert replies[1] == "fail couldn't connect to queue - nosuchqueue"
    assert h.queue.locate(h.msg_id) == "done"
    [worker] = h.spawner.workers  # the copy ran in "test" with its script
    assert worker.env["RQ_DEST"] == "http://testhost:3333/q/test"


def test_stop_cancels_and_keeps_message(tmp_path, handlers):
    """
    Stopping the queue cancels a running handler; the message stays in run
    and goes back to que at the next start.
    """
    cancelled = []
    waiting: Deferred[None] = Deferred(lambda d: cancelled.append(True))

    async def handler(job):
        job.report("run waiting")
        await waiting

    h = handled(tmp_path, handler)
    assert h.queue.locate(h.msg_id) == "run"
    stopped = h.queue.stopService()
    assert cancelled == [True]
    result_of(stopped)
    assert os.path.isdir(h.queue.store.msg_dir("run", h.msg_id))
    with open(os.path.join(h.queue.store.msg_dir("run", h.msg_id), "job", "stdio.log")) as f:
        assert "cancelled" in f.read()


def test_destroy_ends_in_err(tmp_path, handlers):
    async def handler(job):
        await Deferred()

    h = handled(tmp_path, handler)
    assert h.queue.destroy(h.msg_id) == "msg destroyed"
    assert h.queue.locate(h.msg_id) == "err"
    assert "signal" in h.queue.get_status(h.msg_id)["status"]


def test_handler_ignoring_cancellation_frees_its_slot(tmp_path, handlers):
    """
    A handler that swallows its cancellation is abandoned: the destroyed
    message ends in err at once, the next one runs, and what the abandoned
    handler reports later is ignored.
    """
    from twisted.internet.defer import CancelledError

    later: Deferred[None] = Deferred()
    ran = []

    async def handler(job):
        ran.append(job.msg_id)
        if len(ran) > 1:
            job.report("done second")
            return
        try:
            await Deferred()
        except CancelledError:
            await later
            job.report("done after all")

    instance, spawner, clock = start(tmp_path, handler)
    first = send(instance)
    second = send(instance)
    clock.advance(0)
    queue = instance.queue("relay")
    assert queue.locate(second) == "que"
    queue.destroy(first)
    assert queue.locate(first) == "err"
    clock.advance(0)
    assert queue.locate(second) == "done"
    later.callback(None)
    assert queue.locate(first) == "err"
    assert "did not stop" in stdio(queue, first)


def test_signal_before_start(tmp_path, handlers):
    """
    A job signalled before its handler started never runs it.
    """
    ran = []

    async def handler(job):
        ran.append(job)

    instance, spawner, clock = start(tmp_path, handler)
    msg_id = send(instance)
    queue = instance.queue("relay")
    queue.destroy(msg_id)
    clock.advance(0)
    assert ran == []
    assert queue.locate(msg_id) == "err"


def test_user_script_still_forks(tmp_path, handlers):
    """
    A built-in queue whose script is not the placeholder forks its script.
    """
    ran = []

    async def handler(job):
        ran.append(job)

    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    register_handler("relay", lambda inst: handler)
    with open(instance.root.join("code", "relay_script"), "w") as f:
        f.write("#!/bin/sh\necho done mine >&3\n")
    instance.startService()
    msg_id = send(instance)
    clock.advance(0)
    assert ran == []
    [worker] = spawner.workers
    assert worker.env["RQ_MSG_ID"] == msg_id


def test_registry(tmp_path, handlers):
    assert handler_factory("no_such_queue") is None
    register_handler("cleaner", "rqtwisted.no_such_module.make_handler")
    assert handler_factory("cleaner") is None
    register_handler("cleaner", "rqtwisted.builtin.no_such_attribute")
    assert handler_factory("cleaner") is None
    factory = lambda inst: None  # noqa: E731
    register_handler("cleaner", factory)
    assert handler_factory("cleaner") is factory


def test_placeholder_detection(tmp_path):
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    path = instance.root.join("code", "webhook_script")
    assert is_placeholder(path, "webhook")
    assert not is_placeholder(path, "relay")
    assert not is_placeholder(str(tmp_path / "missing"), "webhook")


def test_no_handler_falls_back(tmp_path, handlers):
    """
    Without a handler the placeholder itself is forked.
    """
    handlers.pop("relay")
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.startService()
    spawn = BuiltinSpawner(instance, "relay", spawner)
    assert spawn.handler() is None
    send(instance)
    assert len(spawner.workers) == 1


def test_broken_factory_falls_back(tmp_path, handlers):
    """
    A handler factory that raises leaves the queue running its placeholder.
    """

    def broken(instance):
        raise ImportError("half-written module")

    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    register_handler("relay", broken)
    instance.startService()
    msg_id = send(instance)
    queue = instance.queue("relay")
    assert queue.running and queue.locate(msg_id) == "run"
    [worker] = spawner.workers
    assert worker.env["RQ_MSG_ID"] == msg_id


KINDS = (
    "done", "raise", "late_done", "late_raise", "resend", "err", "silent", "hang", "stubborn", "deaf", "dup", "relayed",
    "plain_raise", "plain_fail", "plain_none",
)


@pytest.mark.parametrize("seed", range(4))
def test_hammer_random_outcomes(tmp_path, handlers, seed):
    """
    Hundreds of messages through four in-process slots with random outcomes
    (synchronous and late reports, exceptions, resends, dups, handlers that
    hang until destroyed, handlers that report after being cancelled and
    ignore the cancellation): every slot is freed, every message leaves run
    exactly once, and nothing stays queued.
    """
    import random
    from dataclasses import replace

    from twisted.internet.defer import CancelledError
    from twisted.internet.task import deferLater

    rng = random.Random(seed)
    exits: dict[str, int] = {}

    def handler(job):
        # Not a coroutine function: may also raise or answer at once.
        kind = rng.choice(KINDS)
        if kind == "plain_raise":
            raise RuntimeError("raised before any Deferred")
        if kind == "plain_fail":
            return fail(RuntimeError("failed Deferred"))
        if kind == "plain_none":
            return None
        return coroutine(job, kind)

    async def coroutine(job, kind):
        if kind == "done":
            job.report("done now")
        elif kind == "raise":
            raise RuntimeError("boom")
        elif kind == "late_done":
            await deferLater(clock, rng.random() * 3)
            job.report("done later")
        elif kind == "late_raise":
            await deferLater(clock, rng.random() * 3)
            raise RuntimeError("late boom")
        elif kind == "resend":
            job.report("resend 1-try again")
        elif kind == "err":
            job.report("err bad")
        elif kind == "hang":
            job.report("run hanging")
            await Deferred()
        elif kind == "stubborn":
            try:
                await Deferred()
            except CancelledError:
                job.report("done after cancel")
                await deferLater(clock, 1)
                job.report("run still going")
        elif kind == "deaf":
            # Ignores its cancellation for good: the slot must be freed anyway.
            while True:
                try:
                    await Deferred()
                except CancelledError:
                    job.report("done not listening")
        elif kind == "dup":
            reply = await job.dup("0-X-test")
            job.report(f"done {reply}")
        elif kind == "relayed":
            job.report("relayed http://far:3333/q/x/20200101.0000.00.000.1")

    instance, spawner, clock = start(tmp_path, handler)
    queue = instance.queue("relay")
    queue.reconfigure(replace(queue.config, num_workers=4))
    original = queue.workerExited

    def counting(job, code, sig):
        exits[job.msg_id] = exits.get(job.msg_id, 0) + 1
        return original(job, code, sig)

    queue.workerExited = counting
    starts: dict[str, int] = {}
    spawn = queue.spawn

    def counting_spawn(**kwargs):
        msg_id = os.path.basename(os.path.dirname(kwargs["job_dir"]))
        starts[msg_id] = starts.get(msg_id, 0) + 1
        return spawn(**kwargs)

    queue.spawn = counting_spawn
    ids = [send(instance, param1=str(i)) for i in range(150)]
    for _ in range(3000):
        assert len(queue.run) <= 4
        if queue.run and rng.random() < 0.2:
            queue.destroy(rng.choice(sorted(queue.run)))
        clock.advance(rng.choice([0, 0, 0.5, 1, 2]))
        if not queue.que and not queue.run:
            break
    assert queue.running
    assert not queue.que and not queue.held and not queue.run
    states = {queue.locate(m) for m in ids}
    assert states <= {"done", "err", "relayed"}
    assert sum(queue.counts.values()) == len(ids)
    # Exactly one exit per start of a message (resends start it again).
    assert exits == starts
