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
from typing import TYPE_CHECKING, Any

from twisted.application.internet import TimerService
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rqtwisted.filekey import FileKey, file_key
from rqtwisted.message import valid_queue_name

if TYPE_CHECKING:
    from rqtwisted.supervisor import Instance

_log = Logger()

#: Seconds between polls.
POLL_INTERVAL = 2.0

#: Queue name -> the key of its config.json (None: unreadable).
Snapshot = dict[str, FileKey | None]


def snapshot(queue_dir: str) -> Snapshot:
    """
    C{{name: L{file_key} of its config.json}} for each validly named entry
    of C{queue_dir}.
    """
    try:
        names = os.listdir(queue_dir)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: Snapshot = {}
    for name in names:
        if not valid_queue_name(name):
            continue
        out[name] = file_key(os.path.join(queue_dir, name, "config.json"))
    return out


class ConfigWatcher(TimerService):
    """
    Reloads queue configs when their files change: L{poll} every
    C{interval} seconds from start.
    """

    def __init__(self, instance: "Instance", clock: IReactorTime, interval: float = POLL_INTERVAL) -> None:
        """
        @param instance: the queues.
        @param clock: time source.
        @param interval: seconds between polls.
        """
        super().__init__(interval, self.poll)
        self.clock = clock
        self.instance = instance
        self._last: Snapshot | None = None

    def stopService(self) -> Any:
        """
        Stop polling; the next start takes a fresh first snapshot.
        """
        self._last = None
        return super().stopService()

    def poll(self) -> bool:
        """
        Reload if anything changed since the last poll; C{True} if it did.
        The first poll after start only takes the snapshot.
        """
        current = snapshot(self.instance.root.queue_dir)
        if self._last is None or current == self._last:
            self._last = current
            return False
        self._last = current
        d = maybeDeferred(self.instance.reload_configs)
        d.addErrback(lambda f: _log.failure("config reload failed", f))
        return True
