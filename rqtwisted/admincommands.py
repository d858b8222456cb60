"""
The admin protocol's vocabulary, without Twisted.

The daemon answers these AMP commands on C{<root>/config/rq.sock}; the C{rq}
command line asks them through the small synchronous client in
L{rqtwisted.ampclient}, which must not import Twisted (it would cost half a
second per call). So the vocabulary is plain data here, and
L{rqtwisted.admin} builds its L{twisted.protocols.amp.Command}s from it.

Every command answers the same two keys: C{status} (C{ok} or C{fail}, or the
original's C{success} for C{create_queue}) and C{detail}. A detail too large
for one AMP value (64 KiB) does not cross the socket: it is written to a file
below the root and its path comes back as C{spill} instead (the client reads
and removes it).
"""

from __future__ import annotations

#: Name of the admin socket, relative to the root.
SOCKET = "config/rq.sock"

#: Where values too large for AMP (64 KiB) go, below the root: answers the
#: daemon spills, and messages C{rq} hands over by file (C{message_file}).
SPILL_DIR = "config/spill"

#: The largest message C{rq} hands over by file: what the original's frame
#: could carry (8 decimal digits of length).
MAX_MESSAGE_FILE = 99_999_999

#: The C{_error_code} of the one box the daemon writes to an admin
#: connection it turns away (as many are open as it allows) before closing
#: it, unread: an AMP error box whose C{_error} tag is empty (it answers no
#: request) and whose C{_error_description} says why.
TURNED_AWAY = "BUSY"

#: Response keys of every command.
RESPONSE = ("status", "detail", "spill")

#: command name -> (required argument names, optional argument names).
#: All values are text; C{relay_ok} is C{"1"} or C{""}.
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # instance
    "Ping": ((), ()),
    "Status": ((), ()),
    "Queues": ((), ()),
    "Restart": ((), ()),
    "Reload": ((), ()),
    # queues
    "CreateQueue": (("config",), ()),
    "DeleteQueue": (("name",), ()),
    "QueueAdmin": (("action", "name"), ()),
    # messages; msg_id is a full id (or /q/<queue>/<id>)
    # message_file: a file of SPILL_DIR holding the message instead (then
    # message is ""), for a message too large for AMP; the daemon removes it.
    "CreateMessage": (("message", "method"), ("relay_ok", "message_file")),
    "AttachMessage": (("msg_id", "pathname"), ("name",)),
    "MessageAction": (("action", "msg_id"), ()),
    "GetMessage": (("msg_id",), ()),
    # search: query is a JSON object {field: text}; exact is "1" or ""
    "Search": (("query",), ("name", "exact")),
}

#: C{QueueAdmin} actions.
QUEUE_ACTIONS = ("up", "down", "pause", "resume", "restart")

#: C{MessageAction} actions.
MESSAGE_ACTIONS = ("commit", "delete", "destroy", "run_now", "clone", "status", "state")
