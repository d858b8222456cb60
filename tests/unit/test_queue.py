"""
Tests for L{rqtwisted.queue}: the scheduler, worker reports and exits, and
message operations, with a L{Clock} and fake workers.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from rqtwisted.durable import Syncer
from rqtwisted.message import MessageError
from rqtwisted.queue import IDLE_PASS, READY_STALE, READY_WITHIN, STOP_GRACE
from rqtwisted.testing import HeldThreads, immediateSyncer, instance_for, result_of


def send(instance, queue="test", **fields):
    fields.setdefault("dest", queue)
    return result_of(instance.create_message(fields))


def short(full):
    return full.rsplit("/", 1)[1]


def test_message_runs_to_done(started):
    instance, spawner, clock = started
    full = send(instance, param1="x")
    assert full.startswith("http://testhost:3333/q/test/")
    [worker] = spawner.workers
    assert worker.env["RQ_PARAM1"] == "x"
    assert worker.env["RQ_FULL_MSG_ID"] == full
    queue = instance.queue("test")
    msg_id = short(full)
    assert queue.locate(msg_id) == "run"
    assert os.path.exists(os.path.join(queue.store.msg_dir("run", msg_id), "pid"))
    worker.say("run half way")
    assert queue.get_status(msg_id)["status"] == "run - half way"
    worker.say("done all files copied")
    worker.exit(0)
    assert queue.locate(msg_id) == "done"
    assert queue.get_status(msg_id)["status"] == "done - all files copied"
    assert queue.num_messages()["done"] == 1
    assert not os.path.exists(os.path.join(queue.store.msg_dir("done", msg_id), "pid"))


def test_done_with_nonzero_exit_is_err(started):
    instance, spawner, clock = started
    msg_id = short(send(instance))
    spawner.workers[0].say("done fine")
    spawner.workers[0].exit(3)
    q = instance.queue("test")
    assert q.get_status(msg_id)["status"] == (
        "err - PROCESS EXITED IMPROPERLY - MOVING TO ERR - Completion was done but exit status was exit 3"
    )


def test_no_verb_is_err_and_killed_is_err(started):
    instance, spawner, clock = started
    a = short(send(instance))
    spawner.workers[0].exit(0)
    b = short(send(instance))
    spawner.workers[1].exit(None, signal.SIGKILL)
    q = instance.queue("test")
    assert q.locate(a) == "err" and q.locate(b) == "err"
    assert "SIGKILL" in q.get_status(b)["status"]


def test_resend_requeues_with_count_and_due(started):
    instance, spawner, clock = started
    msg_id = short(send(instance))
    w = spawner.workers[0]
    w.say("resend 30-try later")
    w.exit(0)
    q = instance.queue("test")
    assert q.locate(msg_id) == "que"
    msg = q.get(msg_id)
    assert msg["count"] == 1
    assert msg["due"] == int(clock.seconds()) + 30
    clock.advance(29)
    assert len(spawner.workers) == 1
    clock.advance(1)
    assert len(spawner.workers) == 2
    assert spawner.workers[1].env["RQ_COUNT"] == "1"


def test_resend_hits_max_count(started):
    instance, spawner, clock = started
    msg_id = short(send(instance, max_count=1))
    spawner.workers[0].say("resend 0")
    spawner.workers[0].exit(0)
    q = instance.queue("test")
    assert q.get_status(msg_id)["status"] == "err - HIT MAX RESEND COUNT - MOVING TO ERR"


def test_first_completion_wins(started):
    instance, spawner, clock = started
    msg_id = short(send(instance))
    w = spawner.workers[0]
    w.say("err broken")
    w.say("done not really")
    w.exit(0)
    q = instance.queue("test")
    assert q.locate(msg_id) == "err"
    assert q.get_status(msg_id)["status"] == "err - not really"


def test_due_in_future_waits(started):
    instance, spawner, clock = started
    send(instance, due=int(clock.seconds()) + 100)
    assert spawner.workers == []
    clock.advance(99)
    assert spawner.workers == []
    clock.advance(1)
    assert len(spawner.workers) == 1


def test_fills_all_slots_earliest_due_first(started):
    instance, spawner, clock = started
    instance.create_queue({"name": "par", "script": "./code/noop", "num_workers": 3, "exec_prefix": ""})
    instance.set_admin("pause", "par")
    now = int(clock.seconds())
    ids = [short(send(instance, "par", due=now - k, param1=str(k))) for k in range(5)]
    assert spawner.workers == []
    instance.set_admin("resume", "par")
    assert [w.env["RQ_PARAM1"] for w in spawner.workers] == ["4", "3", "2"]
    spawner.workers[0].say("done")
    spawner.workers[0].exit(0)
    assert [w.env["RQ_PARAM1"] for w in spawner.running] == ["3", "2", "1"]
    assert len(ids) == 5


def test_down_refuses_writes_pause_keeps_accepting(started):
    instance, spawner, clock = started
    instance.set_admin("down", "test")
    with pytest.raises(MessageError, match="status: DOWN"):
        instance.create_message({"dest": "test"})
    assert instance.queue("test").status() == "DOWN"
    instance.set_admin("up", "test")
    instance.set_admin("pause", "test")
    send(instance)
    assert spawner.workers == []
    assert instance.queue("test").status() == "PAUSE"


def test_marker_removed_by_hand_is_noticed(started):
    instance, spawner, clock = started
    instance.set_admin("pause", "test")
    send(instance)
    os.unlink(instance.root.marker("test", "pause"))
    clock.advance(IDLE_PASS)
    assert len(spawner.workers) == 1


def test_scripterror_is_rechecked(started):
    instance, spawner, clock = started
    script = instance.root.join("code", "noop")
    os.chmod(script, 0o644)
    msg_id = short(send(instance))
    q = instance.queue("test")
    assert q.status() == "SCRIPTERROR"
    assert q.locate(msg_id) == "que"
    os.chmod(script, 0o755)
    clock.advance(IDLE_PASS)
    assert q.status() == "UP"
    assert len(spawner.workers) == 1


def test_script_checked_once_per_pass(tmp_path, monkeypatch):
    """
    One scheduling pass checks the script once, however many workers it
    starts or makes ready; the next pass checks it again (so a script made
    unrunnable is seen at the next pass).
    """
    import rqtwisted.queue as queue_module

    calls = []
    real = queue_module.resolve_script

    def counting(script, root):
        calls.append(script)
        return real(script, root)

    monkeypatch.setattr(queue_module, "resolve_script", counting)
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    calls.clear()
    instance.set_admin("resume", "rw")
    # Two started and one made ready, in one pass.
    assert len(spawner.workers) == 3
    assert calls == ["./code/noop"]
    os.chmod(instance.root.join("code", "noop"), 0o644)
    finish(spawner.workers[0])
    assert len(calls) == 2
    assert q.status() == "SCRIPTERROR"
    assert spawner.workers[2].cancelled and q.locate(ids[2]) == "que"


def test_blocking_params(started):
    instance, spawner, clock = started
    instance.create_queue(
        {"name": "blk", "script": "./code/noop", "num_workers": 3, "blocking_params": [1], "exec_prefix": ""}
    )
    instance.set_admin("pause", "blk")
    now = int(clock.seconds())
    send(instance, "blk", param1="a", param2="1", due=now - 3)
    send(instance, "blk", param1="a", param2="2", due=now - 2)
    send(instance, "blk", param1="b", param2="3", due=now - 1)
    instance.set_admin("resume", "blk")
    assert [w.env["RQ_PARAM2"] for w in spawner.running] == ["1", "3"]
    spawner.workers[0].say("done")
    spawner.workers[0].exit(0)
    assert [w.env["RQ_PARAM2"] for w in spawner.running] == ["3", "2"]


def test_coalesce_params(started):
    instance, spawner, clock = started
    instance.create_queue({"name": "co", "script": "./code/noop", "coalesce_params": [1], "exec_prefix": ""})
    instance.set_admin("pause", "co")
    now = int(clock.seconds())
    first = short(send(instance, "co", param1="a", due=now - 3))
    dup = short(send(instance, "co", param1="a", due=now + 1000))
    other = short(send(instance, "co", param1="b", due=now - 1))
    instance.set_admin("resume", "co")
    q = instance.queue("co")
    assert q.locate(dup) == "que"
    spawner.workers[0].say("done")
    spawner.workers[0].exit(0)
    assert q.locate(dup) == "done"
    assert q.get_status(dup)["status"] == f"done - duplicate {q.full_id(first)}"
    assert q.get(first)["dups"] == [q.full_id(dup)]
    assert q.locate(other) == "run"


def test_coalesced_dups_return_on_err(started):
    instance, spawner, clock = started
    instance.create_queue({"name": "co", "script": "./code/noop", "coalesce_params": [1], "exec_prefix": ""})
    instance.set_admin("pause", "co")
    now = int(clock.seconds())
    send(instance, "co", param1="a", due=now - 3)
    dup = short(send(instance, "co", param1="a", due=now - 1))
    instance.set_admin("resume", "co")
    spawner.workers[0].exit(1)
    assert len(spawner.workers) == 2
    assert spawner.workers[1].env["RQ_MSG_ID"] == dup


def test_dup_to_local_queue_replies(started):
    instance, spawner, clock = started
    instance.create_queue({"name": "other", "script": "./code/noop", "exec_prefix": ""})
    instance.set_admin("pause", "other")
    src = short(send(instance, param1="p"))
    w = spawner.workers[0]
    w.say("dup 0-X-other")
    [reply] = w.replies
    assert reply.startswith("ok http://testhost:3333/q/other/")
    copy = instance.queue("other").get(short(reply[3:]))
    assert copy["dest"] == "other" and copy["param1"] == "p" and copy["count"] == 0
    assert copy["orig_msg_id"] == instance.queue("test").full_id(src)
    w.say("dup 0-X-nosuchqueue")
    assert w.replies[1] == "fail couldn't connect to queue - nosuchqueue"
    instance.set_admin("down", "other")
    w.say("dup 0-X-other")
    assert w.replies[2] == "fail dup failed - status: DOWN"



def test_dup_replies_keep_the_order_of_the_requests(started, monkeypatch):
    """
    A script writing several C{dup} lines before reading fd 4 gets one reply
    per line, in the same order, even when a refusal is known before an
    earlier copy is durable.
    """
    instance, spawner, clock = started
    instance.create_queue({"name": "other", "script": "./code/noop", "exec_prefix": ""})
    instance.set_admin("pause", "other")
    send(instance, param1="p")
    w = spawner.workers[0]
    other = instance.queue("other")
    first: Deferred[str] = Deferred()
    calls = []
    real_create = other.create

    def create(*args, **kwargs):
        calls.append(args)
        return first if len(calls) == 1 else real_create(*args, **kwargs)

    monkeypatch.setattr(other, "create", create)
    w.say("dup 0-X-other")
    w.say("dup 0-X-nosuchqueue")
    w.say("dup 0-X-other")
    assert w.replies == []
    first.callback("http://testhost:3333/q/other/first")
    assert w.replies[:2] == ["ok http://testhost:3333/q/other/first", "fail couldn't connect to queue - nosuchqueue"]
    assert w.replies[2].startswith("ok http://testhost:3333/q/other/")
    assert len(w.replies) == 3
    w.say("dup 0-X-nosuchqueue")
    assert w.replies[3] == "fail couldn't connect to queue - nosuchqueue"


def test_workers_know_their_root(started):
    """
    The workers' environment names the root (C{RQ_ROOT}), so that C{rq} run
    by a script (its cwd is the job directory) talks to this daemon.
    """
    instance, spawner, clock = started
    send(instance)
    assert spawner.workers[0].env["RQ_ROOT"] == instance.root.path

def test_prep_attach_commit(started, tmp_path):
    instance, spawner, clock = started
    full = result_of(instance.create_message({"dest": "test"}, "prep"))
    q = instance.queue("test")
    msg_id = short(full)
    assert q.locate(msg_id) == "prep"
    f = tmp_path / "a.txt"
    f.write_text("abc")
    assert result_of(q.attach(msg_id, str(f))) == "900150983cd24fb0d6963f7d28e17f72-Attached successfully"
    assert spawner.workers == []
    assert result_of(q.commit(msg_id)) == "msg commited"
    assert q.locate(msg_id) == "run"
    with pytest.raises(MessageError, match="cannot find message"):
        q.commit(msg_id)


def test_single_que_returns_latest_queued(started):
    instance, spawner, clock = started
    instance.set_admin("pause", "test")
    a = result_of(instance.create_message({"dest": "test"}, "single_que"))
    b = result_of(instance.create_message({"dest": "test"}, "single_que"))
    assert a == b
    assert instance.queue("test").num_messages()["que"] == 1


def test_run_now_delete_clone(started):
    instance, spawner, clock = started
    instance.set_admin("pause", "test")
    now = int(clock.seconds())
    a = short(send(instance, due=now + 500))
    b = short(send(instance, due=now + 1000))
    q = instance.queue("test")
    assert result_of(q.run_now(b)) == "msg sent to front of run queue"
    assert q.get(b)["due"] <= now
    assert result_of(q.delete(a)) == "msg deleted"
    with pytest.raises(MessageError, match="msg not found"):
        q.locate(a)
    instance.set_admin("resume", "test")
    spawner.workers[0].say("done")
    spawner.workers[0].exit(0)
    with pytest.raises(MessageError, match="cannot clone message in que state"):
        instance.set_admin("pause", "test")
        q.clone(short(send(instance)))
    new = result_of(q.clone(b))
    assert q.get(short(new))["cloned_from"] == b
    assert result_of(q.delete(b)) == "msg deleted"
    assert q.num_messages()["done"] == 0


def test_destroy_signals_process_group(started):
    instance, spawner, clock = started
    msg_id = short(send(instance))
    q = instance.queue("test")
    assert q.destroy(msg_id) == "msg destroyed"
    assert spawner.workers[0].signals == [signal.SIGTERM]
    with pytest.raises(MessageError):
        q.delete(msg_id)


def test_stop_terminates_then_kills_and_leaves_message_in_run(started):
    instance, spawner, clock = started
    msg_id = short(send(instance))
    q = instance.queue("test")
    w = spawner.workers[0]
    d = instance.stopService()
    assert w.signals == [signal.SIGTERM]
    clock.advance(STOP_GRACE)
    assert w.signals == [signal.SIGTERM, signal.SIGKILL]
    fired = []
    d.addCallback(fired.append)
    assert fired == []
    w.exit(None, signal.SIGKILL)
    assert fired
    assert q.store.exists("run", msg_id)


def test_stop_does_not_wait_for_a_worker_that_never_started(started):
    """
    A worker still without a pid when the grace period ends (its spawn
    never got past the gate) is not waited for: the stop completes, the
    message stays in run; were it to start later, it gets the signals.
    """
    instance, spawner, clock = started
    msg_id = short(send(instance))
    q = instance.queue("test")
    w = spawner.workers[0]
    w.pid = None
    d = instance.stopService()
    fired = []
    d.addCallback(fired.append)
    assert w.signals == [signal.SIGTERM]
    clock.advance(STOP_GRACE)
    assert w.signals == [signal.SIGTERM, signal.SIGKILL]
    assert fired
    assert q.store.exists("run", msg_id)
    # A late exit is still handled once, quietly.
    w.exit(None, signal.SIGKILL)
    assert q.store.exists("run", msg_id)


def test_restart_recovers_run_to_que(started):
    instance, spawner, clock = started
    msg_id = short(send(instance))
    spawner.workers[0].say("run working")
    d = instance.restart_queue("test")
    assert spawner.workers[0].signals == [signal.SIGTERM]
    spawner.workers[0].exit(None, signal.SIGTERM)
    assert result_of(d) == "test"
    # The new queue service re-runs the message.
    assert spawner.workers[-1].env["RQ_MSG_ID"] == msg_id
    assert instance.queue("test").locate(msg_id) == "run"



def test_one_restart_or_delete_at_a_time(started):
    """
    While a queue is being restarted (its worker still in its grace
    period), another restart, a delete or a whole-server restart is
    refused: a second queue service would run the message again beside
    the old worker. Once done, they are allowed again.
    """
    instance, spawner, clock = started
    send(instance)
    d = instance.restart_queue("test")
    assert spawner.workers[0].signals == [signal.SIGTERM]
    for attempt in (lambda: instance.restart_queue("test"), lambda: instance.delete_queue("test"), instance.restart):
        with pytest.raises(MessageError, match="queue busy: test is being restarted or deleted"):
            attempt()
    assert len(spawner.workers) == 1
    spawner.workers[0].exit(None, signal.SIGTERM)
    assert result_of(d) == "test"
    assert len(spawner.workers) == 2
    d = instance.delete_queue("test")
    spawner.workers[1].exit(None, signal.SIGTERM)
    assert result_of(d) == "started deleting queue"


def test_restart_with_a_bad_config_keeps_the_queue(started):
    """
    A restart whose new config cannot be loaded is refused before anything
    stops: the queue and its worker go on as they were.
    """
    instance, spawner, clock = started
    send(instance)
    q = instance.queue("test")
    with open(os.path.join(instance.root.queue_path("test"), "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(MessageError, match="queue not restarted: bad config"):
        instance.restart_queue("test")
    assert instance.queue("test") is q
    assert spawner.workers[0].signals == []


def _count_config_reads(instance, monkeypatch) -> list[str]:
    """
    The names of the queues whose C{config.json} C{instance} reads from
    now on.
    """
    reads: list[str] = []
    real = instance.root.load_queue_config
    monkeypatch.setattr(instance.root, "load_queue_config", lambda name: reads.append(name) or real(name))
    return reads


def _break_config(instance, name: str) -> None:
    with open(os.path.join(instance.root.queue_path(name), "config.json"), "w") as f:
        f.write("{not json")


def test_restart_queue_reads_its_config_once(started, monkeypatch):
    """
    A queue restart reads the queue's config once, before the queue stops:
    a config that goes bad while the workers end cannot leave the queue
    stopped (it was read again to start it, and the queue was dropped).
    """
    instance, spawner, clock = started
    reads = _count_config_reads(instance, monkeypatch)
    send(instance)
    d = instance.restart_queue("test")
    _break_config(instance, "test")
    spawner.workers[0].exit(None, signal.SIGTERM)
    assert result_of(d) == "test"
    assert reads == ["test"]
    assert instance.queue("test").running
    assert len(spawner.workers) == 2


def test_server_restart_reads_each_config_once(started, monkeypatch):
    """
    C{rq restart} reads each queue's config once, before the queues stop,
    and starts each with it, even if it went bad meanwhile.
    """
    instance, spawner, clock = started
    instance.create_queue({"name": "other", "script": "./code/noop", "exec_prefix": ""})
    reads = _count_config_reads(instance, monkeypatch)
    send(instance)
    d = instance.restart()
    _break_config(instance, "test")
    spawner.workers[0].exit(None, signal.SIGTERM)
    assert result_of(d) == "restarted"
    assert sorted(reads) == sorted(instance.queues) and "test" in reads
    assert instance.queue("test").running and instance.queue("other").running
    assert len(spawner.workers) == 2


def test_a_failed_queue_can_be_administered(started):
    """
    A queue that failed and waits to be started again can still be
    paused, downed, restarted at once or deleted.
    """
    instance, spawner, clock = started
    fail_queue(instance, "test")
    assert result_of(instance.set_admin("pause", "test")) == "test"
    assert os.path.exists(instance.root.marker("test", "pause"))
    assert result_of(instance.delete_queue("test")) == "started deleting queue"
    clock.advance(10)
    assert "test" not in instance.queues


def test_create_message_converts_command_line_counts(started):
    """
    The values C{rq sendmesg} passes on as text (C{--count 3.7}) are
    converted where every message is created, and refused there when out
    of range.
    """
    instance, spawner, clock = started
    instance.set_admin("pause", "test")
    full = result_of(instance.create_message({"dest": "test", "count": "3.7", "max_count": " 5 "}))
    msg = instance.queue("test").get(short(full))
    assert (msg["count"], msg["max_count"]) == (3, 5)
    full = result_of(instance.create_message({"dest": "test", "count": "1e3"}))
    assert instance.queue("test").get(short(full))["count"] == 1
    with pytest.raises(MessageError, match=r"invalid due field \(\)"):
        instance.create_message({"dest": "test", "due": ""})
    with pytest.raises(MessageError, match=r"^invalid max_count field \(-1\): it must be from 0 to 2147483647$"):
        instance.create_message({"dest": "test", "max_count": "-1"})
    with pytest.raises(MessageError, match=r"^invalid count field \(1{64}\.\.\.\): it must be"):
        instance.create_message({"dest": "test", "count": "1" * 300})


def test_get_read_form(started):
    instance, spawner, clock = started
    instance.set_admin("pause", "test")
    msg_id = short(send(instance, src="me", param2="two"))
    msg = instance.queue("test").get(msg_id)
    assert msg["state"] == "que" and msg["status"] == "que"
    assert msg["path"] == f"queue/test/que/{msg_id}"
    assert msg["src"] == "me" and msg["count"] == 0 and msg["max_count"] == 15
    assert "_attachments" not in msg
    assert json.dumps(msg)


def fail_queue(instance, name):
    """
    Make the running queue C{name} raise in a scheduling pass: it fails,
    and waits to be started again.
    """
    q = instance.queue(name)

    def boom():
        raise RuntimeError("boom")

    q.status = boom
    q.schedule()
    assert name not in instance.queues


def test_crash_restarts_queue_with_backoff(started):
    instance, spawner, clock = started
    fail_queue(instance, "test")
    clock.advance(1)
    assert "test" in instance.queues
    fail_queue(instance, "test")
    clock.advance(1)
    assert "test" not in instance.queues
    clock.advance(1)
    assert "test" in instance.queues


def test_create_queue_errors(started):
    instance, spawner, clock = started
    with pytest.raises(MessageError, match="already created"):
        instance.create_queue({"name": "test", "script": "x"})
    with pytest.raises(MessageError, match="queue name has invalid characters"):
        instance.create_queue({"name": "bad name", "script": "x"})


def test_relay_dest_needs_relay_ok(started):
    instance, spawner, clock = started
    with pytest.raises(MessageError, match="Cannot relay message"):
        instance.create_message({"dest": "http://other:3333/q/test"})
    instance.set_admin("pause", "relay")
    full = result_of(instance.create_message({"dest": "http://other:3333/q/test"}, relay_ok=True))
    assert "/q/relay/" in full


def test_single_que_does_not_relay(started):
    """
    C{single_que} has no relay handling: a URL dest is refused even with
    relay allowed, instead of answering with whatever message for whatever
    host waits in the relay queue.
    """
    instance, spawner, clock = started
    instance.set_admin("pause", "relay")
    waiting = result_of(instance.create_message({"dest": "http://a:3333/q/x"}, relay_ok=True))
    with pytest.raises(MessageError, match="Cannot relay message"):
        instance.create_message({"dest": "http://b:3333/q/y"}, "single_que", relay_ok=True)
    assert instance.queue("relay").messages("que") == [short(waiting)]


def test_delete_queue_renames_dir(started):
    instance, spawner, clock = started
    assert result_of(instance.delete_queue("test")) == "started deleting queue"
    assert "test" not in instance.queues
    names = os.listdir(instance.root.queue_dir)
    assert any(n.startswith("test.deleted.") for n in names)


class HeldRounds:
    """
    A L{Syncer} thread runner whose rounds wait until L{finish} runs them;
    records the paths of the rounds that ran.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []
        self.synced: set[str] = set()

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def finish(self) -> None:
        """
        Run the oldest waiting round.
        """
        f, args, d = self.calls.pop(0)
        [paths] = args
        self.synced.update(paths)
        d.callback(f(paths))

    def answer(self, d: Deferred[Any]) -> tuple[Any, set[str]]:
        """
        Run rounds until C{d} fires: its result, and the paths synced
        before it did.
        """
        out: list[Any] = []
        d.addBoth(out.append)
        assert out == [], "answered before any sync"
        while not out:
            self.finish()
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0], set(self.synced)


def held_syncer(instance: Any) -> HeldRounds:
    """
    Give C{instance} a syncer whose rounds run when the test says.
    """
    rounds = HeldRounds()
    instance.syncer = Syncer(rounds)
    return rounds


def test_create_queue_answers_once_the_queue_is_on_disk(started):
    """
    C{create_queue} answers after the new queue's directory and the
    directories that gained its state directories and its config are
    fsynced.
    """
    instance, spawner, clock = started
    rounds = held_syncer(instance)
    root = instance.root
    answer, synced = rounds.answer(instance.create_queue({"name": "fresh", "script": "./code/noop"}))
    assert answer == "queue created - awesome"
    assert {root.queue_dir, root.queue_path("fresh")} <= synced


def test_create_queue_runs_no_fsync_itself(started, monkeypatch):
    """
    C{create_queue} leaves every C{fsync} to the syncer's rounds (off the
    reactor thread): its C{config.json} is written to a temp file that a
    first round syncs; only then is it renamed into place and the queue
    started, and a second round syncs it there before the answer.
    """
    instance, spawner, clock = started
    rounds = held_syncer(instance)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    path = instance.root.queue_path("fresh")
    config = os.path.join(path, "config.json")
    d = instance.create_queue({"name": "fresh", "script": "./code/noop"})
    assert fsyncs == []
    assert not os.path.exists(config) and "fresh" not in instance.queues
    [(_, ([temp],), _)] = rounds.calls
    assert os.path.dirname(temp) == path and os.path.isfile(temp)
    rounds.finish()
    assert fsyncs != []
    assert os.path.isfile(config) and not os.path.exists(temp)
    assert instance.queue("fresh").config.script == "./code/noop"
    answer, synced = rounds.answer(d)
    assert answer == "queue created - awesome"
    assert {config, path, instance.root.queue_dir} <= synced


def test_create_queue_refuses_one_under_way(started):
    """
    A second creation of a queue whose first one waits for its config to
    be synced is refused, as for a queue that exists.
    """
    instance, spawner, clock = started
    rounds = held_syncer(instance)
    d = instance.create_queue({"name": "fresh", "script": "./code/noop"})
    with pytest.raises(MessageError, match="already created"):
        instance.create_queue({"name": "fresh", "script": "./code/other"})
    assert rounds.answer(d)[0] == "queue created - awesome"
    assert instance.queue("fresh").config.script == "./code/noop"


def test_create_queue_link_answers_once_the_queue_is_on_disk(started, tmp_path):
    """
    So does C{create_queue_link}.
    """
    instance, spawner, clock = started
    rounds = held_syncer(instance)
    config = tmp_path / "linked.json"
    config.write_text(json.dumps({"name": "linked", "script": "./code/noop", "num_workers": 1}))
    answer, synced = rounds.answer(instance.create_queue_link(str(config)))
    assert answer == "queue created - awesome"
    assert {instance.root.queue_dir, instance.root.queue_path("linked")} <= synced


@pytest.mark.parametrize("action", ["down", "up", "pause", "resume"])
def test_admin_markers_answer_once_on_disk(started, action):
    """
    C{up}, C{down}, C{pause} and C{resume} answer after C{config/}, where
    the markers are made and removed, is fsynced.
    """
    instance, spawner, clock = started
    if action in ("up", "resume"):
        result_of(instance.set_admin({"up": "down", "resume": "pause"}[action], "test"))
    rounds = held_syncer(instance)
    answer, synced = rounds.answer(instance.set_admin(action, "test"))
    assert answer == "test"
    assert instance.root.join("config") in synced


def test_delete_queue_answers_once_on_disk(started):
    """
    C{delete_queue} answers after C{queue/}, where the queue's directory
    was renamed, is fsynced.
    """
    instance, spawner, clock = started
    rounds = held_syncer(instance)
    answer, synced = rounds.answer(instance.delete_queue("test"))
    assert answer == "started deleting queue"
    assert instance.root.queue_dir in synced


def test_deleted_queue_leaves_no_markers(started):
    """
    C{delete_queue} removes the queue's down and pause markers, and
    answers after C{config/} is fsynced: the queue created again under
    that name is up and takes messages.
    """
    instance, spawner, clock = started
    root = instance.root
    result_of(instance.set_admin("down", "test"))
    result_of(instance.set_admin("pause", "test"))
    rounds = held_syncer(instance)
    answer, synced = rounds.answer(instance.delete_queue("test"))
    assert answer == "started deleting queue"
    assert root.join("config") in synced
    assert not os.path.exists(root.marker("test", "down"))
    assert not os.path.exists(root.marker("test", "pause"))
    instance.syncer = immediateSyncer()
    result_of(instance.create_queue({"name": "test", "script": "./code/noop"}))
    assert instance.queue("test").status() == "UP"
    assert result_of(instance.create_message({"dest": "test"})).startswith("http://")


def test_unbalanced_exec_prefix_is_a_scripterror(started):
    instance, spawner, clock = started
    instance.create_queue({"name": "bad", "script": "./code/noop", "exec_prefix": "sh '-c"})
    msg_id = short(send(instance, "bad"))
    q = instance.queue("bad")
    assert q.status() == "SCRIPTERROR"
    assert q.locate(msg_id) == "que"
    assert spawner.workers == []


# -- ready workers: the next due message's worker made ready ahead


def ready_queue(tmp_path, ready_workers=True, **config):
    """
    An instance (ready workers on by default) with the paused queue C{rw}
    (two workers) holding four due messages, due in the order they were
    sent; C{(instance, spawner, clock, queue, ids)}.
    """
    instance, spawner, clock = instance_for(str(tmp_path / "root"), ready_workers=ready_workers)
    data = {"name": "rw", "script": "./code/noop", "num_workers": 2, "exec_prefix": ""}
    data.update(config)
    instance.create_queue(data)
    instance.startService()
    instance.set_admin("pause", "rw")
    now = int(clock.seconds())
    ids = [short(send(instance, "rw", param1=str(k), due=now - 10 + k)) for k in range(4)]
    return instance, spawner, clock, instance.queue("rw"), ids


def finish(worker):
    worker.say("done")
    worker.exit(0)


def msg_ids(workers):
    return [w.env["RQ_MSG_ID"] for w in workers]


def test_ready_worker_made_when_every_slot_is_busy(tmp_path):
    """
    With every slot busy, the next due message gets a worker spawned held
    in its C{que/<id>/job} directory, to go from C{run/<id>/job}; the
    message stays in que, in memory and on disk.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    assert msg_ids(spawner.running) == ids[:2]
    assert len(spawner.workers) == 3
    ready = spawner.workers[2]
    assert ready.env["RQ_MSG_ID"] == ids[2]
    assert ready.waiting and not ready.went and not ready.cancelled
    assert ready.job_dir == q.store.job_path("que", ids[2])
    assert os.path.isdir(ready.job_dir)
    assert ready.go_dir == q.store.job_path("run", ids[2])
    assert ready.env["RQ_MSG_DIR"] == ready.go_dir
    assert q.locate(ids[2]) == "que"
    assert q.store.exists("que", ids[2])
    assert not os.path.exists(q.store.msg_dir("run", ids[2]))
    assert q.num_messages()["que"] == 2
    assert q.num_messages()["run"] == 2
    assert sorted(q.messages("que")) == sorted(ids[2:])
    # Later passes keep the one ready worker.
    clock.advance(READY_STALE / 2)
    q.schedule()
    assert len(spawner.workers) == 3 and ready.waiting


def test_stale_ready_worker_given_up_until_a_short_run(tmp_path):
    """
    A ready worker that waited longer than L{READY_STALE} is given up, and
    none is made again until a worker runs within L{READY_WITHIN}.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    clock.advance(READY_STALE + 0.1)
    q.schedule()
    assert ready.cancelled and q.locate(ids[2]) == "que"
    assert len(spawner.workers) == 3
    # The first worker ran long: its slot gets a fresh worker, none is held.
    finish(spawner.workers[0])
    assert msg_ids(spawner.running) == [ids[1], ids[2]]
    more = [short(send(instance, "rw", param1=f"more{k}")) for k in range(2)]
    assert len(spawner.workers) == 4 and not any(w.waiting for w in spawner.workers)
    # A short run makes them pay again.
    finish(spawner.workers[3])
    assert msg_ids(spawner.running) == [ids[1], ids[3]]
    assert spawner.workers[-1].waiting and msg_ids(spawner.workers[-1:]) == [more[0]]


def test_no_ready_worker_after_a_long_run(tmp_path):
    """
    A worker that ran longer than L{READY_WITHIN} stops ready workers from
    being made (the one already ready still goes); a short run brings
    them back.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    extra = short(send(instance, "rw", param1="extra"))
    clock.advance(READY_WITHIN + (READY_STALE - READY_WITHIN) / 2)
    finish(spawner.workers[0])
    assert spawner.workers[2].went
    assert msg_ids(spawner.running) == [ids[1], ids[2]]
    assert len(spawner.workers) == 3
    finish(spawner.workers[2])
    assert msg_ids(spawner.running) == [ids[1], ids[3]]
    assert spawner.workers[-1].waiting and msg_ids(spawner.workers[-1:]) == [extra]


def test_no_ready_worker_by_default(tmp_path):
    """
    Without C{ready_workers} (the default) only the free slots get workers.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path, ready_workers=False)
    instance.set_admin("resume", "rw")
    assert msg_ids(spawner.workers) == ids[:2]
    assert not any(w.waiting for w in spawner.workers)
    clock.advance(IDLE_PASS)
    assert len(spawner.workers) == 2
    finish(spawner.workers[0])
    assert msg_ids(spawner.workers) == ids[:3]
    assert spawner.workers[2].job_dir == q.store.job_path("run", ids[2])
    assert not spawner.workers[2].waiting


def test_ready_worker_goes_when_a_slot_frees(tmp_path):
    """
    When a running worker exits, the ready one goes: its message (and the
    job directory it waits in) moves to run, its pid is recorded, and a
    new worker is made ready for the next message. Messages run in due
    order, each once.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    with open(os.path.join(ready.job_dir, "marker"), "w") as f:
        f.write("cwd")
    finish(spawner.workers[0])
    assert ready.went and not ready.waiting and not ready.cancelled
    assert q.locate(ids[2]) == "run"
    assert ids[2] in q.run and ids[2] not in q.que
    assert not os.path.exists(q.store.msg_dir("que", ids[2]))
    run_job = q.store.job_path("run", ids[2])
    assert ready.go_dir == run_job
    with open(os.path.join(run_job, "marker")) as f:
        assert f.read() == "cwd"
    assert q.store.read_pid(ids[2]) == ready.pid
    assert q.num_messages() == {"prep": 0, "que": 1, "run": 2, "done": 1, "err": 0, "relayed": 0}
    assert msg_ids(spawner.running) == ids[1:3]
    nxt = spawner.workers[3]
    assert nxt.waiting and nxt.env["RQ_MSG_ID"] == ids[3]
    assert nxt.job_dir == q.store.job_path("que", ids[3])
    # Its reports and exit count once it went.
    ready.say("done ready")
    ready.exit(0)
    assert q.locate(ids[2]) == "done"
    assert q.get_status(ids[2])["status"] == "done - ready"
    assert nxt.went
    finish(spawner.workers[1])
    finish(nxt)
    assert len(spawner.workers) == 4
    assert msg_ids(spawner.workers) == ids
    assert all(q.locate(i) == "done" for i in ids)
    assert q.num_messages()["done"] == 4
    assert q._ready is None


@pytest.mark.parametrize("action, undo", [("pause", "resume"), ("down", "up")])
def test_pause_or_down_cancels_ready_worker(tmp_path, action, undo):
    """
    A paused or down queue gives up its ready worker; the message stays in
    que and runs after the queue is resumed.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    instance.set_admin(action, "rw")
    assert ready.cancelled and not ready.went
    assert q._ready is None
    assert q.locate(ids[2]) == "que" and q.store.exists("que", ids[2])
    finish(spawner.workers[0])
    finish(spawner.workers[1])
    assert len(spawner.workers) == 3
    assert q.num_messages()["que"] == 2
    instance.set_admin(undo, "rw")
    assert msg_ids(spawner.running) == ids[2:]
    assert not ready.went
    finish(spawner.workers[3])
    finish(spawner.workers[4])
    assert all(q.locate(i) == "done" for i in ids)
    assert len(spawner.workers) == 5


def test_deleted_ready_message_is_not_run(tmp_path):
    """
    The ready message deleted before a slot frees: its worker is given up
    and the next message runs instead; nothing lost or run twice.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    extra = short(send(instance, "rw", param1="4", due=int(clock.seconds())))
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    assert ready.env["RQ_MSG_ID"] == ids[2]
    assert result_of(q.delete(ids[2])) == "msg deleted"
    with pytest.raises(MessageError, match="msg not found"):
        q.locate(ids[2])
    finish(spawner.workers[0])
    assert ready.cancelled and not ready.went
    assert msg_ids(spawner.running) == [ids[1], ids[3]]
    assert spawner.workers[-1].waiting and spawner.workers[-1].env["RQ_MSG_ID"] == extra
    for w in list(spawner.running):
        finish(w)
    for w in list(spawner.running):
        finish(w)
    started = [w.env["RQ_MSG_ID"] for w in spawner.workers if not w.cancelled]
    assert started == [ids[0], ids[1], ids[3], extra]
    assert q.num_messages() == {"prep": 0, "que": 0, "run": 0, "done": 4, "err": 0, "relayed": 0}


def test_ready_message_no_longer_due_goes_back(tmp_path):
    """
    The ready message no longer due when a slot frees (its due moved
    later): its worker is given up, the next due one runs, and it runs
    when due.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    later = int(clock.seconds()) + 100
    q.que[ids[2]]["due"] = later
    finish(spawner.workers[0])
    assert ready.cancelled and not ready.went
    assert q.locate(ids[2]) == "que"
    assert msg_ids(spawner.running) == [ids[1], ids[3]]
    # Nothing else is due: no worker made ready for it yet.
    assert not spawner.workers[-1].waiting
    finish(spawner.workers[1])
    finish(spawner.workers[3])
    assert q.locate(ids[2]) == "que"
    clock.advance(later - clock.seconds() - 1)
    assert q.locate(ids[2]) == "que"
    clock.advance(1)
    assert q.locate(ids[2]) == "run"
    assert spawner.workers[-1].env["RQ_MSG_ID"] == ids[2] and not spawner.workers[-1].waiting
    finish(spawner.workers[-1])
    assert q.num_messages()["done"] == 4


def test_run_now_of_the_ready_message(tmp_path):
    """
    C{run_now} of the message already made ready keeps its worker: it goes
    when a slot frees, once.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    assert result_of(q.run_now(ids[2])) == "msg sent to front of run queue"
    assert ready.waiting and len(spawner.workers) == 3
    finish(spawner.workers[0])
    assert ready.went
    assert spawner.workers[3].env["RQ_MSG_ID"] == ids[3]
    for w in (spawner.workers[1], ready, spawner.workers[3]):
        finish(w)
    assert len(spawner.workers) == 4
    assert q.num_messages()["done"] == 4


def test_stop_cancels_ready_worker(tmp_path):
    """
    Stopping the queue gives up its ready worker; the message stays in que.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    d = q.stopService()
    fired = []
    d.addCallback(fired.append)
    assert ready.cancelled and not ready.went
    assert ready.signals == []
    assert q._ready is None
    assert q.store.exists("que", ids[2])
    assert fired == []
    for w in spawner.workers[:2]:
        w.exit(None, signal.SIGTERM)
    assert fired
    assert len(spawner.workers) == 3


def test_reconfigure_cancels_ready_worker(tmp_path):
    """
    A reconfigure gives up the ready worker (made with the old settings);
    the next pass makes a new one with the new ones.
    """
    from dataclasses import replace

    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    q.reconfigure(replace(q.config, env_vars={"EXTRA": "1"}))
    assert ready.cancelled
    fresh = spawner.workers[3]
    assert fresh.waiting and fresh.env["RQ_MSG_ID"] == ids[2] and fresh.env.get("EXTRA") == "1"
    # One more slot: the message starts at once, the next one is made ready.
    q.reconfigure(replace(q.config, num_workers=3))
    assert fresh.cancelled
    assert msg_ids(spawner.running) == ids[:3]
    assert spawner.workers[-1].waiting and spawner.workers[-1].env["RQ_MSG_ID"] == ids[3]
    for w in list(spawner.running):
        finish(w)
    finish(spawner.workers[-1])
    assert q.num_messages()["done"] == 4
    assert [w.env["RQ_MSG_ID"] for w in spawner.workers if w.went or not (w.cancelled or w.waiting)] == ids


@pytest.mark.parametrize("config", [{"blocking_params": [1]}, {"coalesce_params": [1]}])
def test_no_ready_worker_for_blocking_or_coalescing_queues(tmp_path, config):
    """
    Which message runs next on a queue that blocks or coalesces by params
    depends on the running ones: no worker is made ready ahead.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path, **config)
    instance.set_admin("resume", "rw")
    assert msg_ids(spawner.workers) == ids[:2]
    clock.advance(IDLE_PASS)
    assert len(spawner.workers) == 2
    finish(spawner.workers[0])
    assert msg_ids(spawner.workers) == ids[:3]
    assert not any(w.waiting for w in spawner.workers)


def test_ready_worker_not_let_go_after_script_broke(tmp_path):
    """
    The script made non-executable while a worker is ready: when a slot
    frees the queue goes SCRIPTERROR, the ready worker is given up and its
    message stays in que (as without a ready worker).
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    os.chmod(instance.root.join("code", "noop"), 0o644)
    finish(spawner.workers[0])
    assert q.status() == "SCRIPTERROR"
    assert q.locate(ids[2]) == "que"
    assert ready.cancelled and not ready.went


def test_ready_worker_that_died_waiting_does_not_strand_its_message(tmp_path):
    """
    A ready worker that ended before it was let go (its spawn failed after
    all, as L{rqtwisted.worker.spawn_worker} reports it: no longer waiting,
    an err report and an exit) does not take its message into run with no
    process: the message gets a new worker when a slot frees.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    ready.waiting = False
    ready.say("err could not start the queue script: gone")
    ready.exit(127)
    finish(spawner.workers[0])
    assert q.locate(ids[2]) == "run"
    job = q.run[ids[2]]
    assert job.worker is not ready
    assert not job.worker.exited


def test_run_now_of_another_message_runs_before_the_ready_one(tmp_path):
    """
    C{run_now} sends a message to the front of the run queue: it runs in
    the next free slot, before the message made ready earlier.
    """
    instance, spawner, clock, q, ids = ready_queue(tmp_path)
    instance.set_admin("resume", "rw")
    ready = spawner.workers[2]
    result_of(q.run_now(ids[3]))
    finish(spawner.workers[0])
    assert q.locate(ids[3]) == "run"
    assert q.locate(ids[2]) == "que"
    assert ready.cancelled


def test_builtin_in_process_queue_runs_each_message_once(tmp_path, handlers):
    """
    A built-in queue running in-process handlers, with ready workers on and
    its one slot busy: the next message's handler does not run before a
    slot frees, and every message is handled once.
    """
    from dataclasses import replace

    from twisted.internet.defer import Deferred

    from rqtwisted.builtin import register_handler

    calls = []
    pending = []

    async def handler(job):
        calls.append(job.msg_id)
        d = Deferred()
        pending.append(d)
        await d
        job.report("done handled")

    instance, spawner, clock = instance_for(str(tmp_path / "root"), ready_workers=True)
    register_handler("relay", lambda inst: handler)
    instance.startService()
    q = instance.queue("relay")
    q.reconfigure(replace(q.config, num_workers=1))
    instance.set_admin("pause", "relay")
    now = int(clock.seconds())
    ids = [short(result_of(q.create({"dest": "http://far:3333/q/x", "due": now - 5 + k}))) for k in range(2)]
    instance.set_admin("resume", "relay")
    clock.advance(0)
    assert calls == [ids[0]]
    assert q.locate(ids[1]) == "que"
    pending[0].callback(None)
    clock.advance(0)
    assert q.locate(ids[0]) == "done"
    clock.advance(0)
    assert calls == ids


# -- messages changed behind the queue's back, redeploys, chatty scripts


def test_running_message_removed_by_hand_is_forgotten(started):
    """
    A running message whose C{run/<id>} directory was removed by hand: its
    worker's reports and exit are taken without a crash, the message is
    forgotten, and the queue goes on with the next one.
    """
    instance, spawner, clock = started
    q = instance.queue("test")
    gone = short(send(instance))
    nxt = short(send(instance))
    import shutil

    shutil.rmtree(q.store.msg_dir("run", gone))
    spawner.workers[0].say("run still going")
    spawner.workers[0].exit(1)
    assert q.running
    assert gone not in q.run
    assert q.locate(nxt) == "run"
    finish(spawner.workers[1])
    assert q.locate(nxt) == "done"


def resend_with_counts(started, **counts):
    """
    Run a message whose stored counts were set to C{counts} (as by hand)
    to a C{resend 0}; its queue and id.
    """
    instance, spawner, clock = started
    q = instance.queue("test")
    msg_id = short(send(instance))
    q.run[msg_id].msg.update(counts)
    spawner.workers[0].say("resend 0")
    spawner.workers[0].exit(0)
    return q, msg_id


def test_unreadable_count_does_not_stop_the_queue(started):
    """
    A stored C{count} or C{max_count} that is not a number counts as
    absent (0): the message completes, the queue keeps running.
    """
    q, msg_id = resend_with_counts(started, count="x", max_count="y")
    assert q.running
    assert q.get_status(msg_id)["status"] == "err - HIT MAX RESEND COUNT - MOVING TO ERR"


def test_numeric_string_counts_are_read(started):
    q, msg_id = resend_with_counts(started, count="2.0", max_count="5")
    assert q.get(msg_id)["count"] == 3
    assert started[1].workers[1].env["RQ_COUNT"] == "3"


def test_stop_does_not_wait_for_a_worker_whose_exit_was_taken(started, monkeypatch):
    """
    If handling a worker's exit fails (the queue then crashes and stops),
    the stop does not wait for that worker again: it exited already.
    """
    instance, spawner, clock = started
    q = instance.queue("test")
    send(instance)
    worker = spawner.workers[0]

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(q, "_settle", broken)
    worker.exit(0)
    monkeypatch.undo()
    d = q.stopService()
    fired = []
    d.addCallback(fired.append)
    assert fired


def test_queued_message_removed_by_hand_is_skipped(started):
    """
    A queued message whose C{que/<id>} directory was removed by hand is
    forgotten when its turn comes; the queue starts the next one.
    """
    instance, spawner, clock = started
    q = instance.queue("test")
    instance.set_admin("pause", "test")
    gone = short(send(instance, param1="gone"))
    kept = short(send(instance, param1="kept"))
    import shutil

    shutil.rmtree(q.store.msg_dir("que", gone))
    instance.set_admin("resume", "test")
    assert q.running
    assert [w.env["RQ_PARAM1"] for w in spawner.workers] == ["kept"]
    assert q.locate(kept) == "run"
    assert gone not in q.que


def test_ready_worker_given_up_after_a_redeploy(tmp_path):
    """
    The script's symlink switched while a worker was ready: when a slot
    frees, the ready worker (started with the old script) is given up and
    the message runs the script the symlink now leads to.
    """
    instance, spawner, clock = instance_for(str(tmp_path / "root"), ready_workers=True)
    code = instance.root.join("code")
    for release in ("r1", "r2"):
        os.mkdir(os.path.join(code, release))
        path = os.path.join(code, release, "job.sh")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, 0o755)
    os.symlink("r1", os.path.join(code, "current"))
    instance.create_queue({"name": "rw", "script": "./code/current/job.sh", "num_workers": 1, "exec_prefix": ""})
    instance.startService()
    ids = [short(send(instance, "rw")) for _ in range(2)]
    q = instance.queue("rw")
    first, ready = spawner.workers
    assert ready.waiting and ready.argv[-1].endswith("/r1/job.sh")
    os.unlink(os.path.join(code, "current"))
    os.symlink("r2", os.path.join(code, "current"))
    finish(first)
    assert ready.cancelled and not ready.went
    assert q.locate(ids[1]) == "run"
    assert q.run[ids[1]].worker is not ready
    assert spawner.running[-1].argv[-1].endswith("/r2/job.sh")


def test_status_written_once_per_read(started, monkeypatch):
    """
    Lines read at once replace the status text in turn: the status file is
    written once, with the last one; every verb still counts.
    """
    instance, spawner, clock = started
    q = instance.queue("test")
    msg_id = short(send(instance))
    writes = []
    write_status = q.store.write_status
    monkeypatch.setattr(q.store, "write_status", lambda *a: (writes.append(a[2]), write_status(*a)))
    job = q.run[msg_id]
    from rqtwisted.protocol import Report

    q.reportsReceived(job, [Report("run", str(n)) for n in range(1000)] + [Report("done", "last")])
    assert writes == ["last"]
    assert job.completion == Report("done", "last")
    spawner.workers[0].exit(0)
    assert q.get_status(msg_id)["status"] == "done - last"


def test_a_queue_that_cannot_start_fails_alone(tmp_path, monkeypatch):
    """
    A queue whose directory cannot be recovered at start-up (an error the
    store does not expect) fails by itself: the daemon and the other
    queues start, and the supervisor restarts it with its back-off.
    """
    from rqtwisted.store import QueueStore

    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.create_queue({"name": "good", "script": "./code/noop", "exec_prefix": ""})
    instance.create_queue({"name": "bad", "script": "./code/noop", "exec_prefix": ""})
    real_open = QueueStore.open

    def open_or_fail(store):
        if store.path.rstrip("/").endswith("/bad"):
            raise PermissionError(13, "Permission denied", store.path)
        return real_open(store)

    monkeypatch.setattr(QueueStore, "open", open_or_fail)
    instance.startService()
    assert instance.running
    send(instance, "good")
    assert len(spawner.workers) == 1
    clock.advance(0)
    assert "bad" not in instance.queues
    monkeypatch.setattr(QueueStore, "open", real_open)
    clock.advance(1)
    assert instance.queue("bad").running


def test_server_restart_keeps_the_command_line_settings(started):
    """
    C{rq restart} reads C{config/config.json} again, but the settings given
    on the command line (and the port the web server listens on) still
    outrank it: full ids keep naming where the daemon is.
    """
    instance, spawner, clock = started
    instance.overrides.update(port=47123, host="cmdline")
    with open(instance.root.config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(port=3399, env="staging")
    with open(instance.root.config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    assert result_of(instance.restart()) == "restarted"
    assert instance.settings.port == 47123
    assert instance.settings.host == "cmdline"
    assert instance.settings.env == "staging"
    assert send(instance).startswith("http://cmdline:47123/q/test/")


def test_restart_queue_takes_messages_while_its_workers_end(started):
    """
    While a restarted queue waits for its workers to end, it still takes
    new messages (nobody is told C{Queue not found}); the new queue service
    runs them, with the interrupted one.
    """
    instance, spawner, clock = started
    first = short(send(instance))
    d = instance.restart_queue("test")
    assert spawner.workers[0].signals == [signal.SIGTERM]
    second = short(send(instance))
    assert len(spawner.workers) == 1
    spawner.workers[0].exit(None, signal.SIGTERM)
    assert result_of(d) == "test"
    q = instance.queue("test")
    assert q.running
    started_ids = [w.env["RQ_MSG_ID"] for w in spawner.workers[1:]]
    assert started_ids == [first]
    assert q.locate(second) == "que"
    finish(spawner.workers[1])
    assert spawner.workers[2].env["RQ_MSG_ID"] == second


def test_server_restart_stops_every_queue_at_once(started):
    """
    C{rq restart} signals every queue's workers at once: a queue waiting
    for a stubborn worker holds up no other.
    """
    instance, spawner, clock = started
    instance.create_queue({"name": "other", "script": "./code/noop", "exec_prefix": ""})
    send(instance)
    send(instance, "other")
    d = instance.restart()
    assert [w.signals for w in spawner.workers] == [[signal.SIGTERM], [signal.SIGTERM]]
    send(instance, "other")
    for w in list(spawner.workers):
        w.exit(None, signal.SIGTERM)
    assert result_of(d) == "restarted"
    assert instance.queue("test").running and instance.queue("other").running
    assert len(spawner.running) == 2
    assert instance.queue("other").num_messages()["que"] == 1


def attach_held(tmp_path):
    """
    A queue whose thread work waits for the test, and the attach of a
    3-byte file to a prepared message, under way:
    C{(threads, queue, msg_id, outcomes)}.
    """
    threads = HeldThreads()
    instance, spawner, clock = instance_for(str(tmp_path / "root"), run_in_thread=threads)
    instance.create_queue({"name": "test", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    q = instance.queue("test")
    msg_id = short(result_of(instance.create_message({"dest": "test"}, "prep")))
    f = tmp_path / "a.txt"
    f.write_text("abc")
    got = []
    q.attach(msg_id, str(f)).addBoth(got.append)
    return threads, q, msg_id, got


@pytest.mark.parametrize("change", ["commit", "delete", "stop"])
def test_attach_answers_after_its_thread_and_fails_if_the_message_left_prep(tmp_path, change):
    """
    An attach copies and hashes its file in a thread: meanwhile the queue
    goes on (a commit or a delete of the message is answered at once); a
    message no longer in prep then, or a stopped queue, fails the attach
    with C{cannot find message}, and the message gets no attachment.
    """
    threads, q, msg_id, got = attach_held(tmp_path)
    assert got == []
    if change == "commit":
        assert result_of(q.commit(msg_id)) == "msg commited"
    elif change == "delete":
        assert result_of(q.delete(msg_id)) == "msg deleted"
    else:
        result_of(q.stopService())
    threads.run()
    assert got[0].value.reason == "cannot find message"
    if change != "delete":
        assert "_attachments" not in q.get(msg_id)
    assert [n for n in os.listdir(q.store.state_dir("tmp")) if n.startswith(".")] == []


def test_attach_answers_once_its_thread_is_done(tmp_path):
    """
    Until the file is copied and hashed the attach is not answered; then
    it is, and the attachment is listed.
    """
    threads, q, msg_id, got = attach_held(tmp_path)
    assert got == [] and "_attachments" not in q.get(msg_id)
    threads.run()
    assert got == ["900150983cd24fb0d6963f7d28e17f72-Attached successfully"]
    assert q.get(msg_id)["_attachments"]["a.txt"]["size"] == 3


def test_server_restart_keeps_a_queue_whose_config_went_bad(started):
    """
    C{rq restart} leaves a queue whose config cannot be loaded running as
    it is (as C{restart_queue} does), and says so; it used to drop it.
    """
    instance, spawner, clock = started
    instance.create_queue({"name": "other", "script": "./code/noop", "exec_prefix": ""})
    with open(os.path.join(instance.root.queue_path("other"), "config.json"), "w") as f:
        f.write("{not json")
    assert result_of(instance.restart()) == "restarted; kept as they were (bad config): other"
    assert instance.queue("other").running
    send(instance, "other")
    assert len(spawner.running) == 1


def test_spawn_short_of_fds_is_retried_not_failed(started):
    """
    A spawn that fails for want of fds (or processes) leaves the message in
    que, to start once some are free, instead of ending it in err.
    """
    import errno

    instance, spawner, clock = started
    q = instance.queue("test")
    spawner.error = OSError(errno.EMFILE, "Too many open files")
    msg_id = short(send(instance))
    assert q.locate(msg_id) == "que"
    assert q.num_messages()["err"] == 0
    spawner.error = None
    clock.advance(IDLE_PASS)
    assert q.locate(msg_id) == "run"
    spawner.error = OSError(errno.ENOEXEC, "Exec format error")
    other = short(send(instance))
    finish(spawner.workers[0])
    assert q.get_status(other)["status"].startswith("err - could not start the queue script")


def test_read_form_hashes_unknown_attachments_off_the_reactor(tmp_path):
    """
    The md5 of an attachment this process has not hashed yet (after a
    restart) is read in a thread before the read form is given: a page or
    C{rq show} never reads a big attachment on the reactor.
    """
    from rqtwisted import store as store_module

    threads, q, msg_id, got = attach_held(tmp_path)
    threads.run()
    store_module._MD5_CACHE.clear()
    form = []
    q.read(msg_id).addCallback(form.append)
    assert form == [] and threads.calls
    threads.run()
    assert form[0]["_attachments"]["a.txt"]["md5"] == "900150983cd24fb0d6963f7d28e17f72"
    # Known now: no thread needed.
    q.read(msg_id).addCallback(form.append)
    assert len(form) == 2 and not threads.calls


def test_create_queue_link_to_a_fifo_is_refused_without_waiting(started, tmp_path, no_hang):
    """
    A config path that is a FIFO is refused as unreadable; the daemon does
    not wait for a writer.
    """
    instance, spawner, clock = started
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    with pytest.raises(MessageError, match=r"could not read queue config \["):
        instance.create_queue_link(str(fifo))
