"""
Tests for L{rqtwisted.store}: layout, durable creation, moves, recovery.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from rqtwisted.durable import Syncer
from rqtwisted.message import MessageError
from rqtwisted.store import QueueStore, check_attachment_name, link_or_copy
from rqtwisted.testing import HeldThreads, result_of, syncNow


class RecordingSync:
    """
    Records every round's paths.
    """

    def __init__(self) -> None:
        self.rounds: list[list[str]] = []

    def __call__(self, paths):
        self.rounds.append(list(paths))


@pytest.fixture
def sync():
    return RecordingSync()


@pytest.fixture
def store(tmp_path, sync):
    s = QueueStore(str(tmp_path / "q"), Syncer(syncNow, sync), lambda: 1277429255.122)
    s.open()
    return s


def test_open_creates_state_dirs(store):
    for state in ("prep", "que", "run", "done", "relayed", "err"):
        assert os.path.isdir(store.state_dir(state))


def test_new_id_format_and_unique(store):
    ids = {store.new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("20100625.0127.35.122.") for i in ids)


def test_create_syncs_file_dir_and_state_dir_before_firing(store, sync):
    msg_id = store.new_id()
    fired = []
    store.create({"msg_id": msg_id, "dest": "q"}, "que").addCallback(fired.append)
    assert fired == [None]
    target = store.msg_dir("que", msg_id)
    assert sync.rounds[-1] == [os.path.join(target, "msg"), target, store.state_dir("que")]
    assert json.load(open(os.path.join(target, "msg"))) == {"msg_id": msg_id, "dest": "q"}
    assert os.listdir(store.state_dir("tmp")) == []



def test_create_refuses_text_that_is_not_unicode(store, sync):
    """
    A message whose text holds a lone surrogate (an undecodable argument)
    cannot be written as UTF-8: refused with the field named, and nothing
    is left in C{tmp/} or anywhere else.
    """
    rounds = len(sync.rounds)
    with pytest.raises(MessageError, match="invalid param2 field: not valid Unicode"):
        store.create({"msg_id": store.new_id(), "dest": "q", "param1": "ok", "param2": "\udcff"}, "que")
    assert os.listdir(store.state_dir("tmp")) == []
    assert os.listdir(store.state_dir("que")) == []
    assert len(sync.rounds) == rounds

def test_move_to_done_is_hashed(store):
    msg_id = "20100625.0127.35.122.7509656"
    store.create({"msg_id": msg_id, "dest": "q"}, "que")
    store.move(msg_id, "que", "run")
    store.move(msg_id, "run", "done")
    assert os.path.isdir(os.path.join(store.path, "done/20100625/01/27", msg_id))
    assert list(store.list_hashed("done")) == [msg_id]
    assert store.count_hashed("done") == 1


def test_list_hashed_newest_first_with_limit(store):
    ids = ["20100625.0127.35.122.1", "20100626.0001.00.000.2", "20100625.2359.00.000.3"]
    for i in ids:
        store.create({"msg_id": i, "dest": "q"}, "que")
        store.move(i, "que", "done")
    assert list(store.list_hashed("done")) == [ids[1], ids[2], ids[0]]
    assert list(store.list_hashed("done", 2)) == [ids[1], ids[2]]


def test_open_moves_run_back_to_que_and_corrupt_aside(tmp_path, sync):
    s = QueueStore(str(tmp_path / "q"), Syncer(syncNow, sync), lambda: 1277429255.0)
    s.open()
    good, bad = "20100625.0127.35.122.1", "20100625.0127.35.122.2"
    s.create({"msg_id": good, "dest": "q"}, "que")
    s.move(good, "que", "run")
    s.write_pid(good, 123)
    s.create({"msg_id": bad, "dest": "q"}, "que")
    with open(os.path.join(s.msg_dir("que", bad), "msg"), "w") as f:
        f.write("{not json")
    prepared, broken = "20100625.0127.35.122.3", "20100625.0127.35.122.4"
    s.create({"msg_id": prepared, "dest": "q"}, "prep")
    s.create({"msg_id": broken, "dest": "q"}, "prep")
    os.unlink(os.path.join(s.msg_dir("prep", broken), "msg"))
    found = QueueStore(s.path, Syncer(syncNow, sync), lambda: 0.0).open()
    assert list(found.que) == [good]
    assert found.requeued == [good]
    assert found.prep == {prepared}
    assert sorted(found.corrupt) == [bad, broken]
    assert os.path.isdir(os.path.join(s.path, "corrupt", bad))
    assert os.path.isdir(os.path.join(s.path, "corrupt", broken))
    assert not os.path.exists(os.path.join(s.msg_dir("que", good), "pid"))


def test_pid_files_reused_whatever_the_lengths(store):
    """
    A cleared pid file is parked in C{tmp/} and reused by the next
    L{write_pid}: truncated only when the old pid was longer, so a shorter
    pid never keeps digits of the old one; a pid file written by someone
    else (length unknown) is truncated too.
    """
    ids = [store.new_id() for _ in range(4)]
    for msg_id in ids:
        store.create({"msg_id": msg_id, "dest": "q"}, "que")
        store.move(msg_id, "que", "run")

    def pid_of(msg_id):
        with open(os.path.join(store.msg_dir("run", msg_id), "pid"), "rb") as f:
            return f.read()

    store.write_pid(ids[0], 4194303)
    assert pid_of(ids[0]) == b"4194303"
    store.clear_pid(ids[0])
    assert not os.path.exists(os.path.join(store.msg_dir("run", ids[0]), "pid"))
    [spare] = os.listdir(store.state_dir("tmp"))
    store.write_pid(ids[1], 42)  # shorter: truncated
    assert pid_of(ids[1]) == b"42"
    assert os.listdir(store.state_dir("tmp")) == []
    store.clear_pid(ids[1])
    store.write_pid(ids[2], 123456)  # longer: overwritten in place
    assert pid_of(ids[2]) == b"123456"
    # Someone else's pid file: its length is not known.
    with open(os.path.join(store.msg_dir("run", ids[3]), "pid"), "wb") as f:
        f.write(b"99999999999\n")
    store.clear_pid(ids[3])
    store.clear_pid(ids[2])
    store.write_pid(ids[0], 7)
    store.write_pid(ids[1], 8)
    assert {pid_of(ids[0]), pid_of(ids[1])} == {b"7", b"8"}
    assert os.listdir(store.state_dir("tmp")) == []


def test_status_file(store):
    msg_id = store.new_id()
    store.create({"msg_id": msg_id, "dest": "q"}, "que")
    assert store.read_status("que", msg_id) == (False, None)
    store.write_status("que", msg_id, "half way")
    assert store.read_status("que", msg_id) == (True, "half way")


def test_attach_md5_and_replace(store, tmp_path):
    msg_id = store.new_id()
    store.create({"msg_id": msg_id, "dest": "q"}, "prep")
    src = tmp_path / "data.bin"
    src.write_bytes(b"hello")
    got = []
    store.attach("prep", msg_id, str(src), "data.bin").addCallback(got.append)
    assert got == ["5d41402abc4b2a76b9719d911017c592"]
    atts = store.attachments("prep", msg_id)
    assert atts["data.bin"]["md5"] == "5d41402abc4b2a76b9719d911017c592"
    assert atts["data.bin"]["size"] == 5


@pytest.mark.parametrize(
    "name,reason",
    [
        (".hidden", "Attachment name as a dot-file not allowed: .hidden"),
        ("../escape", "Attachment name as a dot-file not allowed: ../escape"),
        ("a/b", "Attachment name has invalid character. not allowed: a/b"),
        ("a$b", "Attachment name has invalid character. not allowed: a$b"),
        ("a\\b", "Attachment name has invalid character. not allowed: a\\b"),
        ("a\nb", "Attachment name has invalid character. not allowed: a\nb"),
        ("a\rb", "Attachment name has invalid character. not allowed: a\rb"),
    ],
)
def test_attachment_names_refused(name, reason):
    with pytest.raises(MessageError) as e:
        check_attachment_name(name)
    assert e.value.reason == reason


def test_attach_errors(store, tmp_path):
    msg_id = store.new_id()
    store.create({"msg_id": msg_id, "dest": "q"}, "prep")
    with pytest.raises(MessageError, match="No such file"):
        store.attach("prep", msg_id, str(tmp_path / "missing"), "x")
    with pytest.raises(MessageError, match="cannot be a directory"):
        store.attach("prep", msg_id, str(tmp_path), "x")
    with pytest.raises(MessageError, match="must be normalized"):
        store.attach("prep", msg_id, "relative/path", "x")


def test_delete_hashed(store):
    msg_id = "20100625.0127.35.122.9"
    store.create({"msg_id": msg_id, "dest": "q"}, "que")
    store.move(msg_id, "que", "done")
    store.delete("done", msg_id)
    assert not store.exists("done", msg_id)


def test_attachment_md5_cached_by_inode(tmp_path, monkeypatch) -> None:
    """
    An attachment is hashed once; a changed file is hashed again.
    """
    from rqtwisted import store as store_module

    path = tmp_path / "big"
    path.write_bytes(b"abc")
    calls: list[str] = []
    real = store_module.md5_file

    def counting(p: str) -> str:
        calls.append(p)
        return real(p)

    monkeypatch.setattr(store_module, "md5_file", counting)
    first = store_module.cached_md5(str(path))
    assert first == "900150983cd24fb0d6963f7d28e17f72"
    assert store_module.cached_md5(str(path)) == first
    assert len(calls) == 1
    path.write_bytes(b"abcd")
    os.utime(path, ns=(1, 1))
    assert store_module.cached_md5(str(path)) == "e2fc714c4727ee9395f324cd2e7f331f"
    assert len(calls) == 2


def test_message_nested_deeper_than_the_parser_is_unreadable(store) -> None:
    """
    A C{msg} or C{status} file nested too deep for the JSON parser is an
    unreadable message, like any other bad JSON, not a crash.
    """
    msg_id = "20100625.0127.35.122.7"
    mdir = store.msg_dir("que", msg_id)
    os.mkdir(mdir)
    for name in ("msg", "status"):
        with open(os.path.join(mdir, name), "w") as f:
            f.write("[" * 100_000)
    with pytest.raises(MessageError, match="msg couldn't be read"):
        store.read("que", msg_id)
    assert store.read_status("que", msg_id) == (True, None)


def test_open_survives_stray_entries(tmp_path, sync):
    """
    Start-up moves aside what it cannot use instead of failing: a plain
    file named like a message in C{run/}, a message in both C{run/} and
    C{que/} (the one in C{que/} is kept), a C{msg} that is a FIFO (read
    without waiting), and a C{corrupt/} that holds the same name already;
    a file where C{done/} has a minute directory is skipped by the counts.
    """
    s = QueueStore(str(tmp_path / "q"), Syncer(syncNow, sync), lambda: 1277429255.0)
    s.open()
    plain, twice, fifo, kept = (f"20100625.0127.35.122.{n}" for n in range(1, 5))
    with open(s.msg_dir("run", plain), "w") as f:
        f.write("not a directory")
    s.create({"msg_id": twice, "dest": "q", "param1": "que copy"}, "que")
    os.mkdir(s.msg_dir("run", twice))
    with open(os.path.join(s.msg_dir("run", twice), "msg"), "w") as f:
        f.write('{"dest": "q", "param1": "run copy"}')
    s.create({"msg_id": fifo, "dest": "q"}, "que")
    os.unlink(os.path.join(s.msg_dir("que", fifo), "msg"))
    os.mkfifo(os.path.join(s.msg_dir("que", fifo), "msg"))
    os.makedirs(os.path.join(s.path, "corrupt", plain))
    s.create({"msg_id": kept, "dest": "q"}, "que")
    s.move(kept, "que", "done")
    os.makedirs(os.path.join(s.path, "done", "20100625", "01"), exist_ok=True)
    with open(os.path.join(s.path, "done", "20100625", "01", "59"), "w") as f:
        f.write("")
    found = QueueStore(s.path, Syncer(syncNow, sync), lambda: 0.0).open()
    assert sorted(found.que) == [twice]
    assert found.que[twice]["param1"] == "que copy"
    assert sorted(found.corrupt) == [plain, twice, fifo]
    corrupt = sorted(os.listdir(os.path.join(s.path, "corrupt")))
    assert corrupt == sorted([plain, plain + ".1", twice, fifo])
    assert found.counts["done"] == 1
    assert list(s.list_hashed("done")) == [kept]


# -- attachments: file work off the reactor, staging, names, symbolic links


@pytest.fixture
def held(tmp_path, sync):
    """
    C{(store, threads)}: a store whose thread work waits for C{threads.run()}.
    """
    threads = HeldThreads()
    s = QueueStore(str(tmp_path / "q"), Syncer(syncNow, sync), lambda: 1277429255.122, threads)
    s.open()
    return s, threads


def prep_message(store: QueueStore) -> str:
    msg_id = store.new_id()
    store.create({"msg_id": msg_id, "dest": "q"}, "prep")
    return msg_id


def staged(store: QueueStore) -> list[str]:
    """
    What C{tmp/} holds but the partial uploads.
    """
    return sorted(n for n in os.listdir(store.state_dir("tmp")) if n != "partial")


def test_attach_copies_and_hashes_in_a_thread(held, tmp_path, monkeypatch) -> None:
    """
    Linking (or copying) and hashing an attachment run in the store's
    thread runner: until they are done nothing is answered and C{attach/}
    is untouched; the file waits under a dot name of C{tmp/}.
    """
    from rqtwisted import store as store_module

    store, threads = held
    msg_id = prep_message(store)
    src = tmp_path / "big"
    src.write_bytes(b"abc")
    hashed: list[str] = []
    real_md5 = store_module.md5_file
    monkeypatch.setattr(store_module, "md5_file", lambda p: hashed.append(p) or real_md5(p))
    got: list[str] = []
    store.attach("prep", msg_id, str(src), "big").addCallback(got.append)
    assert got == [] and hashed == []
    assert store.attachments("prep", msg_id) == {}
    threads.run()
    assert got == ["900150983cd24fb0d6963f7d28e17f72"]
    assert len(hashed) == 1 and os.path.basename(hashed[0]).startswith(".")
    assert os.path.dirname(hashed[0]) == store.state_dir("tmp")
    assert staged(store) == []
    assert store.attachments("prep", msg_id)["big"]["md5"] == got[0]


@pytest.mark.parametrize("change", ["commit", "delete", "unwanted"])
def test_attach_fails_when_the_message_left_prep_meanwhile(held, tmp_path, change) -> None:
    """
    A message committed or deleted (or no longer wanted by its queue) while
    its attachment is copied and hashed gets nothing; the attach fails with
    C{cannot find message} and leaves no file behind.
    """
    store, threads = held
    msg_id = prep_message(store)
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    wanted = [True]
    got: list[Any] = []
    store.attach("prep", msg_id, str(src), "f", still_wanted=lambda: wanted[0]).addBoth(got.append)
    if change == "commit":
        store.move(msg_id, "prep", "que")
    elif change == "delete":
        store.delete("prep", msg_id)
    else:
        wanted[0] = False
    threads.run()
    assert isinstance(got[0], Failure) and got[0].value.reason == "cannot find message"
    assert staged(store) == []
    if change == "commit":
        assert store.attachments("que", msg_id) == {}
    if change == "unwanted":
        assert store.attachments("prep", msg_id) == {}


@pytest.mark.parametrize("when", ["linking", "hashing"])
def test_attach_cancelled_before_in_place_leaves_the_message_as_it_was(held, tmp_path, when) -> None:
    """
    An attach cancelled while its file is staged (linked or copied, then
    hashed in a thread) fails at once with L{CancelledError}; once the
    thread is done the staging file is removed and the message keeps what
    it had (an earlier attachment of that name included), with nothing
    logged.
    """
    store, threads = held
    msg_id = prep_message(store)
    old = tmp_path / "old"
    old.write_bytes(b"old")
    first = store.attach("prep", msg_id, str(old), "f")
    threads.run()
    assert result_of(first) == "149603e6c03516362a8da23f624db945"
    before = store.attachments("prep", msg_id)
    src = tmp_path / "new"
    src.write_bytes(b"new")
    got: list[Any] = []
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        d = store.attach("prep", msg_id, str(src), "f")
        d.addBoth(got.append)
        if when == "hashing":
            f, args, step = threads.calls.pop(0)
            step.callback(f(*args))
            assert len(staged(store)) == 1
        d.cancel()
        assert len(got) == 1 and isinstance(got[0], Failure) and got[0].check(CancelledError)
        threads.run()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert staged(store) == []
    assert store.attachments("prep", msg_id) == before
    with open(os.path.join(store.msg_dir("prep", msg_id), "attach", "f"), "rb") as f:
        assert f.read() == b"old"
    assert [e for e in logged if "log_failure" in e] == []


def test_attach_failing_in_the_thread_leaves_no_staging_file(held, tmp_path, monkeypatch) -> None:
    """
    A file that cannot be read whole fails the attach; its staging copy is
    removed.
    """
    from rqtwisted import store as store_module

    store, threads = held
    msg_id = prep_message(store)
    src = tmp_path / "f"
    src.write_bytes(b"abc")

    def unreadable(path: str) -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_module, "md5_file", unreadable)
    got: list[Any] = []
    store.attach("prep", msg_id, str(src), "f").addBoth(got.append)
    threads.run()
    assert isinstance(got[0], Failure) and got[0].check(OSError)
    assert staged(store) == []
    assert store.attachments("prep", msg_id) == {}


def test_attach_names_ending_in_tmp_are_attachments(store, tmp_path) -> None:
    """
    C{data.tmp} is an attachment like any other: listed, and kept when
    C{data} is attached next; so is a name of 255 characters.
    """
    msg_id = prep_message(store)
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    long = "x" * 255
    for name in ("data.tmp", "data", long):
        assert result_of(store.attach("prep", msg_id, str(src), name)) == "900150983cd24fb0d6963f7d28e17f72"
    assert sorted(store.attachments("prep", msg_id)) == ["data", "data.tmp", long]
    assert staged(store) == []


def test_attach_same_file_twice_leaves_no_staging_file(store, tmp_path) -> None:
    """
    Attaching a file again under the same name (the rename between two
    links of one inode does nothing) leaves only the attachment.
    """
    msg_id = prep_message(store)
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    for _ in range(2):
        result_of(store.attach("prep", msg_id, str(src), "f"))
    assert os.listdir(os.path.join(store.msg_dir("prep", msg_id), "attach")) == ["f"]
    assert staged(store) == []


@pytest.mark.parametrize("relative", [True, False])
def test_attach_symlink_attaches_the_file_it_leads_to(store, tmp_path, relative) -> None:
    """
    A symbolic link given as the source attaches the file it leads to, a
    regular file that stays when the link or the file changes.
    """
    msg_id = prep_message(store)
    target = tmp_path / "target"
    target.write_bytes(b"abc")
    link = tmp_path / "link"
    link.symlink_to("target" if relative else str(target))
    assert result_of(store.attach("prep", msg_id, str(link), "a")) == "900150983cd24fb0d6963f7d28e17f72"
    path = os.path.join(store.msg_dir("prep", msg_id), "attach", "a")
    assert not os.path.islink(path)
    link.unlink()
    target.unlink()
    with open(path, "rb") as f:
        assert f.read() == b"abc"
    assert store.attachments("prep", msg_id)["a"]["size"] == 3
    assert staged(store) == []


def test_link_attachments_follows_the_listing(store, tmp_path) -> None:
    """
    Clone and dup copy exactly the attachments the read form lists: names
    ending in C{.tmp} included, dot entries left out, a symbolic link
    (left by an older version) copied as the file it leads to.
    """
    msg_id = prep_message(store)
    adir = os.path.join(store.msg_dir("prep", msg_id), "attach")
    os.mkdir(adir)
    for name in ("data.tmp", ".hidden", "plain"):
        with open(os.path.join(adir, name), "wb") as f:
            f.write(b"abc")
    (tmp_path / "target").write_bytes(b"abcd")
    os.symlink(str(tmp_path / "target"), os.path.join(adir, "old"))
    listed = store.attachments("prep", msg_id)
    assert sorted(listed) == ["data.tmp", "old", "plain"]
    out = tmp_path / "copy"
    out.mkdir()
    store.link_attachments("prep", msg_id, str(out))
    assert sorted(os.listdir(out / "attach")) == sorted(listed)
    assert not os.path.islink(out / "attach" / "old")
    assert (out / "attach" / "old").read_bytes() == b"abcd"


def _link_failing(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """
    Make C{os.link} fail with C{code}.
    """

    def link(source: str, target: str) -> None:
        raise OSError(code, os.strerror(code), source, None, target)

    monkeypatch.setattr(os, "link", link)


def test_link_or_copy_links(tmp_path) -> None:
    """
    The content is hard-linked where it can be.
    """
    (tmp_path / "a").write_bytes(b"abc")
    link_or_copy(str(tmp_path / "a"), str(tmp_path / "b"))
    assert os.path.samefile(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EPERM, errno.EMLINK])
def test_link_or_copy_copies_where_a_link_is_refused(tmp_path, monkeypatch, code) -> None:
    """
    Another filesystem, one without hard links, a file at its link limit:
    the content is copied.
    """
    (tmp_path / "a").write_bytes(b"abc")
    _link_failing(monkeypatch, code)
    link_or_copy(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"abc"
    assert not os.path.samefile(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("code", [errno.ENOENT, errno.ENOSPC, errno.EIO])
def test_link_or_copy_other_link_errors(tmp_path, monkeypatch, code) -> None:
    """
    A link that fails for another reason is not covered up by a copy.
    """
    (tmp_path / "a").write_bytes(b"abc")
    _link_failing(monkeypatch, code)
    with pytest.raises(OSError) as info:
        link_or_copy(str(tmp_path / "a"), str(tmp_path / "b"))
    assert info.value.errno == code
    assert not (tmp_path / "b").exists()


def test_link_attachments_across_filesystems(store, tmp_path, monkeypatch) -> None:
    """
    Clone and dup copy attachments they cannot link; a link that fails
    for another reason fails them.
    """
    msg_id = prep_message(store)
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    result_of(store.attach("prep", msg_id, str(src), "f"))
    _link_failing(monkeypatch, errno.EXDEV)
    (tmp_path / "copy").mkdir()
    store.link_attachments("prep", msg_id, str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "attach" / "f").read_bytes() == b"abc"
    _link_failing(monkeypatch, errno.EIO)
    (tmp_path / "again").mkdir()
    with pytest.raises(OSError) as info:
        store.link_attachments("prep", msg_id, str(tmp_path / "again"))
    assert info.value.errno == errno.EIO


@pytest.mark.parametrize(
    "code, reason",
    [
        (errno.EXDEV, None),
        (errno.ENOENT, "Attachment currently cannot be read: {}"),
        (errno.EACCES, "Attachment currently cannot be read: {}"),
        (errno.ENOSPC, "No space left on device"),
    ],
)
def test_attach_link_errors(store, tmp_path, monkeypatch, code, reason) -> None:
    """
    An attach copies a file it cannot link; a file that turned out not to
    be readable is refused with the original's reason; any other error (no
    space left) is not passed off as the file's.
    """
    msg_id = prep_message(store)
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    _link_failing(monkeypatch, code)
    got: list[Any] = []
    store.attach("prep", msg_id, str(src), "f").addBoth(got.append)
    if reason is None:
        assert got == ["900150983cd24fb0d6963f7d28e17f72"]
        assert store.attachments("prep", msg_id)["f"]["size"] == 3
    else:
        assert isinstance(got[0], Failure)
        if code == errno.ENOSPC:
            assert not got[0].check(MessageError) and got[0].value.strerror == reason
        else:
            assert got[0].value.reason == reason.format(src)
        assert store.attachments("prep", msg_id) == {}
    assert staged(store) == []


def test_attachment_name_longer_than_a_file_name_is_refused():
    check_attachment_name("y" * 255)
    check_attachment_name("\u00e9" * 127)
    for name in ("y" * 256, "\u00e9" * 128):
        with pytest.raises(MessageError, match="Attachment name too long"):
            check_attachment_name(name)
