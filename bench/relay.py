"""
Relay throughput between two real C{twistd rq} daemons on loopback.

The bench lays out two roots (C{a} sends, C{b} receives into queue C{inbox},
whose script only reports C{done}), starts both daemons and measures:

 1. I{small messages}: N messages (C{rq sendmesg --dest
    http://localhost:<b>/q/inbox --relay-ok}, the same admin call) enqueued
    on C{a} while its C{relay} queue is paused; msg/s is N over the time
    from resuming it until it has relayed all N;
 2. I{a large attachment}: one message with one attachment of C{--size-mb}
    MiB (default 2048); MB/s is its size over the time from the commit on
    C{a} until C{a} reports it relayed (the far side has checked its md5),
    next to C{cp} of the same file on the same disk (without and with a
    final C{sync}; best of two each);
 3. both daemons' peak resident memory (C{VmHWM}) before and after the
    large transfer: the transfer must not raise either by more than 64 MiB.

Run from the project root with the Python of the environment rqtwisted is
installed in (C{twistd} is looked up next to it)::

    python bench/relay.py [--messages N] [--size-mb M] [--dir DIR] [--relay-workers K]

C{--size-mb 0} measures small messages only. The bench stops, printing
why the queued messages wait (their status), when nothing is relayed for
20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rqtwisted.admincommands import SOCKET  # noqa: E402
from rqtwisted.ampclient import AdminClient  # noqa: E402
from rqtwisted.root import init_root  # noqa: E402

from _common import free_port, proc_cpu, proc_status, start_daemon, stop_daemon  # noqa: E402

INBOX_SCRIPT = '#!/bin/sh\necho "done received" >&3\n'


class Daemon:
    """
    One daemon on its own root.
    """

    def __init__(self, base: str, name: str, relay_workers: int) -> None:
        self.name = name
        self.port = free_port()
        self.root = os.path.join(base, name)
        init_root(self.root, host="localhost", port=self.port)
        path = os.path.join(self.root, "queue", "relay", "config.json")
        with open(path) as f:
            config = json.load(f)
        config["num_workers"] = relay_workers
        with open(path, "w") as f:
            json.dump(config, f)
        self.log = open(os.path.join(base, f"{name}.log"), "ab")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}/"

    def start(self) -> None:
        """
        Start and wait until the admin socket answers ping.
        """
        self.proc = start_daemon(self.root, self.port, self.log, self.root, self._answers, what=f"daemon {self.name}")

    def _answers(self) -> bool:
        """
        Whether the admin socket answers ping.
        """
        try:
            return self.call("Ping")[0] == "ok"
        except Exception:
            return False

    def call(self, command: str, **args: str) -> tuple[str, str]:
        return AdminClient(os.path.join(self.root, SOCKET)).call(command, **args)

    def counts(self, queue: str) -> dict[str, int]:
        status = json.loads(self.call("Status")[1])
        for q in status["queues"]:
            if q["name"] == queue:
                return q.get("counts", {})
        return {}

    def stop(self) -> None:
        stop_daemon(self.proc, 30)

    def cpu_seconds(self) -> float:
        """
        User + system CPU time the daemon has used so far.
        """
        assert self.proc is not None
        return proc_cpu(self.proc.pid)

    def sync_rounds(self) -> int:
        """
        fsync rounds the daemon has run so far.
        """
        return int(json.loads(self.call("Status")[1]).get("sync_rounds", 0))

    def hwm(self) -> int:
        assert self.proc is not None
        return proc_status(self.proc.pid, "VmHWM") or 0


def queued_statuses(a: Daemon, limit: int = 5) -> list[str]:
    """
    C{<id> due in <s>s: <status>} of the first queued relay messages (why
    they wait: back-off after failed attempts shows its reason here).
    """
    que = os.path.join(a.root, "queue", "relay", "que")
    out = []
    for msg_id in sorted(os.listdir(que))[:limit]:
        try:
            with open(os.path.join(que, msg_id, "msg")) as f:
                due = json.load(f).get("due", 0)
            with open(os.path.join(que, msg_id, "status")) as f:
                text = json.load(f).get("job_status")
        except (OSError, ValueError):
            due, text = 0, None
        out.append(f"{msg_id} due in {float(due) - time.time():.0f}s: {text}")
    return out


def wait_relayed(a: Daemon, total: int, timeout: float, stall: float = 20.0) -> None:
    """
    Wait until C{a}'s relay queue has relayed C{total} messages. Gives up,
    saying why messages wait, when nothing was relayed for C{stall} seconds.
    """
    deadline = time.monotonic() + timeout
    last, moved = -1, time.monotonic()
    while time.monotonic() < deadline:
        counts = a.counts("relay")
        if counts.get("relayed", 0) >= total:
            return
        if counts.get("err", 0):
            raise SystemExit(f"relay err: {counts}")
        if counts.get("relayed", 0) != last:
            last, moved = counts.get("relayed", 0), time.monotonic()
        elif time.monotonic() - moved > stall:
            lines = "\n  ".join(queued_statuses(a))
            raise SystemExit(f"no progress for {stall:g}s: {counts}\n  {lines}")
        time.sleep(0.02)
    raise SystemExit(f"timed out: {a.counts('relay')}")


def make_file(path: str, size_mb: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size_mb):
            f.write(block[i % 997 :] + block[: i % 997])


def timed_cp(src: str, dst: str, sync: bool) -> float:
    start = time.monotonic()
    subprocess.run(["cp", src, dst], check=True)
    if sync:
        subprocess.run(["sync"], check=True)
    took = time.monotonic() - start
    os.unlink(dst)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--dir", default=None, help="where roots and the big file go (default: a temp dir)")
    parser.add_argument("--relay-workers", type=int, default=1)
    options = parser.parse_args()
    base = tempfile.mkdtemp(prefix="rq-relay-bench-", dir=options.dir)
    a = Daemon(base, "a", options.relay_workers)
    b = Daemon(base, "b", options.relay_workers)
    try:
        a.start()
        b.start()
        script = os.path.join(b.root, "code", "inbox.sh")
        with open(script, "w") as f:
            f.write(INBOX_SCRIPT)
        os.chmod(script, 0o755)
        b.call("CreateQueue", config=json.dumps({"name": "inbox", "script": script, "exec_prefix": ""}))
        dest = f"{b.url}q/inbox"
        print(f"relay bench: {options.messages} small messages, {options.size_mb} MiB attachment, "
              f"relay num_workers {options.relay_workers}, load {os.getloadavg()[0]:.2f}")

        # 1. small messages, enqueued while the relay queue is paused (the
        # admin socket's enqueue rate must not cap the figure), then relayed
        a.call("QueueAdmin", action="pause", name="relay")
        start = time.monotonic()
        for i in range(options.messages):
            status, detail = a.call(
                "CreateMessage", message=json.dumps({"dest": dest, "param1": str(i)}), method="commit", relay_ok="1"
            )
            assert status == "ok", detail
        enqueued = time.monotonic() - start
        cpu = (a.cpu_seconds(), b.cpu_seconds())
        rounds = (a.sync_rounds(), b.sync_rounds())
        start = time.monotonic()
        a.call("QueueAdmin", action="resume", name="relay")
        wait_relayed(a, options.messages, 600)
        took = time.monotonic() - start
        n = options.messages
        cpu = (a.cpu_seconds() - cpu[0], b.cpu_seconds() - cpu[1])
        rounds = (a.sync_rounds() - rounds[0], b.sync_rounds() - rounds[1])
        print(f"small messages: {n / took:8.1f} msg/s "
              f"({n} relayed in {took:.2f}s; enqueue alone {n / enqueued:.0f} msg/s)")
        print(f"  per message: CPU {cpu[0] * 1000 / n:.2f} ms sender, {cpu[1] * 1000 / n:.2f} ms receiver "
              f"(its inbox script included); fsync rounds {rounds[0] / n:.2f} sender, {rounds[1] / n:.2f} receiver")
        if options.size_mb > 0:
            large(a, b, dest, base, options.messages, options.size_mb)
    except BaseException:
        a.stop()
        b.stop()
        print(f"failed; roots and daemon logs kept in {base}")
        raise
    else:
        a.stop()
        b.stop()
        shutil.rmtree(base, ignore_errors=True)


def large(a: Daemon, b: Daemon, dest: str, base: str, relayed: int, size_mb: int) -> None:
    """
    Relay one message with a C{size_mb} MiB attachment; print MB/s beside
    C{cp}, and both daemons' peak RSS before and after.
    """
    # 2. one large attachment
    big = os.path.join(base, "big.bin")
    make_file(big, size_mb)
    size = os.path.getsize(big)
    hwm_before = (a.hwm(), b.hwm())
    status, full = a.call("CreateMessage", message=json.dumps({"dest": dest}), method="prep", relay_ok="1")
    assert status == "ok", full
    status, detail = a.call("AttachMessage", msg_id=full, pathname=big, name="big.bin")
    assert status == "ok", detail
    start = time.monotonic()
    status, detail = a.call("MessageAction", action="commit", msg_id=full)
    assert status == "ok", detail
    wait_relayed(a, relayed + 1, 3600)
    took = time.monotonic() - start
    hwm_after = (a.hwm(), b.hwm())
    mb = size / 1e6
    print(f"large attachment: {mb / took:8.1f} MB/s ({size} bytes in {took:.2f}s, md5 on both sides included)")
    # Best of two of each: the first copy may read a cold file.
    cp = min(timed_cp(big, big + ".copy", sync=False) for _ in range(2))
    cp_sync = min(timed_cp(big, big + ".copy", sync=True) for _ in range(2))
    print(f"cp same file:     {mb / cp:8.1f} MB/s ({cp:.2f}s); cp + sync {mb / cp_sync:.1f} MB/s ({cp_sync:.2f}s)")
    for name, before, after in zip(("a (sender)", "b (receiver)"), hwm_before, hwm_after):
        print(f"peak RSS {name}: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after "
              f"(+{(after - before) / 1024:.1f} MiB)")


if __name__ == "__main__":
    main()
