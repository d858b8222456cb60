"""
Ready workers end to end: with every slot busy, the daemon spawns the next
due message's worker ahead, held at its gate in C{que/<id>/job} until a slot
frees; these tests check what a script and an operator can see of it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, all_pids, wait_for

pytestmark = pytest.mark.integration

START = re.compile(r"(\d+) - \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} - RQ START - (.*)")


def cwd_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def waiting_in_que(daemon: Daemon, queue: str) -> list[int]:
    """
    Live processes whose working directory is a job directory in the
    queue's C{que/}: workers made ready and held at their gate.
    """
    que = os.path.realpath(daemon.queue_dir(queue) / "que") + os.sep
    found = []
    for pid in all_pids():
        cwd = cwd_of(pid)
        if cwd is not None and cwd.startswith(que) and cwd.endswith(os.sep + "job"):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in ("Z", "X"):
                found.append(pid)
    return found


def counts(daemon: Daemon, queue: str) -> dict[str, int]:
    for q in daemon.status_json()["queues"]:
        if q["name"] == queue:
            return q["counts"]
    raise AssertionError(f"no queue {queue}")


class Watch:
    """
    Poll, in threads while the test goes on, the queue's run count (C{rq
    status}) and whether a held worker was seen in C{que/}.
    """

    def __init__(self, daemon: Daemon, queue: str) -> None:
        self.daemon = daemon
        self.queue = queue
        self.runs: list[int] = []
        self.held_seen = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._status), threading.Thread(target=self._procs)]

    def __enter__(self) -> "Watch":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _status(self) -> None:
        while not self._stop.is_set():
            self.runs.append(counts(self.daemon, self.queue)["run"])

    def _procs(self) -> None:
        while not self._stop.is_set():
            if waiting_in_que(self.daemon, self.queue):
                self.held_seen += 1
            time.sleep(0.02)


def test_ready_workers_run_each_message_once_in_its_run_dir(daemon: Daemon) -> None:
    """
    Twelve messages on two workers: every one ends done, started once (one
    C{RQ START} line, with the script's own pid and the real script path),
    running in its C{run/<id>/job} directory (C{RQ_MSG_DIR} and C{pwd -P},
    though its worker was made ready in C{que/}), reniced; never more than
    two in run.
    """
    script = daemon.queue_with_script(
        "rw",
        """
        echo "pid=$$"
        echo "msg_dir=$RQ_MSG_DIR"
        echo "pwd=$(pwd -P)"
        echo "nice=$(nice)"
        sleep 0.15
        echo "done ran $RQ_PARAM1" >&3
        """,
        "--num_workers", "2",
    )
    daemon.ok("pause", "--name", "rw")
    ids = [daemon.send("rw", "--param1", str(i)) for i in range(12)]
    with Watch(daemon, "rw") as watch:
        daemon.ok("resume", "--name", "rw")
        for full in ids:
            daemon.wait_state(full, "done", timeout=15)
    assert watch.runs and max(watch.runs) <= 2, watch.runs
    # The ready workers were really used (held in que/ at some point).
    assert watch.held_seen > 0
    pids = set()
    for i, full in enumerate(ids):
        assert daemon.rq("statusmesg", "--msg_id", full) == (0, [f"ok done - ran {i}"])
        lines = (daemon.msg_dir(full) / "job" / "stdio.log").read_text().splitlines()
        starts = [START.fullmatch(line) for line in lines if "RQ START" in line]
        assert len(starts) == 1 and starts[0] is not None, lines
        out = dict(line.split("=", 1) for line in lines if re.match(r"(pid|msg_dir|pwd|nice)=", line))
        assert starts[0].group(1) == out["pid"]
        assert starts[0].group(2) == os.path.realpath(script)
        run_job = daemon.run_dir("rw", full) / "job"
        assert out["msg_dir"] == str(run_job)
        assert out["pwd"] == os.path.realpath(run_job)
        assert out["nice"] == "19"
        pids.add(out["pid"])
    assert len(pids) == 12
    assert waiting_in_que(daemon, "rw") == []
    assert counts(daemon, "rw")["done"] == 12


def test_pause_gives_up_the_ready_worker(daemon: Daemon) -> None:
    """
    Pausing a queue whose slots are busy kills its held worker: once the
    running messages finish nothing of ours waits at a gate in C{que/},
    nothing runs; the queued messages run after resume.
    """
    daemon.queue_with_script("rw", 'sleep 0.6\necho "done slept" >&3\n', "--num_workers", "2")
    daemon.ok("pause", "--name", "rw")
    ids = [daemon.send("rw", "--param1", str(i)) for i in range(5)]
    daemon.ok("resume", "--name", "rw")
    wait_for(lambda: waiting_in_que(daemon, "rw"), 5, what="a worker held in que/")
    daemon.ok("pause", "--name", "rw")
    wait_for(lambda: not waiting_in_que(daemon, "rw"), 3, what="the held worker gone")
    states = {full: daemon.wait_state(full, ("done", "que"), timeout=5) for full in ids}
    wait_for(lambda: counts(daemon, "rw")["run"] == 0, 5, what="run empty")
    done = [full for full in ids if daemon.state(full) == "done"]
    assert len(done) == 2, states
    time.sleep(0.3)
    assert waiting_in_que(daemon, "rw") == []
    assert counts(daemon, "rw")["que"] == 3
    assert all(daemon.state(full) == "que" for full in ids if full not in done)
    daemon.ok("resume", "--name", "rw")
    for full in ids:
        daemon.wait_state(full, "done", timeout=10)
    for full in ids:
        lines = (daemon.msg_dir(full) / "job" / "stdio.log").read_text().splitlines()
        assert sum("RQ START" in line for line in lines) == 1, lines
    assert counts(daemon, "rw")["done"] == 5
