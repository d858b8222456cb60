"""
How many workers per second can L{rqtwisted.worker.spawn_worker} start?

Spawns a no-op C{#!/bin/sh} script N times at concurrency 1 and 4, through
C{spawn_worker} on the real reactor (stdio.log, pipes, setsid, nice 19, start
line, exit reporting): with the direct spawner it uses by default, and with
the C{/bin/sh} launcher it falls back to (one more shell start per worker);
next to a raw C{os.posix_spawn} + C{waitpid} of the same script as the
floor. Run from the project root::

    python bench/spawn_rate.py [-n COUNT]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.defer import Deferred  # noqa: E402

from rqtwisted.protocol import Report  # noqa: E402
import rqtwisted.worker as worker_module  # noqa: E402
from rqtwisted.worker import script_argv, spawn_worker  # noqa: E402
from _common import scratch  # noqa: E402
from throughput import spread_subdirs  # noqa: E402


def make_script(directory: str) -> str:
    """
    Write the no-op script and return its path.
    """
    path = os.path.join(directory, "noop.sh")
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(path, 0o755)
    return path


def raw_rate(
    argv: Callable[[int], list[str]], count: int, concurrency: int, go: str | None = None
) -> float:
    """
    Spawns per second of C{os.posix_spawn(argv(n))} keeping C{concurrency}
    children running (C{go}: a file to open as fd 4).
    """
    env = dict(os.environ)
    actions = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
    if go is not None:
        actions.append((os.POSIX_SPAWN_OPEN, 4, go, os.O_RDONLY, 0))
    argvs = [argv(n) for n in range(count)]
    running = 0
    started = 0
    t0 = time.perf_counter()
    while started < count or running:
        while running < concurrency and started < count:
            args = argvs[started]
            os.posix_spawn(args[0], args, env, file_actions=actions)
            running += 1
            started += 1
        os.waitpid(-1, 0)
        running -= 1
    return count / (time.perf_counter() - t0)


def job_dirs(root: str, name: str, count: int) -> list[str]:
    """
    Make C{count} fresh job directories (outside the timings: creating
    files is slow on some disks).
    """
    dirs = [os.path.join(root, f"{name}-{n}") for n in range(count)]
    for path in dirs:
        os.mkdir(path)
    return dirs


class _Events:
    def __init__(self, done: Callable[[], None]) -> None:
        self._done = done

    def reportReceived(self, report: Report) -> None:
        pass

    def workerExited(self, exit_code: int | None, signal: int | None) -> None:
        self._done()


def worker_rate(
    reactor, script: str, jobs: list[str], concurrency: int
) -> Deferred[float]:
    """
    Spawns per second of L{spawn_worker} keeping C{concurrency} workers
    running; fires with the rate.
    """
    env = dict(os.environ)
    argv = script_argv("", script)
    count = len(jobs)
    result: Deferred[float] = Deferred()
    state = {"started": 0, "finished": 0, "t0": time.perf_counter()}

    def start_one() -> None:
        n = state["started"]
        state["started"] += 1
        job = jobs[n]
        spawn_worker(
            reactor,
            argv=argv,
            env=env,
            job_dir=job,
            real_script=script,
            events=_Events(one_done),
        )

    def one_done() -> None:
        state["finished"] += 1
        if state["finished"] == count:
            result.callback(count / (time.perf_counter() - state["t0"]))
        elif state["started"] < count:
            start_one()

    for _ in range(min(concurrency, count)):
        start_one()
    return result


def main() -> None:
    """
    Measure and print the rates.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("-n", "--count", type=int, default=500)
    options = parser.parse_args()

    from twisted.internet import defer, reactor

    results: list[str] = []
    direct = worker_module._direct_spawner() is not None

    @defer.inlineCallbacks
    def run(tmp: str, script: str):
        try:
            for concurrency in (1, 4):
                n = options.count
                raw = raw_rate(lambda i: [script], n, concurrency)
                line = f"concurrency {concurrency}: raw posix_spawn {raw:7.0f}/s"
                if direct:
                    dirs = job_dirs(tmp, f"direct{concurrency}", n)
                    rate = yield worker_rate(reactor, script, dirs, concurrency)
                    line += f"   spawn_worker {rate:7.0f}/s ({rate / raw:.0%})"
                saved = worker_module._direct
                worker_module._direct = False
                try:
                    dirs = job_dirs(tmp, f"launcher{concurrency}", n)
                    rate = yield worker_rate(reactor, script, dirs, concurrency)
                finally:
                    worker_module._direct = saved
                line += f"   through the fallback sh launcher {rate:7.0f}/s ({rate / raw:.0%})"
                results.append(line)
        finally:
            reactor.stop()

    with scratch(None, "rq-spawn-bench-") as tmp:
        # Job dirs in block groups of their own (see bench/README.md).
        spread_subdirs(tmp)
        reactor.callWhenRunning(run, tmp, make_script(tmp))
        reactor.run()
    print(f"{options.count} spawns of a no-op /bin/sh script, {os.cpu_count()} CPUs")
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
