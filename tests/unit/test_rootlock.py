"""
Tests for L{rqtwisted.rootlock}: one daemon per root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rqtwisted import rootlock
from rqtwisted.root import Root
from rqtwisted.rootlock import LOCK_DIR, LOCK_FILE, RootLocked, lock_root

PROJECT = str(Path(__file__).resolve().parents[2])

HOLDER = textwrap.dedent(
    """
    import sys
    from rqtwisted.root import Root
    from rqtwisted.rootlock import lock_root
    lock_root(Root(sys.argv[1]))
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def holder(root: Path) -> subprocess.Popen[str]:
    """
    Another process that takes the lock of C{root} and keeps it until its
    stdin is closed.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT, env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "locked\n"
    return process


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Root:
    (tmp_path / "config").mkdir()
    # Locks taken by this process in other tests stay out of the way.
    monkeypatch.setattr(rootlock, "_held", {})
    return Root(str(tmp_path))


def test_lock_is_kept_and_names_its_holder(root: Root) -> None:
    """
    The lock is taken once per process (the same fd again), close-on-exec,
    with our pid in the file.
    """
    fd = lock_root(root)
    assert lock_root(root) == fd
    assert os.get_inheritable(fd) is False
    assert os.readlink(f"/proc/self/fd/{fd}") == root.join(LOCK_DIR)
    assert Path(root.join(LOCK_FILE)).read_text() == str(os.getpid())


def test_another_process_is_refused_while_the_holder_lives(root: Root) -> None:
    """
    While another process holds the lock, taking it fails with that
    process's pid; once that process is gone (however it ended), the lock
    is free: nothing stale is left.
    """
    other = holder(Path(root.path))
    try:
        with pytest.raises(RootLocked) as e:
            lock_root(root)
        assert e.value.pid == other.pid
        assert "another rq daemon runs on this root" in str(e.value)
        assert f"pid {other.pid}" in str(e.value)
    finally:
        other.kill()
        other.wait()
    fd = lock_root(root)
    assert Path(root.join(LOCK_FILE)).read_text() == str(os.getpid())
    os.close(fd)


@pytest.mark.parametrize("replace", [False, True])
def test_the_lock_outlives_its_pid_file(root: Root, replace: bool) -> None:
    """
    The lock is the C{config/} directory's, not the pid file's: with
    C{config/rq.lock} removed (or replaced by another file), a second
    process is still refused while the holder lives.
    """
    other = holder(Path(root.path))
    try:
        os.unlink(root.join(LOCK_FILE))
        if replace:
            Path(root.join(LOCK_FILE)).write_text("")
        with pytest.raises(RootLocked) as e:
            lock_root(root)
        assert e.value.pid is None
        assert "another rq daemon runs on this root (pid unknown;" in str(e.value)
    finally:
        other.kill()
        other.wait()
    os.close(lock_root(root))
    assert Path(root.join(LOCK_FILE)).read_text() == str(os.getpid())


def test_a_child_given_the_fd_keeps_the_lock(root: Root) -> None:
    """
    A child that inherits the lock's fd (the watchdog) holds the lock
    with us: it stays taken after we let go, until the child ends too.
    """
    fd = lock_root(root)
    child = subprocess.Popen(["sleep", "30"], pass_fds=(fd,))
    try:
        os.close(fd)
        rootlock._held.clear()
        with pytest.raises(RootLocked):
            lock_root(root)
    finally:
        child.kill()
        child.wait()
    os.close(lock_root(root))
