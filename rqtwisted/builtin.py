"""
Built-in queues run in-process: a handler coroutine instead of a forked script.

The built-in queues (C{relay}, C{webhook}, C{cleaner}, C{rq_router}) ship
with a placeholder script (C{code/<name>_script}, written by C{rq init}).
While a built-in queue's script is still that placeholder, its messages are
run inside the daemon by a I{handler}::

    async def handler(job: InProcessJob) -> None:
        job.log("attempting remote ...")          # a line in job/stdio.log
        job.report("run uploading")               # same lines as fd 3
        reply = await job.dup("0-X-http://h:3333/q/other")   # "ok <id>"/"fail ..."
        job.report("done delivered")

A handler reports exactly what a queue script writes on fd 3 (C{run},
C{done}, C{err}, C{resend <secs>[-<reason>]}, C{relayed <full id>}, C{dup
...}, or any other verb for status text only) and the queue service applies
the same completion table (script-api.md): returning is a clean exit (status
0); raising reports C{err <exception text>} and exits 1, so the message ends
in err with that text; being cancelled (the queue stops or the message is
destroyed: L{InProcessWorker.signal}) cancels the handler's L{Deferred} and
counts as death by that signal, so on shutdown the message stays in C{run/}
and goes back to C{que/} at the next start, like a killed script's. A
handler that swallows its cancellation is abandoned all the same: the job
ends there, its slot is freed, and whatever it reports later is ignored.

A user who replaces the placeholder with a script of their own gets that
script forked as usual: L{BuiltinSpawner} decides at every launch, from the
resolved script path the queue service passes it (the placeholder is known
by its first two lines, L{is_placeholder}).

Handlers are found through L{HANDLERS}: queue name -> handler factory
C{(instance) -> handler}, given either as a callable or as a dotted name
C{"package.module.attribute"} imported on first use. A module that does not
exist, or a factory that raises (logged), leaves the queue forking its
placeholder, which ends each message in err with a clear status.
L{register_handler} adds or replaces an entry.

The in-process worker has pid 0 (written to C{run/<id>/pid}; the watchdog and
C{read_pid} ignore it) and appends its progress to the job's C{stdio.log}
(an C{RQ START} line, then one line per L{InProcessJob.log} call), so the web
log view shows what a built-in is doing.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Union

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.message import JSON_READ_ERRORS
from rqtwisted.message import full_id as make_full_id
from rqtwisted.protocol import Report
from rqtwisted.worker import WorkerEvents, start_line_time

if TYPE_CHECKING:
    from rqtwisted.supervisor import Instance

_log = Logger()

#: The pid recorded for an in-process worker (never signalled by anyone).
IN_PROCESS_PID = 0

#: A handler: runs one message of a built-in queue.
Handler = Callable[["InProcessJob"], Awaitable[None]]

#: Builds the handler of a queue for an instance.
HandlerFactory = Callable[["Instance"], Handler]

#: Built-in queue name -> handler factory (or its dotted name).
HANDLERS: dict[str, Union[HandlerFactory, str]] = {
    "relay": "rqtwisted.relay.make_handler",
    "webhook": "rqtwisted.webhook.make_handler",
    "cleaner": "rqtwisted.cleaner.make_handler",
    "rq_router": "rqtwisted.router.make_handler",
}


def register_handler(name: str, factory: Union[HandlerFactory, str]) -> None:
    """
    Run queue C{name}'s messages with the handler C{factory(instance)} makes
    (while its script is the shipped placeholder).
    """
    HANDLERS[name] = factory


def handler_factory(name: str) -> HandlerFactory | None:
    """
    The handler factory registered for queue C{name}, or L{None} (none
    registered, or its module cannot be imported yet).
    """
    entry = HANDLERS.get(name)
    if entry is None or callable(entry):
        return entry
    module_name, _, attribute = entry.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            return None
        raise
    factory = getattr(module, attribute, None)
    return factory if callable(factory) else None


#: First lines of the placeholder script C{rq init} writes (rqtwisted.root).
_PLACEHOLDER_HEAD = "#!/bin/sh\n# Queue script of the built-in queue '{name}'."


def is_placeholder(real_script: str, name: str) -> bool:
    """
    Is C{real_script} the placeholder shipped for built-in queue C{name}?
    """
    head = _PLACEHOLDER_HEAD.format(name=name).encode("utf-8")
    try:
        with open(real_script, "rb") as f:
            return f.read(len(head)) == head
    except OSError:
        return False


@dataclass
class InProcessJob:
    """
    One message run by a handler.

    @ivar queue: the queue's name.
    @ivar msg_id: the short id.
    @ivar full_id: the full id.
    @ivar msg: the message's fields (from C{../msg}, as a script reads them).
    @ivar msg_dir: the message directory (C{run/<id>}).
    @ivar job_dir: its C{job/} directory (the script's cwd).
    @ivar env: the environment a script would get (C{RQ_DEST}, C{RQ_COUNT}...).
    @ivar instance: the daemon.
    @ivar clock: the reactor (time functions; the real reactor in the daemon).
    """

    queue: str
    msg_id: str
    full_id: str
    msg: dict[str, Any]
    msg_dir: str
    job_dir: str
    env: Mapping[str, str]
    instance: "Instance"
    clock: IReactorTime
    _worker: "InProcessWorker" = field(repr=False)

    @property
    def attach_dir(self) -> str:
        """
        The message's C{attach/} directory (may not exist).
        """
        return os.path.join(self.msg_dir, "attach")

    def report(self, line: str) -> None:
        """
        Report one fd-3 line (C{<verb> <text>}); newlines become spaces.
        """
        self._worker._report(line)

    def log(self, text: str) -> None:
        """
        Append C{<pid> - <time> - <text>} to the job's C{stdio.log}.
        """
        self._worker._log(text)

    def dup(self, request: str) -> Deferred[str]:
        """
        Report C{dup <request>}; fires with the queue's one-line reply
        (C{ok <new full id>} or C{fail <reason>}).
        """
        d: Deferred[str] = Deferred()
        self._worker._replies.append(d)
        self._worker._report(f"dup {request}")
        return d


class InProcessWorker:
    """
    The L{rqtwisted.worker.Worker} of an in-process job: what the queue
    service holds while a handler runs.
    """

    pid = IN_PROCESS_PID

    def __init__(self, events: WorkerEvents, stdio_path: str) -> None:
        self._events = events
        self._stdio = stdio_path
        self._replies: list[Deferred[str]] = []
        self._deferred: Deferred[None] | None = None
        self._signal: int | None = None
        self._file: Any = None
        self.exited = False

    def _report(self, line: str) -> None:
        if self.exited or self._signal is not None:
            return
        verb, _, text = line.replace("\n", " ").partition(" ")
        try:
            self._events.reportReceived(Report(verb, text))
        except Exception:
            _log.failure("in-process report handler failed")

    def _log(self, text: str) -> None:
        stamp = start_line_time(time.time())
        self._write(f"{os.getpid()} - {stamp} - {text}\n".encode("utf-8", "replace"))

    def _write(self, data: bytes) -> None:
        """
        Append to the job's C{stdio.log}, kept open (unbuffered) while the
        job runs.
        """
        try:
            if self._file is None:
                if self.exited:
                    with open(self._stdio, "ab") as f:
                        f.write(data)
                    return
                self._file = open(self._stdio, "ab", buffering=0)
            self._file.write(data)
        except OSError as e:
            _log.warn("cannot write {path}: {error}", path=self._stdio, error=e)

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def reply(self, line: str) -> None:
        """
        A dup reply from the queue: fires the oldest pending L{InProcessJob.dup}.
        """
        if self._replies:
            self._replies.pop(0).callback(line)

    def signal(self, sig: int) -> None:
        """
        Cancel the handler (any signal ends an in-process job).
        """
        if self.exited:
            return
        self._signal = sig
        if self._deferred is None:
            return  # not started: _run exits at once
        self._deferred.cancel()
        if not self.exited:
            # The handler swallowed its cancellation: the job ends here all
            # the same (its slot is freed; later reports are ignored).
            self._log(f"cancelled (signal {sig}); the handler did not stop")
            self._exit(None, sig)

    def _exit(self, code: int | None, sig: int | None) -> None:
        if self.exited:
            return
        self.exited = True
        self._close()
        for d in self._replies:
            d.cancel()
        self._replies = []
        try:
            self._events.workerExited(code, sig)
        except Exception:
            _log.failure("in-process exit handler failed")

    def _run(self, handler: Handler, job: InProcessJob) -> None:
        if self._signal is not None:
            self._exit(None, self._signal)
            return
        try:
            d: Deferred[None] = ensureDeferred(handler(job))
        except Exception:
            d = fail(Failure())
        self._deferred = d

        def finished(result: object) -> None:
            if self.exited:
                if isinstance(result, Failure) and not result.check(CancelledError):
                    _log.failure("{queue} handler failed after its end", result, queue=job.queue)
                return
            if self._signal is not None:
                job.log(f"cancelled (signal {self._signal})")
                self._exit(None, self._signal)
                return
            if isinstance(result, Failure):
                text = result.getErrorMessage() or result.type.__name__
                _log.failure("{queue} handler failed on {msg_id}", result, queue=job.queue, msg_id=job.msg_id)
                job.log(f"failed: {text}")
                self._report(f"err {text}")
                self._exit(1, None)
                return
            self._exit(0, None)

        d.addBoth(finished)


def _read_msg(msg_dir: str) -> dict[str, Any]:
    with open(os.path.join(msg_dir, "msg"), "rb") as f:
        data = json.loads(f.read())
    return data if isinstance(data, dict) else {}


class BuiltinSpawner:
    """
    The spawn function of a built-in queue: runs the queue's handler
    in-process while its script is the placeholder, else forks as usual.

    Call signature as L{rqtwisted.worker.spawn_worker} bound to a reactor.
    """

    def __init__(
        self,
        instance: "Instance",
        name: str,
        fallback: Callable[..., Any],
        factory: HandlerFactory | None = None,
    ) -> None:
        """
        @param instance: the daemon.
        @param name: the queue's name.
        @param fallback: the forking spawner (for a user's own script).
        @param factory: the handler factory (default: from L{HANDLERS}).
        """
        self._instance = instance
        self._name = name
        self._fallback = fallback
        self._factory = factory
        self._handler: Handler | None = None
        self._broken = False

    def handler(self) -> Handler | None:
        """
        The queue's handler (built once), or L{None} when none exists.
        """
        if self._handler is None and not self._broken:
            try:
                factory = self._factory or handler_factory(self._name)
                if factory is None:
                    return None
                self._handler = factory(self._instance)
            except Exception:
                # A broken handler module must not take the queue down: its
                # placeholder runs (and says so in the message's status).
                self._broken = True
                _log.failure("queue {queue}: built-in handler unavailable", queue=self._name)
        return self._handler

    def _in_process(self, real_script: str) -> Handler | None:
        """
        The handler that runs messages of C{real_script} in-process: the
        queue's, while its script is the placeholder.
        """
        return self.handler() if is_placeholder(real_script, self._name) else None

    def holds(self, real_script: str) -> bool:
        """
        Whether a worker for C{real_script} can be made ready ahead (spawned
        with C{hold}): not when the handler runs it in-process.
        """
        return self._in_process(real_script) is None

    def __call__(
        self,
        *,
        argv: list[str],
        env: dict[str, str],
        job_dir: str,
        real_script: str,
        events: WorkerEvents,
        **kwargs: Any,
    ) -> Any:
        """
        Start one message: in-process when the script is the placeholder
        and a handler exists, else by C{fallback}.
        """
        handler = self._in_process(real_script)
        if handler is not None and kwargs.get("hold"):
            raise OSError(errno.EOPNOTSUPP, "an in-process handler is not made ready ahead")
        if handler is None:
            return self._fallback(
                argv=argv, env=env, job_dir=job_dir, real_script=real_script, events=events, **kwargs
            )
        msg_dir = os.path.dirname(os.path.abspath(job_dir))
        msg_id = os.path.basename(msg_dir)
        stdio = os.path.join(job_dir, "stdio.log")
        worker = InProcessWorker(events, stdio)
        try:
            msg = _read_msg(msg_dir)
        except JSON_READ_ERRORS as e:
            raise OSError(f"cannot read the message: {e}")
        settings = self._instance.settings
        job = InProcessJob(
            queue=self._name,
            msg_id=msg_id,
            full_id=env.get("RQ_FULL_MSG_ID") or make_full_id(settings.base_url, self._name, msg_id),
            msg=msg,
            msg_dir=msg_dir,
            job_dir=job_dir,
            env=dict(env),
            instance=self._instance,
            clock=self._instance.clock,
            _worker=worker,
        )
        stamp = start_line_time(time.time())
        worker._write(f"\n{os.getpid()} - {stamp} - RQ START - in-process {self._name}\n".encode())
        # Like spawn_worker: no event before this returns.
        self._instance.clock.callLater(0, worker._run, handler, job)
        return worker


def spawner_for(instance: "Instance", name: str, fallback: Callable[..., Any]) -> Callable[..., Any]:
    """
    The spawn function for queue C{name}: a L{BuiltinSpawner} for a
    registered built-in, else C{fallback} itself.
    """
    if name in HANDLERS:
        return BuiltinSpawner(instance, name, fallback)
    return fallback
