"""
The web interface: every route of spec/http.md on a klein app, served by the
daemon.

L{RQWeb} holds the klein app and the handlers; each handler calls the one
in-process API (L{rqtwisted.supervisor.Instance} and its queue services) and
shapes the answer: JSON, text, a file, a redirect, or a page from
L{rqtwisted.web.pages}; the lists of the queue page come from
L{rqtwisted.web.listing}. L{rqtwisted.web.site.RootResource} sits in front
of klein (paths, access control, C{relative_root}, static files).
L{make_site} builds the L{Site}; the upload module (L{rqtwisted.web.upload})
adds its routes and its streaming request factory there.

Conventions:
  - Settings are read from C{instance.settings} on every request, so
    C{rq restart} applies a changed C{config.json} to the web as well.
  - Failures of a JSON route are JSON (C{["fail", reason]}); 404s of page
    routes are the HTML Not Found page (with pending flash notices).
  - A queue whose directory exists but which is not running answers 503
    (quirks 23); a DOWN queue refuses writes with 503 and serves reads
    (quirks 26).
  - Flash notices travel in a signed cookie (L{rqtwisted.web.flash}).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from klein import Klein
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from rqtwisted import RQ_VERSION
from rqtwisted.message import MessageError, creation_fields, valid_msg_id, valid_queue_name
from rqtwisted.root import queue_sort_key
from rqtwisted.web import listing, pages
from rqtwisted.web.files import file_resource, tail_bytes
from rqtwisted.web.flash import FlashSigner, notice
from rqtwisted.web.site import RootResource, RQSite, normalize_segments

_log = Logger()

#: The static assets shipped with the package.
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

#: Queues that keep their own name in router mode.
ROUTER_EXEMPT = ("relay", "cleaner")

#: Messages per list on a queue page.
PAGE_SIZE = 50

#: Default cap of each list of C{/q/<name>.json} (C{?limit=N}, 0 = all):
#: queue pages poll it every 900 ms (quirks 24).
JSON_LIST_LIMIT = 1000

#: Bytes of a log rendered server-side in the tail view.
TAIL_BYTES = 64 * 1024

#: States in which a message may still change (its log may grow).
LIVE_STATES = ("prep", "que", "run")

ADMIN_ACTIONS = ("pause", "resume", "down", "up")
_PAST = {"pause": "paused", "resume": "resumed", "down": "downed", "up": "upped"}

JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain;charset=utf-8"


def dumps(value: Any) -> bytes:
    """
    Compact JSON, as the original's C{to_json}.
    """
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def reply_text(status: str, detail: Any) -> str:
    """
    A reply array as shown in notices and error texts:
    C{["fail", "reason"]}.
    """
    return json.dumps([status, detail])


class HTTPError(Exception):
    """
    Answer with C{code} and C{body}: C{kind} is C{json} (C{["fail", body]}),
    C{text}, or C{page} (the HTML Not Found page).
    """

    def __init__(self, code: int, body: str, kind: str = "text") -> None:
        super().__init__(body)
        self.code = code
        self.body = body
        self.kind = kind


def _arg(request: Any, key: str) -> str | None:
    values = request.args.get(key.encode("utf-8"))
    if not values:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _args_with_prefix(request: Any, prefix: str) -> dict[str, str]:
    """
    C{{inner: value}} for form fields C{<prefix>[inner]}.
    """
    out: dict[str, str] = {}
    raw = prefix.encode("utf-8") + b"["
    for key, values in request.args.items():
        if key.startswith(raw) and key.endswith(b"]") and values:
            inner = key[len(raw) : -1].decode("utf-8", "replace")
            value = values[0]
            out[inner] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return out


class RQWeb:
    """
    The web face of one running instance.

    @ivar app: the klein app (other modules may add routes to it).
    @ivar flash: the signer of flash cookies.
    """

    def __init__(
        self,
        instance: Any,
        reactor: Any = None,
        flash_key: bytes | None = None,
        static_dir: str = STATIC_DIR,
    ) -> None:
        """
        @param instance: the running L{rqtwisted.supervisor.Instance}.
        @param reactor: the reactor (unused by the routes; kept for the
            upload module).
        @param flash_key: the flash cookie key (default: random).
        @param static_dir: where C{css/}, C{js/} and C{favicon.ico} are.
        """
        self.instance = instance
        self.reactor = reactor
        self.flash = FlashSigner(flash_key)
        self.static_dir = static_dir
        self.app = Klein()
        self._routes()
        self.klein_resource = self.app.resource()

    # -- plumbing

    @property
    def settings(self) -> Any:
        """
        The instance configuration in force.
        """
        return self.instance.settings

    @property
    def root(self) -> str:
        """
        C{relative_root}, ending with C{/}.
        """
        return str(self.settings.relative_root)

    def resource(self) -> RootResource:
        """
        The resource to serve.
        """
        return RootResource(self)

    def _routes(self) -> None:
        route = self.app.route
        table: list[tuple[str, tuple[str, ...], Callable[..., Any]]] = [
            ("/", ("GET",), self.home),
            ("/q.json", ("GET",), self.q_json),
            ("/q.txt", ("GET",), self.q_txt),
            ("/search", ("GET",), self.search),
            ("/new_queue", ("GET",), self.new_queue_form),
            ("/new_queue", ("POST",), self.new_queue),
            ("/new_queue_link", ("POST",), self.new_queue_link),
            ("/delete_queue", ("POST",), self.delete_queue),
            ("/q/<name>", ("GET",), self.queue_page),
            ("/q/<name>/done.json", ("GET",), self.done_json),
            ("/q/<name>/config.json", ("GET",), self.config_json),
            ("/q/<name>/config", ("GET",), self.config),
            ("/q/<name>/new_message", ("GET",), self.new_message_form),
            ("/q/<name>/new_message", ("POST",), self.new_message),
            ("/q/<name>/adminoper", ("POST",), self.adminoper),
            ("/q/<name>/restart", ("POST",), self.restart),
            ("/q/<name>/<msg_id>", ("GET",), self.message_page),
            ("/q/<name>/<msg_id>", ("POST",), self.message_action),
            ("/q/<name>/<msg_id>/state.json", ("GET",), self.state_json),
            ("/q/<name>/<msg_id>/clone", ("POST",), self.clone),
            ("/q/<name>/<msg_id>/run_now", ("POST",), self.run_now),
            ("/q/<name>/<msg_id>/attach/<att>", ("GET",), self.attachment),
            ("/q/<name>/<msg_id>/attach/<att>", ("POST",), self.attachment_action),
            ("/q/<name>/<msg_id>/log/<log>", ("GET",), self.log_file),
            ("/q/<name>/<msg_id>/tailviewlog/<log>", ("GET",), self.tail_log),
            ("/q/<name>/<msg_id>/tailview/<att>", ("GET",), self.tail_attachment),
        ]
        for path, methods, handler in table:
            route(path, methods=list(methods), endpoint=handler.__name__ + ":" + ",".join(methods))(handler)
        self.app.handle_errors(HTTPError)(self._http_error)
        self.app.handle_errors(NotFound)(self._not_found)
        self.app.handle_errors(MethodNotAllowed)(self._not_allowed)

    def static_file(self, segments: list[bytes]) -> resource.Resource | None:
        """
        The static asset a path names (C{css/*}, C{js/*}, C{favicon.ico}).
        """
        if segments == [b"favicon.ico"]:
            rel = ["favicon.ico"]
        elif len(segments) == 2 and segments[0] in (b"css", b"js", b"img"):
            rel = [segments[0].decode(), segments[1].decode("utf-8", "replace")]
            if rel[1].startswith("."):
                return None
        else:
            return None
        path = os.path.join(self.static_dir, *rel)
        if not os.path.isfile(path):
            return None
        return file_resource(path)

    # -- answers

    @staticmethod
    def _body(request: Any, code: int, content_type: bytes, body: bytes) -> bytes:
        """
        A whole answer, with its length (no chunked encoding).
        """
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def _json(self, request: Any, value: Any, code: int = 200) -> bytes:
        return self._body(request, code, JSON_TYPE, dumps(value))

    def _text(self, request: Any, text: str, code: int = 200) -> bytes:
        return self._body(request, code, TEXT_TYPE, text.encode("utf-8"))

    def _page(self, request: Any, content: Any, title: str = "RQ", scripts: tuple[str, ...] = (),
              code: int = 200, body_class: str = "") -> pages.Layout:
        request.setResponseCode(code)
        context = pages.Context(
            root=self.root,
            env=str(self.settings.env),
            title=title,
            flashes=self.flash.take(request, self.root),
            body_class=body_class,
            scripts=scripts,
        )
        return pages.Layout(context, content)

    def _http_error(self, request: Any, failure: Failure) -> Any:
        err = failure.value
        if err.kind == "json":
            return self._json(request, ["fail", err.body], err.code)
        if err.kind == "page":
            return self._page(request, pages.not_found_content(), code=err.code)
        return self._text(request, err.body, err.code)

    def _not_found(self, request: Any, failure: Failure) -> Any:
        return self._page(request, pages.not_found_content(), code=404)

    def _not_allowed(self, request: Any, failure: Failure) -> Any:
        return self._text(request, f"405 - Method {request.method.decode('ascii', 'replace')} not allowed", 405)

    def _location(self, request: Any, path: str) -> str:
        host = request.getHeader(b"host")
        if host:
            netloc = host.decode("latin-1")
        else:
            netloc = f"{self.settings.host}:{self.settings.port}"
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{netloc}{path}"

    def _redirect(self, request: Any, path: str) -> bytes:
        """
        303 to C{path} (absolute path), as an absolute URL from C{Host}.
        """
        request.setHeader(b"location", self._location(request, path).encode("utf-8"))
        return self._body(request, 303, TEXT_TYPE, b"")

    def _back(self, request: Any, default: str) -> str:
        """
        The C{back} field when it is a path on this site, else C{default}.
        """
        back = _arg(request, "back")
        if not back:
            return default
        parts = urlsplit(back)
        if parts.scheme or parts.netloc:
            host = (request.getHeader(b"host") or b"").decode("latin-1")
            if parts.scheme not in ("http", "https") or parts.netloc != host:
                return default
            back = parts.path + (f"?{parts.query}" if parts.query else "")
        if not back.startswith(self.root) or back.startswith("//") or "\\" in back:
            return default
        return back

    def _notify(self, request: Any, *parts: Any, kind: str = "notice") -> None:
        self.flash.add(request, self.root, notice(*parts, kind=kind))

    def _url(self, *segments: str) -> str:
        return pages.url(self.root, *segments)

    # -- queues

    def router_mode(self) -> bool:
        """
        Does C{config/rq_router_rules.rb} exist?
        """
        return os.path.exists(self.instance.root.join("config", "rq_router_rules.rb"))

    def _queue(self, name: str, kind: str = "page", routed: bool = False) -> Any:
        """
        The running queue C{name} (or C{rq_router} in router mode for
        routed routes): 404 when there is no such queue directory, 503 when
        the queue is not running.
        """
        if routed and name not in ROUTER_EXEMPT and self.router_mode():
            name = "rq_router"
        if not valid_queue_name(name) or not os.path.isdir(self.instance.root.queue_path(name)):
            raise HTTPError(404, "Queue not found", kind)
        queue = self.instance.queues.get(name)
        if queue is None or not queue.running:
            raise HTTPError(503, f"503 - queue {name} is not running" if kind != "json"
                            else f"queue {name} is not running", "json" if kind == "json" else "text")
        return queue

    def _message_state(self, queue: Any, msg_id: str, kind: str = "page") -> str:
        if not valid_msg_id(msg_id):
            raise HTTPError(404, "msg not found", kind)
        try:
            return str(queue.locate(msg_id))
        except MessageError as e:
            raise HTTPError(404, e.reason, kind)

    @staticmethod
    def _is_down(error: MessageError) -> bool:
        return error.reason == "status: DOWN"

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
        }

    # -- instance routes

    def home(self, request: Any) -> Any:
        """
        C{GET /}: the home page.
        """
        info = self.instance_info()
        content = pages.home_content(self.root, info, bool(self.settings.allow_new_queue), self.root)
        return self._page(request, content, scripts=("js/home.js",), body_class="home")

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
        name = _arg(request, "name") or ""
        query = _args_with_prefix(request, "query")
        exact = b"exact" in request.args or b"exact" in parse_qs(urlsplit(request.uri).query, keep_blank_values=True)
        search = getattr(self.instance, "search", None)
        if search is None:
            return self._json(request, ["fail", "search is not available in this version"], 501)
        if name:
            self._queue(name, "json")
        d = maybeDeferred(search, name or None, query, exact)

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

    def new_queue(self, request: Any) -> bytes:
        """
        C{POST /new_queue}: create a queue from the form; 303 to its page.
        """
        self._require_new_queue()
        form = _args_with_prefix(request, "queue")
        data: dict[str, Any] = {k: form.get(k, "") for k in ("name", "script", "num_workers", "exec_prefix")}
        for key in ("coalesce_params", "blocking_params"):
            values = request.args.get(f"queue[{key}][]".encode(), [])
            data[key] = [int(v) for v in values if v.strip().isdigit()]
        try:
            result = ["success", self.instance.create_queue(data)]
        except MessageError as e:
            result = ["fail", e.reason]
        self._notify(request, "We got ", ("code", json.dumps(data)), " from form, and ",
                     ("code", json.dumps(result)), " from QueueMgr",
                     kind="notice" if result[0] == "success" else "error")
        return self._redirect(request, self._url("q", str(data["name"])))

    def new_queue_link(self, request: Any) -> bytes:
        """
        C{POST /new_queue_link}: a queue whose C{config.json} is a symlink to
        a config file inside the root.
        """
        self._require_new_queue()
        path = _arg(request, "queue[json_path]") or ""
        root = os.path.realpath(self.instance.root.path)
        real = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, real]) != root or not os.path.isfile(real):
            raise HTTPError(404, "config file not found inside the root", "page")
        try:
            with open(real, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            raise HTTPError(404, "not valid JSON", "page")
        name = data.get("name") if isinstance(data, dict) else None
        create_link = getattr(self.instance, "create_queue_link", None)
        if create_link is None:
            return self._text(request, "501 - queue links are not available in this version", 501)
        try:
            result = ["success", create_link(real)]
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
        name = _arg(request, "queue_name") or ""
        try:
            result = ["success", (yield maybeDeferred(self.instance.delete_queue, name))]
        except MessageError as e:
            result = ["fail", e.reason]
        self._notify(request, "Delete of queue ", ("code", name), " got ", ("code", json.dumps(result)),
                     kind="notice" if result[0] == "success" else "error")
        return self._redirect(request, self.root)

    # -- queue routes

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
                page = max(1, int(_arg(request, f"{state}_page") or 1))
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
        return self._page(request, content, title=title, scripts=("js/queue.js",), body_class="queue")

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
            limit: int | None = int(_arg(request, "limit") or JSON_LIST_LIMIT)
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
            limit = max(0, int(_arg(request, "limit") or 10))
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
            except (OSError, ValueError):
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
            except ValueError:
                raise HTTPError(400, "invalid JSON body", "json")
        elif (_arg(request, "x_format") or "json") == "html":
            html = True
            data = _args_with_prefix(request, "mesg")
        else:
            text = _arg(request, "mesg")
            if text is None:
                raise HTTPError(400, "missing mesg field", "json")
            try:
                data = json.loads(text)
            except ValueError:
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
        if _arg(request, "back"):
            if result[0] == "ok":
                self._notify(request, f"Created message {result[1]}")
            else:
                self._notify(request, f"Error creating message: {result[1]}", kind="error")
            return self._redirect(request, self._back(request, self._url("q", name)))
        content = pages.new_message_result(self.root, name, result[0] == "ok",
                                           result[1] if result[0] == "ok" else f"{result[0]} - {result[1]}")
        return self._page(request, content, title=f"RQ :: {name}")

    def adminoper(self, request: Any, name: str) -> Any:
        """
        C{POST /q/<name>/adminoper}: pause, resume, down or up.
        """
        self._queue(name, "text")
        action = next((a for a in ADMIN_ACTIONS if a.encode() in request.args), None)
        if action is None:
            return self._text(request, "400 - Invalid admin action", 400)
        try:
            self.instance.set_admin(action, name)
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

    # -- message routes

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
            msg = queue.get(msg_id)
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
        method = _arg(request, "_method") or ""
        as_json = (_arg(request, "x_format") or "html") == "json"
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
        msg_page = self._url("q", queue.name, msg_id)
        if method == "run_now":
            if result[0] != "ok":
                return self._text(request, f"500 - Couldn't run message. {reply_text(*result)}.", 500)
            self._notify(request, "Message sent to the front of the run queue")
            return self._redirect(request, msg_page)
        if result[0] == "ok":
            texts = {"delete": "Message deleted successfully", "destroy": "Message destroyed successfully",
                     "commit": "Message committed successfully"}
            self._notify(request, texts[method])
            target = msg_page if method == "commit" else self._url("q", queue.name)
        else:
            self._notify(request, f"Couldn't {method} message: {result[1]}", kind="error")
            target = msg_page
        return self._redirect(request, target)

    @inlineCallbacks
    def clone(self, request: Any, name: str, msg_id: str) -> Any:
        """
        C{POST /q/<name>/<id>/clone} (R).
        """
        queue = self._queue(name, "page", routed=True)
        self._message_state(queue, msg_id)
        result = yield self._operate(request, queue, queue.clone, msg_id)
        if result[0] != "ok":
            return self._text(request, f"500 - Couldn't clone message. {reply_text(*result)}.", 500)
        self._notify(request, "Message cloned successfully")
        return self._redirect(request, self._url("q", queue.name))

    @inlineCallbacks
    def run_now(self, request: Any, name: str, msg_id: str) -> Any:
        """
        C{POST /q/<name>/<id>/run_now} (R).
        """
        queue = self._queue(name, "page", routed=True)
        self._message_state(queue, msg_id)
        result = yield self._operate(request, queue, queue.run_now, msg_id)
        if result[0] != "ok":
            return self._text(request, f"500 - Couldn't run message. {reply_text(*result)}.", 500)
        self._notify(request, "Message sent to the front of the run queue")
        return self._redirect(request, self._url("q", queue.name, msg_id))

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
        return file_resource(path)

    @inlineCallbacks
    def attachment_action(self, request: Any, name: str, msg_id: str, att: str) -> Any:
        """
        C{POST /q/<name>/<id>/attach/<att>} (R) with C{_method=delete}.
        """
        if att == "new":
            # Only reached when the upload module is not installed.
            return self._text(request, "501 - uploads are not available in this version", 501)
        method = _arg(request, "_method") or ""
        as_json = (_arg(request, "x_format") or "html") == "json"
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
        return file_resource(path, text=True)

    def _tail(self, request: Any, queue: Any, msg_id: str, path: str, state: str, label: str,
              log_url: str) -> Any:
        text = ""
        offset = top = bottom = total = 0
        if os.path.isfile(path):
            data, start, size, newlines = tail_bytes(path, TAIL_BYTES)
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


def make_site(instance: Any, config: Any = None, reactor: Any = None) -> Site:
    """
    The L{Site} of the web interface of C{instance}.

    When L{rqtwisted.web.upload} is installed, its C{mount_uploads(app, web)}
    adds the upload routes and may return a request factory (the streaming
    upload request), which the site then uses.

    @param config: the settings the server starts with (unused: the routes
        read C{instance.settings} on each request).
    """
    web = RQWeb(instance, reactor)
    site = RQSite(web.resource())
    site.displayTracebacks = False
    try:
        from rqtwisted.web import upload
    except ImportError:
        upload = None  # type: ignore[assignment]
    mount = getattr(upload, "mount_uploads", None)
    if mount is not None:
        factory = mount(web.app, web)
        if factory is not None:
            site.requestFactory = factory
    site.rqweb = web  # type: ignore[attr-defined]
    return site


__all__ = ["RQWeb", "RootResource", "HTTPError", "make_site", "normalize_segments"]
