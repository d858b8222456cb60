"""
One-shot flash notices in a signed cookie.

A POST that redirects (303) puts its notice in the C{rq_flash} cookie; the next
HTML page rendered (the redirect target, or a Not Found page) shows it and
expires the cookie. The cookie holds JSON signed with HMAC-SHA256 under a key
made at start-up, so a client cannot forge markup into the page, and notices
do not survive a daemon restart (they are one-shot anyway). No state is kept
on the server.

A notice is C{{"kind": "notice" | "error", "parts": [...]}}; each part is a
string or C{["code", text]}, rendered as C{<code>text</code>}: the markup is
built by the page, never taken from the cookie.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from typing import Any

COOKIE = b"rq_flash"

#: Browsers drop cookies over 4 KiB; longer notices are cut.
MAX_TEXT = 1500


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def notice(*parts: Any, kind: str = "notice") -> dict[str, Any]:
    """
    A notice from text parts (strings, or C{("code", text)} pairs).
    """
    out: list[Any] = []
    for part in parts:
        if isinstance(part, (tuple, list)):
            out.append(["code", str(part[1])[:MAX_TEXT]])
        else:
            out.append(str(part)[:MAX_TEXT])
    return {"kind": "error" if kind == "error" else "notice", "parts": out}


class FlashSigner:
    """
    Signs and checks flash cookies.
    """

    def __init__(self, key: bytes | None = None) -> None:
        """
        @param key: the HMAC key (default: random, made once per process).
        """
        self.key = key or os.urandom(32)

    def _mac(self, payload: bytes) -> bytes:
        return _b64(hmac.new(self.key, payload, hashlib.sha256).digest())

    def dumps(self, notices: list[dict[str, Any]]) -> bytes:
        """
        The cookie value for C{notices}.
        """
        payload = _b64(json.dumps(notices, separators=(",", ":")).encode("utf-8"))
        return payload + b"." + self._mac(payload)

    def loads(self, value: bytes | None) -> list[dict[str, Any]]:
        """
        The notices in a cookie value; C{[]} when absent, forged or garbled.
        """
        if not value or b"." not in value:
            return []
        payload, _, mac = value.rpartition(b".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return []
        try:
            data = json.loads(_unb64(payload))
        except (binascii.Error, ValueError):
            return []
        if not isinstance(data, list):
            return []
        return [n for n in data if isinstance(n, dict) and isinstance(n.get("parts"), list)]

    def add(self, request: Any, path: str, item: dict[str, Any]) -> None:
        """
        Queue a notice for the next page (keeps notices not shown yet).
        """
        pending = getattr(request, "_rq_flash_out", None)
        if pending is None:
            pending = self.loads(request.getCookie(COOKIE))
            request._rq_flash_out = pending
        pending.append(item)
        request.addCookie(COOKIE, self.dumps(pending[-5:]), path=path, httpOnly=True, sameSite="lax")

    def take(self, request: Any, path: str) -> list[dict[str, Any]]:
        """
        The pending notices of a request; expires the cookie if it had any.
        """
        value = request.getCookie(COOKIE)
        if not value:
            return []
        request.addCookie(
            COOKIE, b"", path=path, expires="Thu, 01 Jan 1970 00:00:00 GMT", max_age="0", httpOnly=True, sameSite="lax"
        )
        return self.loads(value)
