"""
Tests for the C{twistd rq} plugin and L{rqtwisted.tap}.
"""

from __future__ import annotations

import gc
import json
import os

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage

from rqtwisted import tap
from rqtwisted.root import DEFAULT_QUEUES


def test_plugin_is_discoverable():
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    assert "rq" in makers
    assert makers["rq"].module == "rqtwisted.tap"


def test_root_defaults_to_env_then_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("RQ_ROOT", str(tmp_path / "a"))
    opts = tap.Options()
    opts.parseOptions([])
    assert opts["root"] == str(tmp_path / "a")
    monkeypatch.delenv("RQ_ROOT")
    monkeypatch.chdir(tmp_path)
    opts = tap.Options()
    opts.parseOptions([])
    assert opts["root"] == str(tmp_path)


@pytest.mark.parametrize("port", ["eighty", "99999", "65536", "-1", ""])
def test_bad_port_is_a_usage_error(tmp_path, port):
    """
    A C{--port} that is not a port from 0 to 65535 is a usage error naming
    the option (99999 used to reach bind and die with a traceback).
    """
    with pytest.raises(usage.UsageError, match=f"--port must be an integer from 0 to 65535, not {port!r}"):
        tap.Options().parseOptions(["--root", str(tmp_path), "--port", port])


def test_port_option_is_a_number(tmp_path):
    opts = tap.Options()
    opts.parseOptions(["--root", str(tmp_path), "--port", "65535"])
    assert opts["port"] == 65535


def test_make_service_lays_out_empty_root(tmp_path):
    opts = tap.Options()
    opts.parseOptions(["--root", str(tmp_path / "r"), "--host", "h1", "--port", "4444", "--env", "prod"])
    service = tap.makeService(opts, MemoryReactorClock())
    root = tmp_path / "r"
    config = json.loads((root / "config" / "config.json").read_text())
    assert config["host"] == "h1" and config["port"] == 4444 and config["env"] == "prod"
    for name in DEFAULT_QUEUES:
        assert json.loads((root / "queue" / name / "config.json").read_text())["name"] == name
    assert os.path.islink(root / "queue")
    instance = service.getServiceNamed("instance")
    assert instance.settings.port == 4444


def test_make_service_keeps_existing_root_and_overrides(tmp_path):
    opts = tap.Options()
    opts.parseOptions(["--root", str(tmp_path), "--port", "5555"])
    tap.makeService(opts, MemoryReactorClock())
    before = (tmp_path / "config" / "config.json").read_text()
    opts = tap.Options()
    opts.parseOptions(["--root", str(tmp_path), "--port", "6666"])
    service = tap.makeService(opts, MemoryReactorClock())
    assert (tmp_path / "config" / "config.json").read_text() == before
    assert service.getServiceNamed("instance").settings.port == 6666


def test_heap_settled_once_running(tmp_path):
    """
    Once the reactor runs, the objects loaded at start are frozen out of
    the cyclic collector's reach and young objects are collected every
    L{tap.GC_YOUNG_THRESHOLD} allocations, the older generations as before.
    """
    reactor = MemoryReactorClock()
    opts = tap.Options()
    opts.parseOptions(["--root", str(tmp_path)])
    before = gc.get_threshold()
    tap.makeService(opts, reactor)
    [(call, args, kwargs)] = [hook for hook in reactor.whenRunningHooks if hook[0] is tap.settle_heap]
    try:
        call(*args, **kwargs)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (tap.GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_web_port_in_use_is_one_line_not_a_traceback():
    """
    A web address that cannot be listened on (a port in use) ends the
    daemon with one line naming it, not Twisted's traceback.
    """
    import errno as errno_module

    from twisted.internet.error import CannotListenError

    class Busy(MemoryReactorClock):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            raise CannotListenError(interface, port, OSError(errno_module.EADDRINUSE, "Address already in use"))

    server = tap.WebServer(object(), 3333, object(), interface="127.0.0.1", reactor=Busy())
    with pytest.raises(SystemExit) as e:
        server.privilegedStartService()
    assert str(e.value) == "rq: cannot listen on 127.0.0.1:3333: [Errno 98] Address already in use"
