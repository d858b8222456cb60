"""
The front of the web interface: the resource a L{Site} serves.

L{RootResource} resolves the request path (repeated C{/}, C{.} and C{..},
absolute-URI request lines), checks C{allowed_ips} and C{basic_auth}
(L{rqtwisted.web.security}) on every request, answers paths outside
C{relative_root} with 404 C{Not Found: <path>}, serves the static assets and
hands everything else to the klein routes with C{relative_root} as the
script path (bytes of the path that are not UTF-8 in their percent form:
L{percent_undecodable}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import unquote_to_bytes

from twisted.web import resource
from twisted.web.server import Site

from rqtwisted.web.security import check_request

if TYPE_CHECKING:
    from rqtwisted.web.app import RQWeb

TEXT_TYPE = b"text/plain;charset=utf-8"


def normalize_segments(segments: Iterable[bytes]) -> list[bytes] | None:
    """
    Path segments with empty ones and C{.} dropped and C{..} applied;
    C{None} when a (decoded) segment holds a C{/}.
    """
    out: list[bytes] = []
    for seg in segments:
        if seg in (b"", b"."):
            continue
        if seg == b"..":
            if out:
                out.pop()
            continue
        if b"/" in seg or b"\0" in seg:
            return None
        out.append(seg)
    return out


def percent_undecodable(segment: bytes) -> bytes:
    """
    C{segment} with each byte that is not part of UTF-8 text replaced by its
    percent form (C{b"\\xff"} becomes C{b"%FF"}); UTF-8 text is unchanged.

    The routes match text, and klein answers a path that is not UTF-8 with
    its own plain 400 and a logged traceback. Such a segment names nothing
    here: C{%} is in no queue name, message id or attachment name (layout.md,
    message.md). In its percent form it reaches its route as the name of
    nothing, and the route answers as it answers any name it does not have
    (404; C{["fail", reason]} on the JSON routes).
    """
    text = segment.decode("utf-8", "surrogateescape")
    return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in text).encode("utf-8")


class RootResource(resource.Resource):
    """
    The resource the L{Site} serves: paths, access control, C{relative_root},
    static files, then the klein routes.
    """

    isLeaf = True

    def __init__(self, web: "RQWeb") -> None:
        super().__init__()
        self.web = web

    def render(self, request: Any) -> Any:
        """
        Route one request.
        """
        settings = self.web.instance.settings
        denied = check_request(settings, request)
        if denied is not None:
            request.setResponseCode(denied.code)
            for name, value in denied.headers:
                request.setHeader(name, value)
            request.setHeader(b"content-type", TEXT_TYPE)
            return denied.body.encode("utf-8")
        raw = request.postpath
        if request.path[:8].lower().startswith((b"http://", b"https://")):
            # An absolute-URI request line: keep only its path.
            path = request.path.split(b"://", 1)[1].partition(b"/")[2]
            raw = [unquote_to_bytes(s) for s in path.split(b"/")]
        segments = normalize_segments(raw)
        prefix = [s.encode("utf-8") for s in settings.relative_root.split("/") if s]
        if segments is None or segments[: len(prefix)] != prefix:
            request.setResponseCode(404)
            request.setHeader(b"content-type", TEXT_TYPE)
            return b"Not Found: " + request.path
        rest = segments[len(prefix) :]
        static = self.web.static_file(rest)
        if static is not None:
            request.prepath = list(segments)
            request.postpath = []
            return static.render(request)
        request.prepath = prefix
        request.postpath = [percent_undecodable(s) for s in rest] or [b""]
        return self.web.klein_resource.render(request)


class RQSite(Site):
    """
    The daemon's web site; requests are not logged one by one (the daemon
    log records what changes, not who asked).
    """

    def log(self, request: Any) -> None:
        """
        No access log.
        """
