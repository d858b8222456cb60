"""
File operations by path, without Twisted: C{fsync} (C{rq init} syncs the
root it lays out with it; L{rqtwisted.durable.Syncer} runs these in a
thread, grouped), the removal of a file that may be gone already, and the
read of a file that never waits on a FIFO (L{read_file}).
"""

from __future__ import annotations

import errno
import os
from typing import Iterable

#: Flags that keep an C{open} from waiting: a FIFO put where a file of a
#: message is expected (a queue script can write its message directory)
#: would block a blocking C{open} until somebody opened its other end.
NONBLOCKING = os.O_NONBLOCK | os.O_CLOEXEC


def read_file(path: str) -> bytes:
    """
    The content of the file C{path}, read without ever waiting for a
    writer (see L{NONBLOCKING}).

    @raise OSError: it cannot be read (C{BlockingIOError} for a FIFO with a
        writer that wrote nothing).
    """
    fd = os.open(path, os.O_RDONLY | NONBLOCKING)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """
    C{fsync} a file or directory by path.
    """
    fd = os.open(path, os.O_RDONLY | NONBLOCKING)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    """
    Unlink C{path} if it is there.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sync_paths(paths: Iterable[str]) -> None:
    """
    C{fsync} every path that still exists (a directory renamed away since it
    was queued has had its entry synced by its new parent's sync), and that
    can be synced (not a FIFO or socket put in place of a file).
    """
    for path in paths:
        try:
            fsync_path(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
