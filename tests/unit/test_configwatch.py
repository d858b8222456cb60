"""
Tests for config changes without a restart: L{rqtwisted.configwatch} and
L{rqtwisted.supervisor.Instance.reload}, with a L{Clock} and fake workers.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from rqtwisted.admin import AdminAPI
from rqtwisted.configwatch import POLL_INTERVAL, ConfigWatcher
from rqtwisted.testing import instance_for, result_of
from tests.unit.roots import new_queue_dir



@pytest.fixture
def env(tmp_path):
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.create_queue({"name": "work", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    watcher = ConfigWatcher(instance, clock)
    watcher.startService()
    return instance, spawner, clock, watcher


def config_path(instance, name="work"):
    return os.path.join(instance.root.queue_path(name), "config.json")


def rewrite(instance, name="work", text=None, **changes):
    path = config_path(instance, name)
    if text is None:
        data = json.load(open(path))
        data.update(changes)
        text = json.dumps(data)
    with open(path, "w") as f:
        f.write(text)
    os.utime(path, ns=(10**18, 10**18 + len(text)))


def test_edited_config_applies_in_place_without_killing_workers(env):
    instance, spawner, clock, watcher = env
    queue = instance.queue("work")
    instance.create_message({"dest": "work", "param1": "a"})
    instance.create_message({"dest": "work", "param1": "b"})
    [worker] = spawner.workers
    rewrite(instance, num_workers=2, env_vars={"X": "1"})
    clock.advance(POLL_INTERVAL)
    assert instance.queue("work") is queue
    assert queue.config.num_workers == 2
    assert worker.signals == [] and not worker.exited
    assert len(spawner.running) == 2
    assert spawner.workers[1].env["X"] == "1"


def test_bad_json_keeps_old_config_and_is_reported(env):
    instance, spawner, clock, watcher = env
    queue = instance.queue("work")
    rewrite(instance, text="{broken")
    clock.advance(POLL_INTERVAL)
    assert instance.queue("work") is queue and queue.running
    reason = instance.config_errors["work"]
    assert reason.startswith("could not read queue config [") and "config.json" in reason
    assert instance.status()["config_errors"] == {"work": reason}
    text = result_of(instance.reload())
    assert text == f"bad queue config, old config kept: work: {reason}"
    assert result_of(AdminAPI(instance).reload()) == ("fail", text)
    # Still working with the old config.
    instance.create_message({"dest": "work"})
    assert len(spawner.workers) == 1
    # Fixed: the error goes away.
    rewrite(instance, text=json.dumps({"name": "work", "script": "./code/noop", "num_workers": 3}))
    clock.advance(POLL_INTERVAL)
    assert instance.config_errors == {}
    assert queue.config.num_workers == 3
    assert result_of(AdminAPI(instance).reload()) == ("ok", "reloaded")


def test_json_too_deep_for_the_parser_is_a_bad_config(env):
    """
    A config the JSON parser gives up on (nested too deeply) is reported
    like bad JSON; other queues' changes still apply.
    """
    instance, spawner, clock, watcher = env
    instance.create_queue({"name": "other", "script": "./code/noop", "exec_prefix": ""})
    rewrite(instance, text="[" * 100_000 + "]" * 100_000)
    rewrite(instance, "other", num_workers=5)
    assert result_of(instance.reload()).startswith("bad queue config, old config kept: work: could not read")
    assert instance.queue("work").config.num_workers == 1
    assert instance.queue("other").config.num_workers == 5


def test_invalid_config_is_reported_too(env):
    instance, spawner, clock, watcher = env
    rewrite(instance, num_workers=0)
    clock.advance(POLL_INTERVAL)
    assert "out of range" in instance.config_errors["work"]
    assert instance.queue("work").config.num_workers == 1


def test_new_directory_is_started_and_removed_one_stopped(env):
    instance, spawner, clock, watcher = env
    qdir = new_queue_dir(instance, "fresh", json.dumps({"name": "fresh", "script": "./code/noop", "exec_prefix": ""}))
    clock.advance(POLL_INTERVAL)
    assert instance.queue("fresh").running
    instance.create_message({"dest": "fresh"})
    shutil.rmtree(qdir)
    clock.advance(POLL_INTERVAL)
    assert "fresh" not in instance.queues


def test_new_directory_with_bad_config_waits_for_a_fix(env):
    instance, spawner, clock, watcher = env
    new_queue_dir(instance, "later", "{")
    clock.advance(POLL_INTERVAL)
    assert "later" not in instance.queues
    assert "later" in instance.status()["config_errors"]
    rewrite(instance, "later", text=json.dumps({"name": "later", "script": "./code/noop"}))
    clock.advance(POLL_INTERVAL)
    assert "later" in instance.queues
    assert instance.config_errors == {}


def test_no_change_no_reload(env):
    instance, spawner, clock, watcher = env
    assert watcher.poll() is False
    rewrite(instance, num_workers=2)
    assert watcher.poll() is True
    assert watcher.poll() is False


def test_reload_runs_hooks_and_survives_a_failing_one(env):
    instance, spawner, clock, watcher = env
    calls = []

    def broken():
        raise RuntimeError("boom")

    instance.reloadHooks.extend([broken, lambda: calls.append(1)])
    assert result_of(instance.reload()) == "reloaded"
    assert calls == [1]


def test_failing_reload_does_not_stop_polling(env):
    """
    A reload that raises (e.g. on a config file the JSON parser chokes on)
    is logged; the next change is picked up all the same.
    """
    instance, spawner, clock, watcher = env
    real = instance.reload_configs
    calls = []

    def broken():
        calls.append(1)
        raise RecursionError("maximum recursion depth exceeded")

    instance.reload_configs = broken
    rewrite(instance, num_workers=2)
    clock.advance(POLL_INTERVAL)
    assert calls == [1]
    instance.reload_configs = real
    rewrite(instance, num_workers=12)
    clock.advance(POLL_INTERVAL)
    assert instance.queue("work").config.num_workers == 12


def test_stop(env):
    instance, spawner, clock, watcher = env
    watcher.stopService()
    rewrite(instance, num_workers=2)
    clock.advance(POLL_INTERVAL * 2)
    assert instance.queue("work").config.num_workers == 1


def test_daemon_wiring(tmp_path):
    """
    L{rqtwisted.tap.add_watchers}: the three services, C{rq reload}
    rescans, C{rq status} keys.
    """
    from twisted.application.service import MultiService

    from rqtwisted.tap import add_watchers

    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.create_queue({"name": "tq", "script": "./code/noop", "exec_prefix": ""})
    top = MultiService()
    instance.setServiceParent(top)
    add_watchers(top, instance, clock)
    top.startService()
    with open(instance.root.join("timers", "t.json"), "w") as f:
        json.dump({"period": 60, "msg": {"dest": "tq", "param1": "p"}}, f)
    result_of(instance.reload())
    clock.advance(0)
    status = instance.status()
    [timer] = status["timers"]
    assert timer["name"] == "t" and timer["last_run"] == int(clock.seconds()) and timer["error"] is None
    assert status["scandir"] == [] and status["config_errors"] == {}
    [worker] = spawner.workers
    assert worker.env["RQ_PARAM1"] == "p"
    assert {s.name for s in top} >= {"timers", "scandir"}
    top.stopService()
