"""
Where a delivery goes (L{Peer}): the steps of the exchange against a queue
of another host over HTTP in the original wire format (L{RemotePeer}), or
against a queue of this host through the queue API (L{LocalPeer}).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol
from urllib.parse import quote

from twisted.web.iweb import IBodyProducer

from rqtwisted.message import MessageError, dest_queue, split_full_id
from rqtwisted.relaybodies import BytesProducer, MultipartFileProducer, RangeFileProducer
from rqtwisted.router import routed_queue
from rqtwisted.relaywire import (
    CANNOT_FIND,
    RemoteLost,
    SoftFailure,
    check_attached,
    commit_request,
    expect_ok,
    message_request,
    parse_attached,
    parse_held,
    parse_prep,
    parse_state,
    prep_fields,
    prep_request,
    probe_refused,
)

if TYPE_CHECKING:
    from rqtwisted.builtin import InProcessJob
    from rqtwisted.relay import Relayer
    from rqtwisted.supervisor import Instance


@dataclass
class Attachment:
    """
    One attachment to deliver: its name, path, size and md5.
    """

    name: str
    path: str
    size: int
    md5: str


class Peer(Protocol):
    """
    Where a delivery goes: the steps of the exchange, each raising
    L{SoftFailure} (or L{RemoteLost}) when it fails.
    """

    async def state(self, remote_id: str) -> str | None:
        """
        The state of the prepared message, or L{None} when it is unknown.
        """

    async def prep(self, job: "InProcessJob") -> str:
        """
        Prepare the copy; its full id.
        """

    async def attached(self, remote_id: str) -> dict[str, str]:
        """
        C{{name: md5}} of the attachments the prepared copy has already
        (empty when unknown).
        """

    async def attach(self, remote_id: str, attachment: Attachment) -> None:
        """
        Add one attachment to the prepared copy.
        """

    async def commit(self, remote_id: str) -> None:
        """
        Commit the prepared copy.
        """

    async def delete(self, remote_id: str) -> None:
        """
        Delete the prepared copy (the delivery was given up).
        """


class LocalPeer:
    """
    Deliveries to a queue of this host through the queue API (prep with
    hard-linked attachments, then commit).
    """

    def __init__(self, instance: "Instance") -> None:
        self._instance = instance

    def _queue(self, name: str) -> Any:
        queue = self._instance.queues.get(name)
        if queue is None or not queue.running:
            raise SoftFailure(f"couldn't connect to queue - {name}")
        return queue

    async def state(self, remote_id: str) -> str | None:
        """
        The state of a local message, or L{None} when it is gone.
        """
        name, short = split_full_id(remote_id)
        try:
            return self._queue(name).locate(short)
        except MessageError:
            return None

    async def prep(self, job: "InProcessJob") -> str:
        """
        Create the copy in prep, attachments hard-linked; its full id.
        """
        fields = prep_fields(job.msg)
        method = fields.pop("_method")
        # The queue HTTP would reach: rq_router in router mode.
        queue = self._queue(routed_queue(self._instance.root.path, dest_queue(job.msg["dest"])))
        source = self._instance.queue(job.queue).store
        try:
            return await queue.create(fields, method, attachments_from=(source, "run", job.msg_id))
        except MessageError as e:
            raise SoftFailure(f"prep failed - {e.reason}")
        except OSError as e:
            # A full disk, say: retried later, as a peer that refused.
            raise SoftFailure(f"prep failed - {e.strerror or e}")

    async def attached(self, remote_id: str) -> dict[str, str]:
        """
        Nothing to skip: L{attach} does nothing.
        """
        return {}

    async def attach(self, remote_id: str, attachment: Attachment) -> None:
        """
        Nothing to do: the attachments were linked by L{prep}.
        """

    async def commit(self, remote_id: str) -> None:
        """
        Commit the copy.
        """
        name, short = split_full_id(remote_id)
        try:
            await self._queue(name).commit(short)
        except MessageError as e:
            if e.reason == CANNOT_FIND:
                raise RemoteLost(f"commit failed - {e.reason}")
            raise SoftFailure(f"commit failed - {e.reason}")
        except OSError as e:
            raise SoftFailure(f"commit failed - {e.strerror or e}")

    async def delete(self, remote_id: str) -> None:
        """
        Delete the copy.
        """
        name, short = split_full_id(remote_id)
        try:
            await self._queue(name).delete(short)
        except MessageError as e:
            raise SoftFailure(f"delete failed - {e.reason}")


class RemotePeer:
    """
    Deliveries over HTTP, in the original wire format.
    """

    def __init__(self, relayer: "Relayer", job: "InProcessJob") -> None:
        self._relayer = relayer
        self._http = relayer.http
        self._job = job

    async def state(self, remote_id: str) -> str | None:
        """
        The remote message's state (C{GET <id>/state.json}), or L{None} on 404.
        """
        answer = await self._http.request(b"GET", remote_id.rstrip("/") + "/state.json")
        return parse_state(answer.code, answer.body)

    async def prep(self, job: "InProcessJob") -> str:
        """
        Prepare the remote message; its full id.
        """
        url, body = prep_request(job.msg)
        answer = await self._http.post_form(url, body)
        return parse_prep(answer.code, answer.body, job.msg["dest"])

    async def attached(self, remote_id: str) -> dict[str, str]:
        """
        C{{name: md5}} from the remote message's read form (C{GET
        <id>.json}); empty when it cannot be had.
        """
        try:
            answer = await self._http.request(b"GET", remote_id.rstrip("/") + ".json")
        except SoftFailure:
            return {}
        return parse_attached(answer.code, answer.body)

    async def commit(self, remote_id: str) -> None:
        """
        Commit the remote message.
        """
        url, body = commit_request(remote_id)
        answer = await self._http.post_form(url, body, retry=False)
        expect_ok(answer.code, answer.body, "commit")

    async def delete(self, remote_id: str) -> None:
        """
        Delete the remote message (C{_method=delete}).
        """
        url, body = message_request(remote_id, "delete")
        answer = await self._http.post_form(url, body)
        expect_ok(answer.code, answer.body, "delete")

    async def attach(self, remote_id: str, attachment: Attachment) -> None:
        """
        Upload one attachment: resumable C{PUT} when the peer has it and the file is big enough, else multipart.
        """
        relayer = self._relayer
        peer = remote_id.split("/q/", 1)[0]
        if attachment.size >= relayer.config.resumable_min and not relayer.lacks_resume(peer):
            if await self._attach_resumable(remote_id, attachment):
                return
            relayer.no_resume(peer)
        await self._attach_multipart(remote_id, attachment)

    async def _attach_multipart(self, remote_id: str, a: Attachment) -> None:
        short = remote_id.rstrip("/").rsplit("/", 1)[-1]
        cooperator = self._relayer.cooperator
        self._job.log(f"attach {a.name} ({a.size} bytes, multipart)")
        # The boundary is in the Content-Type header and in the body.
        boundary = "rq-" + os.urandom(12).hex()

        def make(progress: Callable[[int], None]) -> IBodyProducer:
            producer = MultipartFileProducer(
                [("pathname", a.name), ("msg_id", short), ("x_format", "json")],
                "filedata",
                a.name,
                a.path,
                cooperator,
                progress,
                boundary,
            )
            return producer

        answer = await self._http.request(
            b"POST",
            remote_id.rstrip("/") + "/attach/new",
            {b"content-type": b"multipart/form-data; boundary=" + boundary.encode("ascii")},
            make,
        )
        check_attached(answer.code, answer.body, a.md5, a.name)

    async def _attach_resumable(self, remote_id: str, a: Attachment) -> bool:
        """
        Upload through C{PUT}; L{False} when the peer does not support it
        (the answer to the probe shows so: L{probe_refused}).
        """
        url = remote_id.rstrip("/") + "/attach/" + quote(a.name, safe="")
        probe = await self._http.request(
            b"PUT",
            url,
            {b"content-range": f"bytes */{a.size}".encode("ascii")},
            lambda progress: BytesProducer(b""),
        )
        if probe.code not in (200, 308) and probe_refused(probe.code, probe.body, a.name):
            return False
        held = parse_held(probe.code, probe.headers, probe.body, a.size)
        assert held is not None
        if held == a.size:
            if probe.code == 200:
                try:
                    check_attached(probe.code, probe.body, a.md5, a.name)
                    self._job.log(f"attach {a.name}: already complete on the remote")
                    return True
                except SoftFailure:
                    pass
            held = 0 if probe.code == 200 else held
        self._job.log(f"attach {a.name} ({a.size} bytes, resumable from {held})")
        cooperator = self._relayer.cooperator
        length = a.size - held
        headers = {
            b"content-type": b"application/octet-stream",
            b"x-rq-md5": a.md5.encode("ascii"),
        }
        if length > 0:
            headers[b"content-range"] = f"bytes {held}-{a.size - 1}/{a.size}".encode("ascii")
        else:
            headers[b"content-range"] = f"bytes */{a.size}".encode("ascii")
        answer = await self._http.request(
            b"PUT",
            url,
            headers,
            lambda progress: RangeFileProducer(a.path, held, length, cooperator, progress),
        )
        if answer.code == 308:
            raise SoftFailure(f"attach {a.name} failed - upload incomplete")
        check_attached(answer.code, answer.body, a.md5, a.name)
        return True

