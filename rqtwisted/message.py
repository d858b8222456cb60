"""
The message value: ids, full ids, fields and the rules for names.

Everything here is pure: no I/O, no reactor. The store (L{rqtwisted.store})
persists what this module shapes; the CLI, the web app and the relay all read
ids and destinations through it, so there is one definition of each rule.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Iterable, Mapping

#: What reading a JSON file can raise: the file itself (C{OSError}), text
#: that is not JSON (C{ValueError}, C{UnicodeDecodeError} included), or
#: nesting deeper than the parser's recursion limit (C{RecursionError}).
JSON_READ_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, RecursionError)

#: Message states, in the lookup order of the original (message.md).
STATES = ("prep", "que", "run", "done", "relayed", "err")

#: States whose directories are hashed by date (layout.md).
HASHED_STATES = frozenset({"done", "relayed"})

#: The four free parameters of a message.
PARAM_KEYS = ("param1", "param2", "param3", "param4")

#: Keys copied from input into a new message (message.md, "Creation").
CREATION_KEYS = (
    "dest",
    "src",
    *PARAM_KEYS,
    "due",
    "count",
    "max_count",
    "orig_msg_id",
    "post_run_webhook",
    "force_remote",
)

#: Keys the original persisted by mistake; ignored on read (quirks.md 10).
STALE_KEYS = ("path", "status", "state")

DEFAULT_MAX_COUNT = 15

_INVALID_QUEUE_CHARS = frozenset("/. ,;:@\"(){}\\+='^`#~?[]%|$&<>")
_MSG_ID_RE = re.compile(r"^\d{8}\.\d{4}\.\d{2}\.\d{3}\.\d+$")
_HASH_RE = re.compile(r"(\d{8})\.(\d\d)(\d\d)")
_QUEUE_IN_ID_RE = re.compile(r"/q/([^/]+)")
_MSG_IN_ID_RE = re.compile(r"/q/[^/]+/([^/]+)")


class MessageError(Exception):
    """
    A request about a message was refused; C{reason} is the exact text the
    user sees (C{fail <reason>}, C{["fail", reason]}).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def valid_queue_name(name: object) -> bool:
    """
    Is C{name} a valid queue name (layout.md, exact character rule)?
    """
    return (
        isinstance(name, str)
        and 0 < len(name) <= 128
        and not any(c in _INVALID_QUEUE_CHARS for c in name)
        and name.isprintable()
    )


def valid_msg_id(msg_id: object) -> bool:
    """
    Is C{msg_id} a short message id of the form C{YYYYMMDD.HHMM.SS.mmm.N}?
    """
    return isinstance(msg_id, str) and _MSG_ID_RE.match(msg_id) is not None


def make_msg_id(now: float, suffix: int) -> str:
    """
    Make a short id for a message created at C{now} (epoch seconds, UTC) with
    the per-queue uniqueness C{suffix}.
    """
    seconds, millis = divmod(int(round(now * 1000)), 1000)
    stamp = time.strftime("%Y%m%d.%H%M.%S", time.gmtime(seconds))
    return f"{stamp}.{millis:03d}.{suffix}"


def hashed_subpath(msg_id: str) -> str:
    """
    The path of a done/relayed message below its state directory:
    C{YYYYMMDD/HH/MM/<id>} (layout.md, exact hash rule).
    """
    match = _HASH_RE.search(msg_id)
    if match is None:
        raise MessageError("msg not found")
    return "/".join(match.groups() + (msg_id,))


def split_full_id(full_id: str) -> tuple[str, str]:
    """
    Cut the queue name and short id out of a full message id the way the
    original's clients do (C{/q/([^/]+)} and C{/q/[^/]+/([^/]+)}).

    @raise MessageError: when either part is missing.
    """
    queue = _QUEUE_IN_ID_RE.search(full_id)
    msg = _MSG_IN_ID_RE.search(full_id)
    if queue is None or msg is None:
        raise MessageError(f"invalid msg_id {full_id}")
    return queue.group(1), msg.group(1)


def base_url(host: str, port: int | str, relative_root: str = "/") -> str:
    """
    The URL every full id of this host starts with: C{http://h:p<root>}.
    """
    return f"http://{host}:{port}{relative_root}"


def full_id(base: str, queue: str, msg_id: str) -> str:
    """
    The public identity of a message: C{<base>q/<queue>/<msg_id>}.
    """
    return f"{base}q/{queue}/{msg_id}"


def dest_queue(dest: str) -> str:
    """
    The queue a destination names: the segment after C{/q/} for URLs and
    C{/q/} paths, else the bare name (C{RQ_DEST_QUEUE}).
    """
    if dest.startswith("http:") or dest.startswith("https:") or dest.startswith("/q/"):
        match = _QUEUE_IN_ID_RE.search(dest)
        return match.group(1) if match else ""
    return dest


def dest_url(dest: str, host: str, port: int | str) -> str:
    """
    C{RQ_DEST}: a URL dest unchanged, C{/q/..} or a bare name made absolute
    on this host (ignoring C{relative_root}, as the original does: quirks 20).
    """
    if dest.startswith("http:"):
        return dest
    if dest.startswith("/q/"):
        return f"http://{host}:{port}{dest}"
    return f"http://{host}:{port}/q/{dest}"


def is_remote_dest(dest: str) -> bool:
    """
    Does C{dest} name a queue by URL (and so travel through C{relay})?
    """
    return dest.startswith("http:") or dest.startswith("https:")


#: The largest C{count} or C{max_count} a message may be given: a C
#: int's (a peer's or a script's reading of C{RQ_COUNT} may be one).
MAX_COUNT_VALUE = 2**31 - 1

#: The leading integer of a text, as Ruby's C{String#to_i} reads it: ASCII
#: blanks, a sign, an optional C{0d} prefix, digits with single C{_}
#: between them; the rest of the text is ignored.
_LEADING_INT_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)(?:0[dD])?([0-9]+(?:_[0-9]+)*)")


def _shown(value: Any) -> str:
    """
    C{value} as a reason quotes it: at most 64 characters.
    """
    if isinstance(value, bool) or value is None:
        # As JSON writes them (a lone --flag on the command line is true).
        return json.dumps(value)
    try:
        text = str(value)
    except ValueError:  # (an int of thousands of digits)
        return "a number too large to show"
    return text if len(text) <= 64 else text[:64] + "..."


def _to_int(value: Any, key: str) -> int:
    """
    C{count} or C{max_count} as an int ("input converted", message.md),
    as the original's C{to_i} converted it: an integer as it is, a number
    truncated toward zero, text read for its leading integer (C{"3.7"} is
    3, C{"1e3"} 1, C{" 12abc"} 12).

    @raise MessageError: text with no leading integer (C{to_i} read it as
        0; here bad input gets a clear error), NaN, an infinity or another
        type; or a value below 0 or above L{MAX_COUNT_VALUE}.
    """
    number: int | None = None
    if isinstance(value, int):  # (C{bool} too: a lone C{--count} is 1)
        number = int(value)
    elif isinstance(value, float):
        if math.isfinite(value):
            number = int(value)
    elif isinstance(value, str):
        match = _LEADING_INT_RE.match(value)
        if match:
            sign, digits = match.group(1), match.group(2).replace("_", "").lstrip("0")
            if len(digits) > len(str(MAX_COUNT_VALUE)):
                # (Not converted: int() refuses thousands of digits.)
                raise _out_of_range(key, value)
            number = int(sign + (digits or "0"))
    if number is None:
        raise MessageError(f"invalid {key} field ({_shown(value)})")
    if not 0 <= number <= MAX_COUNT_VALUE:
        raise _out_of_range(key, value)
    return number


def _out_of_range(key: str, value: Any) -> MessageError:
    """
    The refusal of a C{count} or C{max_count} (C{key}) out of range.
    """
    return MessageError(f"invalid {key} field ({_shown(value)}): it must be from 0 to {MAX_COUNT_VALUE}")


#: The latest due time a message may ask for: the last second of year
#: 9999, the last a date can show (beyond it, pages could not show it).
MAX_DUE = 253402300799


def _to_due(value: Any) -> float:
    """
    C{due} as a number of seconds since the epoch.

    @raise MessageError: not a number (C{true} neither), NaN, an infinity
        (NaN would break the order of the scheduler's heap, and neither can
        be written as JSON), or beyond year 9999 either way.
    """
    if isinstance(value, bool):
        raise MessageError(f"invalid due field ({_shown(value)})")
    try:
        due = float(value)
    except (TypeError, ValueError):
        raise MessageError(f"invalid due field ({_shown(value)})")
    if not math.isfinite(due) or abs(due) > MAX_DUE:
        raise MessageError(f"invalid due field ({_shown(value)})")
    return due


def normalize_webhooks(value: Any) -> list[str]:
    """
    C{post_run_webhook} as a list of URLs: a string is split on white space
    (quirks 16), a list keeps its string members.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v]
    raise MessageError("invalid post_run_webhook field")


def not_unicode(fields: Mapping[str, Any]) -> tuple[str, UnicodeEncodeError] | None:
    """
    The first text field of C{fields} that is not valid Unicode (a lone
    surrogate, as an undecodable command-line argument gives), with why;
    L{None} when every one is.
    """
    for key, value in fields.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return key, e
    return None


def _text_field(key: str, value: Any) -> str:
    """
    A text field given as another JSON value: numbers as written, booleans
    as JSON writes them (a lone C{--param1} on the command line means
    C{true}, which a script sees as C{RQ_PARAM1=true}).

    @raise MessageError: anything else.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    raise MessageError(f"invalid {key} field")


def creation_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """
    The fields a new message takes from request C{data} (message.md): only
    the creation keys, C{dest} required, C{count}/C{max_count} as ints.

    C{msg_id}, C{due} default and C{orig_msg_id} default are filled by the
    store when the id is allocated.

    @raise MessageError: C{dest} missing, a field of the wrong type, or a
        C{count}/C{max_count} out of range.
    """
    # (A dict first: an isinstance check against typing's Mapping costs
    # microseconds, and nearly every message is a decoded JSON object.)
    if type(data) is not dict and not isinstance(data, Mapping):
        raise MessageError("message must be a JSON object")
    dest = data.get("dest")
    if dest is None or dest == "":
        raise MessageError('input missing required "dest" parameter')
    if not isinstance(dest, str):
        raise MessageError("invalid dest field")
    fields: dict[str, Any] = {}
    for key in CREATION_KEYS:
        if key in data:
            fields[key] = data[key]
    for key in (*PARAM_KEYS, "src", "orig_msg_id"):
        value = fields.get(key)
        if value is not None and not isinstance(value, str):
            fields[key] = _text_field(key, value)
    for key in ("dest", *PARAM_KEYS, "src", "orig_msg_id"):
        value = fields.get(key)
        if isinstance(value, str) and "\0" in value:
            # A script could never see it: an environment value ends there.
            raise MessageError(f"invalid {key} field: it contains a NUL character")
    fields["count"] = _to_int(fields.get("count", 0), "count")
    fields["max_count"] = _to_int(fields.get("max_count", DEFAULT_MAX_COUNT), "max_count")
    if "due" in fields:
        # (Empty text is refused as C{"abc"} is; C{null} means absent.)
        if fields["due"] is None:
            del fields["due"]
        else:
            _to_due(fields["due"])
    if "post_run_webhook" in fields:
        hooks = normalize_webhooks(fields["post_run_webhook"])
        if hooks:
            fields["post_run_webhook"] = hooks
        else:
            del fields["post_run_webhook"]
    return fields


def truthy(value: Any) -> bool:
    """
    Whether a message field counts as set, as the original (Ruby) told:
    anything but C{null} and C{false} (so C{0} and C{""} too). For
    C{force_remote}, which is stored as given whenever present.
    """
    return value is not None and value is not False


def _stored_number(msg: Mapping[str, Any], key: str) -> float | None:
    """
    A numeric field of a stored message, or L{None} when absent or
    unreadable; numeric strings (the CLI's, quirks 10) count. A NaN or an
    infinity, which older versions let in, is unreadable.
    """
    value = msg.get(key)
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def due_of(msg: Mapping[str, Any], default: float) -> float:
    """
    The due time of a stored message; C{default} when absent or
    unreadable.
    """
    due = _stored_number(msg, "due")
    return default if due is None else due


def count_of(msg: Mapping[str, Any], key: str, default: int) -> int:
    """
    A stored message's C{count} or C{max_count} (C{key}) as an int, read as
    L{due_of} reads C{due}: C{default} stands for a value that is absent or
    unreadable, so that a bad field never stops a queue.
    """
    number = _stored_number(msg, key)
    return default if number is None else int(number)


def stored(msg: Mapping[str, Any]) -> dict[str, Any]:
    """
    C{msg} without the stale keys the original wrote into C{msg} files.
    """
    return {k: v for k, v in msg.items() if k not in STALE_KEYS}


def status_text(state: str, job_status: str | None, has_status: bool) -> str:
    """
    The read-form C{status}: C{<state>}, or C{<state> - <text>} when the
    message has a C{status} file (a null text gives C{"<state> - "}).
    """
    if not has_status:
        return state
    return f"{state} - {job_status or ''}"


def params_tuple(msg: Mapping[str, Any], positions: Iterable[int]) -> tuple[Any, ...]:
    """
    The values of C{param<n>} for each position, for coalescing/blocking:
    hashable, so that they can be compared as a set. A value that is
    neither text nor a number (an array or object, which a message written
    by the original RQ may hold) stands as its canonical JSON.
    """
    return tuple(_comparable(msg.get(f"param{n}")) for n in positions)


def _comparable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float)):
        return value
    return ("json", json.dumps(value, sort_keys=True, default=str))
