"""
The cleaner (L{rqtwisted.cleaner}) on a large root: how fast it removes old
done messages, and how long it ever holds the reactor thread.

It lays out a root with one queue holding N synthetic done messages spread
evenly over the last 10 days (written straight to disk in the hashed
layout), starts the queue in-process on the real reactor (fake workers, no
daemon), runs one C{cleaner} message keeping 2 days, and prints::

    messages, removed, seconds, removed/s, longest reactor stall ms,
    reactor ticks late by more than 50 ms

The stall is measured by a 10 ms C{LoopingCall}: the most it ran late while
the cleaner worked (the deletions run in a thread, 1000 messages a call).

Run from the project root::

    python bench/cleaner.py [--messages N] [--root DIR]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.task import LoopingCall  # noqa: E402

from rqtwisted.message import make_msg_id  # noqa: E402
from rqtwisted.root import init_root  # noqa: E402
from rqtwisted.supervisor import Instance  # noqa: E402
from rqtwisted.testing import FakeSpawner, immediateSyncer  # noqa: E402

from _common import bench_options, scratch, store_message  # noqa: E402

DAY = 86400


def populate(qdir: str, count: int, now: float) -> None:
    """
    N done messages evenly spread over the 10 days before C{now}.
    """
    step = 10 * DAY / max(count, 1)
    for n in range(count):
        msg_id = make_msg_id(now - n * step, n + 1)
        store_message(qdir, "done", {"msg_id": msg_id, "dest": "bench", "count": 0}, {"job_status": "ok"}, log="log\n")


async def run(instance: Instance) -> tuple[float, float, int]:
    late: list[float] = []
    expected = [time.monotonic()]

    def tick() -> None:
        now = time.monotonic()
        late.append(now - expected[0])
        expected[0] = now + 0.01

    loop = LoopingCall(tick)
    loop.start(0.01)
    cleaner = instance.queue("cleaner")
    t0 = time.perf_counter()
    full = await cleaner.create({"dest": "cleaner", "param1": "bench", "param2": "2"})
    msg_id = full.rsplit("/", 1)[1]
    while cleaner.locate(msg_id) not in ("done", "err"):
        await _sleep(0.01)
    elapsed = time.perf_counter() - t0
    loop.stop()
    status = cleaner.get(msg_id)["status"]
    assert status == "done - successfully ran this script", status
    return elapsed, max(late or [0.0]), sum(1 for x in late if x > 0.05)


def _sleep(seconds: float):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def main() -> None:
    args = bench_options(__doc__, messages=50000)
    with scratch(args.root, "rq-cleaner-bench-") as base:
        root = init_root(os.path.join(base, "root"), host="bench")
        script = root.join("code", "noop")
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho done >&3\n")
        os.chmod(script, 0o755)
        instance = Instance(root, root.load_config(), reactor, immediateSyncer(), FakeSpawner(), base_env={})
        instance.create_queue({"name": "bench", "script": "./code/noop", "exec_prefix": ""})
        t0 = time.perf_counter()
        populate(root.queue_path("bench"), args.messages, time.time())
        laid = time.perf_counter() - t0
        instance.startService()
        before = instance.queue("bench").num_messages()["done"]
        out: list = []

        def go() -> None:
            d = ensureDeferred(run(instance))
            d.addBoth(out.append)
            d.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(go)
        reactor.run()
        if not out or not isinstance(out[0], tuple):
            raise SystemExit(f"bench failed: {out}")
        elapsed, stall, late = out[0]
        after = instance.queue("bench").num_messages()["done"]
        on_disk = sum(1 for _ in instance.queue("bench").store.list_hashed("done"))
        assert after == on_disk, (after, on_disk)
        removed = before - after
        print(f"messages            {args.messages} (laid out in {laid:.1f} s)")
        print(f"removed             {removed} (kept {after})")
        print(f"seconds             {elapsed:.2f}")
        print(f"removed/s           {removed / elapsed:.0f}")
        print(f"longest stall ms    {stall * 1000:.1f}")
        print(f"ticks late > 50 ms  {late}")
        print(f"load average        {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
