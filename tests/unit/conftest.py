"""
Fixtures the unit tests share.

  - C{handlers}: a private copy of the built-in handler registry, so a test
    may register its own in-process handlers.
  - C{started}: an in-memory instance (fake spawner, L{Clock}) with a started
    queue C{test} running C{./code/noop}; C{(instance, spawner, clock)}.
  - C{no_hang}: fails the test if it blocks for good (SIGALRM).
"""

from __future__ import annotations

import signal
from typing import Any, Iterator

import pytest
from twisted.internet.task import Clock

from rqtwisted import builtin
from rqtwisted.testing import FakeSpawner, instance_for


@pytest.fixture
def handlers(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """
    A private copy of the registry, restored after the test.
    """
    monkeypatch.setattr(builtin, "HANDLERS", dict(builtin.HANDLERS))
    return builtin.HANDLERS


@pytest.fixture
def started(tmp_path: Any) -> tuple[Any, FakeSpawner, Clock]:
    """
    An instance on C{<tmp_path>/root} with the started queue C{test}.
    """
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.create_queue({"name": "test", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    return instance, spawner, clock


@pytest.fixture
def no_hang() -> Iterator[None]:
    """
    Fail, rather than hang, a test whose blocking call would never return.
    """

    def expired(signum: int, frame: object) -> None:
        raise AssertionError("blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
