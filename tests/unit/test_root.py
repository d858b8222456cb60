"""
Tests for L{rqtwisted.root}: laying out a root and queue directories.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rqtwisted import root as root_module
from rqtwisted.root import DEFAULT_QUEUES, QueueConfig, Root, create_queue_dir, init_root, make_dirs


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
