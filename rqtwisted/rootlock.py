"""
One daemon per root: an exclusive lock held for the daemon's whole life.

The lock is a C{flock} on C{config/rq.lock}, taken before the daemon
touches any message and never let go: the kernel drops it when the process
ends, however it ends (a C{SIGKILL} leaves nothing stale behind, whatever
pid the system hands out next). The daemon gives the lock's fd to its
watchdog too (L{rqtwisted.worker.Watchdog}): the lock then lasts until the
workers of a killed daemon are gone. So a second daemon cannot start on
the root while the first still runs, shuts down (its workers get their
grace period) or is being cleaned up after, which would run the same
messages twice and lose their pid files.
"""

from __future__ import annotations

import errno
import fcntl
import os

from rqtwisted.root import Root

#: The lock file, below the root.
LOCK_FILE = os.path.join("config", "rq.lock")

#: Roots this process holds the lock of: lock file path -> its fd. A
#: process that builds the daemon's services again (tests do) keeps the
#: lock it has.
_held: dict[str, int] = {}


class RootLocked(Exception):
    """
    Another process holds the root's lock.

    @ivar path: the lock file.
    @ivar pid: the pid written in it (the daemon that took it), if any.
    """

    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"another rq daemon runs on this root ({holder}; the workers of one that was killed may"
            f" still be ending): {path} is locked"
        )
        self.path = path
        self.pid = pid


def lock_root(root: Root) -> int:
    """
    Take the lock of C{root} for the rest of this process's life and write
    our pid in it.

    @return: the lock file's fd (close-on-exec), for a child that must hold
        the lock as long as it runs.
    @raise RootLocked: another process holds it.
    @raise OSError: the lock file cannot be opened.
    """
    path = root.join(LOCK_FILE)
    fd = _held.get(path)
    if fd is not None:
        return fd
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        pid = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RootLocked(path, pid) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
    _held[path] = fd
    return fd


def _holder(fd: int) -> int | None:
    """
    The pid written in the lock file, if it holds one.
    """
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
