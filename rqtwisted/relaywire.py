"""
The relay's wire protocol as pure code: what is sent and what an answer
means, with no I/O (relay.md, byte-compatible with original RQ hosts).

Each step of an exchange has a function building its request
(L{prep_request}, L{commit_request}, L{message_request}) and one judging the peer's answer
from its status code and body (L{parse_prep}, L{check_attached},
L{expect_ok}, L{parse_state}, L{parse_attached}, L{parse_held},
L{probe_refused}): a failed step raises L{SoftFailure} (retry later),
L{RemoteLost} (the remote forgot the prepared message: prepare a new one)
or L{PermanentRefusal} (no retry can change it: err at once). The decisions that
do not depend on a peer (L{backoff}, L{loop_detected}, L{same_host}) and the
tunables (L{RelayConfig}) live here too.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlencode

from twisted.web.http_headers import Headers

from rqtwisted.message import PARAM_KEYS, MessageError, count_of, split_full_id

#: Keys of the local message sent with the prep request (relay.md, exact).
PREP_KEYS = (
    "dest",
    "src",
    "count",
    "max_count",
    *PARAM_KEYS,
    "post_run_webhook",
    "orig_msg_id",
)

#: The relay's give-up rule (relay.md step 1).
MAX_RELAY_COUNT = 15

#: The status of a message sent back to the queue it came from.
LOOP_REASON = "Relay loop detected: RQ_DEST queue same as RQ_ORIG_MSG_ID"

#: The remote's answer when it does not know a message (any more).
CANNOT_FIND = "cannot find message"

#: HTTP codes of refusals that cannot change by themselves, whoever sends
#: them: 413, the request (an upload, a prep form) is larger than the peer
#: takes (C{max_upload_size}). Others are not in it: a 400 may come from a
#: sender's bug that an upgrade fixes, 401/403/404 from settings or a queue
#: about to be made, 409/503 pass, and 5xx come from anything in between.
PERMANENT_CODES = frozenset({413})

#: Codes of an answer to the resumable-upload probe (C{PUT}), its body not
#: JSON, that show a peer without resumable uploads: an original RQ host
#: answers a C{PUT} with its own 500 page (or 404); 405 and 501 are how
#: other servers say they take no C{PUT}. Not the 502, 503 and 504 of a
#: reverse proxy whose peer is restarting.
NO_PUT_CODES = frozenset({404, 405, 500, 501})


# -- errors


class SoftFailure(Exception):
    """
    An attempt failed; the message is retried later. C{reason} becomes its
    status text.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unreachable(SoftFailure):
    """
    The connection to the peer timed out: nothing was sent, and the
    attempt cost the whole connect timeout.
    """


class PermanentRefusal(SoftFailure):
    """
    The peer refused in a way no retry can change (an answer with a code of
    L{PERMANENT_CODES}): the message ends in err at once, with the reason.
    A L{SoftFailure} as far as each step is concerned; only the handler
    (L{rqtwisted.relay.Relayer.handle}) tells it apart.
    """


class RemoteLost(SoftFailure):
    """
    The remote does not know the prepared message (any more): the next
    attempt prepares a new one.
    """


# -- settings


@dataclass(frozen=True)
class RelayConfig:
    """
    Tunables of the relay (C{config.json} key C{relay}).

    An upload that moves fewer than C{min_upload_rate} bytes a second,
    averaged over each C{upload_rate_window} seconds from its first byte,
    fails (a peer reading very slowly would hold the relay's one worker);
    either being 0 turns this off.
    """

    retry_base: float = 10.0
    retry_cap: float = 600.0
    connect_timeout: float = 10.0
    idle_timeout: float = 120.0
    resumable_min: int = 1024 * 1024
    min_upload_rate: float = 1024.0
    upload_rate_window: float = 60.0

    @classmethod
    def fromSettings(cls, raw: Mapping[str, Any]) -> "RelayConfig":
        """
        Read the C{relay} object of C{config.json}, ignoring bad values.
        """
        data = raw.get("relay") if isinstance(raw, Mapping) else None
        if not isinstance(data, dict):
            return cls()
        values: dict[str, Any] = {}
        for name, kind in (
            ("retry_base", float),
            ("retry_cap", float),
            ("connect_timeout", float),
            ("idle_timeout", float),
            ("resumable_min", int),
            ("min_upload_rate", float),
            ("upload_rate_window", float),
        ):
            if name in data:
                try:
                    value = kind(data[name])
                except (TypeError, ValueError):
                    continue
                if value >= 0:
                    values[name] = value
        return cls(**values)


# -- the protocol steps, as pure functions


def backoff(count: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> int:
    """
    Seconds before retry number C{count + 1}: C{base * 2**count}, capped at
    C{cap}, then scaled by a random factor in [0.5, 1) (jitter). At least 1.
    """
    exponent = min(max(count, 0), 30)
    delay = min(cap, base * (2**exponent))
    return max(1, int(delay * (0.5 + rand() / 2)))


def loop_detected(msg: Mapping[str, Any]) -> bool:
    """
    Does the message come from the queue it is sent to (C{orig_msg_id}
    starts with C{dest})?
    """
    orig = msg.get("orig_msg_id") or ""
    dest = msg.get("dest") or ""
    return bool(dest) and isinstance(orig, str) and orig.startswith(dest)


def prep_fields(msg: Mapping[str, Any]) -> dict[str, Any]:
    """
    The message object of the prep request: the present L{PREP_KEYS}, with
    C{count + 1} and C{_method=prep} (C{force_remote} is not forwarded).
    """
    out = {k: msg[k] for k in PREP_KEYS if k in msg}
    out["count"] = count_of(msg, "count", 0) + 1
    out["_method"] = "prep"
    return out


def new_message_url(dest: str) -> str:
    """
    C{<dest without trailing />/new_message}.
    """
    return dest.rstrip("/") + "/new_message"


def form_body(fields: list[tuple[str, str]]) -> bytes:
    """
    An C{application/x-www-form-urlencoded} body.
    """
    return urlencode(fields).encode("ascii")


def prep_request(msg: Mapping[str, Any]) -> tuple[str, bytes]:
    """
    The URL and form body of the prep request.
    """
    mesg = json.dumps(prep_fields(msg), separators=(",", ":"))
    return new_message_url(msg["dest"]), form_body([("x_format", "json"), ("mesg", mesg)])


def message_request(remote_id: str, method: str) -> tuple[str, bytes]:
    """
    The URL and form body of an operation on a remote message
    (C{_method} = C{method}: C{commit}, C{delete}).
    """
    short = remote_id.rstrip("/").rsplit("/", 1)[-1]
    return remote_id, form_body([("msg_id", short), ("_method", method), ("x_format", "json")])


def commit_request(remote_id: str) -> tuple[str, bytes]:
    """
    The URL and form body of the commit request.
    """
    return message_request(remote_id, "commit")


def fail_reason(body: bytes) -> str | None:
    """
    The reason of a C{["fail", reason]} body, or L{None} when the body is
    not one.
    """
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(value, list) and len(value) >= 2 and value[0] == "fail" and isinstance(value[1], str):
        return value[1][:200]
    return None


def refusal(code: int, reason: str) -> SoftFailure:
    """
    The failure an answer with the error code C{code} means:
    L{PermanentRefusal} for a code of L{PERMANENT_CODES}, else a
    L{SoftFailure}; C{reason} is its text.
    """
    if code in PERMANENT_CODES:
        return PermanentRefusal(reason)
    return SoftFailure(reason)


def probe_refused(code: int, body: bytes, name: str) -> bool:
    """
    Judge an answer other than 200 or 308 to the resumable-upload probe of
    the attachment C{name}: L{True} when it shows a peer without resumable
    uploads (a body that is not JSON, with a code of L{NO_PUT_CODES}), to
    be sent the multipart upload and remembered as such.

    @raise RemoteLost: C{["fail","cannot find message"]}.
    @raise PermanentRefusal: another JSON refusal with a code of
        L{PERMANENT_CODES}.
    @raise SoftFailure: any other JSON refusal (an rqtwisted host: busy,
        DOWN...), or a body that is not JSON with another code (a reverse
        proxy's 502 page while the peer restarts): retried, with resumable
        uploads.
    """
    reason = fail_reason(body)
    if reason is None:
        if code in NO_PUT_CODES:
            return True
        raise SoftFailure(f"attach {name} failed - HTTP {code}")
    if reason == CANNOT_FIND:
        raise RemoteLost(f"attach {name} failed - {reason}")
    raise refusal(code, f"attach {name} failed - HTTP {code} {reason}")


def parse_answer(code: int, body: bytes, step: str) -> tuple[str, str]:
    """
    An RQ JSON answer C{["ok"|"fail", text]}.

    @raise RemoteLost: not 200, C{["fail","cannot find message"]}.
    @raise PermanentRefusal: a code of L{PERMANENT_CODES}.
    @raise SoftFailure: another code than 200, or not such a pair.
    """
    if code != 200:
        reason = fail_reason(body)
        if reason == CANNOT_FIND:
            raise RemoteLost(f"{step} failed - {reason}")
        raise refusal(code, f"{step} failed - HTTP {code}" + (f" {reason}" if reason else ""))
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SoftFailure(f"{step} failed - garbage answer")
    if (
        not isinstance(value, list)
        or len(value) < 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], str)
    ):
        raise SoftFailure(f"{step} failed - garbage answer")
    return value[0], value[1]


def expect_ok(code: int, body: bytes, step: str) -> str:
    """
    The text of an C{["ok", text]} answer.

    @raise RemoteLost: C{["fail","cannot find message"]}.
    @raise SoftFailure: anything else.
    """
    status, text = parse_answer(code, body, step)
    if status != "ok":
        if text == CANNOT_FIND:
            raise RemoteLost(f"{step} failed - {text}")
        raise SoftFailure(f"{step} failed - {text}")
    return text


def parse_prep(code: int, body: bytes, dest: str) -> str:
    """
    The remote full id from a prep answer; it must name a message of the
    queue C{dest} names.
    """
    remote_id = expect_ok(code, body, "prep")
    try:
        queue, short = split_full_id(remote_id)
    except MessageError:
        raise SoftFailure("prep failed - garbage answer")
    if not remote_id.startswith("http") or "/" in short or not short:
        raise SoftFailure("prep failed - garbage answer")
    return remote_id


def check_attached(code: int, body: bytes, md5: str, name: str) -> None:
    """
    An attach answer must be C{["ok","<md5>-Attached successfully"]} with
    the local md5.
    """
    text = expect_ok(code, body, f"attach {name}")
    if text != f"{md5}-Attached successfully":
        raise SoftFailure(f"attach {name} failed - md5 mismatch ({text[:80]})")


def parse_state(code: int, body: bytes) -> str | None:
    """
    A remote message's state from C{state.json} (C{["que"]}), or L{None}
    when the remote does not know it (404).
    """
    if code == 404:
        return None
    if code != 200:
        raise SoftFailure(f"state failed - HTTP {code}")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SoftFailure("state failed - garbage answer")
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    raise SoftFailure("state failed - garbage answer")


def parse_attached(code: int, body: bytes) -> dict[str, str]:
    """
    C{{name: md5}} of the C{_attachments} of a message's read form
    (C{GET <id>.json}); empty for anything else.
    """
    if code != 200:
        return {}
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    attachments = value.get("_attachments") if isinstance(value, dict) else None
    if not isinstance(attachments, dict):
        return {}
    return {
        name: info["md5"]
        for name, info in attachments.items()
        if isinstance(name, str) and isinstance(info, dict) and isinstance(info.get("md5"), str)
    }


_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*0-(\d+)\s*$")


def parse_held(code: int, headers: Headers, body: bytes, total: int) -> int | None:
    """
    Bytes of an attachment the remote holds, from a resumable-upload answer:
    308 with C{Range: bytes=0-<held-1>} (no C{Range}: nothing held); 200:
    all of it. L{None}: the peer does not do resumable uploads.
    """
    if code == 200:
        return total
    if code != 308:
        return None
    values = headers.getRawHeaders("range") or []
    if not values:
        return 0
    match = _RANGE_RE.match(values[-1])
    if match is None:
        raise SoftFailure("resumable upload failed - garbage Range")
    held = int(match.group(1)) + 1
    if held > total:
        raise SoftFailure("resumable upload failed - remote holds too much")
    return held


def same_host(dest: str, base_url: str) -> bool:
    """
    Does the queue URL C{dest} point at a queue of this host (base URL
    C{base_url}): C{<base>q/<name>}, nothing after the name (a longer path
    is what HTTP would not find: it goes over HTTP, and fails there)?
    """
    for prefix in (base_url + "q/", base_url.rstrip("/") + "/q/"):
        if dest.startswith(prefix):
            return "/" not in dest[len(prefix):].rstrip("/")
    return False
