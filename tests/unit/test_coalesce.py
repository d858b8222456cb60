"""
Coalescing (C{coalesce_params} and the legacy flags) and blocking
(C{blocking_params}) of L{rqtwisted.queue}, rule by rule as message.md
states them, with a L{Clock} and fake workers.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from rqtwisted.message import make_msg_id
from rqtwisted.root import QueueConfig, Root
from rqtwisted.testing import instance_for, result_of



@pytest.fixture
def make(tmp_path):
    """
    Build a started instance with one paused queue C{q} of the given
    config; returns C{(instance, spawner, clock, queue)}.
    """

    def build(**config):
        instance, spawner, clock = instance_for(str(tmp_path / "root"))
        instance.create_queue({"name": "q", "script": "./code/noop", "exec_prefix": "", **config})
        instance.startService()
        instance.set_admin("pause", "q")
        return instance, spawner, clock, instance.queue("q")

    return build


def send(instance, clock, due_in=0, **fields):
    fields.setdefault("dest", "q")
    fields["due"] = int(clock.seconds()) + due_in
    return result_of(instance.create_message(fields)).rsplit("/", 1)[1]


def running(spawner):
    return [w.env["RQ_MSG_ID"] for w in spawner.running]


# -- legacy flags --------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, params",
    [
        ({"coalesce_params": [1, "3"]}, (1, 3)),
        ({"coalesce_params": [0, 5, "x", 2, 2]}, (2,)),
        ({"coalesce": True, "coalesce_param1": True, "coalesce_param2": "no", "coalesce_param4": "yes"}, (1, 4)),
        ({"coalesce": "true", "coalesce_param2": "1", "coalesce_param3": 1}, (2, 3)),
        ({"coalesce": "1", "coalesce_param1": "true"}, (1,)),
        ({"coalesce": "yes", "coalesce_param1": False, "coalesce_param2": "false"}, ()),
        ({"coalesce": False, "coalesce_param1": True}, ()),
        ({"coalesce": "no", "coalesce_param1": True}, ()),
        ({"coalesce": True, "coalesce_param1": True, "coalesce_params": [3]}, (3,)),
        # JSON reads 1e999 as an infinity, which is no param number.
        ({"coalesce_params": [float("inf"), 1, float("-inf"), float("nan")]}, (1,)),
    ],
)
def test_coalesce_config(config, params) -> None:
    assert QueueConfig.fromDict({"name": "q", "script": "s", **config}).coalesce_params == params


@pytest.mark.parametrize("key", ["coalesce_params", "blocking_params"])
def test_param_list_with_an_infinity_is_a_valid_config(tmp_path, key: str) -> None:
    """
    A C{config.json} whose param list holds C{1e999} (an infinity once
    parsed) loads, without the infinity, instead of raising: one queue's
    config must not keep the daemon from starting or abort a reload.
    """
    root = Root(str(tmp_path))
    os.makedirs(root.queue_path("q"))
    with open(os.path.join(root.queue_path("q"), "config.json"), "w") as f:
        f.write('{"name": "q", "script": "s", "%s": [1e999, 2]}' % key)
    assert getattr(root.load_queue_config("q"), key) == (2,)


def test_legacy_flags_coalesce(make) -> None:
    instance, spawner, clock, q = make(coalesce=True, coalesce_param2="yes")
    first = send(instance, clock, param1="a", param2="same")
    dup = send(instance, clock, param1="b", param2="same")
    instance.set_admin("resume", "q")
    assert running(spawner) == [first]
    assert q.held == {dup: first}


# -- coalescing ----------------------------------------------------------------------


def test_done_settles_every_dup_whatever_its_due(make) -> None:
    instance, spawner, clock, q = make(coalesce_params=[1, 2])
    m = send(instance, clock, -5, param1="a", param2="b", param3="x")
    d1 = send(instance, clock, 0, param1="a", param2="b", param3="y")
    d2 = send(instance, clock, 86400, param1="a", param2="b")
    other = send(instance, clock, -1, param1="a", param2="c")
    instance.set_admin("resume", "q")
    assert running(spawner) == [m]
    # Held messages stay in que/ on disk and count as queued.
    assert q.locate(d1) == "que" and q.store.exists("que", d1)
    assert q.num_messages()["que"] == 3
    assert sorted(q.messages("que")) == sorted([d1, d2, other])
    spawner.workers[0].say("done finished")
    spawner.workers[0].exit(0)
    for dup in (d1, d2):
        assert q.get_status(dup) == {
            "state": "done",
            "status": f"done - duplicate {q.full_id(m)}",
            "path": q.get_status(dup)["path"],
        }
        assert q.get_status(dup)["path"].startswith("queue/q/done/")
    assert q.get(m)["dups"] == [q.full_id(d1), q.full_id(d2)]
    assert q.get(m)["status"] == "done - finished"
    assert q.num_messages() == {"prep": 0, "que": 0, "run": 1, "done": 3, "err": 0, "relayed": 0}
    assert running(spawner) == [other]


def test_relayed_moves_dups_to_relayed(make) -> None:
    instance, spawner, clock, q = make(coalesce_params=[1])
    m = send(instance, clock, -1, param1="a")
    dup = send(instance, clock, 0, param1="a")
    instance.set_admin("resume", "q")
    spawner.workers[0].say("relayed http://far:3333/q/q/20110101.0000.00.000.1")
    spawner.workers[0].exit(0)
    assert q.get_status(dup)["status"] == f"relayed - duplicate {q.full_id(m)}"
    assert q.get(m)["dups"] == [q.full_id(dup)]
    assert q.num_messages()["relayed"] == 2


_ENDINGS = [
    lambda w: (w.say("err broken"), w.exit(0)),
    lambda w: w.exit(2),
    lambda w: w.exit(None, signal.SIGTERM),
    lambda w: (w.say("resend 600-later"), w.exit(0)),
]


@pytest.mark.parametrize("ending", _ENDINGS, ids=["err", "exit 2", "killed", "resend"])
def test_err_or_resend_returns_dups_unchanged(make, ending) -> None:
    instance, spawner, clock, q = make(coalesce_params=[1])
    m = send(instance, clock, -1, param1="a")
    dup = send(instance, clock, 0, param1="a", param2="mine")
    before = q.store.read("que", dup)
    instance.set_admin("resume", "q")
    resent = ending is _ENDINGS[-1]
    ending(spawner.workers[0])
    # A resent message is queued again with a later due: now the dup runs
    # and coalesces it in turn.
    assert q.held == ({m: dup} if resent else {})
    assert "dups" not in q.get(m)
    # The dup is a queued message again (unchanged) and runs next.
    assert running(spawner) == [dup]
    assert q.get(dup)["param2"] == "mine" and q.store.read("run", dup) == before
    assert q.get_status(dup)["status"] == "run"


def test_message_committed_while_running_is_not_coalesced(make) -> None:
    instance, spawner, clock, q = make(coalesce_params=[1])
    m = send(instance, clock, -1, param1="a")
    instance.set_admin("resume", "q")
    late = send(instance, clock, 0, param1="a")
    assert q.held == {}
    spawner.workers[0].say("done")
    spawner.workers[0].exit(0)
    assert running(spawner) == [late]
    assert "dups" not in q.get(m)


def test_missing_params_are_equal_empty_is_not(make) -> None:
    instance, spawner, clock, q = make(coalesce_params=[2])
    m = send(instance, clock, -1, param1="x")
    dup = send(instance, clock, 0, param1="y")
    empty = send(instance, clock, 0, param2="")
    instance.set_admin("resume", "q")
    assert q.held == {dup: m}
    assert empty not in q.held


def test_deleting_a_held_dup(make) -> None:
    instance, spawner, clock, q = make(coalesce_params=[1])
    m = send(instance, clock, -1, param1="a")
    dup = send(instance, clock, 0, param1="a")
    instance.set_admin("resume", "q")
    assert result_of(q.delete(dup)) == "msg deleted"
    spawner.workers[0].say("done")
    spawner.workers[0].exit(0)
    assert "dups" not in q.get(m)
    assert q.num_messages()["done"] == 1


def test_dups_survive_a_restart(make) -> None:
    instance, spawner, clock, q = make(coalesce_params=[1])
    send(instance, clock, -1, param1="a")
    dup = send(instance, clock, 0, param1="a")
    instance.set_admin("resume", "q")
    d = instance.restart_queue("q")
    spawner.workers[0].exit(None, signal.SIGTERM)
    assert result_of(d) == "q"
    q2 = instance.queue("q")
    # The interrupted message runs again and coalesces the dup again.
    assert q2.held == {dup: spawner.running[0].env["RQ_MSG_ID"]}


# -- blocking ------------------------------------------------------------------------


def test_blocked_candidates_are_skipped_not_waited_for(make) -> None:
    instance, spawner, clock, q = make(blocking_params=[1, 2], num_workers=4)
    a1 = send(instance, clock, -9, param1="a", param2="1")
    a1bis = send(instance, clock, -8, param1="a", param2="1")
    a2 = send(instance, clock, -7, param1="a", param2="2")
    b1 = send(instance, clock, -6, param1="b", param2="1")
    a1ter = send(instance, clock, -5, param1="a", param2="1")
    instance.set_admin("resume", "q")
    # Different tuples run in parallel; equal ones wait.
    assert running(spawner) == [a1, a2, b1]
    assert q.locate(a1bis) == "que" and q.locate(a1ter) == "que"
    spawner.workers[1].say("done")
    spawner.workers[1].exit(0)
    assert running(spawner) == [a1, b1]
    spawner.workers[0].say("done")
    spawner.workers[0].exit(0)
    # Earliest due first among the unblocked ones.
    assert running(spawner) == [b1, a1bis]


def test_params_that_are_not_text_block_and_coalesce(make) -> None:
    """
    Messages written by the original RQ may hold an array or an object as a
    param: they block and coalesce by equal values like any other, instead
    of failing every scheduling pass (unhashable), which took the queue
    down for good.
    """
    instance, spawner, clock, q = make(blocking_params=[1], coalesce_params=[2], num_workers=3)
    qdir = q.store.path
    ids = []
    for i, (p1, p2) in enumerate([(["a"], "x"), (["a"], "y"), ({"b": 1}, {"k": [1]}), ("c", {"k": [1]})]):
        msg_id = make_msg_id(clock.seconds() - 10 + i, i + 1)
        os.makedirs(os.path.join(qdir, "que", msg_id, "job"))
        with open(os.path.join(qdir, "que", msg_id, "msg"), "w") as f:
            due = int(clock.seconds()) - 10 + i
            json.dump({"msg_id": msg_id, "dest": "q", "param1": p1, "param2": p2, "due": due}, f)
        ids.append(msg_id)
    assert result_of(instance.restart_queue("q")) == "q"
    q = instance.queue("q")
    instance.set_admin("resume", "q")
    assert q.running
    # The second waits for the first (equal param1); the third runs and
    # holds the fourth (equal param2).
    assert running(spawner) == [ids[0], ids[2]]
    assert q.locate(ids[1]) == "que"
    assert q.held == {ids[3]: ids[2]}


def test_blocking_respects_num_workers(make) -> None:
    instance, spawner, clock, q = make(blocking_params=[1], num_workers=2)
    ids = [send(instance, clock, -10 + i, param1=str(i)) for i in range(4)]
    instance.set_admin("resume", "q")
    assert running(spawner) == ids[:2]


def test_blocking_and_coalescing_together(make) -> None:
    instance, spawner, clock, q = make(blocking_params=[1], coalesce_params=[2], num_workers=3)
    a = send(instance, clock, -3, param1="h", param2="x")
    coalesced = send(instance, clock, -2, param1="h", param2="x")
    blocked = send(instance, clock, -1, param1="h", param2="z")
    free = send(instance, clock, 0, param1="k", param2="y")
    instance.set_admin("resume", "q")
    assert running(spawner) == [a, free]
    assert q.held == {coalesced: a}
    spawner.workers[0].say("done")
    spawner.workers[0].exit(0)
    assert q.get_status(coalesced)["status"] == f"done - duplicate {q.full_id(a)}"
    assert running(spawner) == [free, blocked]


def test_dup_removed_behind_our_back(make) -> None:
    """
    A held dup whose directory vanished does not stop the others settling.
    """
    import shutil

    instance, spawner, clock, q = make(coalesce_params=[1])
    m = send(instance, clock, -1, param1="a")
    gone = send(instance, clock, 0, param1="a")
    kept = send(instance, clock, 1, param1="a")
    instance.set_admin("resume", "q")
    shutil.rmtree(q.store.msg_dir("que", gone))
    spawner.workers[0].say("done")
    spawner.workers[0].exit(0)
    assert q.running and "q" in instance.queues
    assert q.get_status(kept)["status"] == f"done - duplicate {q.full_id(m)}"
    assert q.num_messages()["done"] == 2
