"""
Message search (C{GET /search}, C{rq search}) over an in-memory index.

C{/search} of the original reads every message of the queue on every call
(quirks 24). Here each queue has a L{QueueIndex}: for every message of every
state, its state, its status text and its stored fields as text. A query is
answered from the index alone; only the messages that match are read from disk
(to return their full read form).

The index of a queue is built the first time that queue is searched (one
read of each C{msg} and C{status} file; a queue never searched costs
nothing) and is kept current from then on by the queue's store, which tells
its observer about every create, C{msg}/C{status} rewrite, move and delete
(L{rqtwisted.store.QueueStore.observer}). A queue service that restarts
starts with a fresh store, so its index is built again at the next search.
Code that removes messages without the store tells the index through
L{forget_bucket} / L{forget_ids} (the cleaner); entries whose message
vanished otherwise (removed by hand) are dropped when a search finds them
missing.

Memory: per message, a tuple of its values as text (repeated short values
interned, field names shared by all messages of the same shape): about
0.8 KiB for a typical message (C{bench/search_index.py}). Status files are
read only when a query asks for C{status}.

Matching (http.md): every C{field=value} pair of the query must hold. A field
is a stored message field (non-text values compared as their JSON text),
C{state}, or C{status} (the read-form C{status}, e.g. C{done - copied}).
Without C{exact} the value must occur in the field; with it, be equal. The
results are the full read forms (as C{get_message}), newest first, at most
C{limit} of them.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from twisted.logger import Logger

from rqtwisted.message import MessageError, status_text

if TYPE_CHECKING:
    from rqtwisted.queue import QueueService
    from rqtwisted.store import QueueStore

_log = Logger()

#: Most messages one search returns (newest first).
DEFAULT_LIMIT = 1000

#: States indexed, in the order they are built.
STATES = ("prep", "que", "run", "done", "relayed", "err")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return sys.intern(value) if len(value) <= 64 else value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return sys.intern(str(value))
    return json.dumps(value, ensure_ascii=False)


#: Key tuples shared by every message with the same keys in the same order
#: (nearly all messages of a queue): each entry keeps only its values.
_SHAPES: dict[tuple[str, ...], tuple[str, ...]] = {}
MAX_SHAPES = 1000

#: The status of an entry whose C{status} file has not been read yet: it is
#: read the first time a query asks for C{status}.
UNREAD = object()


def _fields(msg: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    keys = tuple(str(k) for k in msg)
    shape = _SHAPES.get(keys)
    if shape is None:
        shape = tuple(sys.intern(k) for k in keys)
        if len(_SHAPES) < MAX_SHAPES:
            _SHAPES[shape] = shape
    return shape, tuple(_text(v) for v in msg.values())


class Entry:
    """
    One indexed message.

    @ivar state: its state.
    @ivar status: its job status text; C{None} without a status file, C{""}
        for a null text, L{UNREAD} until needed.
    @ivar keys: its stored field names (a shared tuple).
    @ivar values: their values as text.
    """

    __slots__ = ("state", "status", "keys", "values")

    def __init__(self, state: str, status: Any, msg: Mapping[str, Any]) -> None:
        self.state = state
        self.status = status
        self.keys, self.values = _fields(msg)

    def set_fields(self, msg: Mapping[str, Any]) -> None:
        """
        Replace the stored fields.
        """
        self.keys, self.values = _fields(msg)

    def value(self, field: str) -> str | None:
        """
        The text of a stored field, or of C{state}; C{None} if absent.
        (C{status} is answered by L{QueueIndex.status_of}.)
        """
        if field == "state":
            return self.state
        try:
            return self.values[self.keys.index(field)]
        except ValueError:
            return None


class QueueIndex:
    """
    The index of one queue; an observer of its store.

    @ivar entries: message id -> L{Entry}.
    """

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._store: QueueStore | None = None

    # -- building

    def build(self, queue: "QueueService") -> None:
        """
        Index every message of C{queue} from its directory (and, for the
        running ones, from memory).
        """
        store = self._store = queue.store
        entries: dict[str, Entry] = {}
        for state in STATES:
            if state == "run":
                ids: Iterable[str] = list(queue.run)
            elif state in ("done", "relayed"):
                ids = list(store.list_hashed(state))
            else:
                ids = store.list_flat(state)
            for msg_id in ids:
                try:
                    msg = dict(queue.run[msg_id].msg) if state == "run" else store.read(state, msg_id)
                except MessageError:
                    continue
                entries[msg_id] = Entry(state, UNREAD, msg)
        self.entries = entries

    # -- store observer

    def created(self, state: str, msg: Mapping[str, Any]) -> None:
        """
        A message was stored in C{state}.
        """
        self.entries[msg["msg_id"]] = Entry(state, None, msg)

    def msg_written(self, state: str, msg_id: str, msg: Mapping[str, Any]) -> None:
        """
        A message's C{msg} file was replaced.
        """
        entry = self.entries.get(msg_id)
        if entry is None:
            self.entries[msg_id] = Entry(state, UNREAD, msg)
        else:
            entry.state = state
            entry.set_fields(msg)

    def status_written(self, state: str, msg_id: str, text: str | None) -> None:
        """
        A message's C{status} file was replaced.
        """
        entry = self.entries.get(msg_id)
        if entry is not None:
            entry.status = text or ""

    def moved(self, msg_id: str, source: str, target: str) -> None:
        """
        A message moved between states.
        """
        entry = self.entries.get(msg_id)
        if entry is not None:
            entry.state = target

    def deleted(self, state: str, msg_id: str) -> None:
        """
        A message was removed.
        """
        self.entries.pop(msg_id, None)

    # -- queries

    def status_of(self, msg_id: str, entry: Entry) -> str:
        """
        The read-form C{status} of an entry (its file read on first use).
        """
        if entry.status is UNREAD:
            entry.status = None
            if self._store is not None:
                has, text = self._store.read_status(entry.state, msg_id)
                entry.status = (text or "") if has else None
        return status_text(entry.state, entry.status, entry.status is not None)

    def match(self, query: Mapping[str, str], exact: bool) -> list[str]:
        """
        Ids of the messages matching every pair of C{query}, newest first.
        """
        pairs = list(query.items())
        found = []
        for msg_id, entry in self.entries.items():
            for field, wanted in pairs:
                value = self.status_of(msg_id, entry) if field == "status" else entry.value(field)
                if value is None or (value != wanted if exact else wanted not in value):
                    break
            else:
                found.append(msg_id)
        found.sort(reverse=True)
        return found


def index_for(queue: "QueueService") -> QueueIndex:
    """
    The index of C{queue}, built and attached to its store on first use.
    """
    store: QueueStore = queue.store
    index = getattr(store, "observer", None)
    if not isinstance(index, QueueIndex):
        index = QueueIndex()
        index.build(queue)
        store.observer = index
    return index


def forget_bucket(queue: "QueueService", state: str, day: str, hour: str | None = None) -> int:
    """
    Drop from the index of C{queue} (if built) its messages in C{state}
    created on C{day} (C{YYYYMMDD}) and, if given, in C{hour} (C{HH}): for
    code that removes whole buckets of the hashed layout without the store
    (the cleaner). Returns how many entries went.
    """
    index = getattr(queue.store, "observer", None)
    if not isinstance(index, QueueIndex):
        return 0
    prefix = day + "." + (hour or "")
    gone = [m for m, e in index.entries.items() if e.state == state and m.startswith(prefix)]
    for msg_id in gone:
        del index.entries[msg_id]
    return len(gone)


def forget_ids(queue: "QueueService", msg_ids: Iterable[str]) -> None:
    """
    Drop messages removed without the store from the index of C{queue}.
    """
    index = getattr(queue.store, "observer", None)
    if isinstance(index, QueueIndex):
        for msg_id in msg_ids:
            index.entries.pop(msg_id, None)


def read_forms(queue: "QueueService", msg_ids: list[str], limit: int | None = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """
    The read forms of the messages C{msg_ids} of C{queue} (hits of its
    index, L{QueueIndex.match}), at most C{limit}; a hit no longer readable
    is skipped (and forgotten by the index when gone from the disk).
    """
    index = index_for(queue)
    out: list[dict[str, Any]] = []
    for msg_id in msg_ids:
        if limit is not None and len(out) >= limit:
            break
        try:
            msg = queue.get(msg_id)
        except MessageError:
            # Removed behind the index's back: forget it. A message still on
            # disk is only not readable yet (a creation waiting for its fsync
            # round) or any more (being moved): keep it.
            entry = index.entries.get(msg_id)
            if entry is None or not _on_disk(queue, entry.state, msg_id):
                index.entries.pop(msg_id, None)
            continue
        out.append(msg)
    return out


def _on_disk(queue: "QueueService", state: str, msg_id: str) -> bool:
    try:
        return queue.store.exists(state, msg_id)
    except (MessageError, ValueError):
        return False


def check_query(query: Any) -> dict[str, str]:
    """
    Validate a query: an object of field names to text values.

    @raise MessageError: otherwise.
    """
    if not isinstance(query, Mapping):
        raise MessageError("query must be an object of field names to values")
    out = {}
    for field, value in query.items():
        if not isinstance(field, str) or not field:
            raise MessageError("query field names must be non-empty text")
        if not isinstance(value, str):
            raise MessageError(f"query value of {field} must be text")
        out[field] = value
    return out
