"""
Tests for L{rqtwisted.cleaner}: which buckets expire, and the C{cleaner}
queue's in-process handler on synthetic done/relayed/err messages, driven by
a L{Clock} through the real queue service.
"""

from __future__ import annotations

import json
import os

import pytest

from rqtwisted import cleaner
from rqtwisted.builtin import register_handler
from rqtwisted.cleaner import Bucket, CleanerHandler, expired_buckets, id_time, parse_days, purge
from rqtwisted.message import hashed_subpath, make_msg_id
from rqtwisted.testing import instance_for, result_of, syncNow

DAY = 86400
HOUR = 3600



# -- pure parts ---------------------------------------------------------------------


@pytest.mark.parametrize("value, days", [(None, 2), ("", 2), ("3", 3), ("14", 14), (" 10 days", 10), ("x", 2),
                                         (5, 5), ("0", 0)])
def test_parse_days(value, days) -> None:
    assert parse_days(value) == days


def test_id_time() -> None:
    assert id_time(make_msg_id(1_300_000_123.456, 7)) == 1_300_000_123
    assert id_time("junk") is None


def test_expired_buckets() -> None:
    # now = 2011-03-13 07:06:40 UTC; keep 2 days -> cut-off 2011-03-11 07:06:40.
    now = 1_300_000_000
    days = ["20110309", "20110310", "20110311", "20110312", "20110313", "junk", "2011031"]
    asked = []

    def hours_of(day):
        asked.append(day)
        return ["00", "05", "06", "07", "23", "xx"]

    assert expired_buckets(days, hours_of, now, 2) == [
        Bucket("20110309"),
        Bucket("20110310"),
        Bucket("20110311", "00"),
        Bucket("20110311", "05"),
        Bucket("20110311", "06"),
    ]
    assert asked == ["20110311"]
    assert Bucket("20110311", "06").label == "20110311-06"


def test_purge_in_batches(tmp_path) -> None:
    for minute in ("00", "01"):
        for n in range(3):
            os.makedirs(tmp_path / "t" / "05" / minute / f"20110311.05{minute}.00.000.{n}" / "job")
    (tmp_path / "t" / "stray").write_text("x")
    assert purge(str(tmp_path / "t"), 4) == (4, False)
    assert purge(str(tmp_path / "t"), 4) == (2, True)
    assert not (tmp_path / "t").exists()
    assert purge(str(tmp_path / "t"), 4) == (0, True)


# -- the cleaner queue --------------------------------------------------------------


class Runner:
    """
    A thread runner that runs at once and records its calls.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, f, *args):
        self.calls.append(f.__name__)
        return syncNow(f, *args)


@pytest.fixture
def cleaning(tmp_path, handlers):
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    runner = Runner()
    register_handler("cleaner", lambda inst: CleanerHandler(inst, runner, batch=5))
    instance.create_queue({"name": "test", "script": "./code/noop", "exec_prefix": ""})
    instance.create_queue({"name": "other", "script": "./code/noop", "exec_prefix": ""})
    return instance, spawner, clock, runner


def synthesize(instance, queue: str, state: str, when: float, n: int = 1, start: int = 1) -> list[str]:
    """
    Write C{n} finished messages created at C{when} straight into the
    hashed layout (before the instance starts).
    """
    ids = []
    qdir = instance.root.queue_path(queue)
    for i in range(start, start + n):
        msg_id = make_msg_id(when, i)
        mdir = os.path.join(qdir, state, hashed_subpath(msg_id))
        os.makedirs(os.path.join(mdir, "job"))
        with open(os.path.join(mdir, "msg"), "w") as f:
            json.dump({"msg_id": msg_id, "dest": queue}, f)
        ids.append(msg_id)
    return ids


def clean(instance, clock, **params) -> dict:
    full = result_of(instance.queue("cleaner").create({"dest": "cleaner", **params}))
    clock.advance(0)
    return instance.queue("cleaner").get(full.rsplit("/", 1)[1])


def remaining(instance, queue: str, state: str) -> set[str]:
    return set(instance.queue(queue).messages(state))


def test_removes_old_done_and_relayed(cleaning) -> None:
    instance, spawner, clock, runner = cleaning
    now = clock.seconds()
    young = synthesize(instance, "test", "done", now - 1 * DAY, 3)
    edge = synthesize(instance, "test", "done", now - 2 * DAY + HOUR, 2, start=10)  # inside the kept window
    boundary = synthesize(instance, "test", "done", now - 2 * DAY - 2 * HOUR, 2, start=20)
    old = synthesize(instance, "test", "done", now - 3 * DAY, 4, start=30)
    ancient = synthesize(instance, "test", "relayed", now - 40 * DAY, 6)
    kept_relayed = synthesize(instance, "test", "relayed", now - HOUR, 1, start=50)
    instance.startService()
    q = instance.queue("test")
    assert q.num_messages()["done"] == 11 and q.num_messages()["relayed"] == 7
    msg = clean(instance, clock, param1="test", param2="2")
    assert (msg["state"], msg["status"]) == ("done", "done - successfully ran this script")
    assert remaining(instance, "test", "done") == set(young + edge)
    assert remaining(instance, "test", "relayed") == set(kept_relayed)
    assert q.num_messages()["done"] == 5 and q.num_messages()["relayed"] == 1
    assert not set(boundary + old) & remaining(instance, "test", "done")
    assert not set(ancient) & remaining(instance, "test", "relayed")
    assert all(not n.startswith(cleaner.TRASH_PREFIX) for n in os.listdir(os.path.join(q.store.path, "tmp")))
    # Deletions ran through the thread runner, 5 messages per call.
    assert runner.calls.count("purge") >= (6 + 6) // 5


def test_days_param_is_a_whole_number(cleaning) -> None:
    instance, spawner, clock, runner = cleaning
    now = clock.seconds()
    eleven = synthesize(instance, "test", "done", now - 11 * DAY, 2)
    nine = synthesize(instance, "test", "done", now - 9 * DAY, 2, start=5)
    instance.startService()
    clean(instance, clock, param1="test", param2="10")
    assert remaining(instance, "test", "done") == set(nine)
    assert eleven


def test_huge_days_param_keeps_everything(cleaning) -> None:
    """
    A C{param2} of more days than a clock can subtract (10**400) keeps
    everything and ends done; it used to end the cleaning in err with an
    OverflowError.
    """
    instance, spawner, clock, runner = cleaning
    now = clock.seconds()
    old = synthesize(instance, "test", "done", now - 400 * DAY, 2)
    instance.startService()
    msg = clean(instance, clock, param1="test", param2="1" + "0" * 400)
    assert (msg["state"], msg["status"]) == ("done", "done - successfully ran this script")
    assert remaining(instance, "test", "done") == set(old)
    assert parse_days(10**400) == parse_days("99999999") == cleaner.MAX_DAYS


def test_default_keeps_two_days(cleaning) -> None:
    instance, spawner, clock, runner = cleaning
    now = clock.seconds()
    synthesize(instance, "test", "done", now - 3 * DAY, 2)
    kept = synthesize(instance, "test", "done", now - 1 * DAY, 2, start=5)
    instance.startService()
    clean(instance, clock, param1="test")
    assert remaining(instance, "test", "done") == set(kept)


def test_allqueues(cleaning) -> None:
    instance, spawner, clock, runner = cleaning
    now = clock.seconds()
    synthesize(instance, "test", "done", now - 5 * DAY, 3)
    synthesize(instance, "other", "done", now - 5 * DAY, 3)
    keep = synthesize(instance, "other", "done", now, 1, start=9)
    instance.startService()
    msg = clean(instance, clock, param1="ALLQUEUES", param2="2")
    assert msg["status"] == "done - successfully ran this script"
    assert remaining(instance, "test", "done") == set()
    assert remaining(instance, "other", "done") == set(keep)
    assert instance.queue("other").num_messages()["done"] == 1
    log = open(os.path.join(instance.queue("cleaner").store.msg_dir("done", msg["msg_id"]), "job", "stdio.log")).read()
    assert "test: removed 3 messages" in log and "removed 6 messages" in log


def test_acknowledged_errors(cleaning) -> None:
    instance, spawner, clock, runner = cleaning
    now = clock.seconds()
    err_dir = os.path.join(instance.root.queue_path("test"), "err")
    old_ack = "." + make_msg_id(now - 5 * DAY, 1)
    new_ack = "." + make_msg_id(now - HOUR, 2)
    old_err = make_msg_id(now - 5 * DAY, 3)
    for name in (old_ack, new_ack, old_err):
        os.makedirs(os.path.join(err_dir, name))
        with open(os.path.join(err_dir, name, "msg"), "w") as f:
            f.write("{}")
    instance.startService()
    assert instance.queue("test").num_messages()["err"] == 1
    clean(instance, clock, param1="test", param2="2")
    assert sorted(os.listdir(err_dir)) == sorted([new_ack, old_err])
    assert instance.queue("test").num_messages()["err"] == 1


def test_relayed_trimmed_to_newest(cleaning, monkeypatch) -> None:
    instance, spawner, clock, runner = cleaning
    monkeypatch.setattr(cleaner, "RELAYED_KEEP", 4)
    now = clock.seconds()
    ids = synthesize(instance, "relay", "relayed", now - HOUR, 7) + synthesize(
        instance, "relay", "relayed", now - 2 * HOUR, 5, start=10)
    instance.startService()
    assert instance.queue("relay").num_messages()["relayed"] == 12
    msg = clean(instance, clock, param1="ALLQUEUES", param2="2")
    assert msg["state"] == "done"
    newest = sorted(ids, reverse=True)[:4]
    assert remaining(instance, "relay", "relayed") == set(newest)
    assert instance.queue("relay").num_messages()["relayed"] == 4


@pytest.mark.parametrize(
    "params, status",
    [({}, "err - need to specify a PARAM1"),
     ({"param1": "nosuch"}, "err - the specified queue nosuch does not exist"),
     ({"param1": "../config"}, "err - the specified queue ../config does not exist")],
)
def test_refusals(cleaning, params, status) -> None:
    instance, spawner, clock, runner = cleaning
    instance.startService()
    msg = clean(instance, clock, **params)
    assert (msg["state"], msg["status"]) == ("err", status)


def test_old_id_finishing_after_its_bucket_was_cleaned(cleaning) -> None:
    """
    A message created days ago finishing now goes into a hashed directory
    the cleaner removed: the store creates it again.
    """
    instance, spawner, clock, runner = cleaning
    instance.startService()
    instance.set_admin("pause", "test")
    q = instance.queue("test")
    first = result_of(instance.create_message({"dest": "test"})).rsplit("/", 1)[1]
    late = result_of(instance.create_message({"dest": "test", "due": int(clock.seconds()) + 5 * DAY})).rsplit("/", 1)[1]
    result_of(q.run_now(first))
    instance.set_admin("resume", "test")
    spawner.workers[-1].say("done")
    spawner.workers[-1].exit(0)
    assert q.locate(first) == "done"
    clock.advance(5 * DAY - 60)
    instance.set_admin("pause", "test")
    clean(instance, clock, param1="test", param2="2")
    assert q.messages("done") == [] and q.num_messages()["done"] == 0
    instance.set_admin("resume", "test")
    clock.advance(120)
    spawner.workers[-1].say("done")
    spawner.workers[-1].exit(0)
    assert q.locate(late) == "done"
    assert q.num_messages()["done"] == 1


def test_default_root_schedules_the_cleaner(tmp_path) -> None:
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    config = instance.root.load_queue_config("cleaner")
    assert [dict(s) for s in config.schedule] == [{"cron": "@daily", "params": {"param1": "ALLQUEUES", "param2": "2"}}]


def test_search_index_forgets_removed_messages(cleaning, monkeypatch) -> None:
    from rqtwisted.search import index_for

    instance, spawner, clock, runner = cleaning
    monkeypatch.setattr(cleaner, "RELAYED_KEEP", 1)
    now = clock.seconds()
    old = synthesize(instance, "test", "done", now - 5 * DAY, 3)
    young = synthesize(instance, "test", "done", now - HOUR, 2, start=10)
    relayed = synthesize(instance, "relay", "relayed", now - HOUR, 3)
    instance.startService()
    test_index = index_for(instance.queue("test"))
    relay_index = index_for(instance.queue("relay"))
    assert set(old + young) <= set(test_index.entries)
    clean(instance, clock, param1="ALLQUEUES", param2="2")
    assert not set(old) & set(test_index.entries)
    assert set(young) <= set(test_index.entries)
    assert set(relayed) & set(relay_index.entries) == {max(relayed)}


def test_registered_factory_runs_in_the_reactor_pool(tmp_path, monkeypatch) -> None:
    from rqtwisted import threads
    from rqtwisted.builtin import handler_factory

    calls = []
    monkeypatch.setattr(threads, "deferToThreadPool", lambda *args: calls.append(args))

    class Reactor:
        pool = object()

        def getThreadPool(self):
            return self.pool

    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.clock = Reactor()
    handler = handler_factory("cleaner")(instance)
    assert isinstance(handler, CleanerHandler)
    handler.run_in_thread(len, "abc")
    assert calls == [(instance.clock, Reactor.pool, len, "abc")]
