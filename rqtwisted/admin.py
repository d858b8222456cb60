"""
The admin protocol: AMP over a Unix socket in the root.

Each command of L{rqtwisted.admincommands.COMMANDS} becomes an
L{amp.Command}; L{AdminProtocol} answers it by calling the method of the same
name, in snake case, on an L{IAdminAPI} provider (the daemon's L{Instance}),
so this module holds no behaviour of its own beyond transport: values too
large for AMP are spilled to a file, failures become C{fail <reason>}.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from rqtwisted.admincommands import COMMANDS
from rqtwisted.message import MessageError

if TYPE_CHECKING:
    from rqtwisted.supervisor import Instance

_log = Logger()

#: The largest detail sent inline; larger ones are spilled to a file.
MAX_INLINE = amp.MAX_VALUE_LENGTH - 1024


def _makeCommand(name: str, required: tuple[str, ...], optional: tuple[str, ...]) -> type[amp.Command]:
    arguments = [(a.encode("ascii"), amp.Unicode()) for a in required] + [
        (a.encode("ascii"), amp.Unicode(optional=True)) for a in optional
    ]
    response = [
        (b"status", amp.Unicode()),
        (b"detail", amp.Unicode()),
        (b"spill", amp.Unicode(optional=True)),
    ]
    return type(
        name,
        (amp.Command,),
        {"arguments": arguments, "response": response, "__doc__": f"The admin command {name}."},
    )


#: command name -> AMP Command class.
commands: dict[str, type[amp.Command]] = {
    name: _makeCommand(name, req, opt) for name, (req, opt) in COMMANDS.items()
}


def snake(name: str) -> str:
    """
    C{CreateMessage} -> C{create_message}: the API method answering a command.
    """
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class IAdminAPI(Interface):
    """
    What the admin socket drives: one method per command, in snake case,
    taking the command's arguments as keyword text values and returning (or
    firing with) C{(status, detail)}. Raising L{MessageError} answers
    C{fail <reason>}.
    """


class AdminProtocol(amp.AMP):
    """
    One admin connection: dispatches every known command to the API.
    """

    def __init__(self, api: Any, spillDir: str) -> None:
        super().__init__()
        self._api = api
        self._spillDir = spillDir

    def makeConnection(self, transport: Any) -> None:
        """
        Start the connection without AMP's per-connection log line: the CLI
        opens one connection per call, and two log lines per call cost more
        than the call itself.
        """
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:
        """
        End the connection quietly (see L{makeConnection}).
        """
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    def locateResponder(self, name: bytes) -> Callable[[amp.AmpBox], Any] | None:
        """
        Find the responder for a command box by its name.
        """
        command = commands.get(name.decode("ascii", "replace"))
        if command is None:
            return None
        method = getattr(self._api, snake(command.__name__))

        def call(**kwargs: str) -> Any:
            args = {k: v for k, v in kwargs.items() if v is not None}
            d = maybeDeferred(method, **args)
            d.addCallbacks(self._reply, self._failed)
            return d

        return self._wrapWithSerialization(call, command)

    def _reply(self, result: tuple[str, str]) -> dict[str, str]:
        status, detail = result
        if len(detail.encode("utf-8")) <= MAX_INLINE:
            return {"status": status, "detail": detail}
        os.makedirs(self._spillDir, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="spill-", suffix=".json", dir=self._spillDir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(detail)
        return {"status": status, "detail": "", "spill": path}

    def _failed(self, failure: Failure) -> dict[str, str]:
        if failure.check(MessageError):
            return {"status": "fail", "detail": failure.value.reason}
        _log.failure("admin command failed", failure)
        return {"status": "fail", "detail": f"internal error: {failure.getErrorMessage()}"}



def _ok(detail: str) -> tuple[str, str]:
    return ("ok", detail)


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise MessageError(f"{what} is not valid JSON")


@implementer(IAdminAPI)
class AdminAPI:
    """
    The admin commands over an L{rqtwisted.supervisor.Instance}: each method
    takes the command's text arguments and returns C{(status, detail)}.
    """

    def __init__(self, instance: "Instance") -> None:
        self.instance = instance

    def ping(self) -> tuple[str, str]:
        """
        C{ok pong}.
        """
        return _ok("pong")

    def status(self) -> tuple[str, str]:
        """
        The instance status as JSON.
        """
        return _ok(json.dumps(self.instance.status()))

    def queues(self) -> tuple[str, str]:
        """
        The queue names as a JSON array.
        """
        return _ok(json.dumps(self.instance.queue_names()))

    def restart(self) -> Deferred[tuple[str, str]]:
        """
        Restart every queue with a fresh config.
        """
        return self.instance.restart().addCallback(_ok)

    def reload(self) -> Deferred[tuple[str, str]]:
        """
        Re-read queue configs and queue directories, rescan timers and
        scandir; C{fail} (with the reasons) when a queue config is bad.
        """

        def answer(text: str) -> tuple[str, str]:
            return ("fail" if self.instance.config_errors else "ok", text)

        return self.instance.reload().addCallback(answer)

    def create_queue(self, config: str) -> tuple[str, str]:
        """
        Create a queue; answers the original's C{success} word.
        """
        data = _loads(config, "queue config")
        if not isinstance(data, dict):
            raise MessageError("queue config must be a JSON object")
        return ("success", self.instance.create_queue(data))

    def delete_queue(self, name: str) -> Deferred[tuple[str, str]]:
        """
        Stop a queue and set its directory aside.
        """
        return self.instance.delete_queue(name).addCallback(_ok)

    def queue_admin(self, action: str, name: str) -> Any:
        """
        C{up}, C{down}, C{pause}, C{resume} or C{restart} a queue.
        """
        if action == "restart":
            return self.instance.restart_queue(name).addCallback(_ok)
        if action not in ("up", "down", "pause", "resume"):
            raise MessageError(f"unknown queue action {action}")
        return _ok(self.instance.set_admin(action, name))

    def create_message(self, message: str, method: str, relay_ok: str = "") -> Deferred[tuple[str, str]]:
        """
        Create a message (C{sendmesg}, C{prepmesg}, C{single_que}).
        """
        data = _loads(message, "message")
        return self.instance.create_message(data, method, bool(relay_ok)).addCallback(_ok)

    def attach_message(self, msg_id: str, pathname: str, name: str = "") -> Deferred[tuple[str, str]]:
        """
        Attach a file of this machine to a prepared message.
        """
        queue, short = self.instance.locate(msg_id)
        return queue.attach(short, pathname, name or None).addCallback(_ok)

    def message_action(self, action: str, msg_id: str) -> Any:
        """
        C{commit}, C{delete}, C{destroy}, C{run_now}, C{clone}, C{status} or
        C{state} of a message.
        """
        queue, short = self.instance.locate(msg_id)
        if action == "status":
            return _ok(queue.get_status(short)["status"])
        if action == "state":
            return _ok(queue.locate(short))
        method = {
            "commit": queue.commit,
            "delete": queue.delete,
            "destroy": queue.destroy,
            "run_now": queue.run_now,
            "clone": queue.clone,
        }.get(action)
        if method is None:
            raise MessageError(f"unknown message action {action}")
        return maybeDeferred(method, short).addCallback(_ok)

    def search(self, query: str, name: str = "", exact: str = "") -> tuple[str, str]:
        """
        The messages matching C{query} (a JSON object), as a JSON array.
        """
        data = _loads(query, "query")
        return _ok(json.dumps(self.instance.search(name or None, data, bool(exact))))

    def get_message(self, msg_id: str) -> tuple[str, str]:
        """
        The read form of a message as JSON.
        """
        queue, short = self.instance.locate(msg_id)
        return _ok(json.dumps(queue.get(short)))


class AdminFactory(Factory):
    """
    Builds an L{AdminProtocol} per connection.
    """

    def __init__(self, api: Any, spillDir: str) -> None:
        self.api = api
        self.spillDir = spillDir

    def buildProtocol(self, addr: Any) -> AdminProtocol:
        """
        A protocol bound to the API.
        """
        return AdminProtocol(self.api, self.spillDir)
