"""
Tests for the pieces of the web app: ANSI colours (L{rqtwisted.web.ansi}),
access control (L{rqtwisted.web.security}), flash cookies
(L{rqtwisted.web.flash}), byte ranges and tails (L{rqtwisted.web.files}) and
the site (L{rqtwisted.web.app.make_site}).
"""

from __future__ import annotations

import base64

from twisted.web.server import Site
from twisted.web.template import flattenString

from rqtwisted.web.ansi import Style, ansi_to_tags, apply_sgr, strip_ansi
from rqtwisted.web.app import make_site, normalize_segments
from rqtwisted.web.files import parse_range, tail_bytes
from rqtwisted.web.flash import COOKIE, FlashSigner, notice
from rqtwisted.web.security import check_access, parse_basic, password_matches
from tests.unit.web_helpers import make_env, result


def html(text: str) -> str:
    return result(flattenString(None, ansi_to_tags(text))).decode()


# -- ansi


def test_plain_text_is_escaped():
    assert html("a <b> & c") == "a &lt;b&gt; &amp; c"


def test_colours_become_spans():
    assert html("\x1b[32mok\x1b[0m done") == '<span class="ansi-fg-2">ok</span> done'
    assert html("\x1b[1;31;47mX\x1b[m") == '<span class="ansi-fg-1 ansi-bg-7 ansi-bright">X</span>'
    assert html("\x1b[91mB") == '<span class="ansi-fg-1 ansi-bright">B</span>'


def test_colour_state_carries_over_lines():
    assert html("\x1b[34mone\ntwo\x1b[39m three") == '<span class="ansi-fg-4">one\ntwo</span> three'


def test_other_escapes_are_dropped():
    assert html("a\x1b[2Kb\x1b]0;title\x07c\x1b[?25ld\x07") == "abcd"
    assert strip_ansi("\x1b[1mbold\x1b[0m") == "bold"


def test_urls_are_linked_and_escaped():
    out = html('see http://h:1/q/x?a=1&b="2" now.')
    assert out.startswith('see <a href="http://h:1/q/x?a=1&amp;b=" rel="nofollow noopener">')
    assert html("javascript:alert(1)") == "javascript:alert(1)"


def test_apply_sgr_resets():
    style = apply_sgr(Style(), "1;32;44")
    assert style == Style(2, 4, True)
    assert apply_sgr(style, "22;49") == Style(2, None, False)
    assert apply_sgr(style, "") == Style()
    assert apply_sgr(style, "x") == style


# -- security


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_parse_basic():
    assert parse_basic(basic("u", "p:q")) == ("u", "p:q")
    assert parse_basic(b"Bearer x") is None
    assert parse_basic(b"Basic !!!") is None
    assert parse_basic(None) is None


def test_passwords_plain_or_sha256():
    assert password_matches("pw", "pw") and not password_matches("pw", "px")
    digest = "sha256:" + "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    assert password_matches(digest, "password") and not password_matches(digest, "Password")
    assert not password_matches(None, "")


def test_check_access():
    auth = {"realm": 'a "q"', "users": {"u": "p"}}
    assert check_access((), None, "1.2.3.4", None) is None
    denied = check_access(("10.",), None, "1.2.3.4", None)
    assert denied.code == 403
    assert check_access(("1.2.",), None, "1.2.3.4", None) is None
    denied = check_access((), auth, "1.2.3.4", basic("u", "x"))
    assert denied.code == 401 and denied.headers == (("WWW-Authenticate", 'Basic realm="a \\"q\\""'),)
    assert check_access((), auth, "1.2.3.4", basic("u", "p")) is None


# -- flash


def test_flash_round_trip_and_forgery():
    signer = FlashSigner(b"x" * 32)
    value = signer.dumps([notice("hi ", ("code", "<x>"))])
    assert signer.loads(value) == [{"kind": "notice", "parts": ["hi ", ["code", "<x>"]]}]
    assert FlashSigner(b"y" * 32).loads(value) == []
    assert signer.loads(value[:-2] + b"AA") == []
    assert signer.loads(b"garbage") == [] and signer.loads(None) == []
    assert notice("x", kind="error")["kind"] == "error"
    assert COOKIE == b"rq_flash"


# -- files


def test_parse_range():
    assert parse_range(None, 10) is None
    assert parse_range(b"bytes=3-", 10) == (3, 9)
    assert parse_range(b"bytes=3-5", 10) == (3, 5)
    assert parse_range(b"bytes=3-50", 10) == (3, 9)
    assert parse_range(b"bytes=-4", 10) == (6, 9)
    assert parse_range(b"bytes=10-", 10) == "unsatisfiable"
    assert parse_range(b"bytes=0-", 0) == "unsatisfiable"
    assert parse_range(b"bytes=0-1,4-5", 10) is None
    assert parse_range(b"items=0-1", 10) is None
    assert parse_range(b"bytes=5-2", 10) is None


def test_tail_bytes_cuts_at_a_line(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"".join(b"%05d\n" % i for i in range(1000)))
    data, start, size, lines = tail_bytes(str(path), 100)
    assert size == 6000 and lines == 1000
    assert data.startswith(b"009") and data.endswith(b"00999\n")
    assert start == 6000 - len(data) and start % 6 == 0
    data, start, size, lines = tail_bytes(str(path), 10**6)
    assert start == 0 and len(data) == 6000


def test_normalize_segments():
    assert normalize_segments([b"", b"q", b"", b".", b"x", b"..", b"t"]) == [b"q", b"t"]
    assert normalize_segments([b"..", b"a"]) == [b"a"]
    assert normalize_segments([b"a/b"]) is None


# -- site


def test_make_site_mounts_uploads(tmp_path):
    instance, spawner, clock, client = make_env(str(tmp_path / "root"))
    site = make_site(instance, instance.settings, None)
    assert isinstance(site, Site)
    web = site.rqweb
    rules = {(rule.rule, tuple(sorted(rule.methods or ()))) for rule in web.app.url_map.iter_rules()}
    assert ("/q/<name>/new_message", ("POST",)) in rules
    assert ("/q/<name>/<msg_id>/attach/new", ("POST",)) in rules
    assert ("/q/<name>/<msg_id>/attach/<att>", ("PUT",)) in rules
    assert site.requestFactory is not Site.requestFactory


def test_daemon_serves_the_web_on_addr_port(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from rqtwisted import tap

    for extra, interface in (([], "127.0.0.1"), (["--addr", "0.0.0.0"], "0.0.0.0")):
        opts = tap.Options()
        opts.parseOptions(["--root", str(tmp_path / "r"), "--port", "4567", *extra])
        reactor = MemoryReactorClock()
        web = tap.makeService(opts, reactor).getServiceNamed("web")
        web.privilegedStartService()
        web.startService()
        [(port, factory, backlog, bound)] = reactor.tcpServers
        assert (port, bound) == (4567, interface)
        assert isinstance(factory, Site)
        web.stopService()


def test_file_producer_honours_back_pressure(tmp_path):
    from twisted.web.test.requesthelper import DummyRequest

    from rqtwisted.web.files import CHUNK, FileProducer

    path = tmp_path / "big"
    data = bytes(range(256)) * (CHUNK * 3 // 256 + 7)
    path.write_bytes(data)
    request = DummyRequest([b""])
    producer = FileProducer(request, open(path, "rb"), len(data))
    writes = []

    def write(chunk):
        writes.append(chunk)
        producer.pauseProducing()  # the transport's buffer is full after each chunk

    request.write = write
    request.registerProducer = lambda producer, streaming: None  # a real channel does not drive it
    request.unregisterProducer = lambda: None
    producer.start()
    assert len(writes) == 1 and request.finished == 0
    while not producer.done:
        producer.resumeProducing()
    assert b"".join(writes) == data and len(writes) == 4
    assert request.finished == 1 and producer.file.closed
