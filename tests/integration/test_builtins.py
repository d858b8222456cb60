"""
The built-in queues and queue features end to end, with the real daemon:
post-run webhooks received by a twisted.web server on loopback, the cleaner
on a root holding thousands of synthetic done messages, the router's rules,
coalescing, and message operations from the command line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rqtwisted.ampclient import AdminClient
from rqtwisted.message import hashed_subpath, make_msg_id

from .conftest import Daemon, alive, children_of, free_port, wait_for

pytestmark = pytest.mark.integration

DAY = 86400

#: A webhook receiver: records each POST as a JSON line, answers the given
#: status codes in turn (then 200).
RECEIVER = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import reactor
    from twisted.web import resource, server

    port, out = int(sys.argv[1]), sys.argv[2]
    codes = [int(c) for c in sys.argv[3].split(",") if c]

    class Hook(resource.Resource):
        isLeaf = True

        def render_POST(self, request):
            args = {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()}
            record = {"uri": request.uri.decode(), "type": request.getHeader("content-type"), "args": args}
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\\n")
            request.setResponseCode(codes.pop(0) if codes else 200)
            return b"thanks"

    reactor.listenTCP(port, server.Site(Hook()), interface="127.0.0.1")
    reactor.run()
    """
)


@pytest.fixture
def receiver(tmp_path: Path):
    """
    Start the receiver on a free loopback port; yields C{(url, records)}
    where C{records()} reads what it received.
    """
    started: list[subprocess.Popen] = []

    def start(codes: str = "") -> tuple[str, object]:
        port = free_port()
        script = tmp_path / "receiver.py"
        script.write_text(RECEIVER)
        out = tmp_path / f"received-{port}.jsonl"
        proc = subprocess.Popen([sys.executable, str(script), str(port), str(out), codes],
                                stdin=subprocess.DEVNULL)
        started.append(proc)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 20, what="webhook receiver")

        def records() -> list[dict]:
            if not out.exists():
                return []
            return [json.loads(line) for line in out.read_text().splitlines()]

        return f"http://127.0.0.1:{port}/hook/in?k=v", records

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def amp_create(daemon: Daemon, message: dict) -> str:
    status, detail = AdminClient(str(daemon.root / "config" / "rq.sock")).call(
        "CreateMessage", message=json.dumps(message), method="commit", relay_ok=""
    )
    assert status == "ok", detail
    return detail


def counts(daemon: Daemon, name: str) -> dict:
    for q in daemon.status_json()["queues"]:
        if q["name"] == name:
            return q["counts"]
    raise AssertionError(f"no queue {name}")


# -- webhook ---------------------------------------------------------------------------


def test_webhook_posts_finished_message(daemon: Daemon, receiver) -> None:
    url, records = receiver("500")
    daemon.queue_with_script("hooked", """
        echo "done all copied" >&3
    """)
    full = amp_create(daemon, {"dest": "hooked", "param1": "p1", "post_run_webhook": [url]})
    daemon.wait_state(full, "done")
    # The first POST gets 500: resend after count²·60 = 0 s; the second 200.
    got = wait_for(lambda: len(records()) >= 2 and records(), 20, what="two webhook posts")
    first, second = got  # type: ignore[misc]
    assert second["uri"] == "/hook/in?k=v"
    assert second["type"] == "application/x-www-form-urlencoded"
    # The query string stays in the URL; the form has exactly two fields.
    assert sorted(second["args"]) == ["k", "payload", "x_format"] and second["args"]["k"] == ["v"]
    assert second["args"]["x_format"] == ["json"]
    payload = json.loads(second["args"]["payload"][0])
    assert payload["msg_id"] == full and payload["state"] == "done"
    assert payload["param1"] == "p1" and payload["post_run_webhook"] == [url]
    assert "status" not in payload and "path" not in payload
    assert first["args"] == second["args"]
    # The call is a visible message of the webhook queue, done after a retry.
    assert counts(daemon, "webhook")["done"] == 1
    hook_dir = daemon.root / "queue" / "webhook" / "done"
    [hook_msg] = [p for p in hook_dir.glob("*/*/*/*")]
    status = json.loads((hook_msg / "status").read_text())
    msg = json.loads((hook_msg / "msg").read_text())
    assert status == {"job_status": "successfull post 200"}
    assert (msg["param1"], msg["count"]) == (url, 1)
    assert json.loads(msg["param2"]) == payload


def test_webhook_gives_up_on_unreachable_url(daemon: Daemon) -> None:
    port = free_port()  # nothing listens there
    full = amp_create(daemon, {"dest": "webhook", "param1": f"http://127.0.0.1:{port}/x", "param2": "{}",
                               "count": 16, "max_count": 20})
    daemon.wait_state(full, "err")
    assert daemon.statusmesg(full) == ["ok err - RQ_COUNT > 15 - failing"]
    refused = amp_create(daemon, {"dest": "webhook", "param1": f"http://127.0.0.1:{port}/x", "param2": "{}",
                                  "count": 2})
    wait_for(lambda: daemon.statusmesg(refused)[0].startswith("ok que - 240-post to"), 20, what="a resend")
    assert daemon.show(refused)["count"] == 3


# -- cleaner --------------------------------------------------------------------------


def synthesize(root: Path, queue: str, state: str, when: float, n: int, first: int) -> list[str]:
    ids = []
    for i in range(first, first + n):
        msg_id = make_msg_id(when + (i % 50), i)
        mdir = root / "queue" / queue / state / hashed_subpath(msg_id)
        (mdir / "job").mkdir(parents=True)
        (mdir / "msg").write_text(json.dumps({"msg_id": msg_id, "dest": queue, "count": 0}))
        (mdir / "status").write_text('{"job_status": "done"}')
        ids.append(msg_id)
    return ids


def test_cleaner_on_thousands_of_done_messages(no_daemon: Daemon) -> None:
    daemon = no_daemon
    code, out = daemon.rq("init", "--host", "localhost", "--port", str(daemon.port))
    assert code == 0, out
    qdir = daemon.root / "queue" / "bulk"
    qdir.mkdir()
    (qdir / "config.json").write_text(json.dumps({"name": "bulk", "script": "./code/bulk.sh", "exec_prefix": ""}))
    daemon.script("bulk.sh", 'echo "done" >&3\n')
    now = time.time()
    kept: list[str] = []
    removed: list[str] = []
    serial = 1
    for age_days, n in ((0.2, 300), (1.5, 300), (2.5, 400), (4, 500), (9, 500)):
        ids = synthesize(daemon.root, "bulk", "done", now - age_days * DAY, n, serial)
        serial += n
        (kept if age_days < 2 else removed).extend(ids)
    synthesize(daemon.root, "bulk", "relayed", now - 30 * DAY, 100, serial)
    # A second queue, left alone by the first run, cleaned by ALLQUEUES:
    # old and recent done messages, acknowledged (err/.<id>) and plain errors.
    odir = daemon.root / "queue" / "other"
    odir.mkdir()
    (odir / "config.json").write_text(json.dumps({"name": "other", "script": "./code/bulk.sh", "exec_prefix": ""}))
    other_old = synthesize(daemon.root, "other", "done", now - 5 * DAY, 200, 10_000)
    other_new = synthesize(daemon.root, "other", "done", now - 0.5 * DAY, 100, 20_000)
    errs = {}
    for label, age, acked in (("old_acked", 5, True), ("new_acked", 0.5, True), ("old_plain", 5, False)):
        msg_id = make_msg_id(now - age * DAY, 30_000 + len(errs))
        name = "." + msg_id if acked else msg_id
        (odir / "err" / name / "job").mkdir(parents=True)
        (odir / "err" / name / "msg").write_text(json.dumps({"msg_id": msg_id, "dest": "other"}))
        errs[label] = name
    daemon.start()
    assert counts(daemon, "bulk")["done"] == 2000
    assert counts(daemon, "bulk")["relayed"] == 100
    full = daemon.send("cleaner", "--param1", "bulk", "--param2", "2")
    daemon.wait_state(full, "done", timeout=60)
    assert daemon.statusmesg(full) == ["ok done - successfully ran this script"]
    left = {p.name for p in (daemon.root / "queue" / "bulk" / "done").glob("*/*/*/*")}
    assert left == set(kept) and not left & set(removed)
    assert not list((daemon.root / "queue" / "bulk" / "relayed").glob("*/*/*/*"))
    assert counts(daemon, "bulk")["done"] == len(kept) == 600
    assert counts(daemon, "bulk")["relayed"] == 0
    assert not [n for n in os.listdir(qdir / "tmp") if n.startswith("cleaner-")]
    assert {p.name for p in (odir / "done").glob("*/*/*/*")} == set(other_old + other_new)
    # ALLQUEUES: every queue, acknowledged errors too (plain errors stay).
    full = daemon.send("cleaner", "--param1", "ALLQUEUES", "--param2", "2")
    daemon.wait_state(full, "done", timeout=60)
    assert daemon.statusmesg(full) == ["ok done - successfully ran this script"]
    assert {p.name for p in (odir / "done").glob("*/*/*/*")} == set(other_new)
    assert sorted(os.listdir(odir / "err")) == sorted([errs["new_acked"], errs["old_plain"]])
    assert counts(daemon, "other")["done"] == 100
    assert {p.name for p in (daemon.root / "queue" / "bulk" / "done").glob("*/*/*/*")} == set(kept)
    # The queue still works: a new message lands in today's bucket.
    new = daemon.send("bulk")
    daemon.wait_state(new, "done")
    assert counts(daemon, "bulk")["done"] == 601
    # Unknown queue and missing PARAM1 are refused with the original's texts.
    bad = daemon.send("cleaner", "--param1", "nosuch")
    daemon.wait_state(bad, "err")
    assert daemon.statusmesg(bad) == ["ok err - the specified queue nosuch does not exist"]
    bad = daemon.send("cleaner")
    daemon.wait_state(bad, "err")
    assert daemon.statusmesg(bad) == ["ok err - need to specify a PARAM1"]


# -- router ---------------------------------------------------------------------------


RULES = """\
# routes of this test
rule "photos"
  action :balance
  src /^photo-/
  route "http://peer.invalid:3333/q/photos"
  log true

rule "fan"
  action :relay
  src /^fan/
  route "hosta", "hostb:4000"

rule "drop"
  action :done
  src /^drop/
  delay 1
"""


def test_router_rules_end_to_end(daemon: Daemon) -> None:
    rules = daemon.root / "config" / "rq_router_rules.rb"
    rules.write_text(RULES)
    code, out = daemon.rq("verify_rules", "--path", str(rules))
    assert (code, out) == (0, ["ok"])
    daemon.ok("pause", "--name", "relay")

    photo = daemon.send("rq_router", "--src", "photo-7")
    daemon.wait_state(photo, "done")
    [status] = daemon.statusmesg(photo)
    assert status.startswith(f"ok done - DUP to {daemon.base_url}q/relay/")
    copy = daemon.show(status.split("DUP to ", 1)[1])
    assert (copy["dest"], copy["src"], copy["orig_msg_id"]) == ("http://peer.invalid:3333/q/photos", "photo-7", photo)

    fan = daemon.send("rq_router", "--src", "fan-1", "--param1", "x")
    daemon.wait_state(fan, "done")
    assert daemon.statusmesg(fan) == ["ok done - done relay of 2 messages"]
    assert counts(daemon, "relay")["que"] == 3

    sent = time.time()
    drop = daemon.send("rq_router", "--src", "drop-it")
    daemon.wait_state(drop, "done")
    assert time.time() - sent >= 1
    assert daemon.statusmesg(drop) == ["ok done - router processed a done"]
    log = (daemon.msg_dir(drop) / "job" / "stdio.log").read_text()
    assert "rule 'drop' (line 13): action done" in log and "delay 1 seconds" in log

    other = daemon.send("rq_router", "--src", "mystery")
    daemon.wait_state(other, "err")
    assert daemon.statusmesg(other) == ["ok err - router processed an err"]

    log = (daemon.root / "log" / "rq_router.log").read_text().splitlines()
    assert [line.split(" - ")[2:] for line in log] == [
        ["photos", "balance", photo.rsplit("/", 1)[1], "photo-7"],
        ["default", "err", other.rsplit("/", 1)[1], "mystery"],
    ]

    # A broken file: verify_rules fails, the router errs and goes DOWN.
    rules.write_text(RULES + '\nrule "bad"\n  action :done\n  src ENV["X"] ? /a/ : /b/\n')
    code, out = daemon.rq("verify_rules", "--path", str(rules), "--verbose")
    assert code == 1
    assert out == ["fail bad router rules file", "line 20: not a literal value: ENV[\"X\"] ? /a/ : /b/"]
    broken = daemon.send("rq_router", "--src", "drop-it")
    daemon.wait_state(broken, "err")
    assert daemon.statusmesg(broken) == [f"ok err - Bad rule file at: {rules}"]
    assert daemon.queue_status("rq_router") == "DOWN"
    assert (daemon.root / "config" / "rq_router.down").exists()


#: Rules whose first expression backtracks for ages on C{CATASTROPHIC}.
SLOW_RULES = """\
rule "evil"
  action :done
  src /^(a+)+$/

rule "ok"
  action :done
  src /^ok/
"""

CATASTROPHIC = "a" * 40 + "!"


def matcher_children(daemon: Daemon) -> list[int]:
    """
    The daemon's rule matcher children.
    """
    found = []
    for pid in children_of(daemon.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"rqtwisted.matcher" in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def start_catastrophic_match(daemon: Daemon) -> tuple[str, int]:
    """
    Router mode on L{SLOW_RULES}, a message that hangs their first rule:
    its full id and the matcher child running it.
    """
    (daemon.root / "config" / "rq_router_rules.rb").write_text(SLOW_RULES)
    evil = daemon.send("rq_router", "--src", CATASTROPHIC)
    daemon.wait_state(evil, "run")
    [child] = wait_for(lambda: matcher_children(daemon), 10, what="the rule matcher child")
    return evil, child


def test_router_catastrophic_rule_does_not_hang_the_daemon(daemon: Daemon) -> None:
    """
    A rule matching for ages runs in the matcher child: the daemon keeps
    answering, other queues keep running, and destroying the message kills
    the child; the next message gets a fresh one.
    """
    daemon.queue_with_script("other", """
        echo "done fine" >&3
    """)
    evil, child = start_catastrophic_match(daemon)
    client = AdminClient(str(daemon.root / "config" / "rq.sock"), timeout=1.0)
    for _ in range(3):
        started = time.monotonic()
        assert client.call("Ping") == ("ok", "pong")
        assert time.monotonic() - started < 1.0
        time.sleep(0.2)
    assert daemon.rq("ping") == (0, ["ok pong"])
    other = daemon.send("other")
    daemon.wait_state(other, "done")
    assert daemon.statusmesg(other) == ["ok done - fine"]
    # Still being routed (the limit is 60 s), its match still running.
    assert daemon.state(evil) == "run" and alive(child)
    behind = daemon.send("rq_router", "--src", "ok-1")
    assert daemon.ok("destroy", "--msg_id", evil)
    wait_for(lambda: not alive(child), 10, what="the matcher child killed")
    daemon.wait_state(behind, "done")
    assert daemon.statusmesg(behind) == ["ok done - router processed a done"]
    [fresh] = matcher_children(daemon)
    assert fresh != child
    assert daemon.terminate() == 0
    wait_for(lambda: not alive(fresh), 10, what="the idle matcher child gone with the daemon")


def test_router_matcher_dies_with_the_daemon(daemon: Daemon) -> None:
    """
    A daemon killed outright takes its matcher child along, even in the
    middle of a match.
    """
    _, child = start_catastrophic_match(daemon)
    daemon.kill9()
    wait_for(lambda: not alive(child), 10, what="the matcher child gone with its daemon")


def test_verify_rules_without_daemon(no_daemon: Daemon, tmp_path: Path) -> None:
    missing = tmp_path / "none.rb"
    code, out = no_daemon.rq("verify_rules", "--path", str(missing), "--verbose")
    assert code == 1 and out[0] == "fail bad router rules file" and "cannot read" in out[1]
    bad = tmp_path / "bad.rb"
    bad.write_text(RULES + "\n# trailing\nrule 'x'\n  action :done\n  src /a/\n  system 'id'\n")
    result = no_daemon.rq_full("verify_rules", "--path", str(bad))
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "fail bad router rules file\n", "line 22: unknown statement 'system'\n")
    good = tmp_path / "good.rb"
    good.write_text(RULES)
    assert no_daemon.rq("verify_rules", "--path", str(good)) == (0, ["ok"])


# -- queue features ---------------------------------------------------------------------


def test_coalesce_and_message_operations(daemon: Daemon) -> None:
    script = daemon.script("co.sh", 'echo "done handled $RQ_PARAM1" >&3\n')
    qdir = daemon.root / "queue" / "co"
    qdir.mkdir()
    (qdir / "config.json").write_text(json.dumps(
        {"name": "co", "script": str(script), "exec_prefix": "", "coalesce": "yes", "coalesce_param1": "1"}))
    daemon.ok("reload")
    wait_for(lambda: daemon.queue_status("co") == "UP", 10, what="queue co")
    daemon.ok("pause", "--name", "co")
    first = daemon.send("co", "--param1", "a")
    dup = daemon.send("co", "--param1", "a", "--due", str(int(time.time()) + 3600))
    other = daemon.send("co", "--param1", "b")
    assert daemon.ok("single_que", "--dest", "co") == other
    daemon.ok("resume", "--name", "co")
    for full in (first, other):
        daemon.wait_state(full, "done")
    daemon.wait_state(dup, "done")
    assert daemon.statusmesg(dup) == [f"ok done - duplicate {first}"]
    assert daemon.show(first)["dups"] == [dup]
    assert daemon.show(dup)["path"].startswith("queue/co/done/")

    # clone, run_now and delete (hashed path) from the command line.
    clone = daemon.ok("clone", "--msg_id", first)
    daemon.wait_state(clone, "done")
    assert daemon.show(clone)["cloned_from"] == first.rsplit("/", 1)[1]
    daemon.ok("pause", "--name", "co")
    later = daemon.send("co", "--due", str(int(time.time()) + 3600))
    assert daemon.ok("run_now", "--msg_id", later) == "msg sent to front of run queue"
    assert float(daemon.show(later)["due"]) <= time.time()
    path = daemon.root / daemon.show(first)["path"]
    assert daemon.ok("delete", "--msg_id", first) == "msg deleted"
    assert not path.exists()
    assert daemon.rq("delete", "--msg_id", first) == (1, ["fail msg not found"])
    assert daemon.rq("clone", "--msg_id", later) == (1, ["fail cannot clone message in que state"])
    daemon.ok("resume", "--name", "co")
    daemon.wait_state(later, "done")
