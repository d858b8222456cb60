"""
Tests for L{rqtwisted.rules}: the router's rules file parsed as data, and
matching (hypothesis: arbitrary text never crashes the parser).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rqtwisted.rules import ACTIONS, Regex, RulesError, load_rules, parse_rules, verify_rules_file

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
    rules = parse_rules(text)
    assert [r.desc for r in rules.rules] == ["r"]
    assert rules.ignored == [1, 7]


def test_verbose_verify_names_ignored_lines(tmp_path) -> None:
    """
    Lines outside rules are ignored, as the original ignored them, but
    C{rq verify_rules --verbose} names them: a misspelt C{Rule} line makes
    its whole rule vanish.
    """
    path = tmp_path / "rules.rb"
    path.write_text('Rule "photos"\n  action :relay\n  src /^photo/\n  route "store1"\n\nrule "default"\n  action :done\n')
    ok, text = verify_rules_file(str(path), verbose=True)
    assert ok
    lines = text.splitlines()
    assert lines[0].startswith("rule 'default' (line 6)")
    assert lines[1:] == [
        f"line {n}: ignored: outside a rule (a rule starts at a line beginning 'rule ')" for n in (1, 2, 3, 4)
    ]


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
        assert rules.default.action in ACTIONS
        for rule in rules.rules:
            assert rule.action in ACTIONS
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


def test_load_rules_refuses_what_is_not_a_regular_file(tmp_path, no_hang) -> None:
    """
    A FIFO (whose open would block until a writer came), a device and a
    directory are refused without being read.
    """
    fifo = tmp_path / "fifo.rb"
    os.mkfifo(fifo)
    for path in (str(fifo), os.devnull, str(tmp_path)):
        with pytest.raises(RulesError) as info:
            load_rules(path)
        assert (info.value.line, info.value.reason) == (0, f"{path} is not a regular file")
    assert verify_rules_file(str(fifo)) == (False, f"{fifo} is not a regular file")


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


def test_regex_value_equality() -> None:
    a = parse_rules('rule "r"\n action :done\n src /a/i\n').rules[0].src
    assert isinstance(a, Regex) and a.search("A") and not a.search("b")
