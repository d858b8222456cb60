"""
Tests for L{rqtwisted.threads}.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from rqtwisted.threads import SerialThread

TIMEOUT = 10


@pytest.fixture
def serial() -> Any:
    thread = SerialThread(reactor, "test-serial")
    thread.start()
    yield thread
    thread.stop()


@pytest_twisted.ensureDeferred
async def test_result_on_the_reactor_thread(serial: SerialThread) -> None:
    """
    The call runs in the serial thread; its result fires the Deferred on the
    reactor thread.
    """
    main = threading.get_ident()
    ran_in: list[int] = []

    def work(a: int, b: int) -> int:
        ran_in.append(threading.get_ident())
        return a + b

    fired_in: list[int] = []
    d = serial(work, 2, 3)
    d.addCallback(lambda r: fired_in.append(threading.get_ident()) or r)
    assert await d.addTimeout(TIMEOUT, reactor) == 5
    assert ran_in and ran_in[0] != main
    assert fired_in == [main]


@pytest_twisted.ensureDeferred
async def test_failure_and_order(serial: SerialThread) -> None:
    """
    An exception becomes a failed Deferred; calls run in the order asked,
    one at a time, and the thread goes on after a failure.
    """
    seen: list[int] = []

    def boom() -> None:
        raise ValueError("no")

    ds = [serial(seen.append, n) for n in range(3)]
    failing = serial(boom)
    ds += [serial(seen.append, n) for n in range(3, 6)]
    with pytest.raises(ValueError):
        await failing.addTimeout(TIMEOUT, reactor)
    for d in ds:
        await d.addTimeout(TIMEOUT, reactor)
    assert seen == list(range(6))


def test_stop_runs_what_was_asked() -> None:
    """
    L{SerialThread.stop} lets the calls asked for before it run, then ends
    the thread.
    """
    from twisted.internet.task import Clock

    class Reactor(Clock):
        def callFromThread(self, f: Any, *args: Any) -> None:
            f(*args)

    thread = SerialThread(Reactor(), "test-stop")
    thread.start()
    seen: list[int] = []
    results = [thread(seen.append, n) for n in range(50)]
    thread.stop()
    assert seen == list(range(50))
    assert all(d.called for d in results)
    assert thread._thread is None
