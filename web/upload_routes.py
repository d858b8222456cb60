"""
The upload routes: C{POST <root>q/<name>/<id>/attach/new} (a multipart form,
L{attach_new}) and C{PUT <root>q/<name>/<id>/attach/<att>} (a raw body, or one
chunk of a resumable upload, L{attach_put}).

By the time a route runs, L{rqtwisted.web.upload_request.UploadRequest} has
spooled the body (C{request.upload}); the route attaches the spooled file by
hard link and shapes the answer. L{mount_uploads} adds both routes to the
klein app and returns the site's request factory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from rqtwisted.message import MessageError
from rqtwisted.store import md5_off_reactor
from rqtwisted.web.answers import JSON_TYPE, TEXT_TYPE, dumps, whole_answer
from rqtwisted.web.spool import Spool
from rqtwisted.web.upload import (
    FormUpload,
    RangeUpload,
    RawUpload,
    Upload,
    UploadRefused,
    Uploads,
    UploadTarget,
    file_size,
    held_range,
    threads_of,
)
from rqtwisted.web.upload_request import UploadRequest

if TYPE_CHECKING:
    from rqtwisted.queue import QueueService

_log = Logger()


@dataclass(frozen=True)
class AttachOutcome:
    """
    What an attach request came to: the HTTP status and the JSON reply
    (C{["ok", "<md5>-Attached successfully"]} or C{["fail", reason]}).
    """

    code: int
    reply: list[str]

    @property
    def ok(self) -> bool:
        """
        Was the file attached?
        """
        return self.reply[0] == "ok"


def _reply_of(d: Deferred[str]) -> Deferred[AttachOutcome]:
    def failed(f: Failure) -> AttachOutcome:
        if f.check(MessageError):
            return AttachOutcome(200, ["fail", f.value.reason])
        _log.failure("attach failed", f)
        return AttachOutcome(500, ["fail", f"attach failed: {f.getErrorMessage()}"])

    return d.addCallbacks(lambda result: AttachOutcome(200, ["ok", result]), failed)


def _attach(queue: "QueueService", msg_id: str, path: str, name: str, md5: str | None) -> Deferred[AttachOutcome]:
    try:
        d = queue.attach(msg_id, path, name, md5)
    except MessageError as e:
        return succeed(AttachOutcome(200, ["fail", e.reason]))
    return _reply_of(d)


def received_upload(request: Any, uploads: Uploads, target: UploadTarget) -> Upload:
    """
    The upload a request carries: the one L{UploadRequest} streamed, or, for
    a request made by another factory (in-memory tests), its buffered body
    received the same way here.

    @raise UploadRefused: unknown queue, DOWN, malformed body, ...
    """
    upload = getattr(request, "upload", None)
    if isinstance(upload, Upload):
        return upload
    content = request.content
    content.seek(0, os.SEEK_END)
    length = content.tell()
    content.seek(0)
    upload = uploads.begin(target, request.requestHeaders, length)
    try:
        for chunk in iter(lambda: content.read(1 << 16), b""):
            upload.write(chunk)
        upload.finish()
    except BaseException:
        upload.discard()
        raise
    request.notifyFinish().addBoth(lambda _: upload.discard())
    return upload


def attach_new(request: Any, uploads: Uploads, name: str, msg_id: str) -> Deferred[AttachOutcome]:
    """
    C{POST .../<id>/attach/new}: attach the spooled C{filedata} part under
    its filename. No C{filedata} -> 404.
    """
    try:
        form = received_upload(request, uploads, UploadTarget("form", name, msg_id))
    except UploadRefused as e:
        return succeed(AttachOutcome(e.code, e.body if isinstance(e.body, list) else ["fail", str(e.body)]))
    assert isinstance(form, FormUpload)
    if form.file is None or form.filename is None:
        return succeed(AttachOutcome(404, ["fail", "missing filedata"]))
    d = _attach(form.queue, msg_id, form.file.path, form.filename, form.file.md5())
    return d.addBoth(_discarding(form))


def _discarding(upload: Upload) -> Callable[[Any], Any]:
    def discard(result: Any) -> Any:
        upload.discard()
        return result

    return discard


def render_json(request: Any, code: int, body: Any, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """
    Set the status, C{Content-Type: application/json}, its length and
    C{headers}; the encoded body.
    """
    for k, v in headers:
        request.setHeader(k, v)
    return whole_answer(request, code, JSON_TYPE, compact_json(body))


#: JSON without spaces, as the original answers: C{["ok","..."]}.
compact_json = dumps


def ruby_inspect(reply: list[str]) -> str:
    """
    A reply array as the original printed it in texts:
    C{["fail", "cannot find message"]}.
    """
    return json.dumps(reply, ensure_ascii=False)


def render_attach_new(
    request: Any,
    outcome: AttachOutcome,
    name: str,
    msg_id: str,
    redirect_ok: Callable[[Any, str], bytes] | None = None,
) -> bytes:
    """
    The answer of C{attach/new} (http.md): JSON for C{x_format=json}; HTML
    otherwise: success -> C{redirect_ok(request, "Attached message
    successfully")} (flash + 303 to the message page, from the app), failure
    -> 200 text C{Commit <name>/<id> got <result>}.
    """
    x_format = (request.args.get(b"x_format") or [b"html"])[-1]
    if x_format == b"json" or outcome.code != 200:
        return render_json(request, outcome.code, outcome.reply)
    if outcome.ok and redirect_ok is not None:
        return redirect_ok(request, "Attached message successfully")
    if outcome.ok:
        text = f"Attached message successfully: {outcome.reply[1]}"
    else:
        text = f"Commit {name}/{msg_id} got {ruby_inspect(outcome.reply)}"
    return whole_answer(request, 200, TEXT_TYPE, text.encode("utf-8"))


def attach_put(request: Any, uploads: Uploads, name: str, msg_id: str, att: str) -> Deferred[bytes]:
    """
    C{PUT .../<id>/attach/<att>}: always answered in JSON.

    Without C{Content-Range} the body is the whole file: attached, 200
    C{["ok","<md5>-Attached successfully"]} (a partial upload of the same
    name is dropped).

    Resumable (the Google resumable-upload convention): C{Content-Range:
    bytes S-E/T} appends the body at offset S of the partial file, where S
    must equal the bytes held (else 416 with C{Range} and the reason; 409 if
    another chunk of it is being received). While incomplete: 308 with
    C{Range: bytes=0-<held-1>} (no C{Range} when nothing is held) and
    C{["partial","<held>"]}. C{Content-Range: bytes */T} with an empty body
    asks for that status; it answers 200 C{["ok","<md5>-Attached
    successfully"]} when nothing is held but the attachment is there already
    with T bytes (and the C{X-RQ-MD5} given, if any): a lost answer. With the last byte the file is checked against an
    optional C{X-RQ-MD5: <hex>} (mismatch: 422 C{["fail","md5 mismatch ..."]},
    partial dropped), attached, and answered as above. A C{X-RQ-MD5} on a
    whole-file C{PUT} is checked the same way.
    """
    try:
        upload = received_upload(request, uploads, UploadTarget("put", name, msg_id, att))
    except UploadRefused as e:
        return succeed(render_json(request, e.code, e.body, e.headers))
    if isinstance(upload, RawUpload) and upload.spool is not None:
        return _put_whole(request, uploads, upload)
    if isinstance(upload, RangeUpload):
        return _put_range(request, uploads, upload)
    return succeed(render_json(request, 400, ["fail", "upload not received"]))


def _md5_mismatch(expected: str | None, actual: str) -> str | None:
    if expected is None or expected.lower() == actual:
        return None
    return f"md5 mismatch: received {actual}, expected {expected.lower()}"


def _put_whole(request: Any, uploads: Uploads, upload: RawUpload) -> Deferred[bytes]:
    assert upload.spool is not None and upload.target.name is not None
    md5 = upload.spool.md5()
    assert md5 is not None
    mismatch = _md5_mismatch(upload.expected_md5, md5)
    if mismatch is not None:
        upload.discard()
        return succeed(render_json(request, 422, ["fail", mismatch]))
    d = _attach(upload.queue, upload.target.msg_id, upload.spool.path, upload.target.name, md5)

    def done(outcome: AttachOutcome) -> bytes:
        upload.discard()
        if outcome.ok:
            uploads.forget(upload.queue.store.partial_path(upload.target.msg_id, upload.target.name or ""))
        return render_json(request, _put_code(outcome), outcome.reply)

    return d.addCallback(done)


def _put_code(outcome: AttachOutcome) -> int:
    if outcome.ok or outcome.code != 200:
        return outcome.code
    reason = outcome.reply[1] if len(outcome.reply) > 1 else ""
    if reason == "cannot find message":
        return 404
    if reason == "status: DOWN":
        return 503
    return 400


def _put_range(request: Any, uploads: Uploads, upload: RangeUpload) -> Deferred[bytes]:
    assert upload.content_range is not None and upload.target.name is not None
    held = upload.held
    total = upload.content_range.total
    path = upload.path
    if upload.spool is None and held == 0 and total > 0:
        return _probe_attached(request, uploads, upload, total)
    if held < total:
        partial = render_json(request, 308, ["partial", str(held)], held_range(held))
        if upload.spool is None or upload.received == 0:
            return succeed(partial)
        parents = [os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
        return uploads.instance.syncer.sync(path, *parents).addCallback(lambda _: partial)
    if held > total:
        uploads.forget(path)
        return succeed(render_json(request, 416, ["fail", f"{held} bytes held for a {total} byte file; start again"]))
    if not uploads.claim(path):
        refusal = uploads.busy()
        return succeed(render_json(request, refusal.code, refusal.body))
    if total == 0:
        # An empty file is complete as soon as it is asked for.
        Spool.append(path, 0).close()

    def check(md5: str) -> Deferred[AttachOutcome] | AttachOutcome:
        mismatch = _md5_mismatch(upload.expected_md5, md5)
        if mismatch is not None:
            uploads.forget(path)
            return AttachOutcome(422, ["fail", mismatch])
        return _attach(upload.queue, upload.target.msg_id, path, upload.target.name or "", md5)

    def done(outcome: AttachOutcome) -> bytes:
        if outcome.ok:
            uploads.forget(path)
        return render_json(request, _put_code(outcome), outcome.reply)

    def unbusy(result: Any) -> Any:
        uploads.release(path, None)
        return result

    d = uploads.partial_md5(path, held)
    d.addCallback(check)
    d.addBoth(unbusy)
    return d.addCallback(done)


def _probe_attached(request: Any, uploads: Uploads, upload: RangeUpload, total: int) -> Deferred[bytes]:
    """
    A status probe when nothing is held: if the message already has this
    attachment with C{total} bytes (and the C{X-RQ-MD5} given, if any), the
    upload is complete (an earlier answer was lost): 200 with its md5.
    Else 308, nothing held.
    """
    assert upload.target.name is not None
    nothing = render_json(request, 308, ["partial", "0"])
    existing = os.path.join(upload.queue.store.msg_dir("prep", upload.target.msg_id), "attach", upload.target.name)
    if not os.path.isfile(existing) or file_size(existing) != total:
        return succeed(nothing)

    def answer(md5: str) -> bytes:
        if _md5_mismatch(upload.expected_md5, md5) is not None:
            return nothing
        return render_json(request, 200, ["ok", f"{md5}-Attached successfully"])

    return md5_off_reactor(existing, uploads.runInThread).addCallback(answer)


def mount_uploads(app: Any, web: Any) -> Callable[..., UploadRequest]:
    """
    Add the upload routes to the klein C{app} of C{web} (an
    L{rqtwisted.web.app.RQWeb}: its instance, reactor, flash notices and
    redirects) and return the L{UploadRequest} factory for the site.
    """
    uploads = Uploads(web.instance, threads_of(web.reactor))

    @app.route("/q/<name>/<msg_id>/attach/new", methods=["POST"], endpoint="attach_new:POST")
    def post_attachment(request: Any, name: str, msg_id: str) -> Deferred[bytes]:
        """
        C{POST /q/<name>/<id>/attach/new} (R): a multipart upload.
        """

        def redirect_ok(request: Any, text: str) -> bytes:
            web._notify(request, text)
            return web._redirect(request, web._url("q", form_queue(request, name), msg_id))

        d = attach_new(request, uploads, name, msg_id)
        return d.addCallback(lambda outcome: render_attach_new(request, outcome, name, msg_id, redirect_ok))

    @app.route("/q/<name>/<msg_id>/attach/<att>", methods=["PUT"], endpoint="attach_put:PUT")
    def put_attachment(request: Any, name: str, msg_id: str, att: str) -> Deferred[bytes]:
        """
        C{PUT /q/<name>/<id>/attach/<att>} (R): a raw or resumable upload.
        """
        return attach_put(request, uploads, name, msg_id, att)

    def form_queue(request: Any, name: str) -> str:
        upload = getattr(request, "upload", None)
        return upload.queue.name if isinstance(upload, Upload) else name

    return UploadRequest.factory(uploads)
