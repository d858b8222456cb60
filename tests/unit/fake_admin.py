"""
A fake of the daemon's admin socket for the command line and console tests.
"""

from __future__ import annotations

from typing import Any


class FakeDaemon:
    """
    An admin client factory and client: records the sockets asked for and
    the requests; answers from C{replies}, a command name mapping to a
    reply, an exception to raise, or a list of those used in turn. Other
    commands answer C{("ok", "")}.
    """

    def __init__(self, **replies: Any) -> None:
        self.replies = replies
        self.sockets: list[str] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.closed = 0

    def __call__(self, socket_path: str) -> "FakeDaemon":
        self.sockets.append(socket_path)
        return self

    def call(self, command: str, **args: str) -> tuple[str, str]:
        """
        Record the request; its reply (or raise it).
        """
        self.requests.append((command, args))
        reply = self.replies.get(command, ("ok", ""))
        if isinstance(reply, list):
            reply = reply.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def close(self) -> None:
        """
        Count the closes.
        """
        self.closed += 1
