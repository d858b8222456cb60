"""
Route tests of L{rqtwisted.web.app}: every route of spec/http.md, in memory
(treq's StubTreq against the web resource) on a real temporary root.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from rqtwisted.web.app import RQWeb
from tests.unit.roots import new_queue_dir
from tests.unit.web_helpers import Client, make_env, result, set_settings


@pytest.fixture
def env(tmp_path):
    instance, spawner, clock, client = make_env(str(tmp_path / "root"))
    yield instance, spawner, clock, client
    instance.stopService()


def send(instance, queue="test", method="commit", **fields):
    fields.setdefault("dest", queue)
    return result(instance.queue(queue).create(fields, method)).rsplit("/", 1)[1]


def done_messages(instance, spawner, clock, count):
    """
    Send C{count} messages to C{test}, each done before the next (10 ms
    apart); their ids, oldest first.
    """
    ids = []
    for _ in range(count):
        ids.append(send(instance))
        finish(spawner)
        clock.advance(0.01)
    return ids


def amend_status(instance, change):
    """
    Make C{instance.status()} pass what it answers through C{change(data)}.
    """
    status = instance.status

    def amended():
        data = status()
        change(data)
        return data

    instance.status = amended


def finish(spawner, verb="done", text="ok", code=0):
    worker = spawner.running[0]
    worker.say(f"{verb} {text}")
    worker.exit(code)


# -- instance routes


def test_home_has_status_line_ids_and_script(env):
    instance, spawner, clock, client = env
    reply = client.get("/")
    assert reply.code == 200
    assert reply.headers["content-type"].startswith("text/html")
    assert re.search(r"QUEUEMGR:.*OPERATIONAL", reply.text)
    assert 'QUEUEMGR:<span class="green" id="status">OPERATIONAL</span>' in reply.text
    for element in ("ping", "pid", "uptime", "time", "version"):
        assert f'id="{element}"' in reply.text
    for state in ("prep", "que", "run", "err", "done", "relayed"):
        assert f'id="{state}-test"' in reply.text
    assert 'id="status-test" class="green">UP<' in reply.text
    # The shared js/rq.js comes first.
    assert '<script src="/js/rq.js"></script><script src="/js/home.js"></script>' in reply.text
    assert 'href="/new_queue"' in reply.text
    assert reply.text.index('href="/q/test"') < reply.text.index('href="/q/cleaner"')


def test_home_shows_cron_entries_with_run_now_form(env):
    instance, spawner, clock, client = env

    def with_schedule(data):
        for q in data["queues"]:
            if q["name"] == "test":
                q["schedule"] = [{"cron": "*/5 * * * *", "params": {"param1": "a<b"}, "next_run": 1300000300}]
        data["timers"] = [{"name": "tick", "cron": "@hourly", "dest": "test"}]

    amend_status(instance, with_schedule)
    text = client.get("/").text
    assert "CRON: */5 * * * *" in text
    assert "Next run at " in text
    assert 'name="mesg[src]" value="cron-now"' in text
    assert 'name="mesg[param1]" value="a&lt;b"' in text
    assert 'id="timer-list"' in text and "tick" in text


def test_home_timers_due_in_and_scandir(env):
    """
    Timers show seconds to due (special-queues.md); scandir links and their
    errors are listed too.
    """
    instance, spawner, clock, client = env

    def with_watchers(data):
        data["timers"] = [{"name": "tick", "period": 60, "dest": "test", "next_run": data["time"] + 42,
                           "last_run": None, "sent": 3, "error": None}]
        data["scandir"] = [{"name": "auto", "target": "/srv/auto", "queue": "auto", "error": None},
                           {"name": "bad", "target": "/srv/bad", "queue": None, "error": "no <run>"}]

    amend_status(instance, with_watchers)
    text = client.get("/").text
    assert '<tr id="timer-tick"><td>tick</td><td>60</td><td>test</td><td>42 s</td>' in text
    assert '<tr id="scandir-auto"><td>auto</td><td>/srv/auto</td><td>auto</td><td></td></tr>' in text
    assert '<td class="red">no &lt;run&gt;</td>' in text


def test_q_json_shape_and_order(env):
    instance, spawner, clock, client = env
    send(instance)
    reply = client.get("/q.json")
    assert reply.headers["content-type"] == "application/json"
    data = reply.json()
    assert data["status"] == "OPERATIONAL" and data["ping"] == "pong" and data["version"] == "1.18.3"
    assert {"pid", "uptime", "time"} <= set(data)
    names = [q["name"] for q in data["queues"]]
    assert names == ["test", "cleaner", "relay", "rq_router", "webhook"]
    test = data["queues"][0]
    assert set(test) == {"name", "status", "ping", "pid", "uptime", "counts"}
    assert test["counts"] == {"prep": 0, "que": 0, "run": 1, "done": 0, "err": 0, "relayed": 0}


def test_q_json_queue_that_does_not_run_has_empty_counts(env):
    instance, spawner, clock, client = env
    new_queue_dir(instance, "broken", "{not json")
    data = client.get("/q.json").json()
    broken = [q for q in data["queues"] if q["name"] == "broken"][0]
    assert broken["status"] == "ERROR" and broken["counts"] == {}
    assert client.get("/q/broken.json").code == 503
    assert client.get("/q/broken").code == 503
    assert "queue is COMPLETELY DOWN" in client.get("/q/broken").text


def test_q_txt(env):
    instance, spawner, clock, client = env
    reply = client.get("/q.txt")
    assert reply.headers["content-type"] == "text/plain;charset=utf-8"
    assert reply.text == "\n".join(f"/q/{n}.txt" for n in sorted(["test", "cleaner", "relay", "rq_router", "webhook"]))


def test_relative_root_in_links_and_routes(env):
    instance, spawner, clock, client = env
    set_settings(instance, relative_root="/therq")
    assert client.get("/q.txt").code == 404
    assert client.get("/q.txt").text == "Not Found: /q.txt"
    assert client.get("/therq/q.txt").text.startswith("/therq/q/")
    home = client.get("/therq/").text
    assert 'href="/therq/q/test"' in home and 'src="/therq/js/home.js"' in home
    assert 'href="/therq/css/rq.css"' in home
    reply = client.post("/therq/q/test/adminoper", data={"pause": "pause", "back": "/therq/"})
    assert reply.code == 303 and reply.headers["location"] == "http://testhost:3333/therq/"


def test_paths_are_normalised(env):
    instance, spawner, clock, client = env
    assert client.get("//q//test/./../test.txt").text.startswith("status: UP")


def test_unknown_route_is_the_not_found_page(env):
    instance, spawner, clock, client = env
    reply = client.get("/nothing/here")
    assert reply.code == 404
    assert "<h2>Not Found</h2>" in reply.text


def test_pages_are_text_html_in_utf8(env):
    # http.md, Types: pages are text/html;charset=utf-8 (the Not Found page too).
    instance, spawner, clock, client = env
    for path in ("/", "/q/test", "/q/test/new_message", "/nothing/here"):
        assert client.get(path).headers["content-type"] == "text/html;charset=utf-8", path


@pytest.fixture
def logged():
    """
    The events logged during the test.
    """
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _troubles(events):
    return [e for e in events if e.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)
            or e.get("isError") or e.get("failure") or e.get("log_failure")]


@pytest.mark.parametrize("path,code,reply", [
    ("/q/%ff", 404, "page"),
    ("/%ff/x", 404, "page"),
    ("/q/%ff.json", 404, ["fail", "Queue not found"]),
    ("/q/%C3%28/done.json", 404, ["fail", "Queue not found"]),
    ("/q/test/%ff.json", 404, ["fail", "msg not found"]),
    ("/q/test/x%ffy/state.json", 404, ["fail", "msg not found"]),
])
def test_path_that_is_not_utf8_is_answered_by_its_route(env, logged, path, code, reply):
    """
    A path segment that is not UTF-8 names nothing: the route answers as
    for a name it does not have (JSON on the JSON routes), and nothing is
    logged (klein would answer a plain 400 and log a traceback).
    """
    instance, spawner, clock, client = env
    answer = client.get(path)
    assert answer.code == code
    if reply == "page":
        assert "<h2>Not Found</h2>" in answer.text
    else:
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == reply
    assert _troubles(logged) == []


def test_path_that_is_not_utf8_on_posts_and_files(attached, logged):
    instance, client, msg, payload = attached
    reply = client.post("/q/%ff/new_message", data={"mesg": "{}"})
    assert (reply.code, reply.json()) == (404, ["fail", "Queue not found"])
    assert client.get(f"/q/test/{msg}/attach/%ff").code == 404
    assert client.get(f"/q/test/{msg}/log/%ff").code == 404
    assert client.get(f"/q/test/{msg}/tailview/%ff").code == 404
    reply = client.post(f"/q/test/{msg}/attach/%ff", data={"_method": "delete", "x_format": "json"})
    assert reply.json()[0] == "fail"
    assert sorted(instance.queue("test").store.attachments("prep", msg)) == ["data.bin"]
    assert _troubles(logged) == []


def test_static_files(env):
    instance, spawner, clock, client = env
    web = client.web
    static = web.static_dir
    assert client.get("/css/rq.css").code == (200 if os.path.exists(os.path.join(static, "css", "rq.css")) else 404)
    assert client.get("/js/..%2F..%2Fapp.py").code == 404
    assert client.get("/js/nothing.js").code == 404


def test_static_files_from_a_directory(tmp_path):
    instance, spawner, clock, _ = make_env(str(tmp_path / "root"))
    static = tmp_path / "static"
    (static / "js").mkdir(parents=True)
    (static / "js" / "home.js").write_text("var x = 1;")
    (static / "favicon.ico").write_bytes(b"\0\1")
    client = Client(RQWeb(instance, None, static_dir=str(static)))
    reply = client.get("/js/home.js")
    assert reply.code == 200 and reply.body == b"var x = 1;"
    assert "javascript" in reply.headers["content-type"]
    assert client.get("/favicon.ico").body == b"\0\1"


# -- security


def test_basic_auth_on_every_route(env):
    instance, spawner, clock, client = env
    set_settings(instance, basic_auth={"realm": "The RQ", "users": {"admin": "s3cret", "ops": "sha256:"
                                       "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"}})
    for path in ("/", "/q.json", "/q/test", "/css/rq.css", "/nothing"):
        reply = client.get(path)
        assert reply.code == 401, path
        assert reply.headers["www-authenticate"] == 'Basic realm="The RQ"'
    assert client.get("/q.json", auth=("admin", "wrong")).code == 401
    assert client.get("/q.json", auth=("admin", "s3cret")).code == 200
    assert client.get("/q.json", auth=("ops", "secret")).code == 200


def test_allowed_ips(env):
    instance, spawner, clock, client = env
    set_settings(instance, allowed_ips=["10.1."])
    assert client.get("/q.json").code == 403
    set_settings(instance, allowed_ips=["10.1.", "127.0.0"])
    assert client.get("/q.json").code == 200


# -- new queue / delete queue


def test_new_queue_refused_unless_allowed(env):
    instance, spawner, clock, client = env
    set_settings(instance, allow_new_queue=False)
    for method, path in (("GET", "/new_queue"), ("POST", "/new_queue"), ("POST", "/new_queue_link")):
        reply = client.request(method, path, data={"x": "y"} if method == "POST" else None)
        assert reply.code == 403 and reply.text == "Queue creation not allowed at this time."
    assert 'href="/new_queue"' not in client.get("/").text


def test_new_queue_form_and_create(env):
    instance, spawner, clock, client = env
    form = client.get("/new_queue").text
    for name in ("queue[name]", "queue[script]", "queue[num_workers]", "queue[exec_prefix]",
                 "queue[coalesce_params][]", "queue[blocking_params][]"):
        assert f'name="{name}"' in form
    assert 'value="bash -lc "' in form
    reply = client.post("/new_queue", data=[
        ("queue[name]", "fresh"), ("queue[script]", "./code/noop"), ("queue[num_workers]", "2"),
        ("queue[exec_prefix]", ""), ("queue[coalesce_params][]", "1"), ("queue[coalesce_params][]", "3"),
    ])
    assert reply.code == 303 and reply.headers["location"] == "http://testhost:3333/q/fresh"
    assert instance.queue("fresh").config.num_workers == 2
    assert instance.queue("fresh").config.coalesce_params == (1, 3)
    page = client.get(reply.location_path).text
    assert "queue created" in page
    assert "<code>" in page
    assert "from QueueMgr" in page
    # one-shot
    assert "queue created" not in client.get("/q/fresh").text


def test_new_queue_invalid_name_flash_survives_to_not_found(env):
    instance, spawner, clock, client = env
    reply = client.post("/new_queue", data={"queue[name]": "bad name", "queue[script]": "./code/noop"})
    assert reply.code == 303
    assert reply.location_path == "/q/bad%20name"
    page = client.get(reply.location_path)
    assert page.code == 404
    assert "queue name has invalid characters" in page.text


def test_new_queue_link(env, tmp_path):
    instance, spawner, clock, client = env
    conf = instance.root.join("code", "linked.json")
    with open(conf, "w") as f:
        json.dump({"name": "linked", "script": "./code/noop", "num_workers": 1, "exec_prefix": ""}, f)
    reply = client.post("/new_queue_link", data={"queue[json_path]": conf})
    assert reply.code == 303 and reply.location_path == "/q/linked"
    assert os.path.islink(os.path.join(instance.root.queue_path("linked"), "config.json"))
    assert "linked" in instance.queues
    assert "queue created" in client.get("/q/linked").text
    # relative to the root works too; outside the root is refused
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"name": "outside", "script": "./code/noop", "num_workers": 1}))
    assert client.post("/new_queue_link", data={"queue[json_path]": str(outside)}).code == 404
    assert client.post("/new_queue_link", data={"queue[json_path]": "../outside.json"}).code == 404
    bad = instance.root.join("code", "bad.json")
    with open(bad, "w") as f:
        f.write("{nope")
    assert client.post("/new_queue_link", data={"queue[json_path]": "code/bad.json"}).code == 404
    again = client.post("/new_queue_link", data={"queue[json_path]": "code/linked.json"})
    assert again.code == 303
    assert "queue is already running" in client.get(again.location_path).text


def test_delete_queue(env):
    instance, spawner, clock, client = env
    reply = client.post("/delete_queue", data={"queue_name": "test"})
    assert reply.code == 303 and reply.location_path == "/"
    assert "test" not in instance.queues
    assert "started deleting queue" in client.get("/").text
    assert client.get("/q/test").code == 404
    reply = client.post("/delete_queue", data={"queue_name": "nope"})
    assert "no such queue" in client.get(reply.location_path).text


# -- search


def test_search(env):
    instance, spawner, clock, client = env
    send(instance, param1="alpha")
    send(instance, param1="beta")
    reply = client.get("/search?name=test&query[param1]=alp")
    assert reply.code == 200
    assert [m["param1"] for m in reply.json()] == ["alpha"]
    assert client.get("/search?name=test&query[param1]=alp&exact=true").json() == []
    assert [m["param1"] for m in client.get("/search?query[param1]=beta").json()] == ["beta"]
    assert client.get("/search?name=nope&query[param1]=x").code == 404


def test_search_with_bytes_that_are_not_utf8(env):
    """
    A query string holding bytes that are not UTF-8 is answered (they
    match nothing), not a 500.
    """
    instance, spawner, clock, client = env
    send(instance, param1="alpha")
    assert [m["param1"] for m in client.get("/search?x=%FF").json()] == ["alpha"]
    for query in ("/search?name=test&query[param1]=%E9", "/search?name=test&query[param1]=%E9&exact"):
        reply = client.get(query)
        assert reply.code == 200, query
        assert reply.json() == []


def test_search_query_without_field_is_400(env):
    """
    C{query=v} without C{[field]} is a mistake, not "match everything".
    """
    instance, spawner, clock, client = env
    reply = client.get("/search?name=test&query=abc")
    assert reply.code == 400
    assert reply.json() == ["fail", "query needs a field: query[<field>]=<value>"]


def test_search_passes_query_to_instance(env):
    instance, spawner, clock, client = env
    calls = []
    instance.search = lambda name, query, exact: calls.append((name, query, exact)) or [{"msg_id": "x"}]
    assert client.get("/search?name=test&query[src]=a&query[param2]=b&exact=1").json() == [{"msg_id": "x"}]
    assert calls == [("test", {"src": "a", "param2": "b"}, True)]


# -- queue routes


def test_queue_page_lists_server_side_newest_first(env):
    instance, spawner, clock, client = env
    first = send(instance)
    clock.advance(2)
    later = [send(instance, param1=str(i)) for i in range(2)]
    text = client.get("/q/test").text
    assert '<title>RQ :: test</title>' in text
    assert 'id="que_size" class="size">2<' in text and 'id="run_size" class="size">1<' in text
    assert text.index(later[1]) < text.index(later[0])
    assert f'href="/q/test/{first}"' in text
    assert 'name="_method" value="run_now"' in text and 'name="_method" value="destroy"' in text
    assert '<h4 class="day">20110313</h4>' in text
    assert '<script src="/js/rq.js"></script><script src="/js/queue.js"></script>' in text
    assert 'data-json-url="/q/test.json"' in text
    assert 'id="list-done"' in text and 'id="list-relayed"' not in text


def test_queue_page_list_keys_match_the_json(env):
    """
    Each list carries the key queue.js computes from q/<name>.json, so the
    script keeps the server's list while nothing changes.
    """
    import html

    instance, spawner, clock, client = env
    send(instance)
    clock.advance(2)
    for i in range(3):
        send(instance, param1=f"<{i}>", dest="t\u00e9st")
    text = client.get("/q/test").text
    data = client.get("/q/test.json?limit=50").json()
    for state in ("prep", "que", "run", "done", "err"):
        match = re.search(rf'<ul id="list-{state}"[^>]* data-key="([^"]*)"', text)
        assert match, state
        expected = json.dumps([[m.get("msg_id"), m.get("dest"), m.get("status"), m.get("new_msg")]
                               for m in data["messages"][state]], separators=(",", ":"), ensure_ascii=False)
        assert html.unescape(match.group(1)) == expected, state
    assert data["messages"]["que"] and data["messages"]["run"]


def test_queue_page_pages_done_list(env):
    instance, spawner, clock, client = env
    ids = done_messages(instance, spawner, clock, 60)
    text = client.get("/q/test").text
    assert 'id="done_size" class="size">60<' in text
    assert ids[-1] in text and ids[0] not in text
    assert 'href="/q/test?done_page=2"' in text
    page2 = client.get("/q/test?done_page=2").text
    assert ids[0] in page2 and ids[-1] not in page2


def test_queue_page_down_still_lists(env):
    instance, spawner, clock, client = env
    msg = send(instance)
    instance.set_admin("down", "test")
    text = client.get("/q/test").text
    assert "Queue is HARD DOWN" in text and msg in text
    assert 'name="up"' in text


def test_queue_page_unknown_is_404(env):
    instance, spawner, clock, client = env
    assert client.get("/q/nope").code == 404
    assert client.get("/q/nope.json").code == 404
    assert client.get("/q/test.xml").code == 404


def test_queue_json(env):
    instance, spawner, clock, client = env
    running = send(instance)
    clock.advance(1)
    queued = send(instance)
    prep = send(instance, method="prep")
    spawner.running[0].say("run working")
    data = client.get("/q/test.json").json()
    assert data["status"] == "UP" and data["ping"] == "pong"
    assert data["que_size"] == 1 and data["run_size"] == 1 and data["prep_size"] == 1
    assert data["messages"]["que"] == [{"msg_id": queued, "due": 1300000001, "dest": "test"}]
    assert data["messages"]["run"] == [{"msg_id": running, "status": "working", "dest": "test"}]
    assert data["messages"]["prep"] == [{"msg_id": prep}]
    assert set(data["messages"]) == {"prep", "que", "run", "done", "err", "relayed"}
    instance.set_admin("down", "test")
    assert client.get("/q/test.json").json() == {"status": "DOWN"}


def test_queue_json_limit(env):
    instance, spawner, clock, client = env
    for _ in range(3):
        send(instance)
        finish(spawner, "err", "bad")
        clock.advance(0.01)
    assert len(client.get("/q/test.json").json()["messages"]["err"]) == 3
    data = client.get("/q/test.json?limit=2").json()
    assert len(data["messages"]["err"]) == 2 and data["err_size"] == 3


def test_queue_txt(env):
    instance, spawner, clock, client = env
    send(instance)
    send(instance)
    assert client.get("/q/test.txt").text == (
        "status: UP\nuptime: 0\n\nprep: 0\nque: 1\nrun: 1\n\ndone: 0\nerr: 0\nrelayed: 0\n"
    )
    instance.set_admin("down", "test")
    assert client.get("/q/test.txt").text == "status: DOWN\n"


def test_done_json(env):
    instance, spawner, clock, client = env
    ids = done_messages(instance, spawner, clock, 12)
    assert client.get("/q/test/done.json").json() == list(reversed(ids))[:10]
    assert client.get("/q/test/done.json?limit=3").json() == list(reversed(ids))[:3]
    assert client.get("/q/test/done.json?limit=x").code == 400


def test_config_json_and_config(env):
    instance, spawner, clock, client = env
    raw = client.get("/q/test/config.json")
    assert raw.code == 200 and raw.json()["name"] == "test"
    assert client.get("/q/nope/config.json").code == 404
    path = os.path.join(instance.root.queue_path("test"), "config.json")
    data = json.load(open(path))
    data["schedule"] = [{"cron": "@hourly", "param1": "x"}]
    json.dump(data, open(path, "w"))
    result(instance.restart_queue("test"))
    config = client.get("/q/test/config").json()
    assert config["num_workers"] == 1 and config["script"] == "./code/noop"
    assert config["schedule"] == [{"cron": "@hourly", "params": {"param1": "x"}}]
    assert set(config) >= {"name", "script", "num_workers", "exec_prefix", "env_vars", "coalesce_params",
                           "blocking_params", "schedule"}


def test_redirect_location_is_a_clean_url(env):
    """
    A 303's Location is absolute from Host, its path percent-encoded (a
    C{back} holding spaces, quotes or line breaks stays one URL); a Host
    header that is not a host name gives way to the configured host:port.
    """
    instance, spawner, clock, client = env
    reply = client.post("/q/test/adminoper", data={"pause": "1", "back": '/q/test?x=<a b>"\r\nX-Evil: 1'})
    assert reply.code == 303
    assert reply.headers["location"] == "http://testhost:3333/q/test?x=%3Ca%20b%3E%22%0D%0AX-Evil:%201"
    assert "x-evil" not in reply.headers
    reply = client.post("/q/test/adminoper", data={"resume": "1"}, headers={"Host": 'evil"<x>'})
    settings = instance.settings
    assert reply.headers["location"] == f"http://{settings.host}:{settings.port}/q/test"
    reply = client.post("/q/test/adminoper", data={"pause": "1"}, headers={"Host": "[::1]:8080"})
    assert reply.headers["location"] == "http://[::1]:8080/q/test"


def test_adminoper_and_restart(env):
    instance, spawner, clock, client = env
    reply = client.post("/q/test/adminoper", data={"pause": "pause", "back": "/q/test"})
    assert reply.code == 303 and reply.headers["location"] == "http://testhost:3333/q/test"
    assert instance.queue("test").status() == "PAUSE"
    assert "Successfully paused queue test" in client.get("/q/test").text
    client.post("/q/test/adminoper", data={"down": "down", "up": "up"})
    assert instance.queue("test").status() == "DOWN"  # down before up, checked in that order
    client.post("/q/test/adminoper", data={"up": "up"})
    assert instance.queue("test").status() == "PAUSE"  # up clears only .down (quirks 19)
    assert client.post("/q/test/adminoper", data={"back": "/"}).code == 400
    assert client.post("/q/nope/adminoper", data={"up": "up"}).code == 404
    # back must stay on this site
    reply = client.post("/q/test/adminoper", data={"resume": "1", "back": "http://evil.example/x"})
    assert reply.location_path == "/q/test"
    old = instance.queue("test")
    reply = client.post("/q/test/restart", data={"back": "/"})
    assert reply.code == 303 and reply.location_path == "/"
    assert instance.queue("test") is not old
    assert "Successfully restarted queue test" in client.get("/").text
    assert client.post("/q/nope/restart").code == 404


def test_admin_failure_is_500(env):
    instance, spawner, clock, client = env

    def refuse(action, name):
        from rqtwisted.message import MessageError

        raise MessageError(f"not allowed to {action}")

    instance.set_admin = refuse
    reply = client.post("/q/test/adminoper", data={"down": "down"})
    assert reply.code == 500
    assert reply.text == "500 - Couldn't down queue. [\"fail\", \"not allowed to down\"]."


# -- new_message


def test_new_message_form_fields_and_overrides(env):
    instance, spawner, clock, client = env
    text = client.get("/q/test/new_message").text
    for name in ("mesg[dest]", "mesg[src]", "mesg[param1]", "mesg[param4]", "mesg[_method]",
                 "mesg[post_run_webhook]", "x_format"):
        assert f'name="{name}"' in text
    assert 'value="/q/test"' in text
    for fid in ("mesg_dest_field", "mesg_src_field", "mesg_param1_field", "mesg_param4_field",
                "mesg_status_field", "mesg_post_run_webhook_field"):
        assert f'id="{fid}"' in text
    assert 'style="display: none;"' not in text
    with open(os.path.join(instance.root.queue_path("test"), "form.json"), "w") as f:
        json.dump({"default": "hidden", "mesg_param1": {"label": "Host <name>", "help": "which host"}}, f)
    text = client.get("/q/test/new_message").text
    assert "Host &lt;name&gt;" in text and "which host" in text
    assert re.search(r'class="field" id="mesg_param1_field">', text)
    assert re.search(r'id="mesg_param2_field" style="display: none;"', text)
    assert 'id="mesg_submit_field"' in text and not re.search(r'id="mesg_submit_field" style', text)
    with open(os.path.join(instance.root.queue_path("test"), "form.json"), "w") as f:
        f.write("{bad")
    reply = client.get("/q/test/new_message")
    assert reply.code == 500 and reply.text == "500 - Bad overrides file"


def test_new_message_json_body(env):
    instance, spawner, clock, client = env
    reply = client.post("/q/test/new_message", data=json.dumps({"dest": "elsewhere", "param1": "p", "count": "3"}),
                        headers={"Content-Type": "application/json"})
    assert reply.code == 200 and reply.headers["content-type"] == "application/json"
    status, full = reply.json()
    assert status == "ok" and full.startswith("http://testhost:3333/q/test/")
    msg = instance.queue("test").get(full.rsplit("/", 1)[1])
    assert msg["dest"] == "elsewhere" and msg["count"] == 3 and msg["param1"] == "p"


def test_new_message_json_nested_too_deep_is_400(env):
    instance, spawner, clock, client = env
    deep = "[" * 100_000
    reply = client.post("/q/test/new_message", data=deep, headers={"Content-Type": "application/json"})
    assert (reply.code, reply.json()) == (400, ["fail", "invalid JSON body"])
    reply = client.post("/q/test/new_message", data={"mesg": deep})
    assert (reply.code, reply.json()) == (400, ["fail", "invalid JSON in mesg field"])
    assert instance.queue("test").num_messages()["que"] + instance.queue("test").num_messages()["run"] == 0


def test_new_message_form_values_that_are_not_utf8_are_refused(env):
    """
    Form values that are not UTF-8 are refused, not stored with U+FFFD in
    their place (what is stored must be what was sent).
    """
    instance, spawner, clock, client = env
    body = b"mesg=" + b'{"dest": "test", "param1": "caf\xe9"}'.replace(b" ", b"+")
    reply = client.post("/q/test/new_message", data=body,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (reply.code, reply.json()) == (400, ["fail", "invalid JSON in mesg field: not UTF-8"])
    reply = client.post("/q/test/new_message", data=b"x_format=html&mesg%5Bdest%5D=test&mesg%5Bparam1%5D=caf%E9",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.code == 400 and "not UTF-8" in reply.text
    assert instance.queue("test").num_messages()["que"] + instance.queue("test").num_messages()["run"] == 0


def test_new_message_counts_converted_as_from_the_command_line(env):
    """
    Numeric text in C{count}/C{max_count} is converted as for C{rq
    sendmesg} (one conversion for both: the leading integer); text that is
    not a number, a count out of range and an empty due are refused with
    the same reasons.
    """
    instance, spawner, clock, client = env
    mesg = {"dest": "test", "count": "3.7", "max_count": " 5 "}
    status, full = client.post("/q/test/new_message", data={"mesg": json.dumps(mesg)}).json()
    msg = instance.queue("test").get(full.rsplit("/", 1)[1])
    assert (status, msg["count"], msg["max_count"]) == ("ok", 3, 5)
    for field, value in (("count", "abc"), ("due", "")):
        reply = client.post("/q/test/new_message", data={"mesg": json.dumps({"dest": "test", field: value})})
        assert reply.json() == ["fail", f"invalid {field} field ({value})"]
    mesg = {"dest": "test", "count": "1e3", "max_count": "20 tries"}
    status, full = client.post("/q/test/new_message", data={"mesg": json.dumps(mesg)}).json()
    msg = instance.queue("test").get(full.rsplit("/", 1)[1])
    assert (status, msg["count"], msg["max_count"]) == ("ok", 1, 20)
    reply = client.post("/q/test/new_message", data={"mesg": json.dumps({"dest": "test", "max_count": -1})})
    assert reply.json() == ["fail", "invalid max_count field (-1): it must be from 0 to 2147483647"]


def test_new_message_mesg_field_and_methods(env):
    instance, spawner, clock, client = env
    reply = client.post("/q/test/new_message", data={"mesg": json.dumps({"dest": "test", "_method": "prep"})})
    status, full = reply.json()
    assert status == "ok" and instance.queue("test").locate(full.rsplit("/", 1)[1]) == "prep"
    send(instance)  # runs
    queued = send(instance)
    reply = client.post("/q/test/new_message", data={"mesg": json.dumps({"dest": "test", "_method": "single_que"})})
    assert reply.json() == ["ok", f"http://testhost:3333/q/test/{queued}"]
    reply = client.post("/q/test/new_message", data={"mesg": json.dumps({"dest": "test", "_method": "bogus"})})
    assert reply.code == 400 and reply.text == "400 - Invalid method param"
    reply = client.post("/q/test/new_message", data={"mesg": json.dumps({"param1": "x"})})
    assert reply.json() == ["fail", 'input missing required "dest" parameter']
    assert client.post("/q/test/new_message", data={"mesg": "{nope"}).code == 400
    assert client.post("/q/nope/new_message", data={"mesg": json.dumps({"dest": "x"})}).code == 404


def test_new_message_html_form(env):
    instance, spawner, clock, client = env
    fields = {"x_format": "html", "mesg[dest]": "test", "mesg[src]": "web", "mesg[param1]": "<p1>",
              "mesg[_method]": "commit", "mesg[post_run_webhook]": "http://a/x http://b/y"}
    reply = client.post("/q/test/new_message", data=fields)
    assert reply.code == 200
    match = re.search(r"OK - <a href='(http://testhost:3333/q/test/[^']+)'>", reply.text)
    assert match
    msg = instance.queue("test").get(match.group(1).rsplit("/", 1)[1])
    assert msg["param1"] == "<p1>" and msg["post_run_webhook"] == ["http://a/x", "http://b/y"]
    reply = client.post("/q/test/new_message", data={**fields, "back": "/q/test"})
    assert reply.code == 303 and reply.location_path == "/q/test"
    assert "Created message http://testhost:3333/q/test/" in client.get("/q/test").text
    reply = client.post("/q/test/new_message", data={"x_format": "html", "mesg[src]": "x", "back": "/"})
    assert reply.code == 303
    assert "Error creating message: input missing required" in client.get("/").text
    reply = client.post("/q/test/new_message", data={"x_format": "html", "mesg[src]": "x"})
    assert 'fail - input missing required "dest" parameter' in reply.text


def test_new_message_html_answer_link_is_exact(env):
    # http.md, POST new_message (Compatibility: exact): the HTML answer
    # without back is a page with OK - <a href='<id>'><id></a>, quoted so.
    instance, spawner, clock, client = env
    reply = client.post("/q/test/new_message", data={"x_format": "html", "mesg[dest]": "test"})
    assert reply.code == 200 and reply.headers["content-type"] == "text/html;charset=utf-8"
    match = re.search(r"OK - <a href='([^']+)'>([^<]+)</a>", reply.text)
    assert match and match.group(1) == match.group(2)
    assert match.group(1).startswith("http://testhost:3333/q/test/")
    assert reply.text.startswith("<!DOCTYPE html>\n") and reply.text.count("OK - ") == 1


def test_new_message_down_is_503(env):
    instance, spawner, clock, client = env
    instance.set_admin("down", "test")
    reply = client.post("/q/test/new_message", data={"mesg": json.dumps({"dest": "test"})})
    assert reply.code == 503 and reply.text == "503 - Service Unavailable - Operationally Down"
    reply = client.post("/q/test/new_message", data=json.dumps({"dest": "test"}),
                        headers={"Content-Type": "application/json"})
    assert reply.code == 503


def test_queue_not_running_is_503_never_null(env):
    instance, spawner, clock, client = env
    msg = send(instance)
    finish(spawner)
    result(instance._remove("test"))
    for path in ("/q/test.json", f"/q/test/{msg}.json", f"/q/test/{msg}/state.json", "/q/test/done.json"):
        reply = client.get(path)
        assert reply.code == 503, path
        assert reply.json()[0] == "fail"
    assert client.post("/q/test/new_message", data={"mesg": json.dumps({"dest": "test"})}).code == 503
    assert client.get("/q/test.txt").code == 503


# -- messages


def test_message_page_json_and_state(env):
    instance, spawner, clock, client = env
    msg = send(instance, param1="a&b", src="me")
    reply = client.get(f"/q/test/{msg}")
    assert reply.code == 200
    text = reply.text
    assert "RQ : " in text and msg in text
    assert "a&amp;b" in text
    assert 'action="/q/test/' + msg + '/clone"' in text and "Clone message" in text
    assert "Run message (risky)" in text
    assert f'href="/q/test/{msg}/log/stdio.log"' in text
    assert f'href="/q/test/{msg}/tailviewlog/stdio.log"' in text
    assert "<iframe" in text and "No attachments." in text
    assert f'href="/q/test/{msg}.json"' in text
    data = client.get(f"/q/test/{msg}.json").json()
    assert data["msg_id"] == msg and data["state"] == "run" and data["status"] == "run"
    assert data["path"] == f"queue/test/run/{msg}"
    assert client.get(f"/q/test/{msg}/state.json").json() == ["run"]
    finish(spawner, "done", "all good")
    assert client.get(f"/q/test/{msg}/state.json").json() == ["done"]
    assert client.get(f"/q/test/{msg}.json").json()["status"] == "done - all good"


def test_message_unknown_is_404(env):
    instance, spawner, clock, client = env
    missing = "20110313.0706.40.000.1"
    assert client.get(f"/q/test/{missing}").code == 404
    assert client.get(f"/q/test/{missing}.json").code == 404
    assert client.get(f"/q/test/{missing}/state.json").code == 404
    assert client.get("/q/test/not-an-id").code == 404
    assert client.get(f"/q/nope/{missing}").code == 404


def test_message_readable_while_down(env):
    instance, spawner, clock, client = env
    msg = send(instance)
    instance.set_admin("down", "test")
    assert client.get(f"/q/test/{msg}").code == 200
    assert client.get(f"/q/test/{msg}.json").json()["msg_id"] == msg
    reply = client.post(f"/q/test/{msg}", data={"_method": "destroy", "x_format": "json"})
    assert reply.code == 503


def test_prep_message_page_commit_and_delete(env):
    instance, spawner, clock, client = env
    msg = send(instance, method="prep")
    text = client.get(f"/q/test/{msg}").text
    assert "Commit Message" in text and "Delete Message" in text
    assert 'enctype="multipart/form-data"' in text and 'name="filedata"' in text
    assert f'action="/q/test/{msg}/attach/new"' in text
    reply = client.post(f"/q/test/{msg}", data={"_method": "commit", "x_format": "json"})
    assert reply.json() == ["ok", "msg commited"]
    assert client.post(f"/q/test/{msg}", data={"_method": "commit", "x_format": "json"}).json() == [
        "fail", "cannot find message"]
    other = send(instance, method="prep")
    reply = client.post(f"/q/test/{other}", data={"_method": "commit"})
    assert reply.code == 303 and reply.location_path == f"/q/test/{other}"


def test_message_delete_html_and_json(env):
    instance, spawner, clock, client = env
    send(instance)
    queued = send(instance)
    reply = client.post(f"/q/test/{queued}", data={"_method": "delete"})
    assert reply.code == 303 and reply.location_path == "/q/test"
    assert "Message deleted successfully" in client.get("/q/test").text
    reply = client.post(f"/q/test/{queued}", data={"_method": "delete", "x_format": "json"})
    assert reply.json() == ["fail", "msg not found"]
    reply = client.post(f"/q/test/{queued}", data={"_method": "delete"})
    assert reply.code == 303 and reply.location_path == f"/q/test/{queued}"
    assert client.post(f"/q/test/{queued}", data={"_method": "explode"}).code == 400


def test_message_destroy(env):
    instance, spawner, clock, client = env
    msg = send(instance)
    reply = client.post(f"/q/test/{msg}", data={"_method": "destroy", "x_format": "json"})
    assert reply.json() == ["ok", "msg destroyed"]
    assert spawner.workers[0].signals


def test_run_now(env):
    instance, spawner, clock, client = env
    send(instance)
    later = send(instance, due=1300009999)
    reply = client.post(f"/q/test/{later}/run_now")
    assert reply.code == 303 and reply.location_path == f"/q/test/{later}"
    assert instance.queue("test").que[later]["due"] <= 1300000000
    reply = client.post(f"/q/test/{later}", data={"_method": "run_now", "x_format": "json"})
    assert reply.json() == ["ok", "msg sent to front of run queue"]
    running = list(instance.queue("test").run)[0]
    reply = client.post(f"/q/test/{running}/run_now")
    assert reply.code == 500 and reply.text == '500 - Couldn\'t run message. ["fail", "msg already running"].'


def test_clone(env):
    instance, spawner, clock, client = env
    msg = send(instance, param1="x")
    reply = client.post(f"/q/test/{msg}/clone")
    assert reply.code == 500 and "cannot clone message in run state" in reply.text
    finish(spawner, "err", "broken")
    reply = client.post(f"/q/test/{msg}/clone")
    assert reply.code == 303 and reply.location_path == "/q/test"
    assert "Message cloned successfully" in client.get("/q/test").text
    assert instance.queue("test").num_messages()["run"] == 1


# -- attachments, logs, tail views


@pytest.fixture
def attached(env, tmp_path):
    instance, spawner, clock, client = env
    msg = send(instance, method="prep")
    source = instance.root.join("tmp", "data.bin")
    payload = bytes(range(256)) * 40
    with open(source, "wb") as f:
        f.write(payload)
    result(instance.queue("test").attach(msg, source, "data.bin"))
    return instance, client, msg, payload


def test_attachment_listed_and_downloaded(attached):
    instance, client, msg, payload = attached
    text = client.get(f"/q/test/{msg}").text
    assert f'href="/q/test/{msg}/attach/data.bin"' in text
    assert "10240" in text and 'class="md5"' in text
    reply = client.get(f"/q/test/{msg}/attach/data.bin")
    assert reply.code == 200 and reply.body == payload
    assert reply.headers["accept-ranges"] == "bytes"


def test_user_files_are_sandboxed(attached):
    """
    An attachment named like a web page is still served by its extension,
    but never sniffed and, if a browser renders it, in a sandbox (no
    scripts in the interface's origin: its forms have no CSRF token).
    Static assets are not sandboxed.
    """
    instance, client, msg, payload = attached
    source = instance.root.join("tmp", "page.html")
    with open(source, "w") as f:
        f.write("<script>fetch('/q/test/adminoper', {method: 'POST', body: 'down=1'})</script>")
    result(instance.queue("test").attach(msg, source, "page.html"))
    running = send(instance)
    _write_log(instance, running, b"<script>alert(1)</script>\n")
    for path in (f"/q/test/{msg}/attach/page.html", f"/q/test/{msg}/attach/data.bin",
                 f"/q/test/{running}/log/stdio.log"):
        reply = client.get(path)
        assert reply.code == 200, path
        assert reply.headers["x-content-type-options"] == "nosniff", path
        assert reply.headers["content-security-policy"] == "sandbox", path
    assert client.get(f"/q/test/{msg}/attach/page.html").headers["content-type"].startswith("text/html")
    assert "content-security-policy" not in client.get("/css/rq.css").headers


def test_attachment_ranges(attached):
    instance, client, msg, payload = attached
    reply = client.get(f"/q/test/{msg}/attach/data.bin", headers={"Range": "bytes=10000-"})
    assert reply.code == 206
    assert reply.headers["content-range"] == "bytes 10000-10239/10240"
    assert reply.body == payload[10000:]
    reply = client.get(f"/q/test/{msg}/attach/data.bin", headers={"Range": "bytes=10240-"})
    assert reply.code == 416 and reply.headers["content-range"] == "bytes */10240"
    reply = client.get(f"/q/test/{msg}/attach/data.bin", headers={"Range": "bytes=0-1,5-9"})
    assert reply.code == 200 and reply.body == payload


def test_attachment_missing_or_escaping(attached):
    instance, client, msg, payload = attached
    assert client.get(f"/q/test/{msg}/attach/nope").code == 404
    assert client.get(f"/q/test/{msg}/attach/..%2Fmsg").code == 404
    assert client.get(f"/q/test/{msg}/attach/.hidden").code == 404
    assert client.get("/q/test/20110313.0706.40.000.1/attach/data.bin").code == 404


def test_attachment_delete(attached):
    instance, client, msg, payload = attached
    reply = client.post(f"/q/test/{msg}/attach/data.bin", data={"_method": "delete", "x_format": "json"})
    assert reply.json() == ["ok", "Attachment deleted successfully"]
    reply = client.post(f"/q/test/{msg}/attach/data.bin", data={"_method": "delete", "x_format": "json"})
    assert reply.json()[0] == "fail"
    reply = client.post(f"/q/test/{msg}/attach/data.bin", data={"_method": "delete"})
    assert reply.code == 200
    assert reply.text.startswith(f"Delete of attach data.bin on test/{msg} got [\"fail\"")
    assert client.post(f"/q/test/{msg}/attach/data.bin", data={"_method": "get"}).code == 400


def test_attachment_delete_html_redirects(attached):
    instance, client, msg, payload = attached
    reply = client.post(f"/q/test/{msg}/attach/data.bin", data={"_method": "delete"})
    assert reply.code == 303 and reply.location_path == f"/q/test/{msg}"
    assert "Attachment deleted successfully" in client.get(reply.location_path).text


def _write_log(instance, msg, data: bytes):
    job = instance.queue("test").store.job_dir(msg)
    with open(os.path.join(job, "stdio.log"), "wb") as f:
        f.write(data)


def test_log_raw_and_range(env):
    instance, spawner, clock, client = env
    msg = send(instance)
    assert client.get(f"/q/test/{msg}/log/stdio.log").code == 404
    _write_log(instance, msg, b"line one\nline two\n")
    reply = client.get(f"/q/test/{msg}/log/stdio.log")
    assert reply.code == 200 and reply.body == b"line one\nline two\n"
    assert reply.headers["content-type"].startswith("text/plain")
    reply = client.get(f"/q/test/{msg}/log/stdio.log", headers={"Range": "bytes=9-"})
    assert reply.code == 206 and reply.body == b"line two\n"
    assert reply.headers["content-range"] == "bytes 9-17/18"
    assert client.get(f"/q/test/{msg}/log/stdio.log", headers={"Range": "bytes=18-"}).code == 416
    assert client.get(f"/q/test/{msg}/log/.hidden").code == 404
    assert client.get(f"/q/test/{msg}/log/..%2Fmsg").code == 404


def test_tail_view_renders_colours_and_contract(env):
    instance, spawner, clock, client = env
    msg = send(instance)
    _write_log(instance, msg, b"plain <tag>\n\x1b[31mred\x1b[0m and \x1b[1;44mbright on blue\x1b[0m\nhalf")
    reply = client.get(f"/q/test/{msg}/tailviewlog/stdio.log")
    assert reply.code == 200
    text = reply.text
    assert f'data-log-url="/q/test/{msg}/log/stdio.log"' in text
    assert f'data-state-url="/q/test/{msg}/state.json"' in text
    # running: the unfinished last line is left to the script
    size = len(b"plain <tag>\n\x1b[31mred\x1b[0m and \x1b[1;44mbright on blue\x1b[0m\n")
    assert f'data-offset="{size}"' in text
    assert "plain &lt;tag&gt;" in text
    assert '<span class="ansi-fg-1">red</span>' in text
    assert '<span class="ansi-bg-4 ansi-bright">bright on blue</span>' in text
    assert "half" not in text
    assert '<span id="lines">Lines 1-2 of 2</span>' in text
    assert re.search(r'<input type="checkbox" id="tail-scroll" checked="checked" />\s*Tail scroll to bottom', text)
    assert '<script src="/js/tailview.js"></script>' in text
    finish(spawner)
    text = client.get(f"/q/test/{msg}/tailviewlog/stdio.log").text
    assert "half" in text and "Lines 1-3 of 3" in text


def test_tail_view_of_missing_log_is_empty(env):
    instance, spawner, clock, client = env
    send(instance)
    queued = send(instance)
    text = client.get(f"/q/test/{queued}/tailviewlog/stdio.log").text
    assert 'data-offset="0"' in text and "Lines 0-0 of 0" in text
    assert client.get("/q/test/20110313.0706.40.000.1/tailviewlog/stdio.log").code == 404


def test_tail_view_of_long_log_shows_the_end(env):
    instance, spawner, clock, client = env
    msg = send(instance)
    lines = b"".join(b"line %06d\n" % i for i in range(20000))
    _write_log(instance, msg, lines)
    text = client.get(f"/q/test/{msg}/tailviewlog/stdio.log").text
    assert "line 019999" in text and "line 000001" not in text
    match = re.search(r"Lines (\d+)-(\d+) of (\d+)", text)
    top, bottom, total = map(int, match.groups())
    assert bottom == total == 20000 and 1 < top < 20000
    assert f'data-offset="{len(lines)}"' in text


def test_tail_view_of_attachment(attached):
    instance, client, msg, payload = attached
    text = client.get(f"/q/test/{msg}/tailview/data.bin").text
    assert f'data-log-url="/q/test/{msg}/attach/data.bin"' in text
    assert client.get(f"/q/test/{msg}/tailview/nope").code == 404


# -- router mode


def test_router_mode_routes_messages_to_rq_router(env):
    instance, spawner, clock, client = env
    with open(instance.root.join("config", "rq_router_rules.rb"), "w") as f:
        f.write("")
    reply = client.post("/q/test/new_message", data={"mesg": json.dumps({"dest": "test"})})
    status, full = reply.json()
    assert "/q/rq_router/" in full
    assert client.get(f"/q/test/{full.rsplit('/', 1)[1]}/state.json").code == 200
    assert client.get("/q/test/config").json()["name"] == "rq_router"
    reply = client.post("/q/relay/new_message", data={"mesg": json.dumps({"dest": "relay"})})
    assert "/q/relay/" in reply.json()[1]
    # not routed: the queue page and its raw config
    assert client.get("/q/test/config.json").json()["name"] == "test"


def test_router_mode_one_definition_for_app_and_uploads(env, monkeypatch):
    """
    The app's routes and the upload routes ask L{rqtwisted.router} which
    queue a (R) route addresses: one definition of router mode.
    """
    import rqtwisted.web.app as app_module
    import rqtwisted.web.upload as upload_module
    from rqtwisted import router
    from rqtwisted.web.upload_routes import mount_uploads

    instance, spawner, clock, client = env
    mount_uploads(client.web.app, client.web)
    asked = []

    def routed(root, name):
        asked.append(name)
        return router.routed_queue(root, name)

    monkeypatch.setattr(app_module, "routed_queue", routed)
    monkeypatch.setattr(upload_module, "routed_queue", routed)
    with open(instance.root.join("config", "rq_router_rules.rb"), "w") as f:
        f.write("")
    msg = send(instance, queue="rq_router", method="prep")
    client.get(f"/q/test/{msg}/state.json")
    reply = client.request("PUT", f"/q/test/{msg}/attach/a.txt", data=b"abc")
    assert reply.code == 200, reply.text
    assert reply.json()[1].endswith("-Attached successfully")
    assert asked == ["test", "test"]
    assert "a.txt" in instance.queue("rq_router").get(msg)["_attachments"]


# -- flash


def test_flash_cookie_cannot_be_forged(env):
    instance, spawner, clock, client = env
    client.cookies["rq_flash"] = "eyJ4IjoxfQ.forged"
    text = client.get("/").text
    assert 'id="flash-notice" class="flash notice"></div>' in text


def test_flash_escapes_markup(env):
    instance, spawner, clock, client = env
    client.post("/new_queue", data={"queue[name]": "<script>", "queue[script]": "x"})
    text = client.get("/").text
    assert "<script>\"" not in text and "&lt;script&gt;" in text


def _flash_cookie(reply):
    [header] = [h for h in reply.all_headers["set-cookie"] if h.startswith("rq_flash=")]
    return header


def test_long_flash_notice_is_cut_to_fit_its_cookie(env):
    """
    A notice longer than a cookie holds is cut with a mark rather than
    lost with its cookie (browsers drop cookies over 4 KiB).
    """
    instance, spawner, clock, client = env
    name = "\u00e9t\u00e9" * 1000
    reply = client.post("/delete_queue", data={"queue_name": name})
    assert reply.code == 303
    assert len(_flash_cookie(reply).encode("utf-8")) <= 4096
    page = client.get("/").text
    assert "Delete of queue <code>" + name[:300] in page
    assert "\u2026 [truncated]</code> got <code>" in page
    assert "no such queue" in page


def test_flash_notices_piling_up_stay_within_a_cookie(env):
    """
    Notices not shown yet pile up in the cookie: still within 4 KiB, the
    newest one whole when it is short.
    """
    instance, spawner, clock, client = env
    for i in range(6):
        reply = client.post("/delete_queue", data={"queue_name": f"q{i}" + "x" * 3000})
        assert len(_flash_cookie(reply).encode("utf-8")) <= 4096
    reply = client.post("/q/test/adminoper", data={"pause": "pause", "back": "/"})
    assert len(_flash_cookie(reply).encode("utf-8")) <= 4096
    page = client.get("/").text
    assert "Successfully paused queue test" in page
    assert "Delete of queue <code>q5xxx" in page
    assert "[truncated]" in page


def test_absolute_uri_request_line(env):
    instance, spawner, clock, client = env
    from twisted.web.test.requesthelper import DummyChannel
    from twisted.web.server import Request, Site

    site = Site(client.web.resource())
    channel = DummyChannel()
    channel.site = site
    request = Request(channel, False)
    request.setHost(b"testhost", 3333)
    request.gotLength(0)
    request.requestReceived(b"GET", b"http://testhost:3333/q/test.txt", b"HTTP/1.1")
    written = channel.transport.written.getvalue()
    assert b" 200 " in written.split(b"\r\n", 1)[0]
    assert b"status: UP\nuptime: 0\n\nprep: 0\nque: 0\nrun: 0\n\ndone: 0\nerr: 0\nrelayed: 0\n" in written
