"""
Tests for L{rqtwisted.timers}: timer files, rescans and firing, with a
L{Clock}.
"""

from __future__ import annotations

import json
import os

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from rqtwisted.fsync import CONFIG_LIMIT
from rqtwisted.message import MessageError
from rqtwisted.timers import MAX_PERIOD, RESCAN_INTERVAL, STAGGER, TimerError, TimerService, parse_timer, timer_name

T0 = 1_300_000_000.0


class Sender:
    """
    Records what the timers send; fails while C{failing} is set.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, dict]] = []
        self.failing: str | None = None

    def __call__(self, fields: dict):
        if self.failing:
            return fail(MessageError(self.failing))
        self.sent.append((self.clock.seconds(), fields))
        return succeed(f"http://h:3333/q/{fields['dest']}/{len(self.sent)}")


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    clock.advance(T0)
    directory = tmp_path / "timers"
    directory.mkdir()
    sender = Sender(clock)
    service = TimerService(str(directory), sender, clock)
    return service, sender, clock, directory


def write(directory, name, period=60, **msg):
    msg.setdefault("dest", "cleaner")
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"period": period, "msg": msg}))
    return path


def test_parse_timer():
    assert parse_timer({"period": 86400, "msg": {"dest": "cleaner", "param1": "ALLQUEUES", "x": 1}}) == (
        86400,
        {"dest": "cleaner", "param1": "ALLQUEUES"},
    )
    for bad, reason in [
        ([], "JSON object"),
        ({"period": 59, "msg": {"dest": "q"}}, "at least 60"),
        ({"period": "60", "msg": {"dest": "q"}}, "integer"),
        ({"period": True, "msg": {"dest": "q"}}, "integer"),
        ({"period": 60}, "msg must be"),
        ({"period": 60, "msg": {"param1": "x"}}, "dest"),
        ({"period": 60, "msg": {"dest": "q", "param1": ["x"]}}, "param1"),
    ]:
        with pytest.raises(TimerError, match=reason):
            parse_timer(bad)


def test_timer_names():
    assert timer_name("cleaner.json") == "cleaner"
    assert timer_name("a.b.json") is None
    assert timer_name("cleaner.yaml") is None
    assert timer_name(".json") is None
    assert timer_name("README") is None


def test_new_timers_fire_at_once_staggered_then_every_period(env):
    service, sender, clock, directory = env
    write(directory, "a", period=60, param1="A")
    write(directory, "b", period=120, dest="other")
    service.startService()
    clock.advance(0)
    assert sender.sent == [(T0, {"dest": "cleaner", "param1": "A"})]
    clock.advance(STAGGER)
    assert sender.sent[1] == (T0 + STAGGER, {"dest": "other"})
    clock.advance(60 - STAGGER)
    assert [t for t, _ in sender.sent] == [T0, T0 + STAGGER, T0 + 60]
    clock.advance(60)
    assert [t for t, _ in sender.sent] == [T0, T0 + STAGGER, T0 + 60, T0 + 120]
    clock.advance(STAGGER)
    assert [t for t, _ in sender.sent][-1] == T0 + 120 + STAGGER


def test_unchanged_timer_does_not_fire_again_at_rescan(env):
    """
    quirks 31: the file's stat is recorded, a rescan leaves it alone.
    """
    service, sender, clock, directory = env
    write(directory, "a", period=3600)
    service.startService()
    clock.advance(0)
    for _ in range(10):
        clock.advance(RESCAN_INTERVAL)
    assert len(sender.sent) == 1
    [status] = service.status()
    assert status == {
        "name": "a",
        "period": 3600,
        "dest": "cleaner",
        "next_run": int(T0 + 3600),
        "last_run": int(T0),
        "sent": 1,
        "error": None,
    }


def test_changed_timer_is_due_at_once_with_new_content(env):
    service, sender, clock, directory = env
    path = write(directory, "a", period=3600, param1="old")
    service.startService()
    clock.advance(RESCAN_INTERVAL)
    path.write_text(json.dumps({"period": 7200, "msg": {"dest": "cleaner", "param1": "newer"}}))
    os.utime(path, ns=(1, 1))
    clock.advance(RESCAN_INTERVAL)
    assert [f["param1"] for _, f in sender.sent] == ["old", "newer"]
    assert service.status()[0]["period"] == 7200
    assert service.status()[0]["next_run"] == int(T0 + 2 * RESCAN_INTERVAL + 7200)


def test_removed_timer_is_dropped(env):
    service, sender, clock, directory = env
    path = write(directory, "a", period=60)
    service.startService()
    clock.advance(1)
    path.unlink()
    clock.advance(RESCAN_INTERVAL)
    clock.advance(300)
    assert len(sender.sent) == 1
    assert service.status() == []


def test_symlinked_timer(env, tmp_path):
    service, sender, clock, directory = env
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"period": 86400, "msg": {"dest": "cleaner", "param1": "ALLQUEUES"}}))
    os.symlink(target, directory / "cleaner.json")
    os.symlink(tmp_path / "missing.json", directory / "dangling.json")
    service.startService()
    clock.advance(0)
    assert sender.sent == [(T0, {"dest": "cleaner", "param1": "ALLQUEUES"})]
    errors = {s["name"]: s["error"] for s in service.status()}
    assert errors["cleaner"] is None
    assert "dangling" in errors["dangling"]


def test_invalid_timers_are_listed_and_never_fire(env):
    service, sender, clock, directory = env
    (directory / "broken.json").write_text("{nope")
    write(directory, "short", period=10)
    (directory / "two.dots.json").write_text("{}")
    service.startService()
    clock.advance(600)
    assert sender.sent == []
    status = {s["name"]: s for s in service.status()}
    assert set(status) == {"broken", "short"}
    assert status["broken"]["error"].startswith("cannot read broken.json")
    assert status["short"]["error"] == "period must be at least 60 seconds"
    assert status["short"]["next_run"] is None
    assert status["short"]["dest"] is None and status["short"]["sent"] == 0
    # Fixing the file makes it a timer.
    write(directory, "short", period=60)
    clock.advance(RESCAN_INTERVAL)
    assert len(sender.sent) == 1


def test_send_failure_is_reported_and_retried_next_period(env):
    service, sender, clock, directory = env
    write(directory, "a", period=60, dest="nosuchqueue")
    sender.failing = "Queue not found"
    service.startService()
    clock.advance(0)
    [status] = service.status()
    assert status["error"] == "send failed: Queue not found"
    assert status["last_run"] == int(T0) and status["next_run"] == int(T0 + 60)
    assert (status["dest"], status["sent"]) == ("nosuchqueue", 0)
    sender.failing = None
    clock.advance(60)
    assert len(sender.sent) == 1
    assert service.status()[0]["error"] is None


def test_missing_directory_and_stop(env, tmp_path):
    clock = Clock()
    sender = Sender(clock)
    service = TimerService(str(tmp_path / "absent"), sender, clock)
    service.startService()
    clock.advance(RESCAN_INTERVAL)
    assert service.status() == []
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_stop_cancels_pending_runs(env):
    service, sender, clock, directory = env
    write(directory, "a")
    service.startService()
    clock.advance(0)
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_huge_period_is_an_invalid_timer(env):
    """
    A period too large for a due time (here 10**400 seconds) makes the
    timer invalid; it used to fail every run of the timers (OverflowError
    in the reactor), so that the timers after it never fired.
    """
    service, sender, clock, directory = env
    (directory / "a_huge.json").write_text('{"period": 1%s, "msg": {"dest": "q"}}' % ("0" * 400))
    write(directory, "b_fine", period=60)
    service.startService()
    clock.advance(0)
    clock.advance(STAGGER)
    status = {s["name"]: s for s in service.status()}
    assert status["a_huge"]["error"] == f"period must be at most {MAX_PERIOD} seconds (100 years)"
    assert status["a_huge"]["next_run"] is None
    assert [f["dest"] for _, f in sender.sent] == ["cleaner"]
    clock.advance(60)
    assert len(sender.sent) == 2
    assert parse_timer({"period": MAX_PERIOD, "msg": {"dest": "q"}})[0] == MAX_PERIOD


def test_fifo_is_an_invalid_timer(env, no_hang):
    """
    A FIFO named like a timer file is reported invalid without waiting for
    a writer (which blocked the whole daemon); the other timers fire.
    """
    service, sender, clock, directory = env
    os.mkfifo(directory / "a_fifo.json")
    write(directory, "b_fine", period=60)
    service.startService()
    clock.advance(0)
    clock.advance(STAGGER)
    status = {s["name"]: s for s in service.status()}
    assert status["a_fifo"]["error"].startswith("cannot read a_fifo.json")
    assert [f["dest"] for _, f in sender.sent] == ["cleaner"]


def test_deeply_nested_file_is_an_invalid_timer(env):
    """
    JSON nested too deeply for the parser is reported like any bad file;
    the other timers and later rescans go on.
    """
    service, sender, clock, directory = env
    (directory / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    write(directory, "fine", period=60)
    service.startService()
    clock.advance(0)
    status = {s["name"]: s for s in service.status()}
    assert status["deep"]["error"].startswith("cannot read deep.json")
    clock.advance(STAGGER)
    assert [f["dest"] for _, f in sender.sent] == ["cleaner"]
    write(directory, "later", period=60, dest="other")
    clock.advance(RESCAN_INTERVAL)
    assert "later" in {s["name"] for s in service.status()}


def test_too_large_file_is_an_invalid_timer(env):
    """
    A timer file over L{CONFIG_LIMIT} (a valid timer padded with spaces)
    is reported invalid, with the reason, and never fires: it is not read
    whole on the reactor thread. One of exactly the limit is a timer.
    """
    service, sender, clock, directory = env
    text = json.dumps({"period": 60, "msg": {"dest": "big"}})
    (directory / "a_big.json").write_text(text + " " * (CONFIG_LIMIT + 1 - len(text)))
    (directory / "b_fits.json").write_text(text.replace("big", "fits") + " " * (CONFIG_LIMIT - len(text) - 1))
    service.startService()
    clock.advance(0)
    clock.advance(STAGGER)
    status = {s["name"]: s for s in service.status()}
    assert status["a_big"]["error"] == "cannot read a_big.json: too large: over 1 MiB"
    assert status["a_big"]["next_run"] is None
    assert status["b_fits"]["error"] is None
    assert [f["dest"] for _, f in sender.sent] == ["fits"]


def _ran_then_stepped_back(env):
    """
    A 60 s timer that ran at T0, then the wall clock stepped back an hour
    at T0 + 5; the service, sender and clock.
    """
    service, sender, clock, directory = env
    write(directory, "t", period=60)
    service.startService()
    clock.advance(0)
    clock.advance(5)
    clock.advance(-3600)
    return service, sender, clock


def test_clock_stepping_back_then_calls_run_again(env):
    """
    When the wall clock steps back, the pending calls wait for the size of
    the step (the reactor times them by the wall clock); once they run
    again, the timer keeps its period, with no second wait.
    """
    service, sender, clock = _ran_then_stepped_back(env)
    clock.advance(3600 + 5)
    assert [t - T0 for t, _ in sender.sent] == [0]
    assert service.status()[0]["next_run"] == int(T0 + 60)
    clock.advance(50)
    assert [t - T0 for t, _ in sender.sent] == [0, 60]
    clock.advance(60)
    assert [t - T0 for t, _ in sender.sent] == [0, 60, 120]


def test_clock_stepping_back_then_reload(env):
    """
    A rescan (C{rq reload}) after the wall clock stepped back makes a timer
    that has run due one period later, not after the whole step, and it
    keeps its period from there.
    """
    service, sender, clock = _ran_then_stepped_back(env)
    service.rescan()
    back = T0 + 5 - 3600
    assert service.status()[0]["next_run"] == int(back + 60)
    clock.advance(60)
    clock.advance(60)
    assert [t - T0 for t, _ in sender.sent] == [0, back + 60 - T0, back + 120 - T0]
