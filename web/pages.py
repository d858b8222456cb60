"""
The HTML pages of the web interface (spec/web-ui.md).

Every page is the layout template (C{templates/layout.xml}) around content
built from L{twisted.web.template.tags}: values are escaped when the page is
flattened, never pasted into markup. The functions here are pure: the app
(L{rqtwisted.web.app}) gathers the data, these shape it.

Element ids and form field names are the ones the page scripts
(C{static/js/*.js}) and existing clients use; links all start with the
instance's C{relative_root}.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote, urlencode

from twisted.python.filepath import FilePath
from twisted.web.template import Comment, Element, Tag, XMLFile, renderer, tags

from rqtwisted.message import PARAM_KEYS
from rqtwisted.web.ansi import ansi_to_tags
from rqtwisted.web.listing import STATES

TEMPLATES = FilePath(__file__).sibling("templates")

#: States in the order of the queue page's columns.
COLUMNS = STATES

#: Fields shown under "more" on the message page.
DETAIL_FIELDS = (
    "msg_id",
    "count",
    "max_count",
    *PARAM_KEYS,
    "post_run_webhook",
    "orig_msg_id",
    "cloned_from",
    "dups",
    "dup",
    "force_remote",
)

#: New-message form fields: (field id, label, help).
FORM_FIELDS = (
    ("mesg_dest", "Dest", "Queue name or full queue URL"),
    ("mesg_src", "Src", "Who is sending this message"),
    ("mesg_param1", "Param1", ""),
    ("mesg_param2", "Param2", ""),
    ("mesg_param3", "Param3", ""),
    ("mesg_param4", "Param4", ""),
    ("mesg_status", "Method", ""),
    ("mesg_post_run_webhook", "Post run webhook", "URLs separated by spaces"),
)


def url(root: str, *segments: str, **query: Any) -> str:
    """
    A link below C{relative_root}: each segment quoted, then the query.
    """
    path = root + "/".join(quote(str(s), safe="") for s in segments)
    q = {k: v for k, v in query.items() if v is not None}
    if q:
        path += "?" + urlencode(q)
    return path


@dataclass
class Context:
    """
    What every page shows around its content.
    """

    root: str
    env: str
    title: str = "RQ"
    flashes: list[dict[str, Any]] = field(default_factory=list)
    body_class: str = ""
    scripts: tuple[str, ...] = ()


def _flash_parts(parts: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for part in parts:
        if isinstance(part, list) and len(part) == 2 and part[0] == "code":
            out.append(tags.code(str(part[1])))
        else:
            out.append(str(part))
    return out


class Layout(Element):
    """
    The page frame: title, env label, flash areas, content, scripts.
    """

    loader = XMLFile(TEMPLATES.child("layout.xml"))

    def __init__(self, context: Context, content: Any) -> None:
        super().__init__()
        self.context = context
        self.content = content

    def _flash(self, tag: Tag, kind: str) -> Tag:
        items = [n for n in self.context.flashes if n.get("kind", "notice") == kind]
        return tag(*[tags.p(*_flash_parts(n["parts"])) for n in items])

    @renderer
    def notices(self, request: Any, tag: Tag) -> Tag:
        """
        The pending notices.
        """
        return self._flash(tag, "notice")

    @renderer
    def errors(self, request: Any, tag: Tag) -> Tag:
        """
        The pending error notices.
        """
        return self._flash(tag, "error")

    @renderer
    def page(self, request: Any, tag: Tag) -> Tag:
        """
        Fill the layout's slots.
        """
        c = self.context
        return tag.fillSlots(
            title=c.title,
            root=c.root,
            env=c.env,
            body_class=" ".join(x for x in ("rq", f"env-{c.env}", c.body_class) if x),
            content=self.content,
            scripts=[tags.script(src=url(c.root, *s.split("/"))) for s in c.scripts],
        )


# -- pieces


def post_form(action: str, label: str, fields: Mapping[str, str] | None = None, **attrs: str) -> Tag:
    """
    A one-button POST form.
    """
    hidden = [tags.input(type="hidden", name=k, value=v) for k, v in (fields or {}).items()]
    return tags.form(*hidden, tags.input(type="submit", value=label), method="post", action=action,
                     class_="inline", **attrs)


def admin_form(root: str, name: str, status: str, back: str) -> Tag:
    """
    Pause/resume, down/up and restart buttons for a queue.
    """
    pause = "resume" if status == "PAUSE" else "pause"
    down = "up" if status == "DOWN" else "down"
    return tags.span(
        tags.form(
            tags.input(type="hidden", name="back", value=back),
            tags.input(type="submit", name=pause, value=pause),
            tags.input(type="submit", name=down, value=down),
            method="post",
            action=url(root, "q", name, "adminoper"),
            class_="inline admin",
        ),
        tags.form(
            tags.input(type="hidden", name="back", value=back),
            tags.input(type="submit", name="restart", value="restart"),
            method="post",
            action=url(root, "q", name, "restart"),
            class_="inline admin",
        ),
        class_="admin-forms",
    )


def _status_class(status: str) -> str:
    return "green" if status == "UP" else ("orange" if status == "PAUSE" else "red")


def fmt_time(epoch: Any) -> str:
    """
    An epoch as local C{YYYY-MM-DD HH:MM:SS}.
    """
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch)))
    except (TypeError, ValueError, OverflowError):
        return str(epoch)


# -- home


def _table(header: Sequence[str], rows: Iterable[tuple[str, Sequence[Any]]], table_id: str) -> Tag:
    """
    A plain table: C{rows} are C{(row id, cells)}; a last cell that is not
    empty is an error, shown red.
    """
    def row(row_id: str, cells: Sequence[Any]) -> Tag:
        *first, last = [str(c) if c is not None else "" for c in cells]
        error = tags.td(last, class_="red") if last else tags.td()
        return tags.tr(*[tags.td(c) for c in first], error, id=row_id)

    return tags.table(tags.tr(*[tags.th(h) for h in header]), *[row(i, c) for i, c in rows], id=table_id)


def home_content(root: str, info: Mapping[str, Any], allow_new_queue: bool, back: str) -> list[Any]:
    """
    The home page: the status line, the queue table, timers, scandir links.
    """
    rows = []
    for q in info["queues"]:
        name = q["name"]
        status = str(q.get("status", "DOWN"))
        counts = q.get("counts") or {}
        count_cells = [
            tags.td(str(counts.get(state, "")), id=f"{state}-{name}", class_=f"count {state}")
            for state in ("prep", "que", "run", "err", "done", "relayed")
        ]
        crons = []
        for entry in q.get("schedule") or []:
            params = entry.get("params") or {}
            fields = {"x_format": "html", "back": back, "mesg[src]": "cron-now", "mesg[dest]": name}
            for n in range(1, 5):
                value = params.get(f"param{n}", entry.get(f"param{n}"))
                if value is not None:
                    fields[f"mesg[param{n}]"] = str(value)
            crons.append(
                tags.div(
                    tags.span(f"CRON: {entry.get('cron', '')}", class_="cron"),
                    " ",
                    tags.span(", ".join(f"{k}={v}" for k, v in sorted(params.items())), class_="cron-params"),
                    " ",
                    tags.span(f"Next run at {fmt_time(entry['next_run'])}" if entry.get("next_run") else "",
                              class_="cron-next"),
                    " ",
                    post_form(url(root, "q", name, "new_message"), "Run Now", fields),
                    class_="cron-entry",
                )
            )
        if q.get("error"):
            status_cell = tags.td(f"DOWN {q['error']}", id=f"status-{name}", class_="red")
        else:
            status_cell = tags.td(status, id=f"status-{name}", class_=_status_class(status))
        rows.append(
            tags.tr(
                tags.td(tags.a(name, href=url(root, "q", name)), *crons, class_="name"),
                *count_cells,
                tags.td(str(q.get("ping", "")), id=f"ping-{name}"),
                tags.td(str(q.get("pid", "")), id=f"pid-{name}"),
                tags.td(str(q.get("uptime", "")), id=f"uptime-{name}"),
                status_cell,
                tags.td(admin_form(root, name, status, back)),
                id=f"queue-{name}",
                class_="queue-row",
            )
        )
    header = tags.tr(
        *[tags.th(h) for h in ("Queue", "prep", "que", "run", "err", "done", "relayed", "ping", "pid", "uptime",
                               "status", "admin")]
    )
    status_line = tags.div(
        "QUEUEMGR:",
        tags.span("OPERATIONAL", class_="green", id="status"),
        " PING:",
        tags.span(str(info.get("ping", "pong")), id="ping"),
        " PID:",
        tags.span(str(info.get("pid", "")), id="pid"),
        " UPTIME:",
        tags.span(str(info.get("uptime", "")), id="uptime"),
        " TIME:",
        tags.span(str(info.get("time", "")), id="time"),
        " VERSION:",
        tags.span(f"v{info.get('version', '')}", id="version"),
        id="status-line",
    )
    content: list[Any] = [status_line]
    if allow_new_queue:
        content.append(tags.p(tags.a("New Queue", href=url(root, "new_queue"), id="new-queue-link")))
    content.append(tags.h2("Queue List"))
    content.append(tags.table(tags.thead(header), tags.tbody(*rows), id="queue-list", class_="queues"))
    now = info.get("time") or 0
    timers = [t for t in info.get("timers") or [] if isinstance(t, dict)]
    if timers:
        content.append(tags.h2("Timer List"))
        content.append(_table(
            ("name", "period", "dest", "due in", "next run", "last run", "sent", "error"),
            [
                (
                    f"timer-{t.get('name', '')}",
                    [
                        t.get("name", ""), t.get("period", ""), t.get("dest", ""),
                        f"{max(0, int(t['next_run'] - now))} s" if t.get("next_run") else "",
                        fmt_time(t["next_run"]) if t.get("next_run") else "",
                        fmt_time(t["last_run"]) if t.get("last_run") else "",
                        t.get("sent", ""), t.get("error") or "",
                    ],
                )
                for t in timers
            ],
            "timer-list",
        ))
    links = [e for e in info.get("scandir") or [] if isinstance(e, dict)]
    if links:
        content.append(tags.h2("Scandir"))
        content.append(_table(
            ("name", "target", "queue", "error"),
            [
                (f"scandir-{e.get('name', '')}",
                 [e.get("name", ""), e.get("target", ""), e.get("queue", ""), e.get("error") or ""])
                for e in links
            ],
            "scandir-list",
        ))
    return content


# -- queue


def group_by_day(ids: Sequence[str]) -> list[tuple[str, list[str]]]:
    """
    Message ids grouped by their C{YYYYMMDD} prefix, order kept.
    """
    return [(day, list(group)) for day, group in groupby(ids, key=lambda i: i[:8])]


def queue_entry(root: str, name: str, state: str, entry: Mapping[str, Any], now: float) -> Tag:
    """
    One message in a queue page list.
    """
    msg_id = entry["msg_id"]
    target = url(root, "q", name, msg_id)
    parts: list[Any] = [tags.a(msg_id, href=target, class_="msg-link")]
    if state == "que":
        due = entry.get("due")
        try:
            wait = f"{int(float(due) - now)}s" if due is not None else ""
        except (TypeError, ValueError):
            wait = ""
        parts += [
            " ", tags.span(str(entry.get("dest", "")), class_="dest"),
            " ", tags.span(wait, class_="due", title="seconds to due"),
            " ", post_form(target, "Run now", {"_method": "run_now"}),
            post_form(target, "Delete", {"_method": "delete"}),
        ]
    elif state == "run":
        parts += [
            " ", tags.span(str(entry.get("status", "")), class_="status"),
            " ", post_form(target, "Destroy", {"_method": "destroy"}),
        ]
    elif state == "relayed":
        remote = str(entry.get("new_msg", ""))
        parts += [" relayed ", tags.a(remote, href=remote) if remote.startswith("http") else remote]
    return tags.li(*parts, class_=f"msg {state}")


def list_key(entries: Sequence[Mapping[str, Any]]) -> str:
    """
    What identifies a list's content for the queue page script: the JSON of
    each entry's id, dest, status and remote id, as C{queue.js} computes it
    from C{q/<name>.json}. The script rebuilds a list only when this changes,
    so the list the server rendered is kept (no click lost to a rebuild).
    """
    return json.dumps(
        [[e.get("msg_id"), e.get("dest"), e.get("status"), e.get("new_msg")] for e in entries],
        separators=(",", ":"),
        ensure_ascii=False,
    )


def state_column(root: str, name: str, state: str, size: int, entries: Sequence[Mapping[str, Any]],
                 page: int, per_page: int, now: float, base_query: Mapping[str, str]) -> Tag:
    """
    One column of the queue page: heading with count, the list grouped by
    day, and pager links.
    """
    by_id = {e["msg_id"]: e for e in entries}
    groups = []
    for day, ids in group_by_day([e["msg_id"] for e in entries]):
        groups.append(tags.li(tags.h4(day, class_="day"), tags.ul(*[
            queue_entry(root, name, state, by_id[i], now) for i in ids
        ]), class_="day-group"))
    pager: list[Any] = []
    key = f"{state}_page"
    if page > 1:
        pager.append(tags.a("« newer", href=url(root, "q", name, **{**base_query, key: str(page - 1)}),
                            class_="newer"))
    if page * per_page < size:
        pager += [" ", tags.a("older »", href=url(root, "q", name, **{**base_query, key: str(page + 1)}),
                              class_="older")]
    return tags.div(
        tags.h3(state.upper(), " ", tags.span(str(size), id=f"{state}_size", class_="size")),
        tags.ul(*groups, id=f"list-{state}", class_="msg-list",
                **{"data-limit": str(per_page), "data-key": list_key(entries)}),
        tags.div(*pager, class_="pager"),
        class_=f"column {state}",
        id=f"column-{state}",
    )


def queue_content(root: str, q: Mapping[str, Any]) -> list[Any]:
    """
    The queue page.
    """
    name = q["name"]
    status = q["status"]
    back = url(root, "q", name)
    head: list[Any] = [
        tags.h1("Queue: ", tags.span(name, id="queue-name")),
        tags.p(tags.a("New Message", href=url(root, "q", name, "new_message"), id="new-message-link")),
    ]
    if q.get("unreachable"):
        head.append(tags.p("queue is COMPLETELY DOWN", class_="red", id="status"))
        return head
    head.append(
        tags.div(
            "Status: ", tags.span(status, id="status", class_=_status_class(status)),
            " ping: ", tags.span("pong", id="ping"),
            " pid: ", tags.span(str(q["pid"]), id="pid"),
            " running for ", tags.span(str(q["uptime"]), id="uptime"), " seconds ",
            admin_form(root, name, status, back),
            class_="queue-status",
        )
    )
    head.append(
        tags.details(
            tags.summary("config.json [ show/hide | ", tags.a("raw", href=url(root, "q", name, "config.json")), " ]"),
            tags.pre(json.dumps(q["config"], indent=2, sort_keys=True), id="config"),
            id="config-box",
        )
    )
    if status == "DOWN":
        head.append(tags.p("Queue is HARD DOWN", class_="red", id="hard-down"))
    columns = [s for s in COLUMNS if not (s == "done" and name == "relay") and not (s == "relayed" and name != "relay")]
    cols = []
    for state in columns:
        lst = q["lists"][state]
        cols.append(state_column(root, name, state, q["sizes"][state], lst["entries"], lst["page"], lst["per_page"],
                                 q["now"], q["query"]))
    head.append(tags.div(*cols, id="queue", class_="columns", **{
        "data-json-url": url(root, "q", f"{name}.json"),
        "data-queue": name,
    }))
    return head


# -- message


def _field_value(root: str, key: str, value: Any) -> Any:
    if isinstance(value, list):
        return tags.ul(*[tags.li(_field_value(root, key, v)) for v in value])
    if value is None:
        return tags.em("null")
    text = str(value)
    if text.startswith("http://") or text.startswith("https://"):
        return tags.a(text, href=text)
    return text


def message_content(root: str, name: str, msg: Mapping[str, Any]) -> list[Any]:
    """
    The message page (prep variant for prep messages).
    """
    msg_id = msg["msg_id"]
    state = msg.get("state", "")
    base = url(root, "q", name, msg_id)
    status = str(msg.get("status", ""))
    if state == "relayed" and " - " in status:
        remote = status.split()[-1]
        status_cell: Any = [status.rsplit(" ", 1)[0], " ", tags.a(remote, href=remote)] \
            if remote.startswith("http") else status
    else:
        status_cell = status
    summary = tags.table(
        tags.tr(tags.th("dest"), tags.td(_field_value(root, "dest", msg.get("dest")), id="msg-dest")),
        tags.tr(tags.th("status"), tags.td(status_cell, id="msg-status")),
        tags.tr(tags.th("state"), tags.td(state, id="msg-state")),
        tags.tr(tags.th("src"), tags.td(str(msg.get("src", "")), id="msg-src")),
        id="summary",
        class_="summary",
    )
    details = tags.details(
        tags.summary("more"),
        tags.table(*[
            tags.tr(tags.th(k), tags.td(_field_value(root, k, msg.get(k)), id=f"msg-{k}"))
            for k in DETAIL_FIELDS if k in msg
        ]),
        " ",
        tags.a("raw", href=url(root, "q", name, f"{msg_id}.json"), id="raw-link"),
        id="details",
        open="",
    )
    actions: list[Any] = []
    if state == "prep":
        actions += [
            post_form(base, "Commit Message", {"_method": "commit"}, id="commit-form"),
            post_form(base, "Delete Message", {"_method": "delete"}, id="delete-form"),
        ]
    else:
        actions += [
            post_form(base + "/clone", "Clone message", id="clone-form"),
            post_form(base + "/run_now", "Run message (risky)", id="run-now-form"),
        ]
        if state == "run":
            actions.append(post_form(base, "Destroy message", {"_method": "destroy"}, id="destroy-form"))
        else:
            actions.append(post_form(base, "Delete message", {"_method": "delete"}, id="delete-form"))
    attachments = msg.get("_attachments") or {}
    if attachments:
        rows = []
        for att, meta in sorted(attachments.items()):
            cells = [
                tags.td(tags.a(att, href=url(root, "q", name, msg_id, "attach", att)), " ",
                        tags.a("tail", href=url(root, "q", name, msg_id, "tailview", att), class_="tail-link")),
                tags.td(str(meta.get("md5", "")), class_="md5"),
                tags.td(str(meta.get("size", "")), class_="size"),
            ]
            if state == "prep":
                cells.append(tags.td(post_form(url(root, "q", name, msg_id, "attach", att), "Delete",
                                               {"_method": "delete"})))
            rows.append(tags.tr(*cells, class_="attachment"))
        att_block: Any = tags.table(
            tags.tr(tags.th("Name"), tags.th("MD5"), tags.th("Size"), *([tags.th("")] if state == "prep" else [])),
            *rows,
            id="attachments",
        )
    else:
        att_block = tags.p("No attachments.", id="attachments")
    content: list[Any] = [
        tags.h1("RQ : ", tags.a(name, href=url(root, "q", name)), " : ", tags.span(msg_id, id="msg-id")),
        tags.div(*actions, class_="actions"),
        tags.h2("Message"),
        summary,
        details,
        tags.h2("Attachments"),
        att_block,
    ]
    if state == "prep":
        content.append(
            tags.form(
                tags.input(type="hidden", name="x_format", value="html"),
                tags.input(type="file", name="filedata"),
                tags.input(type="submit", value="Attach"),
                method="post",
                action=base + "/attach/new",
                enctype="multipart/form-data",
                id="upload-form",
            )
        )
    log = url(root, "q", name, msg_id, "log", "stdio.log")
    tail = url(root, "q", name, msg_id, "tailviewlog", "stdio.log")
    content += [
        tags.h2("Log Tail Window"),
        tags.p(tags.a("Raw log", href=log, id="raw-log"), " | ", tags.a("Full tail", href=tail, id="full-tail")),
        tags.iframe(src=tail, id="tail-frame", class_="tail", title="log tail"),
    ]
    return content


# -- forms


def new_message_content(root: str, name: str, overrides: Mapping[str, Any]) -> list[Any]:
    """
    The new-message form, with C{form.json} overrides applied.
    """
    hidden_default = overrides.get("default") == "hidden"

    def wrap(field_id: str, label: str, help_text: str, control: Any) -> Tag:
        own = overrides.get(field_id)
        if isinstance(own, Mapping):
            label = str(own.get("label", label))
            help_text = str(own.get("help", help_text))
        attrs: dict[str, str] = {"class_": "field", "id": f"{field_id}_field"}
        if hidden_default and field_id not in overrides:
            attrs["style"] = "display: none;"
        return tags.div(tags.label(label, for_=field_id), control, tags.p(help_text, class_="note"), **attrs)

    controls = {
        "mesg_dest": tags.input(type="text", name="mesg[dest]", id="mesg_dest", value=url(root, "q", name)),
        "mesg_src": tags.input(type="text", name="mesg[src]", id="mesg_src", value="web"),
        "mesg_status": tags.span(
            *[
                tags.label(
                    tags.input(type="radio", name="mesg[_method]", value=m, id=f"mesg__method_{m}",
                               **({"checked": "checked"} if m == "commit" else {})),
                    m,
                )
                for m in ("commit", "prep", "single_que")
            ],
            id="mesg_status",
        ),
        "mesg_post_run_webhook": tags.input(type="text", name="mesg[post_run_webhook]", id="mesg_post_run_webhook"),
    }
    for n in range(1, 5):
        controls[f"mesg_param{n}"] = tags.input(type="text", name=f"mesg[param{n}]", id=f"mesg_param{n}")
    fields = [wrap(fid, label, help_text, controls[fid]) for fid, label, help_text in FORM_FIELDS]
    return [
        tags.h1("New message for ", tags.a(name, href=url(root, "q", name))),
        tags.form(
            tags.input(type="hidden", name="x_format", value="html"),
            *fields,
            tags.div(tags.input(type="submit", value="Create Message", id="mesg_submit"), class_="field submit",
                     id="mesg_submit_field"),
            method="post",
            action=url(root, "q", name, "new_message"),
            id="new-message-form",
        ),
    ]


#: The mark L{new_message_result} leaves where the link to the new message
#: goes; L{with_result_link} puts the link there.
RESULT_LINK = "rq-result-link"


def new_message_result(root: str, name: str, ok: bool, text: str) -> list[Any]:
    """
    The answer to an HTML new_message without C{back}: C{<status> - <reason>},
    or C{OK - } and the mark of the link to the new message (the template
    quotes attributes with C{"}, the link is quoted as the original's:
    L{with_result_link}).
    """
    if ok:
        return [tags.p("OK - ", Comment(RESULT_LINK), id="result")]
    return [tags.p(text, id="result")]


def with_result_link(page: bytes, full_id: str) -> bytes:
    """
    The flattened answer of L{new_message_result} with its mark replaced by
    C{<a href='<id>'><id></a>}, single quotes and all (spec/http.md, POST
    new_message, Compatibility: exact); the id escaped for both places.
    Notices are escaped text, so the mark appears once, in the content.
    """
    escaped = html.escape(full_id, quote=True)
    link = f"<a href='{escaped}'>{escaped}</a>".encode("utf-8")
    return page.replace(f"<!--{RESULT_LINK}-->".encode("ascii"), link, 1)


def new_queue_content(root: str) -> list[Any]:
    """
    The new-queue form.
    """

    def checks(key: str) -> Tag:
        return tags.span(*[
            tags.label(tags.input(type="checkbox", name=f"queue[{key}][]", value=str(n)), str(n))
            for n in range(1, 5)
        ])

    def row(label: str, control: Any) -> Tag:
        return tags.div(tags.label(label), control, class_="field")

    return [
        tags.h1("New Queue"),
        tags.form(
            row("Name", tags.input(type="text", name="queue[name]", id="queue_name")),
            row("Script", tags.input(type="text", name="queue[script]", id="queue_script")),
            row("Num workers", tags.input(type="text", name="queue[num_workers]", value="1", id="queue_num_workers")),
            row("Exec prefix", tags.input(type="text", name="queue[exec_prefix]", value="bash -lc ",
                                          id="queue_exec_prefix")),
            row("Coalesce params", checks("coalesce_params")),
            row("Blocking params", checks("blocking_params")),
            tags.div(tags.input(type="submit", value="Create Queue"), class_="field submit"),
            method="post",
            action=url(root, "new_queue"),
            id="new-queue-form",
        ),
        tags.h2("Link a queue config"),
        tags.form(
            row("config.json path (inside the root)", tags.input(type="text", name="queue[json_path]",
                                                                 id="queue_json_path")),
            tags.div(tags.input(type="submit", value="Link Queue"), class_="field submit"),
            method="post",
            action=url(root, "new_queue_link"),
            id="new-queue-link-form",
        ),
    ]


def not_found_content() -> list[Any]:
    """
    The Not Found page.
    """
    return [tags.h2("Not Found")]


# -- tail view


def tail_content(root: str, name: str, msg_id: str, title: str, log_url: str, state_url: str,
                 text: str, offset: int, top: int, bottom: int, total: int) -> list[Any]:
    """
    The tail view: the end of a log with its colours, and what the tail
    script needs to follow it (C{data-*} attributes of C{#log}).
    """
    return [
        tags.div(
            tags.a(f"{name} : {msg_id}", href=url(root, "q", name, msg_id)),
            " ", tags.span(title, class_="log-name"),
            " ", tags.span(f"Lines {top}-{bottom} of {total}", id="lines"),
            " ", tags.label(tags.input(type="checkbox", id="tail-scroll", checked="checked"),
                            " Tail scroll to bottom", for_="tail-scroll"),
            " ", tags.a("raw", href=log_url, id="raw-log"),
            id="tail-header",
        ),
        # The newline right after <pre> is dropped by HTML parsers: one more
        # keeps a first empty log line visible.
        tags.pre("\n", *ansi_to_tags(text), id="log", class_="log", **{
            "data-log-url": log_url,
            "data-state-url": state_url,
            "data-offset": str(offset),
        }),
    ]
