"""
C{fsync} by path, without Twisted (C{rq init} syncs the root it lays out
with it). L{rqtwisted.durable.Syncer} runs these in a thread, grouped.
"""

from __future__ import annotations

import os
from typing import Iterable


def fsync_path(path: str) -> None:
    """
    C{fsync} a file or directory by path.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_paths(paths: Iterable[str]) -> None:
    """
    C{fsync} every path that still exists (a directory renamed away since it
    was queued has had its entry synced by its new parent's sync).
    """
    for path in paths:
        try:
            fsync_path(path)
        except FileNotFoundError:
            pass
