"""
Deliveries to other hosts: the built-in C{relay} queue, run in-process.

A message whose C{dest} is a queue URL (C{http://host:port/q/<name>})
reaches the local queue C{relay} (C{rq sendmesg --relay-ok}, a script's
C{dup} to a URL). Its handler, L{Relayer.handle}, speaks the original wire
protocol (relay.md), byte-compatible with original RQ hosts:

 1. give up when C{count} > 15 (C{fail RQ_COUNT > 15 FAIL});
 2. refuse a loop: C{orig_msg_id} starts with C{dest};
 3. I{prep}: C{POST <dest>/new_message} with C{x_format=json} and C{mesg} =
    the message's fields with C{count + 1} and C{_method=prep}; the remote
    full id is kept in C{job/relay_id} (durably) so that every retry reuses
    it;
 4. I{attach}: one upload per attachment, checked against
    C{<md5>-Attached successfully};
 5. I{commit}: C{POST <remote id>} with C{_method=commit};
 6. report C{relayed <remote full id>}: the message ends in C{relayed} with
    status C{relayed - <remote full id>}.

What rqtwisted adds, without changing the wire:

 - I{Idempotence.} When C{job/relay_id} exists (an earlier attempt got that
   far, or the daemon died after the remote commit), the remote is asked
   for that message's state (C{GET <remote id>/state.json}) first: a
   committed message is not sent again; a prep one gets the attachments it
   lacks (its read form, C{GET <remote id>.json}, lists those it has with
   their md5) and the commit; an unknown one (404) is prepared anew.
 - I{Resumable uploads} between rqtwisted hosts: attachments of at least
   L{RelayConfig.resumable_min<rqtwisted.relaywire.RelayConfig.resumable_min>} bytes are sent with C{PUT <remote
   id>/attach/<name>} and C{Content-Range}; a probe (C{Content-Range:
   bytes */T}) tells how much the remote holds already, and only the rest is
   sent. A peer whose answer to the probe shows it takes no C{PUT} (a
   non-JSON 500 or 404 of an original RQ host:
   L{probe_refused<rqtwisted.relaywire.probe_refused>}) gets the multipart
   upload, and is remembered as such for an hour; any other error (a
   reverse proxy's 502 while the peer restarts) is a soft failure, and the
   retry probes again.
 - I{Streaming.} Attachments are read from disk in 64 KiB pieces with
   back-pressure (L{rqtwisted.relaybodies}); answers are capped
   (L{rqtwisted.relayhttp.MAX_ANSWER}); an md5 the store knows already is
   not computed again, others are computed in a thread.
 - I{Connections} to a peer that keeps them open are reused (a persistent
   pool); a request whose pooled connection the peer had just closed is
   sent again at once (never the commit).
 - I{Retries} use exponential back-off with jitter and a cap
   (L{rqtwisted.relaywire.backoff}) through C{resend <seconds>-<reason>}: the message waits in
   C{relay}'s C{que} with the last error as its status; C{max_count} ends it
   in err. When the last attempt fails, the remote message is asked for
   once more: committed (the commit's answer was lost), the message is
   relayed after all; still in prep, it is deleted (C{_method=delete}), so
   that no copy that will never be committed is left behind.
 - I{Permanent refusals}: an answer no retry can change (413, larger than
   the peer takes: L{PERMANENT_CODES<rqtwisted.relaywire.PERMANENT_CODES>})
   ends the message in err at once with the peer's reason; a remote
   message prepared for it is settled as after the last attempt.
 - I{Bad peers}: connect timeout, idle timeout (no byte moved either way),
   an upload slower than C{min_upload_rate} averaged over
   C{upload_rate_window} (a peer reading a byte now and then), an answer
   not complete within the idle timeout of its headers (one dripped a byte
   at a time), garbage answers, a connection closed mid-upload and a wrong md5 are all
   soft failures: nothing is committed with a wrong copy.
 - I{Unreachable peers}: a peer whose connection timed out is not tried
   again for L{UNREACHABLE_MEMORY} connect timeouts: the messages for it
   whose turn comes meanwhile fail at once, each as one attempt, so that a
   host that is off the network costs the relay one connect timeout per
   30 s (by default) rather than one per message, and the messages for
   other peers go on.
 - I{Local destinations}: a C{dest} on this host (same base URL) is
   delivered through the queue API (prep with hard-linked attachments, then
   commit) unless the message has C{force_remote}.

Settings (optional) come from C{config.json} key C{relay}: C{retry_base},
C{retry_cap}, C{connect_timeout}, C{idle_timeout} (seconds),
C{resumable_min} (bytes), C{min_upload_rate} (bytes a second) and
C{upload_rate_window} (seconds).

The parts, one job each: L{rqtwisted.relaywire} (requests and the meaning
of answers, no I/O), L{rqtwisted.relaybodies} (upload bodies streamed from
disk), L{rqtwisted.relayhttp} (the treq transport: timeouts, connection
reuse), L{rqtwisted.relaypeers} (the steps against a remote or a local
queue) and this module (the decisions of one delivery: idempotence,
retries, C{job/relay_id}).
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.durable import replace_file
from rqtwisted.fsync import remove_quietly
from rqtwisted.message import count_of, truthy
from rqtwisted.relayhttp import HttpPeer, make_clients
from rqtwisted.relaypeers import Attachment, LocalPeer, Peer, RemotePeer
from rqtwisted.relaywire import (
    LOOP_REASON,
    MAX_RELAY_COUNT,
    PermanentRefusal,
    RelayConfig,
    RemoteLost,
    SoftFailure,
    Unreachable,
    backoff,
    loop_detected,
    same_host,
)
from rqtwisted.store import attachment_entries, md5_off_reactor
from rqtwisted.threads import reactor_pool

if TYPE_CHECKING:
    from rqtwisted.builtin import InProcessJob
    from rqtwisted.supervisor import Instance

_log = Logger()

#: The file in C{job/} holding the remote full id.
RELAY_ID = "relay_id"

#: Seconds a peer without resumable uploads is remembered as such.
NO_RESUME_MEMORY = 3600.0

#: A peer whose connection timed out is not tried again for this many
#: connect timeouts: the messages for it whose turn comes meanwhile fail at
#: once (an attempt each, as if tried), instead of each holding the relay
#: queue's worker, and with it every other peer's messages, for its own
#: connect timeout. (A refused connection costs nothing: not remembered.)
UNREACHABLE_MEMORY = 3


def peer_of(dest: str) -> str:
    """
    The peer a C{dest} URL names: its scheme, host and port.
    """
    parts = urlsplit(dest)
    return f"{parts.scheme}://{parts.netloc}".lower()


def attachment_files(msg_dir: str) -> list[tuple[str, str]]:
    """
    C{(name, path)} of every attachment of a message, by name: the ones its
    read form lists (L{attachment_entries}).
    """
    return [(e.name, e.path) for e in attachment_entries(os.path.join(msg_dir, "attach"))]


class Relayer:
    """
    The C{relay} queue's handler (see the module docstring).

    @ivar http: the transport to peers.
    @ivar config: the tunables.
    """

    def __init__(
        self,
        instance: "Instance",
        client: HTTPClient,
        clock: IReactorTime,
        cooperator: Cooperator,
        hasher: Callable[[str], Deferred[str]],
        config: RelayConfig | None = None,
        rand: Callable[[], float] = random.random,
        oneshot: HTTPClient | None = None,
    ) -> None:
        """
        @param client: the HTTP client (a treq L{HTTPClient} on a real
            L{Agent} with a persistent pool, or on the in-memory agent of
            C{treq.testing} in tests).
        @param oneshot: a client with a connection per request, for peers
            not known to keep connections open (see L{HttpPeer}).
        @param clock: timers (idle timeout).
        @param cooperator: schedules file reads of uploads.
        @param hasher: md5 of a file path, as a L{Deferred} (in a thread).
        @param rand: jitter source.
        """
        self.instance = instance
        self.config = config or RelayConfig.fromSettings(instance.settings.raw)
        self.clock = clock
        self.cooperator = cooperator
        self.http = HttpPeer(
            client,
            clock,
            self.config.idle_timeout,
            oneshot,
            self.config.min_upload_rate,
            self.config.upload_rate_window,
        )
        self._hasher = hasher
        self._rand = rand
        self._no_resume: dict[str, float] = {}
        #: peer -> (when, why) it could last not be connected to.
        self._unreachable: dict[str, tuple[float, str]] = {}

    # -- peers without resumable uploads

    def lacks_resume(self, peer: str) -> bool:
        """
        Was C{peer} found to lack resumable uploads within the last hour?
        """
        since = self._no_resume.get(peer)
        return since is not None and self.clock.seconds() - since < NO_RESUME_MEMORY

    def no_resume(self, peer: str) -> None:
        """
        Remember that C{peer} lacks resumable uploads.
        """
        self._no_resume[peer] = self.clock.seconds()

    # -- peers that cannot be connected to

    def not_tried(self, peer: str) -> str | None:
        """
        Why C{peer} is not tried now (its connection timed out less than
        L{UNREACHABLE_MEMORY} connect timeouts ago), or L{None}.
        """
        seen = self._unreachable.get(peer)
        if seen is None:
            return None
        since, reason = seen
        age = self.clock.seconds() - since
        if not 0 <= age < UNREACHABLE_MEMORY * self.config.connect_timeout:
            del self._unreachable[peer]
            return None
        return f"{reason} (not tried: unreachable {age:.0f}s ago)"

    def _heard(self, peer: str, failure: SoftFailure | None) -> None:
        """
        The outcome of a real attempt at C{peer}: remembered as unreachable
        after an L{Unreachable}, forgotten as such after anything else.
        """
        if isinstance(failure, Unreachable):
            self._unreachable[peer] = (self.clock.seconds(), failure.reason)
        else:
            self._unreachable.pop(peer, None)

    # -- relay_id

    @staticmethod
    def _relay_id_path(job: "InProcessJob") -> str:
        return os.path.join(job.job_dir, RELAY_ID)

    def read_relay_id(self, job: "InProcessJob") -> str | None:
        """
        The remote full id an earlier attempt prepared, if any.
        """
        try:
            with open(self._relay_id_path(job), encoding="utf-8") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text or None

    def save_relay_id(self, job: "InProcessJob", remote_id: str) -> Deferred[None]:
        """
        Keep the remote id in C{job/relay_id} (temp file and rename), durably.

        @raise SoftFailure: it cannot be written (a full disk: retried
            later); the L{Deferred} fails with it when it cannot be synced.
        """
        path = self._relay_id_path(job)

        def cannot(e: OSError) -> SoftFailure:
            return SoftFailure(f"cannot save {RELAY_ID} - {e.strerror or e}")

        try:
            replace_file(path, remote_id.encode("utf-8"))
        except OSError as e:
            raise cannot(e)

        def failed(f: Failure) -> None:
            f.trap(OSError)
            raise cannot(f.value)

        return self.instance.syncer.sync(path, job.job_dir).addErrback(failed)

    def drop_relay_id(self, job: "InProcessJob") -> None:
        """
        Forget the remote id.
        """
        remove_quietly(self._relay_id_path(job))

    # -- the handler

    async def handle(self, job: "InProcessJob") -> None:
        """
        Deliver one message (relay.md); failures become C{resend}.
        """
        msg = job.msg
        dest = str(msg.get("dest") or "")
        job.log(f"dest - {dest}")
        force = truthy(msg.get("force_remote"))
        if force:
            job.log("FORCE REMOTE")
        count = count_of(msg, "count", 0)
        if count > MAX_RELAY_COUNT:
            job.report(f"fail RQ_COUNT > {MAX_RELAY_COUNT} FAIL")
            return
        if not dest.startswith("http"):
            job.report(f"err not a queue URL: {dest}")
            return
        if loop_detected(msg):
            job.log(LOOP_REASON)
            job.report(f"fail {LOOP_REASON}")
            return
        local = not force and same_host(dest, self.instance.settings.base_url)
        peer: Peer = LocalPeer(self.instance) if local else RemotePeer(self, job)
        host = None if local else peer_of(dest)
        job.log(f"attempting {'local' if local else 'remote'} {dest}")
        try:
            remote_id = await self._attempt(job, peer, host)
        except RemoteLost as e:
            self.drop_relay_id(job)
            self._retry(job, count, e.reason)
            return
        except PermanentRefusal as e:
            # No retry can change it: settled as the last attempt is, and
            # in err at once with the peer's reason.
            delivered = await self._give_up(job, peer)
            if delivered is None:
                job.log(f"attempt failed: {e.reason}; no retry can change it")
                job.report(f"err {e.reason}")
                return
            remote_id = delivered
        except SoftFailure as e:
            # The queue sends a resend at max_count to err (protocol.outcome).
            if count + 1 < count_of(msg, "max_count", 0):
                self._retry(job, count, e.reason)
                return
            delivered = await self._give_up(job, peer)
            if delivered is None:
                self._retry(job, count, e.reason, last=True)
                return
            remote_id = delivered
        self.drop_relay_id(job)
        job.log(f"relayed {remote_id}")
        job.report(f"relayed {remote_id}")

    async def _attempt(self, job: "InProcessJob", peer: Peer, host: str | None) -> str:
        """
        One delivery (L{_deliver}). To a remote C{host}: not tried while it
        is remembered as unreachable (L{not_tried}), and its outcome
        remembered (L{_heard}).
        """
        if host is None:
            return await self._deliver(job, peer)
        skipped = self.not_tried(host)
        if skipped is not None:
            raise SoftFailure(skipped)
        try:
            remote_id = await self._deliver(job, peer)
        except SoftFailure as e:
            self._heard(host, e)
            raise
        self._heard(host, None)
        return remote_id

    async def _give_up(self, job: "InProcessJob", peer: Peer) -> str | None:
        """
        The last attempt failed, or the peer refused for good (the message
        goes to err): settle with the remote message of C{job/relay_id}, if
        any. One that was committed after all (the commit's answer was
        lost) is the delivery: its id.
        One still in prep would never be committed: it is deleted (with its
        partial uploads), best effort.
        """
        remote_id = self.read_relay_id(job)
        if remote_id is None:
            return None
        try:
            state = await peer.state(remote_id)
            if state is not None and state != "prep":
                job.log(f"remote {remote_id} is {state}")
                return remote_id
            if state == "prep":
                await peer.delete(remote_id)
                job.log(f"giving up: deleted remote {remote_id}")
        except SoftFailure as e:
            job.log(f"giving up: remote {remote_id} left as it is ({e.reason})")
            return None
        self.drop_relay_id(job)
        return None

    def _retry(self, job: "InProcessJob", count: int, reason: str, last: bool = False) -> None:
        delay = backoff(count, self.config.retry_base, self.config.retry_cap, self._rand)
        job.log(f"attempt failed: {reason}; " + ("max_count reached" if last else f"retry in {delay}s"))
        job.report(f"resend {delay}-{reason}")

    async def _deliver(self, job: "InProcessJob", peer: Peer) -> str:
        remote_id = self.read_relay_id(job)
        have: dict[str, str] = {}
        if remote_id is not None:
            state = await peer.state(remote_id)
            job.log(f"remote {remote_id} is {state or 'unknown'}")
            if state is None:
                self.drop_relay_id(job)
                remote_id = None
            elif state != "prep":
                return remote_id
            else:
                have = await peer.attached(remote_id)
        saved: Deferred[None] = succeed(None)
        if remote_id is None:
            remote_id = await peer.prep(job)
            # Durable before the commit is sent (a crash after the remote
            # commit must find it); the uploads need not wait for it.
            saved = self.save_relay_id(job, remote_id)
            job.log(f"prepped {remote_id}")
        try:
            attachments = await self._attachments(job)
            for a in attachments:
                if have.get(a.name) == a.md5:
                    job.log(f"attach {a.name}: on the remote already")
                    continue
                job.report(f"run attach {a.name}")
                await peer.attach(remote_id, a)
        finally:
            await saved
        await peer.commit(remote_id)
        return remote_id

    async def _attachments(self, job: "InProcessJob") -> list[Attachment]:
        out = []
        for name, path in attachment_files(job.msg_dir):
            try:
                size = os.stat(path).st_size
                md5 = await self._hasher(path)
            except OSError as e:
                raise SoftFailure(f"cannot read attachment {name} - {e.strerror or e}")
            out.append(Attachment(name, path, size, md5))
        return out


def make_hasher(reactor: Any) -> Callable[[str], Deferred[str]]:
    """
    The md5 of an attachment for a running daemon: known at once when this
    process has hashed or received the file already, else read in the
    reactor's thread pool (and remembered).
    """
    run_in_thread = reactor_pool(reactor)
    return lambda path: md5_off_reactor(path, run_in_thread)


def make_handler(instance: "Instance") -> Callable[["InProcessJob"], Any]:
    """
    The C{relay} queue's handler for a running daemon: a real HTTP client
    with a persistent pool on the instance's reactor, md5 sums from the
    store's cache or the reactor's thread pool.
    """
    reactor: Any = instance.clock
    config = RelayConfig.fromSettings(instance.settings.raw)
    pooled, oneshot = make_clients(reactor, config.connect_timeout)
    cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))
    relayer = Relayer(instance, pooled, reactor, cooperator, make_hasher(reactor), config, oneshot=oneshot)
    return relayer.handle
