"""
File operations by path, without Twisted: C{fsync} (C{rq init} syncs the
root it lays out with it; L{rqtwisted.durable.Syncer} runs these in a
thread, grouped), the removal of a file that may be gone already, and the
read of a file that never waits on a FIFO (L{read_file}), with a cap on the
size of a config file (L{read_config}).
"""

from __future__ import annotations

import errno
import os
from typing import Iterable

#: Flags that keep an C{open} from waiting: a FIFO put where a file of a
#: message is expected (a queue script can write its message directory)
#: would block a blocking C{open} until somebody opened its other end.
NONBLOCKING = os.O_NONBLOCK | os.O_CLOEXEC

#: The largest config file read (timers, scandir entries, queue configs): a
#: config is a few hundred bytes, and it is read on the reactor thread, so a
#: huge file (or an endless one, a link to a device) must not stall it.
CONFIG_LIMIT = 1 << 20


class FileTooLarge(ValueError):
    """
    A file holds more than a reader takes (L{read_file}'s C{limit}); its
    message is the reason, C{too large: over <limit>}.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"too large: over {_size(limit)}")
        self.limit = limit


def _size(count: int) -> str:
    """
    C{count} bytes for a person: C{"1 MiB"}, C{"4 KiB"}, C{"100 bytes"}.
    """
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} bytes"


def read_file(path: str, limit: int | None = None) -> bytes:
    """
    The content of the file C{path}, read without ever waiting for a
    writer (see L{NONBLOCKING}).

    @param limit: the most bytes taken: no more than C{limit + 1} are read,
        and a file with more is refused (L{None}: no limit).
    @raise OSError: it cannot be read (C{BlockingIOError} for a FIFO with a
        writer that wrote nothing).
    @raise FileTooLarge: it holds more than C{limit} bytes.
    """
    want = -1 if limit is None else limit + 1
    fd = os.open(path, os.O_RDONLY | NONBLOCKING)
    try:
        chunks = []
        got = 0
        while want < 0 or got < want:
            chunk = os.read(fd, 65536 if want < 0 else min(65536, want - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    if limit is not None and got > limit:
        raise FileTooLarge(limit)
    return b"".join(chunks)


def read_config(path: str) -> bytes:
    """
    The content of the config file C{path}: L{read_file} with the limit
    L{CONFIG_LIMIT}.

    @raise OSError: it cannot be read.
    @raise FileTooLarge: it holds more than L{CONFIG_LIMIT} bytes.
    """
    return read_file(path, CONFIG_LIMIT)


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
