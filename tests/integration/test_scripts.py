"""
The queue-script API (spec/script-api.md) end to end: a real daemon runs real
bash scripts and the C{rq} command line observes the results.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, alive, kill_pids, md5_of, wait_for

pytestmark = pytest.mark.integration

IMPROPER = "PROCESS EXITED IMPROPERLY - MOVING TO ERR - Completion was "


def stdio_lines(daemon: Daemon, full_id: str) -> list[str]:
    return (daemon.msg_dir(full_id) / "job" / "stdio.log").read_text().splitlines()


def values(lines: list[str]) -> dict[str, str]:
    """
    C{key=value} lines of a script's output.
    """
    found = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            found[key] = value
    return found


def test_done(daemon: Daemon) -> None:
    """
    C{done <text>}: state done, status C{done - <text>}; the worker runs in
    the job directory with the RQ_* environment, stdin on /dev/null, and its
    output after the C{RQ START} line in job/stdio.log.
    """
    script = daemon.queue_with_script(
        "test",
        """
        echo "pid=$$"
        echo "pwd=$(pwd)"
        for v in RQ_PARAM1 RQ_PARAM2 RQ_MSG_ID RQ_FULL_MSG_ID RQ_DEST RQ_DEST_QUEUE RQ_COUNT RQ_PORT \\
                 RQ_MSG_DIR RQ_WRITE RQ_READ RQ_VER RQ_REALSCRIPT; do
          if [ "${!v+set}" = set ]; then echo "$v=${!v}"; else echo "missing $v"; fi
        done
        echo "RQ_HOST=$RQ_HOST"
        echo "RQ_ENV=$RQ_ENV"
        echo "nice=$(nice)"
        echo "stdin_target=$(readlink /proc/$$/fd/0)"
        if IFS= read -r line; then echo "stdin=data:$line"; else echo "stdin=eof"; fi
        ls /proc/$$/fd > fds.txt
        echo "hello from the script"
        echo "run working" >&3
        echo "done all good $RQ_PARAM1" >&3
        """,
    )
    full = daemon.send("test", "--param1", "x y")
    short = full.rsplit("/", 1)[1]
    assert daemon.wait_state(full, "done") == "done"
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - all good x y"])
    assert daemon.rq("state", "--msg_id", full) == (0, ["ok done"])
    assert daemon.rq("statuscountmesg", "--msg_id", full) == (0, ["ok 0"])

    lines = stdio_lines(daemon, full)
    # "\n<pid> - <local time> - RQ START - <real script path>\n"
    assert lines[0] == ""
    start = re.fullmatch(
        r"(\d+) - \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} - RQ START - (.*)", lines[1]
    )
    assert start, lines[:3]
    assert start.group(2) == os.path.realpath(script)
    out = values(lines[2:])
    # The script's $$ is the worker's pid (the launcher execs it).
    assert out["pid"] == start.group(1)
    assert "hello from the script" in lines

    job_dir = daemon.run_dir("test", full) / "job"
    assert os.path.realpath(out["pwd"]) == os.path.realpath(job_dir)
    assert os.path.realpath(out["RQ_MSG_DIR"]) == os.path.realpath(job_dir)
    assert [line for line in lines if line.startswith("missing ")] == []
    assert out["RQ_PARAM1"] == "x y"
    assert out["RQ_PARAM2"] == ""
    assert out["RQ_MSG_ID"] == short
    assert out["RQ_FULL_MSG_ID"] == full
    assert out["RQ_DEST"] == f"http://localhost:{daemon.port}/q/test"
    assert out["RQ_DEST_QUEUE"] == "test"
    assert out["RQ_COUNT"] == "0"
    assert out["RQ_PORT"] == str(daemon.port)
    assert (out["RQ_WRITE"], out["RQ_READ"]) == ("3", "4")
    assert out["RQ_VER"] == "1.18.3"
    assert out["RQ_REALSCRIPT"] == os.path.realpath(script)
    assert out["RQ_HOST"] == f"http://localhost:{daemon.port}/"
    assert out["RQ_ENV"] == "development"
    assert out["nice"] == "19"
    assert out["stdin_target"] == "/dev/null"
    assert out["stdin"] == "eof"
    # Only stdio and the two pipes are inherited (bash adds 255 for the
    # script it reads; 5..32 must not leak in).
    # (Listed by a child into a file: a command substitution would add its
    # own pipe to the list.)
    listed = (daemon.msg_dir(full) / "job" / "fds.txt").read_text().split()
    assert set(listed) - {"255"} == {"0", "1", "2", "3", "4"}, listed
    # The pid file is gone once finished.
    assert not (daemon.msg_dir(full) / "pid").exists()



def test_script_runs_rq_without_rq_root(daemon: Daemon) -> None:
    """
    A queue script that runs C{rq} itself (to chain a message) reaches its
    own daemon from its job directory, also when the daemon was started
    with C{--root} alone: the workers' environment names the root.
    """
    daemon.terminate()
    daemon.start(env={k: v for k, v in daemon.env.items() if k != "RQ_ROOT"})
    daemon.queue_with_script("chained", 'echo "done chained $RQ_PARAM1" >&3\n')
    daemon.queue_with_script(
        "first",
        f"""
        sent=$("{sys.executable}" -m rqtwisted sendmesg --dest chained --param1 "from $RQ_MSG_ID" 2>&1)
        echo "root=$RQ_ROOT"
        echo "done $sent" >&3
        """,
    )
    full = daemon.send("first")
    assert daemon.wait_state(full, "done") == "done"
    code, [line] = daemon.rq("statusmesg", "--msg_id", full)
    assert code == 0 and line.startswith(f"ok done - ok {daemon.base_url}q/chained/"), line
    chained = line.split(" - ok ", 1)[1]
    assert daemon.wait_state(chained, "done") == "done"
    short = full.rsplit("/", 1)[1]
    assert daemon.rq("statusmesg", "--msg_id", chained) == (0, [f"ok done - chained from {short}"])
    assert f"root={daemon.root}" in stdio_lines(daemon, full)


def test_message_too_large_for_amp(daemon: Daemon) -> None:
    """
    C{rq sendmesg} with a parameter of 100,000 bytes (over AMP's 64 KiB,
    within the original's frame): stored whole and given to the script;
    the file it was handed over in is gone.
    """
    daemon.queue_with_script("test", 'echo "done ${#RQ_PARAM1} ${RQ_PARAM1:0:3}" >&3\n')
    full = daemon.send("test", "--param1", "abc" + "z" * 99_997)
    assert daemon.wait_state(full, "done") == "done"
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - 100000 abc"])
    assert os.listdir(daemon.root / "config" / "spill") == []

def test_err(daemon: Daemon) -> None:
    daemon.queue_with_script("test", 'echo "err it broke badly" >&3\nexit 0\n')
    full = daemon.send("test")
    daemon.wait_state(full, "err")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok err - it broke badly"])


def test_fails_alias_and_nonzero_exit(daemon: Daemon) -> None:
    """
    C{fails} is an alias of C{err}; err wins whatever the exit status.
    """
    daemon.queue_with_script("test", 'echo "fails nope" >&3\nexit 7\n')
    full = daemon.send("test")
    daemon.wait_state(full, "err")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok err - nope"])


@pytest.mark.parametrize(
    "body, completion, number, exact",
    [
        ('echo "done but not really" >&3\nexit 3\n', "done", 3, "exit 3"),
        ('echo "run about to die" >&3\nkill -KILL $$\n', "", 9, None),
    ],
    ids=["done-then-exit-3", "killed-by-signal"],
)
def test_improper_exit_is_err(daemon: Daemon, body: str, completion: str, number: int, exact: str | None) -> None:
    """
    A worker that exits with a non-zero status, or is killed, after
    C{done} or without any completion verb ends in err with its exit status.
    """
    daemon.queue_with_script("test", body)
    full = daemon.send("test")
    daemon.wait_state(full, "err")
    code, out = daemon.rq("statusmesg", "--msg_id", full)
    prefix = "ok err - " + IMPROPER + completion + " but exit status was "
    assert code == 0 and len(out) == 1 and out[0].startswith(prefix), out
    assert re.search(rf"\b{number}\b", out[0][len(prefix):]), out
    if exact is not None:
        # What the product writes today (Ruby's Process::Status#to_s without pid).
        assert out[0] == prefix + exact


def test_no_completion_verb_is_err(daemon: Daemon) -> None:
    """
    Any other verb only sets the status text; without a completion verb the
    message ends in err with that text.
    """
    daemon.queue_with_script("test", 'echo "run step 1" >&3\necho "fail something" >&3\nexit 0\n')
    full = daemon.send("test")
    daemon.wait_state(full, "err")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok err - something"])


def test_first_completion_verb_wins_and_partial_lines(daemon: Daemon) -> None:
    """
    A report split across writes is reassembled; the first completion verb
    wins, but every line replaces the status text.
    """
    daemon.queue_with_script(
        "test",
        """
        printf 'do' >&3
        sleep 0.2
        printf 'ne first\\n' >&3
        echo "err second" >&3
        echo "run last words" >&3
        """,
    )
    full = daemon.send("test")
    daemon.wait_state(full, "done")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - last words"])


def test_resend_counts(daemon: Daemon, tmp_path: Path) -> None:
    log = tmp_path / "counts.log"
    daemon.queue_with_script(
        "test",
        f"""
        echo "count=$RQ_COUNT" >> {log}
        if [ "$RQ_COUNT" -lt 2 ]; then
          echo "resend 0-again" >&3
        else
          echo "done after $RQ_COUNT resends" >&3
        fi
        """,
    )
    full = daemon.send("test")
    daemon.wait_state(full, "done")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - after 2 resends"])
    assert daemon.rq("statuscountmesg", "--msg_id", full) == (0, ["ok 2"])
    counts = log.read_text().splitlines()
    assert counts == ["count=0", "count=1", "count=2"]


def test_resend_delay(daemon: Daemon, tmp_path: Path) -> None:
    """
    C{resend 2-later}: back to que at once with count 1 and the text as its
    status, run again about two seconds later.
    """
    log = tmp_path / "runs.log"
    daemon.queue_with_script(
        "test",
        f"""
        date +%s.%N >> {log}
        if [ "$RQ_COUNT" = 0 ]; then echo "resend 2-later" >&3; else echo "done rerun" >&3; fi
        """,
    )
    full = daemon.send("test")
    wait_for(lambda: daemon.rq("statuscountmesg", "--msg_id", full) == (0, ["ok 1"]), 5, what="count 1")
    wait_for(lambda: daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok que - 2-later"]), 5, what="back in que")
    daemon.wait_state(full, "done", timeout=6)
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - rerun"])
    first, second = (float(t) for t in log.read_text().split())
    # due = int(now + 2): at least one second later.
    assert 1.0 <= second - first < 4.0, second - first


def test_future_due(daemon: Daemon) -> None:
    daemon.queue_with_script("test", 'echo "done on time" >&3\n')
    full = daemon.send("test", "--due", str(int(time.time()) + 2))
    time.sleep(0.5)
    assert daemon.rq("state", "--msg_id", full) == (0, ["ok que"])
    daemon.wait_state(full, "done", timeout=6)


def test_default_exec_prefix(daemon: Daemon) -> None:
    """
    Without --exec_prefix the script runs through C{bash -lc}.
    """
    script = daemon.script("login.sh", 'echo "done via $RQ_PARAM1" >&3\n')
    code, out = daemon.rq("create_queue", "--name", "test", "--script", str(script))
    assert (code, out) == (0, ["ok queue created - awesome"])
    full = daemon.send("test", "--param1", "bash")
    daemon.wait_state(full, "done")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - via bash"])


def test_resend_hits_max_count(daemon: Daemon) -> None:
    daemon.queue_with_script("test", 'echo "resend 0-forever" >&3\n')
    full = daemon.send("test", "--max_count", "2")
    daemon.wait_state(full, "err")
    assert daemon.rq("statusmesg", "--msg_id", full) == (
        0,
        ["ok err - HIT MAX RESEND COUNT - MOVING TO ERR"],
    )
    assert daemon.rq("statuscountmesg", "--msg_id", full) == (0, ["ok 2"])


def test_dup_to_local_queue(daemon: Daemon) -> None:
    """
    C{dup 0-X-other}: the copy is committed to queue C{other}, the reply
    C{ok <new full id>} comes back on fd 4.
    """
    daemon.queue_with_script(
        "other",
        """
        echo "done other got $RQ_PARAM1 count=$RQ_COUNT orig=$RQ_ORIG_MSG_ID" >&3
        """,
    )
    daemon.queue_with_script(
        "test",
        """
        echo "dup 0-X-other" >&3
        read -r reply <&4
        echo "done $reply" >&3
        """,
    )
    full = daemon.send("test", "--param1", "p1", "--max_count", "9")
    daemon.wait_state(full, "done")
    code, out = daemon.rq("statusmesg", "--msg_id", full)
    assert code == 0 and len(out) == 1, out
    match = re.fullmatch(
        re.escape(f"ok done - ok http://localhost:{daemon.port}/q/other/") + r"(\S+)", out[0]
    )
    assert match, out
    copy = f"http://localhost:{daemon.port}/q/other/{match.group(1)}"
    daemon.wait_state(copy, "done")
    assert daemon.rq("statusmesg", "--msg_id", copy) == (
        0,
        [f"ok done - other got p1 count=0 orig={full}"],
    )
    shown = daemon.show(copy)
    assert shown["dest"] == "other"
    assert shown["param1"] == "p1"
    assert shown["orig_msg_id"] == full
    assert str(shown["max_count"]) == "9"


@pytest.mark.parametrize(
    "target,reply",
    [
        ("nosuchqueue", "fail couldn't connect to queue - nosuchqueue"),
        ("other", "fail dup failed - status: DOWN"),
    ],
)
def test_dup_refused(daemon: Daemon, target: str, reply: str) -> None:
    """
    A dup to a missing queue or a DOWN queue answers C{fail ...} on fd 4.
    """
    daemon.queue_with_script("other", 'echo "done" >&3\n')
    assert daemon.rq("down", "--name", "other") == (0, ["ok other"])
    daemon.queue_with_script(
        "test",
        f"""
        echo "dup 0-X-{target}" >&3
        read -r reply <&4
        echo "done $reply" >&3
        """,
    )
    full = daemon.send("test")
    daemon.wait_state(full, "done")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, [f"ok done - {reply}"])


def test_grandchild_holding_status_pipe(daemon: Daemon, tmp_path: Path, read_pid) -> None:
    """
    A background grandchild keeping fd 3 open does not delay completion.
    """
    pidfile = tmp_path / "grandchild.pid"
    daemon.queue_with_script(
        "test",
        f"""
        sleep 60 &
        echo $! > {pidfile}
        echo "done bg" >&3
        exit 0
        """,
    )
    started = time.monotonic()
    full = daemon.send("test")
    grandchild = read_pid(pidfile)
    daemon.cleanup_pids.append(grandchild)
    try:
        daemon.wait_state(full, "done", timeout=5)
        assert time.monotonic() - started < 5
        assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - bg"])
        # The queue goes on: the next message runs too.
        second = daemon.send("test")
        daemon.wait_state(second, "done", timeout=5)
    finally:
        kill_pids([grandchild])
    wait_for(lambda: not alive(grandchild), 5, what="grandchild gone")


def test_prep_attach_commit(daemon: Daemon, tmp_path: Path) -> None:
    daemon.queue_with_script(
        "test",
        """
        sum=$(md5sum ../attach/blob.bin | cut -d' ' -f1)
        size=$(stat -c %s ../attach/blob.bin)
        echo "done $sum $size" >&3
        """,
    )
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 40 + b"\0\xff\n\r")
    md5 = md5_of(blob)
    size = blob.stat().st_size

    full = daemon.ok("prepmesg", "--dest", "test", "--param1", "a")
    assert full.startswith(f"http://localhost:{daemon.port}/q/test/")
    assert daemon.rq("state", "--msg_id", full) == (0, ["ok prep"])
    # Relative --pathname is relative to the cwd.
    code, out = daemon.rq("attachmesg", "--msg_id", full, "--pathname", "blob.bin", cwd=tmp_path)
    assert (code, out) == (0, [f"ok {md5}-Attached successfully for Message: {full} attachment"])

    code, out = daemon.rq("attachstatusmesg", "--msg_id", full)
    assert code == 0 and out[0] == "ok 1", out
    assert len(out) == 2
    name, got_md5, got_size, path = out[1].split(" ", 3)
    assert (name, got_md5, got_size) == ("blob.bin", md5, str(size))
    assert os.path.isabs(path)
    assert Path(path).read_bytes() == blob.read_bytes()

    # Still in prep: nothing runs.
    time.sleep(0.3)
    assert daemon.rq("state", "--msg_id", full) == (0, ["ok prep"])
    assert daemon.rq("commitmesg", "--msg_id", full) == (0, ["ok msg commited"])
    daemon.wait_state(full, "done")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, [f"ok done - {md5} {size}"])
    # A second commit is refused.
    code, out = daemon.rq("commitmesg", "--msg_id", full)
    assert code == 1 and out[0].startswith("fail "), out

    # Attachments follow a clone.
    clone = daemon.ok("clone", "--msg_id", full)
    assert clone.startswith(f"http://localhost:{daemon.port}/q/test/") and clone != full
    daemon.wait_state(clone, "done")
    assert daemon.rq("statusmesg", "--msg_id", clone) == (0, [f"ok done - {md5} {size}"])


def test_attach_named_and_refused_outside_prep(daemon: Daemon, tmp_path: Path) -> None:
    daemon.queue_with_script("test", 'echo "done $(cat ../attach/renamed.txt)" >&3\n')
    src = tmp_path / "x.txt"
    src.write_text("payload")
    full = daemon.ok("prepmesg", "--dest", "test")
    code, out = daemon.rq("attachmesg", "--msg_id", full, "--pathname", str(src), "--name", "renamed.txt")
    assert (code, out) == (
        0,
        [f"ok {md5_of(src)}-Attached successfully for Message: {full} attachment"],
    )
    assert daemon.rq("commitmesg", "--msg_id", full) == (0, ["ok msg commited"])
    daemon.wait_state(full, "done")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - payload"])
    # Attaching to a message that is not in prep keeps the attach suffix.
    code, out = daemon.rq("attachmesg", "--msg_id", full, "--pathname", str(src))
    assert code == 1 and len(out) == 1, out
    assert out[0].startswith("fail ") and out[0].endswith(f" for Message: {full} attachment"), out


def test_attach_tmp_names_symlinks_and_the_same_file_twice(daemon: Daemon, tmp_path: Path) -> None:
    """
    A name ending in C{.tmp} is an attachment like any other; a relative
    symbolic link attaches the file it leads to; the same file attached
    twice under one name leaves no staging file; the script sees exactly
    the attachments listed.
    """
    daemon.queue_with_script("test", 'echo "done $(ls -A ../attach | tr "\\n" " ")" >&3\n')
    src = tmp_path / "x.txt"
    src.write_text("payload")
    (tmp_path / "link").symlink_to("x.txt")
    md5 = md5_of(src)
    full = daemon.ok("prepmesg", "--dest", "test")
    for path, name in [("x.txt", "data.tmp"), ("x.txt", "data"), ("link", "linked"), ("x.txt", "data")]:
        code, out = daemon.rq("attachmesg", "--msg_id", full, "--pathname", path, "--name", name, cwd=tmp_path)
        assert (code, out) == (0, [f"ok {md5}-Attached successfully for Message: {full} attachment"])
    code, out = daemon.rq("attachstatusmesg", "--msg_id", full)
    assert code == 0 and out[0] == "ok 3", out
    assert [line.split(" ")[:2] for line in out[1:]] == [["data", md5], ["data.tmp", md5], ["linked", md5]]
    queue_dir = Path(daemon.root) / "queue" / "test"
    assert [n for n in os.listdir(queue_dir / "tmp") if n.startswith(".")] == []
    (tmp_path / "link").unlink()
    src.unlink()
    assert daemon.rq("commitmesg", "--msg_id", full) == (0, ["ok msg commited"])
    daemon.wait_state(full, "done")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - data data.tmp linked "])


def test_parallel_workers(daemon: Daemon) -> None:
    """
    num_workers 4: eight 1-second messages finish in about two seconds.
    """
    daemon.queue_with_script("test", 'sleep 1\necho "done slept" >&3\n', "--num_workers", "4")
    started = time.monotonic()
    ids = [daemon.send("test", "--param1", str(i)) for i in range(8)]
    for full in ids:
        daemon.wait_state(full, "done", timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    # Never more than four at once: two rounds of at least one second.
    assert elapsed >= 1.9, elapsed
    for full in ids:
        assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - slept"])


def test_script_error_then_fixed(daemon: Daemon) -> None:
    script = daemon.script("test.sh", 'echo "done fixed" >&3\n', executable=False)
    daemon.create_queue("test", script)
    full = daemon.send("test")
    wait_for(lambda: daemon.queue_status("test") == "SCRIPTERROR", 5, what="SCRIPTERROR")
    time.sleep(0.5)
    assert daemon.rq("state", "--msg_id", full) == (0, ["ok que"])
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok que"])
    os.chmod(script, 0o755)
    daemon.wait_state(full, "done", timeout=10)
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - fixed"])
    assert daemon.queue_status("test") == "UP"


def test_message_fields_reach_script(daemon: Daemon) -> None:
    """
    count/params/force_remote from the command line reach the environment;
    a last report without a newline still counts.
    """
    daemon.queue_with_script(
        "test",
        """
        printf 'done c=%s p4=%s fr=%s' "$RQ_COUNT" "$RQ_PARAM4" "${RQ_FORCE_REMOTE-unset}" >&3
        """,
    )
    full = daemon.send("test", "--count", "3", "--param4", "four", "--force_remote")
    daemon.wait_state(full, "done")
    assert daemon.rq("statusmesg", "--msg_id", full) == (0, ["ok done - c=3 p4=four fr=1"])
    assert daemon.rq("statuscountmesg", "--msg_id", full) == (0, ["ok 3"])
    assert daemon.rq("attachstatusmesg", "--msg_id", full) == (0, ["ok 0"])

    plain = daemon.send("test")
    daemon.wait_state(plain, "done")
    assert daemon.rq("statusmesg", "--msg_id", plain) == (0, ["ok done - c=0 p4= fr=unset"])


def test_dup_copies_attachments(daemon: Daemon, tmp_path: Path) -> None:
    daemon.queue_with_script("other", 'echo "done $(cat ../attach/note.txt)" >&3\n')
    daemon.queue_with_script(
        "test",
        """
        echo "dup 1-X-other" >&3
        read -r reply <&4
        echo "done $reply" >&3
        """,
    )
    note = tmp_path / "note.txt"
    note.write_text("attached words")
    full = daemon.ok("prepmesg", "--dest", "test")
    daemon.ok("attachmesg", "--msg_id", full, "--pathname", str(note))
    assert daemon.rq("commitmesg", "--msg_id", full) == (0, ["ok msg commited"])
    daemon.wait_state(full, "done")
    _, out = daemon.rq("statusmesg", "--msg_id", full)
    assert out[0].startswith(f"ok done - ok http://localhost:{daemon.port}/q/other/"), out
    copy = out[0].split()[-1]
    code, lines = daemon.rq("attachstatusmesg", "--msg_id", copy)
    assert code == 0 and lines[0] == "ok 1", lines
    assert lines[1].split(" ")[:3] == ["note.txt", md5_of(note), str(note.stat().st_size)]
    daemon.wait_state(copy, "done", timeout=5)
    assert daemon.rq("statusmesg", "--msg_id", copy) == (0, ["ok done - attached words"])


def test_concurrent_sends_while_workers_run(daemon: Daemon) -> None:
    """
    Admin connections opened while workers start and exit all the time are
    all answered, and every message runs once, to done, with its own start
    line and pid (connections, status pipes and spawn gates share fd
    numbers in the daemon).
    """
    import json
    import threading

    from rqtwisted.admincommands import SOCKET
    from rqtwisted.ampclient import AdminClient

    daemon.queue_with_script("busy", 'echo "done ok" >&3\n', "--num_workers", "4")
    answers: list[tuple[str, str]] = []
    lock = threading.Lock()

    def send(count: int) -> None:
        client = AdminClient(str(daemon.root / SOCKET))
        for _ in range(count):
            answer = client.call("CreateMessage", message=json.dumps({"dest": "busy"}), method="commit", relay_ok="")
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=send, args=(100,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 600
    assert {status for status, _ in answers} == {"ok"}, [a for a in answers if a[0] != "ok"][:3]
    run = daemon.root / "queue" / "busy"

    def finished() -> bool:
        return sum(1 for _ in (run / "done").rglob("msg")) == 600

    wait_for(finished, 60, what="600 messages done")
    assert not list((run / "err").iterdir())
    pids = set()
    for stdio in (run / "done").rglob("stdio.log"):
        lines = stdio.read_text().splitlines()
        assert len(lines) == 2 and lines[0] == "" and " - RQ START - " in lines[1], lines
        pids.add(lines[1].split(" - ", 1)[0])
    assert len(pids) == 600
