"""
The web interface in headless Chromium against the real daemon: the home
page and queue page keep themselves live, a message created through the
new-message form shows its coloured log in the tail view while the script
runs. Screenshots go to C{<tmp_path>/shots/}.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.integration.conftest import Daemon

pytestmark = pytest.mark.integration

Shots = Callable[[Any, str], Path]


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def base(daemon: Daemon) -> str:
    return f"http://127.0.0.1:{daemon.port}/"


def later() -> str:
    """
    A due time an hour away: the message stays in que.
    """
    return str(int(time.time()) + 3600)


def short(full_id: str) -> str:
    return full_id.rsplit("/", 1)[1]


def test_home_and_queue_pages_stay_live(daemon: Daemon, browser: Any, page: Any, shots: Shots) -> None:
    """
    Home: the QUEUEMGR line, the queue row; counts follow new messages
    without a reload. Its queue link leads to the queue page, whose counts
    and lists (grouped by day, with the que entry forms) follow too.
    """
    daemon.queue_with_script("colors", 'echo "done fine" >&3\n')
    first = daemon.send("colors", "--due", later())

    page.goto(base(daemon))
    assert re.search(r"QUEUEMGR:.*OPERATIONAL", page.content())
    expect(page.locator("#status")).to_have_text("OPERATIONAL")
    expect(page.locator("#status-colors")).to_have_text("UP")
    expect(page.locator("#status-colors")).to_have_class(re.compile(r"\bgreen\b"))
    expect(page.locator("#que-colors")).to_have_text("1")
    assert page.locator("#version").inner_text().startswith("v")

    # home.js refreshes from q.json: a new message shows up in the count,
    # and the server time moves on -- without reloading the page.
    page.evaluate("window.rqMarker = 1")
    time_before = page.locator("#time").inner_text()
    second = daemon.send("colors", "--due", later())
    expect(page.locator("#que-colors")).to_have_text("2", timeout=5_000)
    expect(page.locator("#time")).not_to_have_text(time_before, timeout=5_000)
    assert page.evaluate("window.rqMarker") == 1
    # A queue created meanwhile gets its row (the page reloads itself).
    daemon.queue_with_script("another", 'echo "done fine" >&3\n')
    expect(page.locator("#status-another")).to_have_text("UP", timeout=5_000)
    shots(page, "home")

    # Pause the queue from its page in another tab: the home page follows,
    # and its admin form now offers "resume" -- which works.
    other = browser.new_page()
    try:
        other.goto(base(daemon) + "q/colors")
        with other.expect_navigation():
            other.locator("form.admin input[name='pause']").click()
        expect(other.locator("#flash-notice")).to_contain_text("Successfully paused queue colors")
        expect(other.locator("#status")).to_have_text("PAUSE")
        expect(other.locator("#status")).to_have_class(re.compile(r"\borange\b"))
    finally:
        other.close()
    expect(page.locator("#status-colors")).to_have_text("PAUSE", timeout=5_000)
    expect(page.locator("#status-colors")).to_have_class(re.compile(r"\borange\b"))
    resume = page.locator("#queue-colors form.admin input[name='resume']")
    expect(resume).to_have_count(1)
    expect(page.locator("#queue-colors form.admin input[name='pause']")).to_have_count(0)
    shots(page, "home_paused")
    with page.expect_navigation():
        resume.click()
    assert page.url == base(daemon)
    expect(page.locator("#flash-notice")).to_contain_text("Successfully resumed queue colors")
    expect(page.locator("#status-colors")).to_have_text("UP")
    expect(page.locator("#queue-colors form.admin input[name='pause']")).to_have_count(1)

    page.locator("#queue-colors a[href$='q/colors']").first.click()
    page.wait_for_url(base(daemon) + "q/colors")
    assert page.title() == "RQ :: colors"
    expect(page.locator("#que_size")).to_have_text("2")
    expect(page.locator("#list-que li.msg")).to_have_count(2)

    # queue.js refreshes from q/colors.json (without reloading the page).
    page.evaluate("window.rqMarker = 2")
    third = daemon.send("colors", "--due", later())
    expect(page.locator("#que_size")).to_have_text("3", timeout=5_000)
    assert page.evaluate("window.rqMarker") == 2
    entries = page.locator("#list-que li.msg")
    expect(entries).to_have_count(3)
    # Newest first, under the day heading of its id.
    expect(entries.first.locator("a.msg-link")).to_have_text(short(third))
    expect(page.locator("#list-que h4.day").first).to_have_text(short(third)[:8])
    expect(entries.first.locator("a.msg-link")).to_have_attribute("href", f"/q/colors/{short(third)}")
    expect(entries.first.locator(".dest")).to_have_text(re.compile("colors"))
    due = entries.first.locator(".due").inner_text()
    assert re.fullmatch(r"3[56]\d\ds", due), due
    expect(entries.first.locator("input[value='Run now']")).to_have_count(1)
    expect(entries.first.locator("input[value='Delete']")).to_have_count(1)
    shots(page, "queue")

    # What the script built is what the server renders (due times aside:
    # the two clocks are read at different moments).
    same = page.evaluate(
        """async () => {
            const html = await (await fetch(location.href)).text();
            const served = new DOMParser().parseFromString(html, "text/html");
            const norm = (list) => {
                const copy = list.cloneNode(true);
                copy.querySelectorAll(".due").forEach((d) => { d.textContent = "N"; });
                // (the browser's form autofill may leave empty style attributes)
                copy.querySelectorAll("[style='']").forEach((e) => e.removeAttribute("style"));
                return copy.innerHTML;
            };
            const live = document.getElementById("list-que");
            return [live.rqKey !== undefined, norm(live), norm(served.getElementById("list-que"))];
        }"""
    )
    assert same[0], "queue.js has not rebuilt the list"
    assert same[1] == same[2], "\n" + same[1] + "\n" + same[2]

    # "Run now" on the oldest: it runs at once and ends done.
    oldest = entries.filter(has=page.locator(f"a.msg-link:text-is('{short(first)}')"))
    oldest.locator("input[value='Run now']").click()
    daemon.wait_state(first, "done", timeout=15)
    page.goto(base(daemon) + "q/colors")
    expect(page.locator("#done_size")).to_have_text("1")
    expect(page.locator("#list-done li.msg a.msg-link")).to_have_text(short(first))
    expect(page.locator("#que_size")).to_have_text("2")
    assert daemon.state(second) == "que"
    # Nothing changed since the server rendered the lists: queue.js keeps
    # them (rebuilding them under the pointer could swallow a click).
    page.evaluate("window.rqFirstEntry = document.querySelector('#list-que li.msg')")
    uptime = page.locator("#uptime").inner_text()
    expect(page.locator("#uptime")).not_to_have_text(uptime, timeout=5_000)
    assert page.evaluate("document.querySelector('#list-que li.msg') === window.rqFirstEntry")

    # "Delete" from the list removes a queued message.
    entries = page.locator("#list-que li.msg")
    with page.expect_navigation():
        entries.filter(has=page.locator(f"a.msg-link:text-is('{short(second)}')")).locator(
            "input[value='Delete']"
        ).click()
    assert page.url == base(daemon) + "q/colors"
    expect(page.locator("#que_size")).to_have_text("1")
    expect(page.locator("#list-que li.msg")).to_have_count(1)
    expect(page.locator("#flash-notice")).not_to_be_empty()
    shots(page, "queue_after")


COLOUR_SCRIPT = r"""
printf '\033[1;32mstarting\033[0m job for %s\n' "$RQ_PARAM1"
for i in 1 2 3; do printf '\033[3%dmcolour line %d\033[0m\n' $i $i; sleep 0.2; done
for i in $(seq 1 40); do echo "filler line $i"; done
# Wait (at most 30 s) for the test to open the tail view.
for n in $(seq 300); do [ -e "{gate}" ] && break; sleep 0.1; done
printf '\033[41;37m white on red \033[0m see https://example.com/docs\n'
for i in 4 5 6; do printf '\033[3%dmcolour line %d\033[0m\n' $i $i; sleep 0.3; done
printf 'no newline at the end'
echo "done coloured" >&3
"""


def test_new_message_form_and_live_tail(daemon: Daemon, page: Any, shots: Shots, tmp_path: Path) -> None:
    """
    Create a message with the new-message form; its message page embeds
    the tail view; the tail view shows the coloured output (spans with the
    ansi classes) and follows the log while the script runs, until done.
    """
    gate = tmp_path / "gate"
    daemon.queue_with_script("colors", COLOUR_SCRIPT.replace("{gate}", str(gate)))

    page.goto(base(daemon) + "q/colors/new_message")
    expect(page.locator("#mesg_dest")).to_have_value(re.compile(r"q/colors$"))
    expect(page.locator("#mesg__method_commit")).to_be_checked()
    page.fill("#mesg_param1", "the browser")
    shots(page, "new_message")
    page.click("#mesg_submit")
    result = page.locator("#result a")
    expect(result).to_have_count(1)
    full = result.get_attribute("href")
    assert full and re.search(r"/q/colors/\d{8}\.\d{4}\.\d{2}\.\d{3}\.\d+$", full), full
    daemon.wait_state(full, "run", timeout=15)

    # The message page, with the tail view in its frame.
    page.goto(base(daemon) + f"q/colors/{short(full)}")
    expect(page.locator("#msg-state")).to_have_text("run")
    frame = page.frame_locator("#tail-frame")
    expect(frame.locator("#log")).to_contain_text("filler line 40", timeout=10_000)
    expect(frame.locator("#log span.ansi-fg-2.ansi-bright")).to_have_text("starting")
    expect(frame.locator("#log span.ansi-fg-1")).to_have_text("colour line 1")
    shots(page, "message_running")

    # The queue page lists it under run, with its Destroy button.
    page.goto(base(daemon) + "q/colors")
    running = page.locator("#list-run li.msg")
    expect(running).to_have_count(1)
    expect(running.locator("a.msg-link")).to_have_text(short(full))
    expect(running.locator("input[value='Destroy']")).to_have_count(1)
    expect(page.locator("#run_size")).to_have_class(re.compile(r"\bnonzero\b"))
    shots(page, "queue_running")

    # The full tail view, live.
    page.goto(base(daemon) + f"q/colors/{short(full)}")
    page.click("#full-tail")
    page.wait_for_url(re.compile(r"/tailviewlog/stdio\.log$"))
    log = page.locator("#log")
    expect(log).to_contain_text("filler line 40")
    expect(log).to_have_class(re.compile(r"\btailing\b"))
    expect(page.locator("#tail-scroll")).to_be_checked()
    assert "white on red" not in log.inner_text()
    # Tail scroll starts at the bottom of what the server rendered.
    expect(page.locator("#lines")).to_have_text(re.compile(r"^Lines \d+-(\d+) of \1$"))
    shots(page, "tail_waiting")

    gate.write_text("go")
    expect(log.locator("span.ansi-bg-1.ansi-fg-7")).to_have_text(" white on red ", timeout=10_000)
    expect(log.locator("a[href='https://example.com/docs']")).to_have_count(1)
    expect(log.locator("span.ansi-fg-3")).to_have_text(["colour line 3"])
    expect(log.locator("span.ansi-fg-6")).to_have_text("colour line 6", timeout=10_000)
    expect(log).to_have_class(re.compile(r"\bfinished\b"), timeout=10_000)
    text = log.inner_text()
    assert text.rstrip().endswith("colour line 6\nno newline at the end")
    assert text.count("filler line 40\n") == 1
    assert "\x1b" not in text
    # The line count covers the whole log (the daemon's own lines too),
    # the unfinished last line included; the view ends at the last line.
    assert daemon.wait_state(full, "done") == "done"
    data = (daemon.msg_dir(full) / "job" / "stdio.log").read_bytes()
    assert not data.endswith(b"\n")
    total = data.count(b"\n") + 1
    expect(page.locator("#lines")).to_have_text(re.compile(rf"^Lines \d+-{total} of {total}$"))
    # Tail scroll kept the end in view.
    at_bottom = page.evaluate(
        """() => {
            const pre = document.getElementById("log");
            const doc = document.scrollingElement;
            const preEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 2;
            const pageEnd = window.scrollY + window.innerHeight >= doc.scrollHeight - 2;
            return preEnd && pageEnd;
        }"""
    )
    assert at_bottom
    shots(page, "tail_done")

    page.goto(base(daemon) + f"q/colors/{short(full)}")
    expect(page.locator("#msg-state")).to_have_text("done")
    expect(page.locator("#msg-param1")).to_have_text("the browser")
    expect(page.frame_locator("#tail-frame").locator("#log span.ansi-fg-6")).to_have_text("colour line 6")
    shots(page, "message_done")
    # Links in the frame open in the whole window.
    with page.expect_navigation():
        page.frame_locator("#tail-frame").locator("#raw-log").click()
    assert page.url.endswith(f"/q/colors/{short(full)}/log/stdio.log")
    assert "colour line 6" in page.content()


def test_relative_root_and_basic_auth(tmp_path: Path, page: Any, shots: Shots) -> None:
    """
    Under a relative_root and HTTP Basic auth (the page opened as
    http://user:password@host/...) the pages load their CSS and scripts, and
    the scripts' requests reach the JSON and log routes (no failed request).
    """
    import json

    d = Daemon(tmp_path)
    config = d.root / "config"
    config.mkdir(parents=True)
    (config / "config.json").write_text(json.dumps({
        "env": "production",
        "host": "localhost",
        "port": d.port,
        "relative_root": "/therq/",
        "basic_auth": {"realm": "rq test", "users": {"rq": "s3cret"}},
    }))
    failed: list[str] = []
    # (416 is the tail view's "nothing new yet" answer.)
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 and r.status != 416 else None)
    try:
        d.start()
        (d.root / "code").mkdir(exist_ok=True)
        d.queue_with_script("colors", 'printf "\\033[32mgreen\\033[0m\\n"\necho "done fine" >&3\n')
        root = f"http://rq:s3cret@127.0.0.1:{d.port}/therq/"
        page.goto(root)
        assert re.search(r"QUEUEMGR:.*OPERATIONAL", page.content())
        expect(page.locator("body")).to_have_attribute("data-root", "/therq/")
        # The stylesheet applied (dark header), the favicon is served.
        header_bg = page.evaluate("getComputedStyle(document.getElementById('header')).backgroundColor")
        assert header_bg == "rgb(36, 41, 47)"
        expect(page.locator("#env")).to_have_text("production")
        d.ok("sendmesg", "--dest", "colors", "--due", later())
        expect(page.locator("#que-colors")).to_have_text("1", timeout=5_000)
        shots(page, "home_therq")

        page.locator("#queue-colors a[href='/therq/q/colors']").click()
        page.wait_for_url(re.compile(r"/therq/q/colors$"))
        d.ok("sendmesg", "--dest", "colors", "--due", later())
        expect(page.locator("#que_size")).to_have_text("2", timeout=5_000)
        expect(page.locator("#list-que li.msg a.msg-link").first).to_have_attribute(
            "href", re.compile(r"^/therq/q/colors/\d{8}\.")
        )
        # The tail view's requests (log, state.json) go through as well.
        done = d.ok("sendmesg", "--dest", "colors")
        d.wait_state(done, "done")
        page.goto(root + f"q/colors/{short(done)}/tailviewlog/stdio.log")
        expect(page.locator("#log")).to_have_class(re.compile(r"\bfinished\b"), timeout=5_000)
        expect(page.locator("#log span.ansi-fg-2")).to_have_text("green")
        favicon = page.evaluate("fetch(location.origin + '/therq/favicon.ico').then((r) => r.status)")
        assert favicon == 200
    finally:
        d.teardown()
    assert failed == []
