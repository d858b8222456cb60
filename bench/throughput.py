"""
End-to-end throughput of a real C{twistd rq} daemon, against the raw spawn
ceiling of the same machine.

For a queue whose script is a no-op C{/bin/sh} script (C{echo "done ok" >&3},
C{exec_prefix ""}), with 1 and with 4 workers, the bench starts a real daemon
on a fresh root, enqueues N messages through the admin socket (the synchronous
L{rqtwisted.ampclient.AdminClient}, C{CreateMessage} with method C{commit},
exactly what C{rq sendmesg} asks) from several client threads or processes,
and polls the C{Status} counts until every message is done; the end of a run
is then read from the disk: when the last message was moved to C{done/} or
C{err/} (see L{last_finished}). Two variants:

 - C{live}: the queue runs while messages arrive; the rate is N over the time
   from the first enqueue until the last message is done;
 - C{paused}: the queue is paused while the N messages are enqueued (a pure
   enqueue rate), then resumed; the rate is N over the time from the resume
   until the last message is done (a pure processing rate).

Next to these it measures the raw spawn rate of the same script
(C{os.posix_spawn} + C{os.waitpid}, keeping K children running) at
concurrency 1 and 4, and prints the ratios, the CPU time every party spends
per message (daemon reactor thread, daemon fsync and spawn threads, workers,
enqueue clients), the daemon's peak RSS (C{VmHWM}) and the number of fsync
rounds when C{Status} exposes it. Run from the project root, with the Python
of the environment rqtwisted is installed in (C{twistd} and C{rq} are looked
up next to it)::

    python bench/throughput.py [--messages N] [--root DIR]

See C{bench/README.md} for every option and for what the table means.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rqtwisted.admincommands import SOCKET  # noqa: E402
from rqtwisted.ampclient import AdminClient, AdminClientError  # noqa: E402

from _common import (  # noqa: E402
    collapsed_stacks,
    proc_status,
    rq_argv,
    start_py_spy,
    stat_cpu,
    stop_daemon,
    stop_py_spy,
    twistd_argv,
)

#: The queue script: a no-op that reports success on fd 3.
SCRIPT = '#!/bin/sh\necho "done ok" >&3\n'

#: What the daemon's fallback worker launcher reads on fd 4 before it goes on.
GO_LINE = b"go\n"

# <linux/fs.h>: the ext4 "top of a directory hierarchy" flag.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def spread_subdirs(path: str) -> bool:
    """
    Mark C{path} as the top of a directory hierarchy (ext4's C{T}
    attribute, as C{chattr +T}), so that each run's root, made in a
    sub-directory, gets block groups of its own instead of sharing the
    parent's. On an ext4 without a journal, creating a file in a block
    group where many files were deleted in the last minutes is slow (see
    C{bench/README.md}); other processes' churn in C{$TMPDIR} would
    otherwise be measured as the daemon's cost. False where the flag
    cannot be set (another filesystem, no permission).
    """
    import fcntl
    import struct

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def worker_launcher() -> str | None:
    """
    The C{/bin/sh} launcher the daemon falls back to where it cannot spawn
    a script directly (C{rqtwisted.worker._LAUNCHER}: one more shell exec
    per message), or None if it cannot be found. Imported lazily: it
    imports Twisted.
    """
    try:
        from rqtwisted.worker import _LAUNCHER
    except ImportError:
        return None
    return _LAUNCHER if isinstance(_LAUNCHER, str) else None


#: The original RQ on its reference machine: workers -> (msg/s, raw spawn/s).
ORIGINAL = {1: (165.0, 1500.0), 4: (275.0, 2300.0)}

#: The project's target: end-to-end / raw with 4 workers.
TARGET_RATIO = 0.5
TARGET_WORKERS = 4

#: The line number in a py-spy frame, C{func (path:123)}.
_LINENO = re.compile(r":\d+\)$")


# -- helpers -------------------------------------------------------------------


@dataclass
class Cpu:
    """
    CPU seconds of the daemon: its reactor (main) thread, the whole process
    (the fsync and spawn threads included), and its reaped children (the workers).
    """

    main: float = 0.0
    total: float = 0.0
    children: float = 0.0

    def __sub__(self, other: "Cpu") -> "Cpu":
        return Cpu(self.main - other.main, self.total - other.total, self.children - other.children)


def proc_cpu(pid: int) -> Cpu:
    """
    The L{Cpu} of a process now, from C{/proc/<pid>/stat} and
    C{/proc/<pid>/task/<pid>/stat}; all zero if the process is gone.
    """
    try:
        total, children = stat_cpu(f"/proc/{pid}/stat")
        main, _ = stat_cpu(f"/proc/{pid}/task/{pid}/stat")
    except OSError:
        return Cpu()
    return Cpu(main, total, children)


def rusage_cpu(who: int) -> float:
    """
    User + system CPU seconds of C{RUSAGE_SELF} or C{RUSAGE_CHILDREN}.
    """
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def find_sync_rounds(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """
    Every number in the Status JSON whose key names fsync/sync rounds.
    """
    found: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            lowered = str(key).lower()
            if isinstance(item, (int, float)) and not isinstance(item, bool) and (
                "sync" in lowered or "round" in lowered
            ):
                found.append((sub, item))
            else:
                found.extend(find_sync_rounds(item, sub))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(find_sync_rounds(item, f"{path}[{i}]"))
    return found


# -- raw spawn ceiling -----------------------------------------------------------


@dataclass
class Raw:
    """
    A raw spawn measurement: spawns per second and CPU per spawn (parent and
    children).
    """

    rate: float
    cpu_us: float


def raw_spawn_rate(
    argv: list[str], count: int, concurrency: int, go_file: str | None = None, niceness: int | None = None
) -> Raw:
    """
    Spawn C{argv} C{count} times with C{os.posix_spawn}, keeping
    C{concurrency} children running (C{os.waitpid} for any); stdio and fd 3
    (the status fd the script writes to) on /dev/null, fd 4 (where the
    daemon's launcher reads its go line) on C{go_file} if given.

    @raise RuntimeError: a child exited unsuccessfully.
    """
    env = dict(os.environ)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 3, os.devnull, os.O_WRONLY, 0),
    ]
    if go_file is not None:
        actions.append((os.POSIX_SPAWN_OPEN, 4, go_file, os.O_RDONLY, 0))
    failed = 0
    running = started = 0
    cpu0 = rusage_cpu(resource.RUSAGE_SELF) + rusage_cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    while started < count or running:
        while running < concurrency and started < count:
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
            if niceness is not None:
                try:
                    os.setpriority(os.PRIO_PROCESS, pid, niceness)
                except OSError:
                    pass
            running += 1
            started += 1
        _, status = os.waitpid(-1, 0)
        failed += status != 0
        running -= 1
    elapsed = time.perf_counter() - t0
    cpu = rusage_cpu(resource.RUSAGE_SELF) + rusage_cpu(resource.RUSAGE_CHILDREN) - cpu0
    if failed:
        raise RuntimeError(f"{failed} of {count} spawns of {argv[:2]}... exited unsuccessfully")
    return Raw(count / elapsed, cpu / count * 1e6)


# -- enqueue clients -------------------------------------------------------------


@dataclass
class ClientResult:
    """
    What one enqueue client did.
    """

    sent: int = 0
    errors: list[str] = field(default_factory=list)
    first: float = 0.0  # time.monotonic() of its first call
    last: float = 0.0  # time.monotonic() of its last acknowledgement


def enqueue_share(socket_path: str, queue: str, count: int, start: Any) -> ClientResult:
    """
    Send C{count} messages to C{queue} as C{rq sendmesg --dest queue} does,
    one admin connection per message, once C{start} (a barrier) opens.
    """
    client = AdminClient(socket_path)
    message = json.dumps({"dest": queue})
    result = ClientResult()
    start.wait()
    result.first = time.monotonic()
    for _ in range(count):
        try:
            status, detail = client.call("CreateMessage", message=message, method="commit", relay_ok="")
        except AdminClientError as e:
            status, detail = "fail", str(e)
        if status == "ok":
            result.sent += 1
        elif len(result.errors) < 5:
            result.errors.append(f"{status} {detail}")
    result.last = time.monotonic()
    return result


def _process_client(socket_path: str, queue: str, count: int, start: Any, results: Any) -> None:
    r = enqueue_share(socket_path, queue, count, start)
    results.put((r.sent, r.errors, r.first, r.last))


@dataclass
class Enqueued:
    """
    What all the clients did together.
    """

    sent: int
    errors: list[str]
    first: float
    last: float
    cpu: float  # CPU seconds the clients spent


def enqueue(socket_path: str, queue: str, total: int, clients: int, processes: bool) -> Enqueued:
    """
    Send C{total} messages from C{clients} concurrent clients (threads of
    this process, or forked processes). Times are C{time.monotonic()}
    (system-wide, so comparable across processes).
    """
    shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    shares = [s for s in shares if s]
    results: list[ClientResult] = []
    if processes:
        ctx = multiprocessing.get_context("fork")
        start = ctx.Barrier(len(shares) + 1)
        out = ctx.Queue()
        procs = [ctx.Process(target=_process_client, args=(socket_path, queue, s, start, out)) for s in shares]
        cpu0 = rusage_cpu(resource.RUSAGE_CHILDREN)
        for p in procs:
            p.start()
        start.wait()
        for _ in procs:
            sent, errors, first, last = out.get()
            results.append(ClientResult(sent, errors, first, last))
        for p in procs:
            p.join()
        cpu = rusage_cpu(resource.RUSAGE_CHILDREN) - cpu0
    else:
        start = threading.Barrier(len(shares) + 1)
        lock = threading.Lock()

        def run(share: int) -> None:
            r = enqueue_share(socket_path, queue, share, start)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=run, args=(s,)) for s in shares]
        cpu0 = rusage_cpu(resource.RUSAGE_SELF)
        for t in threads:
            t.start()
        start.wait()
        for t in threads:
            t.join()
        cpu = rusage_cpu(resource.RUSAGE_SELF) - cpu0
    return Enqueued(
        sum(r.sent for r in results),
        [e for r in results for e in r.errors],
        min(r.first for r in results),
        max(r.last for r in results),
        cpu,
    )


# -- the daemon ---------------------------------------------------------------


class Daemon:
    """
    One C{twistd -n rq} on a fresh root, optionally under twistd's cProfile
    or sampled by py-spy.
    """

    def __init__(self, root: str, log_path: str, cprofile: str | None = None) -> None:
        self.root = root
        self.socket_path = os.path.join(root, SOCKET)
        self.client = AdminClient(self.socket_path, timeout=60.0)
        argv = twistd_argv() + ["-n", "--pidfile="]
        if cprofile:
            # twistd's own profiler: the reactor thread, dumped as pstats at exit.
            argv += [f"--profile={cprofile}", "--profiler=cprofile", "--savestats"]
        argv += ["rq", "--root", root]
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self._spy: subprocess.Popen[bytes] | None = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """
        Wait until the admin socket answers C{Ping}.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.process.returncode}; see {self._log.name}")
            try:
                if self.client.call("Ping")[0] == "ok":
                    break
            except AdminClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not answer within {timeout:g}s; see {self._log.name}")
            time.sleep(0.05)
        self.pid = int(self.status().get("pid") or self.pid)

    def status(self) -> dict[str, Any]:
        """
        The parsed C{Status} answer.
        """
        status, detail = self.client.call("Status")
        if status != "ok":
            raise RuntimeError(f"Status failed: {status} {detail}")
        return json.loads(detail)

    def counts(self, queue: str) -> dict[str, int]:
        """
        The message counts of one queue.
        """
        for q in self.status().get("queues", []):
            if q.get("name") == queue:
                return q.get("counts") or {}
        raise RuntimeError(f"queue {queue} not in Status")

    def create_queue(self, name: str, script: str, workers: int) -> None:
        """
        C{rq create_queue}, as a user types it.
        """
        argv = rq_argv() + [
            "create_queue", "--name", name, "--script", script,
            "--num_workers", str(workers), "--exec_prefix", "",
        ]
        out = subprocess.run(argv, env={**os.environ, "RQ_ROOT": self.root}, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"rq create_queue failed: {out.stdout.strip()} {out.stderr.strip()}")

    def queue_admin(self, action: str, name: str) -> None:
        """
        C{pause} or C{resume} a queue.
        """
        status, detail = self.client.call("QueueAdmin", action=action, name=name)
        if status != "ok":
            raise RuntimeError(f"{action} {name} failed: {status} {detail}")

    def start_py_spy(self, output: str, rate: int = 250) -> None:
        """
        Sample the daemon with py-spy (collapsed stacks, per thread) until
        L{stop_py_spy}.
        """
        self._spy = start_py_spy(self.pid, output, rate, threads=True)

    def stop_py_spy(self) -> None:
        """
        Stop py-spy; it writes its file on SIGINT.
        """
        stop_py_spy(self._spy)
        self._spy = None

    def stop(self) -> None:
        """
        SIGTERM the daemon (it stops its workers and its watchdog); SIGKILL
        it after 30 s.
        """
        self.stop_py_spy()
        # Not started in a session of its own: SIGKILL the process alone.
        stop_daemon(self.process, 30, group=False)
        self._log.close()


# -- one run ---------------------------------------------------------------------


@dataclass
class Phase:
    """
    The figures of one run: a number of workers, live or paused.
    """

    workers: int
    variant: str
    messages: int = 0
    load: float = 0.0  # 1-minute load average when the run started
    enqueue_rate: float = 0.0
    rate: float = 0.0  # end to end (live) or processing (paused), msg/s
    seconds: float = 0.0
    cpu_us: float = 0.0  # daemon CPU per message over the measured span
    reactor_cpu_us: float = 0.0  # of which the reactor (main) thread
    child_cpu_us: float = 0.0  # reaped workers' CPU per message
    client_cpu_us: float = 0.0  # enqueue clients' CPU per message
    enqueue_cpu_us: float | None = None  # daemon CPU per message while enqueuing (paused)
    peak_rss_kb: int | None = None
    sync_rounds: list[tuple[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    err_count: int = 0
    rates: list[float] = field(default_factory=list)  # every repeat's msg/s

    @property
    def total_cpu_us(self) -> float:
        """
        CPU per message of everything the live run needs (daemon, workers,
        clients); for the paused variant, enqueue is counted too.
        """
        return self.cpu_us + (self.enqueue_cpu_us or 0.0) + self.child_cpu_us + self.client_cpu_us


def wait_done(daemon: Daemon, queue: str, total: int, poll: float, stall: float) -> float:
    """
    Poll C{Status} until C{done + err} reaches C{total}; return the
    C{time.monotonic()} of the poll that saw it.

    @raise RuntimeError: no progress for C{stall} seconds.
    """
    last_progress = time.monotonic()
    last = -1
    while True:
        counts = daemon.counts(queue)
        finished = int(counts.get("done", 0)) + int(counts.get("err", 0))
        now = time.monotonic()
        if finished >= total:
            return now
        if finished != last:
            last, last_progress = finished, now
        elif now - last_progress > stall:
            raise RuntimeError(f"queue {queue}: stuck at {finished}/{total} finished ({counts})")
        time.sleep(poll)


#: Linux's C{CLOCK_REALTIME_COARSE}, the clock of file times (not in L{time}).
_COARSE_CLOCK = 5


def file_time_step() -> float:
    """
    The granularity of file times: one kernel tick (1 to 4 ms), the
    resolution of the coarse clock the kernel stamps files with; 10 ms
    where it cannot be read.
    """
    try:
        return time.clock_getres(_COARSE_CLOCK)
    except OSError:
        return 0.01


def last_finished(root: str, queue: str) -> float:
    """
    When the last message of C{queue} finished, as C{time.monotonic()}, on
    the late side: the newest change time of the message directories in
    C{done/} (hashed) and C{err/}, plus the granularity of file times.
    Moving a message there is the last thing the daemon does with it, and
    a rename sets the moved directory's change time (to the last tick, so
    up to one tick early).
    """
    newest = 0
    top = os.path.join(root, "queue", queue)
    stack = [(os.path.join(top, "done"), 4), (os.path.join(top, "err"), 1)]
    while stack:
        path, depth = stack.pop()
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            continue
        for entry in entries:
            if depth > 1:
                stack.append((entry.path, depth - 1))
            elif entry.is_dir(follow_symlinks=False):
                newest = max(newest, entry.stat(follow_symlinks=False).st_ctime_ns)
    return newest / 1e9 + file_time_step() - (time.time() - time.monotonic())


def run_phase(base: str, script: str, workers: int, variant: str, label: str, options: argparse.Namespace) -> Phase:
    """
    Start a daemon on a fresh root, run one variant, stop the daemon.
    """
    # A name of its own: ext4 picks a top-level directory's block group
    # starting from a hash of its name, and a fixed name would land where
    # the previous run, just removed, was.
    phase_dir = os.path.join(base, f"{label}-{secrets.token_hex(4)}")
    os.makedirs(phase_dir)
    root = os.path.join(phase_dir, "root")
    cprofile = os.path.join(options.cprofile, f"{label}.prof") if options.cprofile else None
    spy_out = os.path.join(options.py_spy, f"{label}.txt") if options.py_spy else None
    n = options.messages
    result = Phase(workers, variant, n, load=os.getloadavg()[0])
    queue = "bench"
    daemon = Daemon(root, os.path.join(phase_dir, "twistd.log"), cprofile)
    try:
        daemon.wait_ready()
        daemon.create_queue(queue, script, workers)
        if spy_out:
            daemon.start_py_spy(spy_out, options.py_spy_rate)
        if variant == "paused":
            daemon.queue_admin("pause", queue)
        cpu0 = proc_cpu(daemon.pid)
        sent = enqueue(daemon.socket_path, queue, n, options.clients, options.client_processes)
        result.errors = sent.errors
        if sent.sent != n:
            raise RuntimeError(f"only {sent.sent}/{n} messages acknowledged: {sent.errors[:3]}")
        result.enqueue_rate = n / (sent.last - sent.first)
        result.client_cpu_us = sent.cpu / n * 1e6
        if variant == "paused":
            result.enqueue_cpu_us = (proc_cpu(daemon.pid) - cpu0).total / n * 1e6
            counts = daemon.counts(queue)
            if int(counts.get("que", 0)) != n:
                raise RuntimeError(f"the paused queue holds {counts}, expected que={n}")
            cpu0 = proc_cpu(daemon.pid)
            start = time.monotonic()
            daemon.queue_admin("resume", queue)
        else:
            start = sent.first
        seen = wait_done(daemon, queue, n, options.poll, options.stall)
        spent = proc_cpu(daemon.pid) - cpu0
        # The poll found the end up to one interval late; the disk says
        # when, to a tick.
        end = min(seen, last_finished(root, queue))
        daemon.stop_py_spy()
        result.seconds = end - start
        result.rate = n / result.seconds
        result.rates = [result.rate]
        result.cpu_us = spent.total / n * 1e6
        result.reactor_cpu_us = spent.main / n * 1e6
        result.child_cpu_us = spent.children / n * 1e6
        result.err_count = int(daemon.counts(queue).get("err", 0))
        result.sync_rounds = find_sync_rounds(daemon.status())
        result.peak_rss_kb = proc_status(daemon.pid, "VmHWM")
    finally:
        daemon.stop()
    if cprofile and options.top:
        print_cprofile(cprofile, options.top, label)
    if spy_out and options.top:
        print_py_spy(spy_out, options.top, label)
    return result


# -- profiles ---------------------------------------------------------------------


def print_cprofile(path: str, top: int, label: str) -> None:
    """
    The top entries of a cProfile dump, by own and by cumulative time.
    """
    import pstats

    if not os.path.exists(path):
        print(f"[{label}] no cProfile output at {path} (did the daemon exit cleanly?)")
        return
    for key in ("tottime", "cumulative"):
        print(f"\n[{label}] cProfile of the daemon's reactor thread, top {top} by {key}:")
        pstats.Stats(path, stream=sys.stdout).strip_dirs().sort_stats(key).print_stats(top)


def print_py_spy(path: str, top: int, label: str) -> None:
    """
    Own and inclusive sample shares per function and thread, from py-spy's
    collapsed stacks (C{thread;frame;frame;... count} per line).
    """
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    try:
        for frames, count in collapsed_stacks(path):
            total += count
            thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
            if thread != "?":
                frames = frames[1:]
            if frames and frames[0].startswith("thread"):
                thread, frames = frames[0], frames[1:]
            threads[thread] = threads.get(thread, 0) + count
            if not frames:
                continue
            frames = [_LINENO.sub(")", fr) for fr in frames]
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + count
    except (OSError, ValueError) as e:
        print(f"[{label}] cannot read py-spy output {path}: {e}")
        return
    if not total:
        print(f"[{label}] py-spy recorded no samples")
        return
    print(f"\n[{label}] py-spy: {total} non-idle samples; per thread:")
    for name, count in sorted(threads.items(), key=lambda kv: -kv[1]):
        print(f"  {count / total:6.1%}  {name}")
    for title, table in (("own", own), ("inclusive", incl)):
        print(f"\n[{label}] py-spy, top {top} by {title} share (all threads):")
        for name, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {count / total:6.1%}  {name}")


# -- the report ---------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(
    phases: list[Phase],
    raw: dict[int, Raw],
    launcher: dict[int, Raw],
    options: argparse.Namespace,
    raw19: dict[int, Raw] | None = None,
) -> None:
    """
    The table, its legend, the CPU budget and the comparison with the
    original RQ.
    """
    n = options.messages
    cpus = os.cpu_count() or 1
    clients = f"{options.clients} client {'processes' if options.client_processes else 'threads'}"
    repeat = f", best of {options.repeat}" if options.repeat > 1 else ""
    print()
    print(f"rqtwisted throughput: {n} messages per run{repeat}, no-op /bin/sh script, {clients},")
    print(f"{cpus} CPUs, Python {platform.python_version()}, Status poll every {options.poll * 1000:g} ms")
    print()
    print(
        "raw spawn ceiling (os.posix_spawn + waitpid of the same script, K children kept running,"
        f" best of {options.repeat * options.raw_repeat}):"
    )
    for k in sorted(raw):
        via = launcher.get(k)
        print(
            f"  concurrency {k}: {raw[k].rate:6.0f} spawns/s, {raw[k].cpu_us:5.0f} us CPU per spawn"
            + (f"   (through the fallback sh launcher: {via.rate:6.0f}/s, {via.cpu_us:5.0f} us)" if via else "")
        )
    for k in sorted(raw19 or {}):
        assert raw19 is not None
        print(f"  concurrency {k}, children reniced to 19 as workers are: {raw19[k].rate:6.0f} spawns/s")
    print()
    header = (
        f"{'workers':>7} {'variant':<7} {'load':>4} {'enqueue/s':>9} {'msg/s':>6} {'secs':>6} {'raw/s':>6}"
        f" {'ratio':>5} | {'daemon':>6} {'reactor':>7} {'enqueue':>7} {'workers':>7} {'clients':>7}"
        f" | {'peak RSS':>9} {'err':>3}"
    )
    print(f"{'':>65}CPU us per message")
    print(header)
    print("-" * len(header))
    for p in phases:
        ceiling = raw[p.workers].rate if p.workers in raw else None
        ratio = p.rate / ceiling if ceiling else None
        rss = f"{p.peak_rss_kb / 1024:.1f} MiB" if p.peak_rss_kb is not None else "-"
        print(
            f"{p.workers:>7} {p.variant:<7} {p.load:>4.1f} {p.enqueue_rate:>9.0f} {p.rate:>6.0f} {p.seconds:>6.2f}"
            f" {fmt(ceiling, '.0f'):>6} {fmt(ratio, '.2f'):>5} | {p.cpu_us:>6.0f} {p.reactor_cpu_us:>7.0f}"
            f" {fmt(p.enqueue_cpu_us, '.0f'):>7} {p.child_cpu_us:>7.0f} {p.client_cpu_us:>7.0f}"
            f" | {rss:>9} {p.err_count:>3}"
        )
        if len(p.rates) > 1:
            print(f"{'':>16}every repeat's msg/s: {', '.join(f'{r:.0f}' for r in p.rates)}"
                  f" (median {statistics.median(p.rates):.0f})")
    print(
        """
  load        1-minute load average when the run started (other processes share the CPUs)
  enqueue/s   CreateMessage calls acknowledged per second (live: while the queue runs)
  msg/s       live: N / (first enqueue -> last message done), end to end;
              paused: N / (resume -> last message done), pure processing
  ratio       msg/s / raw spawn rate at concurrency = workers
  daemon      daemon CPU (user+sys, every thread) per message over the msg/s span
              (live: enqueueing included); reactor: the main thread's part of it,
              the rest is the fsync and spawn threads
  enqueue     paused: daemon CPU per message while the messages were enqueued
  workers     CPU of the reaped worker processes per message (the script; launcher + script
              where the daemon falls back to its /bin/sh launcher)
  clients     CPU of the enqueue clients (this process's threads, or its children)
  peak RSS    the daemon's VmHWM at the end of the run (a fresh daemon per run)"""
    )
    print()
    rounds = [(p, r) for p in phases for r in p.sync_rounds]
    if rounds:
        for p, (key, value) in rounds:
            print(f"  fsync rounds, {p.workers} workers {p.variant} (Status {key}): {value}"
                  f" = {value / p.messages:.2f} per message")
    else:
        print("  fsync rounds: not exposed by Status (skipped)")
    print()
    for p in phases:
        if p.variant != "live" or p.workers not in raw:
            continue
        budget = cpus / (TARGET_RATIO * raw[p.workers].rate) * 1e6
        print(
            f"  CPU budget, {p.workers} worker{'s' if p.workers > 1 else ''} live: daemon {p.cpu_us:.0f}"
            f" + workers {p.child_cpu_us:.0f} + clients {p.client_cpu_us:.0f} = {p.total_cpu_us:.0f} us/msg"
            f" -> at most {cpus / p.total_cpu_us * 1e6:.0f} msg/s on {cpus} CPUs;"
            f" ratio {TARGET_RATIO} needs <= {budget:.0f} us/msg"
        )
    print()
    for k, (orig, orig_raw) in sorted(ORIGINAL.items()):
        mine = [p for p in phases if p.workers == k and p.variant == "live"]
        if mine and k in raw:
            print(
                f"  {k} worker{'s' if k > 1 else ' '}: rqtwisted {mine[0].rate:5.0f}/s = {mine[0].rate / raw[k].rate:.2f}"
                f" of raw;  original RQ {orig:.0f}/s = {orig / orig_raw:.2f} of raw ({orig_raw:.0f}/s)"
            )
    for p in phases:
        if raw19 and p.workers in raw19 and p.variant == "live":
            print(
                f"  {p.workers} worker{'s' if p.workers > 1 else ' '}: against the raw rate with children at"
                f" nice 19: {p.rate / raw19[p.workers].rate:.2f} ({raw19[p.workers].rate:.0f}/s)"
            )
    target = [p for p in phases if p.workers == TARGET_WORKERS and p.variant == "live"]
    if target and TARGET_WORKERS in raw:
        ratio = target[0].rate / raw[TARGET_WORKERS].rate
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(f"  target: end-to-end / raw >= {TARGET_RATIO} with {TARGET_WORKERS} workers: {ratio:.2f}, {verdict}")
    errors = [e for p in phases for e in p.errors]
    if errors:
        print(f"  enqueue errors (first ones): {errors[:5]}")


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary = " ".join(__doc__.strip().split("\n\n")[0].split()).replace("C{", "").replace("}", "")
    parser = argparse.ArgumentParser(description=summary)
    parser.add_argument("-n", "--messages", type=int, default=2000, help="messages per run (default 2000)")
    parser.add_argument(
        "--root", metavar="DIR",
        help="directory to run in (created if missing, kept): each run lays out a fresh RQ"
        " root in DIR/throughput-*/<run>/root. Default: a temporary directory, removed at the end",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--workers", default="1,4", help="worker counts, comma-separated (default 1,4)")
    parser.add_argument("--variants", default="live,paused", help="variants, comma-separated (default live,paused)")
    parser.add_argument(
        "--repeat", type=int, default=3,
        help="rounds: each measures the raw rates and does every daemon run; the best round is shown (default 3)",
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent enqueue clients (default 4)")
    parser.add_argument("--client-processes", action="store_true", help="enqueue from processes, not threads")
    parser.add_argument("--poll", type=float, default=0.1, help="Status poll interval, seconds (default 0.1)")
    parser.add_argument("--stall", type=float, default=120.0, help="give up after this many seconds without progress")
    parser.add_argument("--raw-count", type=int, default=None, help="spawns per raw measurement (default: --messages)")
    parser.add_argument(
        "--raw-repeat", type=int, default=1, help="raw measurements per concurrency and round (default 1)"
    )
    parser.add_argument(
        "--cprofile", metavar="DIR",
        help="run each daemon under twistd's cProfile (slows it down); pstats dumps in DIR/<run>.prof",
    )
    parser.add_argument(
        "--py-spy", metavar="DIR",
        help="sample each daemon with py-spy (next to the interpreter or on PATH) while it works;"
        " collapsed stacks in DIR/<run>.txt",
    )
    parser.add_argument("--py-spy-rate", type=int, default=250, metavar="HZ", help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25, help="profile entries to print (0: none)")
    parser.add_argument(
        "--no-spread", action="store_true",
        help="do not give each run's root block groups of its own (see bench/README.md)",
    )
    parser.add_argument(
        "--raw-nice", action="store_true",
        help="also measure the raw spawn rate with the children reniced to 19, as workers run"
        " (the ceiling under load from other processes)",
    )
    parser.add_argument(
        "--launcher", action="store_true",
        help="also measure the raw spawn rate through the daemon's fallback /bin/sh launcher",
    )
    options = parser.parse_args(argv)
    options.workers = [int(w) for w in options.workers.split(",") if w]
    options.variants = [v for v in options.variants.split(",") if v]
    for v in options.variants:
        if v not in ("live", "paused"):
            parser.error(f"unknown variant {v}")
    if min(options.messages, options.clients, options.repeat, options.raw_repeat) < 1 or not options.workers:
        parser.error("--messages, --clients, --repeat, --raw-repeat and --workers must be positive")
    for d in (options.cprofile, options.py_spy):
        if d:
            os.makedirs(d, exist_ok=True)
    return options


def keep_best(best: dict[Any, Any], key: Any, measured: Any) -> None:
    """
    Keep C{measured} as C{best[key]} if none is there yet or its C{rate}
    is higher: each side of the ratio shows its best round.
    """
    if key not in best or measured.rate > best[key].rate:
        best[key] = measured


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.root:
        os.makedirs(options.root, exist_ok=True)
        base = tempfile.mkdtemp(prefix="throughput-", dir=os.path.abspath(options.root))
        remove = False
    else:
        base = tempfile.mkdtemp(prefix="rq-throughput-")
        remove = not options.keep
    script = os.path.join(base, "noop.sh")
    with open(script, "w") as f:
        f.write(SCRIPT)
    os.chmod(script, 0o755)
    spread = False if options.no_spread else spread_subdirs(base)
    print(
        f"run directory {base}: "
        + ("each run's root in block groups of its own (ext4 T attribute)" if spread
           else "roots share the parent's block groups (--no-spread, or not ext4)"),
        flush=True,
    )
    try:
        from rqtwisted.spawn import DirectSpawner

        direct = DirectSpawner.available()
    except ImportError:
        direct = False
    print(
        "workers: " + ("the script spawned directly (rqtwisted.spawn)" if direct
                       else "through the /bin/sh launcher (no direct spawner on this system)"),
        flush=True,
    )
    job = os.path.join(base, "job")
    os.mkdir(job)
    go_file = os.path.join(base, "go")
    with open(go_file, "wb") as f:
        f.write(GO_LINE)
    launcher_script = worker_launcher() if options.launcher else None
    raw_count = options.raw_count or options.messages
    raw: dict[int, Raw] = {}
    launcher: dict[int, Raw] = {}
    raw19: dict[int, Raw] = {}
    phases: list[Phase] = []
    try:
        # Concurrent spawns from this process go 15-25% faster once it has
        # spawned one child at a time for a while (measured; the cause is
        # the kernel's, not ours). One such run first, so that the ceiling
        # is the higher one whichever worker counts were asked for.
        raw_spawn_rate([script], raw_count, 1)
        # Rounds: the raw ceilings, then every daemon run, R times over. The
        # machine's speed drifts by several per cent from one minute to the
        # next: both sides are measured in every round, and both show their
        # best round.
        best: dict[tuple[int, str], Phase] = {}
        rates: dict[tuple[int, str], list[float]] = {}
        for round_ in range(options.repeat):
            for k in sorted(set(options.workers)):
                for _ in range(options.raw_repeat):
                    r = raw_spawn_rate([script], raw_count, k)
                    keep_best(raw, k, r)
                    line = f"raw spawn, concurrency {k}: {r.rate:.0f}/s"
                    if options.raw_nice:
                        r19 = raw_spawn_rate([script], raw_count, k, niceness=19)
                        keep_best(raw19, k, r19)
                        line += f" (children reniced to 19: {r19.rate:.0f}/s)"
                    if launcher_script is not None:
                        # The launcher's arguments: job dir, start time, real script, argv.
                        argv = ["/bin/sh", "-c", launcher_script, "rq-worker", job, "now", script, script]
                        try:
                            via = raw_spawn_rate(argv, raw_count, k, go_file)
                        except RuntimeError as e:
                            print(f"the worker launcher cannot be measured alone: {e}", flush=True)
                            launcher_script = None
                        else:
                            keep_best(launcher, k, via)
                            line += f" (via the launcher {via.rate:.0f}/s)"
                    print(line, flush=True)
            for workers in options.workers:
                for variant in options.variants:
                    key = (workers, variant)
                    label = f"w{workers}-{variant}" + (f"-{round_ + 1}" if options.repeat > 1 else "")
                    p = run_phase(base, script, workers, variant, label, options)
                    rates.setdefault(key, []).append(p.rate)
                    print(
                        f"{workers} worker(s), {variant}: enqueue {p.enqueue_rate:.0f}/s, {p.rate:.0f} msg/s"
                        f" over {p.seconds:.2f}s (load {p.load:.2f})", flush=True
                    )
                    keep_best(best, key, p)
        for workers in options.workers:
            for variant in options.variants:
                key = (workers, variant)
                best[key].rates = rates[key]
                phases.append(best[key])
        print_report(phases, raw, launcher, options, raw19)
    finally:
        if remove:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"\nrun directory kept: {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
