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
import keyword
import os
import re
import stat
import struct
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, TypeVar

from twisted.application.internet import UNIXServer
from twisted.internet import tcp, unix
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from rqtwisted.admincommands import COMMANDS, MAX_MESSAGE_FILE, SPILL_DIR, TURNED_AWAY
from rqtwisted.ampclient import ProtocolError, read_box
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


_snakes: dict[str, str] = {}


def snake(name: str) -> str:
    """
    C{CreateMessage} -> C{create_message}: the API method answering a command.
    """
    method = _snakes.get(name)
    if method is None:
        method = _snakes[name] = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return method


class _FastCommand(NamedTuple):
    """
    What L{AdminProtocol}'s fast path needs to answer one command without
    Twisted's per-box machinery.
    """

    #: The command name.
    name: str
    #: The L{amp.Command} it stands for (checked against L{commands}).
    command: type[amp.Command]
    #: The API method answering it (L{snake} of the name).
    method: str
    #: (wire key, keyword) of the required and the optional arguments.
    required: tuple[tuple[bytes, str], ...]
    optional: tuple[tuple[bytes, str], ...]


#: The response schema the fast path writes by hand.
_RESPONSE_SCHEMA = [
    (b"status", amp.Unicode, False),
    (b"detail", amp.Unicode, False),
    (b"spill", amp.Unicode, True),
]


def _fastCommand(name: str, command: type[amp.Command]) -> _FastCommand | None:
    """
    The fast-path description of a command, or C{None} when its schema
    holds anything but plain text arguments named like Python identifiers
    and the C{status}/C{detail}/C{spill} response (Twisted answers those).
    """
    required: list[tuple[bytes, str]] = []
    optional: list[tuple[bytes, str]] = []
    for wire, argument in command.arguments:
        if type(argument) is not amp.Unicode or re.fullmatch(rb"[a-z][a-z0-9_]*", wire) is None:
            return None
        python = wire.decode("ascii")
        if keyword.iskeyword(python) or keyword.issoftkeyword(python):
            return None
        if python in amp.PYTHON_KEYWORDS:
            return None
        (optional if argument.optional else required).append((wire, python))
    response = [(wire, type(argument), bool(argument.optional)) for wire, argument in command.response]
    if response != _RESPONSE_SCHEMA or command.allErrors or command.responseType is not amp.AmpBox:
        return None
    return _FastCommand(name, command, snake(name), tuple(required), tuple(optional))


def _fastCommands() -> dict[bytes, _FastCommand]:
    fast = {}
    for name, command in commands.items():
        spec = _fastCommand(name, command)
        if spec is not None:
            fast[name.encode("ascii")] = spec
    return fast


#: wire command name -> its fast-path description.
_FAST_COMMANDS = _fastCommands()

_ASK = amp.ASK
_ANSWER = amp.ANSWER
_COMMAND = amp.COMMAND
_ERROR = amp.ERROR
_packLength = struct.Struct("!H").pack
_ANSWER_KEY = _packLength(len(_ANSWER)) + _ANSWER
_DETAIL_KEY = _packLength(6) + b"detail"
_SPILL_KEY = _packLength(5) + b"spill"
_STATUS_KEY = _packLength(6) + b"status"
_END_OF_BOX = _packLength(0)


def _identity(value: Any) -> Any:
    return value


_Method = TypeVar("_Method", bound=Callable[..., Any])


def cancelled_on_hang_up(method: _Method) -> _Method:
    """
    Mark an L{IAdminAPI} method whose requests are cancelled (their
    L{Deferred}'s C{cancel}) when the connection that sent them is lost
    before they are answered: for work that can be abandoned cleanly, as an
    attachment still being copied. Other requests run to their end whether
    anybody waits or not.
    """
    method.cancelledOnHangUp = True  # type: ignore[attr-defined]
    return method


class IAdminAPI(Interface):
    """
    What the admin socket drives: one method per command, in snake case,
    taking the command's arguments as keyword text values and returning (or
    firing with) C{(status, detail)}. Raising L{MessageError} answers
    C{fail <reason>}.
    """


@implementer(IPushProducer)
class _PauseReadingWhileUnread:
    """
    Stops reading a connection while the answers written to it pile up
    unread (its transport pauses this producer past its buffer size), so
    that a peer that sends requests and never reads cannot grow the
    daemon's memory; reading goes on once they drained.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        """
        The answers pile up: read no more requests.
        """
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        """
        They were read: read requests again.
        """
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        """
        The connection ends: nothing to do.
        """


#: The most bytes of one unfinished request box kept: the largest admin
#: request (a few arguments of at most 64 KiB each) is far smaller.
MAX_PENDING_BOX = 1 << 20


class AdminProtocol(amp.AMP):
    """
    One admin connection: dispatches every known command to the API.

    The common case, whole C{_command} boxes of known commands carrying
    their text arguments, is parsed and answered here in one pass (see
    L{dataReceived}). Anything else (a box that is not a command, an unknown
    command, a missing or undecodable argument, an oversized key, a paused
    connection) and everything after it on the connection goes through
    L{amp.AMP}'s own code for good, which gives its own answers, but for a
    missing or undecodable argument: C{fail <reason>} (see
    L{locateResponder}). Both paths put the same bytes on the wire for the
    same input.

    The state of L{amp.AMP} itself is only built once that slower path is
    needed: a connection carrying one command, the command line's way, never
    needs it.
    """

    #: Whether the connection has left the fast path for good.
    _twisted = False
    #: The start of a box whose end has not arrived yet.
    _pending = b""
    #: Answers written on the fast path (see L{_watchBacklog}).
    _answered = 0
    #: Requests taken whose answer is not written yet.
    _inflight = 0
    #: Those of them to cancel if the connection is lost (see
    #: L{cancelled_on_hang_up}).
    _cancellable: "set[Deferred[Any]] | None" = None
    #: Hang up once every request taken is answered (see L{closeWhenAnswered}).
    _closing = False
    #: The L{AdminFactory} that keeps track of its connections, if any.
    tracker: "AdminFactory | None" = None

    def __init__(
        self, api: Any, spillDir: str, methods: dict[bytes, Callable[..., Any]] | None = None
    ) -> None:
        """
        @param api: The L{IAdminAPI} provider answering the commands.
        @param spillDir: Where details too large for AMP are written.
        @param methods: A cache of the API's bound methods by wire command
            name, shared by the connections of one L{AdminFactory}.
        """
        self._api = api
        self._spillDir = spillDir
        self._methods: dict[bytes, Callable[..., Any]] = {} if methods is None else methods

    def _startAMP(self) -> None:
        """
        Build the state of L{amp.AMP} that L{__init__} skips.
        """
        if not self._ampInitialized:
            amp.AMP.__init__(self)
            if self.transport is not None:
                self.boxReceiver.startReceivingBoxes(self)

    def makeConnection(self, transport: Any) -> None:
        """
        Start the connection without AMP's per-connection log line: the CLI
        opens one connection per call, and two log lines per call cost more
        than the call itself.
        """
        self.transport = transport
        if self.tracker is not None:
            self.tracker.connections.add(self)
        if self._ampInitialized:
            self.boxReceiver.startReceivingBoxes(self)
        self.connectionMade()

    def closeWhenAnswered(self) -> None:
        """
        Read no more requests; hang up once those taken are answered (their
        answers written out first): how the daemon ends its connections when
        it stops, so that no client hears nothing about a request that was
        carried out.
        """
        self._closing = True
        self._closeIfIdle()

    def _closeIfIdle(self) -> None:
        if self._closing and self._inflight == 0 and self.transport is not None:
            self.transport.loseConnection()

    def _settled(self, result: object) -> object:
        """
        A request taken was answered.
        """
        self._inflight -= 1
        self._closeIfIdle()
        return result

    def _watchBacklog(self) -> None:
        """
        From a connection's second request on (the command line sends one),
        stop reading it while its answers are not read (L{_PauseReadingWhileUnread}).
        """
        transport = self.transport
        if transport is not None and getattr(transport, "producer", None) is None:
            transport.registerProducer(_PauseReadingWhileUnread(transport), True)

    def connectionLost(self, reason: Failure) -> None:
        """
        End the connection quietly (see L{makeConnection}); cancel the
        requests it sent that are marked L{cancelled_on_hang_up} and not
        answered yet: nobody is left to hear their answer.
        """
        if self._ampInitialized:
            amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
        if self._cancellable:
            for request in list(self._cancellable):
                request.cancel()
        if self.tracker is not None:
            self.tracker.connectionGone(self)

    def _cancelOnHangUp(self, method: Callable[..., Any], request: Deferred[Any]) -> None:
        """
        Keep C{request}, the result of C{method}, to cancel if the
        connection is lost before it fires, when C{method} is marked
        L{cancelled_on_hang_up}.
        """
        if not getattr(method, "cancelledOnHangUp", False):
            return
        if self._cancellable is None:
            self._cancellable = set()
        cancellable = self._cancellable
        cancellable.add(request)

        def over(result: object) -> object:
            cancellable.discard(request)
            return result

        request.addBoth(over)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        """
        Close a file descriptor sent by the peer at once: no admin command
        takes one (kept, as L{amp.AMP} keeps them for its C{Descriptor}
        arguments, they would pile up until the daemon ran out of fds).
        """
        try:
            os.close(descriptor)
        except OSError:
            pass

    def dataReceived(self, data: bytes) -> None:
        """
        Answer every whole box received so far and keep the start of an
        unfinished one for the next read; hand over to L{amp.AMP} for good at
        the first box the fast path does not answer.
        """
        if self._closing:
            return
        if self._twisted:
            amp.BinaryBoxProtocol.dataReceived(self, data)
            return
        if self._pending:
            data = self._pending + data
            self._pending = b""
        end = len(data)
        start = 0
        while start < end:
            if self.paused:
                self._useTwisted(data[start:])
                return
            try:
                found = read_box(data, start)
            except ProtocolError:
                # Twisted's parser reports it.
                self._useTwisted(data[start:])
                return
            if found is None:
                if end - start > MAX_PENDING_BOX:
                    # No admin request is that large: a box that never ends
                    # would be parsed again at every read.
                    self._hangUp(f"a box of over {MAX_PENDING_BOX} bytes")
                    return
                self._pending = data[start:]
                return
            box, at = found
            if not self._dispatch(box):
                self._useTwisted(data[start:])
                return
            start = at

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        """
        Take a box on Twisted's path: a request as L{amp.AMP} takes it.
        Anything else (an answer or an error, which the daemon never asks
        for, or a box with neither a command nor an answer) ends the
        connection with one warning; L{amp.AMP} raised (a logged traceback).
        Boxes after it are ignored.
        """
        if self._closing:
            return
        if amp.COMMAND in box and amp.ANSWER not in box and amp.ERROR not in box:
            amp.AMP.ampBoxReceived(self, box)
            return
        keys = ", ".join(k.decode("ascii", "replace") for k in sorted(box)[:4]) or "empty"
        self._hangUp(f"it sent a box that is not a request ({keys})")

    def _hangUp(self, why: str) -> None:
        """
        Read nothing more from a connection that broke the protocol and
        close it (what was answered is written out first), with one
        warning saying C{why}.
        """
        _log.warn("admin connection closed: {why}", why=why)
        self._closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _useTwisted(self, data: bytes) -> None:
        """
        Leave the fast path: L{amp.AMP} parses C{data} and all that follows.
        """
        self._twisted = True
        self._watchBacklog()
        self._startAMP()
        amp.BinaryBoxProtocol.dataReceived(self, data)

    def _dispatch(self, box: dict[bytes, bytes]) -> bool:
        """
        Call the API for a command box and answer it, now or when its result
        is ready.

        @return: C{False}, having done nothing, when the box is not one the
            fast path answers.
        """
        name = box.get(_COMMAND)
        if name is None or _ANSWER in box or _ERROR in box:
            return False
        fast = _FAST_COMMANDS.get(name)
        if fast is None or commands.get(fast.name) is not fast.command:
            return False
        method = self._methods.get(name)
        if method is None:
            method = getattr(self._api, fast.method, None)
            if method is None:
                return False
            self._methods[name] = method
        kwargs = {}
        try:
            for wire, python in fast.required:
                kwargs[python] = box[wire].decode("utf-8")
            for wire, python in fast.optional:
                value = box.get(wire)
                if value is not None:
                    kwargs[python] = value.decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return False
        ask = box.get(_ASK)
        try:
            result = method(**kwargs)
        except BaseException:
            self._answerFailure(Failure(), ask)
            return True
        if type(result) is tuple:
            self._answer(result, ask)
        else:
            # A Deferred, or anything maybeDeferred makes one of (a
            # coroutine, a Failure), as on Twisted's path.
            self._inflight += 1
            request = maybeDeferred(_identity, result)
            self._cancelOnHangUp(method, request)
            request.addCallbacks(
                self._answer, self._answerFailure, callbackArgs=(ask,), errbackArgs=(ask,)
            ).addBoth(self._settled)
        return True

    def _answer(self, result: Any, ask: bytes | None) -> None:
        """
        Answer with the API's C{(status, detail)}.
        """
        self._respond(self._reply, result, ask)

    def _answerFailure(self, failure: Failure, ask: bytes | None) -> None:
        """
        Answer with the API's failure.
        """
        self._respond(self._failed, failure, ask)

    def _respond(self, make: Callable[[Any], dict[str, str]], outcome: Any, ask: bytes | None) -> None:
        """
        Send the answer C{make} builds from C{outcome} (or Twisted's error
        answer if it cannot). A request without C{_ask} wants no answer:
        its detail is not spilled to a file nobody would remove.
        """
        if ask is None and make == self._reply:
            make = _unanswered
        try:
            response = make(outcome)
        except BaseException:
            self._cannotAnswer(Failure(), ask)
        else:
            self._send(response, ask)

    def _send(self, response: dict[str, str], ask: bytes | None) -> None:
        """
        Write the C{_answer} box of a response in one write, as
        L{amp.AMP} would have serialized it.
        """
        try:
            status = response["status"].encode("utf-8")
            detail = response["detail"].encode("utf-8")
            spill = response.get("spill")
            if spill is not None:
                spill = spill.encode("utf-8")
        except BaseException:
            message = f"{self._api!r} answered {response!r}, which is no AMP answer"
            self._cannotAnswer(Failure(amp.BadLocalReturn(message, Failure())), ask)
            return
        transport = self.transport
        if ask is None or transport is None:
            return
        for key, value in ((b"detail", detail), (b"spill", spill), (b"status", status)):
            if value is not None and len(value) > amp.MAX_VALUE_LENGTH:
                self.unhandledError(Failure(amp.TooLong(False, True, value, key)))
                return
        spillPart = b"" if spill is None else _SPILL_KEY + _packLength(len(spill)) + spill
        self._answered += 1
        if self._answered == 2:
            self._watchBacklog()
        transport.write(
            b"".join(
                (
                    _ANSWER_KEY + _packLength(len(ask)),
                    ask,
                    _DETAIL_KEY + _packLength(len(detail)),
                    detail,
                    spillPart,
                    _STATUS_KEY + _packLength(len(status)),
                    status,
                    _END_OF_BOX,
                )
            )
        )

    def _cannotAnswer(self, failure: Failure, ask: bytes | None) -> None:
        """
        What L{amp.AMP} does when a responder's result cannot be made an
        answer: an C{UNKNOWN} error box then hang up, or (no C{_ask}) log and
        hang up.
        """
        if ask is None:
            self.unhandledError(failure)
            return
        _log.failure("while receiving response to command", failure)
        box = amp.QuitBox(
            {amp.ERROR: ask, amp.ERROR_DESCRIPTION: b"Unknown Error", amp.ERROR_CODE: amp.UNKNOWN_ERROR_CODE}
        )
        try:
            box._sendTo(self)
        except (amp.ProtocolSwitched, ConnectionLost):
            pass

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
            self._inflight += 1
            d = maybeDeferred(method, **args)
            self._cancelOnHangUp(method, d)
            # (A request without _ask wants no answer: nothing to spill.)
            d.addCallbacks(self._reply if asked[0] else _unanswered, self._failed)
            # (Its answer is written right after, in the same callback
            # chain: a hang-up asked for meanwhile waits for it.)
            d.addBoth(self._settled)
            return d

        serialized = self._wrapWithSerialization(call, command)

        asked = [True]

        def respond(box: amp.AmpBox) -> Any:
            # A request with an argument missing or not UTF-8 is answered
            # like any refusal, C{fail <reason>}, instead of Twisted's
            # logged exception, C{UNKNOWN} error and hang-up.
            asked[0] = amp.ASK in box
            reason = _bad_arguments(command, box)
            if reason is not None:
                return succeed(command.makeResponse({"status": "fail", "detail": reason}, self))
            return serialized(box)

        return respond

    def _reply(self, result: tuple[str, str]) -> dict[str, str]:
        status, detail = result
        if len(detail.encode("utf-8")) <= MAX_INLINE:
            return {"status": status, "detail": detail}
        if self.transport is None:
            # The client went away: nobody would read (and remove) the file.
            return {"status": status, "detail": ""}
        os.makedirs(self._spillDir, exist_ok=True)
        sweep_spills(self._spillDir)
        fd, path = tempfile.mkstemp(prefix="spill-", suffix=".json", dir=self._spillDir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(detail)
        return {"status": status, "detail": "", "spill": path}

    def _failed(self, failure: Failure) -> dict[str, str]:
        if failure.check(MessageError):
            return {"status": "fail", "detail": failure.value.reason}
        if failure.check(CancelledError):
            # (Cancelled as its connection was lost: nobody hears it.)
            return {"status": "fail", "detail": "cancelled"}
        _log.failure("admin command failed", failure)
        return {"status": "fail", "detail": f"internal error: {failure.getErrorMessage()}"}



def _unanswered(result: tuple[str, str]) -> dict[str, str]:
    """
    The response to a request nobody wants answered: status only.
    """
    return {"status": result[0], "detail": ""}


def _bad_arguments(command: type[amp.Command], box: amp.AmpBox) -> str | None:
    """
    Why the arguments of a request box cannot be used (a required one
    missing, a text one not UTF-8), or L{None}.
    """
    for wire, argument in command.arguments:
        value = box.get(wire)
        name = wire.decode("ascii", "replace")
        if value is None:
            if not argument.optional:
                return f"missing argument {name!r}"
            continue
        if isinstance(argument, amp.Unicode):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return f"argument {name!r} is not valid UTF-8"
    return None


def _ok(detail: str) -> tuple[str, str]:
    return ("ok", detail)


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
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

    def create_queue(self, config: str) -> Deferred[tuple[str, str]]:
        """
        Create a queue; answers the original's C{success} word once the
        queue is on disk.
        """
        data = _loads(config, "queue config")
        if not isinstance(data, dict):
            raise MessageError("queue config must be a JSON object")
        return self.instance.create_queue(data).addCallback(lambda text: ("success", text))

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
        return self.instance.set_admin(action, name).addCallback(_ok)

    def create_message(
        self, message: str, method: str, relay_ok: str = "", message_file: str = ""
    ) -> Deferred[tuple[str, str]]:
        """
        Create a message (C{sendmesg}, C{prepmesg}, C{single_que}), given as
        C{message}, or in C{message_file} (a file of the root's
        L{SPILL_DIR}, removed once read) when too large for AMP.
        """
        if message_file:
            message = self._take_message_file(message_file)
        data = _loads(message, "message")
        return self.instance.create_message(data, method, bool(relay_ok)).addCallback(_ok)

    def _take_message_file(self, path: str) -> str:
        """
        Read and remove a message file handed over by C{rq}.

        @raise MessageError: not a regular file of L{SPILL_DIR} (nothing
            else is ever read or removed), too large, or not UTF-8.
        """
        spill = os.path.realpath(self.instance.root.join(SPILL_DIR))
        if not os.path.isabs(path) or os.path.dirname(os.path.realpath(path)) != spill:
            raise MessageError(f"message_file must be a file of {SPILL_DIR}")
        try:
            # (Without waiting: a FIFO would block until somebody wrote.)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise MessageError(f"message_file cannot be read: {e.strerror}")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MessageError("message_file is not a regular file")
            if info.st_size > MAX_MESSAGE_FILE:
                raise MessageError(f"message_file is over {MAX_MESSAGE_FILE} bytes")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_MESSAGE_FILE + 1)
        finally:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError("message_file is not UTF-8 text") from None

    @cancelled_on_hang_up
    def attach_message(self, msg_id: str, pathname: str, name: str = "") -> Deferred[tuple[str, str]]:
        """
        Attach a file of this machine to a prepared message; abandoned if
        the client goes away before its file is in place (C{rq
        attachmesg} timed out or killed: it said C{fail}).
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

    def search(self, query: str, name: str = "", exact: str = "") -> Deferred[tuple[str, str]]:
        """
        The messages matching C{query} (a JSON object), as a JSON array.
        """
        data = _loads(query, "query")
        return self.instance.search(name or None, data, bool(exact)).addCallback(lambda found: _ok(json.dumps(found)))

    def get_message(self, msg_id: str) -> Deferred[tuple[str, str]]:
        """
        The read form of a message as JSON.
        """
        queue, short = self.instance.locate(msg_id)
        return queue.read(short).addCallback(lambda msg: _ok(json.dumps(msg)))


#: Seconds a stopping daemon waits for its admin connections' requests to be
#: answered before it cuts them.
DRAIN_TIMEOUT = 10.0

#: Seconds after which a file of the spill directory is taken for one whose
#: reader went away (killed between the answer and its read) and removed.
SPILL_MAX_AGE = 600.0


def sweep_spills(directory: str, max_age: float = SPILL_MAX_AGE, now: float | None = None) -> None:
    """
    Remove the files of the spill directory older than C{max_age} seconds:
    answers and messages whose reader went away (each is read and removed
    within moments otherwise).
    """
    limit = (time.time() if now is None else now) - max_age
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < limit:
                os.unlink(entry.path)
        except OSError:
            pass


#: The most admin connections open at once: each holds a file descriptor of
#: the daemon, and the command line opens one per call for a moment, so
#: more than this many are clients that went quiet (or a flood). Those over
#: it are turned away (L{TurnedAway}).
MAX_CONNECTIONS = 512

#: Seconds between two warnings about connections turned away: a flood
#: is told in one line, with a count, not a line per connection.
TURNED_AWAY_WARNING_INTERVAL = 60.0


class TurnedAway(Protocol):
    """
    A connection over L{MAX_CONNECTIONS}: closed at once, nothing read from
    it, after one AMP error box saying why (code
    L{rqtwisted.admincommands.TURNED_AWAY}), which the command line reports
    as C{fail}.
    """

    def __init__(self, reason: str) -> None:
        """
        @param reason: what the client is told.
        """
        self.reason = reason

    def connectionMade(self) -> None:
        """
        Say why, and close.
        """
        notice = amp.AmpBox(
            {
                amp.ERROR: b"",
                amp.ERROR_CODE: TURNED_AWAY.encode("ascii"),
                amp.ERROR_DESCRIPTION: self.reason.encode("utf-8"),
            }
        )
        self.transport.write(notice.serialize())
        self.transport.loseConnection()


class AdminFactory(Factory):
    """
    Builds an L{AdminProtocol} per connection, up to C{maxConnections} open
    at once; a connection over that is turned away (L{TurnedAway}), with a
    warning logged at most every L{TURNED_AWAY_WARNING_INTERVAL} seconds.
    """

    def __init__(
        self,
        api: Any,
        spillDir: str,
        clock: IReactorTime | None = None,
        maxConnections: int = MAX_CONNECTIONS,
    ) -> None:
        """
        @param api: The L{IAdminAPI} provider answering the commands.
        @param spillDir: Where details too large for AMP are written.
        @param clock: Times the warnings (default: the monotonic clock).
        @param maxConnections: The most connections open at once.
        """
        self.api = api
        self.spillDir = spillDir
        self.maxConnections = maxConnections
        self._seconds: Callable[[], float] = clock.seconds if clock is not None else time.monotonic
        self._methods: dict[bytes, Callable[..., Any]] = {}
        #: The open connections.
        self.connections: set[AdminProtocol] = set()
        self._drained: Deferred[None] | None = None
        #: Connections turned away since the last warning.
        self._turnedAway = 0
        self._lastWarning: float | None = None

    def startFactory(self) -> None:
        """
        Remove what readers that went away left in the spill directory.
        """
        sweep_spills(self.spillDir)

    def drain(self, clock: Any, timeout: float = DRAIN_TIMEOUT) -> Deferred[None]:
        """
        End every connection once the requests it sent are answered (see
        L{AdminProtocol.closeWhenAnswered}); fires when all are closed. Those
        still open after C{timeout} seconds are cut.
        """
        if not self.connections:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained = drained
        late = clock.callLater(timeout, self._cut)

        def on_time(result: object) -> object:
            if late.active():
                late.cancel()
            return result

        drained.addBoth(on_time)
        for protocol in list(self.connections):
            protocol.closeWhenAnswered()
        return drained

    def _cut(self) -> None:
        for protocol in list(self.connections):
            transport = protocol.transport
            if transport is not None:
                transport.abortConnection()

    def connectionGone(self, protocol: AdminProtocol) -> None:
        """
        A connection closed.
        """
        self.connections.discard(protocol)
        if not self.connections and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def buildProtocol(self, addr: Any) -> AdminProtocol | TurnedAway:
        """
        A protocol bound to the API (whose methods are looked up once, for
        every connection); a L{TurnedAway} when C{maxConnections} are open.
        """
        if len(self.connections) >= self.maxConnections:
            return self._turnAway()
        protocol = AdminProtocol(self.api, self.spillDir, self._methods)
        protocol.tracker = self
        return protocol

    def _turnAway(self) -> TurnedAway:
        """
        Count a connection turned away, warn if none was told of lately.
        """
        self._turnedAway += 1
        now = self._seconds()
        if self._lastWarning is None or now - self._lastWarning >= TURNED_AWAY_WARNING_INTERVAL:
            _log.warn(
                "{count} admin connections turned away since the last such warning: {open} are open,"
                " the most allowed (warned at most every {interval:g}s)",
                count=self._turnedAway,
                open=len(self.connections),
                interval=TURNED_AWAY_WARNING_INTERVAL,
            )
            self._lastWarning = now
            self._turnedAway = 0
        return TurnedAway(f"too many admin connections open ({self.maxConnections}); try again later")


def _file_identity(path: str) -> tuple[int, int] | None:
    """
    The device and inode of the file at C{path} (not followed if a
    symlink), or L{None} when there is none.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


class PromptServer(unix.Server):
    """
    An admin connection that sends an answer at once when nothing is
    waiting to be sent before it.

    Twisted's transports only buffer a write and send it when the reactor
    next finds the socket writable: two more C{epoll_ctl} calls and one
    more turn of the reactor for every answer. An answer (a few hundred
    bytes) almost always fits in the socket's buffer, so it goes out with
    one C{send}; whatever does not fit (or an error) takes Twisted's
    buffered path, which then sends the rest or finds the error again and
    ends the connection as usual.
    """

    def write(self, data: bytes) -> None:
        """
        Send C{data} now if nothing is buffered and the connection is open;
        buffer what is left, as L{unix.Server.write} does.
        """
        if (
            data
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._writeDisconnected
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
            and not self._sendmsgQueue
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)


class OwnSocketPort(unix.Port):
    """
    A UNIX socket port whose connections send their answers at once
    (L{PromptServer}) and that, when it closes, removes its socket file only
    while that file is still the socket it bound: a socket another process
    has bound at the same path since (after ours was removed) is left to
    its owner, and a removed one is not an error.
    """

    transport = PromptServer
    _boundPath: str | None = None
    _bound: tuple[int, int] | None = None

    def startListening(self) -> None:
        """
        Bind and listen, then note which file the socket is.
        """
        super().startListening()
        self._boundPath = self.getHost().name
        self._bound = _file_identity(self._boundPath)

    def connectionLost(self, reason: Failure) -> None:
        """
        Close; remove the socket file if it is still ours.
        """
        path = self._boundPath
        if path is None or self._bound is None or _file_identity(path) == self._bound:
            super().connectionLost(reason)
            return
        _log.warn("{path} is no longer the socket this daemon bound; left in place", path=path)
        # What unix.Port.connectionLost does after removing the file.
        tcp.Port.connectionLost(self, reason)


class AdminServer(UNIXServer):
    """
    The admin socket's service: when it stops, it takes no more
    connections, answers what the open ones asked and then closes them
    (L{AdminFactory.drain}) before the daemon goes on stopping. Its socket
    file is removed only if still its own (L{OwnSocketPort}).
    """

    def __init__(self, path: str, factory: AdminFactory, clock: Any, mode: int = 0o666) -> None:
        """
        @param path: the socket's path.
        @param factory: the admin protocol's factory.
        @param clock: the reactor.
        @param mode: the socket file's permissions.
        """
        super().__init__(path, factory, mode=mode)
        self._path = path
        self._mode = mode
        self._factory = factory
        self._clock = clock

    def _getPort(self) -> OwnSocketPort:
        """
        Listen on the socket (L{UNIXServer} would use C{listenUNIX}).
        """
        port = OwnSocketPort(self._path, self._factory, mode=self._mode, reactor=self._clock)
        port.startListening()
        return port

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, then drain the connections.
        """
        stopped = maybeDeferred(super().stopService)
        return stopped.addCallback(lambda _: self._factory.drain(self._clock))
