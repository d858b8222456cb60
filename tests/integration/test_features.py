"""
Queue features end to end with the real daemon: cron schedules, config
changes without a restart, timers, scandir queues and message search.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, wait_for

pytestmark = pytest.mark.integration

DONE_SCRIPT = 'echo "done got $RQ_PARAM1" >&3\n'


def write_config(daemon: Daemon, name: str, config: dict) -> Path:
    path = daemon.queue_dir(name) / "config.json"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config))
    os.rename(tmp, path)
    return path


def queue_entry(daemon: Daemon, name: str) -> dict | None:
    for q in daemon.status_json()["queues"]:
        if q["name"] == name:
            return q
    return None


def http_get(daemon: Daemon, path: str) -> str:
    with urllib.request.urlopen(daemon.base_url + path, timeout=10) as response:
        return response.read().decode("utf-8")


def search(daemon: Daemon, *args: str) -> list[dict]:
    code, out = daemon.rq("search", *args)
    assert code == 0 and out[0] == f"ok {len(out) - 1}", out
    return [json.loads(line) for line in out[1:]]


def test_cron_job_is_queued_ahead_with_exact_due_and_once(daemon: Daemon) -> None:
    """
    C{* * * * *} always fires within the next minute: the job is queued at
    once with the next minute as C{due}; a daemon restart in the same minute
    does not queue it again.
    """
    # Away from a minute's end (the job would be for the minute after) and
    # from its first seconds (within the cron's grace, this minute's fire
    # would be queued too).
    phase = time.time() % 60
    if phase > 50:
        time.sleep(60 - phase + 3)
    elif phase < 3:
        time.sleep(3 - phase)
    script = daemon.script("cron.sh", DONE_SCRIPT)
    write_config(
        daemon,
        "cronq",
        {
            "name": "cronq",
            "script": str(script),
            "exec_prefix": "",
            "schedule": [{"cron": "* * * * *", "params": {"param1": "nested"}}, {"cron": "* * * * *", "param1": "top"}],
        },
    )
    assert daemon.rq("reload") == (0, ["ok reloaded"])
    next_minute = (int(time.time()) // 60 + 1) * 60
    jobs = search(daemon, "--name", "cronq", "--query", "src=cron", "--exact")
    assert sorted((j["param1"], j["due"], j["state"]) for j in jobs) == [
        ("nested", next_minute, "que"),
        ("top", next_minute, "que"),
    ]
    entry = queue_entry(daemon, "cronq")
    assert entry is not None
    assert entry["schedule"] == [
        {"cron": "* * * * *", "params": {"param1": "nested"}, "next_run": next_minute},
        {"cron": "* * * * *", "params": {"param1": "top"}, "next_run": next_minute},
    ]
    daemon.terminate()
    daemon.start()
    # (On a loaded machine the restart may end in the next minute, which
    # queues that minute's fire ahead: only this fire time counts.)
    jobs = search(daemon, "--name", "cronq", "--query", "src=cron")
    assert len([j for j in jobs if j["due"] == next_minute]) == 2, jobs


def test_config_changes_without_restart(daemon: Daemon) -> None:
    script = daemon.script("work.sh", DONE_SCRIPT)
    daemon.create_queue("work", script)
    entry = queue_entry(daemon, "work")
    assert entry is not None
    uptime_before = entry["uptime"]
    # An edited config.json is picked up by polling.
    config = json.loads((daemon.queue_dir("work") / "config.json").read_text())
    write_config(daemon, "work", dict(config, num_workers=3))
    wait_for(lambda: queue_entry(daemon, "work")["num_workers"] == 3, 10, what="num_workers 3")
    assert queue_entry(daemon, "work")["uptime"] >= uptime_before  # not restarted
    # Bad JSON: old config kept, reported by reload and status.
    (daemon.queue_dir("work") / "config.json").write_text("{not json")
    code, out = daemon.rq("reload")
    assert code == 1 and out[0].startswith("fail bad queue config, old config kept: work: could not read"), out
    assert "work" in daemon.status_json()["config_errors"]
    full = daemon.send("work", "--param1", "still")
    daemon.wait_state(full, "done")
    write_config(daemon, "work", dict(config, num_workers=2))
    assert daemon.rq("reload") == (0, ["ok reloaded"])
    assert daemon.status_json()["config_errors"] == {}
    assert queue_entry(daemon, "work")["num_workers"] == 2
    # A new directory starts a queue (SIGHUP this time), a removed one stops.
    write_config(daemon, "extra", dict(config, name="extra"))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: queue_entry(daemon, "extra"), 10, what="queue extra")
    full = daemon.send("extra", "--param1", "x")
    daemon.wait_state(full, "done")
    os.rename(daemon.queue_dir("extra"), daemon.root / "queue" / "extra.set.aside")
    wait_for(lambda: queue_entry(daemon, "extra") is None, 10, what="queue extra gone")


def test_timer_sends_its_message(daemon: Daemon, tmp_path: Path) -> None:
    daemon.queue_with_script("tq", DONE_SCRIPT)
    target = tmp_path / "tick.json"
    target.write_text(json.dumps({"period": 3600, "msg": {"dest": "tq", "param1": "tick"}}))
    os.symlink(target, daemon.root / "timers" / "tick.json")
    (daemon.root / "timers" / "bad.json").write_text(json.dumps({"period": 5, "msg": {"dest": "tq"}}))
    assert daemon.rq("reload") == (0, ["ok reloaded"])
    jobs = wait_for(lambda: search(daemon, "--name", "tq", "--query", "param1=tick"), 10, what="timer message")
    [job] = jobs  # type: ignore[misc]
    daemon.wait_state(f"{daemon.base_url}q/tq/{job['msg_id']}", "done")
    timers = {t["name"]: t for t in daemon.status_json()["timers"]}
    assert timers["tick"]["period"] == 3600 and timers["tick"]["error"] is None
    # Due again a period after it was due (last_run is when it actually ran).
    assert 0 <= 3600 - (timers["tick"]["next_run"] - timers["tick"]["last_run"]) <= 5
    assert timers["bad"]["error"] == "period must be at least 60 seconds"
    assert (timers["tick"]["dest"], timers["tick"]["sent"]) == ("tq", 1)
    # The home page lists the timers with their destination and error.
    home = http_get(daemon, "")
    assert '<tr id="timer-tick"><td>tick</td><td>3600</td><td>tq</td>' in home
    assert "period must be at least 60 seconds" in home
    # A rescan of the unchanged file does not send it again.
    assert daemon.rq("reload") == (0, ["ok reloaded"])
    assert len(search(daemon, "--name", "tq")) == 1


def test_scandir_entry_makes_a_queue(daemon: Daemon, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "run").write_text("#!/bin/bash\n" + DONE_SCRIPT)
    os.chmod(app / "run", 0o755)
    (app / "config.json").write_text(json.dumps({"num_workers": 2}))
    os.symlink(app, daemon.root / "scandir" / "app")
    assert daemon.rq("reload") == (0, ["ok reloaded"])
    entry = queue_entry(daemon, "app")
    assert entry is not None and entry["num_workers"] == 2
    assert daemon.status_json()["scandir"] == [{"name": "app", "target": str(app), "queue": "app", "error": None}]
    full = daemon.send("app", "--param1", "hi")
    daemon.wait_state(full, "done")
    assert daemon.statusmesg(full) == ["ok done - got hi"]
    os.unlink(daemon.root / "scandir" / "app")
    assert daemon.rq("reload") == (0, ["ok reloaded"])
    wait_for(lambda: queue_entry(daemon, "app") is None, 10, what="queue app deleted")
    assert [p for p in os.listdir(daemon.root / "queue") if p.startswith("app.deleted.")]


def test_search(daemon: Daemon) -> None:
    daemon.queue_with_script("sq", DONE_SCRIPT)
    done = daemon.send("sq", "--param1", "apple pie")
    daemon.wait_state(done, "done")
    later = daemon.send("sq", "--param1", "apple", "--due", str(int(time.time()) + 3600))
    found = search(daemon, "--name", "sq", "--query", "param1=apple")
    assert [m["msg_id"] for m in found] == [later.rsplit("/", 1)[1], done.rsplit("/", 1)[1]]
    assert [m["state"] for m in found] == ["que", "done"]
    assert found[1]["status"] == "done - got apple pie"
    exact = search(daemon, "--name", "sq", "--query", "param1=apple", "--exact")
    assert [m["msg_id"] for m in exact] == [later.rsplit("/", 1)[1]]
    both = search(daemon, "--query", "param1=apple", "--query", "state=done")
    assert [m["msg_id"] for m in both] == [done.rsplit("/", 1)[1]]
    assert daemon.rq("search", "--name", "nosuch") == (1, ["fail Queue not found"])
    # GET /search answers the same from the same index.
    query = urllib.parse.urlencode({"name": "sq", "query[param1]": "apple"})
    assert json.loads(http_get(daemon, f"search?{query}")) == found
    assert [m["msg_id"] for m in json.loads(http_get(daemon, f"search?{query}&exact"))] == [m["msg_id"] for m in exact]
    query = urllib.parse.urlencode({"query[param1]": "apple", "query[state]": "done"})
    assert json.loads(http_get(daemon, f"search?{query}")) == both
