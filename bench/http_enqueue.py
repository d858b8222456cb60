"""
Durable enqueues per second over HTTP: C{POST /q/<name>/new_message} against
a real C{twistd rq} daemon, with 1 and with 4 concurrent keep-alive clients.

The bench starts a daemon on a fresh root (C{twistd -n --pidfile= rq}), creates
a queue C{bench} (a no-op script) and pauses it, so the figures are the pure
enqueue path: parse the form, build the message in C{tmp/}, rename it into
C{que/}, fsync (grouped), answer C{["ok","<full id>"]}. Each client is a
thread with one HTTP/1.1 keep-alive connection on loopback sending, one after
the other, the form a relay peer sends (field C{mesg} = the message as JSON,
C{application/x-www-form-urlencoded}) and reading the answer; an answer other
than 200 C{["ok",...]} fails the run. After each run the bench counts the
message directories in C{que/}: every acknowledged message must be there.

Printed per run: messages, clients, seconds, msg/s, the daemon's CPU time
per message (all threads, from C{/proc}), fsync rounds (C{rq status}
C{sync_rounds}) and messages per round, the daemon's peak RSS. Run from the
project root with the Python of the environment rqtwisted is installed in::

    python bench/http_enqueue.py [--messages N] [--clients 1,4] [--root DIR]

C{--py-spy FILE} samples the daemon with C{py-spy record} during the last run
(C{--format raw}: collapsed stacks) and prints the top functions.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import quote

from _common import (
    collapsed_stacks,
    free_port,
    proc_cpu,
    proc_status,
    rq_argv,
    scratch,
    start_daemon,
    start_py_spy,
    stop_daemon,
    stop_py_spy,
)

#: The original RQ on its reference machine: clients -> msg/s.
ORIGINAL = {1: 50.0, 4: 100.0}

#: The project's target with 4 clients.
TARGET = 1000.0

class Daemon:
    """
    A C{twistd -n rq} on its own root, for the length of the bench.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.root = os.path.join(base, "root")
        self.port = free_port()
        self.env = dict(os.environ, RQ_ROOT=self.root)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """
        Start and wait until the admin socket answers.
        """
        log = open(os.path.join(self.base, "daemon.log"), "ab")
        self.proc = start_daemon(self.root, self.port, log, self.base, self._answers, env=self.env)

    def _answers(self) -> bool:
        """
        Whether the admin socket is there and answers ping.
        """
        return os.path.exists(os.path.join(self.root, "config", "rq.sock")) and self.rq("ping") == "ok pong"

    def rq(self, *args: str) -> str:
        """
        Run the rq command line; its output.
        """
        out = subprocess.run([*rq_argv(), *args], env=self.env, capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    def sync_rounds(self) -> int | None:
        """
        C{sync_rounds} of C{rq status}, if the daemon reports it.
        """
        try:
            return int(json.loads(self.rq("status"))["sync_rounds"])
        except (ValueError, KeyError, TypeError):
            return None

    def stop(self) -> None:
        """
        SIGTERM, then SIGKILL the process group if it lingers.
        """
        stop_daemon(self.proc, 15)


class Client:
    """
    One keep-alive HTTP/1.1 connection that enqueues messages.
    """

    def __init__(self, port: int, queue: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.head = (
            f"POST /q/{queue}/new_message HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
        ).encode()
        self.queue = queue

    def request(self, n: int) -> bytes:
        """
        The bytes of the C{n}th enqueue request.
        """
        mesg = json.dumps({"dest": self.queue, "src": "bench", "param1": str(n), "_method": "commit"})
        body = ("mesg=" + quote(mesg, safe="")).encode()
        return self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("daemon closed the connection")
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("daemon closed the connection")
            self.buffer += data
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def enqueue(self, n: int) -> tuple[int, bytes]:
        """
        Send one request and read its answer: C{(status, body)}.
        """
        self.sock.sendall(self.request(n))
        head = self._read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        code = int(head[0].split()[1])
        headers = dict(line.split(":", 1) for line in head[1:])
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._read_until(b"\r\n"), 16)
                body += self._read_exact(size + 2)[:size]
                if size == 0:
                    break
        else:
            body = self._read_exact(int(headers.get("content-length", "0")))
        return code, body

    def close(self) -> None:
        """
        Close the connection.
        """
        self.sock.close()


@dataclass
class Run:
    """
    One measurement.
    """

    clients: int
    messages: int
    seconds: float
    cpu: float
    rounds: int | None
    peak_kb: int
    stored: int

    @property
    def rate(self) -> float:
        """
        Durable messages per second.
        """
        return self.messages / self.seconds


def count_stored(daemon: Daemon, queue: str) -> int:
    """
    Message directories in C{que/} of C{queue}.
    """
    return len(os.listdir(os.path.join(daemon.root, "queue", queue, "que")))


def measure(daemon: Daemon, queue: str, clients: int, messages: int) -> Run:
    """
    Enqueue C{messages} from C{clients} concurrent connections.
    """
    assert daemon.proc is not None
    pid = daemon.proc.pid
    before_stored = count_stored(daemon, queue)
    conns = [Client(daemon.port, queue) for _ in range(clients)]
    per = [messages // clients + (1 if i < messages % clients else 0) for i in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def work(conn: Client, count: int, base: int) -> None:
        barrier.wait()
        try:
            for i in range(count):
                code, body = conn.enqueue(base + i)
                if code != 200 or not body.startswith(b'["ok"'):
                    errors.append(f"{code} {body[:200]!r}")
                    return
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [
        threading.Thread(target=work, args=(conn, count, 1_000_000 * i))
        for i, (conn, count) in enumerate(zip(conns, per))
    ]
    for t in threads:
        t.start()
    rounds0 = daemon.sync_rounds()
    cpu0 = proc_cpu(pid)
    barrier.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    cpu = proc_cpu(pid) - cpu0
    rounds1 = daemon.sync_rounds()
    for conn in conns:
        conn.close()
    if errors:
        raise SystemExit(f"{len(errors)} clients failed, first: {errors[0]}")
    rounds = rounds1 - rounds0 if rounds0 is not None and rounds1 is not None else None
    stored = count_stored(daemon, queue) - before_stored
    return Run(clients, messages, seconds, cpu, rounds, proc_status(pid, "VmHWM") or 0, stored)


def py_spy_top(path: str, top: int = 15) -> list[tuple[float, str]]:
    """
    The functions most often on top of the daemon's sampled stacks.
    """
    own: Counter[str] = Counter()
    total = 0
    for frames, n in collapsed_stacks(path):
        total += n
        own[frames[-1]] += n
    return [(100.0 * n / max(total, 1), frame) for frame, n in own.most_common(top)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000, help="messages per run (default 3000)")
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts (default 1,4)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per client count; the best is reported")
    parser.add_argument("--root", help="lay the run out in this directory (kept) instead of a temp dir")
    parser.add_argument("--py-spy", dest="py_spy", help="sample the daemon during the last run into this file")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",") if c]
    with scratch(args.root, "rq-http-enqueue-") as base:
        daemon = Daemon(base)
        try:
            daemon.start()
            script = os.path.join(daemon.root, "code", "bench.sh")
            with open(script, "w") as f:
                f.write('#!/bin/sh\necho "done ok" >&3\n')
            os.chmod(script, 0o755)
            print(daemon.rq("create_queue", "--name", "bench", "--script", script, "--exec_prefix", ""))
            print(daemon.rq("pause", "--name", "bench"))
            measure(daemon, "bench", 1, 200)  # warm-up
            load = os.getloadavg()[0]
            print(f"\nPOST /q/bench/new_message, keep-alive, loopback, queue paused; load {load:.2f}; "
                  f"root {daemon.root}\n")
            print(f"{'clients':>7} {'messages':>8} {'secs':>6} {'msg/s':>7} {'CPU us/msg':>10} "
                  f"{'fsync rounds':>12} {'msg/round':>9} {'peak RSS':>10} {'stored':>6}")
            best: dict[int, Run] = {}
            spy: subprocess.Popen[bytes] | None = None
            for index, clients in enumerate(counts):
                for r in range(args.repeat):
                    last = index == len(counts) - 1 and r == args.repeat - 1
                    if last and args.py_spy:
                        assert daemon.proc is not None
                        spy = start_py_spy(daemon.proc.pid, args.py_spy)
                        if spy is not None:
                            time.sleep(1.0)
                    run = measure(daemon, "bench", clients, args.messages)
                    stop_py_spy(spy)
                    spy = None
                    per_round = f"{run.messages / run.rounds:9.1f}" if run.rounds else f"{'-':>9}"
                    print(f"{run.clients:7d} {run.messages:8d} {run.seconds:6.2f} {run.rate:7.0f} "
                          f"{1e6 * run.cpu / run.messages:10.0f} {run.rounds if run.rounds is not None else '-':>12} "
                          f"{per_round} {run.peak_kb / 1024:7.1f} MiB {run.stored:6d}")
                    if run.stored != run.messages:
                        raise SystemExit(f"{run.messages} acknowledged but {run.stored} stored")
                    if clients not in best or run.rate > best[clients].rate:
                        best[clients] = run
            print()
            for clients, run in sorted(best.items()):
                original = ORIGINAL.get(clients)
                vs = f" (original RQ: {original:.0f}/s, x{run.rate / original:.1f})" if original else ""
                print(f"{clients} client{'s' if clients > 1 else ''}: {run.rate:.0f} durable msg/s{vs}")
            if 4 in best:
                verdict = "met" if best[4].rate >= TARGET else "NOT met"
                print(f"target >= {TARGET:.0f} msg/s with 4 clients: {verdict}")
            if args.py_spy and os.path.exists(args.py_spy):
                print(f"\npy-spy, own time of the daemon's top functions ({args.py_spy}):")
                for share, frame in py_spy_top(args.py_spy):
                    print(f"  {share:5.1f}%  {frame}")
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
