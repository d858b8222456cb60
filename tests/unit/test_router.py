"""
Tests for L{rqtwisted.router}: the rules file parsed as data, matching,
destinations, and the C{rq_router} queue's in-process handler (driven by a
L{Clock} through the real queue service).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rqtwisted import builtin, router
from rqtwisted.builtin import register_handler
from rqtwisted.router import (
    Regex,
    RouterHandler,
    RulesError,
    load_rules,
    new_dest,
    parse_rules,
    routed_queue,
    router_mode,
    select_hosts,
    verify_rules_file,
)
from rqtwisted.testing import instance_for

SAMPLE = """\
# Router rules for the fleet.
rule "photos"
  action :relay
  src /^photo-(\\d+)$/i          # uploads from the photo hosts
  route "store1", "store2:4000", "http://archive:80/q/photos"
  delay 2
  log true

rule 'thumbs'
  action(:balance)
  dest /thumb#s/
  route ["a1", "a2"], ["b1"]

rule "drop"
  action :done
  src /^test/
  dest /^noise$/

rule "default"
  action :err
"""


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


# -- parsing ------------------------------------------------------------------------


def test_sample_parses() -> None:
    rules = parse_rules(SAMPLE)
    assert [r.desc for r in rules.rules] == ["photos", "thumbs", "drop"]
    photos, thumbs, drop = rules.rules
    assert (photos.action, photos.delay, photos.log, photos.line) == ("relay", 2, True, 2)
    assert photos.route == ("store1", "store2:4000", "http://archive:80/q/photos")
    assert photos.src is not None and photos.src.flags == "i" and photos.dest is None
    assert thumbs.action == "balance" and thumbs.route == (("a1", "a2"), ("b1",))
    assert thumbs.dest is not None and thumbs.dest.source == "thumb#s"
    assert (drop.action, drop.log) == ("done", False)
    assert (rules.default.desc, rules.default.action, rules.default.line) == ("default", "err", 19)


def test_matching_order_and_missing_fields() -> None:
    rules = parse_rules(SAMPLE)
    assert rules.match({"src": "PHOTO-12"}).desc == "photos"
    assert rules.match({"src": "photo-x"}).desc == "default"
    assert rules.match({"dest": "big thumb#s here"}).desc == "thumbs"
    # Both expressions must match; a missing field fails the match.
    assert rules.match({"src": "test-1", "dest": "noise"}).desc == "drop"
    assert rules.match({"src": "test-1"}).desc == "default"
    assert rules.match({"src": 5, "dest": "noise"}).desc == "default"


def test_ruby_regex_subset() -> None:
    rules = parse_rules('rule "r"\n action :done\n src /\\Aab\\z/\n dest /(?<host>\\h+)\\/x/m\n')
    rule = rules.rules[0]
    assert rule.matches({"src": "ab", "dest": "ff/x"})
    assert not rule.matches({"src": "ab\n", "dest": "ff/x"})
    assert not rule.matches({"src": "ab", "dest": "zz/x"})
    # ^ and $ match at line boundaries, as in Ruby.
    assert parse_rules('rule "r"\n action :done\n src /^b$/\n').rules[0].matches({"src": "a\nb\nc"})


def test_no_default_gives_builtin_err() -> None:
    rules = parse_rules('rule "only"\n action :done\n src /x/\n')
    assert (rules.default.action, rules.default.log, rules.default.line) == ("err", True, 0)
    assert rules.match({"src": "y"}) is rules.default


def test_last_default_wins_and_err_forces_log() -> None:
    rules = parse_rules('rule "default"\n action :done\n\nrule "default"\n action :relay\n route "h"\n')
    assert (rules.default.action, rules.default.line) == ("relay", 4)
    assert parse_rules('rule "e"\n action :err\n src /x/\n log false\n').rules[0].log is True


def test_last_rule_without_blank_line_and_comments() -> None:
    """
    quirks 29: the last rule is finished at the end of the file; C{#}
    comments work anywhere outside literals.
    """
    rules = parse_rules('rule "r"  # first\n  # a note\n action :relay # go\n src /#x/\n route "h" # one host\n delay 4')
    rule = rules.rules[0]
    assert (rule.action, rule.route, rule.delay, rule.src.source) == ("relay", ("h",), 4, "#x")  # type: ignore[union-attr]


def test_lines_outside_rules_are_ignored() -> None:
    text = 'anything at all ( here\n\nrule "r"\n action :done\n src /x/\n\nstill ignored = 1 + \n'
    assert [r.desc for r in parse_rules(text).rules] == ["r"]


def test_wrongly_typed_arguments_are_skipped() -> None:
    rules = parse_rules(
        'rule "r"\n action :done\n src "not a regex"\n dest /d/\n delay "5"\n delay 1.5\n log "yes"\n'
        ' route 1, 2\n'
    )
    rule = rules.rules[0]
    assert (rule.src, rule.delay, rule.log, rule.route) == (None, 0, False, ())
    assert rule.dest is not None


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ('rule "x"\n action :relay\n route ENV["A"] ? "a" : "b"\n src /a/\n', 3, "not a literal value"),
        ('rule "x"\n action :done\n src /a/\n frobnicate 1\n', 4, "unknown statement 'frobnicate'"),
        ('rule "x"\n src /a/\n', 1, "needs an action"),
        ('rule "x"\n action :sideways\n src /a/\n', 1, "needs an action"),
        ('\n\nrule "x"\n action :done\n', 3, "needs a src or a dest"),
        ('rule "x"\n action :relay\n src /a/\n', 1, "needs a route"),
        ('rule "x"\n action :done\n src /a/\n delay 1, 2\n', 4, "wrong number of arguments"),
        ('rule "x"\n action :done\n src /(/\n', 3, "invalid regular expression"),
        ('rule "x#{`id`}"\n action :done\n src /a/\n', 1, "interpolation"),
        ('rule "x"\n action :done\n src /a#{1}/\n', 3, "interpolation"),
        ('rule "x"\n action :done\n src /a/\n delay 5 * 60\n', 4, "unexpected"),
        ('rule "x"\n action :done\n src /a/\n log true; system("rm")\n', 4, "unexpected"),
        ('rule "x"\n action :done\n src /a/ix\n src /b/q\n', 4, "flags"),
        ('rule "x"\n action :done\n dest "unterminated\n', 3, "unterminated string"),
        ('rule "x"\n action :done\n src /a/\n route(["a", "b"]\n', 4, "expected ')'"),
    ],
)
def test_invalid_files_name_the_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text)
    assert info.value.line == line
    assert reason in info.value.reason
    assert str(info.value).startswith(f"line {line}: ")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_arbitrary_text_never_crashes(text: str) -> None:
    """
    Any text is either rules or a L{RulesError} with a line inside the file.
    """
    try:
        rules = parse_rules(text)
    except RulesError as e:
        assert 1 <= e.line <= text.count("\n") + 1
        assert e.reason
    else:
        assert rules.default.action in router.ACTIONS
        for rule in rules.rules:
            assert rule.action in router.ACTIONS
            assert rule.src is not None or rule.dest is not None


_token = st.sampled_from(
    ['rule "r"', "action :relay", "action :done", "action :err", "action :balance", "src /a+/", "dest /q/",
     'route "h1", "h2"', 'route ["a","b"], ["c"]', "delay 3", "log true", "", "# c", "src /(/", "delay x",
     "route", 'rule "default"', "/", '"', "[", "route [[[", ":", "log true # x"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_token, max_size=30))
def test_rule_shaped_text_never_crashes(lines: list[str]) -> None:
    text = "\n".join(lines)
    try:
        rules = parse_rules(text)
    except RulesError as e:
        assert 1 <= e.line <= len(lines) or (e.line >= 1 and not lines)
    else:
        for rule in rules.rules:
            if rule.action in ("relay", "balance"):
                assert rule.route


def test_load_rules_errors(tmp_path) -> None:
    with pytest.raises(RulesError) as info:
        load_rules(str(tmp_path / "missing.rb"))
    assert info.value.line == 0 and "cannot read" in info.value.reason
    bad = tmp_path / "bad.rb"
    bad.write_bytes(b'rule "x"\n action :done\n src /\xff/\n')
    with pytest.raises(RulesError) as info:
        load_rules(str(bad))
    assert info.value.line == 3


def test_verify_rules_file(tmp_path) -> None:
    good = tmp_path / "good.rb"
    good.write_text(SAMPLE)
    ok, text = verify_rules_file(str(good), True)
    assert ok
    assert text.splitlines()[0].startswith("rule 'photos' (line 2): action relay")
    assert text.splitlines()[-1].startswith("rule 'default' (line 19)")
    bad = tmp_path / "bad.rb"
    bad.write_text('rule "x"\n action :done\n src /a/\n oops\n')
    assert verify_rules_file(str(bad)) == (False, "line 4: unknown statement 'oops'")


# -- destinations -------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, dest, expected",
    [
        ("h", "test", "http://h:3333/q/test"),
        ("h:4000", "test", "http://h:4000/q/test"),
        ("h", "http://src:3333/q/test", "http://h:3333/q/test"),
        ("h", "http://src:3333/q/a/q/b", "http://h:3333/q/a/q/b"),
        ("h", "/q/test", "http://h:3333/q/test"),
        ("http://x:1/q/other", "test", "http://x:1/q/other"),
    ],
)
def test_new_dest(host: str, dest: str, expected: str) -> None:
    assert new_dest(host, dest) == expected


def test_select_hosts() -> None:
    rules = parse_rules(SAMPLE)
    photos, thumbs, _ = rules.rules
    assert select_hosts(photos, lambda seq: seq[-1]) == ["store1", "store2:4000", "http://archive:80/q/photos"]
    assert select_hosts(thumbs, lambda seq: seq[0]) == ["a1"]
    assert select_hosts(thumbs, lambda seq: seq[-1]) == ["b1"]
    group = parse_rules('rule "g"\n action :relay\n src /x/\n route ["a","b"], ["c","d"]\n').rules[0]
    assert select_hosts(group, lambda seq: seq[1]) == ["b", "d"]
    assert select_hosts(rules.default) == []


def test_router_mode(tmp_path) -> None:
    root = str(tmp_path)
    os.makedirs(tmp_path / "config")
    assert not router_mode(root)
    assert routed_queue(root, "test") == "test"
    (tmp_path / "config" / "rq_router_rules.rb").write_text("")
    assert router_mode(root)
    assert routed_queue(root, "test") == "rq_router"
    assert routed_queue(root, "relay") == "relay"
    assert routed_queue(root, "cleaner") == "cleaner"


# -- the rq_router queue --------------------------------------------------------------


@pytest.fixture
def routed(tmp_path, monkeypatch):
    """
    An instance whose C{rq_router} runs L{RouterHandler} in-process with a
    deterministic choice; C{relay} and C{local} are paused so copies stay
    queued.
    """
    monkeypatch.setattr(builtin, "HANDLERS", dict(builtin.HANDLERS))
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    handler = RouterHandler(instance.root.path, clock, choice=lambda seq: seq[0], pid=lambda: 4242)
    register_handler("rq_router", lambda inst: handler)
    instance.create_queue({"name": "local", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    instance.set_admin("pause", "relay")
    instance.set_admin("pause", "local")
    return instance, clock


def write_rules(instance, text: str) -> str:
    path = router.rules_path(instance.root.path)
    with open(path, "w") as f:
        f.write(text)
    return path


def route_one(instance, clock, **fields) -> tuple[str, dict]:
    fields.setdefault("dest", "local")
    full = result(instance.queue("rq_router").create(fields))
    clock.advance(0)
    msg_id = full.rsplit("/", 1)[1]
    return msg_id, instance.queue("rq_router").get(msg_id)


def queued(instance, name: str) -> list[dict]:
    q = instance.queue(name)
    return [q.get(m) for m in sorted(q.messages("que"))]


def read_log(instance) -> list[str]:
    path = os.path.join(instance.root.path, router.LOG_PATH)
    with open(path) as f:
        return f.read().splitlines()


def test_route_done_and_err(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "quiet"\n action :done\n src /^ok/\n')
    msg_id, msg = route_one(instance, clock, src="ok-1")
    assert (msg["state"], msg["status"]) == ("done", "done - router processed a done")
    assert not os.path.exists(os.path.join(instance.root.path, router.LOG_PATH))
    msg_id, msg = route_one(instance, clock, src="other")
    assert (msg["state"], msg["status"]) == ("err", "err - router processed an err")
    [line] = read_log(instance)
    pid, stamp, desc, action, logged_id, src = line.split(" - ")
    assert (pid, desc, action, logged_id, src) == ("4242", "default", "err", msg_id, "other")


def test_route_relay_to_every_host(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "fan"\n action :relay\n dest /local/\n route "h1", "h2:99", ["g1", "g2"]\n')
    msg_id, msg = route_one(instance, clock, src="me", param1="p", dest="http://origin:3333/q/local")
    assert (msg["state"], msg["status"]) == ("done", "done - done relay of 3 messages")
    copies = queued(instance, "relay")
    assert [c["dest"] for c in copies] == [
        "http://h1:3333/q/local",
        "http://h2:99/q/local",
        "http://g1:3333/q/local",
    ]
    assert all(c["param1"] == "p" and c["src"] == "me" for c in copies)
    assert all(c["orig_msg_id"] == instance.queue("rq_router").full_id(msg_id) for c in copies)


def test_route_balance(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "lb"\n action :balance\n src /./\n route "http://localhost:3333/q/local", "b"\n')
    msg_id, msg = route_one(instance, clock, src="x")
    [copy] = queued(instance, "relay")
    assert copy["dest"] == "http://localhost:3333/q/local"
    assert msg["status"] == f"done - DUP to {instance.queue('relay').full_id(copy['msg_id'])}"


def test_route_dup_failure(routed) -> None:
    instance, clock = routed
    instance.set_admin("down", "relay")
    write_rules(instance, 'rule "lb"\n action :balance\n src /./\n route "b"\n\nrule "r"\n action :relay\n dest /z/\n route "c"\n')
    _, msg = route_one(instance, clock, src="x")
    assert (msg["state"], msg["status"]) == ("err", "err - DUP failed - dup failed - status: DOWN")
    _, msg = route_one(instance, clock, dest="z")
    assert (msg["state"], msg["status"]) == ("err", "err - DUP relay failed - dup failed - status: DOWN")


def test_route_delay(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "slow"\n action :done\n src /s/\n delay 30\n log true\n')
    msg_id, msg = route_one(instance, clock, src="s")
    assert (msg["state"], msg["status"]) == ("run", "run - router delay 30 seconds")
    clock.advance(29)
    assert instance.queue("rq_router").locate(msg_id) == "run"
    clock.advance(1)
    assert instance.queue("rq_router").get(msg_id)["status"] == "done - router processed a done"
    assert read_log(instance)[0].split(" - ")[2:4] == ["slow", "done"]


def test_bad_rules_down_the_router(routed) -> None:
    instance, clock = routed
    path = write_rules(instance, 'rule "x"\n action :nope\n src /a/\n')
    msg_id, msg = route_one(instance, clock, src="a")
    assert (msg["state"], msg["status"]) == ("err", f"err - Bad rule file at: {path}")
    assert os.path.exists(os.path.join(instance.root.path, "config", "rq_router.down"))
    assert instance.queue("rq_router").status() == "DOWN"


def test_missing_rules_file_is_bad(routed) -> None:
    instance, clock = routed
    _, msg = route_one(instance, clock, src="a")
    assert msg["status"] == f"err - Bad rule file at: {router.rules_path(instance.root.path)}"


def test_rules_reread_when_changed(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "a"\n action :done\n src /./\n')
    assert route_one(instance, clock, src="x")[1]["state"] == "done"
    path = write_rules(instance, 'rule "a"\n action :err\n src /./\n   \n')
    os.utime(path, ns=(1, 1))
    assert route_one(instance, clock, src="x")[1]["state"] == "err"


def test_regex_value_equality() -> None:
    a = parse_rules('rule "r"\n action :done\n src /a/i\n').rules[0].src
    assert isinstance(a, Regex) and a.search("A") and not a.search("b")


def test_routing_over_60_seconds_is_err(routed) -> None:
    instance, clock = routed
    write_rules(instance, 'rule "slow"\n action :done\n src /s/\n delay 90\n')
    msg_id, msg = route_one(instance, clock, src="s")
    assert msg["status"] == "run - router delay 90 seconds"
    clock.advance(router.MAX_RUN)
    msg = instance.queue("rq_router").get(msg_id)
    assert (msg["state"], msg["status"]) == ("err", "err - router ran over 60 seconds")
    clock.advance(60)
    assert instance.queue("rq_router").get(msg_id)["status"] == "err - router ran over 60 seconds"


def test_registered_factory(tmp_path) -> None:
    from rqtwisted.builtin import handler_factory

    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    handler = handler_factory("rq_router")(instance)
    assert isinstance(handler, RouterHandler)
    assert (handler.root, handler.clock) == (instance.root.path, clock)
