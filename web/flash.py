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

Browsers drop a cookie longer than 4 KiB, and the notices in it with it. So
the cookie is kept within L{MAX_COOKIE}: the longest texts of the pending
notices are cut, ending with L{CUT_MARK}, until it fits (the oldest notices go
only when their texts cannot be cut shorter).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import json
import os
from typing import Any

COOKIE = b"rq_flash"

#: The longest text part of a notice, in characters; longer ones are cut.
MAX_TEXT = 1500

#: The most bytes of a cookie (name, value and attributes) browsers keep
#: (RFC 6265, 6.1); a longer one is dropped.
MAX_COOKIE = 4096

#: Notices a cookie holds: the newest ones.
MAX_NOTICES = 5

#: The end of a text that was cut.
CUT_MARK = "\u2026 [truncated]"

#: Texts are not cut shorter than this (characters, before the mark).
MIN_TEXT = 40


def _cut(text: str, keep: int) -> str:
    """
    The first C{keep} characters of C{text} and L{CUT_MARK}, or C{text}
    when it is not longer than C{keep}.
    """
    return text if len(text) <= keep else text[:keep] + CUT_MARK


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
            out.append(["code", _cut(str(part[1]), MAX_TEXT)])
        else:
            out.append(_cut(str(part), MAX_TEXT))
    return {"kind": "error" if kind == "error" else "notice", "parts": out}


def _longest_text(notices: list[dict[str, Any]]) -> tuple[list[Any], int] | None:
    """
    Where the longest text of C{notices} is: C{(holder, index)} with
    C{holder[index]} the text (a plain part, or the text of a code part).
    """
    best: tuple[list[Any], int] | None = None
    longest = -1
    for item in notices:
        for i, part in enumerate(item["parts"]):
            holder, index = (part, 1) if isinstance(part, list) and len(part) == 2 else (item["parts"], i)
            text = holder[index]
            if isinstance(text, str) and len(text) > longest:
                best, longest = (holder, index), len(text)
    return best


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
        payload = _b64(json.dumps(notices, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        return payload + b"." + self._mac(payload)

    def fitted(self, notices: list[dict[str, Any]], room: int) -> bytes:
        """
        The cookie value for the newest L{MAX_NOTICES} of C{notices} in at
        most C{room} bytes: the longest text is cut (to L{CUT_MARK}) until the
        value fits; when no text can be cut shorter than L{MIN_TEXT}, the
        oldest notice goes. C{notices} is left as it is.
        """
        kept = copy.deepcopy(notices[-MAX_NOTICES:])
        while True:
            value = self.dumps(kept)
            over = len(value) - room
            if over <= 0 or not kept:
                return value
            where = _longest_text(kept)
            if where is None or len(where[0][where[1]]) <= MIN_TEXT + len(CUT_MARK):
                del kept[0]
                continue
            holder, index = where
            text = holder[index]
            # Base64 makes 4 bytes of 3, and a character is one byte of JSON
            # at least: cutting this many characters is about enough.
            keep = max(MIN_TEXT, len(text) - len(CUT_MARK) - (over * 3 // 4 + 1))
            holder[index] = text[:keep] + CUT_MARK

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
        attributes = f"{COOKIE.decode()}=; Path={path}; HttpOnly; SameSite=lax"
        value = self.fitted(pending, MAX_COOKIE - len(attributes.encode("utf-8")))
        request.addCookie(COOKIE, value, path=path, httpOnly=True, sameSite="lax")

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
