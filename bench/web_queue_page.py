"""
How long the web interface takes to render a queue holding many done
messages: the queue page (first page and a later one), C{/q/<name>.json}
(lists capped at their default), C{/q/<name>/done.json} and the home page.

The bench lays out a root in a temporary directory (or C{--root}), writes N
done messages straight into the hashed C{done/} directories of queue
C{big} (spread over several minutes, as a busy queue would), starts the
instance in memory (no worker ever runs) and requests each page through the
web resource in memory (C{treq.testing.StubTreq}), best of C{--repeat}
runs. Run from the project root::

    python bench/web_queue_page.py [--messages 100000] [--repeat 5] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rqtwisted.message import make_msg_id  # noqa: E402
from rqtwisted.testing import instance_for  # noqa: E402
from rqtwisted.web.app import RQWeb  # noqa: E402
from tests.unit.web_helpers import Client  # noqa: E402

from _common import scratch, store_message  # noqa: E402


def fill(queue_dir: str, n: int, start: float) -> None:
    """
    Write C{n} done messages (no status file), 20 per second of creation time.
    """
    for i in range(n):
        msg_id = make_msg_id(start + i / 20.0, i + 1)
        msg = {"msg_id": msg_id, "dest": "big", "count": 0, "max_count": 15, "due": int(start)}
        store_message(queue_dir, "done", msg)


def timed(client: Client, path: str, repeat: int) -> tuple[float, int, int]:
    best = float("inf")
    reply = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        reply = client.get(path)
        best = min(best, time.perf_counter() - t0)
    assert reply is not None
    return best, reply.code, len(reply.body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    with scratch(args.root, "rq-web-bench-") as base:
        instance, spawner, clock = instance_for(os.path.join(base, "root"))
        instance.create_queue({"name": "big", "script": "./code/noop", "exec_prefix": ""})
        t0 = time.perf_counter()
        fill(instance.root.queue_path("big"), args.messages, clock.seconds() - args.messages / 20.0)
        print(f"wrote {args.messages} done messages in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        instance.startService()
        print(f"instance start (counts done/) in {time.perf_counter() - t0:.2f}s")
        client = Client(RQWeb(instance, None))
        print(f"{'request':40} {'best s':>8} {'code':>5} {'bytes':>9}")
        for path in ("/q/big", "/q/big?done_page=20", "/q/big.json", "/q/big.json?limit=50", "/q/big/done.json",
                     "/"):
            best, code, size = timed(client, path, args.repeat)
            print(f"{path:40} {best:8.3f} {code:5d} {size:9d}")
        instance.stopService()


if __name__ == "__main__":
    main()
