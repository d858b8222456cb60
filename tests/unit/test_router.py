"""
Tests for L{rqtwisted.router}: destinations, router mode, and the
C{rq_router} queue's in-process handler (driven by a L{Clock} through the
real queue service). The rules file itself: C{test_rules.py}.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import pytest
from twisted.internet.defer import Deferred, succeed

from rqtwisted import router
from rqtwisted.builtin import register_handler
from rqtwisted.durable import Syncer
from rqtwisted.router import RouterHandler, down_marker, new_dest, routed_queue, router_mode, select_hosts
from rqtwisted.rules import Rule, RuleSet, parse_rules
from rqtwisted.testing import HeldThreads, instance_for, result_of
from tests.unit.test_rules import SAMPLE



# -- destinations -------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, dest, expected",
    [
        ("h", "test", "http://h:3333/q/test"),
        ("h:4000", "test", "http://h:4000/q/test"),
        ("h", "http://src:3333/q/test", "http://h:3333/q/test"),
        ("h", "http://src:3333/q/a/q/b", "http://h:3333/q/a/q/b"),
        ("h", "/q/test", "http://h:3333/q/test"),
        ("http://x:1/q/other", "test", "http://x:1/q/other"),
    ],
)
def test_new_dest(host: str, dest: str, expected: str) -> None:
    assert new_dest(host, dest) == expected


def test_select_hosts() -> None:
    rules = parse_rules(SAMPLE)
    photos, thumbs, _ = rules.rules
    assert select_hosts(photos, lambda seq: seq[-1]) == ["store1", "store2:4000", "http://archive:80/q/photos"]
    assert select_hosts(thumbs, lambda seq: seq[0]) == ["a1"]
    assert select_hosts(thumbs, lambda seq: seq[-1]) == ["b1"]
    group = parse_rules('rule "g"\n action :relay\n src /x/\n route ["a","b"], ["c","d"]\n').rules[0]
    assert select_hosts(group, lambda seq: seq[1]) == ["b", "d"]
    assert select_hosts(rules.default) == []


def test_router_mode(tmp_path) -> None:
    root = str(tmp_path)
    os.makedirs(tmp_path / "config")
    assert not router_mode(root)
    assert routed_queue(root, "test") == "test"
    (tmp_path / "config" / "rq_router_rules.rb").write_text("")
    assert router_mode(root)
    assert routed_queue(root, "test") == "rq_router"
    assert routed_queue(root, "relay") == "relay"
    assert routed_queue(root, "cleaner") == "cleaner"


# -- the rq_router queue --------------------------------------------------------------


def match_here(rules: RuleSet, msg: Mapping[str, Any]) -> Deferred[Rule]:
    """
    Match in this process: the routing steps under test, not the matcher.
    """
    return succeed(rules.match(msg))


@pytest.fixture
def routed(tmp_path, handlers):
    """
    An instance whose C{rq_router} runs L{RouterHandler} in-process with a
    deterministic choice; C{relay} and C{local} are paused so copies stay
    queued.
    """
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    handler = RouterHandler(
        instance.root.path,
        clock,
        choice=lambda seq: seq[0],
        pid=lambda: 4242,
        set_down=lambda: instance.set_admin("down", "rq_router"),
        match=match_here,
    )
    register_handler("rq_router", lambda inst: handler)
    instance.create_queue({"name": "local", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    instance.set_admin("pause", "relay")
    instance.set_admin("pause", "local")
    return instance, clock


def write_rules(instance, text: str) -> str:
    path = router.rules_path(instance.root.path)
    with open(path, "w") as f:
        f.write(text)
    return path


def route_one(instance, clock, **fields) -> tuple[str, dict]:
    fields.setdefault("dest", "local")
    full = result_of(instance.queue("rq_router").create(fields))
    clock.advance(0)
    msg_id = full.rsplit("/", 1)[1]
    return msg_id, instance.queue("rq_router").get(msg_id)


def queued(instance, name: str) -> list[dict]:
    q = instance.queue(name)
    return [q.get(m) for m in sorted(q.messages("que"))]


def job_log(instance, msg_id: str) -> list[str]:
    """
    What the handler wrote to the message's C{stdio.log}, without the
    C{<pid> - <time> - } prefixes.
    """
    queue = instance.queue("rq_router")
    state = queue.locate(msg_id)
    path = os.path.join(instance.root.path, queue.get(msg_id)["path"], "job", "stdio.log")
    assert state in ("run", "done", "err")
    with open(path) as f:
        return [line.split(" - ", 2)[2] for line in f.read().splitlines() if line]


def read_log(instance) -> list[str]:
    path = os.path.join(instance.root.path, router.LOG_PATH)
    with open(path) as f:
        return f.read().splitlines()


def test_route_done_and_err(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "quiet"\n action :done\n src /^ok/\n')
    msg_id, msg = route_one(instance, clock, src="ok-1")
    assert (msg["state"], msg["status"]) == ("done", "done - router processed a done")
    assert not os.path.exists(os.path.join(instance.root.path, router.LOG_PATH))
    msg_id, msg = route_one(instance, clock, src="other")
    assert (msg["state"], msg["status"]) == ("err", "err - router processed an err")
    [line] = read_log(instance)
    pid, stamp, desc, action, logged_id, src = line.split(" - ")
    assert (pid, desc, action, logged_id, src) == ("4242", "default", "err", msg_id, "other")


def test_route_relay_to_every_host(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "fan"\n action :relay\n dest /local/\n route "h1", "h2:99", ["g1", "g2"]\n')
    msg_id, msg = route_one(instance, clock, src="me", param1="p", dest="http://origin:3333/q/local")
    assert (msg["state"], msg["status"]) == ("done", "done - done relay of 3 messages")
    copies = queued(instance, "relay")
    assert [c["dest"] for c in copies] == [
        "http://h1:3333/q/local",
        "http://h2:99/q/local",
        "http://g1:3333/q/local",
    ]
    assert all(c["param1"] == "p" and c["src"] == "me" for c in copies)
    assert all(c["orig_msg_id"] == instance.queue("rq_router").full_id(msg_id) for c in copies)
    log = job_log(instance, msg_id)
    assert log[1] == "rule 'fan' (line 1): action relay"
    assert [line.split(": ok ")[0] for line in log[2:]] == [f"copy to {c['dest']}" for c in copies]


def test_route_balance(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "lb"\n action :balance\n src /./\n route "http://localhost:3333/q/local", "b"\n')
    msg_id, msg = route_one(instance, clock, src="x")
    [copy] = queued(instance, "relay")
    assert copy["dest"] == "http://localhost:3333/q/local"
    assert msg["status"] == f"done - DUP to {instance.queue('relay').full_id(copy['msg_id'])}"


def test_route_dup_failure(routed) -> None:
    instance, clock = routed
    instance.set_admin("down", "relay")
    write_rules(instance, 'rule "lb"\n action :balance\n src /./\n route "b"\n\nrule "r"\n action :relay\n dest /z/\n route "c"\n')
    _, msg = route_one(instance, clock, src="x")
    assert (msg["state"], msg["status"]) == ("err", "err - DUP failed - dup failed - status: DOWN")
    _, msg = route_one(instance, clock, dest="z")
    assert (msg["state"], msg["status"]) == ("err", "err - DUP relay failed - dup failed - status: DOWN")


def test_route_delay(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "slow"\n action :done\n src /s/\n delay 30\n log true\n')
    msg_id, msg = route_one(instance, clock, src="s")
    assert (msg["state"], msg["status"]) == ("run", "run - router delay 30 seconds")
    clock.advance(29)
    assert instance.queue("rq_router").locate(msg_id) == "run"
    assert job_log(instance, msg_id)[1:] == ["rule 'slow' (line 1): action done", "delay 30 seconds"]
    clock.advance(1)
    assert instance.queue("rq_router").get(msg_id)["status"] == "done - router processed a done"
    assert read_log(instance)[0].split(" - ")[2:4] == ["slow", "done"]


def test_bad_rules_down_the_router(routed) -> None:
    instance, clock = routed
    path = write_rules(instance, 'rule "x"\n action :nope\n src /a/\n')
    msg_id, msg = route_one(instance, clock, src="a")
    assert (msg["state"], msg["status"]) == ("err", f"err - Bad rule file at: {path}")
    assert os.path.exists(os.path.join(instance.root.path, "config", "rq_router.down"))
    assert job_log(instance, msg_id)[1] == (
        f"bad rules file {path}: line 1: rule 'x' needs an action (:relay, :balance, :done or :err);"
        " rq_router set DOWN"
    )
    assert instance.queue("rq_router").status() == "DOWN"


def test_bad_rules_down_marker_is_synced_before_the_err(routed) -> None:
    """
    The router's DOWN marker is made durable as C{rq down} makes it
    (C{config/} synced, off the reactor thread), and the message is
    reported err only once it is.
    """
    instance, clock = routed
    write_rules(instance, 'rule "x"\n action :nope\n src /a/\n')
    rounds = HeldThreads()
    synced: list[str] = []
    instance.syncer = Syncer(rounds, synced.extend)
    msg_id, msg = route_one(instance, clock, src="a")
    assert os.path.exists(down_marker(instance.root.path))
    assert msg["state"] == "run"
    assert synced == []
    rounds.run()
    assert instance.root.join("config") in synced
    msg = instance.queue("rq_router").get(msg_id)
    assert (msg["state"], msg["status"][:22]) == ("err", "err - Bad rule file at")


def test_make_handler_sets_the_queue_down_like_rq_down(tmp_path) -> None:
    """
    The handler of a running instance sets C{rq_router} DOWN through the
    instance: marker made, C{config/} synced, queue DOWN.
    """
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.startService()
    handler = router.make_handler(instance)
    rounds = HeldThreads()
    synced: list[str] = []
    instance.syncer = Syncer(rounds, synced.extend)
    d = handler.set_down()
    assert os.path.exists(down_marker(instance.root.path)) and not d.called
    rounds.run()
    assert result_of(d) == "rq_router"
    assert instance.root.join("config") in synced
    assert instance.queue("rq_router").status() == "DOWN"


def test_missing_rules_file_is_bad(routed) -> None:
    instance, clock = routed
    _, msg = route_one(instance, clock, src="a")
    assert msg["status"] == f"err - Bad rule file at: {router.rules_path(instance.root.path)}"


def test_rules_reread_when_changed(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "a"\n action :done\n src /./\n')
    assert route_one(instance, clock, src="x")[1]["state"] == "done"
    path = write_rules(instance, 'rule "a"\n action :err\n src /./\n   \n')
    os.utime(path, ns=(1, 1))
    assert route_one(instance, clock, src="x")[1]["state"] == "err"


def test_routing_over_60_seconds_is_err(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "slow"\n action :done\n src /s/\n delay 90\n')
    msg_id, msg = route_one(instance, clock, src="s")
    assert msg["status"] == "run - router delay 90 seconds"
    clock.advance(router.MAX_RUN)
    msg = instance.queue("rq_router").get(msg_id)
    assert (msg["state"], msg["status"]) == ("err", "err - router ran over 60 seconds")
    clock.advance(60)
    assert instance.queue("rq_router").get(msg_id)["status"] == "err - router ran over 60 seconds"


def test_registered_factory(tmp_path) -> None:
    from rqtwisted.builtin import handler_factory

    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    handler = handler_factory("rq_router")(instance)
    assert isinstance(handler, RouterHandler)
    assert (handler.root, handler.clock) == (instance.root.path, clock)
