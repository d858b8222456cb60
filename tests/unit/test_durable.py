"""
Tests for L{rqtwisted.durable}: atomic replace and group-commit syncing.
"""

from __future__ import annotations

import os

import pytest
from twisted.internet.defer import Deferred

from rqtwisted import durable
from rqtwisted.durable import Syncer, replace_file
from rqtwisted import fsync
from rqtwisted.fsync import CONFIG_LIMIT, FileTooLarge, read_config, read_file, remove_quietly


class ManualThread:
    """
    A stand-in for C{deferToThreadPool} whose calls finish when told.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[object, tuple, Deferred]] = []

    def __call__(self, f, *args):
        d = Deferred()
        self.calls.append((f, args, d))
        return d

    def finish(self, index: int = 0) -> None:
        f, args, d = self.calls.pop(index)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


def test_replace_file_is_atomic_rename(tmp_path):
    path = str(tmp_path / "f")
    replace_file(path, b"one")
    replace_file(path, b"two")
    assert open(path, "rb").read() == b"two"
    assert os.listdir(tmp_path) == ["f"]


def test_concurrent_syncs_share_rounds():
    synced: list[list[str]] = []
    thread = ManualThread()
    syncer = Syncer(thread, lambda paths: synced.append(list(paths)))
    fired: list[str] = []
    syncer.sync("a").addCallback(lambda _: fired.append("a"))
    # A round is in flight: these wait and share the next round.
    syncer.sync("b", "c").addCallback(lambda _: fired.append("b"))
    syncer.sync("c", "d").addCallback(lambda _: fired.append("c"))
    syncer.later("e")
    assert len(thread.calls) == 1 and fired == []
    thread.finish()
    assert fired == ["a"]
    assert len(thread.calls) == 1
    thread.finish()
    assert fired == ["a", "b", "c"]
    # Nobody waits for "e": it did not slow the waiters' round down, and
    # goes with the next one.
    thread.finish()
    assert synced == [["a"], ["b", "c", "d"], ["e"]]
    assert syncer.rounds == 3


def test_later_alone_syncs_at_once():
    synced: list[list[str]] = []
    thread = ManualThread()
    syncer = Syncer(thread, lambda paths: synced.append(list(paths)))
    syncer.later("a", "b")
    thread.finish()
    assert synced == [["a", "b"]]


def test_later_held_back_while_acks_wait():
    """
    Paths nobody waits for ride with the waiters' rounds only every
    C{lazyRounds} rounds, together.
    """
    synced: list[list[str]] = []
    thread = ManualThread()
    syncer = Syncer(thread, lambda paths: synced.append(list(paths)))
    syncer.lazyRounds = 2
    syncer.sync("s0")
    for n in range(1, 5):
        syncer.later(f"l{n}")
        syncer.sync(f"s{n}")
        thread.finish()
    thread.finish()
    # Then, with nobody waiting, the rest goes at once.
    thread.finish()
    assert synced == [["s0"], ["s1"], ["s2"], ["s3", "l1", "l2", "l3"], ["s4"], ["l4"]]


def test_failed_round_errbacks_its_waiters_only():
    thread = ManualThread()

    def sync(paths):
        if "bad" in paths:
            raise OSError("disk gone")

    syncer = Syncer(thread, sync)
    results: list[object] = []
    syncer.sync("bad").addBoth(results.append)
    syncer.sync("good").addBoth(results.append)
    thread.finish()
    assert isinstance(results[0].value, OSError)
    thread.finish()
    assert results[1] is None


def test_ack_waits_for_sync():
    thread = ManualThread()
    syncer = Syncer(thread, lambda paths: None)
    fired = []
    syncer.sync("x").addCallback(fired.append)
    assert fired == []
    thread.finish()
    assert fired == [None]


MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
tmpfs /srv/rq\\040queues tmpfs rw 0 0
/dev/sdb1 /srv ext4 rw 0 0
/dev/sdc1 /srv/rq\\040queues/disk xfs rw 0 0
/dev/sdd1 /dev/shm ext4 rw 0 0
"""


@pytest.fixture
def mounts(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return str(path)


@pytest.mark.parametrize(
    "path, kind",
    [
        ("/var/lib/rq", "ext4"),
        ("/srv", "ext4"),
        ("/srv/other", "ext4"),
        ("/srv/rq queues", "tmpfs"),
        ("/srv/rq queues/root", "tmpfs"),
        ("/srv/rq queues/disk/root", "xfs"),
        ("/srv/rq queuesX", "ext4"),  # a prefix of the name is not the mount
        ("/dev/shm/rq", "ext4"),  # the last of stacked mounts wins
    ],
)
def test_filesystem_type_longest_mount_point(mounts, path, kind):
    assert durable.filesystem_type(path, mounts) == kind


def test_filesystem_type_unknown_without_mount_table(tmp_path):
    assert durable.filesystem_type("/", str(tmp_path / "missing")) is None


def test_filesystem_type_follows_symlinks(tmp_path):
    # The real mount table: a link to a directory of the root's mount is
    # on the directory's filesystem, wherever the link itself is.
    link = tmp_path / "link"
    link.symlink_to("/proc/self")
    assert durable.filesystem_type(str(link)) == "proc"


def test_syncer_for_memory_filesystem_skips_rounds(mounts):
    made = []
    syncer = durable.syncer_for("/srv/rq queues/root", lambda: made.append(1), mounts)
    assert isinstance(syncer, durable.MemorySyncer)
    assert made == []  # no fsync thread is made
    fired = []
    syncer.sync("/srv/rq queues/root/queue").addCallback(fired.append)
    syncer.later("/srv/rq queues/root/queue")
    assert fired == [None]
    assert syncer.rounds == 0


def test_syncer_for_disk_runs_rounds_in_its_thread(mounts):
    thread = ManualThread()
    syncer = durable.syncer_for("/srv/data", lambda: thread, mounts)
    assert not isinstance(syncer, durable.MemorySyncer)
    fired = []
    syncer.sync("/srv/data/x").addCallback(fired.append)
    assert fired == [] and syncer.rounds == 1


# -- what a queue script may leave where the daemon writes (none of it waits)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_replace_file_clears_what_sits_under_its_temp_name(tmp_path, kind):
    """
    A FIFO (which a blocking open would wait on), a symbolic link (which
    would be written through) or a directory left under the temp name is
    removed, and the file is written all the same.
    """
    target = tmp_path / "status"
    tmp = tmp_path / "status.tmp"
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    if kind == "fifo":
        os.mkfifo(tmp)
    elif kind == "symlink":
        tmp.symlink_to(outside)
    else:
        tmp.mkdir()
        (tmp / "x").write_bytes(b"")
    replace_file(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert not os.path.lexists(tmp)
    assert outside.read_bytes() == b"keep"


def test_write_file_refuses_fifo_and_symlink(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        durable.write_file(str(fifo), b"x")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        durable.write_file(str(link), b"x")
    assert not (tmp_path / "elsewhere").exists()


def test_read_file_and_sync_do_not_wait_on_a_fifo(tmp_path):
    fifo = tmp_path / "msg"
    os.mkfifo(fifo)
    assert durable.read_file(str(fifo)) == b""
    durable.sync_paths([str(fifo), str(tmp_path)])
    (tmp_path / "file").write_bytes(b"data")
    assert durable.read_file(str(tmp_path / "file")) == b"data"


def test_read_file_limit(tmp_path):
    """
    With a limit, a file of up to C{limit} bytes is read whole and a
    larger one is refused, the reason saying so.
    """
    path = tmp_path / "file"
    path.write_bytes(b"x" * 100)
    assert read_file(str(path), limit=100) == b"x" * 100
    with pytest.raises(FileTooLarge, match=r"^too large: over 99 bytes$"):
        read_file(str(path), limit=99)
    assert read_file(str(path)) == b"x" * 100
    assert str(FileTooLarge(4096)) == "too large: over 4 KiB"


def test_read_config_reads_at_most_the_limit_and_one_byte(tmp_path, monkeypatch, no_hang):
    """
    A config file is read up to L{CONFIG_LIMIT} plus one byte, however
    large it is (here an endless one, a link to C{/dev/zero}): a huge file
    costs the reactor no more than a megabyte.
    """
    got: list[int] = []
    real_read = os.read

    def counting(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        got.append(len(data))
        return data

    monkeypatch.setattr(fsync.os, "read", counting)
    endless = tmp_path / "config.json"
    endless.symlink_to("/dev/zero")
    with pytest.raises(FileTooLarge, match=r"^too large: over 1 MiB$"):
        read_config(str(endless))
    assert sum(got) == CONFIG_LIMIT + 1
    exact = tmp_path / "exact.json"
    exact.write_bytes(b" " * CONFIG_LIMIT)
    assert len(read_config(str(exact))) == CONFIG_LIMIT


def test_remove_quietly(tmp_path):
    """
    A file (or a symbolic link, not what it leads to) is removed; one that
    is gone already is no error; another error is raised.
    """
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    remove_quietly(str(tmp_path / "link"))
    assert os.listdir(tmp_path) == ["f"]
    remove_quietly(str(tmp_path / "f"))
    remove_quietly(str(tmp_path / "f"))
    assert os.listdir(tmp_path) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        remove_quietly(str(tmp_path / "d"))
