"""
C{twistd rq}: options and the service tree of one running root.

C{makeService} opens (or lays out) the root, takes its lock (one daemon per
root: L{rqtwisted.rootlock}) and builds::

    MultiService
     ├── Instance          the queues (rqtwisted.supervisor)
     ├── admin socket      AMP on <root>/config/rq.sock, mode 0600
     ├── web               HTTP on addr:port (rqtwisted.web.app)
     ├── pid file          config/queuemgr.pid
     ├── watchdog          kills workers if this process dies hard (holds the lock too)
     ├── SIGHUP            reloads queue configs, rescans timers/ and scandir/
     ├── config watcher    reloads changed queue configs (rqtwisted.configwatch)
     ├── timers            periodic messages of timers/ (rqtwisted.timers)
     └── scandir           queues made from scandir/ (rqtwisted.scandir)
"""

from __future__ import annotations

import gc
import os
import signal
import stat
from functools import partial
from typing import Any, Callable

from twisted.application.internet import TCPServer
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.python import usage

from rqtwisted.admin import AdminAPI, AdminFactory, AdminServer
from rqtwisted.admincommands import SOCKET, SPILL_DIR
from rqtwisted.configwatch import ConfigWatcher
from rqtwisted.durable import syncer_for
from rqtwisted.fsync import remove_quietly, sync_paths
from rqtwisted.root import ConfigError, Root, RootConfig, ensure_root, make_dirs, parse_port, port_error
from rqtwisted.rootlock import RootLocked, lock_root
from rqtwisted.scandir import ScandirService
from rqtwisted.supervisor import Instance
from rqtwisted.threads import fsync_pool
from rqtwisted.timers import TimerService
from rqtwisted.web.app import make_site
from rqtwisted.worker import Watchdog, spawn_worker


class Options(usage.Options):
    """
    Command-line options of C{twistd rq}.
    """

    optParameters = [
        ["root", "r", None, "RQ root directory (default: $RQ_ROOT, else the current directory)."],
        ["host", None, None, "Host name in full message ids (overrides config.json)."],
        ["port", "p", None, "Web port (overrides config.json)."],
        ["addr", "a", None, "Web listen address (overrides config.json)."],
        ["env", "e", None, "Environment name, exported as RQ_ENV (overrides config.json)."],
    ]

    def postOptions(self) -> None:
        """
        Resolve the root directory; check C{--port} (L{parse_port}).

        @raise usage.UsageError: C{--port} is not a port.
        """
        self["root"] = os.path.abspath(self["root"] or os.environ.get("RQ_ROOT") or os.getcwd())
        if self["port"] is not None:
            try:
                self["port"] = parse_port(self["port"])
            except ValueError:
                raise usage.UsageError(port_error("--port", self["port"]))


class PidFileService(Service):
    """
    Writes C{config/queuemgr.pid} while running (the web and C{rq-mgr}
    tools read it) and removes it on stop.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def startService(self) -> None:
        """
        Write our pid.
        """
        with open(self.path, "w") as f:
            f.write(f"{os.getpid()}\n")
        super().startService()

    def stopService(self) -> None:
        """
        Remove the pid file.
        """
        super().stopService()
        remove_quietly(self.path)


class ReloadOnHangup(Service):
    """
    SIGHUP re-reads queue configs and queue directories (like C{rq reload}).
    """

    def __init__(self, reactor: Any, instance: Instance) -> None:
        self.reactor = reactor
        self.instance = instance

    def startService(self) -> None:
        """
        Install the SIGHUP handler.
        """
        super().startService()
        signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        """
        Restore the default SIGHUP handling.
        """
        super().stopService()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    def _hangup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.instance.reload)


class WatchdogService(Service):
    """
    Runs the L{Watchdog} for the life of the daemon, and of its workers.
    """

    def __init__(self, watchdog: Watchdog, workersEnded: Callable[[], Deferred[None]]) -> None:
        """
        @param workersEnded: called when the daemon stops: a L{Deferred}
            fired once every worker has ended.
        """
        self.watchdog = watchdog
        self._workersEnded = workersEnded

    def startService(self) -> None:
        """
        Start the watchdog process.
        """
        super().startService()
        self.watchdog.start()

    def stopService(self) -> Any:
        """
        Stop it without killing anything, once the queues have ended their
        workers (until then a C{kill -9} of the daemon, in the middle of its
        shutdown, must still see them killed); fires when the watchdog has
        exited.
        """
        super().stopService()
        return self._workersEnded().addCallback(lambda _: self.watchdog.stop())


def command_line_overrides(options: Options) -> dict[str, Any]:
    """
    The settings given on the command line, which outrank C{config.json}.
    """
    return {k: options[k] for k in ("host", "port", "addr", "env") if options[k] is not None}


class WebServer(TCPServer):
    """
    The web server's service. Asked for port 0 (any free port), it tells
    the instance the port it got, so that full ids, C{RQ_HOST} and the
    pages name a port that answers.
    """

    def __init__(self, instance: Instance, port: int, factory: Any, **kwargs: Any) -> None:
        super().__init__(port, factory, **kwargs)
        self._instance = instance

    def privilegedStartService(self) -> None:
        """
        Listen (before privileges are dropped), then adopt the port.

        @raise SystemExit: the address cannot be listened on (a port in
            use, an address this host does not have): one line, no
            traceback.
        """
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"rq: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}") from None
        self._adopt_port()

    def startService(self) -> None:
        """
        Listen if not yet done, then adopt the port.
        """
        super().startService()
        self._adopt_port()

    def _adopt_port(self) -> None:
        instance = self._instance
        port = getattr(self, "_port", None)
        if port is None:
            return
        # It stays the port, whatever config.json says after a restart.
        number = port.getHost().port
        instance.overrides["port"] = number
        if instance.settings.port == 0:
            instance.settings = RootConfig.fromDict({**instance.settings.raw, "port": number})


def remove_stale_socket(path: str) -> None:
    """
    Remove the admin socket a dead daemon left at C{path} (and the lock
    link Twisted made beside it in earlier versions), so that ours can be
    made there. Only for the holder of the root's lock.
    """
    for stale, kind in ((path, stat.S_ISSOCK), (path + ".lock", stat.S_ISLNK)):
        try:
            if kind(os.lstat(stale).st_mode):
                os.unlink(stale)
        except FileNotFoundError:
            pass


def exit_zero_after_shutdown(reactor: Any) -> None:
    """
    After an orderly shutdown on SIGTERM/SIGINT the daemon exits 0, as the
    original supervisor does (queues.md) and service managers expect; twistd
    would otherwise re-raise the signal it stopped on.
    """

    def clear() -> None:
        if getattr(reactor, "_exitSignal", None) is not None:
            reactor._exitSignal = None

    reactor.addSystemEventTrigger("after", "shutdown", clear)


def add_watchers(top: MultiService, instance: Instance, clock: Any) -> None:
    """
    Add the services that follow the root's files: queue configs
    (L{ConfigWatcher}), C{timers/} (L{TimerService}) and C{scandir/}
    (L{ScandirService}). C{rq reload} rescans the last two; C{rq status}
    shows them under C{"timers"} and C{"scandir"}.
    """
    ConfigWatcher(instance, clock).setServiceParent(top)

    def send(fields: dict[str, Any]) -> Any:
        return instance.create_message(fields, "commit", relay_ok=True)

    timers = TimerService(instance.root.join("timers"), send, clock)
    timers.setName("timers")
    timers.setServiceParent(top)
    scandir = ScandirService(instance, clock)
    scandir.setName("scandir")
    scandir.setServiceParent(top)
    instance.reloadHooks.extend([scandir.scan, timers.rescan])
    instance.statusProviders["timers"] = timers.status
    instance.statusProviders["scandir"] = scandir.status


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the service tree of one root (see the module docstring).
    """
    if reactor is None:
        from twisted.internet import reactor  # the one place that imports it
    # The lock first: two daemons started at once on a new root must not
    # both lay it out (the loser's options would end up in its config).
    root = Root(options["root"])
    try:
        sync_paths(make_dirs(root.join("config")))
        lock = lock_root(root)
    except RootLocked as e:
        raise SystemExit(f"rq: {e}")
    except OSError as e:
        raise SystemExit(f"rq: cannot use {root.path}: {e}")
    root = ensure_root(
        options["root"],
        host=options["host"],
        port=options["port"],
        env=options["env"],
        addr=options["addr"],
    )
    overrides = command_line_overrides(options)
    try:
        settings = root.load_config(overrides)
    except ConfigError as e:
        raise SystemExit(f"rq: {e.reason}")
    # Ours now: whatever socket is there was left by a daemon that died.
    remove_stale_socket(root.join(SOCKET))
    top = MultiService()
    top.setName("rq")
    syncer = syncer_for(root.path, partial(fsync_pool, reactor))
    instance = Instance(root, settings, reactor, syncer, partial(spawn_worker, reactor), ready_workers=True)
    instance.overrides.update(overrides)
    instance.setName("instance")
    instance.setServiceParent(top)
    PidFileService(root.join("config", "queuemgr.pid")).setServiceParent(top)
    admin = AdminServer(
        root.join(SOCKET),
        AdminFactory(AdminAPI(instance), root.join(SPILL_DIR), reactor),
        reactor,
        mode=0o600,
    )
    admin.setServiceParent(top)
    web = WebServer(instance, settings.port, make_site(instance, settings, reactor), interface=settings.addr,
                    reactor=reactor)
    web.setName("web")
    web.setServiceParent(top)
    WatchdogService(Watchdog(reactor, root.path, lock_fd=lock), instance.whenStopped).setServiceParent(top)
    ReloadOnHangup(reactor, instance).setServiceParent(top)
    add_watchers(top, instance, reactor)
    exit_zero_after_shutdown(reactor)
    reactor.callWhenRunning(settle_heap)
    return top


#: Allocations (less deallocations) between two young-generation collections
#: of the cyclic garbage collector, once the daemon runs (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """
    Once everything is loaded: move every object alive now (modules,
    classes, the service tree) out of the cyclic collector's reach with
    C{gc.freeze}, and collect young objects less often. Each message makes
    a few hundred short-lived objects; with CPython's defaults the collector
    ran every few messages and its older generations walked the whole
    imported Twisted, a few percent of the reactor's time. Reference
    counting still frees nearly everything at once; cycles wait a little
    longer.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
