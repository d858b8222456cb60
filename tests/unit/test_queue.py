"""
Tests for L{rqtwisted.queue}: the scheduler, worker reports and exits, and
message operations, with a L{Clock} and fake workers.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from rqtwisted.message import MessageError
from rqtwisted.queue import IDLE_PASS, STOP_GRACE
from rqtwisted.testing import result_of


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


def test_crash_restarts_queue_with_backoff(started):
    instance, spawner, clock = started
    q = instance.queue("test")

    def boom():
        raise RuntimeError("boom")

    q.status = boom
    q.schedule()
    assert "test" not in instance.queues
    clock.advance(1)
    assert "test" in instance.queues
    q2 = instance.queue("test")
    q2.status = boom
    q2.schedule()
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


def test_delete_queue_renames_dir(started):
    instance, spawner, clock = started
    assert result_of(instance.delete_queue("test")) == "started deleting queue"
    assert "test" not in instance.queues
    names = os.listdir(instance.root.queue_dir)
    assert any(n.startswith("test.deleted.") for n in names)


def test_unbalanced_exec_prefix_is_a_scripterror(started):
    instance, spawner, clock = started
    instance.create_queue({"name": "bad", "script": "./code/noop", "exec_prefix": "sh '-c"})
    msg_id = short(send(instance, "bad"))
    q = instance.queue("bad")
    assert q.status() == "SCRIPTERROR"
    assert q.locate(msg_id) == "que"
    assert spawner.workers == []
