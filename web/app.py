"""
The web interface: every route of spec/http.md on a klein app, served by the
daemon.

L{RQWeb} holds the klein app, the route table and what every handler
shares (answers, redirects, flash notices, finding a queue). The handlers
live in three modules, one per part of spec/http.md:
L{rqtwisted.web.instance_routes}, L{rqtwisted.web.queue_routes} and
L{rqtwisted.web.message_routes}; each calls the one in-process API
(L{rqtwisted.supervisor.Instance} and its queue services) and shapes the
answer: JSON, text, a file, a redirect, or a page from
L{rqtwisted.web.pages}. L{rqtwisted.web.site.RootResource} sits in front
of klein (paths, access control, C{relative_root}, static files).
L{make_site} builds the L{Site}, with the upload routes
(L{rqtwisted.web.upload_routes}) and their streaming request factory.

Conventions:
  - Settings are read from C{instance.settings} on every request, so
    C{rq restart} applies a changed C{config.json} to the web as well.
  - Failures of a JSON route are JSON (C{["fail", reason]}); 404s of page
    routes are the HTML Not Found page (with pending flash notices).
  - A POST whose multipart body cannot be parsed is answered 400 with the
    reason by its route (L{RQWeb._form_checked}).
  - A queue whose directory exists but which is not running answers 503
    (quirks 23); a DOWN queue refuses writes with 503 and serves reads
    (quirks 26).
  - Flash notices travel in a signed cookie (L{rqtwisted.web.flash}).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.template import flattenString
from werkzeug.exceptions import MethodNotAllowed, NotFound

from rqtwisted.message import MessageError, valid_msg_id, valid_queue_name
from rqtwisted.router import routed_queue
from rqtwisted.web import pages
from rqtwisted.web.answers import (
    HTML_TYPE,
    JSON_TYPE,
    TEXT_TYPE,
    HTTPError,
    dumps,
    form_arg,
    form_fields,
    reply_text,
    whole_answer,
)
from rqtwisted.web.files import file_resource
from rqtwisted.web.flash import FlashSigner, notice
from rqtwisted.web.instance_routes import InstanceRoutes
from rqtwisted.web.message_routes import MessageRoutes
from rqtwisted.web.queue_routes import QueueRoutes
from rqtwisted.web.site import RootResource, RQSite, normalize_segments
from rqtwisted.web.upload_routes import mount_uploads

#: A C{Host} header used for redirects: a name or address, and a port.
_HOST = re.compile(r"[A-Za-z0-9._\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")

#: Characters kept as they are in a redirect's path and query.
_URL_SAFE = "/?&=%#:@!$'()*+,;~-._"

#: POST routes that answer in JSON unless asked for HTML (http.md).
_JSON_BY_DEFAULT = frozenset({"new_message"})

#: The static assets shipped with the package.
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class RQWeb(InstanceRoutes, QueueRoutes, MessageRoutes):
    """
    The web face of one running instance: the route table and what every
    handler shares; the handlers come from L{InstanceRoutes},
    L{QueueRoutes} and L{MessageRoutes}.

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
            endpoint = handler.__name__ + ":" + ",".join(methods)
            if "POST" in methods:
                handler = self._form_checked(handler, json_default=handler.__name__ in _JSON_BY_DEFAULT)
            route(path, methods=list(methods), endpoint=endpoint)(handler)
        self.app.handle_errors(HTTPError)(self._http_error)
        self.app.handle_errors(NotFound)(self._not_found)
        self.app.handle_errors(MethodNotAllowed)(self._not_allowed)

    @staticmethod
    def _form_checked(handler: Callable[..., Any], json_default: bool) -> Callable[..., Any]:
        """
        C{handler}, answering 400 with the reason instead when the request's
        form body could not be parsed (C{request.form_error}, set by
        L{rqtwisted.web.upload_request.UploadRequest}): C{["fail", reason]}
        when the request asks for JSON (C{x_format=json} in the query, or
        none and C{json_default}), else the text C{400 - <Reason>} of the
        page routes.
        """

        def checked(request: Any, **kwargs: Any) -> Any:
            reason = getattr(request, "form_error", None)
            if reason is None:
                return handler(request, **kwargs)
            x_format = form_arg(request, "x_format")
            if x_format == "json" or (x_format is None and json_default):
                raise HTTPError(400, reason, "json")
            raise HTTPError(400, f"400 - {reason[:1].upper()}{reason[1:]}", "text")

        checked.__name__ = handler.__name__
        checked.__doc__ = handler.__doc__
        return checked

    def static_file(self, segments: list[bytes]) -> Resource | None:
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

    #: A whole answer, with its length (no chunked encoding).
    _body = staticmethod(whole_answer)

    def _json(self, request: Any, value: Any, code: int = 200) -> bytes:
        return self._body(request, code, JSON_TYPE, dumps(value))

    def _text(self, request: Any, text: str, code: int = 200) -> bytes:
        return self._body(request, code, TEXT_TYPE, text.encode("utf-8"))

    def _page(self, request: Any, content: Any, title: str = "RQ", scripts: tuple[str, ...] = (),
              code: int = 200, body_class: str = "") -> pages.Layout:
        request.setResponseCode(code)
        request.setHeader(b"content-type", HTML_TYPE)
        context = pages.Context(
            root=self.root,
            env=str(self.settings.env),
            title=title,
            flashes=self.flash.take(request, self.root),
            body_class=body_class,
            scripts=scripts,
        )
        return pages.Layout(context, content)

    def _page_bytes(self, request: Any, content: Any, title: str = "RQ", code: int = 200) -> Deferred[bytes]:
        """
        The page L{_page} makes, flattened: for an answer whose markup is
        finished by hand after the template (L{pages.with_result_link}).
        """
        layout = self._page(request, content, title=title, code=code)
        return flattenString(request, layout).addCallback(lambda page: b"<!DOCTYPE html>\n" + page)

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
        """
        The absolute URL of C{path} on this site, from the request's C{Host}
        (the configured host and port when it is missing or not a host name);
        characters a URL cannot hold are percent-encoded.
        """
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if not _HOST.fullmatch(host):
            host = f"{self.settings.host}:{self.settings.port}"
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{host}{quote(path, safe=_URL_SAFE)}"

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
        back = form_arg(request, "back")
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

    def _queue(self, name: str, kind: str = "page", routed: bool = False) -> Any:
        """
        The running queue C{name} (or C{rq_router} in router mode for
        routed routes): 404 when there is no such queue directory, 503 when
        the queue is not running.
        """
        if routed:
            name = routed_queue(self.instance.root.path, name)
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


def make_site(instance: Any, config: Any = None, reactor: Any = None) -> Site:
    """
    The L{Site} of the web interface of C{instance}: the routes of
    L{RQWeb}, the upload routes (L{rqtwisted.web.upload_routes}) and the
    request factory that streams upload bodies to disk.

    @param config: the settings the server starts with (unused: the routes
        read C{instance.settings} on each request).
    """
    web = RQWeb(instance, reactor)
    site = RQSite(web.resource())
    site.displayTracebacks = False
    site.requestFactory = mount_uploads(web.app, web)
    site.rqweb = web  # type: ignore[attr-defined]
    return site


__all__ = ["RQWeb", "RootResource", "HTTPError", "make_site", "normalize_segments", "dumps", "reply_text",
           "form_arg", "form_fields", "HTML_TYPE", "JSON_TYPE", "TEXT_TYPE"]
