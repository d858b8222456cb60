"""
Who may use the web interface: C{allowed_ips} and C{basic_auth} from
C{config/config.json}, checked before any route or static file.

L{check_access} is a pure function of the settings and the request's client
address and C{Authorization} header, so the upload request factory can call
it as soon as the headers arrive (before spooling a body nobody may send).

Passwords in C{basic_auth.users} may be plain text (as in the original) or
C{sha256:<hex digest>} of the password, so a config file need not hold
plain passwords (quirks 27).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Denied:
    """
    A refusal: the HTTP status, the body and extra headers.
    """

    code: int
    body: str
    headers: tuple[tuple[str, str], ...] = ()


def password_matches(stored: Any, given: str) -> bool:
    """
    Does C{given} match the configured password C{stored} (plain text, or
    C{sha256:<hex>})? Compared in constant time.
    """
    if not isinstance(stored, str):
        return False
    if stored.startswith("sha256:"):
        digest = hashlib.sha256(given.encode("utf-8")).hexdigest()
        return hmac.compare_digest(stored[7:].lower().encode(), digest.encode())
    return hmac.compare_digest(stored.encode("utf-8"), given.encode("utf-8"))


def parse_basic(header: bytes | None) -> tuple[str, str] | None:
    """
    C{(user, password)} from an C{Authorization: Basic ...} header.
    """
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def check_access(
    allowed_ips: tuple[str, ...] | list[str],
    basic_auth: Mapping[str, Any] | None,
    client_ip: str,
    authorization: bytes | None,
) -> Denied | None:
    """
    C{None} when the request may go on, else the refusal: 403 when
    C{allowed_ips} is non-empty and no entry is a substring of the client's
    address; 401 with C{WWW-Authenticate} when C{basic_auth} is set and the
    credentials are missing or wrong.
    """
    if allowed_ips and not any(ip and ip in client_ip for ip in allowed_ips):
        return Denied(403, "403 - Forbidden")
    if basic_auth:
        realm = str(basic_auth.get("realm") or "RQ")
        users = basic_auth.get("users") or {}
        creds = parse_basic(authorization)
        ok = (
            creds is not None
            and isinstance(users, Mapping)
            and creds[0] in users
            and password_matches(users[creds[0]], creds[1])
        )
        if not ok:
            quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
            return Denied(
                401,
                "401 - Unauthorized",
                (("WWW-Authenticate", f'Basic realm="{quoted}"'),),
            )
    return None


def check_request(settings: Any, request: Any) -> Denied | None:
    """
    L{check_access} for a request under the instance's C{settings} (their
    C{allowed_ips} and C{basic_auth}).
    """
    return check_access(
        settings.allowed_ips,
        settings.basic_auth,
        client_ip(request),
        request.getHeader(b"authorization"),
    )


def client_ip(request: Any) -> str:
    """
    The client's address as text (C{""} for non-IP transports).
    """
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "") or "")
