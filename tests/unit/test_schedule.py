"""
Tests for L{rqtwisted.schedule}: cron entries of a queue, driven by a
L{Clock} through the queue's scheduling passes.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from rqtwisted import schedule
from rqtwisted.durable import Syncer
from rqtwisted.message import MessageError
from rqtwisted.queue import IDLE_PASS
from rqtwisted.root import QueueConfig
from rqtwisted.schedule import (
    LOOKAHEAD,
    STATE_FILE,
    CronEntry,
    QueueCron,
    cron_msg_id,
    entries_of,
    next_fire,
    normalize_schedule,
    valid_spec,
)
from rqtwisted.testing import HeldThreads, instance_for, result_of

NEW_YORK = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")


def epoch(*args: int, tz=timezone.utc) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


def advance(clock, seconds: float, step: float = IDLE_PASS) -> None:
    """
    Advance in steps, so every scheduling pass on the way runs at its time.
    """
    while seconds > 0:
        clock.advance(min(step, seconds))
        seconds -= step


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """
    Specs are read in UTC unless a test says otherwise.
    """
    monkeypatch.setattr(schedule, "local_zone", lambda: UTC)


def start_at(tmp_path, when: float, sched, name="cronq", start=True):
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    clock.advance(when - clock.seconds())
    instance.create_queue({"name": name, "script": "./code/noop", "exec_prefix": "", "schedule": sched})
    if start:
        instance.startService()
    return instance, spawner, clock


def cron_msgs(queue):
    """
    The messages of a queue in que and run (fake workers never finish).
    """
    msgs = [dict(m) for m in queue.que.values()] + [dict(j.msg) for j in queue.run.values()]
    return sorted(msgs, key=lambda m: (m["due"], str(m.get("param1"))))


# -- parsing


def test_both_schedule_shapes_are_accepted():
    """
    Params nested under C{params} (what create_queue writes) and at the top
    level (what the original's loader reads) both count (quirks 14).
    """
    got = normalize_schedule(
        [
            {"cron": "@hourly", "param1": "a", "param2": 7},
            {"cron": "0 1 * * *", "params": {"param2": "b", "param3": None}},
            {"cron": " 5 4 * * 1 ", "params": {"param1": "x"}, "param1": "y"},
        ]
    )
    assert got == (
        {"cron": "@hourly", "params": {"param1": "a", "param2": "7"}},
        {"cron": "0 1 * * *", "params": {"param2": "b", "param3": None}},
        {"cron": "5 4 * * 1", "params": {"param1": "y"}},
    )


@pytest.mark.parametrize(
    "entry",
    [
        "not an object",
        {"param1": "no spec"},
        {"cron": "61 * * * *"},
        {"cron": "* * *"},
        {"cron": "* * * * * *"},
        {"cron": "@reboot"},
        {"cron": 5},
        # croniter's random and hashed values: no fixed fire time.
        {"cron": "R * * * *"},
        {"cron": "0 r * * *"},
        {"cron": "H/15 * * * *"},
        {"cron": "0 0 1,R * *"},
    ],
)
def test_invalid_entries_are_dropped(entry):
    assert normalize_schedule([entry, {"cron": "@daily"}]) == ({"cron": "@daily", "params": {}},)


def test_names_of_months_and_days_are_valid():
    assert valid_spec("0 6 * JAN-MAR,DEC THU,SAT-SUN")


def test_named_specs():
    for name in schedule.NAMED_SPECS:
        assert valid_spec(name)
    assert not valid_spec("@fortnightly")


def test_queue_config_normalises_and_writes_params_shape():
    config = QueueConfig.fromDict(
        {"name": "q", "script": "s", "schedule": [{"cron": "*/5 * * * *", "param1": "a"}, {"cron": "bad"}]}
    )
    assert config.toDict()["schedule"] == [{"cron": "*/5 * * * *", "params": {"param1": "a"}}]
    assert QueueConfig.fromDict({"name": "q", "script": "s", "schedule": "junk"}).schedule == ()


def test_entry_keys_are_stable_and_distinct():
    sched = normalize_schedule([{"cron": "* * * * *"}, {"cron": "* * * * *"}, {"cron": "* * * * *", "param1": "a"}])
    keys = [e.key for e in entries_of(sched)]
    assert len(set(keys)) == 3
    assert keys == [e.key for e in entries_of(list(sched))]
    # Reordering keeps each entry's key.
    assert {e.key for e in entries_of(reversed(sched))} == set(keys)


def test_cron_msg_id_is_per_entry_and_minute():
    a, b = entries_of(normalize_schedule([{"cron": "* * * * *"}, {"cron": "* * * * *", "param1": "b"}]))
    t = epoch(2021, 1, 1, 12, 0)
    assert cron_msg_id(a, t) == cron_msg_id(a, t + 30)
    assert cron_msg_id(a, t) != cron_msg_id(a, t + 60)
    assert cron_msg_id(a, t) != cron_msg_id(b, t)
    assert cron_msg_id(a, t).startswith("20210101.1159.00.000.")


# -- DST (Vixie cron rules)


def test_fall_back_fixed_time_runs_once():
    """
    1:30 happens twice on 2021-11-07 in New York: a daily 1:30 job runs at
    the first one only.
    """
    [entry] = entries_of(normalize_schedule([{"cron": "30 1 * * *"}]))
    first = next_fire(entry, epoch(2021, 11, 7, 4, 0), NEW_YORK)
    assert first == epoch(2021, 11, 7, 5, 30)  # 01:30 EDT
    after = next_fire(entry, first, NEW_YORK)
    assert after == epoch(2021, 11, 8, 6, 30)  # 01:30 EST the next day


def test_fall_back_wildcard_runs_on_real_time():
    [entry] = entries_of(normalize_schedule([{"cron": "*/30 * * * *"}]))
    t = epoch(2021, 11, 7, 5, 0)  # 01:00 EDT
    fires = []
    for _ in range(4):
        t = next_fire(entry, t, NEW_YORK)
        fires.append(t)
    assert [f - fires[0] for f in fires] == [0, 1800, 3600, 5400]


def test_spring_forward_runs_skipped_time_after_the_change():
    """
    2:30 does not exist on 2021-03-14 in New York: the job runs at 3:00 EDT,
    then at 2:30 the next day.
    """
    [entry] = entries_of(normalize_schedule([{"cron": "30 2 * * *"}]))
    first = next_fire(entry, epoch(2021, 3, 14, 5, 0), NEW_YORK)
    assert first == epoch(2021, 3, 14, 7, 0)  # 03:00 EDT
    assert next_fire(entry, first, NEW_YORK) == epoch(2021, 3, 15, 6, 30)


def test_never_firing_spec():
    entry = CronEntry("0 0 31 2 *", {}, "k")
    assert next_fire(entry, epoch(2021, 1, 1), UTC) is None


# -- the queue


def test_job_is_queued_up_to_a_minute_early_with_exact_due(tmp_path):
    fire = epoch(2021, 6, 1, 12, 0)
    instance, spawner, clock = start_at(tmp_path, fire - 200, [{"cron": "0 12 * * *", "params": {"param1": "p"}}])
    queue = instance.queue("cronq")
    advance(clock, 200 - LOOKAHEAD)
    # Exactly a minute ahead is not "under a minute".
    assert cron_msgs(queue) == []
    advance(clock, IDLE_PASS)
    [msg] = cron_msgs(queue)
    assert msg["src"] == "cron" and msg["dest"] == "cronq"
    assert msg["due"] == int(fire) and msg["param1"] == "p"
    assert spawner.workers == []
    advance(clock, fire - clock.seconds())
    [worker] = spawner.workers
    assert worker.env["RQ_PARAM1"] == "p"
    advance(clock, 120)
    assert len(cron_msgs(queue)) == 1


def test_two_entries_in_one_minute_both_fire(tmp_path):
    fire = epoch(2021, 6, 1, 12, 0)
    sched = [
        {"cron": "0 12 * * *", "param1": "a"},
        {"cron": "0 * * * *", "param1": "b"},
        {"cron": "0 12 * * *", "param1": "a"},  # identical entries are two jobs
    ]
    instance, spawner, clock = start_at(tmp_path, fire - 100, sched)
    advance(clock, 100)
    msgs = cron_msgs(instance.queue("cronq"))
    assert [(m["param1"], m["due"]) for m in msgs] == [("a", fire), ("a", fire), ("b", fire)]


def test_restart_mid_minute_never_double_enqueues(tmp_path):
    fire = epoch(2021, 6, 1, 12, 0)
    instance, spawner, clock = start_at(tmp_path, fire - 30, [{"cron": "0 12 * * *"}])
    queue = instance.queue("cronq")
    assert len(cron_msgs(queue)) == 1
    state = os.path.join(queue.store.path, STATE_FILE)
    assert json.load(open(state)) == {queue.cron.entries[0].key: fire}
    instance.stopService()
    clock.advance(10)
    instance.startService()
    advance(clock, 40)
    assert len(cron_msgs(instance.queue("cronq"))) == 1


def test_lost_record_is_recovered_from_the_message_id(tmp_path):
    """
    A crash between creating the job and recording it: the job's id, derived
    from entry and minute, is found, so it is not queued again.
    """
    fire = epoch(2021, 6, 1, 12, 0)
    instance, spawner, clock = start_at(tmp_path, fire - 30, [{"cron": "0 12 * * *"}])
    queue = instance.queue("cronq")
    instance.stopService()
    os.unlink(os.path.join(queue.store.path, STATE_FILE))
    instance.startService()
    advance(clock, 40)
    assert len(cron_msgs(instance.queue("cronq"))) == 1


def test_record_with_numbers_no_clock_reaches_is_ignored(tmp_path):
    """
    A C{cron.json} whose times are no times (10**400, which no float holds,
    or an infinity, as JSON's 1e999 reads) is read without them: the queue
    starts and its entries fire. The first kept the queue from starting,
    the second stopped its entry for good (an error at every pass).
    """
    fire = epoch(2021, 6, 1, 12, 0)
    sched = [{"cron": "0 12 * * *", "param1": "a"}, {"cron": "0 12 * * *", "param1": "b"}]
    instance, spawner, clock = start_at(tmp_path, fire - 30, sched, start=False)
    a, b = entries_of(normalize_schedule(sched))
    path = os.path.join(instance.root.queue_path("cronq"), STATE_FILE)
    with open(path, "w") as f:
        f.write('{"%s": 1%s, "%s": 1e999}' % (a.key, "0" * 400, b.key))
    instance.startService()
    queue = instance.queue("cronq")
    assert queue.running and queue.cron is not None
    assert [(m["param1"], m["due"]) for m in cron_msgs(queue)] == [("a", fire), ("b", fire)]


def test_deleted_job_is_not_queued_again(tmp_path):
    fire = epoch(2021, 6, 1, 12, 0)
    instance, spawner, clock = start_at(tmp_path, fire - 50, [{"cron": "0 12 * * *"}])
    queue = instance.queue("cronq")
    [msg] = cron_msgs(queue)
    queue.delete(msg["msg_id"])
    advance(clock, 30)
    assert cron_msgs(queue) == []


@pytest.mark.parametrize("action", ["pause", "down"])
def test_nothing_is_queued_unless_up(tmp_path, action):
    start = epoch(2021, 6, 1, 12, 0, 30)
    instance, spawner, clock = start_at(tmp_path, start, [{"cron": "* * * * *"}], start=False)
    open(instance.root.marker("cronq", action), "w").close()
    instance.startService()
    queue = instance.queue("cronq")
    advance(clock, 200)
    assert cron_msgs(queue) == []
    instance.set_admin({"pause": "resume", "down": "up"}[action], "cronq")
    # Only the coming minute's job: the minutes passed while not UP are skipped.
    [msg] = cron_msgs(queue)
    assert msg["due"] == epoch(2021, 6, 1, 12, 4)


def test_scripterror_queues_nothing(tmp_path):
    fire = epoch(2021, 6, 1, 12, 0)
    instance, spawner, clock = start_at(tmp_path, fire - 300, [{"cron": "* * * * *"}], start=False)
    os.chmod(instance.root.join("code", "noop"), 0o644)
    instance.startService()
    queue = instance.queue("cronq")
    advance(clock, 300 - LOOKAHEAD - 1)
    # The first job goes to que; the failed launch marks SCRIPTERROR.
    assert queue.status() == "SCRIPTERROR"
    count = len(cron_msgs(queue))
    advance(clock, 180)
    assert len(cron_msgs(queue)) == count


def test_dst_through_the_queue(tmp_path, monkeypatch):
    monkeypatch.setattr(schedule, "local_zone", lambda: NEW_YORK)
    start = epoch(2021, 11, 7, 5, 5)  # 01:05 EDT
    instance, spawner, clock = start_at(tmp_path, start, [{"cron": "30 1 * * *"}, {"cron": "0 * * * *", "param1": "h"}])
    advance(clock, 3 * 3600)
    msgs = cron_msgs(instance.queue("cronq"))
    daily = [m["due"] for m in msgs if m.get("param1") is None]
    hourly = [m["due"] for m in msgs if m.get("param1") == "h"]
    assert daily == [epoch(2021, 11, 7, 5, 30)]
    # 01:00 EST (06:00 UTC), 02:00 EST, 03:00 EST: every real hour.
    assert hourly == [epoch(2021, 11, 7, 6, 0), epoch(2021, 11, 7, 7, 0), epoch(2021, 11, 7, 8, 0)]


def test_status_lists_schedule_with_next_run(tmp_path):
    fire = epoch(2021, 6, 1, 12, 0)
    instance, spawner, clock = start_at(
        tmp_path, fire - 3600, [{"cron": "0 12 * * *", "params": {"param1": "a"}}, {"cron": "@hourly"}]
    )
    [q] = [q for q in instance.status()["queues"] if q["name"] == "cronq"]
    assert q["schedule"] == [
        {"cron": "0 12 * * *", "params": {"param1": "a"}, "next_run": int(fire)},
        {"cron": "@hourly", "params": {}, "next_run": int(fire - 3600)},
    ]
    [other] = [q for q in instance.status()["queues"] if q["name"] == "relay"]
    assert other["schedule"] == []


def test_reload_applies_a_new_schedule_in_place(tmp_path):
    fire = epoch(2021, 6, 1, 12, 0)
    instance, spawner, clock = start_at(tmp_path, fire - 300, [])
    queue = instance.queue("cronq")
    path = os.path.join(queue.store.path, "config.json")
    config = json.load(open(path))
    config["schedule"] = [{"cron": "0 12 * * *", "param1": "new"}]
    json.dump(config, open(path, "w"))
    assert result_of(instance.reload()) == "reloaded"
    assert instance.queue("cronq") is queue
    advance(clock, 300)
    assert [m["param1"] for m in cron_msgs(queue)] == ["new"]



class FakeCronQueue:
    """
    A queue that is C{UP} and keeps the ids of the messages it created.
    """

    name = "cronq"

    def __init__(self) -> None:
        self.created: list[str] = []

    def status(self) -> str:
        return "UP"

    def create(self, data, method="commit", *, msg_id=None):
        self.created.append(msg_id)
        return succeed(f"http://h:3333/q/cronq/{msg_id}")

    def locate(self, msg_id: str) -> str:
        if msg_id not in self.created:
            raise MessageError("msg not found")
        return "que"


def test_record_is_synced_before_it_replaces_the_old_one(tmp_path):
    """
    C{cron.json} is written to a temp file that is synced before it is
    renamed over the record (then the record and its directory are synced):
    a crash never leaves an empty or partial record. Until it is on disk
    the job is not queued again, by this cron (it remembers) nor by one
    started afresh (the job's id is found); records made while a write is
    under way go with the next write.
    """
    fire = epoch(2021, 6, 1, 12, 0)
    clock = Clock()
    clock.advance(fire - 30)
    rounds = HeldThreads()
    synced: list[list[str]] = []

    def sync(paths):
        synced.append(list(paths))

    syncer = Syncer(rounds, sync)
    queue = FakeCronQueue()
    state = str(tmp_path / STATE_FILE)
    sched = normalize_schedule([{"cron": "0 12 * * *", "param1": "a"}, {"cron": "0 12 * * *", "param1": "b"}])
    a, b = entries_of(sched)
    cron = QueueCron(queue, sched, clock, state, syncer)
    cron.tick()
    assert len(queue.created) == 2
    # The first write waits for its temp file's sync; the second waits for it.
    [(_, (paths,), _)] = rounds.calls
    [tmp] = paths
    assert os.path.dirname(tmp) == str(tmp_path) and tmp != state
    assert json.loads(open(tmp).read()) == {a.key: fire}
    assert not os.path.exists(state)
    clock.advance(10)
    cron.tick()
    again = QueueCron(queue, sched, clock, state, syncer)
    again.tick()
    assert len(queue.created) == 2
    rounds.run()
    assert json.loads(open(state).read()) == {a.key: fire, b.key: fire}
    assert synced[0] == [tmp]
    assert any(state in r and str(tmp_path) in r for r in synced[1:])
    assert sorted(os.listdir(tmp_path)) == [STATE_FILE]




def test_clock_stepping_back_does_not_queue_a_fire_time_again(tmp_path):
    """
    After the wall clock steps back an hour past a fire time that was
    queued, ran and was removed (so no message id can tell), the queue's
    passes (at once, from any new event, and after the step) and a restart
    from the record do not queue that fire time again; the entries fire
    again at their next times.
    """
    fire = epoch(2021, 6, 1, 12, 0)
    instance, spawner, clock = start_at(tmp_path, fire - 30, [{"cron": "0 12 * * *"}, {"cron": "0 * * * *"}])
    path = instance.root.queue_path("cronq")

    def messages() -> dict[str, float]:
        return {
            os.path.basename(top): json.load(open(os.path.join(top, "msg")))["due"]
            for state in ("que", "run", "done")
            for top, _, files in os.walk(os.path.join(path, state))
            if "msg" in files
        }

    advance(clock, 90)
    for _ in range(2):
        for worker in spawner.running:
            worker.say("done")
            worker.exit(0)
        advance(clock, 10)
    assert sorted(messages().values()) == [fire, fire]
    for msg_id in messages():
        result_of(instance.queue("cronq").delete(msg_id))
    clock.advance(-3600)
    instance.queue("cronq").schedule()
    advance(clock, 1800)
    instance.stopService()
    instance.startService()
    advance(clock, 1800 + 120)
    assert messages() == {}
    advance(clock, fire + 3600 - clock.seconds())
    assert sorted(messages().values()) == [fire + 3600]
