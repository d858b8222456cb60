"""
Tests for L{rqtwisted.search}: the per-queue index, kept current by the
store, and L{rqtwisted.supervisor.Instance.search}; the C{rq search} verb.
"""

from __future__ import annotations

import json
import shutil

from twisted.internet.defer import Deferred

import pytest

from rqtwisted import cli
from rqtwisted.message import MessageError
from rqtwisted.search import QueueIndex, index_for
from rqtwisted.testing import instance_for, result_of



@pytest.fixture
def env(tmp_path):
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.create_queue({"name": "alpha", "script": "./code/noop", "exec_prefix": ""})
    instance.create_queue({"name": "beta", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    return instance, spawner, clock



def search(instance, *args, **kwargs):
    """
    L{Instance.search}'s result (its md5s are read in threads: here, at once).
    """
    return result_of(instance.search(*args, **kwargs))


def send(instance, dest, **fields):
    full = result_of(instance.create_message(dict(fields, dest=dest)))
    return full.rsplit("/", 1)[1]


def ids(found):
    return [m["msg_id"] for m in found]


def populate(instance, spawner):
    """
    alpha: one done, one err, one running, one queued; beta: one prep.
    """
    done = send(instance, "alpha", param1="apple pie", src="kitchen")
    spawner.workers[-1].say("done baked")
    spawner.workers[-1].exit(0)
    err = send(instance, "alpha", param1="apple", src="garden")
    spawner.workers[-1].say("err burnt")
    spawner.workers[-1].exit(0)
    running = send(instance, "alpha", param1="pear")
    queued = send(instance, "alpha", param1="plum", due=10**10)
    prep = result_of(instance.create_message({"dest": "beta", "param1": "apple"}, "prep")).rsplit("/", 1)[1]
    return done, err, running, queued, prep


def test_contains_and_exact_over_all_states(env):
    instance, spawner, clock = env
    done, err, running, queued, prep = populate(instance, spawner)
    found = search(instance, None, {"param1": "apple"}, False)
    assert sorted(ids(found)) == sorted([done, err, prep])
    # Queues in order (user queues by name), newest first in each.
    assert ids(search(instance, None, {"param1": "apple"}, True)) == [err, prep]
    assert ids(search(instance, "alpha", {"param1": "apple"}, True)) == [err]
    # Several pairs must all hold.
    assert ids(search(instance, "alpha", {"param1": "apple", "src": "kit"}, False)) == [done]


def test_results_are_full_read_forms(env):
    instance, spawner, clock = env
    done, *_ = populate(instance, spawner)
    [msg] = search(instance, "alpha", {"src": "kitchen"}, True)
    assert msg == instance.queue("alpha").get(done)
    assert msg["state"] == "done" and msg["status"] == "done - baked"
    assert msg["path"].startswith("queue/alpha/done/")


def test_state_and_status_fields(env):
    instance, spawner, clock = env
    done, err, running, queued, prep = populate(instance, spawner)
    assert ids(search(instance, "alpha", {"state": "run"}, True)) == [running]
    assert ids(search(instance, "alpha", {"status": "burnt"}, False)) == [err]
    assert ids(search(instance, "alpha", {"status": "que"}, True)) == [queued]


def test_non_text_fields_match_as_json(env):
    instance, spawner, clock = env
    a = send(instance, "alpha", max_count=7)
    found = search(instance, "alpha", {"max_count": "7"}, True)
    assert ids(found) == [a]
    assert search(instance, "alpha", {"nosuchfield": ""}, False) == []


def test_index_is_built_once_and_kept_current(env, monkeypatch):
    instance, spawner, clock = env
    done, err, running, queued, prep = populate(instance, spawner)
    queue = instance.queue("alpha")
    search(instance, "alpha", {}, False)
    builds = []
    monkeypatch.setattr(QueueIndex, "build", lambda self, q: builds.append(q))
    # Every change after the build reaches the index through the store.
    spawner.workers[-1].say("run halfway there")
    assert ids(search(instance, "alpha", {"status": "halfway"}, False)) == [running]
    spawner.workers[-1].say("done")
    spawner.workers[-1].exit(0)
    assert ids(search(instance, "alpha", {"param1": "pear"}, True)) == [running]
    assert search(instance, "alpha", {"param1": "pear"}, True)[0]["state"] == "done"
    new = send(instance, "alpha", param1="fig")
    assert ids(search(instance, "alpha", {"param1": "fig"}, True)) == [new]
    result_of(queue.delete(err))
    assert search(instance, "alpha", {"src": "garden"}, True) == []
    result_of(queue.run_now(queued))
    assert search(instance, "alpha", {"param1": "plum"}, True)[0]["due"] < 10**10
    assert builds == []
    assert len(index_for(queue).entries) == 4  # done, pear, plum, fig


def test_searching_reads_only_matches(env, monkeypatch):
    instance, spawner, clock = env
    for n in range(20):
        send(instance, "beta", param1=f"n{n}", due=10**10)
    search(instance, "beta", {}, False)
    store = instance.queue("beta").store
    reads = []
    original = store.read
    monkeypatch.setattr(store, "read", lambda state, msg_id: reads.append(msg_id) or original(state, msg_id))
    [found] = search(instance, "beta", {"param1": "n7"}, True)
    assert reads == [found["msg_id"]]


def test_message_removed_behind_the_store_is_dropped(env):
    instance, spawner, clock = env
    done, *_ = populate(instance, spawner)
    queue = instance.queue("alpha")
    search(instance, "alpha", {}, False)
    shutil.rmtree(queue.store.msg_dir("done", done))
    assert search(instance, "alpha", {"src": "kitchen"}, True) == []
    assert done not in index_for(queue).entries


def test_restarted_queue_builds_a_fresh_index(env):
    instance, spawner, clock = env
    a = send(instance, "beta", param1="x", due=10**10)
    search(instance, "beta", {}, False)
    result_of(instance.restart_queue("beta"))
    assert ids(search(instance, "beta", {"param1": "x"}, True)) == [a]


def test_limit_newest_first(env):
    instance, spawner, clock = env
    made = []
    for n in range(5):
        clock.advance(1)
        made.append(send(instance, "beta", param1="same", due=10**10))
    found = search(instance, None, {"param1": "same"}, True, limit=3)
    assert ids(found) == made[::-1][:3]


def test_bad_requests(env):
    instance, spawner, clock = env
    with pytest.raises(MessageError, match="Queue not found"):
        search(instance, "nosuch", {}, False)
    with pytest.raises(MessageError, match="must be text"):
        search(instance, None, {"param1": 5}, False)
    with pytest.raises(MessageError, match="object"):
        search(instance, None, ["param1"], False)


# -- rq search


class FakeClient:
    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def __call__(self, socket_path):
        return self

    def call(self, command, **args):
        self.calls.append((command, args))
        return self.reply


def test_repeated_option():
    args = ["--query", "param1=a", "--query=src=b", "--exact", "--query", "--name", "q"]
    assert cli.repeated_option(args, "query") == ["param1=a", "src=b", True]


def test_rq_search(tmp_path):
    client = FakeClient(("ok", json.dumps([{"msg_id": "1", "param1": "a b"}, {"msg_id": "2"}])))
    ok, out = cli.run(
        "search",
        ["--root", str(tmp_path), "--name", "q", "--query", "param1=a b", "--query", "src=x=y", "--exact"],
        client,
    )
    assert ok
    assert out.splitlines() == ["ok 2", '{"msg_id": "1", "param1": "a b"}', '{"msg_id": "2"}']
    [(command, args)] = client.calls
    assert command == "Search"
    assert json.loads(args.pop("query")) == {"param1": "a b", "src": "x=y"}
    assert args == {"name": "q", "exact": "1"}


def test_rq_search_refusals(tmp_path):
    client = FakeClient(("fail", "Queue not found"))
    assert cli.run("search", ["--root", str(tmp_path), "--name", "nosuch"], client) == (False, "fail Queue not found")
    assert cli.run("search", ["--root", str(tmp_path), "--query", "novalue"], client) == (
        False,
        "fail --query takes field=value",
    )
    assert len(client.calls) == 1


def test_forget_for_removals_without_the_store(env):
    from rqtwisted.search import forget_bucket, forget_ids

    instance, spawner, clock = env
    done, err, *_ = populate(instance, spawner)
    queue = instance.queue("alpha")
    assert forget_bucket(queue, "done", done[:8]) == 0  # no index yet: nothing to do
    search(instance, "alpha", {}, False)
    assert forget_bucket(queue, "done", "19990101") == 0
    assert forget_bucket(queue, "done", done[:8], done[9:11]) == 1
    assert done not in index_for(queue).entries and err in index_for(queue).entries
    forget_ids(queue, [err, "nosuch"])
    assert err not in index_for(queue).entries


def test_message_found_once_its_creation_is_durable(env):
    """
    A search made while a new message waits for its fsync round (on disk,
    not yet acknowledged, so not yet readable through the queue) leaves it
    out, and finds it once the creation is durable: the index does not take
    the message for one removed behind its back.
    """
    instance, spawner, clock = env
    send(instance, "alpha", param1="early")
    queue = instance.queue("alpha")
    syncer = queue.store._syncer
    rounds = []

    def held(f, *args):
        d = Deferred()
        rounds.append((d, f, args))
        return d

    syncer._runInThread = held
    pending = instance.create_message({"dest": "alpha", "param1": "late"})
    assert not pending.called
    assert ids(search(instance, "alpha", {"param1": "late"}, True)) == []
    while rounds:
        d, f, args = rounds.pop(0)
        d.callback(f(*args))
    late = result_of(pending).rsplit("/", 1)[1]
    assert ids(search(instance, "alpha", {"param1": "late"}, True)) == [late]
