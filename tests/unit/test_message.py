"""
Tests for L{rqtwisted.message}: names, ids, full ids and creation fields.
"""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from rqtwisted.message import (
    MAX_COUNT_VALUE,
    MessageError,
    creation_fields,
    due_of,
    dest_queue,
    dest_url,
    hashed_subpath,
    make_msg_id,
    split_full_id,
    valid_msg_id,
    valid_queue_name,
)


@pytest.mark.parametrize("name", ["test", "a-b_c", "Q1"])
def test_valid_queue_names(name):
    assert valid_queue_name(name)


@pytest.mark.parametrize("name", ["", "a b", "a.b", "a/b", "a:b", "a@b", "x" * 129, None, "a$b", "a\nb"])
def test_invalid_queue_names(name):
    assert not valid_queue_name(name)


@given(st.floats(min_value=0, max_value=4e9), st.integers(min_value=0, max_value=10**12))
def test_ids_match_the_exact_format(now, suffix):
    msg_id = make_msg_id(now, suffix)
    assert valid_msg_id(msg_id)
    assert hashed_subpath(msg_id).endswith("/" + msg_id)


def test_id_and_hash_path():
    msg_id = make_msg_id(1277429255.122, 7509656)
    assert msg_id == "20100625.0127.35.122.7509656"
    assert hashed_subpath(msg_id) == "20100625/01/27/20100625.0127.35.122.7509656"


def test_split_full_id():
    assert split_full_id("http://h:3333/q/test/20100625.0127.35.122.7") == ("test", "20100625.0127.35.122.7")
    assert split_full_id("/q/test/1") == ("test", "1")
    with pytest.raises(MessageError):
        split_full_id("http://h:3333/q/test")


def test_dest_forms():
    assert dest_url("test", "h", 3333) == "http://h:3333/q/test"
    assert dest_url("/q/test", "h", 3333) == "http://h:3333/q/test"
    assert dest_url("http://o:1/q/x", "h", 3333) == "http://o:1/q/x"
    assert dest_queue("http://o:1/q/x") == "x"
    assert dest_queue("/q/y") == "y"
    assert dest_queue("z") == "z"


def test_creation_fields_copies_only_creation_keys():
    fields = creation_fields(
        {"dest": "q", "param1": "a", "count": "3", "max_count": "4", "_method": "prep", "state": "done",
         "post_run_webhook": "http://a http://b", "force_remote": False}
    )
    assert fields == {"dest": "q", "param1": "a", "count": 3, "max_count": 4,
                      "post_run_webhook": ["http://a", "http://b"], "force_remote": False}


@pytest.mark.parametrize("value", [False, 0, "", None, True])
def test_force_remote_stored_as_given_when_present(value):
    assert creation_fields({"dest": "q", "force_remote": value})["force_remote"] == value
    assert "force_remote" not in creation_fields({"dest": "q"})


@pytest.mark.parametrize("key", ["dest", "param1", "param4", "src", "orig_msg_id"])
def test_nul_in_a_text_field_is_refused(key):
    """
    A NUL character could never reach the script (an environment value
    ends there): refused, naming the field.
    """
    data = {"dest": "q", key: "a\0b"}
    with pytest.raises(MessageError, match=f"invalid {key} field: it contains a NUL character"):
        creation_fields(data)



def test_creation_fields_texts_from_other_json_values():
    """
    Text fields given as numbers or booleans are kept as text, booleans as
    JSON writes them: a lone C{--param1} is C{true} (C{RQ_PARAM1=true}).
    """
    fields = creation_fields({"dest": "q", "param1": True, "param2": False, "param3": 7, "param4": 1.5, "src": True})
    assert fields == {"dest": "q", "param1": "true", "param2": "false", "param3": "7", "param4": "1.5",
                      "src": "true", "count": 0, "max_count": fields["max_count"]}
    with pytest.raises(MessageError, match="invalid param1 field"):
        creation_fields({"dest": "q", "param1": ["a"]})


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"due": float("nan")}, "invalid due field"),
        ({"due": float("inf")}, "invalid due field"),
        ({"due": "-Infinity"}, "invalid due field"),
        ({"count": float("inf")}, "invalid count field"),
        ({"max_count": float("nan")}, "invalid max_count field"),
    ],
)
def test_creation_fields_refuse_what_is_not_a_number(fields, reason):
    """
    NaN and infinities are refused: a NaN due would break the order of the
    scheduler, and neither can be written as JSON.
    """
    with pytest.raises(MessageError, match=reason):
        creation_fields({"dest": "q", **fields})


def test_due_of_unreadable_values():
    """
    A stored due that is NaN or infinite (older versions let them in)
    counts as absent.
    """
    assert due_of({"due": float("nan")}, 5.0) == 5.0
    assert due_of({"due": float("inf")}, 5.0) == 5.0
    assert due_of({"due": "12.5"}, 5.0) == 12.5

def test_creation_fields_errors():
    with pytest.raises(MessageError, match='input missing required "dest" parameter'):
        creation_fields({"src": "x"})
    with pytest.raises(MessageError, match="invalid count"):
        creation_fields({"dest": "q", "count": "many"})
    with pytest.raises(MessageError, match="invalid due"):
        creation_fields({"dest": "q", "due": "soon"})


@pytest.mark.parametrize(
    "value, expected",
    [
        # Text is read for its leading integer, as Ruby's C{to_i} reads it.
        ("3", 3), ("3.7", 3), (" 5 ", 5), ("1e3", 1), ("1e400", 1), (" 12abc", 12), ("3.7x", 3), ("0x10", 0),
        ("+5", 5), ("-0", 0), ("\t\n\v\f\r7", 7), ("1_000", 1000), ("1__0", 1), ("0d12", 12), ("0" * 5000 + "7", 7),
        ("2147483647", 2**31 - 1),
        # Numbers are truncated toward zero.
        (3.9, 3), (7, 7), (2**31 - 1, 2**31 - 1),
    ],
)
def test_creation_fields_convert_counts(value, expected):
    """
    C{count} and C{max_count} are converted as the original converted them
    (C{to_i}): a number truncated, text read for its leading integer,
    whatever follows it ignored (the command line's values are text).
    """
    fields = creation_fields({"dest": "q", "count": value, "max_count": value})
    assert (fields["count"], fields["max_count"]) == (expected, expected)


@pytest.mark.parametrize("value", ["abc", "", "  ", "nan", "- 5", "_1", "\u00a05", "\uff11\uff12", [3], None])
@pytest.mark.parametrize("key", ["count", "max_count"])
def test_creation_fields_refuse_counts_that_are_not_numbers(key, value):
    """
    Text with no leading integer is refused with a clear reason (the
    original read it as 0), as are values that are neither numbers nor
    text. Only ASCII blanks and digits count, as for C{to_i}.
    """
    with pytest.raises(MessageError) as info:
        creation_fields({"dest": "q", key: value})
    assert str(info.value) == f"invalid {key} field ({'null' if value is None else value})"


@pytest.mark.parametrize(
    "value, shown",
    [
        ("-1", "-1"), (-1, "-1"), ("-3.7", "-3.7"), (-1.5, "-1.5"), ("2147483648", "2147483648"), (2**31, "2147483648"),
        (1e20, "1e+20"), ("1" * 300, "1" * 64 + "..."), ("-" + "9" * 5000, "-" + "9" * 63 + "..."),
        pytest.param(10**5000, "a number too large to show", id="int-of-5001-digits"),
    ],
)
@pytest.mark.parametrize("key", ["count", "max_count"])
def test_creation_fields_refuse_counts_out_of_range(key, value, shown):
    """
    A count or max_count below 0 or above C{2**31 - 1} is refused with a
    reason naming the field and the range; a long value is cut in it.
    """
    with pytest.raises(MessageError) as info:
        creation_fields({"dest": "q", key: value})
    assert str(info.value) == f"invalid {key} field ({shown}): it must be from 0 to {MAX_COUNT_VALUE}"
    assert MAX_COUNT_VALUE == 2**31 - 1


@pytest.mark.parametrize("value", ["", " ", "abc"])
def test_creation_fields_refuse_empty_due(value):
    """
    An empty due (C{--due=}) is refused as any other text that is not a
    number; C{null} means no due (now).
    """
    with pytest.raises(MessageError) as info:
        creation_fields({"dest": "q", "due": value})
    assert str(info.value) == f"invalid due field ({value})"
    assert "due" not in creation_fields({"dest": "q", "due": None})


@pytest.mark.parametrize("due", [True, False, 1e300, -1e300, "1e12", 253402300800])
def test_due_that_is_no_time_is_refused(due):
    """
    A due that is not a time a page could show (a boolean, beyond year
    9999 either way) is refused like text that is not a number.
    """
    with pytest.raises(MessageError, match="invalid due field"):
        creation_fields({"dest": "q", "due": due})
    assert creation_fields({"dest": "q", "due": 253402300799})["due"] == 253402300799


@pytest.mark.parametrize("value, shown", [(True, "true"), (False, "false")])
def test_refusals_show_a_boolean_as_json(value, shown):
    """
    A boolean (a lone C{--due} on the command line is true) is quoted in
    the reason as JSON writes it, not as Python's C{True}.
    """
    with pytest.raises(MessageError) as info:
        creation_fields({"dest": "q", "due": value})
    assert str(info.value) == f"invalid due field ({shown})"
