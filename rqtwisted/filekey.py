"""
Whether a file changed: the one fingerprint every poller of the root uses.

The config watcher (C{queue/*/config.json}), the timers (C{timers/*.json}),
scandir (its entries' C{config.json} and C{run}) and the router (its rules
file) re-read a file only when its L{file_key} differs from the one they saw
last. This module imports nothing of Twisted: the router's is used by
C{rq verify_rules}.
"""

from __future__ import annotations

import os

#: C{(size, mtime in nanoseconds, inode)}.
FileKey = tuple[int, int, int]


def file_key(path: str) -> FileKey | None:
    """
    The fingerprint of the file at C{path} (symlinks followed), or C{None}
    when it cannot be stat'ed (missing, a dangling link, no permission).

    Editing the file in place changes its size or mtime; replacing it by a
    rename (as editors and L{rqtwisted.durable} do) changes its inode.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)
