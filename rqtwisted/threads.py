"""
Blocking work off the reactor thread: the daemon's two kinds of worker threads.

L{fsync_pool} is a dedicated thread for the store's fsync rounds
(L{rqtwisted.durable.Syncer}), so that long file work never queues behind
them; L{reactor_pool} is the reactor's own pool, for everything else
(hashing attachments, the cleaner's deletions).
"""

from __future__ import annotations

import queue as _queue
import threading
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

#: C{run(f, *args)}: call C{f(*args)} in a thread, a Deferred of its result.
ThreadRunner = Callable[..., Deferred[Any]]


def reactor_pool(reactor: Any) -> ThreadRunner:
    """
    C{deferToThreadPool} on the reactor's thread pool, looked up at each
    call (the pool exists only once the reactor is asked for it).
    """

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def run_here(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    A L{ThreadRunner} that calls C{f(*args)} at once in the calling thread:
    for stores used without a reactor (tests, offline tools).
    """
    try:
        return succeed(f(*args))
    except BaseException:
        return fail(Failure())


class SerialThread:
    """
    One thread that runs calls one after the other, each answered with a
    L{Deferred} fired on the reactor thread.

    Lighter than a one-thread L{ThreadPool} for a stream of short calls:
    one queue hand-off in, one C{callFromThread} out.
    """

    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self._name = name
        self._calls: _queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]] | None] = (
            _queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """
        Start the thread.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """
        Let the calls asked for so far run, then end the thread.
        """
        if self._thread is not None:
            self._calls.put(None)
            self._thread.join()
            self._thread = None

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{f(*args)} in the thread; a Deferred of its result.
        """
        d: Deferred[Any] = Deferred()
        self._calls.put((f, args, d))
        return d

    def _run(self) -> None:
        calls = self._calls
        callFromThread = self._reactor.callFromThread
        while True:
            call = calls.get()
            if call is None:
                return
            f, args, d = call
            try:
                result = f(*args)
            except BaseException:
                callFromThread(d.errback, Failure())
            else:
                callFromThread(d.callback, result)


def fsync_pool(reactor: Any) -> ThreadRunner:
    """
    A dedicated thread for fsyncs (a L{SerialThread}), started with the
    reactor and stopped with it.
    """
    thread = SerialThread(reactor, "rq-fsync")
    reactor.callWhenRunning(thread.start)
    reactor.addSystemEventTrigger("during", "shutdown", thread.stop)
    return thread
