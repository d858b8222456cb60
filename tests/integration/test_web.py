"""
The web interface of the real daemon, driven with curl on loopback: home,
C{/q.json}, C{new_message}, the message JSON, a ranged download and the tail
view of a script's coloured log.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.httphead import parse_head
from tests.integration.conftest import Daemon, wait_for

pytestmark = pytest.mark.integration


def curl(daemon: Daemon, path: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    """
    C{curl -s -i <args> http://127.0.0.1:<port><path>}: status, headers,
    body.
    """
    out = subprocess.run(
        ["curl", "-s", "-i", "--max-time", "20", *args, f"http://127.0.0.1:{daemon.port}{path}"],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    code, headers = parse_head(head)
    return code, headers, body


def test_web_against_the_daemon(daemon: Daemon, tmp_path):
    code, headers, body = curl(daemon, "/")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert re.search(rb"QUEUEMGR:.*OPERATIONAL", body)

    daemon.queue_with_script(
        "web",
        """
        printf 'plain <b>\\n\\033[31mred\\033[0m text\\n'
        echo "done web ok" >&3
        """,
    )
    code, headers, body = curl(daemon, "/q.json")
    data = json.loads(body)
    assert data["status"] == "OPERATIONAL" and data["queues"][0]["name"] == "web"

    code, headers, body = curl(
        daemon, "/q/web/new_message", "-H", "Content-Type: application/json",
        "--data-binary", json.dumps({"dest": "web", "param1": "hello"}),
    )
    assert code == 200
    status, full = json.loads(body)
    assert status == "ok" and full.startswith(daemon.base_url + "q/web/")
    msg_id = full.rsplit("/", 1)[1]
    daemon.wait_state(full, "done")

    code, headers, body = curl(daemon, f"/q/web/{msg_id}.json")
    msg = json.loads(body)
    assert msg["param1"] == "hello" and msg["state"] == "done" and msg["status"] == "done - web ok"

    code, headers, body = curl(daemon, f"/q/web/{msg_id}/tailviewlog/stdio.log")
    assert code == 200
    assert b"plain &lt;b&gt;" in body and b'<span class="ansi-fg-1">red</span>' in body

    code, headers, whole = curl(daemon, f"/q/web/{msg_id}/log/stdio.log")
    assert code == 200 and b"plain <b>\n" in whole
    at = whole.index(b"<b>")
    code, headers, body = curl(daemon, f"/q/web/{msg_id}/log/stdio.log", "-H", f"Range: bytes={at}-")
    assert code == 206 and body == whole[at:]


def test_download_with_range(daemon: Daemon, tmp_path):
    daemon.queue_with_script("files", 'echo "done ok" >&3\n')
    payload = bytes(range(256)) * 4096  # 1 MiB
    source = daemon.root / "tmp" / "payload.bin"
    source.write_bytes(payload)
    full = daemon.ok("prepmesg", "--dest", "files")
    code, out = daemon.rq("attachmesg", "--msg_id", full, "--pathname", str(source))
    assert code == 0, out
    msg_id = full.rsplit("/", 1)[1]
    path = f"/q/files/{msg_id}/attach/payload.bin"
    code, headers, body = curl(daemon, path)
    assert code == 200 and body == payload
    code, headers, body = curl(daemon, path, "-H", "Range: bytes=1000000-")
    assert code == 206 and headers["content-range"] == f"bytes 1000000-{len(payload) - 1}/{len(payload)}"
    assert body == payload[1000000:]
    code, headers, body = curl(daemon, path, "-H", f"Range: bytes={len(payload)}-")
    assert code == 416 and headers["content-range"] == f"bytes */{len(payload)}"
    code, headers, body = curl(daemon, f"/q/files/{msg_id}", "-d", "_method=commit")
    assert code == 303 and headers["location"].endswith(f"/q/files/{msg_id}")
    wait_for(lambda: daemon.state(full) == "done", 10, what="committed message done")


def test_html_new_message_answer_as_the_original(daemon: Daemon):
    # A form post as curl sends it, without back: a page in UTF-8 whose
    # link to the new message is quoted as the original's (http.md, exact).
    daemon.queue_with_script("form", 'echo "done ok" >&3\n')
    code, headers, body = curl(daemon, "/q/form/new_message", "-d", "x_format=html", "-d", "mesg[dest]=form",
                               "-d", "mesg[_method]=prep")
    assert code == 200 and headers["content-type"] == "text/html;charset=utf-8"
    match = re.search(rb"OK - <a href='([^']+)'>([^<]+)</a>", body)
    assert match and match.group(1) == match.group(2)
    full = match.group(1).decode()
    assert full.startswith(daemon.base_url + "q/form/") and daemon.show(full)["state"] == "prep"
