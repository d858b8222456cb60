"""
Blocking work off the reactor thread: the two thread pools of the daemon.

L{fsync_pool} is a dedicated one-thread pool for the store's fsync rounds
(L{rqtwisted.durable.Syncer}), so that long file work never queues behind
them; L{reactor_pool} is the reactor's own pool, for everything else
(hashing attachments, the cleaner's deletions).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

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


def fsync_pool(reactor: Any) -> ThreadRunner:
    """
    C{deferToThreadPool} on a small dedicated pool for fsyncs, stopped with
    the reactor.
    """
    pool = ThreadPool(minthreads=1, maxthreads=1, name="rq-fsync")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    return partial(deferToThreadPool, reactor, pool)
