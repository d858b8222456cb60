"""
Tests for L{rqtwisted.protocol}: the fd-3 line protocol and the completion
table of script-api.md.
"""

from __future__ import annotations

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rqtwisted.protocol import (
    MAX_DELAY,
    COMPLETION_VERBS,
    MAX_LINE,
    Dup,
    Outcome,
    Report,
    ReportParser,
    Resend,
    describe_exit,
    outcome,
    parse_dup,
    parse_resend,
)


def feed_all(chunks: list[bytes]) -> list[Report]:
    """
    Feed C{chunks} to a fresh parser, then close it; all the reports.
    """
    parser = ReportParser()
    reports: list[Report] = []
    for chunk in chunks:
        reports += parser.feed(chunk)
    return reports + parser.close()


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    Cut C{data} at the given offsets.
    """
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


# Lines as the workers write them: a verb, text, sometimes no text, sometimes
# non-ASCII, sometimes a CR.
_verb = st.sampled_from(["run", "done", "err", "fails", "relayed", "resend", "dup", "fail", ""])
_text = st.text(st.characters(blacklist_characters="\n", blacklist_categories=["Cs"]), max_size=30)
_line = st.builds(lambda v, t: f"{v} {t}".encode("utf-8"), _verb, _text)
_stream = st.builds(
    lambda lines, tail: b"\n".join(lines) + (b"\n" if tail else b""),
    st.lists(_line, max_size=8),
    st.booleans(),
)


class TestReportParser:
    """
    L{ReportParser} splits fd-3 bytes into reports.
    """

    def test_verb_and_text(self) -> None:
        assert feed_all([b"done all good\n"]) == [Report("done", "all good")]

    def test_verb_only(self) -> None:
        assert feed_all([b"done\n"]) == [Report("done", "")]

    def test_text_keeps_spaces(self) -> None:
        """
        Only the first space separates; the text keeps the rest verbatim.
        """
        assert feed_all([b"run  two  spaces \n"]) == [Report("run", " two  spaces ")]

    def test_empty_line(self) -> None:
        assert feed_all([b"\n"]) == [Report("", "")]

    def test_carriage_return_stripped(self) -> None:
        assert feed_all([b"done ok\r\n"]) == [Report("done", "ok")]

    def test_invalid_utf8_replaced(self) -> None:
        assert feed_all([b"run \xff\n"]) == [Report("run", "\ufffd")]

    def test_several_lines_one_read(self) -> None:
        assert feed_all([b"run a\nrun b\ndone c\n"]) == [
            Report("run", "a"),
            Report("run", "b"),
            Report("done", "c"),
        ]

    def test_partial_line_carried(self) -> None:
        """
        A line split across reads is reported once complete (quirks 3).
        """
        parser = ReportParser()
        assert parser.feed(b"ru") == []
        assert parser.feed(b"n hal") == []
        assert parser.feed(b"f\ndo") == [Report("run", "half")]
        assert parser.feed(b"ne\n") == [Report("done", "")]
        assert parser.close() == []

    def test_partial_final_line_on_close(self) -> None:
        """
        A last line without its newline counts when the stream ends.
        """
        parser = ReportParser()
        assert parser.feed(b"run a\ndone no newline") == [Report("run", "a")]
        assert parser.close() == [Report("done", "no newline")]
        assert parser.close() == []

    def test_close_empty(self) -> None:
        assert ReportParser().close() == []

    def test_overlong_line_cut(self) -> None:
        """
        A line longer than L{MAX_LINE} is cut to L{MAX_LINE} bytes; the rest
        of it is dropped, and the next line is read normally.
        """
        long = b"run " + b"x" * (2 * MAX_LINE)
        reports = feed_all([long + b"\ndone ok\n"])
        assert reports == [Report("run", "x" * (MAX_LINE - 4)), Report("done", "ok")]

    def test_overlong_line_in_small_reads(self) -> None:
        """
        Fed in small reads, an over-long line gives the same single report:
        its tail does not become a line of its own.
        """
        long = b"run " + b"x" * (MAX_LINE + 10_000) + b" done tail\ndone ok\n"
        reports = feed_all([long[i : i + 4096] for i in range(0, len(long), 4096)])
        assert reports == [Report("run", "x" * (MAX_LINE - 4)), Report("done", "ok")]

    def test_overlong_partial_line_on_close(self) -> None:
        parser = ReportParser()
        reports = parser.feed(b"err " + b"y" * MAX_LINE)
        assert reports == [Report("err", "y" * (MAX_LINE - 4))]
        assert parser.close() == []

    def test_exactly_max_line(self) -> None:
        line = b"run " + b"z" * (MAX_LINE - 4)
        assert feed_all([line, b"\n"]) == [Report("run", "z" * (MAX_LINE - 4))]

    @given(_stream, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
    def test_chunking_does_not_matter(self, data: bytes, cuts: list[int]) -> None:
        """
        However a stream is cut into reads, the reports are the same.
        """
        assert feed_all(chunked(data, cuts)) == feed_all([data])

    @settings(max_examples=40, deadline=None)
    @given(
        st.lists(st.integers(min_value=0, max_value=3 * MAX_LINE), max_size=4),
        st.integers(min_value=1, max_value=3 * MAX_LINE),
    )
    def test_chunking_with_long_lines(self, lengths: list[int], size: int) -> None:
        """
        The same holds with lines around and over L{MAX_LINE}, read in
        pieces of any size.
        """
        data = b"".join(b"run " + b"a" * n + b"\n" for n in lengths) + b"done end"
        pieces = [data[i : i + size] for i in range(0, len(data), size)]
        assert feed_all(pieces) == feed_all([data])

    @given(_stream)
    def test_byte_by_byte(self, data: bytes) -> None:
        assert feed_all([data[i : i + 1] for i in range(len(data))]) == feed_all([data])


class TestReport:
    """
    L{Report.fromLine}.
    """

    def test_from_line(self) -> None:
        assert Report.fromLine(b"relayed http://h:3333/q/x/1") == Report(
            "relayed", "http://h:3333/q/x/1"
        )

    def test_completion_verbs(self) -> None:
        assert COMPLETION_VERBS == {"done", "err", "fails", "relayed", "resend"}


class TestParseResend:
    """
    L{parse_resend}: C{<seconds>} or C{<seconds>-<reason>}, the seconds
    read as their leading number.
    """

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("30", Resend(30.0, "")),
            ("0", Resend(0.0, "")),
            ("2.5", Resend(2.5, "")),
            ("30-busy", Resend(30.0, "busy")),
            ("30-busy - try-later", Resend(30.0, "busy - try-later")),
            (" 7 ", Resend(7.0, "")),
            ("-5", Resend(0.0, "")),
            ("soon", Resend(0.0, "soon")),
            ("", Resend(0.0, "")),
            ("9" * 400 + "-never", Resend(MAX_DELAY, "never")),
            # The leading number, as the original's to_i read it.
            ("60 waiting for lock", Resend(60.0, "waiting for lock")),
            ("10s", Resend(10.0, "s")),
            ("1e9", Resend(1.0, "e9")),
        ],
    )
    def test_parse(self, text: str, expected: Resend) -> None:
        assert parse_resend(text) == expected

    def test_huge_dup_delays_are_cut(self) -> None:
        """
        A delay of hundreds of digits (which a float makes infinite) is cut
        to L{MAX_DELAY}, either way for C{dup}.
        """
        assert parse_dup("9" * 400 + "-X-q").delay == MAX_DELAY
        assert parse_dup("-" + "9" * 400 + "-X-q").delay == -MAX_DELAY


class TestParseDup:
    """
    L{parse_dup}: C{<due>-<flag>-<newdest>}.
    """

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("0-X-other", Dup(0.0, "X", "other")),
            ("60-X-other", Dup(60.0, "X", "other")),
            ("1.5--q", Dup(1.5, "", "q")),
            ("0-X-http://peer:3333/q/x", Dup(0.0, "X", "http://peer:3333/q/x")),
            ("0-X-a-b", Dup(0.0, "X", "a-b")),
            ("0-X- spaced ", Dup(0.0, "X", "spaced")),
            ("1e3-X-q", Dup(1.0, "X", "q")),
        ],
    )
    def test_parse(self, text: str, expected: Dup) -> None:
        assert parse_dup(text) == expected

    @pytest.mark.parametrize("text", ["", "other", "0-X", "x-X-q", "0-X-", "0-X-  "])
    def test_malformed(self, text: str) -> None:
        assert parse_dup(text) is None


class TestDescribeExit:
    """
    L{describe_exit}.
    """

    def test_exit(self) -> None:
        assert describe_exit(3, None) == "exit 3"

    def test_signal(self) -> None:
        assert describe_exit(None, signal.SIGKILL) == "SIGKILL (signal 9)"

    def test_unknown_signal(self) -> None:
        assert describe_exit(None, 200) == "signal 200 (signal 200)"


IMPROPER = "PROCESS EXITED IMPROPERLY - MOVING TO ERR - Completion was "


class TestOutcome:
    """
    The completion table of script-api.md through L{outcome}.
    """

    def test_done_exit_zero(self) -> None:
        assert outcome(Report("done", "ok"), 0, None, 0, 15) == Outcome("done")

    def test_done_nonzero_exit(self) -> None:
        assert outcome(Report("done", "ok"), 3, None, 0, 15) == Outcome(
            "err", IMPROPER + "done but exit status was exit 3"
        )

    def test_done_killed(self) -> None:
        assert outcome(Report("done", "ok"), None, signal.SIGKILL, 0, 15) == Outcome(
            "err", IMPROPER + "done but exit status was SIGKILL (signal 9)"
        )

    def test_no_completion_nonzero(self) -> None:
        assert outcome(None, 1, None, 0, 15) == Outcome(
            "err", IMPROPER + " but exit status was exit 1"
        )

    def test_no_completion_exit_zero(self) -> None:
        """
        No completion verb and exit 0: err, status text unchanged.
        """
        assert outcome(None, 0, None, 0, 15) == Outcome("err")

    @pytest.mark.parametrize("exit_code, sig", [(0, None), (1, None), (None, 15)])
    def test_err_whatever_exit(self, exit_code: int | None, sig: int | None) -> None:
        assert outcome(Report("err", "bad"), exit_code, sig, 0, 15) == Outcome("err")

    @pytest.mark.parametrize("exit_code, sig", [(0, None), (2, None), (None, 9)])
    def test_fails_alias(self, exit_code: int | None, sig: int | None) -> None:
        assert outcome(Report("fails", "bad"), exit_code, sig, 0, 15) == Outcome("err")

    def test_relayed(self) -> None:
        assert outcome(Report("relayed", "http://h/q/x/1"), 0, None, 0, 15) == Outcome(
            "relayed"
        )

    def test_relayed_nonzero(self) -> None:
        assert outcome(Report("relayed", "id"), 4, None, 0, 15) == Outcome(
            "err", IMPROPER + "relayed but exit status was exit 4"
        )

    def test_resend(self) -> None:
        assert outcome(Report("resend", "30-later"), 0, None, 3, 15) == Outcome(
            "que", delay=30.0
        )

    def test_resend_at_max_count(self) -> None:
        """
        C{count} (already incremented by the resend) >= C{max_count}: err.
        """
        assert outcome(Report("resend", "30"), 0, None, 15, 15) == Outcome(
            "err", "HIT MAX RESEND COUNT - MOVING TO ERR"
        )
        assert outcome(Report("resend", "30"), 0, None, 16, 15) == Outcome(
            "err", "HIT MAX RESEND COUNT - MOVING TO ERR"
        )

    def test_resend_nonzero(self) -> None:
        assert outcome(Report("resend", "30"), 1, None, 1, 15) == Outcome(
            "err", IMPROPER + "resend but exit status was exit 1"
        )
