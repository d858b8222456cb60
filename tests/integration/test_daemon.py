"""
The daemon's life: hard and soft deaths with workers running, restarts,
recovery, and queue administration through C{rq}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from rqtwisted.ampclient import AdminClient, AdminClientError, encode_box
from tests.integration.conftest import (
    TWISTD_CMD,
    Daemon,
    alive,
    children_of,
    free_port,
    group_members,
    processes_with_env,
    wait_for,
)

pytestmark = pytest.mark.integration


def assert_shut_down(daemon: Daemon, rc: int | None) -> None:
    """
    The daemon went through its orderly shutdown and exited 0.
    """
    assert rc == 0, rc
    last_run = daemon.log_text().rsplit("===== starting daemon", 1)[-1]
    assert "Server Shut Down." in last_run, last_run
    assert not (daemon.root / "config" / "queuemgr.pid").exists()


def rerun_script(tmp_path: Path, *, trap_term: bool = False, grandchild: bool = False) -> str:
    """
    A script that, on its first run, records its pid and blocks for 30 s;
    on any later run (the marker exists) reports done at once.
    """
    marker = tmp_path / "first-run"
    pidfile = tmp_path / "worker.pid"
    lines = [
        f'if [ -e {marker} ]; then echo "done second run" >&3; exit 0; fi',
        f"touch {marker}",
    ]
    if trap_term:
        lines.append("trap '' TERM")
    if grandchild:
        lines.append(f"sleep 30 & echo $! > {tmp_path / 'grandchild.pid'}")
    lines += [
        f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}",
        'echo "run sleeping" >&3',
        # Sleep in short steps: a TERM-ignoring script outlives its sleeps.
        "for i in $(seq 300); do sleep 0.1; done",
        'echo "done first run" >&3',
    ]
    return "\n".join(lines) + "\n"


def start_long_job(daemon: Daemon, tmp_path: Path, read_pid, **kwargs: bool) -> tuple[str, int]:
    daemon.queue_with_script("test", rerun_script(tmp_path, **kwargs))
    full = daemon.send("test")
    worker = read_pid(tmp_path / "worker.pid")
    daemon.wait_state(full, "run")
    wait_for(lambda: daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok run - sleeping"]), 5, what="run status")
    # The pid file of a running message holds the worker's pid.
    assert (daemon.run_dir("test", full) / "pid").read_text().strip() == str(worker)
    assert alive(worker)
    return full, worker


def test_kill9_daemon_kills_workers_and_recovers(daemon: Daemon, tmp_path: Path, read_pid) -> None:
    full, worker = start_long_job(daemon, tmp_path, read_pid)
    helpers = [p for p in children_of(daemon.pid) if p != worker]
    assert helpers, "the watchdog should be a child of the daemon"
    # The worker leads its own process group, apart from the daemon's.
    assert os.getpgid(worker) == worker != os.getpgid(daemon.pid)

    daemon.kill9()
    wait_for(lambda: not group_members(worker), 8, what="worker process group gone after SIGKILL of the daemon")
    assert not alive(worker)
    wait_for(lambda: not any(alive(p) for p in helpers), 8, what="watchdog exit")

    # A stale socket and no daemon: a clean failure.
    code, out = daemon.rq("ping")
    assert code == 1 and len(out) == 1 and out[0].startswith("fail "), out

    # Same root again: the message left in run/ goes back to que and runs.
    daemon.start()
    daemon.wait_state(full, "done", timeout=10)
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - second run"])
    assert daemon.rq("statuscountmesg", "--msg_id", full) == (0, ["ok 0"])



def test_restart_kills_a_worker_left_running(daemon: Daemon, tmp_path: Path, read_pid) -> None:
    """
    A worker that outlived its daemon and the watchdog (here the watchdog
    is stopped, then killed after the daemon, so it never cleans up): the
    next daemon kills it before it runs its message again.
    """
    full, worker = start_long_job(daemon, tmp_path, read_pid)
    [watchdog] = [p for p in children_of(daemon.pid) if p != worker]
    os.kill(watchdog, signal.SIGSTOP)
    daemon.kill9()
    # The stopped watchdog still holds the root.
    refused = second_daemon(daemon)
    assert refused.returncode != 0 and "another rq daemon" in refused.stdout + refused.stderr
    os.kill(watchdog, signal.SIGKILL)
    wait_for(lambda: not alive(watchdog), 5, what="watchdog gone")
    assert alive(worker), "the worker should have outlived its daemon and watchdog"
    daemon.start()
    wait_for(lambda: not alive(worker), 5, what="the leftover worker killed")
    daemon.wait_state(full, "done", timeout=10)
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - second run"])

def test_sigterm_daemon_stops_workers(daemon: Daemon, tmp_path: Path, read_pid) -> None:
    full, worker = start_long_job(daemon, tmp_path, read_pid, grandchild=True)
    grandchild = read_pid(tmp_path / "grandchild.pid")
    daemon.cleanup_pids.append(grandchild)
    children = children_of(daemon.pid)
    assert worker in children and len(children) >= 2, children

    started = time.monotonic()
    rc = daemon.terminate(timeout=12)
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert_shut_down(daemon, rc)
    # Nothing of ours remains: not the worker, its group, the grandchild,
    # the watchdog, nor anything running with this root's environment.
    wait_for(lambda: not group_members(worker), 2, what="worker group gone")
    assert not any(alive(p) for p in children), [p for p in children if alive(p)]
    assert not alive(grandchild)
    assert processes_with_env("RQ_MSG_DIR", str(daemon.root) + os.sep) == []

    # The interrupted message is rerun at the next start.
    daemon.start()
    daemon.wait_state(full, "done", timeout=10)
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - second run"])


def test_sigterm_daemon_kills_stubborn_worker(daemon: Daemon, tmp_path: Path, read_pid) -> None:
    """
    A worker ignoring SIGTERM is SIGKILLed after the grace period; the
    daemon still exits 0 within ~10 s.
    """
    full, worker = start_long_job(daemon, tmp_path, read_pid, trap_term=True)
    started = time.monotonic()
    rc = daemon.terminate(timeout=15)
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert_shut_down(daemon, rc)
    assert not group_members(worker)



def test_kill9_during_shutdown_still_kills_stubborn_worker(daemon: Daemon, tmp_path: Path, read_pid) -> None:
    """
    A C{kill -9} of the daemon while it shuts down (its stubborn worker in
    the grace period) still has the worker killed: the watchdog stays until
    the workers have ended.
    """
    full, worker = start_long_job(daemon, tmp_path, read_pid, trap_term=True)
    [watchdog] = [p for p in children_of(daemon.pid) if p != worker]
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGTERM)
    wait_for(lambda: "Received SIGTERM" in daemon.log_text(), 5, what="shutdown under way")
    # The worker ignores its SIGTERM: the daemon is in its grace period.
    assert alive(worker)
    assert alive(watchdog), "the watchdog should wait for the workers to end"
    daemon.kill9()
    wait_for(lambda: not group_members(worker), 8, what="worker process group gone after SIGKILL mid-shutdown")
    wait_for(lambda: not alive(watchdog), 8, what="watchdog exit")


def second_daemon(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    """
    Try to start another daemon on the same root (another port).
    """
    return subprocess.run(
        [*TWISTD_CMD, "-n", "--pidfile=", "rq", "--root", str(daemon.root), "--port", str(free_port())],
        env=daemon.env,
        cwd=str(daemon.base),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_one_daemon_per_root_without_its_pid_file(daemon: Daemon) -> None:
    """
    Removing C{config/rq.lock} (where the daemon writes its pid) lets no
    second daemon in: it is refused, and the first keeps its admin socket.
    """
    (daemon.root / "config" / "rq.lock").unlink()
    refused = second_daemon(daemon)
    assert refused.returncode != 0
    assert "another rq daemon runs on this root (pid unknown;" in refused.stdout + refused.stderr
    assert daemon.rq("ping") == (0, ["ok pong"])


def test_one_daemon_per_root(daemon: Daemon, tmp_path: Path, read_pid) -> None:
    """
    A second daemon on a root refuses to start, saying why, while the first
    runs and while the first shuts down (a stubborn worker in its grace
    period): it leaves the first, its worker and the message's pid file
    alone. Once the first is gone, the root is free and the message reruns.
    """
    full, worker = start_long_job(daemon, tmp_path, read_pid, trap_term=True)
    pid_file = daemon.run_dir("test", full) / "pid"
    refused = second_daemon(daemon)
    assert refused.returncode != 0
    assert "another rq daemon runs on this root" in refused.stdout + refused.stderr
    assert daemon.rq("ping") == (0, ["ok pong"])
    assert pid_file.read_text().strip() == str(worker)

    os.kill(daemon.pid, signal.SIGTERM)
    refused = second_daemon(daemon)
    assert daemon.proc is not None and daemon.proc.poll() is None, "the first daemon ended too soon for this test"
    assert refused.returncode != 0
    assert "another rq daemon runs on this root" in refused.stdout + refused.stderr
    assert alive(worker)
    assert pid_file.read_text().strip() == str(worker)

    assert_shut_down(daemon, daemon.terminate(timeout=15))
    assert not group_members(worker)
    daemon.start()
    daemon.wait_state(full, "done", timeout=10)
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - second run"])

def test_sigterm_exit_status(daemon: Daemon) -> None:
    """
    queues.md: on SIGTERM the supervisor stops everything, removes its pid
    file and socket, and exits 0.
    """
    rc = daemon.terminate()
    assert_shut_down(daemon, rc)
    assert not (daemon.root / "config" / "rq.sock").exists()
    assert rc == 0


def test_queue_administration(daemon: Daemon) -> None:
    daemon.queue_with_script("test", 'echo "done admin $RQ_PARAM1" >&3\n')
    assert daemon.rq("queues") == (0, ["ok 5", "test", "cleaner", "relay", "rq_router", "webhook"])
    assert daemon.queue_status("test") == "UP"

    # pause: messages are accepted but wait in que.
    assert daemon.rq("pause", "--name", "test") == (0, ["ok test"])
    assert daemon.queue_status("test") == "PAUSE"
    paused = daemon.send("test", "--param1", "paused")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert daemon.rq("state", "--msg_id", paused) == (0, ["ok que"])
        time.sleep(0.1)
    assert daemon.rq("statusmesg", "--msg_id", paused) == (0, ["ok que"])
    assert daemon.rq("resume", "--name", "test") == (0, ["ok test"])
    daemon.wait_state(paused, "done", timeout=5)
    assert daemon.rq("statusmesg", "--msg_id", paused) == (0, ["ok done - admin paused"])

    # down: creation refused.
    assert daemon.rq("down", "--name", "test") == (0, ["ok test"])
    assert daemon.queue_status("test") == "DOWN"
    assert daemon.rq("sendmesg", "--dest", "test") == (1, ["fail status: DOWN"])
    assert daemon.rq("prepmesg", "--dest", "test") == (1, ["fail status: DOWN"])
    # Reads still work.
    assert daemon.rq("state", "--msg_id", paused) == (0, ["ok done"])
    assert daemon.rq("up", "--name", "test") == (0, ["ok test"])
    assert daemon.queue_status("test") == "UP"
    upped = daemon.send("test", "--param1", "up")
    daemon.wait_state(upped, "done", timeout=5)

    # restart_queue: the queue comes back and works, history kept.
    assert daemon.rq("restart_queue", "--name", "test") == (0, ["ok test"])
    wait_for(lambda: daemon.queue_status("test") == "UP", 5, what="queue back up")
    restarted = daemon.send("test", "--param1", "restarted")
    daemon.wait_state(restarted, "done", timeout=5)
    assert daemon.rq("statusmesg", "--msg_id", paused) == (0, ["ok done - admin paused"])

    # Unknown queue names.
    for verb in ("pause", "resume", "up", "down", "restart_queue"):
        assert daemon.rq(verb, "--name", "nope") == (1, ["fail invalid queue name"]), verb

    # delete_queue: renamed to queue/test.deleted.<inode>.
    inode = os.stat(daemon.queue_dir("test")).st_ino
    assert daemon.rq("delete_queue", "--name", "test") == (0, ["ok started deleting queue"])
    assert not daemon.queue_dir("test").exists()
    assert (daemon.root / "queue" / f"test.deleted.{inode}").is_dir()
    assert daemon.rq("queues") == (0, ["ok 4", "cleaner", "relay", "rq_router", "webhook"])
    assert daemon.rq("sendmesg", "--dest", "test") == (1, ["fail Queue not found"])
    assert daemon.rq("delete_queue", "--name", "test") == (1, ["fail no such queue"])
    # A deleted directory is not picked up again by a restart of the server.
    assert daemon.rq("restart") == (0, ["ok restarted"])
    assert daemon.rq("queues") == (0, ["ok 4", "cleaner", "relay", "rq_router", "webhook"])


def test_create_queue_refusals(daemon: Daemon) -> None:
    script = daemon.script("t.sh", 'echo "done" >&3\n')
    daemon.create_queue("test", script)
    assert daemon.rq("create_queue", "--name", "test", "--script", str(script)) == (
        1,
        ["fail already created"],
    )
    assert daemon.rq("create_queue", "--name", "bad/name", "--script", str(script)) == (
        1,
        ["fail queue name has invalid characters"],
    )


def test_queued_messages_and_markers_survive_restart(daemon: Daemon) -> None:
    daemon.queue_with_script("test", 'echo "done $RQ_PARAM1" >&3\n')
    assert daemon.rq("pause", "--name", "test") == (0, ["ok test"])
    ids = [daemon.send("test", "--param1", f"m{i}") for i in range(3)]
    # single_que: the newest queued message is reused.
    assert daemon.rq("single_que", "--dest", "test", "--param1", "single") == (0, [f"ok {ids[-1]}"])
    prepped = daemon.ok("prepmesg", "--dest", "test", "--param1", "prepped")
    assert_shut_down(daemon, daemon.terminate())

    daemon.start()
    assert daemon.queue_status("test") == "PAUSE"
    for full in ids:
        assert daemon.rq("state", "--msg_id", full) == (0, ["ok que"])
    assert daemon.rq("state", "--msg_id", prepped) == (0, ["ok prep"])
    assert daemon.rq("resume", "--name", "test") == (0, ["ok test"])
    for i, full in enumerate(ids):
        daemon.wait_state(full, "done", timeout=5)
        assert daemon.rq("statusmesg", "--msg_id", full) == (0, [f"ok done - m{i}"])
    assert daemon.rq("state", "--msg_id", prepped) == (0, ["ok prep"])
    assert daemon.rq("commitmesg", "--msg_id", prepped) == (0, ["ok msg commited"])
    daemon.wait_state(prepped, "done", timeout=5)


def test_server_restart_command(daemon: Daemon, tmp_path: Path, read_pid) -> None:
    """
    C{rq restart}: queues stop (workers terminated, messages back to que)
    and start again; the interrupted message reruns.
    """
    full, worker = start_long_job(daemon, tmp_path, read_pid)
    assert daemon.rq("restart") == (0, ["ok restarted"])
    wait_for(lambda: not group_members(worker), 8, what="worker stopped by restart")
    daemon.wait_state(full, "done", timeout=10)
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - second run"])
    assert daemon.rq("ping") == (0, ["ok pong"])


def test_requests_never_read_do_not_pile_up(daemon: Daemon) -> None:
    """
    A client that sends requests on the admin socket and never reads the
    answers: the daemon stops reading it once the answers back up (so
    most requests stay unsent), and keeps serving everyone else.
    """
    daemon.queue_with_script("test", 'echo "done" >&3\n')
    request = encode_box({b"_command": b"Ping", b"_ask": b"1"})
    stream = request * 200_000
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer.connect(str(daemon.root / "config" / "rq.sock"))
        peer.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 3
        while sent < len(stream) and time.monotonic() < deadline:
            try:
                sent += peer.send(stream[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
        # (The kernel's socket buffers take a few hundred kB either way.)
        assert sent < 2_000_000, f"{sent} of {len(stream)} bytes taken: the daemon kept reading"
        assert daemon.rq("ping") == (0, ["ok pong"])
        full = daemon.send("test")
        assert daemon.wait_state(full, "done") == "done"
    finally:
        peer.close()
    assert daemon.rq("ping") == (0, ["ok pong"])


def test_huge_resend_delay_keeps_the_queue_up(daemon: Daemon) -> None:
    """
    A C{resend} or C{dup} with a delay of hundreds of digits is cut to a
    century: the message is queued for then, the dup answered, and the
    queue goes on.
    """
    big = "9" * 400
    daemon.queue_with_script("other", 'echo "done" >&3\n')
    daemon.queue_with_script(
        "test",
        f"""
        echo "dup {big}-X-other" >&3
        read -r reply <&4
        echo "resend {big}-later $reply" >&3
        """,
    )
    full = daemon.send("test")
    assert daemon.wait_state(full, "que") == "que"
    code, [line] = daemon.rq("statusmesg", "--msg_id", full)
    assert code == 0 and line.startswith(f"ok que - {big}-later ok {daemon.base_url}q/other/"), line
    shown = json.loads("\n".join(daemon.rq("show", "--msg_id", full)[1]))
    assert shown["due"] > time.time() + 99 * 365 * 86400
    after = daemon.send("other")
    assert daemon.wait_state(after, "done") == "done"
    assert "failed" not in daemon.log_text()


def test_sigterm_answers_the_requests_it_took(daemon: Daemon) -> None:
    """
    SIGTERM while clients keep sending messages: every message stored was
    acknowledged, and every acknowledged one is stored. (A request the
    daemon took is answered before it closes the connection; one it did not
    take is not carried out.)
    """
    daemon.queue_with_script("test", 'echo "done" >&3\n')
    assert daemon.rq("pause", "--name", "test") == (0, ["ok test"])
    socket_path = str(daemon.root / "config" / "rq.sock")
    acknowledged: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                status, detail = AdminClient(socket_path, timeout=20).call(
                    "CreateMessage", message='{"dest": "test"}', method="commit"
                )
            except AdminClientError:
                return
            assert status == "ok", detail
            with lock:
                acknowledged.append(detail.rsplit("/", 1)[1])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acknowledged) >= 50, 10, what="messages acknowledged")
    assert_shut_down(daemon, daemon.terminate(timeout=20))
    for t in threads:
        t.join(20)
    stored = sorted(os.listdir(daemon.root / "queue" / "test" / "que"))
    assert stored == sorted(acknowledged)


def test_port_zero_names_the_port_it_got(daemon: Daemon) -> None:
    """
    Started with C{--port 0} (any free port), the daemon's full ids name
    the port its web server got, which answers.
    """
    daemon.terminate()
    daemon.port = 0
    daemon.start()
    daemon.queue_with_script("test", 'echo "done" >&3\n')
    assert daemon.rq("pause", "--name", "test") == (0, ["ok test"])
    code, out = daemon.rq("sendmesg", "--dest", "test")
    assert code == 0, out
    full = out[0].split(" ", 1)[1]
    port = int(full.split("/")[2].rsplit(":", 1)[1])
    assert port != 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/q.json", timeout=10) as reply:
        assert reply.status == 200

def test_rq_in_the_roots_bin_finds_its_root(daemon: Daemon, tmp_path: Path) -> None:
    """
    C{rq} run as C{<root>/bin/rq} (a link to the installed program, or a
    copy of it) finds its root from its own path, as the original's
    C{bin/rq} did: the command lines of the original work unchanged from
    any directory, without C{RQ_ROOT}.
    """
    daemon.queue_with_script("test", 'echo "done hi" >&3\n')
    installed = tmp_path / "venv" / "bin"
    installed.mkdir(parents=True)
    program = installed / "rq"
    program.write_text(f"#!{sys.executable}\nimport sys\nfrom rqtwisted.cli import main\nsys.exit(main())\n")
    program.chmod(0o755)
    (daemon.root / "bin").mkdir()
    (daemon.root / "bin" / "rq").symlink_to(program)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in daemon.env.items() if k != "RQ_ROOT"}

    def rq(program: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([program, *args], env=env, cwd=str(elsewhere), capture_output=True, text=True)

    sent = rq(str(daemon.root / "bin" / "rq"), "sendmesg", "--dest", "test")
    assert (sent.returncode, sent.stderr) == (0, ""), sent
    status, full = sent.stdout.split()
    assert status == "ok" and full.startswith(f"{daemon.base_url}q/test/"), sent.stdout
    daemon.wait_state(full, "done")
    # A relative path to the link works as well.
    shown = rq(os.path.relpath(daemon.root / "bin" / "rq", elsewhere), "statusmesg", "--msg_id", full)
    assert (shown.returncode, shown.stdout) == (0, "ok done - hi\n"), shown
    # The installed program itself has no root of its own: the current
    # directory, where no daemon runs.
    lost = rq(str(program), "statusmesg", "--msg_id", full)
    assert lost.returncode == 1 and lost.stdout.startswith(f"fail rq daemon not running at {elsewhere}"), lost
