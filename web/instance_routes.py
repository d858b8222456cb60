"""
The instance routes of the web interface (spec/http.md, "Instance routes"):
the home page, C{/q.json}, C{/q.txt}, C{/search} and queue creation and
deletion.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.python.failure import Failure

from rqtwisted import RQ_VERSION
from rqtwisted.message import JSON_READ_ERRORS, MessageError
from rqtwisted.root import queue_sort_key
from rqtwisted.web import pages
from rqtwisted.web.answers import HTTPError, form_arg, form_fields


class InstanceRoutes:
    """
    The handlers of the instance routes, mixed into
    L{rqtwisted.web.app.RQWeb} (which provides C{instance}, C{settings},
    C{root} and the answer helpers).
    """

    def _queue_info(self, name: str) -> dict[str, Any]:
        queue = self.instance.queues[name]
        return {
            "name": name,
            "status": queue.status(),
            "ping": "pong",
            "pid": os.getpid(),
            "uptime": int(queue.uptime()),
            "counts": queue.num_messages(),
        }

    def instance_info(self) -> dict[str, Any]:
        """
        The instance and every queue, for the home page and C{/q.json}.
        """
        status = self.instance.status()
        queues: list[dict[str, Any]] = []
        seen = set()
        for q in status.get("queues", []):
            name = q["name"]
            seen.add(name)
            if name in self.instance.queues and q.get("status") != "ERROR":
                entry = self._queue_info(name)
            else:
                entry = {"name": name, "status": "ERROR", "ping": "", "pid": "", "uptime": 0, "counts": {},
                         "error": f"not running ({q.get('failures', 0)} failures)"}
            if isinstance(q.get("schedule"), list):
                entry["schedule"] = q["schedule"]
            queues.append(entry)
        errors = status.get("config_errors") or {}
        for name in self.instance.root.queue_names():
            if name not in seen:
                queues.append({"name": name, "status": "ERROR", "ping": "", "pid": "", "uptime": 0,
                               "counts": {}, "error": str(errors.get(name, "not running"))})
        queues.sort(key=lambda q: queue_sort_key(q["name"]))
        return {
            "status": "OPERATIONAL",
            "ping": "pong",
            "pid": status.get("pid", os.getpid()),
            "uptime": status.get("uptime", 0),
            "version": status.get("version", RQ_VERSION),
            "time": status.get("time", int(time.time())),
            "queues": queues,
            "timers": status.get("timers") or [],
            "scandir": status.get("scandir") or [],
        }

    # -- instance routes

    def home(self, request: Any) -> Any:
        """
        C{GET /}: the home page.
        """
        info = self.instance_info()
        content = pages.home_content(self.root, info, bool(self.settings.allow_new_queue), self.root)
        return self._page(request, content, scripts=("js/rq.js", "js/home.js"), body_class="home")

    def q_json(self, request: Any) -> bytes:
        """
        C{GET /q.json}.
        """
        info = self.instance_info()
        queues = [
            {k: q[k] for k in ("name", "status", "ping", "pid", "uptime", "counts")} for q in info["queues"]
        ]
        return self._json(request, {
            "status": info["status"],
            "ping": info["ping"],
            "pid": info["pid"],
            "uptime": info["uptime"],
            "version": info["version"],
            "time": info["time"],
            "queues": queues,
        })

    def q_txt(self, request: Any) -> bytes:
        """
        C{GET /q.txt}: one line per queue, no trailing newline.
        """
        names = sorted(set(self.instance.queues) | set(self.instance.root.queue_names()))
        return self._text(request, "\n".join(f"{self.root}q/{n}.txt" for n in names))

    def search(self, request: Any) -> Any:
        """
        C{GET /search?name=Q&query[field]=v&exact}: messages of every state
        matching all the fields.
        """
        name = form_arg(request, "name") or ""
        query = form_fields(request, "query")
        # (A bare "exact" counts; the raw query is split, not decoded: it
        # may hold bytes that are not UTF-8.)
        raw_query = urlsplit(request.uri).query
        exact = b"exact" in request.args or any(p.split(b"=", 1)[0] == b"exact" for p in raw_query.split(b"&"))
        if b"query" in request.args:
            return self._json(request, ["fail", "query needs a field: query[<field>]=<value>"], 400)
        if name:
            self._queue(name, "json")
        d = maybeDeferred(self.instance.search, name or None, query, exact)

        def failed(f: Failure) -> bytes:
            f.trap(MessageError)
            code = 404 if f.value.reason == "Queue not found" else 400
            return self._json(request, ["fail", f.value.reason], code)

        return d.addCallbacks(lambda found: self._json(request, found), failed)

    def _require_new_queue(self) -> None:
        if not self.settings.allow_new_queue:
            raise HTTPError(403, "Queue creation not allowed at this time.")

    def new_queue_form(self, request: Any) -> Any:
        """
        C{GET /new_queue}.
        """
        self._require_new_queue()
        return self._page(request, pages.new_queue_content(self.root), title="RQ :: new queue")

    @inlineCallbacks
    def new_queue(self, request: Any) -> Any:
        """
        C{POST /new_queue}: create a queue from the form; 303 to its page
        once it is on disk.
        """
        self._require_new_queue()
        form = form_fields(request, "queue")
        data: dict[str, Any] = {k: form.get(k, "") for k in ("name", "script", "num_workers", "exec_prefix")}
        for key in ("coalesce_params", "blocking_params"):
            values = request.args.get(f"queue[{key}][]".encode(), [])
            data[key] = [int(v) for v in values if v.strip().isdigit()]
        try:
            result = ["success", (yield maybeDeferred(self.instance.create_queue, data))]
        except MessageError as e:
            result = ["fail", e.reason]
        self._notify(request, "We got ", ("code", json.dumps(data)), " from form, and ",
                     ("code", json.dumps(result)), " from QueueMgr",
                     kind="notice" if result[0] == "success" else "error")
        return self._redirect(request, self._url("q", str(data["name"])))

    @inlineCallbacks
    def new_queue_link(self, request: Any) -> Any:
        """
        C{POST /new_queue_link}: a queue whose C{config.json} is a symlink to
        a config file inside the root; answered once it is on disk.
        """
        self._require_new_queue()
        path = form_arg(request, "queue[json_path]") or ""
        root = os.path.realpath(self.instance.root.path)
        real = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, real]) != root or not os.path.isfile(real):
            raise HTTPError(404, "config file not found inside the root", "page")
        try:
            with open(real, encoding="utf-8") as f:
                data = json.load(f)
        except JSON_READ_ERRORS:
            raise HTTPError(404, "not valid JSON", "page")
        name = data.get("name") if isinstance(data, dict) else None
        create_link = getattr(self.instance, "create_queue_link", None)
        if create_link is None:
            return self._text(request, "501 - queue links are not available in this version", 501)
        try:
            result = ["success", (yield maybeDeferred(create_link, real))]
        except MessageError as e:
            result = ["fail", e.reason]
        self._notify(request, "We got ", ("code", path), " from form, and ", ("code", json.dumps(result)),
                     " from QueueMgr", kind="notice" if result[0] == "success" else "error")
        return self._redirect(request, self._url("q", str(name or "")))

    @inlineCallbacks
    def delete_queue(self, request: Any) -> Any:
        """
        C{POST /delete_queue}: delete a queue; 303 home.
        """
        name = form_arg(request, "queue_name") or ""
        try:
            result = ["success", (yield maybeDeferred(self.instance.delete_queue, name))]
        except MessageError as e:
            result = ["fail", e.reason]
        self._notify(request, "Delete of queue ", ("code", name), " got ", ("code", json.dumps(result)),
                     kind="notice" if result[0] == "success" else "error")
        return self._redirect(request, self.root)
