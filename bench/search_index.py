"""
The search index (L{rqtwisted.search}): build time, memory per message and
query time, against reading every message file per query (what the
original's C{/search} does).

It lays out a root with one queue holding N synthetic done messages spread
over days and hours (written straight to disk in the hashed layout), starts
the queue in-process (fake clock and workers, no daemon) and prints::

    messages, build s, index MiB, bytes/message, query ms (contains, exact),
    full scan ms

Run from the project root::

    python bench/search_index.py [--messages N] [--root DIR]
"""

from __future__ import annotations

import gc
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rqtwisted.message import make_msg_id  # noqa: E402
from rqtwisted.search import QueueIndex  # noqa: E402
from rqtwisted.testing import instance_for  # noqa: E402

from _common import bench_options, scratch, store_message  # noqa: E402


def populate(qdir: str, count: int, start: float) -> None:
    """
    N done messages, one every 7 seconds back from C{start}.
    """
    for n in range(count):
        created = start - 7 * n
        msg_id = make_msg_id(created, 1000 + n)
        msg = {
            "dest": "bench",
            "src": "loader" if n % 3 else "cron",
            "param1": f"customer-{n % 5000}",
            "param2": f"/data/in/batch-{n}.csv",
            "param3": None,
            "param4": "nightly",
            "due": int(created),
            "count": 0,
            "max_count": 15,
            "orig_msg_id": f"http://h:3333/q/bench/{msg_id}",
            "msg_id": msg_id,
        }
        store_message(qdir, "done", msg, {"job_status": f"copied {n % 97} files"})


def main() -> None:
    args = bench_options(__doc__, messages=20000)
    with scratch(args.root, "rq-search-bench-") as base:
        instance, spawner, clock = instance_for(os.path.join(base, "root"))
        instance.create_queue({"name": "bench", "script": "./code/noop", "exec_prefix": ""})
        populate(instance.root.queue_path("bench"), args.messages, clock.seconds())
        instance.startService()
        queue = instance.queue("bench")

        gc.collect()
        tracemalloc.start()
        t0 = time.perf_counter()
        index = QueueIndex()
        index.build(queue)
        build = time.perf_counter() - t0
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        queue.store.observer = index

        def timed(query: dict[str, str], exact: bool) -> tuple[float, int]:
            t = time.perf_counter()
            found: list[dict[str, object]] = []
            # (No attachment to hash: the Deferred has fired already.)
            instance.search("bench", query, exact, limit=None).addCallback(found.extend)
            return (time.perf_counter() - t) * 1000, len(found)

        contains_ms, contains_n = timed({"param1": "customer-4999"}, False)
        exact_ms, exact_n = timed({"param1": "customer-17", "src": "cron"}, True)

        t0 = time.perf_counter()
        hits = 0
        for msg_id in queue.store.list_hashed("done"):
            msg = queue.store.read("done", msg_id)
            hits += "customer-4999" in str(msg.get("param1"))
        scan_ms = (time.perf_counter() - t0) * 1000

        print(f"messages          {args.messages}")
        print(f"index build       {build:.2f} s")
        print(f"index memory      {size / 2**20:.1f} MiB ({size / args.messages:.0f} bytes/message)")
        print(f"query contains    {contains_ms:.1f} ms ({contains_n} hits, full read forms included)")
        print(f"query exact, 2 keys {exact_ms:.1f} ms ({exact_n} hits)")
        print(f"full scan         {scan_ms:.1f} ms (reading every msg file once, {hits} hits)")


if __name__ == "__main__":
    main()
