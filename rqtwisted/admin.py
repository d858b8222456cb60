"""
The admin protocol: AMP over a Unix socket in the root.

Each command of L{rqtwisted.admincommands.COMMANDS} becomes an
L{amp.Command}; L{AdminProtocol} answers it by calling the method of the same
name, in snake case, on an L{IAdminAPI} provider (the daemon's L{Instance}),
so this module holds no behaviour of its own beyond transport: values too
large for AMP are spilled to a file, failures become C{fail <reason>}.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Callable

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import Interface

from rqtwisted.admincommands import COMMANDS, RESPONSE
from rqtwisted.message import MessageError

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


assert RESPONSE == ("status", "detail", "spill")
