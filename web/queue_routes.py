"""
The queue routes of the web interface (spec/http.md, "Queue routes"): the
queue page and its C{.json}/C{.txt} forms, C{done.json}, the queue config,
the new-message form and C{POST new_message} in its three input forms, and
the admin operations.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import inlineCallbacks, maybeDeferred

from rqtwisted.message import JSON_READ_ERRORS, MessageError, creation_fields, valid_queue_name
from rqtwisted.web import listing, pages
from rqtwisted.web.answers import HTML_TYPE, JSON_TYPE, HTTPError, form_arg, form_fields, reply_text

#: Messages per list on a queue page.
PAGE_SIZE = 50

#: Default cap of each list of C{/q/<name>.json} (C{?limit=N}, 0 = all):
#: queue pages poll it every 900 ms (quirks 24).
JSON_LIST_LIMIT = 1000

#: The admin operations, in the order the form fields are checked.
ADMIN_ACTIONS = ("pause", "resume", "down", "up")
_PAST = {"pause": "paused", "resume": "resumed", "down": "downed", "up": "upped"}


class QueueRoutes:
    """
    The handlers of the queue routes, mixed into
    L{rqtwisted.web.app.RQWeb}.
    """

    def queue_page(self, request: Any, name: str) -> Any:
        """
        C{GET /q/<name>}, C{/q/<name>.txt}, C{/q/<name>.json}.
        """
        name, dot, suffix = name.partition(".")
        if dot and suffix == "json":
            return self.queue_json(request, name)
        if dot and suffix == "txt":
            return self.queue_txt(request, name)
        if dot:
            raise HTTPError(404, "Not Found", "page")
        queue_dir = self.instance.root.queue_path(name)
        if not valid_queue_name(name) or not os.path.isdir(queue_dir):
            raise HTTPError(404, "Queue not found", "page")
        queue = self.instance.queues.get(name)
        title = f"RQ :: {name}"
        if queue is None or not queue.running:
            content = pages.queue_content(self.root, {"name": name, "status": "DOWN", "unreachable": True})
            return self._page(request, content, title=title, code=503, body_class="queue")
        now = self.instance.clock.seconds()
        sizes = queue.num_messages()
        lists = {}
        query = {}
        for state in listing.STATES:
            try:
                page = max(1, int(form_arg(request, f"{state}_page") or 1))
            except ValueError:
                page = 1
            if page > 1:
                query[f"{state}_page"] = str(page)
            lists[state] = {
                "entries": listing.entries(queue, state, (page - 1) * PAGE_SIZE, PAGE_SIZE),
                "page": page,
                "per_page": PAGE_SIZE,
            }
        data = {
            "name": name,
            "status": queue.status(),
            "pid": os.getpid(),
            "uptime": int(queue.uptime()),
            "config": queue.config.toDict(),
            "sizes": sizes,
            "lists": lists,
            "now": now,
            "query": query,
        }
        content = pages.queue_content(self.root, data)
        return self._page(request, content, title=title, scripts=("js/rq.js", "js/queue.js"), body_class="queue")

    def queue_json(self, request: Any, name: str) -> bytes:
        """
        C{GET /q/<name>.json}: status, counts and lists (each capped by
        C{?limit=N}, default L{JSON_LIST_LIMIT}; C{0} lists everything).
        """
        queue = self._queue(name, "json")
        status = queue.status()
        if status == "DOWN":
            return self._json(request, {"status": "DOWN"})
        try:
            limit: int | None = int(form_arg(request, "limit") or JSON_LIST_LIMIT)
        except ValueError:
            limit = JSON_LIST_LIMIT
        if not limit or limit < 0:
            limit = None
        counts = queue.num_messages()
        out: dict[str, Any] = {
            "status": status,
            "ping": "pong",
            "pid": os.getpid(),
            "uptime": int(queue.uptime()),
            "time": int(self.instance.clock.seconds()),
        }
        for state in listing.STATES:
            out[f"{state}_size"] = counts.get(state, 0)
        out["messages"] = listing.json_lists(queue, limit)
        return self._json(request, out)

    def queue_txt(self, request: Any, name: str) -> bytes:
        """
        C{GET /q/<name>.txt} (exact format).
        """
        queue = self._queue(name, "text")
        status = queue.status()
        if status == "DOWN":
            return self._text(request, "status: DOWN\n")
        c = queue.num_messages()
        return self._text(
            request,
            f"status: {status}\nuptime: {int(queue.uptime())}\n\n"
            f"prep: {c['prep']}\nque: {c['que']}\nrun: {c['run']}\n\n"
            f"done: {c['done']}\nerr: {c['err']}\nrelayed: {c['relayed']}\n",
        )

    def done_json(self, request: Any, name: str) -> bytes:
        """
        C{GET /q/<name>/done.json?limit=10}: the newest done ids.
        """
        queue = self._queue(name, "json")
        try:
            limit = max(0, int(form_arg(request, "limit") or 10))
        except ValueError:
            raise HTTPError(400, "invalid limit", "json")
        return self._json(request, listing.page_ids(queue, "done", 0, limit))

    def config_json(self, request: Any, name: str) -> Any:
        """
        C{GET /q/<name>/config.json}: the raw config file.
        """
        if not valid_queue_name(name):
            raise HTTPError(404, "Queue not found", "json")
        path = os.path.join(self.instance.root.queue_path(name), "config.json")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            raise HTTPError(404, "config.json not found", "json")
        return self._body(request, 200, JSON_TYPE, data)

    def config(self, request: Any, name: str) -> bytes:
        """
        C{GET /q/<name>/config} (R): the effective config.
        """
        queue = self._queue(name, "json", routed=True)
        config = queue.config.toDict()
        schedule = []
        for entry in config.get("schedule") or []:
            params = dict(entry.get("params") or {})
            for n in range(1, 5):
                if f"param{n}" in entry:
                    params[f"param{n}"] = entry[f"param{n}"]
            schedule.append({"cron": entry.get("cron"), "params": params})
        config["schedule"] = schedule
        return self._json(request, config)

    def new_message_form(self, request: Any, name: str) -> Any:
        """
        C{GET /q/<name>/new_message}: the form, with C{form.json} overrides.
        """
        self._queue(name, "page")
        overrides: Any = {}
        path = os.path.join(self.instance.root.queue_path(name), "form.json")
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    overrides = json.load(f)
            except JSON_READ_ERRORS:
                return self._text(request, "500 - Bad overrides file", 500)
            if not isinstance(overrides, dict):
                return self._text(request, "500 - Bad overrides file", 500)
        return self._page(request, pages.new_message_content(self.root, name, overrides),
                          title=f"RQ :: {name}", body_class="new-message")

    @inlineCallbacks
    def new_message(self, request: Any, name: str) -> Any:
        """
        C{POST /q/<name>/new_message} (R): a JSON body, an HTML form
        (C{x_format=html}, C{mesg[...]} fields) or a C{mesg} JSON field.
        """
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        html = False
        if ctype == b"application/json":
            try:
                data = json.loads(request.content.read() or b"null")
            except (ValueError, RecursionError):
                raise HTTPError(400, "invalid JSON body", "json")
        elif (form_arg(request, "x_format") or "json") == "html":
            html = True
            try:
                data = form_fields(request, "mesg", errors="strict")
            except UnicodeDecodeError:
                # (Stored as sent, or refused: never with U+FFFD in place.)
                raise HTTPError(400, "a mesg field is not UTF-8 text", "text")
        else:
            try:
                text = form_arg(request, "mesg", errors="strict")
            except UnicodeDecodeError:
                raise HTTPError(400, "invalid JSON in mesg field: not UTF-8", "json")
            if text is None:
                raise HTTPError(400, "missing mesg field", "json")
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):
                raise HTTPError(400, "invalid JSON in mesg field", "json")
        if not isinstance(data, dict):
            raise HTTPError(400, "message must be a JSON object", "json")
        queue = self._queue(name, "page" if html else "json", routed=True)
        if queue.admin_status() == "DOWN":
            return self._text(request, "503 - Service Unavailable - Operationally Down", 503)
        method = data.pop("_method", None) or "commit"
        if method not in ("commit", "prep", "single_que"):
            return self._text(request, "400 - Invalid method param", 400)
        try:
            fields = creation_fields(data)
            result = ["ok", (yield maybeDeferred(queue.create, fields, method))]
        except MessageError as e:
            if self._is_down(e):
                return self._text(request, "503 - Service Unavailable - Operationally Down", 503)
            result = ["fail", e.reason]
        if not html:
            return self._json(request, result)
        if form_arg(request, "back"):
            if result[0] == "ok":
                self._notify(request, f"Created message {result[1]}")
            else:
                self._notify(request, f"Error creating message: {result[1]}", kind="error")
            return self._redirect(request, self._back(request, self._url("q", name)))
        ok = result[0] == "ok"
        content = pages.new_message_result(self.root, name, ok, result[1] if ok else f"{result[0]} - {result[1]}")
        page = yield self._page_bytes(request, content, title=f"RQ :: {name}")
        if ok:
            page = pages.with_result_link(page, result[1])
        return self._body(request, 200, HTML_TYPE, page)

    @inlineCallbacks
    def adminoper(self, request: Any, name: str) -> Any:
        """
        C{POST /q/<name>/adminoper}: pause, resume, down or up; answered
        once the change is on disk.
        """
        self._queue(name, "text")
        action = next((a for a in ADMIN_ACTIONS if a.encode() in request.args), None)
        if action is None:
            return self._text(request, "400 - Invalid admin action", 400)
        try:
            yield maybeDeferred(self.instance.set_admin, action, name)
        except MessageError as e:
            return self._text(request, f"500 - Couldn't {action} queue. {reply_text('fail', e.reason)}.", 500)
        self._notify(request, f"Successfully {_PAST[action]} queue {name}")
        return self._redirect(request, self._back(request, self._url("q", name)))

    @inlineCallbacks
    def restart(self, request: Any, name: str) -> Any:
        """
        C{POST /q/<name>/restart}.
        """
        if not valid_queue_name(name) or not os.path.isdir(self.instance.root.queue_path(name)):
            raise HTTPError(404, "Queue not found", "page")
        try:
            yield maybeDeferred(self.instance.restart_queue, name)
        except MessageError as e:
            return self._text(request, f"500 - Couldn't restart queue. {reply_text('fail', e.reason)}.", 500)
        self._notify(request, f"Successfully restarted queue {name}")
        return self._redirect(request, self._back(request, self._url("q", name)))
