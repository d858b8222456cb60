"""
One daemon per root: an exclusive lock held for the daemon's whole life.

The lock is a C{flock} on the root's C{config/} directory itself (through a
read-only fd of the directory), taken before the daemon touches any message
and never let go: the kernel drops it when the process ends, however it ends
(a C{SIGKILL} leaves nothing stale behind, whatever pid the system hands out
next). The directory goes only with the root's config, so a second daemon
always meets the lock; a lock on a file in it would go with the file (a
second daemon would create a new one and lock that). The daemon gives the
lock's fd to its watchdog too (L{rqtwisted.worker.Watchdog}): the lock then
lasts until the workers of a killed daemon are gone. So a second daemon
cannot start on the root while the first still runs, shuts down (its
workers get their grace period) or is being cleaned up after, which would
run the same messages twice and lose their pid files.

The holder writes its pid in C{config/rq.lock}, for the message that
refuses a second daemon; that file is not the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os

from rqtwisted.root import Root

#: The directory whose lock is the root's, below the root.
LOCK_DIR = "config"

#: The file the holder writes its pid in, below the root.
LOCK_FILE = os.path.join(LOCK_DIR, "rq.lock")

#: Roots this process holds the lock of: locked directory -> its fd. A
#: process that builds the daemon's services again (tests do) keeps the
#: lock it has.
_held: dict[str, int] = {}


class RootLocked(Exception):
    """
    Another process holds the root's lock.

    @ivar path: the locked directory.
    @ivar pid: the pid written in the pid file by the daemon that took it,
        if any.
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
    our pid in L{LOCK_FILE}.

    @return: the locked directory's fd (close-on-exec), for a child that
        must hold the lock as long as it runs.
    @raise RootLocked: another process holds it.
    @raise OSError: the directory cannot be opened or locked.
    """
    path = root.join(LOCK_DIR)
    fd = _held.get(path)
    if fd is not None:
        return fd
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RootLocked(path, _holder(root.join(LOCK_FILE))) from None
        raise
    _held[path] = fd
    _write_pid(root.join(LOCK_FILE))
    return fd


def _write_pid(path: str) -> None:
    """
    Write our pid in the pid file at C{path}.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, str(os.getpid()).encode("ascii"))
    finally:
        os.close(fd)


def _holder(path: str) -> int | None:
    """
    The pid written in the pid file at C{path}, if it holds one.
    """
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
