"""
Tests for L{rqtwisted.admin.AdminServer} (the admin socket's file) and
L{rqtwisted.admin.PromptServer} (its connections' writes).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor

from rqtwisted.admin import AdminFactory, AdminServer, PromptServer


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


def _prompt_server() -> tuple[PromptServer, socket.socket, MemoryReactor]:
    """
    A L{PromptServer} on one end of a socket pair, on a memory reactor
    (whose turns never come: anything sent was sent by C{write} itself).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    clock = MemoryReactor()
    server = PromptServer(ours, Protocol(), b"", None, 1, clock)
    return server, theirs, clock


def test_an_answer_is_sent_at_once() -> None:
    """
    With nothing buffered, a write is sent before the reactor turns: the
    peer can read it, and the transport does not ask to be told when it
    can write.
    """
    server, theirs, clock = _prompt_server()
    server.write(b"answer one")
    assert theirs.recv(100) == b"answer one"
    assert server not in clock.writers
    server.write(b"answer two")
    assert theirs.recv(100) == b"answer two"
    assert server.dataBuffer == b"" and not server._tempDataLen


def test_what_does_not_fit_is_buffered_in_order() -> None:
    """
    When the socket's buffer fills, the rest waits for the reactor, and a
    later write goes after it, not before: the peer gets every byte, in
    order, once the transport writes as the reactor tells it to.
    """
    server, theirs, clock = _prompt_server()
    big = bytes(range(256)) * 4096  # 1 MiB: more than a socket buffer holds
    server.write(big)
    assert server in clock.writers
    server.write(b"after")
    received = bytearray()
    while len(received) < len(big) + 5:
        try:
            received += theirs.recv(1 << 20)
        except BlockingIOError:
            assert server in clock.writers
            server.doWrite()
    assert bytes(received) == big + b"after"


def test_a_write_to_a_closed_peer_ends_the_connection_as_usual() -> None:
    """
    A send that fails is left to Twisted's buffered path, which finds the
    error again when the reactor lets it write and reports it.
    """
    server, theirs, clock = _prompt_server()
    theirs.close()
    server.write(b"nobody listens")
    assert server in clock.writers
    assert server.doWrite() is not None
