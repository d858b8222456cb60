"""
Public fakes of rqtwisted's own interfaces, for tests of code built on it.

L{FakeSpawner} stands in for L{rqtwisted.worker.spawn_worker}: nothing runs,
each launch is recorded as a L{FakeWorker} the test drives by hand (reports,
exit). L{syncNow} is a L{Syncer} thread runner that syncs at once;
L{HeldThreads} is a thread runner whose calls wait for the test.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from rqtwisted.durable import Syncer
from rqtwisted.protocol import Report
from rqtwisted.root import Root, init_root

if TYPE_CHECKING:
    from rqtwisted.worker import WorkerEvents


def syncNow(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    Run C{f} at once in this thread (a stand-in for C{deferToThreadPool}).
    """
    try:
        return succeed(f(*args))
    except BaseException:
        return fail(Failure())


def result_of(d: Deferred[Any]) -> Any:
    """
    The result of a L{Deferred} that has already fired; its failure is
    raised. For tests driven by a L{Clock}, where nothing waits.

    @raise AssertionError: C{d} has not fired.
    """
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class HeldThreads:
    """
    A thread runner (L{rqtwisted.threads.ThreadRunner}) whose calls wait
    until the test runs them (L{run}): what a reactor does meanwhile can be
    tested without threads.

    @ivar calls: the waiting calls, C{(f, args, deferred)}, in order.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Hold C{f(*args)}; a Deferred of its result once run.
        """
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self) -> None:
        """
        Run the waiting calls, and those they lead to, in order.
        """
        while self.calls:
            f, args, d = self.calls.pop(0)
            try:
                result = f(*args)
            except BaseException:
                d.errback(Failure())
            else:
                d.callback(result)


def immediateSyncer() -> Syncer:
    """
    A L{Syncer} whose rounds run synchronously.
    """
    return Syncer(syncNow)


class FakeWorker:
    """
    A worker that never ran: the test calls L{say} and L{exit}.

    @ivar signals: signals sent to its process group.
    @ivar replies: lines written to its fd 4.
    @ivar waiting: spawned with C{hold} and not let go yet.
    @ivar went: let go (L{go}) after being held.
    @ivar cancelled: given up (L{cancel}) while held.
    @ivar go_dir: where a held worker's job directory is when it goes.
    """

    _nextPid = 40000

    def __init__(self, argv: list[str], env: dict[str, str], job_dir: str, events: WorkerEvents,
                 hold: bool = False, go_dir: str | None = None) -> None:
        FakeWorker._nextPid += 1
        self.pid = FakeWorker._nextPid
        self.argv = argv
        self.env = env
        self.job_dir = job_dir
        self.events = events
        self.exited = False
        self.signals: list[int] = []
        self.replies: list[str] = []
        self.waiting = hold
        self.went = False
        self.cancelled = False
        self.go_dir = go_dir

    def go(self) -> None:
        """
        Let a held worker go.
        """
        if self.waiting:
            self.waiting = False
            self.went = True

    def cancel(self) -> None:
        """
        Give a held worker up.
        """
        if self.waiting:
            self.waiting = False
            self.cancelled = True

    def say(self, line: str) -> None:
        """
        Report one fd-3 line.
        """
        verb, _, text = line.partition(" ")
        self.events.reportReceived(Report(verb, text))

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        """
        Exit with C{code}, or killed by C{signal}.
        """
        self.exited = True
        self.events.workerExited(code, signal)

    def reply(self, line: str) -> None:
        """
        Record a fd-4 reply.
        """
        self.replies.append(line)

    def signal(self, sig: int) -> None:
        """
        Record a signal.
        """
        self.signals.append(sig)


class FakeSpawner:
    """
    A stand-in for C{spawn_worker} that records every launch.

    @ivar workers: every worker launched, in order.
    """

    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        #: Raised by the next launches, while set (as a spawn fails).
        self.error: OSError | None = None

    def __call__(self, *, argv: list[str], env: dict[str, str], job_dir: str, real_script: str,
                 events: WorkerEvents, hold: bool = False, go_dir: str | None = None, **kwargs: Any) -> FakeWorker:
        if self.error is not None:
            raise self.error
        worker = FakeWorker(argv, env, job_dir, events, hold, go_dir)
        self.workers.append(worker)
        return worker

    @property
    def running(self) -> list[FakeWorker]:
        """
        The workers that have not exited (nor are held or were given up).
        """
        return [w for w in self.workers if not w.exited and not w.waiting and not w.cancelled]


def make_root(path: str, **options: Any) -> Root:
    """
    Lay out a root for tests (host C{testhost}, port 3333) with a no-op
    executable script at C{code/noop}.
    """
    options.setdefault("host", "testhost")
    root = init_root(path, **options)
    script = root.join("code", "noop")
    with open(script, "w") as f:
        f.write("#!/bin/sh\necho done ok >&3\n")
    os.chmod(script, 0o755)
    return root


def instance_for(
    path: str,
    clock: Clock | None = None,
    ready_workers: bool = False,
    run_in_thread: Callable[..., Deferred[Any]] = syncNow,
    **options: Any,
) -> tuple[Any, FakeSpawner, Clock]:
    """
    An L{Instance} on a fresh root with a L{FakeSpawner} and a L{Clock}
    (not started); C{ready_workers} and C{run_in_thread} (default: at once,
    in this thread) as for L{Instance}.
    """
    from rqtwisted.supervisor import Instance

    root = make_root(path, **options)
    clock = clock or Clock()
    clock.advance(1_300_000_000)
    spawner = FakeSpawner()
    instance = Instance(root, root.load_config(), clock, immediateSyncer(), spawner, base_env={"PATH": "/bin"},
                        ready_workers=ready_workers, run_in_thread=run_in_thread)
    return instance, spawner, clock
