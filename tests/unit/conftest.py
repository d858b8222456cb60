"""
Fixtures the unit tests share.

  - C{handlers}: a private copy of the built-in handler registry, so a test
    may register its own in-process handlers.
  - C{started}: an in-memory instance (fake spawner, L{Clock}) with a started
    queue C{test} running C{./code/noop}; C{(instance, spawner, clock)}.
"""

from __future__ import annotations

from typing import Any

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
