"""
A queue service: one queue's scheduler, workers and message operations.

L{QueueService} keeps the queue's prep/que/run lists in memory, fills every
free worker slot with the earliest due message (queues.md), launches the
queue script through L{rqtwisted.worker}, applies the worker's reports and
exit (L{rqtwisted.protocol}) and moves messages on disk through its
L{QueueStore}. Every message operation of the CLI, the web and the relay ends
in one of its public methods.
"""

from __future__ import annotations

import errno
import heapq
import os
import signal as _signal
from dataclasses import dataclass, field
from functools import wraps
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.message import (
    CREATION_KEYS,
    PARAM_KEYS,
    MessageError,
    count_of,
    due_of,
    full_id,
    params_tuple,
    status_text,
)
from rqtwisted.protocol import COMPLETION_VERBS, Report, outcome, parse_dup, parse_resend
from rqtwisted.root import QueueConfig
from rqtwisted.schedule import QueueCron, make_cron
from rqtwisted.store import QueueStore
from rqtwisted.worker import ScriptError, Worker, kill_leftover, resolve_script, script_argv, worker_environment

if TYPE_CHECKING:
    from rqtwisted.supervisor import Instance

_log = Logger()

#: Seconds between scheduling passes when nothing is due sooner: markers
#: touched by hand and a SCRIPTERROR are re-checked this often.
IDLE_PASS = 5.0

#: A worker is made ready ahead (see L{QueueService._make_ready}) only while
#: the queue's last worker ran at most this many seconds: for longer runs a
#: head start of a millisecond or two is worth nothing.
READY_WITHIN = 1.0

#: Seconds a ready worker may wait for a free slot; one that waited longer
#: is given up, and none is made again until a worker runs short again.
READY_STALE = 2.0

#: Errors of a spawn that say the system is short of something for now
#: (fds, processes, memory): the message is retried rather than failed.
_SHORT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})

#: Seconds a stopping queue gives its workers between SIGTERM and SIGKILL.
STOP_GRACE = 5.0

_F = TypeVar("_F", bound=Callable[..., Any])


def _fired_by(d: Deferred[Any]) -> Deferred[None]:
    """
    A new Deferred fired (with L{None}) when C{d} fires, unless it was
    fired before; C{d}'s result is left as it is.
    """
    follower: Deferred[None] = Deferred()

    def fire(result: Any) -> Any:
        if not follower.called:
            follower.callback(None)
        return result

    d.addBoth(fire)
    return follower


def guarded(method: _F) -> _F:
    """
    Run an event handler of the queue; an unexpected exception fails the
    queue service (the supervisor restarts it) instead of vanishing.
    """

    @wraps(method)
    def run(self: "QueueService", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self.crashed(Failure())
            return None

    return run  # type: ignore[return-value]


@dataclass(eq=False)
class Job:
    """
    A running message: its worker and what it has reported so far.
    """

    msg_id: str
    msg: dict[str, Any]
    worker: Worker | None = None
    completion: Report | None = None
    dups: list[str] = field(default_factory=list)
    exited: Deferred[None] = field(default_factory=Deferred)
    #: When the worker started (or was made ready, until it goes).
    since: float = 0.0
    #: Replies owed on fd 4, in the order of the requests: a slot per
    #: request, filled when it is settled (see L{QueueService._dup}).
    replies: list[list[str | None]] | None = None
    #: The real script path and argv its worker was started with.
    command: tuple[str, list[str]] | None = None


class _JobEvents:
    """
    The L{rqtwisted.worker.WorkerEvents} of one job, bound to its queue.
    """

    def __init__(self, queue: "QueueService", job: Job) -> None:
        self._queue = queue
        self._job = job

    def reportReceived(self, report: Report) -> None:
        self._queue.reportsReceived(self._job, [report])

    def reportsReceived(self, reports: list[Report]) -> None:
        self._queue.reportsReceived(self._job, reports)

    def workerExited(self, exit_code: int | None, signal: int | None) -> None:
        self._queue.workerExited(self._job, exit_code, signal)

    def workerStarted(self, pid: int) -> None:
        self._queue.workerStarted(self._job, pid)


class QueueService(Service):
    """
    One queue of the root.

    @ivar oper: the operational status, C{UP} or C{SCRIPTERROR}.
    """

    def __init__(
        self,
        instance: "Instance",
        config: QueueConfig,
        store: QueueStore,
        clock: IReactorTime,
        spawn: Callable[..., Worker],
    ) -> None:
        """
        @param instance: the daemon (configuration, other queues).
        @param config: this queue's config.
        @param store: this queue's directory.
        @param clock: the reactor's time functions.
        @param spawn: L{rqtwisted.worker.spawn_worker} bound to the reactor.
        """
        self.name = config.name
        self.instance = instance
        self.config = config
        self.store = store
        self.clock = clock
        self.spawn = spawn
        self.oper = "UP"
        self.started_at: float | None = None
        self.prep: set[str] = set()
        self.que: dict[str, dict[str, Any]] = {}
        self.run: dict[str, Job] = {}
        self.held: dict[str, str] = {}
        self.counts: dict[str, int] = {"done": 0, "relayed": 0, "err": 0}
        self._heap: list[tuple[float, str]] = []
        self._timer: IDelayedCall | None = None
        self._stopping = False
        self.cron: QueueCron | None = None
        self._marker_paths: tuple[Any, str, str] | None = None
        #: The worker made ready ahead for the next due message while every
        #: slot is busy (see L{_make_ready}); its message is still in que.
        self._ready: Job | None = None
        #: Whether recent workers ran short enough for a ready worker to pay.
        self._ready_pays = True
        #: The script checked once per scheduling pass (see L{_command}):
        #: how to run it, or why it cannot be.
        self._pass_command: tuple[str, list[str]] | ScriptError | None = None

    # -- service

    def startService(self) -> None:
        """
        Recover the directory and start scheduling. A failure fails this
        queue only (the supervisor restarts it later), never its siblings
        nor the daemon: it is reported from the reactor's next turn, once
        the supervisor is done starting its queues.
        """
        try:
            self._recover()
        except Exception:
            failure = Failure()
            Service.startService(self)
            self.clock.callLater(0, self.crashed, failure)
            return
        super().startService()
        self.schedule()

    def _recover(self) -> None:
        """
        Kill the workers a previous daemon left running, move C{run/} back to
        C{que/} and load the messages.
        """
        for msg_id, pid in self.store.left_running():
            kill_leftover(pid, self.store.job_path("run", msg_id))
        found = self.store.open()
        self.prep = found.prep
        self.que = {}
        self._heap = []
        now = self.clock.seconds()
        for msg_id, msg in found.que.items():
            self._enqueue(msg_id, msg)
        self.counts = dict(found.counts)
        if found.requeued:
            _log.info(
                "queue {queue}: {n} messages left running went back to que",
                queue=self.name,
                n=len(found.requeued),
            )
        self._stopping = False
        self.started_at = now
        self.cron = make_cron(self, self.config.schedule, self.clock, self.store.path, self.instance.syncer, self.cron)

    def stopService(self) -> Deferred[Any]:
        """
        Stop scheduling; SIGTERM every worker's process group, SIGKILL what
        remains after L{STOP_GRACE} seconds. Fires when every worker has
        exited. Their messages stay in C{run/} and go back to C{que/} at the
        next start, unless the worker finished cleanly meanwhile.
        """
        super().stopService()
        self._stopping = True
        self._cancel_ready()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # (A worker whose exit was reported is not waited for, even if its
        # handling failed before the message left run/.)
        jobs = [job for job in self.run.values() if job.worker is not None and not job.worker.exited]
        if not jobs:
            return succeed(None)
        waits: list[Deferred[None]] = []
        for job in jobs:
            assert job.worker is not None
            job.worker.signal(_signal.SIGTERM)
            waits.append(_fired_by(job.exited))

        def kill() -> None:
            for job, wait in zip(jobs, waits):
                if job.worker is not None and not job.worker.exited:
                    job.worker.signal(_signal.SIGKILL)
                    if job.worker.pid is None and not wait.called:
                        # Still not past its spawn: it gets the signal if it
                        # ever starts; nothing to wait for meanwhile.
                        _log.warn("queue {queue}: the worker of {msg_id} did not start; not waiting for it",
                                  queue=self.name, msg_id=job.msg_id)
                        wait.callback(None)

        killer = self.clock.callLater(STOP_GRACE, kill)
        done = DeferredList(waits)

        def finished(result: object) -> None:
            if killer.active():
                killer.cancel()

        done.addCallback(finished)
        return done

    def crashed(self, failure: Failure) -> None:
        """
        An event handler raised: log it and let the supervisor restart us.
        """
        _log.failure("queue {queue} failed", failure, queue=self.name)
        self.instance.queueFailed(self.name, failure)

    # -- status

    def admin_status(self) -> str:
        """
        C{DOWN}, C{PAUSE} or C{UP} from the marker files in C{config/}.
        """
        down, pause = self._markers()
        if os.path.exists(down):
            return "DOWN"
        if os.path.exists(pause):
            return "PAUSE"
        return "UP"

    def _markers(self) -> tuple[str, str]:
        """
        The paths of this queue's C{down} and C{pause} markers.
        """
        root = self.instance.root
        if self._marker_paths is None or self._marker_paths[0] is not root:
            self._marker_paths = (root, root.marker(self.name, "down"), root.marker(self.name, "pause"))
        return self._marker_paths[1], self._marker_paths[2]

    def status(self) -> str:
        """
        The reported status: the oper status unless UP, else the admin one.
        """
        if self.oper != "UP":
            return self.oper
        return self.admin_status()

    def uptime(self) -> float:
        """
        Seconds since the queue started.
        """
        if self.started_at is None:
            return 0.0
        return self.clock.seconds() - self.started_at

    def num_messages(self) -> dict[str, int]:
        """
        Messages per state.
        """
        return {
            "prep": len(self.prep),
            "que": len(self.que) + len(self.held),
            "run": len(self.run),
            "done": self.counts["done"],
            "err": self.counts["err"],
            "relayed": self.counts["relayed"],
        }

    def schedule_status(self) -> list[dict[str, Any]]:
        """
        The cron schedule: C{[{"cron", "params", "next_run"}]}.
        """
        return self.cron.status() if self.cron is not None else []

    def reconfigure(self, config: QueueConfig) -> None:
        """
        Apply a re-read C{config.json} in place: running workers go on,
        the next pass uses the new settings (workers, script, params,
        schedule).
        """
        self.config = config
        # The ready worker was made with the old settings.
        self._cancel_ready()
        if self.running:
            self.cron = make_cron(self, config.schedule, self.clock, self.store.path, self.instance.syncer, self.cron)
            self.schedule()

    # -- scheduler

    def _enqueue(self, msg_id: str, msg: dict[str, Any]) -> None:
        if due_of(msg, -1.0) == -1.0:
            msg["due"] = int(self.clock.seconds())
        self.que[msg_id] = msg
        heapq.heappush(self._heap, (self._due(msg_id), msg_id))

    def _due(self, msg_id: str) -> float:
        return due_of(self.que[msg_id], 0.0)

    @guarded
    def schedule(self) -> None:
        """
        One scheduling pass: fill every free slot with the earliest due,
        unblocked message, then wake up for the next due one (or in
        L{IDLE_PASS} seconds).
        """
        if not self.running or self._stopping:
            return
        try:
            self._pass(self.clock.seconds())
        finally:
            self._pass_command = None

    def _pass(self, now: float) -> None:
        """
        The body of L{schedule}, at time C{now}.
        """
        wake = now + IDLE_PASS
        if self.oper == "SCRIPTERROR":
            self._recheck_script()
        if self.status() == "UP":
            if self._ready is not None and now - self._ready.since > READY_STALE:
                self._cancel_ready()
                self._ready_pays = False
            while len(self.run) < self.config.num_workers:
                if self._ready is not None and self._go_ready(now):
                    continue
                msg_id, due = self._next_candidate()
                if msg_id is None:
                    break
                if due > now:
                    wake = min(wake, due)
                    break
                if not self._start(msg_id):
                    break
            self._make_ready(now)
        else:
            self._cancel_ready()
        self._wake_at(now, wake)
        if self.cron is not None:
            self.cron.tick()

    def _wake_at(self, now: float, wake: float) -> None:
        """
        Have the next pass run at C{wake} at the latest: a pending pass
        that comes no later is kept (an early pass is harmless), any other
        is moved.
        """
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= wake:
                return
            timer.reset(max(0.0, wake - now))
            return
        self._timer = self.clock.callLater(max(0.0, wake - now), self.schedule)

    def _next_candidate(self) -> tuple[str | None, float]:
        """
        The earliest due message not blocked by a running one, or C{None}.
        """
        skipped: list[tuple[float, str]] = []
        found: tuple[str | None, float] = (None, 0.0)
        blocking = self.config.blocking_params
        busy = {params_tuple(job.msg, blocking) for job in self.run.values()} if blocking else set()
        while self._heap:
            due, msg_id = self._heap[0]
            if msg_id not in self.que or self._due(msg_id) != due:
                heapq.heappop(self._heap)
                continue
            if blocking and params_tuple(self.que[msg_id], blocking) in busy:
                skipped.append(heapq.heappop(self._heap))
                continue
            found = (msg_id, due)
            break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def _command(self) -> tuple[str, list[str]]:
        """
        The script's real path and the argv that runs it, checked once per
        scheduling pass.

        @raise ScriptError: the script cannot be run.
        """
        if self._pass_command is None:
            try:
                real_script = resolve_script(self.config.script, self.instance.root.path)
                self._pass_command = (real_script, script_argv(self.config.exec_prefix, real_script))
            except ScriptError as e:
                self._pass_command = e
        if isinstance(self._pass_command, ScriptError):
            raise self._pass_command
        return self._pass_command

    def _recheck_script(self) -> None:
        try:
            self._command()
        except ScriptError:
            return
        _log.info("queue {queue}: script is executable again", queue=self.name)
        self.oper = "UP"

    def _start(self, msg_id: str) -> bool:
        """
        Move a due message to run and launch its worker.
        """
        try:
            real_script, argv = self._command()
        except ScriptError as e:
            if self.oper != "SCRIPTERROR":
                _log.error("queue {queue}: SCRIPTERROR: {reason}", queue=self.name, reason=e.reason)
            self.oper = "SCRIPTERROR"
            return False
        self.oper = "UP"
        msg = self.que.pop(msg_id)
        try:
            self.store.move_soon(msg_id, "que", "run")
        except OSError as e:
            self._vanished(msg_id, "que", e)
            return True
        job = Job(msg_id, msg, command=(real_script, argv))
        self.run[msg_id] = job
        if self.config.coalesce_params:
            key = params_tuple(msg, self.config.coalesce_params)
            for other in [o for o, m in self.que.items() if params_tuple(m, self.config.coalesce_params) == key]:
                del self.que[other]
                self.held[other] = msg_id
                job.dups.append(other)
        job.since = self.clock.seconds()
        try:
            job.worker = self._launch(job, real_script, argv)
        except OSError as e:
            if e.errno in _SHORT_OF_RESOURCES:
                # Out of fds or processes for now: the message waits in que
                # for the next pass (what ends meanwhile frees some).
                _log.warn("queue {queue}: {msg_id} not started, retried later: {error}", queue=self.name,
                          msg_id=msg_id, error=e)
                self._finish(job, "que")
                return False
            self.store.write_status("run", msg_id, f"could not start the queue script: {e}")
            self._finish(job, "err")
            return True
        if job.worker.pid is not None:
            self.store.write_pid(msg_id, job.worker.pid)
        return True

    def _launch(self, job: Job, real_script: str, argv: list[str], hold: bool = False) -> Worker:
        """
        Spawn the worker of C{job}: in its C{run/} job directory, or, with
        C{hold}, made ready in its C{que/} one (the directory moves to
        C{run/} with the worker's cwd in it before it goes).

        @raise OSError: the spawn failed.
        """
        msg_id = job.msg_id
        run_dir = self.store.job_path("run", msg_id) if hold else self.store.job_dir(msg_id)
        settings = self.instance.settings
        env = worker_environment(
            self.instance.base_env,
            host=settings.host,
            port=settings.port,
            relative_root=settings.relative_root,
            rq_env=settings.env,
            script=self.config.script,
            real_script=real_script,
            msg=job.msg,
            full_msg_id=self.full_id(msg_id),
            job_dir=run_dir,
            env_vars=self.config.env_vars,
        )
        if hold:
            return self.spawn(argv=argv, env=env, job_dir=self.store.job_dir(msg_id, "que"), real_script=real_script,
                              events=_JobEvents(self, job), hold=True, go_dir=run_dir)
        return self.spawn(argv=argv, env=env, job_dir=run_dir, real_script=real_script, events=_JobEvents(self, job))

    # -- the worker made ready ahead

    def _make_ready(self, now: float) -> None:
        """
        With every slot busy, have the worker of the next due message made
        ready (spawned, held before anything of its script runs), so that
        it starts the moment a slot frees, without waiting for a spawn.
        Only while workers run short (L{READY_WITHIN}); not for queues whose
        messages block or coalesce by params (which message runs next
        depends on the running ones).
        """
        config = self.config
        if not self._may_make_ready() or len(self.run) < config.num_workers:
            return
        msg_id, due = self._next_candidate()
        if msg_id is None or due > now:
            return
        try:
            real_script, argv = self._command()
        except ScriptError:
            return
        holds = getattr(self.spawn, "holds", None)
        if holds is not None and not holds(real_script):
            return
        heapq.heappop(self._heap)
        job = Job(msg_id, self.que[msg_id], since=now, command=(real_script, argv))
        try:
            job.worker = self._launch(job, real_script, argv, hold=True)
        except OSError as e:
            _log.debug("queue {queue}: no worker made ready for {msg_id}: {error}", queue=self.name, msg_id=msg_id,
                       error=e)
            heapq.heappush(self._heap, (due, msg_id))
            return
        self._ready = job

    def _may_make_ready(self) -> bool:
        """
        Whether a worker may be made ready now (see L{_make_ready}), slots
        aside.
        """
        config = self.config
        return (
            self._ready is None
            and self._ready_pays
            and self.instance.ready_workers
            and not config.blocking_params
            and not config.coalesce_params
        )

    def _go_ready(self, now: float) -> bool:
        """
        Start the ready worker in a free slot: its message moves to run and
        the worker goes. False (and the worker is given up) if it should not
        go after all: its message changed meanwhile (removed, replaced, no
        longer due), another message is due before it, the worker is no
        longer waiting, or the script cannot be run now (the next pass finds
        the SCRIPTERROR).
        """
        job, self._ready = self._ready, None
        assert job is not None and job.worker is not None
        msg_id = job.msg_id
        first, first_due = self._next_candidate()
        if (
            self.que.get(msg_id) is not job.msg
            or not job.worker.waiting
            or self._due(msg_id) > now
            or (first is not None and first_due < self._due(msg_id))
        ):
            self._give_up(job)
            return False
        try:
            command = self._command()
        except ScriptError:
            self._give_up(job)
            return False
        if command != job.command:
            # Redeployed since it was made ready (a symlink switched, the
            # exec_prefix changed): the message runs what is there now.
            self._give_up(job)
            return False
        try:
            self.store.move_soon(msg_id, "que", "run")
        except OSError as e:
            self._give_up(job)
            del self.que[msg_id]
            self._vanished(msg_id, "que", e)
            return False
        del self.que[msg_id]
        self.run[msg_id] = job
        job.since = now
        pid = job.worker.pid
        job.worker.go()
        if pid is not None:
            self.store.write_pid(msg_id, pid)
        return True

    def _cancel_ready(self) -> None:
        """
        Give up the ready worker, if any; its message stays due in que.
        """
        job, self._ready = self._ready, None
        if job is not None:
            self._give_up(job)

    def _give_up(self, job: Job) -> None:
        if job.worker is not None:
            job.worker.cancel()
        if self.que.get(job.msg_id) is job.msg:
            heapq.heappush(self._heap, (self._due(job.msg_id), job.msg_id))

    # -- worker events

    @guarded
    def workerStarted(self, job: Job, pid: int) -> None:
        """
        A worker got its pid after its spawn returned: record it.
        """
        if self.run.get(job.msg_id) is job:
            self.store.write_pid(job.msg_id, pid)

    @guarded
    def reportsReceived(self, job: Job, reports: list[Report]) -> None:
        """
        Lines from a worker, read at once: each replaces the status text
        (so the last one is written); the first completion verb is kept;
        C{resend} counts at once; C{dup} copies.
        """
        if self.run.get(job.msg_id) is not job or not reports:
            return
        try:
            for report in reports:
                if report.verb in COMPLETION_VERBS and job.completion is None:
                    job.completion = report
                    if report.verb == "resend":
                        job.msg["count"] = count_of(job.msg, "count", 0) + 1
                        job.msg["due"] = int(self.clock.seconds() + parse_resend(report.text).delay)
                        self.store.write_msg("run", job.msg_id, job.msg)
                elif report.verb == "dup":
                    self._dup(job, report.text)
            self.store.write_status("run", job.msg_id, reports[-1].text)
        except OSError as e:
            # Its directory was removed or broken behind our back: the
            # worker's exit settles it.
            _log.warn("queue {queue}: cannot record a report of {msg_id}: {error}", queue=self.name,
                      msg_id=job.msg_id, error=e)

    @guarded
    def workerExited(self, job: Job, exit_code: int | None, signal: int | None) -> None:
        """
        A worker exited: apply the completion table and move the message.
        """
        if job is self._ready:
            # A ready worker that could not be started after all.
            self._ready = None
            self._give_up(job)
            return
        if self.run.get(job.msg_id) is not job:
            return
        self._ready_pays = self.clock.seconds() - job.since <= READY_WITHIN
        try:
            stopped = self._settle(job, exit_code, signal)
        finally:
            if not job.exited.called:
                job.exited.callback(None)
        if not stopped:
            self.schedule()

    def _settle(self, job: Job, exit_code: int | None, signal: int | None) -> bool:
        """
        Apply the completion table to a job whose worker exited and move its
        message; whether the queue is stopping (nothing more to start).
        """
        result = outcome(
            job.completion,
            exit_code,
            signal,
            count_of(job.msg, "count", 0),
            count_of(job.msg, "max_count", 0),
        )
        if self._stopping and (job.completion is None or exit_code != 0):
            # Killed by our own shutdown: the message stays in run/ and goes
            # back to que/ at the next start.
            del self.run[job.msg_id]
            self.store.clear_pid(job.msg_id)
            self._release_dups(job)
            return True
        try:
            if result.status is not None:
                self.store.write_status("run", job.msg_id, result.status)
            self._finish(job, result.state)
        except OSError as e:
            if os.path.isdir(self.store.msg_dir("run", job.msg_id)):
                raise
            # Removed from run/ behind our back: nothing left to move.
            if self.run.get(job.msg_id) is job:
                del self.run[job.msg_id]
            self._release_dups(job)
            self._vanished(job.msg_id, "run", e)
        return False

    def _vanished(self, msg_id: str, state: str, error: OSError) -> None:
        """
        Forget a message whose directory in C{state} was removed behind our
        back (or can no longer be used): say so, go on with the others.
        """
        _log.warn("queue {queue}: message {msg_id} is gone from {state}/ ({error}); forgotten",
                  queue=self.name, msg_id=msg_id, state=state, error=error)

    def _release_dups(self, job: Job) -> None:
        for dup in job.dups:
            self.held.pop(dup, None)
            try:
                msg = self.store.read("que", dup)
            except MessageError:
                continue
            self._enqueue(dup, msg)

    def _finish(self, job: Job, state: str) -> None:
        """
        Move a finished message from run to C{state} and settle its dups.
        """
        msg_id = job.msg_id
        del self.run[msg_id]
        self.store.clear_pid(msg_id)
        if state == "que":
            self.store.move_soon(msg_id, "run", "que")
            self._enqueue(msg_id, job.msg)
            self._release_dups(job)
            return
        if job.dups and state in ("done", "relayed"):
            job.msg["dups"] = [self.full_id(d) for d in job.dups]
            self.store.write_msg("run", msg_id, job.msg)
        self.store.move_soon(msg_id, "run", state)
        self.counts[state] += 1
        if state in ("done", "relayed"):
            for dup in job.dups:
                self.held.pop(dup, None)
                try:
                    self.store.write_status("que", dup, f"duplicate {self.full_id(msg_id)}")
                    self.store.move_soon(dup, "que", state)
                except OSError as e:
                    # Removed behind our back: nothing left to settle.
                    _log.warn("queue {queue}: coalesced {dup} not settled: {error}", queue=self.name, dup=dup, error=e)
                    continue
                self.counts[state] += 1
        else:
            self._release_dups(job)
        self.instance.messageFinished(self, job.msg, state)

    def _dup(self, job: Job, text: str) -> None:
        """
        Handle C{dup <due>-<flag>-<newdest>}: copy the running message to a
        local queue (C{relay} for URLs) and reply on fd 4.
        """
        parsed = parse_dup(text)
        worker = job.worker
        slot: list[str | None] = [None]
        if job.replies is None:
            job.replies = []
        owed = job.replies
        owed.append(slot)

        def reply(line: str) -> None:
            # One line per request, in the order of the requests: a copy
            # that takes a sync round must not be overtaken by a refusal.
            slot[0] = line
            while owed and owed[0][0] is not None:
                ready = owed.pop(0)[0]
                if worker is not None:
                    worker.reply(ready)

        if parsed is None:
            reply(f"fail dup failed - malformed dup request: {text}")
            return
        target_name = "relay" if parsed.dest.startswith("http") else parsed.dest
        target = self.instance.queues.get(target_name)
        if target is None or not target.running:
            reply(f"fail couldn't connect to queue - {target_name}")
            return
        fields = {k: job.msg[k] for k in ("src", *PARAM_KEYS, "max_count", "post_run_webhook")
                  if k in job.msg}
        fields.update(
            dest=parsed.dest,
            orig_msg_id=job.msg.get("orig_msg_id") or self.full_id(job.msg_id),
            count=0,
            due=int(self.clock.seconds() + parsed.delay),
        )
        try:
            d = target.create(fields, "commit", attachments_from=(self.store, "run", job.msg_id))
        except MessageError as e:
            reply(f"fail dup failed - {e.reason}")
            return
        d.addCallbacks(
            lambda new_id: reply(f"ok {new_id}"),
            lambda f: reply(f"fail dup failed - {f.value.reason if f.check(MessageError) else f.getErrorMessage()}"),
        )

    # -- message operations

    def full_id(self, msg_id: str) -> str:
        """
        The full id of one of this queue's messages.
        """
        return full_id(self.instance.settings.base_url, self.name, msg_id)

    def _check_writable(self) -> None:
        if os.path.exists(self._markers()[0]):
            raise MessageError("status: DOWN")

    def create(
        self,
        data: Mapping[str, Any],
        method: str = "commit",
        attachments_from: tuple[QueueStore, str, str] | None = None,
        *,
        msg_id: str | None = None,
    ) -> Deferred[str]:
        """
        Create a message from validated creation C{data} (see
        L{rqtwisted.message.creation_fields}); C{method} is C{commit}
        (queued at once), C{prep} or C{single_que}. Fires with the full id
        once the message is durable. C{msg_id}: an id chosen by the caller
        (cron jobs, L{rqtwisted.schedule.cron_msg_id}).

        @raise MessageError: the queue is DOWN.
        """
        self._check_writable()
        if method == "single_que" and (self.que or self.held):
            latest = max(list(self.que) + list(self.held))
            return succeed(self.full_id(latest))
        state = "prep" if method == "prep" else "que"
        msg_id = msg_id or self.store.new_id()
        msg = {k: data[k] for k in CREATION_KEYS if k in data}
        if "cloned_from" in data:
            msg["cloned_from"] = data["cloned_from"]
        msg["msg_id"] = msg_id
        msg.setdefault("count", 0)
        msg.setdefault("max_count", 15)
        if "due" not in msg:
            msg["due"] = int(self.clock.seconds())
        if not msg.get("orig_msg_id"):
            msg["orig_msg_id"] = self.full_id(msg_id)
        fill = None
        if attachments_from is not None:
            store, source_state, source_id = attachments_from
            fill = lambda staging: store.link_attachments(source_state, source_id, staging)  # noqa: E731
        d = self.store.create(msg, state, fill)

        def stored(_: object) -> str:
            if state == "prep":
                self.prep.add(msg_id)
            else:
                self._enqueue(msg_id, msg)
                if len(self.run) < self.config.num_workers or self._may_make_ready():
                    # Otherwise the next worker's exit starts it.
                    self.schedule()
            return self.full_id(msg_id)

        return d.addCallback(stored)

    def locate(self, msg_id: str) -> str:
        """
        The state of a message, in the original's lookup order.

        @raise MessageError: C{msg not found}.
        """
        if msg_id in self.prep:
            return "prep"
        if msg_id in self.que or msg_id in self.held:
            return "que"
        if msg_id in self.run:
            return "run"
        for state in ("done", "relayed", "err"):
            try:
                if self.store.exists(state, msg_id):
                    return state
            except MessageError:
                break
        raise MessageError("msg not found")

    def get(self, msg_id: str) -> dict[str, Any]:
        """
        The read form of a message (message.md): stored fields plus
        C{state}, C{status}, C{path} and C{_attachments}.

        @raise MessageError: C{msg not found} / C{msg couldn't be read}.
        """
        state = self.locate(msg_id)
        msg = dict(self.run[msg_id].msg) if state == "run" else self.store.read(state, msg_id)
        msg.update(self.get_status(msg_id, state))
        attachments = self.store.attachments(state, msg_id)
        if attachments:
            msg["_attachments"] = attachments
        return msg

    def read(self, msg_id: str) -> Deferred[dict[str, Any]]:
        """
        L{get}, once the md5s of the message's attachments that this process
        has not hashed yet were read off the reactor (the pages, C{rq show}
        and C{attachstatusmesg} go through here).

        @raise MessageError: as L{get}.
        """
        state = self.locate(msg_id)
        return self.store.hash_attachments(state, msg_id).addCallback(lambda _: self.get(msg_id))

    def get_status(self, msg_id: str, state: str | None = None) -> dict[str, str]:
        """
        C{{path, status, state}} of a message.
        """
        if state is None:
            state = self.locate(msg_id)
        has, text = self.store.read_status(state, msg_id)
        path = os.path.relpath(self.store.msg_dir(state, msg_id), self.instance.root.path)
        return {"path": path, "status": status_text(state, text, has), "state": state}

    def commit(self, msg_id: str) -> Deferred[str]:
        """
        Move a prepared message to que.
        """
        self._check_writable()
        if msg_id not in self.prep:
            raise MessageError("cannot find message")
        msg = self.store.read("prep", msg_id)
        self.prep.discard(msg_id)
        d = self.store.move(msg_id, "prep", "que")

        def moved(_: object) -> str:
            self._enqueue(msg_id, msg)
            self.schedule()
            return "msg commited"

        return d.addCallback(moved)

    def attach(self, msg_id: str, pathname: str, name: str | None = None, md5: str | None = None) -> Deferred[str]:
        """
        Attach a file to a prepared message; fires with
        C{<md5>-Attached successfully}. C{md5}: the content's md5 if known.
        The file is copied and hashed in a thread: a message committed or
        deleted meanwhile, or a queue stopped, fails it with
        C{cannot find message}; cancelling the result meanwhile abandons it
        (L{QueueStore.attach}).
        """
        self._check_writable()
        if msg_id not in self.prep:
            raise MessageError("cannot find message")
        d = self.store.attach(
            "prep",
            msg_id,
            pathname,
            name or os.path.basename(pathname),
            md5,
            still_wanted=lambda: self.running and msg_id in self.prep,
        )
        return d.addCallback(lambda md5: f"{md5}-Attached successfully")

    def delete_attachment(self, msg_id: str, name: str) -> Deferred[str]:
        """
        Remove an attachment of a prepared message.
        """
        self._check_writable()
        try:
            state = self.locate(msg_id)
        except MessageError:
            raise MessageError("msg not found")
        if state != "prep":
            raise MessageError("msg not in prep")
        d = self.store.delete_attachment("prep", msg_id, name)
        return d.addCallback(lambda _: "Attachment deleted successfully")

    def delete(self, msg_id: str) -> Deferred[str]:
        """
        Delete a message in prep, que, err, done or relayed (quirks 1: at the
        hash path); a running message must be destroyed instead.
        """
        self._check_writable()
        state = self.locate(msg_id)
        if state == "run":
            raise MessageError("msg is running; destroy it first")
        if state == "prep":
            self.prep.discard(msg_id)
        elif state == "que":
            self.que.pop(msg_id, None)
            if self._ready is not None and self._ready.msg_id == msg_id:
                self._cancel_ready()
            owner = self.held.pop(msg_id, None)
            if owner is not None and owner in self.run:
                self.run[owner].dups.remove(msg_id)
        else:
            self.counts[state] = max(0, self.counts[state] - 1)
        return self.store.delete(state, msg_id).addCallback(lambda _: "msg deleted")

    def destroy(self, msg_id: str) -> str:
        """
        SIGTERM a running message's worker process group; the message then
        ends in err.
        """
        self._check_writable()
        job = self.run.get(msg_id)
        if job is None or job.worker is None:
            raise MessageError("msg not found")
        job.worker.signal(_signal.SIGTERM)
        return "msg destroyed"

    def run_now(self, msg_id: str) -> Deferred[str]:
        """
        Make a queued message due before every other one.
        """
        self._check_writable()
        if msg_id in self.run:
            raise MessageError("msg already running")
        if msg_id not in self.que:
            raise MessageError("msg not in runnable state")
        now = self.clock.seconds()
        earliest = min(self._due(m) for m in self.que)
        msg = self.que[msg_id]
        msg["due"] = int(min(now, earliest - 1))
        heapq.heappush(self._heap, (self._due(msg_id), msg_id))
        d = self.store.write_msg("que", msg_id, msg)

        def saved(_: object) -> str:
            self.schedule()
            return "msg sent to front of run queue"

        return d.addCallback(saved)

    def clone(self, msg_id: str) -> Deferred[str]:
        """
        Copy a finished message (err, relayed, done) into a new queued one.
        """
        self._check_writable()
        state = self.locate(msg_id)
        if state not in ("err", "relayed", "done"):
            raise MessageError(f"cannot clone message in {state} state")
        source = self.store.read(state, msg_id)
        data = {k: source[k] for k in CREATION_KEYS if k in source}
        data["count"] = 0
        data["cloned_from"] = msg_id
        return self.create(data, "commit", attachments_from=(self.store, state, msg_id))

    def messages(self, state: str, limit: int | None = None) -> list[str]:
        """
        Ids of the messages in C{state}, newest first.
        """
        if state == "prep":
            ids = sorted(self.prep, reverse=True)
        elif state == "que":
            ids = sorted(list(self.que) + list(self.held), reverse=True)
        elif state == "run":
            ids = sorted(self.run, reverse=True)
        elif state in ("done", "relayed"):
            return list(self.store.list_hashed(state, limit))
        elif state == "err":
            ids = self.store.list_flat("err")
        else:
            raise MessageError(f"invalid or missing 'state' field ({state})")
        return ids[:limit] if limit is not None else ids

