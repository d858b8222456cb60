"""
Helpers for the web route tests: a started instance on a temporary root and a
synchronous client over L{treq.testing.StubTreq} against the web resource.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from treq.testing import StubTreq

from rqtwisted.root import RootConfig
from rqtwisted.testing import instance_for
from rqtwisted.web.app import RQWeb

BASE = "http://testhost:3333"


@dataclass
class Reply:
    """
    One answer: status, headers (lower-case names, first value), body.
    """

    code: int
    headers: dict[str, str]
    all_headers: dict[str, list[str]]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def location_path(self) -> str:
        parts = urlsplit(self.headers["location"])
        return parts.path + (f"?{parts.query}" if parts.query else "")


@dataclass
class Client:
    """
    Requests against a resource, keeping the C{rq_flash} cookie like a
    browser.
    """

    web: RQWeb
    cookies: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stub = StubTreq(self.web.resource())

    def request(self, method: str, path: str, keep_cookies: bool = True, **kwargs: Any) -> Reply:
        kwargs.setdefault("allow_redirects", False)
        if self.cookies and "cookies" not in kwargs:
            kwargs["cookies"] = dict(self.cookies)
        out: list[Any] = []
        d = self.stub.request(method, BASE + path, **kwargs)

        def read(response: Any) -> Any:
            def got(body: bytes) -> None:
                raw = {k.decode().lower(): [v.decode("latin-1") for v in vs]
                       for k, vs in response.headers.getAllRawHeaders()}
                out.append(Reply(response.code, {k: v[0] for k, v in raw.items()}, raw, body))

            return response.content().addCallback(got)

        d.addCallback(read)
        d.addErrback(out.append)
        for _ in range(1000):
            self.stub.flush()
            if out:
                break
        assert out, f"no answer to {method} {path}"
        if not isinstance(out[0], Reply):
            out[0].raiseException()
        reply = out[0]
        if keep_cookies:
            for header in reply.all_headers.get("set-cookie", []):
                match = re.match(r"([^=]+)=([^;]*)", header)
                if match:
                    name, value = match.groups()
                    if value:
                        self.cookies[name] = value
                    else:
                        self.cookies.pop(name, None)
        return reply

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Reply:
        return self.request("POST", path, **kwargs)


def result(d: Any) -> Any:
    """
    The result of a Deferred that has fired.
    """
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def make_env(path: str, **settings: Any) -> tuple[Any, Any, Any, Client]:
    """
    A started instance with a queue C{test} (script never really runs),
    its fake spawner and clock, and a client.
    """
    instance, spawner, clock = instance_for(path)
    instance.create_queue({"name": "test", "script": "./code/noop", "exec_prefix": ""})
    if settings:
        set_settings(instance, **settings)
    instance.startService()
    web = RQWeb(instance, None, flash_key=b"k" * 32)
    return instance, spawner, clock, Client(web)


def set_settings(instance: Any, **changes: Any) -> None:
    """
    Replace the instance configuration with C{changes} applied.
    """
    instance.settings = RootConfig.fromDict({**instance.settings.raw, **changes})
