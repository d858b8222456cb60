"""
The message routes of the web interface (spec/http.md, "Message routes";
all (R)): the message page and its C{.json}, C{state.json}, the message
operations (delete, destroy, commit, run now, clone), attachments, logs and
the tail views. Uploads are in L{rqtwisted.web.upload}.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import inlineCallbacks, maybeDeferred

from rqtwisted.message import MessageError, valid_msg_id
from rqtwisted.web import pages
from rqtwisted.web.answers import HTTPError, form_arg, reply_text
from rqtwisted.web.files import file_resource, tail_bytes
from rqtwisted.web.upload import threads_of

#: Bytes of a log rendered server-side in the tail view.
TAIL_BYTES = 64 * 1024

#: States in which a message may still change (its log may grow).
LIVE_STATES = ("prep", "que", "run")

#: Operations with a route of their own: the verb of the failure text, the
#: notice, and whether the redirect goes to the message (else its queue).
_OWN_ROUTE_ANSWERS = {
    "clone": ("clone", "Message cloned successfully", False),
    "run_now": ("run", "Message sent to the front of the run queue", True),
}


class MessageRoutes:
    """
    The handlers of the message routes, mixed into
    L{rqtwisted.web.app.RQWeb}.
    """

    @inlineCallbacks
    def message_page(self, request: Any, name: str, msg_id: str) -> Any:
        """
        C{GET /q/<name>/<id>} and C{/q/<name>/<id>.json} (R).
        """
        as_json = msg_id.endswith(".json")
        if as_json:
            msg_id = msg_id[: -len(".json")]
        kind = "json" if as_json else "page"
        queue = self._queue(name, kind, routed=True)
        self._message_state(queue, msg_id, kind)
        try:
            msg = yield queue.read(msg_id)
        except MessageError as e:
            raise HTTPError(404, e.reason, kind)
        if as_json:
            return self._json(request, msg)
        return self._page(request, pages.message_content(self.root, queue.name, msg),
                          title=f"RQ :: {queue.name}", body_class="message")

    def state_json(self, request: Any, name: str, msg_id: str) -> bytes:
        """
        C{GET /q/<name>/<id>/state.json} (R): C{["<state>"]}.
        """
        queue = self._queue(name, "json", routed=True)
        return self._json(request, [self._message_state(queue, msg_id, "json")])

    @inlineCallbacks
    def _operate(self, request: Any, queue: Any, operation: Callable[..., Any], *args: Any) -> Any:
        """
        Run a message operation: C{(["ok", detail] or ["fail", reason])};
        raises 503 when the queue is DOWN.
        """
        try:
            detail = yield maybeDeferred(operation, *args)
        except MessageError as e:
            if self._is_down(e):
                raise HTTPError(503, "503 - Service Unavailable - Operationally Down")
            return ["fail", e.reason]
        return ["ok", detail]

    @inlineCallbacks
    def message_action(self, request: Any, name: str, msg_id: str) -> Any:
        """
        C{POST /q/<name>/<id>} (R): C{_method} = delete, destroy, commit or
        run_now; C{x_format} html (default) or json.
        """
        method = form_arg(request, "_method") or ""
        as_json = (form_arg(request, "x_format") or "html") == "json"
        kind = "json" if as_json else "page"
        queue = self._queue(name, kind, routed=True)
        operations = {
            "delete": queue.delete,
            "destroy": queue.destroy,
            "commit": queue.commit,
            "run_now": queue.run_now,
        }
        if method not in operations:
            return self._text(request, "400 - Invalid method param", 400)
        if not valid_msg_id(msg_id):
            raise HTTPError(404, "msg not found", kind)
        result = yield self._operate(request, queue, operations[method], msg_id)
        if as_json:
            return self._json(request, result)
        if method == "run_now":
            return self._operation_page(request, queue, msg_id, method, result)
        msg_page = self._url("q", queue.name, msg_id)
        if result[0] == "ok":
            texts = {"delete": "Message deleted successfully", "destroy": "Message destroyed successfully",
                     "commit": "Message committed successfully"}
            self._notify(request, texts[method])
            target = msg_page if method == "commit" else self._url("q", queue.name)
        else:
            self._notify(request, f"Couldn't {method} message: {result[1]}", kind="error")
            target = msg_page
        return self._redirect(request, target)

    def clone(self, request: Any, name: str, msg_id: str) -> Any:
        """
        C{POST /q/<name>/<id>/clone} (R).
        """
        return self._own_route_operation(request, name, msg_id, "clone")

    def run_now(self, request: Any, name: str, msg_id: str) -> Any:
        """
        C{POST /q/<name>/<id>/run_now} (R).
        """
        return self._own_route_operation(request, name, msg_id, "run_now")

    @inlineCallbacks
    def _own_route_operation(self, request: Any, name: str, msg_id: str, method: str) -> Any:
        """
        Run C{queue.<method>} on the message and answer as its own route
        does (L{_operation_page}).
        """
        queue = self._queue(name, "page", routed=True)
        self._message_state(queue, msg_id)
        result = yield self._operate(request, queue, getattr(queue, method), msg_id)
        return self._operation_page(request, queue, msg_id, method, result)

    def _operation_page(self, request: Any, queue: Any, msg_id: str, method: str, result: list[Any]) -> Any:
        """
        The HTML answer to a clone or run-now: a 500 with the reason when it
        failed, else a notice and a redirect.
        """
        verb, notice, to_message = _OWN_ROUTE_ANSWERS[method]
        if result[0] != "ok":
            return self._text(request, f"500 - Couldn't {verb} message. {reply_text(*result)}.", 500)
        self._notify(request, notice)
        if to_message:
            return self._redirect(request, self._url("q", queue.name, msg_id))
        return self._redirect(request, self._url("q", queue.name))

    def _message_file(self, queue: Any, msg_id: str, subdir: str, filename: str, kind: str = "text") -> tuple[str, str]:
        """
        C{(path, state)} of C{<message dir>/<subdir>/<filename>}; 404 for an
        unknown message or a name that could leave the directory.
        """
        state = self._message_state(queue, msg_id, kind)
        if not filename or filename.startswith(".") or "/" in filename or "\0" in filename:
            raise HTTPError(404, "Not Found", kind)
        return os.path.join(queue.store.msg_dir(state, msg_id), subdir, filename), state

    def attachment(self, request: Any, name: str, msg_id: str, att: str) -> Any:
        """
        C{GET /q/<name>/<id>/attach/<att>} (R): the file (C{Range} honoured).
        """
        queue = self._queue(name, "text", routed=True)
        path, _ = self._message_file(queue, msg_id, "attach", att)
        if not os.path.isfile(path):
            raise HTTPError(404, "Not Found")
        return file_resource(path, sandbox=True)

    @inlineCallbacks
    def attachment_action(self, request: Any, name: str, msg_id: str, att: str) -> Any:
        """
        C{POST /q/<name>/<id>/attach/<att>} (R) with C{_method=delete}.
        """
        if att == "new":
            # Only reached when the upload module is not installed.
            return self._text(request, "501 - uploads are not available in this version", 501)
        method = form_arg(request, "_method") or ""
        as_json = (form_arg(request, "x_format") or "html") == "json"
        queue = self._queue(name, "json" if as_json else "page", routed=True)
        if method != "delete":
            return self._text(request, "400 - Invalid method param", 400)
        result = yield self._operate(request, queue, queue.delete_attachment, msg_id, att)
        if as_json:
            return self._json(request, result)
        if result[0] == "ok":
            self._notify(request, "Attachment deleted successfully")
            return self._redirect(request, self._url("q", queue.name, msg_id))
        return self._text(request, f"Delete of attach {att} on {queue.name}/{msg_id} got {reply_text(*result)}")

    def log_file(self, request: Any, name: str, msg_id: str, log: str) -> Any:
        """
        C{GET /q/<name>/<id>/log/<log>} (R): the raw job log.
        """
        queue = self._queue(name, "text", routed=True)
        path, _ = self._message_file(queue, msg_id, "job", log)
        if not os.path.isfile(path):
            raise HTTPError(404, "Not Found")
        return file_resource(path, text=True, sandbox=True)

    @inlineCallbacks
    def _tail(self, request: Any, queue: Any, msg_id: str, path: str, state: str, label: str,
              log_url: str) -> Any:
        text = ""
        offset = top = bottom = total = 0
        if os.path.isfile(path):
            # In a thread: the line count reads the whole log (gigabytes,
            # for a chatty script), which would hold every queue meanwhile.
            data, start, size, newlines = yield threads_of(self.reactor)(tail_bytes, path, TAIL_BYTES)
            live = state in LIVE_STATES
            if live and data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                data = data[:cut]
            offset = start + len(data)
            text = data.decode("utf-8", "replace")
            shown = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
            partial = 1 if (not live and size and not data.endswith(b"\n") and data) else 0
            total = newlines + partial
            bottom = total
            top = bottom - shown + 1 if shown else bottom
        state_url = self._url("q", queue.name, msg_id, "state.json")
        content = pages.tail_content(self.root, queue.name, msg_id, label, log_url, state_url,
                                     text, offset, top, bottom, total)
        return self._page(request, content, title=f"RQ :: {queue.name}", scripts=("js/tailview.js",),
                          body_class="tailview")

    def tail_log(self, request: Any, name: str, msg_id: str, log: str) -> Any:
        """
        C{GET /q/<name>/<id>/tailviewlog/<log>} (R): the tail view of a log
        (empty until the script writes to it).
        """
        queue = self._queue(name, "page", routed=True)
        path, state = self._message_file(queue, msg_id, "job", log, "page")
        return self._tail(request, queue, msg_id, path, state, log,
                          self._url("q", queue.name, msg_id, "log", log))

    def tail_attachment(self, request: Any, name: str, msg_id: str, att: str) -> Any:
        """
        C{GET /q/<name>/<id>/tailview/<att>} (R): the tail view of an
        attachment (a URL, not a path: quirks 25).
        """
        queue = self._queue(name, "page", routed=True)
        path, state = self._message_file(queue, msg_id, "attach", att, "page")
        if not os.path.isfile(path):
            raise HTTPError(404, "Not Found", "page")
        return self._tail(request, queue, msg_id, path, state, att,
                          self._url("q", queue.name, msg_id, "attach", att))
