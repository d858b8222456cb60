"""
Queue config changes without a restart: L{ConfigWatcher} polls the queue
directories and their C{config.json} files and reloads when they change.

Every L{POLL_INTERVAL} seconds it lists C{queue/} and stats each
C{queue/<name>/config.json} (following symlinks: C{create_queue_link} and
scandir configs are links). When the set of directories or any file's size,
mtime or inode differs from the last poll, it calls
L{rqtwisted.supervisor.Instance.reload_configs}, which applies changed
configs in place, starts new queues, stops removed ones, and keeps the old
config of a queue whose new one is invalid (reported in C{rq status}).
C{rq reload} and SIGHUP do the same at once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rqtwisted.message import valid_queue_name

if TYPE_CHECKING:
    from rqtwisted.supervisor import Instance

_log = Logger()

#: Seconds between polls.
POLL_INTERVAL = 2.0

Snapshot = dict[str, "tuple[int, int, int] | None"]


def snapshot(queue_dir: str) -> Snapshot:
    """
    C{{name: (size, mtime_ns, inode) of its config.json, or None}} for each
    validly named entry of C{queue_dir}.
    """
    try:
        names = os.listdir(queue_dir)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: Snapshot = {}
    for name in names:
        if not valid_queue_name(name):
            continue
        try:
            st = os.stat(os.path.join(queue_dir, name, "config.json"))
        except OSError:
            out[name] = None
            continue
        out[name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


class ConfigWatcher(Service):
    """
    Reloads queue configs when their files change.
    """

    def __init__(self, instance: "Instance", clock: IReactorTime, interval: float = POLL_INTERVAL) -> None:
        """
        @param instance: the queues.
        @param clock: time source.
        @param interval: seconds between polls.
        """
        self.instance = instance
        self.clock = clock
        self.interval = interval
        self._last: Snapshot | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        """
        Take the first snapshot now, poll every L{interval} seconds.
        """
        super().startService()
        self._last = snapshot(self.instance.root.queue_dir)
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(lambda f: _log.failure("config polling stopped", f))

    def stopService(self) -> None:
        """
        Stop polling.
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def poll(self) -> bool:
        """
        Reload if anything changed since the last poll; C{True} if it did.
        """
        current = snapshot(self.instance.root.queue_dir)
        if current == self._last:
            return False
        self._last = current
        d = self.instance.reload_configs()
        d.addErrback(lambda f: _log.failure("config reload failed", f))
        return True
