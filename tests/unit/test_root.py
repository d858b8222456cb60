"""
Tests for L{rqtwisted.root}: ports, the config of a root, laying a root out
and queue directories.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rqtwisted import root as root_module
from rqtwisted.fsync import CONFIG_LIMIT
from rqtwisted.root import (
    DEFAULT_QUEUES,
    ConfigError,
    QueueConfig,
    Root,
    RootConfig,
    create_queue_dir,
    init_root,
    make_dirs,
    parse_port,
)


@pytest.mark.parametrize("value, expected", [(0, 0), (3333, 3333), (65535, 65535), ("80", 80), (" 80 ", 80)])
def test_parse_port(value: object, expected: int) -> None:
    """
    Integers and decimal text from 0 to 65535 are ports.
    """
    assert parse_port(value) == expected


@pytest.mark.parametrize("value", [-1, 65536, 99999, "abc", "", "3.5", "+80", "8_0", "\u0663", True, None, 80.0])
def test_parse_port_refuses(value: object) -> None:
    """
    Anything else is refused, out-of-range numbers included.
    """
    with pytest.raises(ValueError):
        parse_port(value)


@pytest.mark.parametrize("port", [99999, "abc", -5])
def test_config_with_invalid_port(port: object) -> None:
    """
    A config.json whose port cannot be listened on is refused when read.
    """
    with pytest.raises(ConfigError, match="config.json has an invalid port"):
        RootConfig.fromDict({"host": "h", "port": port})


@pytest.mark.parametrize("port", ["abc", "99999", 70000])
def test_init_root_checks_port_first(tmp_path, port: object) -> None:
    """
    An invalid port is refused before anything is created.
    """
    root = tmp_path / "root"
    with pytest.raises(ConfigError) as info:
        init_root(str(root), port=port)
    assert info.value.reason == f"--port must be an integer from 0 to 65535, not {port!r}"
    assert not root.exists()


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """
    The paths L{init_root} fsyncs, in order.
    """
    paths: list[str] = []
    monkeypatch.setattr(root_module, "sync_paths", lambda given: paths.extend(given))
    return paths


def test_init_root_is_on_disk_when_it_returns(tmp_path: Path, synced: list[str]) -> None:
    """
    A root laid out by C{rq init} is fsynced before it returns: every
    directory that gained an entry (from the parent of the new root down to
    each default queue's directory) and the scripts it wrote.
    """
    root = init_root(str(tmp_path / "new" / "root"), host="h")
    expected = {
        str(tmp_path),
        str(tmp_path / "new"),
        root.path,
        root.join("config"),
        root.join("code"),
        root.queue_dir,
    }
    for name in DEFAULT_QUEUES:
        expected |= {root.queue_path(name), root.join("code", f"{name}_script")}
    assert expected <= set(synced)
    assert all(os.path.exists(p) for p in synced)


def test_make_dirs_names_the_directories_it_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    L{make_dirs} makes the missing directories and names the parent of
    each one it made (absolute); nothing when all are there. A file in the
    way is an error.
    """
    assert make_dirs(str(tmp_path / "a" / "b")) == [str(tmp_path), str(tmp_path / "a")]
    assert (tmp_path / "a" / "b").is_dir()
    assert make_dirs(str(tmp_path / "a" / "b")) == []
    monkeypatch.chdir(tmp_path)
    assert make_dirs("c") == [str(tmp_path)]
    (tmp_path / "f").write_text("")
    with pytest.raises(FileExistsError):
        make_dirs(str(tmp_path / "f"))


def test_create_queue_dir_names_what_to_sync(tmp_path: Path) -> None:
    """
    L{create_queue_dir} returns the directories to sync for the queue to
    last: C{queue/} and the queue's own directory.
    """
    root = Root(str(tmp_path))
    (tmp_path / "queue").mkdir()
    changed = create_queue_dir(root, QueueConfig(name="q", script="./code/noop"))
    assert set(changed) == {root.queue_dir, root.queue_path("q")}
    assert sorted(os.listdir(root.queue_path("q"))) == sorted(
        ["config.json", "prep", "que", "run", "done", "relayed", "err", "tmp"]
    )


@pytest.mark.parametrize("workers", [float("inf"), float("-inf"), float("nan"), "many", 0, 129])
def test_queue_config_with_invalid_num_workers(workers: object) -> None:
    with pytest.raises(ConfigError, match="invalid num_workers field"):
        QueueConfig.fromDict({"name": "q", "script": "./code/x", "num_workers": workers})


def test_queue_config_fifo_is_unreadable(tmp_path: Path, no_hang: None) -> None:
    """
    A FIFO as a queue's C{config.json} is an unreadable config, without
    waiting for a writer (which blocked the whole daemon at a reload).
    """
    root = Root(str(tmp_path))
    os.makedirs(root.queue_path("q"))
    os.mkfifo(os.path.join(root.queue_path("q"), "config.json"))
    with pytest.raises(ConfigError, match="could not read queue config"):
        root.load_queue_config("q")


def test_queue_config_too_large_is_unreadable(tmp_path: Path) -> None:
    """
    A queue's C{config.json} over L{CONFIG_LIMIT} (valid JSON padded with
    spaces) is an unreadable config, with the reason, not read whole on the
    reactor thread (a reload reads it there); one of exactly the limit is
    read.
    """
    root = Root(str(tmp_path))
    os.makedirs(root.queue_path("q"))
    path = os.path.join(root.queue_path("q"), "config.json")
    text = '{"name": "q", "script": "./code/x", "num_workers": 1}'
    with open(path, "w") as f:
        f.write(text + " " * (CONFIG_LIMIT + 1 - len(text)))
    with pytest.raises(ConfigError, match=r"could not read queue config .*: too large: over 1 MiB$"):
        root.load_queue_config("q")
    with open(path, "w") as f:
        f.write(text + " " * (CONFIG_LIMIT - len(text)))
    assert root.load_queue_config("q").num_workers == 1


def test_root_config_too_large_or_fifo_is_unreadable(tmp_path: Path, no_hang: None) -> None:
    """
    The root's C{config/config.json} is read like a queue's: one over
    L{CONFIG_LIMIT} is refused with the reason, a FIFO without waiting for
    a writer.
    """
    root = Root(str(tmp_path))
    os.makedirs(os.path.dirname(root.config_path))
    text = '{"host": "127.0.0.1", "port": 3333}'
    with open(root.config_path, "w") as f:
        f.write(text + " " * (CONFIG_LIMIT + 1 - len(text)))
    with pytest.raises(ConfigError, match=r"cannot read .*: too large: over 1 MiB$"):
        root.load_config()
    os.unlink(root.config_path)
    os.mkfifo(root.config_path)
    with pytest.raises(ConfigError, match="cannot read"):
        root.load_config()
