"""
Tests for L{rqtwisted.scandir}: queues made from C{scandir/} entries, with
a L{Clock} and fake workers.
"""

from __future__ import annotations

import json
import os

import pytest

from rqtwisted.durable import Syncer
from rqtwisted.fsync import CONFIG_LIMIT
from rqtwisted.scandir import INITIAL_DELAY, MARKER, SCAN_INTERVAL, ScandirService, entry_config, ScandirError
from rqtwisted.testing import HeldThreads, instance_for


@pytest.fixture
def env(tmp_path):
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.startService()
    service = ScandirService(instance, clock)
    return instance, spawner, clock, service, tmp_path


def make_dir(tmp_path, name, config=None, form=None, executable=True):
    """
    A scandir target directory C{<tmp>/apps/<name>} with a C{run} script.
    """
    target = tmp_path / "apps" / name
    target.mkdir(parents=True, exist_ok=True)
    run = target / "run"
    run.write_text("#!/bin/sh\necho done ok >&3\n")
    os.chmod(run, 0o755 if executable else 0o644)
    if config is not None:
        (target / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if form is not None:
        (target / "form.json").write_text(json.dumps(form))
    return target


def link(instance, name, target):
    os.symlink(target, instance.root.join("scandir", name))


def scan_once(service, clock):
    service.startService()
    clock.advance(INITIAL_DELAY)


def test_entry_config_defaults_and_overlay(tmp_path):
    target = make_dir(tmp_path, "app", config={"name": "other", "num_workers": 3, "env_vars": {"A": "1"}})
    config = entry_config("app", str(target))
    assert config.name == "app"
    assert config.script == os.path.realpath(target / "run")
    assert config.num_workers == 3 and config.exec_prefix == "" and config.env_vars == {"A": "1"}
    bare = make_dir(tmp_path, "bare")
    assert entry_config("bare", str(bare)).num_workers == 1


@pytest.mark.parametrize(
    "config, executable, reason",
    [
        ("{bad", True, "cannot read"),
        ("[" * 100_000 + "]" * 100_000, True, "cannot read"),
        ("[]", True, "must hold a JSON object"),
        ({"num_workers": 500}, True, "out of range"),
        (None, False, "no executable run"),
    ],
)
def test_entry_config_errors(tmp_path, config, executable, reason):
    target = make_dir(tmp_path, "app", config=config, executable=executable)
    with pytest.raises(ScandirError, match=reason):
        entry_config("app", str(target))


def test_entry_config_fifo(tmp_path, no_hang):
    """
    A FIFO as an entry's C{config.json} is a bad config, read without
    waiting for a writer (which blocked the whole daemon).
    """
    target = make_dir(tmp_path, "app")
    os.mkfifo(target / "config.json")
    with pytest.raises(ScandirError, match="cannot read"):
        entry_config("app", str(target))


def test_entry_config_too_large(tmp_path):
    """
    An entry's C{config.json} over L{CONFIG_LIMIT} (valid JSON padded with
    spaces), or a queue config file an entry links to, is a bad config
    with the reason, not read whole on the reactor thread.
    """
    target = make_dir(tmp_path, "app", config='{"num_workers": 2}' + " " * CONFIG_LIMIT)
    with pytest.raises(ScandirError, match=r"config\.json: too large: over 1 MiB$"):
        entry_config("app", str(target))
    linked = tmp_path / "q.json"
    linked.write_text(json.dumps({"script": str(target / "run"), "num_workers": 1}) + " " * CONFIG_LIMIT)
    with pytest.raises(ScandirError, match=r"q\.json: too large: over 1 MiB$"):
        entry_config("app", str(linked))


def test_new_entry_creates_queue_after_initial_delay(env):
    instance, spawner, clock, service, tmp_path = env
    target = make_dir(tmp_path, "app", config={"num_workers": 2}, form={"fields": []})
    link(instance, "app", target)
    service.startService()
    clock.advance(INITIAL_DELAY - 1)
    assert "app" not in instance.queues
    clock.advance(1)
    queue = instance.queue("app")
    assert queue.config.num_workers == 2
    assert queue.config.script == os.path.realpath(target / "run")
    qdir = instance.root.queue_path("app")
    assert open(os.path.join(qdir, MARKER)).read().strip() == "app"
    assert os.readlink(os.path.join(qdir, "form.json")) == str(target / "form.json")
    assert service.status() == [{"name": "app", "target": str(target), "queue": "app", "error": None}]
    # The queue runs its messages with run, directly.
    instance.create_message({"dest": "app"})
    assert spawner.workers[-1].argv == [os.path.realpath(target / "run")]


def test_changed_config_applies_in_place(env):
    instance, spawner, clock, service, tmp_path = env
    target = make_dir(tmp_path, "app", config={"num_workers": 1})
    link(instance, "app", target)
    scan_once(service, clock)
    queue = instance.queue("app")
    (target / "config.json").write_text(json.dumps({"num_workers": 4}))
    os.utime(target / "config.json", ns=(1, 1))
    clock.advance(SCAN_INTERVAL)
    assert instance.queue("app") is queue
    assert queue.config.num_workers == 4
    saved = json.load(open(os.path.join(instance.root.queue_path("app"), "config.json")))
    assert saved["num_workers"] == 4


def held_rounds(instance) -> tuple[HeldThreads, list[str]]:
    """
    Give C{instance} a syncer whose rounds wait for the test: the runner
    (L{HeldThreads.run} runs them) and the paths synced so far.
    """
    rounds = HeldThreads()
    synced: list[str] = []
    instance.syncer = Syncer(rounds, synced.extend)
    return rounds, synced


def test_rewritten_config_is_synced_before_it_applies(env):
    """
    A config rewrite is made durable through the syncer: a temp file
    synced, renamed over C{config.json}, which is synced with its
    directory; it is applied once in place, and a scan meanwhile leaves
    the entry alone.
    """
    instance, spawner, clock, service, tmp_path = env
    target = make_dir(tmp_path, "app", config={"num_workers": 1})
    link(instance, "app", target)
    scan_once(service, clock)
    qdir = instance.root.queue_path("app")
    config = os.path.join(qdir, "config.json")
    rounds, synced = held_rounds(instance)
    (target / "config.json").write_text(json.dumps({"num_workers": 4}))
    os.utime(target / "config.json", ns=(1, 1))
    clock.advance(SCAN_INTERVAL)
    assert json.load(open(config))["num_workers"] == 1
    assert instance.queue("app").config.num_workers == 1
    [(_, ([temp],), _)] = rounds.calls
    assert os.path.dirname(temp) == qdir
    again = service.scan()
    assert again.called and len(rounds.calls) == 1
    rounds.run()
    assert {temp, config, qdir} <= set(synced)
    assert json.load(open(config))["num_workers"] == 4
    assert instance.queue("app").config.num_workers == 4
    assert not os.path.exists(temp)


def test_new_entry_marker_and_form_are_synced(env):
    """
    A queue made from an entry: its marker and C{form.json} link are
    synced with the queue directory, and it is set UP (C{config/}
    synced) once it exists.
    """
    instance, spawner, clock, service, tmp_path = env
    target = make_dir(tmp_path, "app", form={"fields": []})
    link(instance, "app", target)
    rounds, synced = held_rounds(instance)
    scan_once(service, clock)
    qdir = instance.root.queue_path("app")
    rounds.run()
    assert "app" in instance.queues
    assert {os.path.join(qdir, MARKER), os.path.join(qdir, "config.json"), qdir} <= set(synced)
    assert instance.root.join("config") in synced
    assert open(os.path.join(qdir, MARKER)).read() == "app\n"


def test_bad_json_is_reported_and_queue_kept(env):
    instance, spawner, clock, service, tmp_path = env
    target = make_dir(tmp_path, "app", config={"num_workers": 2})
    link(instance, "app", target)
    scan_once(service, clock)
    (target / "config.json").write_text("{oops")
    clock.advance(SCAN_INTERVAL)
    assert instance.queue("app").config.num_workers == 2
    [status] = service.status()
    assert status["error"].startswith("cannot read") and "config.json" in status["error"]


def test_removed_entry_deletes_its_queue(env):
    instance, spawner, clock, service, tmp_path = env
    target = make_dir(tmp_path, "app")
    link(instance, "app", target)
    scan_once(service, clock)
    os.unlink(instance.root.join("scandir", "app"))
    clock.advance(SCAN_INTERVAL)
    assert "app" not in instance.queues
    assert not os.path.exists(instance.root.queue_path("app"))
    assert [n for n in os.listdir(instance.root.queue_dir) if n.startswith("app.deleted.")]
    assert service.status() == []


@pytest.mark.parametrize("how", ["moved", "unreadable"])
def test_unlistable_scandir_deletes_nothing(env, monkeypatch, how):
    """
    A C{scandir/} that cannot be listed (moved away for a moment, an
    unmounted or unreadable directory) is not "every entry removed": the
    queues it made, and their messages, stay; scans go on and pick the
    entries up again once it can be listed.
    """
    instance, spawner, clock, service, tmp_path = env
    link(instance, "app", make_dir(tmp_path, "app"))
    scan_once(service, clock)
    assert "app" in instance.queues
    directory = instance.root.join("scandir")
    if how == "moved":
        os.rename(directory, directory + ".away")
    else:
        listdir = os.listdir

        def refuse(path):
            if path == directory:
                raise PermissionError(13, "Permission denied", path)
            return listdir(path)

        monkeypatch.setattr(os, "listdir", refuse)
    clock.advance(SCAN_INTERVAL)
    clock.advance(SCAN_INTERVAL)
    assert "app" in instance.queues
    assert os.path.isdir(instance.root.queue_path("app"))
    if how == "moved":
        os.rename(directory + ".away", directory)
    else:
        monkeypatch.undo()
    os.unlink(os.path.join(directory, "app"))
    clock.advance(SCAN_INTERVAL)
    assert "app" not in instance.queues


def test_queue_of_entry_removed_while_stopped_is_deleted(env):
    instance, spawner, clock, service, tmp_path = env
    target = make_dir(tmp_path, "app")
    link(instance, "app", target)
    scan_once(service, clock)
    service.stopService()
    os.unlink(instance.root.join("scandir", "app"))
    again = ScandirService(instance, clock)
    scan_once(again, clock)
    assert "app" not in instance.queues


def test_other_queues_are_never_deleted(env):
    instance, spawner, clock, service, tmp_path = env
    instance.create_queue({"name": "mine", "script": "./code/noop"})
    scan_once(service, clock)
    clock.advance(SCAN_INTERVAL)
    assert "mine" in instance.queues


def test_existing_queue_is_adopted_and_set_up(env):
    instance, spawner, clock, service, tmp_path = env
    instance.create_queue({"name": "app", "script": "./code/noop", "num_workers": 5})
    instance.set_admin("down", "app")
    target = make_dir(tmp_path, "app")
    link(instance, "app", target)
    scan_once(service, clock)
    queue = instance.queue("app")
    assert queue.status() == "UP"
    assert queue.config.script == os.path.realpath(target / "run")
    assert queue.config.num_workers == 1


def test_entry_without_run_is_reported(env):
    instance, spawner, clock, service, tmp_path = env
    target = make_dir(tmp_path, "app", executable=False)
    link(instance, "app", target)
    os.symlink(tmp_path / "missing", instance.root.join("scandir", "gone"))
    scan_once(service, clock)
    assert "app" not in instance.queues and "gone" not in instance.queues
    status = {s["name"]: s for s in service.status()}
    assert status["app"]["error"].startswith("no executable run")
    assert status["gone"]["error"].endswith("is not a directory")
    # Made executable: picked up at the next scan.
    os.chmod(target / "run", 0o755)
    clock.advance(SCAN_INTERVAL)
    assert "app" in instance.queues


def test_reload_rescans(env):
    instance, spawner, clock, service, tmp_path = env
    instance.reloadHooks.append(service.scan)
    link(instance, "app", make_dir(tmp_path, "app"))
    instance.reload()
    assert "app" in instance.queues


def test_stop_cancels_everything(env):
    instance, spawner, clock, service, tmp_path = env
    service.startService()
    service.stopService()
    clock.advance(SCAN_INTERVAL * 3)
    assert service.entries == {}
    scan_once(service, clock)
    service.stopService()
    assert not service._loop


def test_entry_linking_a_config_file(env):
    instance, spawner, clock, service, tmp_path = env
    config = tmp_path / "q.json"
    config.write_text(json.dumps({"name": "ignored", "script": "./code/noop", "num_workers": 2}))
    link(instance, "filed", config)
    scan_once(service, clock)
    queue = instance.queue("filed")
    assert queue.config.script == "./code/noop" and queue.config.num_workers == 2
    config.write_text(json.dumps({"script": "./code/noop", "num_workers": 3}))
    os.utime(config, ns=(1, 1))
    clock.advance(SCAN_INTERVAL)
    assert instance.queue("filed").config.num_workers == 3
    config.write_text(json.dumps({"num_workers": 3}))
    os.utime(config, ns=(2, 2))
    clock.advance(SCAN_INTERVAL)
    assert "missing script" in service.status()[0]["error"]
    assert instance.queue("filed").config.num_workers == 3
