"""
The small vocabulary the web routes answer with: JSON and text bodies, the
L{HTTPError} a handler raises to answer early, and form field access.
"""

from __future__ import annotations

import json
from typing import Any

JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain;charset=utf-8"
#: Content type of the HTML pages (http.md, Types).
HTML_TYPE = b"text/html;charset=utf-8"


def dumps(value: Any) -> bytes:
    """
    Compact JSON, as the original's C{to_json}.
    """
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def whole_answer(request: Any, code: int, content_type: bytes, body: bytes) -> bytes:
    """
    C{body} as a whole answer: status C{code}, its type and its length set
    (no chunked encoding, as every answer of the web interface).
    """
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


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


def form_arg(request: Any, key: str, errors: str = "replace") -> str | None:
    """
    The first value of form or query field C{key}, decoded (C{None} when
    absent).

    @param errors: how bytes that are not UTF-8 are decoded; C{"strict"}
        raises C{UnicodeDecodeError} (what is stored must be what was sent).
    """
    values = request.args.get(key.encode("utf-8"))
    if not values:
        return None
    value = values[0]
    return value.decode("utf-8", errors) if isinstance(value, bytes) else str(value)


def form_fields(request: Any, prefix: str, errors: str = "replace") -> dict[str, str]:
    """
    C{{inner: value}} for form fields C{<prefix>[inner]}.

    @param errors: as for L{form_arg}.
    """
    out: dict[str, str] = {}
    raw = prefix.encode("utf-8") + b"["
    for key, values in request.args.items():
        if key.startswith(raw) and key.endswith(b"]") and values:
            inner = key[len(raw) : -1].decode("utf-8", errors)
            value = values[0]
            out[inner] = value.decode("utf-8", errors) if isinstance(value, bytes) else str(value)
    return out
