"""
Tests for L{rqtwisted.matcher}: the match itself (as the child runs it), the
child's line protocol, and L{ProcessMatcher} driven through fake process
transports on a L{Clock}: one request at a time, the child killed when a
match runs over the router's limit, a fresh child for the next message.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from rqtwisted import router
from rqtwisted.builtin import register_handler
from rqtwisted.matcher import IDLE_EXIT, MODULE, MatcherError, ProcessMatcher, first_match, request_for, serve
from rqtwisted.rules import parse_rules
from rqtwisted.testing import instance_for
from tests.unit.test_router import route_one, write_rules
from tests.unit.test_rules import SAMPLE

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeProcess:
    """
    A process transport: what was written, signals, stdin closed.
    """

    def __init__(self, protocol: Any, argv: list[str], env: dict[str, str], pid: int) -> None:
        self.protocol = protocol
        self.argv = argv
        self.env = env
        self.pid: int | None = pid
        self.written = b""
        self.signals: list[str] = []
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, sig: str) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(sig)

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.written.splitlines()]

    def reply(self, obj: Any) -> None:
        self.protocol.outReceived(json.dumps(obj).encode() + b"\n")

    def end(self, reason: Failure) -> None:
        self.pid = None
        self.protocol.processEnded(reason)


class ProcessReactor(Clock):
    """
    A L{Clock} that also "spawns" L{FakeProcess}es (or fails to).
    """

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.fail_spawn = False

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str]) -> FakeProcess:
        if self.fail_spawn:
            raise OSError("no more processes")
        assert executable == args[0]
        process = FakeProcess(protocol, args, env, 1000 + len(self.processes))
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


RULES = parse_rules('rule "a"\n action :done\n src /^a/\n\nrule "b"\n action :relay\n dest /b/i\n route "h"\n')


def killed() -> Failure:
    return Failure(ProcessTerminated(signal=signal.SIGKILL))


# -- the match -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        {"src": "photo-12"},
        {"src": "PHOTO-1", "dest": "thumb#s"},
        {"dest": "x/thumb#s"},
        {"src": "nope", "dest": "nope"},
        {"src": 12, "dest": ["thumb#s"]},
        {},
    ],
)
def test_first_match_agrees_with_the_rules(msg: dict[str, Any]) -> None:
    rules = parse_rules(SAMPLE)
    request = json.loads(json.dumps(request_for(rules, msg)))
    index = first_match(request)
    assert (rules.default if index is None else rules.rules[index]) is rules.match(msg)


def test_request_carries_the_python_expressions() -> None:
    request = request_for(RULES, {"src": "a1", "dest": 3, "param1": "x"})
    assert request == {
        "rules": [[["^a", RULES.rules[0].src.pattern.flags], None], [None, ["b", RULES.rules[1].dest.pattern.flags]]],
        "src": "a1",
        "dest": None,
    }


def test_serve_answers_each_line() -> None:
    lines = [json.dumps(request_for(RULES, m)).encode() + b"\n" for m in ({"dest": "B"}, {"src": "z"})]
    out = io.BytesIO()
    serve(io.BytesIO(b"".join(lines) + b"not json\n"), out, alarm=0)
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert replies[:2] == [{"match": 1}, {"match": None}]
    assert replies[2]["error"].startswith("JSONDecodeError")


def test_child_process_answers_and_exits_at_end_of_file() -> None:
    request = json.dumps(request_for(RULES, {"src": "abc"})) + "\n"
    env = dict(os.environ, PYTHONPATH=PROJECT)
    done = subprocess.run([sys.executable, "-m", MODULE, str(os.getpid())], input=request.encode(),
                          capture_output=True, env=env, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, b'{"match": 0}\n', b"")


def test_child_alarm_ends_a_runaway_match() -> None:
    """
    The child's own alarm ends it even in the middle of a match C{re}
    cannot leave (a child whose daemon is gone, where the parent death
    signal is not available).
    """
    rules = parse_rules('rule "slow"\n action :done\n src /^(a+)+$/\n')
    request = json.dumps(request_for(rules, {"src": "a" * 40 + "!"})) + "\n"
    code = "import sys; from rqtwisted.matcher import serve; serve(sys.stdin.buffer, sys.stdout.buffer, alarm=1)"
    done = subprocess.run([sys.executable, "-c", code], input=request.encode(), capture_output=True,
                          env=dict(os.environ, PYTHONPATH=PROJECT), timeout=30)
    assert (done.returncode, done.stdout) == (-signal.SIGALRM, b"")


# -- the process matcher -------------------------------------------------------------------


def test_child_started_at_first_match_and_kept() -> None:
    reactor = ProcessReactor()
    matcher = ProcessMatcher(reactor)
    assert reactor.processes == [] and matcher.pid is None
    d = matcher(RULES, {"src": "xyz", "dest": "aBc"})
    [child] = reactor.processes
    assert child.argv == [sys.executable, "-m", MODULE, str(os.getpid())]
    assert child.env["PYTHONPATH"].split(os.pathsep)[0] == PROJECT
    assert child.requests() == [request_for(RULES, {"src": "xyz", "dest": "aBc"})]
    assert not d.called
    child.reply({"match": 1})
    assert d.result is RULES.rules[1]
    second = matcher(RULES, {"src": "q"})
    child.reply({"match": None})
    assert second.result is RULES.default
    assert reactor.processes == [child] and matcher.pid == child.pid


def test_one_request_at_a_time() -> None:
    reactor = ProcessReactor()
    matcher = ProcessMatcher(reactor)
    first = matcher(RULES, {"src": "a1"})
    second = matcher(RULES, {"src": "a2"})
    [child] = reactor.processes
    assert [r["src"] for r in child.requests()] == ["a1"]
    child.reply({"match": 0})
    assert [r["src"] for r in child.requests()] == ["a1", "a2"]
    child.reply({"match": None})
    assert (first.result, second.result) == (RULES.rules[0], RULES.default)


def test_cancel_kills_the_child_and_the_next_gets_a_fresh_one() -> None:
    reactor = ProcessReactor()
    matcher = ProcessMatcher(reactor)
    stuck = matcher(RULES, {"src": "a" * 40 + "!"})
    waiting = matcher(RULES, {"src": "a2"})
    [old] = reactor.processes
    stuck.cancel()
    assert old.signals == ["KILL"]
    assert stuck.result.check(CancelledError)
    stuck.addErrback(lambda _: None)
    assert len(reactor.processes) == 1  # the next request waits for the reactor
    reactor.advance(0)
    [_, new] = reactor.processes
    assert [r["src"] for r in new.requests()] == ["a2"]
    old.end(killed())  # the killed child's end changes nothing
    new.reply({"match": 0})
    assert waiting.result is RULES.rules[0]
    assert matcher.pid == new.pid


def test_cancel_of_a_queued_request_leaves_the_child() -> None:
    reactor = ProcessReactor()
    matcher = ProcessMatcher(reactor)
    running = matcher(RULES, {"src": "a1"})
    queued = matcher(RULES, {"src": "a2"})
    queued.cancel()
    queued.addErrback(lambda _: None)
    [child] = reactor.processes
    child.reply({"match": 0})
    assert running.result is RULES.rules[0]
    assert child.signals == [] and len(child.requests()) == 1


def test_child_death_fails_the_match_and_the_next_restarts() -> None:
    reactor = ProcessReactor()
    matcher = ProcessMatcher(reactor)
    d = matcher(RULES, {"src": "a"})
    reactor.processes[0].end(killed())
    failure = d.result
    d.addErrback(lambda _: None)
    assert failure.check(MatcherError) and "rule matcher ended" in failure.getErrorMessage()
    again = matcher(RULES, {"src": "a"})
    reactor.processes[1].reply({"match": 0})
    assert again.result is RULES.rules[0]


@pytest.mark.parametrize("reply", [b'{"match": 2}\n', b'{"match": "0"}\n', b"[]\n", b"x" * 5000])
def test_bad_reply_kills_the_child(reply: bytes) -> None:
    reactor = ProcessReactor()
    matcher = ProcessMatcher(reactor)
    d = matcher(RULES, {"src": "a"})
    [child] = reactor.processes
    child.protocol.outReceived(reply)
    assert child.signals == ["KILL"]
    assert d.result.check(MatcherError)
    d.addErrback(lambda _: None)
    assert matcher.pid is None


def test_error_reply_fails_only_that_match() -> None:
    reactor = ProcessReactor()
    matcher = ProcessMatcher(reactor)
    d = matcher(RULES, {"src": "a"})
    [child] = reactor.processes
    child.reply({"error": "TypeError: boom"})
    assert d.result.check(MatcherError) and "boom" in d.result.getErrorMessage()
    d.addErrback(lambda _: None)
    assert child.signals == [] and matcher.pid == child.pid


def test_spawn_failure_fails_the_match() -> None:
    reactor = ProcessReactor()
    reactor.fail_spawn = True
    d = ProcessMatcher(reactor)(RULES, {"src": "a"})
    assert d.result.check(MatcherError) and "cannot start the rule matcher" in d.result.getErrorMessage()
    d.addErrback(lambda _: None)


def test_idle_child_told_to_exit() -> None:
    reactor = ProcessReactor()
    matcher = ProcessMatcher(reactor)
    matcher(RULES, {"src": "a"})
    [child] = reactor.processes
    child.reply({"match": 0})
    reactor.advance(IDLE_EXIT - 1)
    matcher(RULES, {"src": "a"})
    child.reply({"match": 0})
    reactor.advance(IDLE_EXIT - 1)
    assert not child.stdin_closed
    reactor.advance(1)
    assert child.stdin_closed and child.signals == [] and matcher.pid is None
    child.end(Failure(ProcessDone(0)))
    matcher(RULES, {"src": "a"})
    assert len(reactor.processes) == 2


# -- the router with its real handler --------------------------------------------------------


@pytest.fixture
def router_on_fake_processes(tmp_path, handlers):
    """
    An instance whose reactor spawns L{FakeProcess}es, its C{rq_router}
    handler made by L{router.make_handler}; C{local} paused.
    """
    reactor = ProcessReactor()
    instance, spawner, clock = instance_for(str(tmp_path / "root"), clock=reactor)
    register_handler("rq_router", router.make_handler)
    instance.create_queue({"name": "local", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    instance.set_admin("pause", "local")
    return instance, reactor


def test_router_match_over_the_limit_kills_the_child(router_on_fake_processes) -> None:
    instance, reactor = router_on_fake_processes
    write_rules(instance, 'rule "evil"\n action :done\n src /^(a+)+$/\n\nrule "ok"\n action :done\n src /^ok/\n')
    queue = instance.queue("rq_router")
    msg_id, msg = route_one(instance, reactor, src="a" * 40 + "!")
    [child] = reactor.processes
    assert child.requests()[0]["src"] == "a" * 40 + "!"
    assert msg["state"] == "run"
    reactor.advance(router.MAX_RUN - 1)
    assert queue.get(msg_id)["state"] == "run" and child.signals == []
    reactor.advance(1)
    assert child.signals == ["KILL"]
    assert (queue.get(msg_id)["state"], queue.get(msg_id)["status"]) == ("err", "err - router ran over 60 seconds")
    child.end(killed())
    second, msg = route_one(instance, reactor, src="ok-1")
    [_, fresh] = reactor.processes
    fresh.reply({"match": 1})
    assert queue.get(second)["status"] == "done - router processed a done"


def test_router_queue_stop_kills_the_child(router_on_fake_processes) -> None:
    instance, reactor = router_on_fake_processes
    write_rules(instance, 'rule "evil"\n action :done\n src /^(a+)+$/\n')
    msg_id, msg = route_one(instance, reactor, src="a" * 40 + "!")
    [child] = reactor.processes
    instance.queue("rq_router").stopService()
    assert child.signals == ["KILL"]
    # Left in run/, for the next start, like a killed script's message.
    assert os.path.isdir(os.path.join(instance.root.queue_path("rq_router"), "run", msg_id))
