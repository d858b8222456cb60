"""
Tests for L{rqtwisted.admin.AdminServer}: the admin socket's file.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from rqtwisted.admin import AdminFactory, AdminServer


def server(tmp_path: Path) -> tuple[AdminServer, str]:
    """
    An admin server on C{<tmp_path>/rq.sock}, listening, with no API.
    """
    path = str(tmp_path / "rq.sock")
    admin = AdminServer(path, AdminFactory(object(), str(tmp_path / "spill")), reactor, mode=0o600)
    admin.startService()
    return admin, path


@pytest_twisted.ensureDeferred
async def test_stopping_removes_its_own_socket(tmp_path: Path) -> None:
    """
    The socket it made (mode 0600) is removed when the server stops.
    """
    admin, path = server(tmp_path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    await admin.stopService()
    assert not os.path.lexists(path)


@pytest_twisted.ensureDeferred
async def test_stopping_leaves_a_socket_that_is_not_its_own(tmp_path: Path) -> None:
    """
    A socket another process bound at the same path (after ours was
    removed) stays when the server stops: that process is still reachable.
    """
    admin, path = server(tmp_path)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(path)
        other.listen(1)
        before = os.stat(path).st_ino
        await admin.stopService()
        assert os.stat(path).st_ino == before
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.close()
    finally:
        other.close()


@pytest_twisted.ensureDeferred
async def test_stopping_after_the_socket_was_removed(tmp_path: Path) -> None:
    """
    A removed socket file is no error when the server stops.
    """
    admin, path = server(tmp_path)
    os.unlink(path)
    await admin.stopService()
    assert not os.path.lexists(path)
