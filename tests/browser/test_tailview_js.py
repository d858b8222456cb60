"""
The tail view script (web/static/js/tailview.js) in the browser on fixed
input: ANSI/escape rendering (the same HTML as the server's renderer,
web/ansi.py) and the follow loop against a scripted fetch.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.web.template import flattenString, tags

from rqtwisted.web.ansi import ansi_to_tags

from .conftest import static_text

PAGE = """<!DOCTYPE html>
<html><body>
<span id="lines"></span> <input type="checkbox" id="tail-scroll" checked>
<pre id="log" style="height: 10em; overflow: auto"></pre>
<div id="server"></div><div id="client"></div>
</body></html>"""

ESC = "\x1b"

#: Log text -> what the page must show (class names / text checked below).
SAMPLES = [
    "plain text\n",
    "a < b & c > d \"quoted\" 'single'\n",
    f"{ESC}[31mred{ESC}[0m normal\n",
    f"{ESC}[1;32mbright green{ESC}[m\n",
    f"{ESC}[33;44myellow on blue{ESC}[39m default on blue{ESC}[49m\n",
    f"{ESC}[91mbright red via 9x{ESC}[22m not bright{ESC}[0m\n",
    f"{ESC}[35mmagenta\nstill magenta on the next line\n",
    "see https://example.com/a?b=1&c=<2> and http://x.test/path).\n",
    f"{ESC}[36mhttps://example.com/in-colour{ESC}[0m\n",
    f"cursor {ESC}[2K{ESC}[1Gmoves and {ESC}]0;title{ESC}\\ osc dropped\n",
    "bell\x07 backspace\x08 cr\r\n tab\tkept\n",
    f"{ESC}[?25lprivate mode ignored{ESC}[?25h\n",
    f"{ESC}[38;5;196m256 colours ignored{ESC}[0m\n",
    "unicode é ü ✓ 日本\n",
    # Python's and JavaScript's \\s differ: the renderers must not.
    "http://a\x85b http://c\ufeffd http://e\u3000f\n",
]


def server_html(text: str) -> str:
    """
    What web/ansi.py renders for C{text}, as HTML.
    """
    out: list[bytes] = []
    flattenString(None, tags.div(*ansi_to_tags(text))).addCallback(out.append)
    html = out[0].decode("utf-8")
    return html[len("<div>") : -len("</div>")]


@pytest.fixture
def tail_page(page: Any) -> Any:
    page.set_content(PAGE)
    page.add_script_tag(content=static_text("js/tailview.js"))
    return page


@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_same_html_as_server(tail_page: Any, text: str) -> None:
    """
    The script renders a log exactly like the server-side renderer (same
    DOM once parsed).
    """
    client, server = tail_page.evaluate(
        """([text, serverHtml]) => {
            const s = document.getElementById("server");
            const c = document.getElementById("client");
            s.innerHTML = serverHtml;
            c.innerHTML = new RQTail.AnsiRenderer().render(text);
            return [c.innerHTML, s.innerHTML];
        }""",
        [text, server_html(text)],
    )
    assert client == server
    assert ESC not in client


#: Pieces log text is made of: escapes (whole, cut, odd), markup, URLs,
#: control and odd white space characters.
PIECES = st.sampled_from([
    "\x1b[", "\x1b", "[", "m", ";", "0", "1", "22", "3", "31", "4", "47", "9", "97", "10", "39", "49", "?",
    "\x1b[0m", "\x1b[1;3", "\x1b[K", "\x1b]0;t\x07", "\x1b\\", "\x1bM",
    "http://", "https://", "h.test/", "a", "(", ")", ".", ",", "&", "<", ">", '"', "'", "`",
    " ", "\t", "\n", "\r", "\x00", "\x08", "\x0b", "\x1c", "\x7f", "\x85", "\xa0", "\u2028", "\ufeff",
    "\u00e9", "\u2713",
])
TEXTS = st.lists(st.lists(PIECES, max_size=30).map("".join), min_size=20, max_size=20)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=TEXTS)
def test_same_html_as_server_fuzzed(tail_page: Any, texts: list[str]) -> None:
    """
    Any mix of escapes, markup, URLs and control characters renders the
    same in the browser as on the server.
    """
    results = tail_page.evaluate(
        """(pairs) => pairs.map(([text, serverHtml]) => {
            const s = document.getElementById("server");
            const c = document.getElementById("client");
            s.innerHTML = serverHtml;
            c.innerHTML = new RQTail.AnsiRenderer().render(text);
            return [text, c.innerHTML, s.innerHTML];
        })""",
        [[t, server_html(t)] for t in texts],
    )
    for text, client, server in results:
        assert client == server, repr(text)


def test_colours_and_links(tail_page: Any) -> None:
    """
    SGR codes become the ansi-* classes; the state carries over pieces; URLs
    become links; markup in the log is text.
    """
    html = tail_page.evaluate(
        """() => {
            const r = new RQTail.AnsiRenderer();
            return [
                r.render("\\x1b[1;31mred "),
                r.render("more red\\n"),
                r.render("\\x1b[0m<b>x</b> https://h.test/a&b\\n"),
                r.render("\\x1b[42;37mwhite on green\\x1b[0m\\n"),
            ];
        }"""
    )
    assert html[0] == '<span class="ansi-fg-1 ansi-bright">red </span>'
    assert html[1] == '<span class="ansi-fg-1 ansi-bright">more red\n</span>'
    assert html[2] == '&lt;b&gt;x&lt;/b&gt; <a href="https://h.test/a&amp;b" rel="nofollow noopener">https://h.test/a&amp;b</a>\n'
    assert html[3] == '<span class="ansi-fg-7 ansi-bg-2">white on green</span>\n'


def test_count_lines(tail_page: Any) -> None:
    counts = tail_page.evaluate(
        """() => ["", "a", "a\\n", "a\\nb", "a\\nb\\n\\n"].map(RQTail.countLines)"""
    )
    assert counts == [0, 1, 1, 2, 3]


FOLLOW = """async ([pieces, states]) => {
    // A scripted server. pieces: [when, text or {hex}], added to the log one
    // at a time, each when the next request of its kind ("log"/"state")
    // arrives; state.json answers from the list.
    const enc = new TextEncoder();
    let log = enc.encode("old line\\n");   // what the server rendered
    const calls = [];
    const grow = (when) => {
        if (!pieces.length || pieces[0][0] !== when) return;
        const next = pieces.shift()[1];
        const add = next.hex ? Uint8Array.from(next.hex.match(/../g).map((h) => parseInt(h, 16)))
                             : enc.encode(next);
        const out = new Uint8Array(log.length + add.length);
        out.set(log); out.set(add, log.length);
        log = out;
    };
    const fetch = async (url, init) => {
        if (url === "STATE") {
            const state = states.shift();
            calls.push("state:" + state);
            grow("state");
            return new Response(JSON.stringify([state]), {status: 200, headers: {"Content-Type": "application/json"}});
        }
        const start = parseInt(/bytes=(\\d+)-/.exec(init.headers.Range)[1], 10);
        calls.push("log:" + start);
        grow("log");
        if (start >= log.length) {
            return new Response("", {status: 416, headers: {"Content-Range": "bytes */" + log.length}});
        }
        return new Response(log.slice(start), {status: 206, headers: {
            "Content-Range": "bytes " + start + "-" + (log.length - 1) + "/" + log.length}});
    };
    const pre = document.getElementById("log");
    pre.textContent = "old line\\n";
    document.getElementById("lines").textContent = "Lines 41-41 of 41";
    const view = new RQTail.TailView(pre, {logUrl: "LOG", stateUrl: "STATE", offset: log.length, fetch});
    const seen = [];
    const origFeed = view.feed.bind(view);
    view.feed = (bytes) => { origFeed(bytes); seen.push(pre.textContent); };
    await view.run();
    return {
        calls, seen, text: pre.textContent, offset: view.offset, lines: document.getElementById("lines").textContent,
        spans: Array.from(pre.querySelectorAll("span")).map((s) => [s.className, s.textContent]),
        classes: pre.className,
    };
}"""


def test_follow_until_final_state(tail_page: Any) -> None:
    """
    206 answers are appended (offset from Content-Range) and asked again;
    when nothing is new the state decides: live states poll on, the first
    final state gets one more look, then the view stops and shows the held
    back unfinished line. A UTF-8 character split across answers and a
    colour kept across them render right.
    """
    check = "\u2713".encode()  # 3 bytes
    raw = [
        ("log", b"\x1b[32mgreen start "),          # no newline yet: held back
        ("log", b"line one " + check[:1]),          # still none, half a character
        ("log", check[1:] + b"\n"),                # completes the line
        ("state", b"second\n"),                    # arrives while the state is run
        ("state", b"third, unfinished"),            # arrives with the final state
    ]
    pieces = [[when, {"hex": data.hex()}] for when, data in raw]
    ends = []
    at = len(b"old line\n")
    for _, data in raw:
        at += len(data)
        ends.append(at)
    old = len(b"old line\n")
    result = tail_page.evaluate(FOLLOW, [pieces, ["run", "done"]])
    assert result["calls"] == [
        f"log:{old}",         # piece 0
        f"log:{ends[0]}",     # piece 1
        f"log:{ends[1]}",     # piece 2
        f"log:{ends[2]}",     # nothing new
        "state:run",          # live: piece 3 arrives meanwhile, ask again after 1 s
        f"log:{ends[2]}",
        f"log:{ends[3]}",     # nothing new
        "state:done",         # final: piece 4 arrives meanwhile
        f"log:{ends[3]}",     # the one more look finds it
        f"log:{ends[4]}",     # nothing new: stop
    ]
    assert result["text"] == "old line\ngreen start line one \u2713\nsecond\nthird, unfinished"
    assert result["offset"] == ends[4]
    # Nothing of the unfinished line was shown before its newline came.
    assert result["seen"][:2] == ["old line\n", "old line\n"]
    assert result["seen"][2] == "old line\ngreen start line one \u2713\n"
    assert result["spans"][0] == ["ansi-fg-2", "green start line one \u2713\n"]
    assert ["ansi-fg-2", "second\n"] in result["spans"]
    assert ["ansi-fg-2", "third, unfinished"] in result["spans"]
    assert result["classes"] == "finished"
    # 41 lines before, 2 more complete ones and the unfinished last.
    assert result["lines"].startswith("Lines ")
    assert result["lines"].endswith(" of 44")


def test_no_log_yet_then_gone(tail_page: Any) -> None:
    """
    A message whose log never appears: the view polls the state and stops
    at the first final state after one more look at the log.
    """
    result = tail_page.evaluate(
        """async () => {
            const calls = [];
            const fetch = async (url, init) => {
                calls.push(url);
                if (url === "STATE") return new Response('["err"]', {status: 200});
                return new Response("not found", {status: 404});
            };
            const pre = document.getElementById("log");
            pre.textContent = "";
            const view = new RQTail.TailView(pre, {logUrl: "LOG", stateUrl: "STATE", offset: 0, fetch});
            await view.run();
            return {calls, text: pre.textContent, classes: pre.className,
                    lines: document.getElementById("lines").textContent};
        }"""
    )
    assert result["calls"] == ["LOG", "STATE", "LOG"]
    assert result["text"] == ""
    assert result["classes"] == "finished"
    assert result["lines"] == "Lines 0-0 of 0"
