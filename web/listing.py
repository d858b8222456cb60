"""
What the queue page and C{/q/<name>.json} list of a queue's messages.

Lists are newest first and paged: in-memory states (prep, que, run) are
sliced, hashed states (done, relayed) are walked only as far as the page
needs (L{rqtwisted.store.QueueStore.list_hashed}), so a queue holding
100,000 done messages lists its newest 50 in milliseconds.
"""

from __future__ import annotations

from typing import Any

from rqtwisted.message import MessageError

#: States in the order of the queue page's columns and of C{.json}.
STATES = ("prep", "que", "run", "done", "err", "relayed")

#: The keys C{/q/<name>.json} gives for each state's entries (http.md).
JSON_KEYS = {
    "prep": ("msg_id",),
    "que": ("msg_id", "due", "dest"),
    "run": ("msg_id", "status", "dest"),
    "done": ("msg_id",),
    "err": ("msg_id",),
    "relayed": ("msg_id", "status", "dest", "new_msg"),
}


def page_ids(queue: Any, state: str, offset: int, limit: int | None) -> list[str]:
    """
    Ids C{offset} to C{offset + limit} of a state, newest first (all from
    C{offset} when C{limit} is C{None}).
    """
    end = None if limit is None else offset + limit
    return list(queue.messages(state, end))[offset:end]


def entry(queue: Any, state: str, msg_id: str) -> dict[str, Any]:
    """
    What a list shows of a message: que C{due}/C{dest}; run
    C{status}/C{dest}; relayed C{status}/C{dest}/C{new_msg} (the last word
    of its status, the remote id). A message that moved meanwhile keeps only
    its id.
    """
    out: dict[str, Any] = {"msg_id": msg_id}
    if state == "que":
        msg = queue.que.get(msg_id)
        if msg is None:
            try:
                msg = queue.store.read("que", msg_id)
            except MessageError:
                msg = {}
        out["due"] = msg.get("due")
        out["dest"] = msg.get("dest")
    elif state == "run":
        job = queue.run.get(msg_id)
        _, text = queue.store.read_status("run", msg_id)
        out["status"] = text or ""
        out["dest"] = job.msg.get("dest") if job is not None else None
    elif state == "relayed":
        try:
            msg = queue.store.read("relayed", msg_id)
        except MessageError:
            msg = {}
        _, text = queue.store.read_status("relayed", msg_id)
        words = (text or "").split()
        out["status"] = text or ""
        out["dest"] = msg.get("dest")
        out["new_msg"] = words[-1] if words else ""
    return out


def entries(queue: Any, state: str, offset: int, limit: int | None) -> list[dict[str, Any]]:
    """
    One page of a state's list entries.
    """
    return [entry(queue, state, i) for i in page_ids(queue, state, offset, limit)]


def json_lists(queue: Any, limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """
    The C{messages} object of C{/q/<name>.json}: each state's newest
    C{limit} entries with the keys of L{JSON_KEYS}.
    """
    out = {}
    for state in STATES:
        keys = JSON_KEYS[state]
        if keys == ("msg_id",):
            out[state] = [{"msg_id": i} for i in page_ids(queue, state, 0, limit)]
        else:
            out[state] = [{k: e.get(k) for k in keys} for e in entries(queue, state, 0, limit)]
    return out
