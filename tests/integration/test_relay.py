"""
Relay between two real daemons on loopback (and across a veth pair between
two network namespaces): plain messages, big attachments, remote dup,
force_remote, loops, a peer that is down, and kill -9 of the sender at each
step of the exchange.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from rqtwisted.root import init_root
from tests.integration import conftest
from tests.integration.conftest import Daemon, free_port, wait_for

pytestmark = pytest.mark.integration

#: Fast retries for the tests (seconds).
RELAY_SETTINGS = {"retry_base": 0.5, "retry_cap": 2, "connect_timeout": 3, "idle_timeout": 20}

#: The far side's queue script: records each attachment's md5, then done.
INBOX_SCRIPT = """
for f in ../attach/*; do
  [ -f "$f" ] && echo "$(basename "$f") $(md5sum < "$f" | cut -d' ' -f1)" >> md5s
done
echo "done received $RQ_PARAM1" >&3
"""


def make_daemon(base: Path, host: str = "localhost", addr: str = "127.0.0.1", **relay: object) -> Daemon:
    """
    A daemon on C{base/root} with fast relay retries (not started).
    """
    base.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(base)
    init_root(str(daemon.root), host=host, port=daemon.port, addr=addr)
    config_path = daemon.root / "config" / "config.json"
    config = json.loads(config_path.read_text())
    config["relay"] = {**RELAY_SETTINGS, **relay}
    config_path.write_text(json.dumps(config))
    return daemon


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """
    Two running daemons: C{a} sends, C{b} has queue C{inbox}.
    """
    a = make_daemon(tmp_path / "a")
    b = make_daemon(tmp_path / "b")
    try:
        a.start()
        b.start()
        b.queue_with_script("inbox", INBOX_SCRIPT)
        yield a, b
    finally:
        a.teardown()
        b.teardown()
        for d in (a, b):
            if d.proc is not None and d.proc.returncode not in (0, None):
                print(d.log_text())


def remote_of(daemon: Daemon, full_id: str) -> str:
    """
    The remote id in a relayed message's status (the 4th word).
    """
    out = daemon.statusmesg(full_id)
    assert out[0].startswith("ok relayed - "), out
    return out[0].split()[3]


def far_ids(daemon: Daemon, queue: str = "inbox") -> list[str]:
    """
    Every message of a queue on the far side, all states.
    """
    with urllib.request.urlopen(f"{daemon.base_url}q/{queue}.json?limit=0", timeout=10) as r:
        data = json.loads(r.read())
    ids = []
    for state, entries in data["messages"].items():
        ids.extend((state, e["msg_id"]) for e in entries)
    return ids


def committed(daemon: Daemon, queue: str = "inbox") -> list[str]:
    return [i for s, i in far_ids(daemon, queue) if s != "prep"]


def post_json(daemon: Daemon, queue: str, mesg: dict) -> list:
    req = urllib.request.Request(
        f"{daemon.base_url}q/{queue}/new_message",
        data=json.dumps(mesg).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def relay_log(daemon: Daemon, full_id: str) -> str:
    return (daemon.msg_dir(full_id) / "job" / "stdio.log").read_text()


def test_plain_message(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    full = a.ok("sendmesg", "--dest", f"{b.base_url}q/inbox", "--relay-ok", "--param1", "hello", "--src", "a")
    assert full.startswith(f"{a.base_url}q/relay/")
    a.wait_state(full, "relayed", 20)
    remote = remote_of(a, full)
    assert remote.startswith(f"{b.base_url}q/inbox/")
    b.wait_state(remote, "done", 20)
    msg = b.show(remote)
    assert (msg["param1"], msg["src"], msg["count"], msg["orig_msg_id"]) == ("hello", "a", 1, full)
    assert msg["dest"] == f"{b.base_url}q/inbox"
    assert not (a.msg_dir(full) / "job" / "relay_id").exists()


def test_three_attachments_one_big(pair: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    a, b = pair
    files = {
        "small.txt": b"hello world\n",
        "empty": b"",
        "big.bin": None,
    }
    md5s = {}
    for name, data in files.items():
        path = tmp_path / name
        if data is None:
            digest = hashlib.md5()
            block = os.urandom(1 << 20)
            with open(path, "wb") as f:
                for i in range(200):
                    chunk = block[i:] + block[:i]
                    f.write(chunk)
                    digest.update(chunk)
            md5s[name] = digest.hexdigest()
        else:
            path.write_bytes(data)
            md5s[name] = hashlib.md5(data).hexdigest()
    full = a.ok("prepmesg", "--dest", f"{b.base_url}q/inbox", "--relay-ok", "--param1", "files")
    for name in files:
        a.ok("attachmesg", "--msg_id", full, "--pathname", str(tmp_path / name))
    a.ok("commitmesg", "--msg_id", full)
    a.wait_state(full, "relayed", 120)
    remote = remote_of(a, full)
    b.wait_state(remote, "done", 60)
    got = dict(line.split() for line in (b.msg_dir(remote) / "job" / "md5s").read_text().splitlines())
    assert got == md5s
    assert {n: v["md5"] for n, v in b.show(remote)["_attachments"].items()} == md5s
    log = relay_log(a, full)
    # Between two rqtwisted hosts the big file takes the resumable PUT.
    assert f"attach big.bin ({200 << 20} bytes, resumable from 0)" in log, log
    assert "attach small.txt (12 bytes, multipart)" in log, log


def test_remote_dup(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    dest = f"{b.base_url}q/inbox"
    a.queue_with_script(
        "dupper",
        f"""
        echo "dup 0-X-{dest}" >&3
        read -r reply <&4
        echo "$reply" > reply
        case $reply in ok*) echo "done dup ${{reply#ok }}" >&3 ;; *) echo "err $reply" >&3 ;; esac
        """,
    )
    full = a.send("dupper", "--param1", "duped")
    a.wait_state(full, "done", 20)
    copy = a.statusmesg(full)[0].split()[-1]
    assert copy.startswith(f"{a.base_url}q/relay/")
    a.wait_state(copy, "relayed", 20)
    remote = remote_of(a, copy)
    b.wait_state(remote, "done", 20)
    msg = b.show(remote)
    assert msg["param1"] == "duped" and msg["orig_msg_id"] == full


def test_local_dest_and_force_remote(pair: tuple[Daemon, Daemon]) -> None:
    """
    A dest on the sender itself takes the local path, unless force_remote:
    then it goes over HTTP to itself.
    """
    a, _ = pair
    a.queue_with_script("inbox", INBOX_SCRIPT)
    dest = f"{a.base_url}q/inbox"
    local = a.ok("sendmesg", "--dest", dest, "--relay-ok", "--param1", "l")
    forced = a.ok("sendmesg", "--dest", dest, "--relay-ok", "--param1", "f", "--force_remote", "1")
    for full, how in ((local, "local"), (forced, "remote")):
        a.wait_state(full, "relayed", 20)
        copy = remote_of(a, full)
        assert copy.startswith(f"{dest}/")
        a.wait_state(copy, "done", 20)
        log = relay_log(a, full)
        assert f"attempting {how} {dest}" in log
        assert ("FORCE REMOTE" in log) == (how == "remote")
        assert "force_remote" not in a.show(copy)


def test_relay_loop(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    dest = f"{b.base_url}q/inbox"
    status, full = post_json(a, "relay", {"dest": dest, "orig_msg_id": f"{dest}/20200101.0000.00.000.1"})
    assert status == "ok"
    a.wait_state(full, "err", 20)
    assert a.statusmesg(full) == ["ok err - Relay loop detected: RQ_DEST queue same as RQ_ORIG_MSG_ID"]
    assert committed(b) == []


def test_peer_down_then_up(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    assert b.terminate() == 0
    full = a.ok("sendmesg", "--dest", f"{b.base_url}q/inbox", "--relay-ok", "--param1", "late")

    def retried() -> bool:
        msg = a.show(full)
        return msg["state"] == "que" and msg["count"] >= 2

    wait_for(retried, 20, what="two failed attempts")
    status = a.statusmesg(full)[0]
    assert "cannot connect" in status, status
    b.start()
    a.wait_state(full, "relayed", 30)
    remote = remote_of(a, full)
    b.wait_state(remote, "done", 20)
    assert len(committed(b)) == 1


# -- kill -9 of the sender at each step


class HoldingProxy:
    """
    An HTTP proxy in front of a daemon that can hold one step of the relay
    exchange (after the far side answered it, before the answer goes back)
    until released; the far daemon's URLs in answers are rewritten to the
    proxy's.
    """

    def __init__(self, target: Daemon) -> None:
        self.target = target
        self.port = free_port()
        self.hold_step: str | None = None
        #: Cut the next resumable PUT carrying bytes after this many.
        self.cut_put_at: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self.steps: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def _step(self) -> str:
                path = self.path
                if self.command == "GET" and path.endswith("/state.json"):
                    return "state"
                if path.endswith("/new_message"):
                    return "prep"
                if "/attach/" in path:
                    return "attach"
                return "commit"

            def _forward(self) -> None:
                step = self._step()
                proxy.steps.append(step)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                if self.command == "PUT" and body and proxy.cut_put_at is not None:
                    # Half the chunk reaches the far side, then the line dies.
                    cut, proxy.cut_put_at = proxy.cut_put_at, None
                    proxy.steps.append("cut")
                    with socket.create_connection(("127.0.0.1", proxy.target.port)) as raw:
                        head = f"PUT {self.path} HTTP/1.1\r\nHost: localhost\r\n"
                        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
                        raw.sendall(head.encode() + body[:cut])
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                data = data.replace(
                    f"localhost:{proxy.target.port}".encode(), f"localhost:{proxy.port}".encode()
                )
                if proxy.hold_step == step:
                    proxy.hold_step = None
                    proxy.held.set()
                    proxy.release.wait(60)
                    return  # the answer is lost: close without one
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}/"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("step", ["prep", "attach", "commit"])
def test_kill9_at_each_step(pair: tuple[Daemon, Daemon], tmp_path: Path, step: str) -> None:
    """
    The sender dies (kill -9) while a step's answer is on its way; after a
    restart the message is relayed once: no loss, no duplicate.
    """
    a, b = pair
    proxy = HoldingProxy(b)
    try:
        proxy.hold_step = step
        attachment = tmp_path / "file.bin"
        attachment.write_bytes(os.urandom(3 << 20))
        full = a.ok("prepmesg", "--dest", f"{proxy.url}q/inbox", "--relay-ok", "--param1", step)
        a.ok("attachmesg", "--msg_id", full, "--pathname", str(attachment))
        a.ok("commitmesg", "--msg_id", full)
        assert proxy.held.wait(30), f"step {step} never reached; steps {proxy.steps}"
        a.kill9()
        proxy.release.set()
        a.start()
        a.wait_state(full, "relayed", 40)
        remote = remote_of(a, full)
        [only] = committed(b)
        assert remote.endswith(only)
        b.wait_state(f"{b.base_url}q/inbox/{only}", "done", 20)
        got = (b.root / b.show(f"{b.base_url}q/inbox/{only}")["path"] / "job" / "md5s").read_text().split()
        assert got == ["file.bin", hashlib.md5(attachment.read_bytes()).hexdigest()]
        if step != "prep":
            assert "state" in proxy.steps  # the restart asked before re-sending
    finally:
        proxy.close()


def test_resumable_upload_resumes_after_cut(pair: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    """
    A resumable upload cut mid-way is resumed where the far side stopped:
    the retry sends only the missing bytes.
    """
    a, b = pair
    proxy = HoldingProxy(b)
    try:
        proxy.cut_put_at = 5 << 20
        attachment = tmp_path / "big.bin"
        attachment.write_bytes(os.urandom(12 << 20))
        full = a.ok("prepmesg", "--dest", f"{proxy.url}q/inbox", "--relay-ok")
        a.ok("attachmesg", "--msg_id", full, "--pathname", str(attachment))
        a.ok("commitmesg", "--msg_id", full)
        a.wait_state(full, "relayed", 40)
        log = relay_log(a, full)
        resumed = [line for line in log.splitlines() if "attach big.bin" in line]
        assert "resumable from 0" in resumed[0], log
        assert any("resumable from" in line and "resumable from 0" not in line for line in resumed[1:]), log
        remote = remote_of(a, full).replace(f":{proxy.port}/", f":{b.port}/")
        b.wait_state(remote, "done", 20)
        got = (b.msg_dir(remote) / "job" / "md5s").read_text().split()
        assert got == ["big.bin", hashlib.md5(attachment.read_bytes()).hexdigest()]
        assert len(committed(b)) == 1
    finally:
        proxy.close()


# -- across a real interface


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = subprocess.run(["ip", "netns", "add", "rqprobe"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", "rqprobe"], capture_output=True)
    return None


@pytest.fixture
def netns_pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """
    Two daemons in two network namespaces joined by a veth pair
    (10.213.7.1 and 10.213.7.2).
    """
    reason = _can_netns()
    if reason is not None:
        pytest.skip(reason)
    tag = f"{os.getpid() % 10000}"
    ns = (f"rqa{tag}", f"rqb{tag}")
    addrs = ("10.213.7.1", "10.213.7.2")

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    daemons: list[Daemon] = []
    original = conftest.TWISTD_CMD
    try:
        for name in ns:
            ip("netns", "add", name)
            ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        for name, dev, addr in zip(ns, (f"va{tag}", f"vb{tag}"), addrs):
            ip("link", "set", dev, "netns", name)
            ip("netns", "exec", name, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            ip("netns", "exec", name, "ip", "link", "set", dev, "up")
        for name, addr, sub in zip(ns, addrs, ("a", "b")):
            d = make_daemon(tmp_path / sub, host=addr, addr=addr)
            conftest.TWISTD_CMD = ["ip", "netns", "exec", name, *original]
            try:
                d.start()
            finally:
                conftest.TWISTD_CMD = original
            daemons.append(d)
        yield daemons[0], daemons[1]
    finally:
        conftest.TWISTD_CMD = original
        for d in daemons:
            d.teardown()
        for name in ns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", f"va{tag}"], capture_output=True)


def test_relay_across_network_namespaces(netns_pair: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    a, b = netns_pair
    b.queue_with_script("inbox", INBOX_SCRIPT)
    dest = "http://10.213.7.2:%d/q/inbox" % b.port
    attachment = tmp_path / "payload"
    attachment.write_bytes(os.urandom(2 << 20))
    full = a.ok("prepmesg", "--dest", dest, "--relay-ok", "--param1", "netns")
    a.ok("attachmesg", "--msg_id", full, "--pathname", str(attachment))
    a.ok("commitmesg", "--msg_id", full)
    a.wait_state(full, "relayed", 30)
    remote = remote_of(a, full)
    assert remote.startswith(f"{dest}/")
    b.wait_state(remote, "done", 20)
    got = (b.msg_dir(remote) / "job" / "md5s").read_text().split()
    assert got == ["payload", hashlib.md5(attachment.read_bytes()).hexdigest()]
