"""
Message operations of L{rqtwisted.queue} and their admin (AMP) face:
delete (at the hashed path for done/relayed: quirks 1), run now, clone,
single_que and C{max_count}, as message.md states them.
"""

from __future__ import annotations

import json
import os

import pytest

from rqtwisted.admin import AdminAPI
from rqtwisted.message import MessageError
from rqtwisted.testing import instance_for, result_of



@pytest.fixture
def env(tmp_path):
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.create_queue({"name": "q", "script": "./code/noop", "exec_prefix": ""})
    instance.startService()
    instance.set_admin("pause", "q")
    return instance, spawner, clock, instance.queue("q")


def send(instance, method="commit", **fields):
    fields.setdefault("dest", "q")
    return result_of(instance.create_message(fields, method)).rsplit("/", 1)[1]


def finish(instance, spawner, q, msg_id, line):
    """
    Run C{msg_id} now and end it with report C{line}.
    """
    result_of(q.run_now(msg_id))
    instance.set_admin("resume", "q")
    worker = spawner.running[-1]
    assert worker.env["RQ_MSG_ID"] == msg_id
    worker.say(line)
    instance.set_admin("pause", "q")
    worker.exit(0)


# -- delete --------------------------------------------------------------------------


@pytest.mark.parametrize("line, state", [("done ok", "done"), ("relayed http://x:3333/q/q/1", "relayed"),
                                         ("err bad", "err")])
def test_delete_finished_messages(env, line, state) -> None:
    instance, spawner, clock, q = env
    msg_id = send(instance)
    finish(instance, spawner, q, msg_id, line)
    path = q.store.msg_dir(state, msg_id)
    assert os.path.isdir(path)
    if state != "err":
        assert path.endswith(os.path.join(state, msg_id[:8], msg_id[9:11], msg_id[11:13], msg_id))
    assert q.num_messages()[state] == 1
    assert result_of(q.delete(msg_id)) == "msg deleted"
    assert not os.path.exists(path)
    assert q.num_messages()[state] == 0
    with pytest.raises(MessageError, match="msg not found"):
        q.delete(msg_id)


def test_delete_prep_and_que(env) -> None:
    instance, spawner, clock, q = env
    prep = send(instance, "prep")
    que = send(instance)
    assert result_of(q.delete(prep)) == "msg deleted"
    assert result_of(q.delete(que)) == "msg deleted"
    assert q.num_messages() == {"prep": 0, "que": 0, "run": 0, "done": 0, "err": 0, "relayed": 0}
    assert os.listdir(q.store.state_dir("prep")) == [] and os.listdir(q.store.state_dir("que")) == []
    # A deleted queued message never runs.
    instance.set_admin("resume", "q")
    assert spawner.workers == []


def test_delete_refuses_running_and_down(env) -> None:
    instance, spawner, clock, q = env
    running = send(instance)
    other = send(instance)
    result_of(q.run_now(running))
    instance.set_admin("resume", "q")
    assert q.locate(running) == "run"
    with pytest.raises(MessageError, match="destroy"):
        q.delete(running)
    assert q.locate(running) == "run"
    instance.set_admin("down", "q")
    with pytest.raises(MessageError, match="^status: DOWN$"):
        q.delete(other)
    with pytest.raises(MessageError, match="msg not found"):
        instance.set_admin("up", "q")
        q.delete("20110101.0000.00.000.1")


# -- run now --------------------------------------------------------------------------


def test_run_now(env) -> None:
    instance, spawner, clock, q = env
    now = int(clock.seconds())
    early = send(instance, due=now - 100)
    later = send(instance, due=now + 3600)
    assert result_of(q.run_now(later)) == "msg sent to front of run queue"
    # due = min(now, earliest due - 1), saved on disk.
    assert q.get(later)["due"] == now - 101
    assert q.store.read("que", later)["due"] == now - 101
    instance.set_admin("resume", "q")
    assert spawner.running[0].env["RQ_MSG_ID"] == later
    with pytest.raises(MessageError, match="^msg already running$"):
        q.run_now(later)
    spawner.running[0].say("done")
    spawner.running[0].exit(0)
    with pytest.raises(MessageError, match="^msg not in runnable state$"):
        q.run_now(later)
    assert early


def test_run_now_alone_is_due_now(env) -> None:
    instance, spawner, clock, q = env
    now = int(clock.seconds())
    msg_id = send(instance, due=now + 500)
    result_of(q.run_now(msg_id))
    assert q.get(msg_id)["due"] == now


# -- clone ----------------------------------------------------------------------------


def test_clone_copies_creation_fields_and_links_attachments(env, tmp_path) -> None:
    instance, spawner, clock, q = env
    now = int(clock.seconds())
    source = send(instance, "prep", src="me", param1="a", param4="d", due=now - 50, max_count=4,
                  post_run_webhook=["http://h/"], orig_msg_id="http://o:3333/q/x/1")
    f = tmp_path / "data.bin"
    f.write_bytes(b"payload")
    result_of(q.attach(source, str(f)))
    result_of(q.commit(source))
    finish(instance, spawner, q, source, "resend 0")
    finish(instance, spawner, q, source, "err gave up")
    assert q.get(source)["count"] == 1
    full = result_of(q.clone(source))
    assert full.startswith("http://testhost:3333/q/q/")
    new_id = full.rsplit("/", 1)[1]
    copy = q.get(new_id)
    assert copy["state"] == "que" and copy["status"] == "que"
    assert copy["cloned_from"] == source and copy["count"] == 0
    for key in ("src", "param1", "param4", "max_count", "post_run_webhook", "orig_msg_id", "dest"):
        assert copy[key] == q.get(source)[key], key
    # due is the old, already-past value.
    assert copy["due"] == q.get(source)["due"] <= now
    src_attach = os.path.join(q.store.msg_dir("err", source), "attach", "data.bin")
    new_attach = copy["_attachments"]["data.bin"]["path"]
    assert os.stat(src_attach).st_ino == os.stat(new_attach).st_ino
    assert copy["_attachments"]["data.bin"]["md5"] == q.get(source)["_attachments"]["data.bin"]["md5"]


@pytest.mark.parametrize("line", ["done ok", "relayed http://x:3333/q/q/1"])
def test_clone_done_and_relayed(env, line) -> None:
    instance, spawner, clock, q = env
    source = send(instance, param2="b")
    finish(instance, spawner, q, source, line)
    new_id = result_of(q.clone(source)).rsplit("/", 1)[1]
    assert q.get(new_id)["param2"] == "b"
    assert q.get(new_id)["orig_msg_id"] == q.full_id(source)


def test_clone_refusals(env) -> None:
    instance, spawner, clock, q = env
    prep = send(instance, "prep")
    que = send(instance)
    with pytest.raises(MessageError, match="^cannot clone message in prep state$"):
        q.clone(prep)
    with pytest.raises(MessageError, match="^cannot clone message in que state$"):
        q.clone(que)
    result_of(q.run_now(que))
    instance.set_admin("resume", "q")
    with pytest.raises(MessageError, match="^cannot clone message in run state$"):
        q.clone(que)
    with pytest.raises(MessageError, match="^msg not found$"):
        q.clone("20110101.0000.00.000.1")
    instance.set_admin("down", "q")
    with pytest.raises(MessageError, match="^status: DOWN$"):
        q.clone(que)


# -- single_que ----------------------------------------------------------------------


def test_single_que(env) -> None:
    instance, spawner, clock, q = env
    first = send(instance, "single_que", param1="1")
    assert send(instance, "single_que", param1="2") == first
    newest = send(instance, param1="3")
    assert send(instance, "single_que") == newest
    assert q.num_messages()["que"] == 2
    # Once nothing is queued (only running), a new one is made.
    result_of(q.delete(first))
    result_of(q.run_now(newest))
    instance.set_admin("resume", "q")
    assert q.num_messages()["que"] == 0 and q.num_messages()["run"] == 1
    made = send(instance, "single_que")
    assert made not in (first, newest) and q.locate(made) in ("que", "run")
    instance.set_admin("down", "q")
    with pytest.raises(MessageError, match="^status: DOWN$"):
        instance.create_message({"dest": "q"}, "single_que")


def test_single_que_counts_held_dups(tmp_path) -> None:
    instance, spawner, clock = instance_for(str(tmp_path / "root"))
    instance.create_queue({"name": "c", "script": "./code/noop", "exec_prefix": "", "coalesce_params": [1]})
    instance.startService()
    instance.set_admin("pause", "c")
    result_of(instance.create_message({"dest": "c", "param1": "a"}))
    held = result_of(instance.create_message({"dest": "c", "param1": "a"}))
    instance.set_admin("resume", "c")
    assert instance.queue("c").held
    assert result_of(instance.create_message({"dest": "c"}, "single_que")) == held


# -- max_count ------------------------------------------------------------------------


def test_max_count_and_count_from_text(env) -> None:
    instance, spawner, clock, q = env
    msg_id = send(instance, count="1", max_count="2")
    stored = q.store.read("que", msg_id)
    assert (stored["count"], stored["max_count"]) == (1, 2)
    finish(instance, spawner, q, msg_id, "resend 0-try again")
    # The count given at creation counts toward the limit.
    assert q.get(msg_id)["state"] == "err"
    assert q.get(msg_id)["status"] == "err - HIT MAX RESEND COUNT - MOVING TO ERR"
    assert q.get(msg_id)["count"] == 2
    with pytest.raises(MessageError, match="invalid max_count field"):
        send(instance, max_count="many")


def test_default_max_count_is_15(env) -> None:
    instance, spawner, clock, q = env
    msg_id = send(instance)
    assert q.get(msg_id)["max_count"] == 15
    for n in range(14):
        finish(instance, spawner, q, msg_id, "resend 0")
        assert q.get(msg_id)["state"] == "que", n
    finish(instance, spawner, q, msg_id, "resend 0")
    assert q.get(msg_id)["state"] == "err" and q.get(msg_id)["count"] == 15


# -- the admin (AMP) face --------------------------------------------------------------



def test_admin_message_file(env) -> None:
    """
    A message too large for AMP comes in a file of C{config/spill/}: read,
    removed, created. Nothing outside that directory is ever read or
    removed, nor a link in it.
    """
    instance, spawner, clock, q = env
    api = AdminAPI(instance)
    spill = os.path.join(instance.root.path, "config", "spill")
    os.makedirs(spill, exist_ok=True)
    path = os.path.join(spill, "message-1.json")
    with open(path, "w") as f:
        json.dump({"dest": "q", "param1": "y" * 100_000}, f)
    status, full = result_of(api.create_message("", "commit", "", path))
    assert status == "ok"
    assert not os.path.exists(path)
    assert json.loads(result_of(api.get_message(full))[1])["param1"] == "y" * 100_000
    outside = os.path.join(instance.root.path, "config", "config.json")
    with pytest.raises(MessageError, match="message_file must be a file of config/spill"):
        api.create_message("", "commit", "", outside)
    assert os.path.exists(outside)
    os.symlink(outside, os.path.join(spill, "link.json"))
    with pytest.raises(MessageError, match="message_file must be a file of config/spill"):
        api.create_message("", "commit", "", os.path.join(spill, "link.json"))
    assert os.path.exists(outside)
    with pytest.raises(MessageError, match="message_file cannot be read"):
        api.create_message("", "commit", "", os.path.join(spill, "gone.json"))
    # A FIFO is not waited on (nobody may ever write to it).
    os.mkfifo(os.path.join(spill, "fifo.json"))
    with pytest.raises(MessageError, match="message_file is not a regular file"):
        api.create_message("", "commit", "", os.path.join(spill, "fifo.json"))
    assert not os.path.exists(os.path.join(spill, "fifo.json"))
    # JSON nested too deep for the parser is refused like any bad JSON.
    with pytest.raises(MessageError, match="message is not valid JSON"):
        api.create_message("[" * 100_000 + "]" * 100_000, "commit")
    with open(path, "wb") as f:
        f.write(b"\xff\xfe")
    with pytest.raises(MessageError, match="not UTF-8"):
        api.create_message("", "commit", "", path)
    assert not os.path.exists(path)

def test_admin_message_actions(env) -> None:
    instance, spawner, clock, q = env
    api = AdminAPI(instance)
    status, full = result_of(api.create_message(json.dumps({"dest": "q", "max_count": "3"}), "single_que"))
    assert status == "ok"
    assert result_of(api.create_message(json.dumps({"dest": "q"}), "single_que")) == ("ok", full)
    assert result_of(api.message_action("run_now", full)) == ("ok", "msg sent to front of run queue")
    instance.set_admin("resume", "q")
    spawner.running[0].say("done fine")
    spawner.running[0].exit(0)
    assert api.message_action("status", full) == ("ok", "done - fine")
    status, clone = result_of(api.message_action("clone", full))
    assert status == "ok" and clone != full
    assert json.loads(result_of(api.get_message(clone))[1])["cloned_from"] == full.rsplit("/", 1)[1]
    assert result_of(api.message_action("delete", full)) == ("ok", "msg deleted")
    with pytest.raises(MessageError, match="msg not found"):
        api.message_action("state", full)
    with pytest.raises(MessageError, match="Queue not found"):
        api.message_action("delete", "http://testhost:3333/q/nosuch/20110101.0000.00.000.1")
