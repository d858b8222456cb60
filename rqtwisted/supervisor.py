"""
The supervisor: every queue of a root, and the one in-process API behind the
CLI (admin socket), the web app and the relay.

L{Instance} is a L{MultiService} with one L{QueueService} child per valid
queue directory. Like L{twisted.runner.procmon.ProcessMonitor} it restarts a
queue that fails, waiting twice as long after each failure in a row; it
creates, deletes, restarts, ups, downs, pauses and resumes queues; and it
turns requests that name messages by full id into calls on the right queue.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted import RQ_VERSION, __version__
from rqtwisted.builtin import spawner_for
from rqtwisted.durable import Syncer, replace_durably
from rqtwisted.fsync import read_config, remove_quietly
from rqtwisted.message import (
    JSON_READ_ERRORS,
    MessageError,
    creation_fields,
    dest_queue,
    is_remote_dest,
    split_full_id,
    valid_queue_name,
)
from rqtwisted.queue import QueueService
from rqtwisted.root import (
    ConfigError,
    QueueConfig,
    Root,
    RootConfig,
    json_file,
    make_queue_state_dirs,
    queue_sort_key,
)
from rqtwisted.search import DEFAULT_LIMIT as DEFAULT_SEARCH_LIMIT
from rqtwisted.search import check_query, index_for, read_forms
from rqtwisted.store import QueueStore
from rqtwisted.threads import ThreadRunner, reactor_pool
from rqtwisted.worker import Worker
from rqtwisted.webhook import install as install_webhooks

_log = Logger()

#: Back-off of queue restarts after failures: first delay, cap (seconds).
MIN_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 300.0

#: A queue that ran this long since its last failure has its back-off reset.
STABLE_AFTER = 60.0

#: The answer to a queue creation (the original's).
QUEUE_CREATED = "queue created - awesome"


class Instance(MultiService):
    """
    One RQ root, running.

    @ivar queues: the queue services by name.
    @ivar settings: the instance configuration (C{config/config.json}).
    @ivar base_env: the environment workers start from.
    @ivar ready_workers: whether a queue whose slots are all busy has the
        worker of its next due message made ready ahead (spawned, held
        before its script runs), to start it the moment a slot frees.
    """

    def __init__(
        self,
        root: Root,
        settings: RootConfig,
        clock: IReactorTime,
        syncer: Syncer,
        spawn: Callable[..., Worker],
        base_env: Mapping[str, str] | None = None,
        ready_workers: bool = False,
        run_in_thread: ThreadRunner | None = None,
    ) -> None:
        """
        @param root: the root directory.
        @param settings: its validated configuration.
        @param clock: the reactor's time functions.
        @param syncer: the group-commit syncer every store shares.
        @param spawn: launches a worker (L{rqtwisted.worker.spawn_worker}
            with the reactor bound).
        @param base_env: the workers' base environment (default: ours).
        @param ready_workers: see L{ready_workers}; C{spawn} must then take
            C{hold=True} (as L{rqtwisted.worker.spawn_worker} does).
        @param run_in_thread: runs the stores' long file work (attachments
            copied and hashed) off the reactor; default: the reactor's
            thread pool.
        """
        super().__init__()
        self.root = root
        self.settings = settings
        #: Who waits for the next stop to be over (L{whenStopped}).
        self._stopWaiters: list[Deferred[None]] = []
        #: Settings that outrank C{config/config.json} whenever it is read
        #: again (L{restart}): the command line's, and the port the web
        #: server listens on.
        self.overrides: dict[str, Any] = {}
        self.clock = clock
        self.syncer = syncer
        self.spawn = spawn
        self.ready_workers = ready_workers
        self.run_in_thread = run_in_thread if run_in_thread is not None else reactor_pool(clock)
        env = dict(os.environ if base_env is None else base_env)
        env["RQ_ENV"] = settings.env
        # So that C{rq} run by a queue script (its cwd is the job directory)
        # talks to this daemon.
        env["RQ_ROOT"] = root.path
        if settings.tmpdir:
            env["TMPDIR"] = settings.tmpdir
        self.base_env = env
        self.queues: dict[str, QueueService] = {}
        self.started_at = clock.seconds()
        self._failures: dict[str, int] = {}
        self._lastFailure: dict[str, float] = {}
        self._restarts: dict[str, IDelayedCall] = {}
        self.finishedHooks: list[Callable[[QueueService, dict[str, Any], str], None]] = []
        #: queue name -> why its C{config.json} cannot be (re)loaded.
        self.config_errors: dict[str, str] = {}
        #: Run by L{reload} (SIGHUP, C{rq reload}): rescans of C{timers/}
        #: and C{scandir/}.
        self.reloadHooks: list[Callable[[], object]] = []
        #: Extra top-level keys of L{status}: key -> provider.
        self.statusProviders: dict[str, Callable[[], Any]] = {}
        #: Queues being restarted or deleted: reloads leave them alone.
        self._busy: set[str] = set()
        #: Queues being created, their C{config.json} not in place yet.
        self._creating: set[str] = set()
        install_webhooks(self)

    # -- lifecycle

    def startService(self) -> None:
        """
        Start a queue service for each qualifying queue directory.
        """
        for name in self.root.queue_names():
            if name not in self.queues:
                self._add(name)
        super().startService()

    def stopService(self) -> Deferred[Any]:
        """
        Stop every queue (their workers are terminated).
        """
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()

        def stopped(result: object) -> object:
            waiters, self._stopWaiters = self._stopWaiters, []
            for waiter in waiters:
                waiter.callback(None)
            return result

        return maybeDeferred(super().stopService).addBoth(stopped)

    def whenStopped(self) -> Deferred[None]:
        """
        A L{Deferred} fired once the next stop of the instance is over: every
        queue has stopped, so every worker has ended.
        """
        waiter: Deferred[None] = Deferred()
        self._stopWaiters.append(waiter)
        return waiter

    def _load_config(self, name: str, refusal: str) -> QueueConfig | None:
        """
        The config of queue C{name}, or L{None} when it is bad: then it is
        kept in C{config_errors} and C{refusal} is logged with the reason
        (once per distinct reason).
        """
        try:
            config = self.root.load_queue_config(name)
        except ConfigError as e:
            if self.config_errors.get(name) != e.reason:
                _log.error(refusal, queue=name, reason=e.reason)
            self.config_errors[name] = e.reason
            return None
        self.config_errors.pop(name, None)
        return config

    def _add(self, name: str, config: QueueConfig | None = None) -> QueueService | None:
        """
        Start queue C{name} with C{config}, read now if not given; L{None}
        when it cannot be read.
        """
        if config is None:
            config = self._load_config(name, "queue {queue} not started: {reason}")
        if config is None:
            return None
        store = QueueStore(self.root.queue_path(name), self.syncer, self.clock.seconds, self.run_in_thread)
        queue = QueueService(self, config, store, self.clock, spawner_for(self, name, self.spawn))
        queue.setName(name)
        self.queues[name] = queue
        try:
            queue.setServiceParent(self)
        except Exception:
            self.queueFailed(name, Failure())
        return queue

    def _stop(self, name: str) -> Deferred[Any]:
        """
        Stop a queue's service for a restart, leaving it in L{queues} until
        it has stopped: what it is given meanwhile (new messages) goes to
        its directory, where the service that replaces it finds it, so that
        nobody is told C{Queue not found} while its workers end.
        """
        queue = self.queues.get(name)
        call = self._restarts.pop(name, None)
        if call is not None and call.active():
            call.cancel()
        if queue is None or queue.parent is None:
            return succeed(None)
        return maybeDeferred(queue.disownServiceParent)

    def _remove(self, name: str) -> Deferred[Any]:
        """
        Forget a queue at once and stop its service (see L{_stop}).
        """
        d = self._stop(name)
        self.queues.pop(name, None)
        return d

    def queueFailed(self, name: str, failure: Failure) -> None:
        """
        A queue raised: stop it and start it again after a delay that doubles
        with each failure in a row (reset once it ran L{STABLE_AFTER} s).
        """
        now = self.clock.seconds()
        if now - self._lastFailure.get(name, now) > STABLE_AFTER:
            self._failures[name] = 0
        self._lastFailure[name] = now
        count = self._failures.get(name, 0)
        self._failures[name] = count + 1
        delay = min(MIN_RESTART_DELAY * (2**count), MAX_RESTART_DELAY)
        _log.error(
            "queue {queue} failed ({reason}); restarting in {delay}s",
            queue=name,
            reason=failure.getErrorMessage(),
            delay=delay,
        )
        d = self._remove(name)
        if not self.running:
            return

        def later(_: object) -> None:
            self._restarts[name] = self.clock.callLater(delay, self._restartFailed, name)

        d.addBoth(later)

    def _restartFailed(self, name: str) -> None:
        self._restarts.pop(name, None)
        if self.running and name not in self.queues:
            self._add(name)

    def messageFinished(self, queue: QueueService, msg: dict[str, Any], state: str) -> None:
        """
        A message left run for done, err or relayed: tell the hooks
        (webhooks, relay bookkeeping).
        """
        for hook in self.finishedHooks:
            hook(queue, msg, state)

    # -- queues

    def queue(self, name: str) -> QueueService:
        """
        A running queue by name.

        @raise MessageError: C{Queue not found}.
        """
        queue = self.queues.get(name)
        if queue is None:
            raise MessageError("Queue not found")
        return queue

    def queue_names(self) -> list[str]:
        """
        Queue names, user queues first, then the built-ins.
        """
        return sorted(self.queues, key=queue_sort_key)

    def create_queue(self, data: Mapping[str, Any]) -> Deferred[str]:
        """
        Create and start a queue from a config object (queues.md): its
        directories are made, its C{config.json} is written and synced off
        the reactor thread, renamed into place (the queue starts then) and
        synced with the directories (L{replace_durably}).

        @return: fires with the answer once the new queue is on disk; fails
            with L{MessageError} C{queue not created} when it cannot start.
        @raise MessageError: with the original's replies.
        """
        if not valid_queue_name(data.get("name")):
            raise MessageError("queue name has invalid characters")
        try:
            config = QueueConfig.fromDict(dict(data))
        except ConfigError as e:
            raise MessageError(e.reason)
        name = config.name
        path = self.root.queue_path(name)
        config_path = os.path.join(path, "config.json")
        if name in self.queues or name in self._creating or os.path.exists(config_path):
            raise MessageError("already created")
        changed = make_queue_state_dirs(path)

        def start() -> None:
            if self._add(name) is None:
                raise MessageError("queue not created")

        self._creating.add(name)
        try:
            d = replace_durably(self.syncer, config_path, json_file(config.toDict()), *changed, placed=start)
        except BaseException:
            self._creating.discard(name)
            raise

        def created(result: object) -> object:
            self._creating.discard(name)
            return result

        return d.addBoth(created).addCallback(lambda _: QUEUE_CREATED)

    def create_queue_link(self, path: str) -> Deferred[str]:
        """
        Create and start a queue whose C{config.json} is a symlink to the
        config file at C{path} (absolute), validated first (queues.md).

        @return: fires with the answer once the new queue is on disk.
        @raise MessageError: with the original's replies.
        """
        try:
            data = json.loads(read_config(path))
        except JSON_READ_ERRORS as e:
            raise MessageError(f"could not read queue config [ {path} ]: {e}")
        if not isinstance(data, dict) or "name" not in data:
            raise MessageError("json config is missing name field")
        name = data["name"]
        if not isinstance(name, str):
            raise MessageError("json config has invalid name (not String)")
        if not 1 <= len(name) <= 128:
            raise MessageError("json config has invalid name (size)")
        if not valid_queue_name(name):
            raise MessageError("queue name has invalid characters")
        if "num_workers" not in data:
            raise MessageError("json config is missing num_workers field")
        script = data.get("script")
        if isinstance(script, str) and len(script) > 1024:
            raise MessageError("json config has invalid script (size)")
        if script is not None and not isinstance(script, str):
            raise MessageError("json config has invalid script (not String)")
        try:
            QueueConfig.fromDict(data)
        except ConfigError as e:
            raise MessageError(e.reason)
        if (
            name in self.queues
            or name in self._creating
            or os.path.lexists(os.path.join(self.root.queue_path(name), "config.json"))
        ):
            raise MessageError("queue is already running")
        queue_dir = self.root.queue_path(name)
        changed = make_queue_state_dirs(queue_dir)
        os.symlink(path, os.path.join(queue_dir, "config.json"))
        if self._add(name) is None:
            raise MessageError("queue not created")
        return self.syncer.sync(*changed, queue_dir).addCallback(lambda _: QUEUE_CREATED)

    def delete_queue(self, name: str) -> Deferred[str]:
        """
        Stop a queue, rename its directory to
        C{queue/<name>.deleted.<inode>} (kept, ignored) and remove its
        C{down} and C{pause} markers: a queue created again under that name
        starts up.

        @return: fires with the answer once that is on disk.
        """
        if not self._known(name):
            raise MessageError("no such queue")
        self._check_idle(name)
        path = self.root.queue_path(name)

        def rename(_: object) -> Deferred[None]:
            inode = os.stat(path).st_ino
            os.rename(path, f"{path}.deleted.{inode}")
            for kind in ("down", "pause"):
                remove_quietly(self.root.marker(name, kind))
            return self.syncer.sync(self.root.queue_dir, self.root.join("config"))

        self._busy.add(name)
        d = self._remove(name).addCallback(rename)
        d.addCallback(lambda _: "started deleting queue")
        d.addBoth(self._unbusy, name)
        return d

    def _known(self, name: str) -> bool:
        """
        Whether C{name} is a queue: running, or one on disk that is not (it
        failed and waits to be started again, say), which can still be
        administered.
        """
        return name in self.queues or (valid_queue_name(name) and name in self.root.queue_names())

    def _check_idle(self, name: str) -> None:
        """
        Refuse a second restart or delete of a queue while one is under
        way: its workers may still be in their grace period, and a new
        queue service would run their messages again beside them.

        @raise MessageError: C{queue busy: ...}.
        """
        if name in self._busy:
            raise MessageError(f"queue busy: {name} is being restarted or deleted")

    def _unbusy(self, result: object, name: str) -> object:
        self._busy.discard(name)
        return result

    def restart_queue(self, name: str) -> Deferred[str]:
        """
        Stop a queue (its workers are terminated, their messages go back to
        que) and start it again with its config as read when asked;
        resets its back-off.
        """
        if not self._known(name):
            raise MessageError("invalid queue name")
        self._check_idle(name)
        # Read once, before the queue stops: a config that cannot be loaded
        # leaves the queue running as it is, and one that goes bad while
        # the workers end cannot leave it stopped.
        config = self._load_config(name, "queue {queue} not restarted: {reason}")
        if config is None:
            raise MessageError("queue not restarted: bad config")
        self._failures.pop(name, None)

        def start(_: object) -> str:
            self.queues.pop(name, None)
            self._add(name, config)
            return name

        self._busy.add(name)
        d = self._stop(name).addCallback(start)
        d.addBoth(self._unbusy, name)
        return d

    def set_admin(self, action: str, name: str) -> Deferred[str]:
        """
        C{up} (remove C{.down}), C{down} (create it), C{pause} (create
        C{.pause}), C{resume} (remove it). The queue follows at once.

        @return: fires with C{name} once the change is on disk.
        """
        if not self._known(name):
            raise MessageError("invalid queue name")
        kind = "down" if action in ("up", "down") else "pause"
        marker = self.root.marker(name, kind)
        try:
            if action in ("down", "pause"):
                with open(marker, "a"):
                    pass
            else:
                os.unlink(marker)
        except FileNotFoundError:
            pass
        except OSError:
            raise MessageError(f"not allowed to {action}")
        queue = self.queues.get(name)
        if queue is not None:
            queue.schedule()
        return self.syncer.sync(self.root.join("config")).addCallback(lambda _: name)

    def reload(self) -> Deferred[str]:
        """
        SIGHUP and C{rq reload}: L{reload_configs}, then rescan
        C{scandir/} and C{timers/} (L{reloadHooks}).
        """
        d = self.reload_configs()
        for hook in self.reloadHooks:
            try:
                hook()
            except Exception:
                _log.failure("reload hook {hook} failed", hook=hook)
        return d

    def reload_configs(self) -> Deferred[str]:
        """
        Re-read every queue's C{config.json} and apply it in place (running
        workers go on), start queues for new directories, stop the queues
        whose directory (or C{config.json}) is gone.

        A config that cannot be read or is invalid leaves the queue running
        with its old config; the reason is logged, kept in L{config_errors}
        (C{rq status}) and given in the result.

        @return: fires with C{reloaded}, or the config errors.
        """
        wanted = set(self.root.queue_names())
        steps = []
        for name in list(self.queues):
            if name in self._busy:
                continue
            if name not in wanted:
                _log.info("queue {queue}: directory gone; stopping", queue=name)
                steps.append(self._remove(name))
                continue
            config = self._load_config(name, "queue {queue}: config not reloaded, old one kept: {reason}")
            if config is None:
                continue
            queue = self.queues[name]
            if config != queue.config:
                _log.info("queue {queue}: config reloaded", queue=name)
                queue.reconfigure(config)
        for name in sorted(wanted - set(self.queues) - self._busy - set(self._restarts)):
            if self._add(name) is not None:
                _log.info("queue {queue}: new directory; started", queue=name)
        for name in list(self.config_errors):
            if name not in wanted:
                del self.config_errors[name]
        d: Deferred[Any] = succeed(None)
        for step in steps:
            d.addCallback(lambda _, s=step: s)

        def result(_: object) -> str:
            if not self.config_errors:
                return "reloaded"
            return "bad queue config, old config kept: " + "; ".join(
                f"{name}: {reason}" for name, reason in sorted(self.config_errors.items())
            )

        return d.addCallback(result)

    def restart(self) -> Deferred[str]:
        """
        Restart the whole server in place: stop every queue (terminating
        workers), re-read C{config/config.json} and start every queue again,
        each with its config as read when asked.
        A running queue whose config cannot be loaded now is left running as
        it is (as L{restart_queue} leaves it), and named in the answer.
        """
        if self._busy:
            self._check_idle(min(self._busy))
        # Each config is read once, before the queues stop (see
        # L{restart_queue}).
        configs = {name: self._load_config(name, "queue {queue} not restarted: {reason}") for name in self.queues}
        kept = [name for name, config in configs.items() if config is None]
        names = [name for name in self.queues if name not in kept]
        busy = (set(names) | set(self.root.queue_names())) - set(kept)
        self._busy |= busy
        # All at once: a queue waiting for a stubborn worker holds up no other.
        d: Deferred[Any] = DeferredList([self._stop(name) for name in names], consumeErrors=True)

        def again(results: list[tuple[bool, Any]]) -> str:
            for name, (stopped, result) in zip(names, results):
                if not stopped:
                    _log.failure("queue {queue} did not stop cleanly", result, queue=name)
                self.queues.pop(name, None)
            self._busy -= busy
            try:
                self.settings = self.root.load_config(self.overrides)
            except ConfigError as e:
                _log.error("config not reloaded: {reason}", reason=e.reason)
            self._failures.clear()
            for name in self.root.queue_names():
                if name not in self.queues:
                    self._add(name, configs.get(name))
            self.started_at = self.clock.seconds()
            if kept:
                return f"restarted; kept as they were (bad config): {', '.join(sorted(kept))}"
            return "restarted"

        def failed(failure: Failure) -> Failure:
            self._busy -= busy
            return failure

        return d.addCallbacks(again, failed)

    def status(self) -> dict[str, Any]:
        """
        The instance at a glance: version, uptime, each queue's state and
        counts.
        """
        queues = []
        for name in self.queue_names():
            q = self.queues[name]
            queues.append(
                {
                    "name": name,
                    "status": q.status(),
                    "uptime": int(q.uptime()),
                    "num_workers": q.config.num_workers,
                    "counts": q.num_messages(),
                    "schedule": q.schedule_status(),
                }
            )
        for name in sorted(self._restarts):
            queues.append({"name": name, "status": "ERROR", "failures": self._failures.get(name, 0)})
        return {
            "status": "OPERATIONAL",
            "version": RQ_VERSION,
            "rqtwisted": __version__,
            "pid": os.getpid(),
            "uptime": int(self.clock.seconds() - self.started_at),
            "time": int(time.time()),
            "root": self.root.path,
            "sync_rounds": self.syncer.rounds,
            "queues": queues,
            "config_errors": dict(sorted(self.config_errors.items())),
            **{key: provider() for key, provider in self.statusProviders.items()},
        }

    # -- messages

    def search(
        self,
        name: str | None,
        query: Mapping[str, str],
        exact: bool,
        limit: int | None = DEFAULT_SEARCH_LIMIT,
    ) -> Deferred[list[dict[str, Any]]]:
        """
        The read forms of the messages (all states) of queue C{name}, or of
        every queue, whose fields match C{query}: each value contained in
        its field, or equal to it if C{exact}; newest first per queue, at
        most C{limit}. Answered from an in-memory index (L{rqtwisted.search});
        the md5s of the hits' attachments this process has not hashed yet
        are read off the reactor first.

        @raise MessageError: unknown queue, malformed query.
        """
        query = check_query(query)
        queues = [self.queue(name)] if name else [self.queues[n] for n in self.queue_names()]
        # (Matched once: the hits' md5s are read first, their forms after.)
        hits = [(queue, index_for(queue).match(query, exact)) for queue in queues]
        hashing = []
        for queue, msg_ids in hits:
            for msg_id in msg_ids[:limit]:
                try:
                    state = queue.locate(msg_id)
                except MessageError:
                    continue
                hashing.append(queue.store.hash_attachments(state, msg_id))

        def forms(_: object) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            for queue, msg_ids in hits:
                room = None if limit is None else limit - len(found)
                if room is not None and room <= 0:
                    break
                found.extend(read_forms(queue, msg_ids, room))
            return found

        return DeferredList(hashing, consumeErrors=True).addCallback(forms)

    def locate(self, msg_id: str) -> tuple[QueueService, str]:
        """
        The queue and short id a full id (or C{/q/<queue>/<id>}) names.

        @raise MessageError: malformed id or unknown queue.
        """
        queue_name, short = split_full_id(msg_id)
        return self.queue(queue_name), short

    def create_message(self, data: Mapping[str, Any], method: str = "commit", relay_ok: bool = False) -> Deferred[str]:
        """
        Create a message for its C{dest}: a local queue by name or C{/q/}
        path, or C{relay} for a URL when C{relay_ok}.

        @raise MessageError: missing dest, unknown queue, relay refused,
            queue DOWN.
        """
        if method not in ("commit", "prep", "single_que"):
            raise MessageError("Invalid method param")
        fields = creation_fields(data)
        dest = fields["dest"]
        if is_remote_dest(dest):
            if not relay_ok or method == "single_que":
                # single_que has no relay handling (cli.md): its "the one
                # already queued" would be any message for any host waiting
                # in the shared relay queue.
                raise MessageError("Cannot relay message")
            name = "relay"
        else:
            name = dest_queue(dest)
        return self.queue(name).create(fields, method)
