"""
C{rq} failures (spec/cli.md): one C{fail <reason>} line on stdout, exit 1,
never a traceback.
"""

from __future__ import annotations

import socket

import pytest

from rqtwisted.admin import MAX_CONNECTIONS
from rqtwisted.admincommands import SOCKET
from tests.integration.conftest import Daemon, wait_for

pytestmark = pytest.mark.integration


def assert_fail(result: tuple[int, list[str]], reason: str | None = None) -> None:
    code, out = result
    assert code == 1, result
    assert len(out) == 1 and out[0].startswith("fail "), result
    if reason is not None:
        assert out[0] == f"fail {reason}", result


def test_refusals(daemon: Daemon) -> None:
    daemon.queue_with_script("test", 'echo "done" >&3\n')
    base = f"http://localhost:{daemon.port}/q"

    assert_fail(daemon.rq("sendmesg", "--dest", "nope"), "Queue not found")
    assert_fail(daemon.rq("statusmesg", "--msg_id", f"{base}/nope/20240101.0000.00.000.000000000"), "Queue not found")
    # Missing options.
    code, out = daemon.rq("sendmesg")
    assert_fail((code, out))
    assert "dest" in out[0]
    code, out = daemon.rq("statusmesg")
    assert_fail((code, out))
    assert "msg_id" in out[0]
    # An unknown message of a known queue.
    assert_fail(daemon.rq("statusmesg", "--msg_id", f"{base}/test/20240101.0000.00.000.000000000"), "msg not found")
    assert_fail(daemon.rq("state", "--msg_id", f"{base}/test/20240101.0000.00.000.000000000"), "msg not found")
    # A URL dest without --relay-ok.
    assert_fail(daemon.rq("sendmesg", "--dest", "http://elsewhere:3333/q/test"), "Cannot relay message")
    # Committing a message that is not prepared.
    full = daemon.send("test")
    daemon.wait_state(full, "done")
    assert_fail(daemon.rq("commitmesg", "--msg_id", full), "cannot find message")
    # Cloning a message that is not finished.
    prepped = daemon.ok("prepmesg", "--dest", "test")
    assert_fail(daemon.rq("clone", "--msg_id", prepped))
    # Counts are read for their leading integer, as the original read them,
    # and refused out of range.
    prepped = daemon.ok("prepmesg", "--dest", "test", "--count", "1e3", "--max_count", "7.9")
    assert daemon.ok("statuscountmesg", "--msg_id", prepped) == "1"
    assert daemon.show(prepped)["max_count"] == 7
    assert_fail(daemon.rq("sendmesg", "--dest", "test", "--max_count", "-1"),
                "invalid max_count field (-1): it must be from 0 to 2147483647")
    assert_fail(daemon.rq("sendmesg", "--dest", "test", "--count", "9" * 300),
                f"invalid count field ({'9' * 64}...): it must be from 0 to 2147483647")


def test_daemon_not_running(no_daemon: Daemon) -> None:
    no_daemon.root.mkdir()
    for args in (("ping",), ("sendmesg", "--dest", "test"), ("status",), ("queues",)):
        result = no_daemon.rq_full(*args)
        assert result.returncode == 1, (args, result)
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fail "), (args, result)
        assert "Traceback" not in result.stderr


def test_unknown_and_missing_command(no_daemon: Daemon) -> None:
    result = no_daemon.rq_full("bogus", "--name", "x")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["Command not found: bogus (cmd_bogus)"]

    for args in ((), ("-h",), ("--help",)):
        result = no_daemon.rq_full(*args)
        assert result.returncode == 1, args
        lines = result.stdout.splitlines()
        assert lines[0] == "Valid commands are:", args
        assert "sendmesg" in lines and "statusmesg" in lines


def test_too_many_admin_connections(daemon: Daemon) -> None:
    """
    With as many admin connections open as the daemon allows, C{rq} is
    turned away with one C{fail} line saying so (and the daemon logs one
    warning, not one per connection); once they close, C{rq} is answered
    again.
    """
    path = str(daemon.root / SOCKET)
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            idle.append(s)
        for _ in range(3):
            assert_fail(
                daemon.rq("ping"),
                f"rq daemon at {path} turned the connection away:"
                f" too many admin connections open ({MAX_CONNECTIONS}); try again later",
            )
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: daemon.rq("ping") == (0, ["ok pong"]), 10, what="the daemon answering again")
    assert daemon.log_text().count("admin connections turned away") == 1
