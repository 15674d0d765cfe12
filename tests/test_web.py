"""dockpart-web as a user meets it: a real twistd process on a real Redis."""

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from dockpart import keys
from helpers import Daemon, RedisProcess, free_port, png_bytes, start_web, wait_for

MESSAGE = "this message will self-destruct in 10 seconds"


@pytest.fixture(scope="module")
def web(redis_server):
    daemon = start_web(redis_server.url, "--max-instances", "60", "--max-upload", "64KiB")
    yield daemon
    daemon.stop()


def get(web, path, **kw):
    return requests.get(web.base + path, timeout=10, **kw)


def test_index_names_the_instance(web, redis_db):
    r = get(web, "/")
    assert r.status_code == 200
    assert f"http://127.0.0.1:{web.port}" in r.text


def test_set_stores_the_message_with_a_10s_expiry_and_get_shows_it_until_it_is_gone(
        web, redis_db):
    r = get(web, "/set")
    assert r.status_code == 200 and MESSAGE in r.text
    assert 0 < redis_db.pttl(keys.user_key("message")) <= 10_000  # Redis expires it after 10 s
    r = get(web, "/get")
    assert r.status_code == 200 and MESSAGE in r.text
    redis_db.delete(keys.user_key("message"))  # what Redis does when the 10 s are over
    r = get(web, "/get")
    assert r.status_code == 404 and "expired" in r.text


def test_user_keys_live_in_their_own_namespace(web, redis_db):
    redis_db.rpush("servers", "http://127.0.0.1:3000")
    assert get(web, "/set/servers").status_code == 200
    assert redis_db.lrange("servers", 0, -1) == ["http://127.0.0.1:3000"]
    assert redis_db.type("servers") == "list"
    assert MESSAGE in get(web, "/get/servers").text
    assert get(web, "/get/other").status_code == 404
    assert get(web, "/set/a/b").status_code == 404


def test_recent_lists_the_five_latest_urls_escaped(web, redis_db):
    for i in range(7):
        get(web, f"/nowhere{i}")
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    conn.request("GET", "/<script>alert(1)</script>")  # raw, as a hostile client sends it
    conn.getresponse().read()
    conn.close()
    r = get(web, "/recent")
    assert "<script>" not in r.text
    assert "&lt;script&gt;" in r.text
    assert r.text.count("<li>") == 5
    assert "/nowhere6" in r.text and "/nowhere2" not in r.text
    assert redis_db.llen(keys.RECENT) == 5


def test_upload_then_meow_shows_the_image_and_empties_the_queue(web, redis_db):
    image = png_bytes()
    r = requests.post(web.base + "/upload", files={"image": ("cat.png", image)}, timeout=10)
    assert r.status_code == 201, r.text
    r = get(web, "/meow")
    assert r.status_code == 200
    assert 'src="data:image/png;base64,' in r.text
    assert redis_db.llen(keys.IMAGES) == 0
    r = get(web, "/meow")
    assert r.status_code == 404 and "empty" in r.text


def test_meow_skips_queued_rows_that_no_web_app_wrote(web, redis_db):
    """Anyone with the Redis password can push them: /meow takes them off and shows the next
    real image, never a 500."""
    image = png_bytes(5)
    requests.post(web.base + "/upload", files={"image": ("x.png", image)}, timeout=10)
    redis_db.lpush(keys.IMAGES, "[1]", "{not json", '{"type": "text/html", "data": "PGI+"}',
                   '{"type": "image/png", "data": "%%%"}')
    r = get(web, "/meow")
    assert r.status_code == 200 and 'src="data:image/png;base64,' in r.text
    assert redis_db.llen(keys.IMAGES) == 0
    redis_db.lpush(keys.IMAGES, "{not json")
    assert get(web, "/meow").status_code == 404


def test_meow_shows_the_most_recent_upload_first(web, redis_db):
    import base64
    first, second = png_bytes(10), png_bytes(20)
    for image in (first, second):
        requests.post(web.base + "/upload", files={"image": ("x.png", image)}, timeout=10)
    assert base64.b64encode(second).decode() in get(web, "/meow").text
    assert base64.b64encode(first).decode() in get(web, "/meow").text


@pytest.mark.parametrize("files, code", [
    ({"image": ("big.png", png_bytes(70 * 1024))}, 413),
    ({"image": ("notes.txt", b"hello, not an image")}, 415),
    ({"picture": ("cat.png", png_bytes())}, 400),
])
def test_bad_uploads_are_refused_and_change_nothing(web, redis_db, files, code):
    r = requests.post(web.base + "/upload", files=files, timeout=10)
    assert r.status_code == code, r.text
    assert redis_db.llen(keys.IMAGES) == 0


def test_oversized_upload_without_content_length_is_refused(web, redis_db):
    def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        yield png_bytes(200 * 1024)
        yield b"\r\n--b--\r\n"
    r = requests.post(web.base + "/upload", data=body(), timeout=10,
                      headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert redis_db.llen(keys.IMAGES) == 0


def test_spawn_queues_the_next_port_and_says_requested(web, redis_db):
    redis_db.rpush("servers", "http://127.0.0.1:3000", "http://127.0.0.1:3004")
    r = get(web, "/spawn")
    assert r.status_code == 202
    assert "Requested" in r.text and "http://127.0.0.1:3005" in r.text
    assert redis_db.lrange(keys.SPAWN_QUEUE, 0, -1) == ["http://127.0.0.1:3005"]
    assert "http://127.0.0.1:3006" in get(web, "/spawn").text


def test_fifty_concurrent_spawns_get_fifty_distinct_ports(web, redis_db):
    redis_db.rpush("servers", "http://127.0.0.1:3000")
    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(lambda _: get(web, "/spawn"), range(50)))
    assert [r.status_code for r in replies] == [202] * 50
    queued = redis_db.lrange(keys.SPAWN_QUEUE, 0, -1)
    assert sorted(int(u.rsplit(":", 1)[1]) for u in queued) == list(range(3001, 3051))


def test_spawn_past_the_ceiling_is_429(redis_server, redis_db):
    web = start_web(redis_server.url, "--max-instances", "2")
    try:
        redis_db.rpush("servers", "http://127.0.0.1:3000")
        assert get(web, "/spawn").status_code == 202
        r = get(web, "/spawn")
        assert r.status_code == 429 and "ceiling is 2" in r.text
        assert redis_db.llen(keys.SPAWN_QUEUE) == 1
    finally:
        web.stop()


def test_destroy_never_picks_the_first_instance_nor_one_already_queued(web, redis_db):
    assert get(web, "/destroy").status_code == 409
    redis_db.rpush("servers", "http://127.0.0.1:3000", "http://127.0.0.1:3001",
                   "http://127.0.0.1:3002")
    picked = set()
    for _ in range(2):
        r = get(web, "/destroy")
        assert r.status_code == 202 and "Requested removal" in r.text
        picked.add(redis_db.lindex(keys.DESTROY_QUEUE, 0))
    assert picked == {"http://127.0.0.1:3001", "http://127.0.0.1:3002"}
    r = get(web, "/destroy")
    assert r.status_code == 409 and "Nothing to destroy" in r.text
    assert redis_db.llen(keys.DESTROY_QUEUE) == 2


def test_listservers_in_html_and_json(web, redis_db):
    redis_db.rpush("servers", "http://127.0.0.1:3000", "http://127.0.0.1:3001")
    redis_db.lpush(keys.SPAWN_QUEUE, "http://127.0.0.1:3002")
    html = get(web, "/listservers").text
    assert "<li>http://127.0.0.1:3001</li>" in html
    r = get(web, "/listservers", headers={"accept": "application/json"})
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"servers": ["http://127.0.0.1:3000", "http://127.0.0.1:3001"],
                        "spawning": ["http://127.0.0.1:3002"], "destroying": [],
                        "autoscale": {"desired": None, "decisions": []}}


def test_listservers_skips_decisions_of_the_wrong_shape_instead_of_a_500(web, redis_db):
    """Anyone with the Redis password can write them; /listservers shows the good ones."""
    good = {"time": 1700000000.0, "current": 1, "spawning": 0, "inflight": 12,
            "per_instance": 4, "target": 4, "desired": 3, "action": "up", "reason": "good one"}
    redis_db.lpush(keys.AUTOSCALE_DECISIONS, json.dumps(good), "[1, 2]",
                   json.dumps({**good, "time": "noon"}), "{broken")
    redis_db.set(keys.AUTOSCALE_DESIRED, "lots")
    html = get(web, "/listservers")
    assert html.status_code == 200 and "good one" in html.text
    r = get(web, "/listservers", headers={"accept": "application/json"})
    assert r.status_code == 200
    assert r.json()["autoscale"] == {"desired": None, "decisions": [good]}


def test_unknown_route_and_wrong_method(web, redis_db):
    assert get(web, "/nope").status_code == 404
    assert requests.post(web.base + "/spawn", timeout=10).status_code == 405


def evals(client) -> int:
    """How many EVALs the server ran: each registration round is one."""
    return client.info("commandstats").get("cmdstat_eval", {}).get("calls", 0)


def test_first_instance_is_listed_and_announced_once_however_often_it_registers(own_redis):
    client = own_redis.client()
    pubsub = client.pubsub()
    pubsub.subscribe(keys.SERVERS_CHANNEL)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for _ in range(2):  # and a restart of the instance
        web = start_web(own_redis.url, "--first-port", str(port), "--register-interval", "0.05",
                        port=port)
        try:
            wait_for(lambda: client.lrange(keys.SERVERS, 0, -1), what="registration")
            rounds = evals(client)
            wait_for(lambda: evals(client) >= rounds + 5, what="five more registration rounds")
        finally:
            web.stop()
    assert client.lrange(keys.SERVERS, 0, -1) == [url]
    notices = [m["data"] for m in iter(lambda: pubsub.get_message(timeout=1), None)
               if m["type"] == "message"]
    assert notices == [f"add {url}"]
    pubsub.close()


def test_first_instance_is_back_in_servers_after_a_flush_and_a_redis_restart(own_redis):
    client = own_redis.client()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    web = start_web(own_redis.url, "--first-port", str(port), port=port)
    try:
        wait_for(lambda: client.lrange(keys.SERVERS, 0, -1) == [url], what="registration")
        client.flushall()
        wait_for(lambda: client.lrange(keys.SERVERS, 0, -1) == [url], 10,
                 what="the first instance back after FLUSHALL")
        client.rpush(keys.SERVERS, "http://127.0.0.1:1")
        client.lrem(keys.SERVERS, 0, url)
        wait_for(lambda: client.lrange(keys.SERVERS, 0, -1) == ["http://127.0.0.1:1", url], 10,
                 what="the first instance back after its entry was removed")
        own_redis.stop()  # no persistence: the restarted server is empty
        own_redis.start()
        client = own_redis.client()
        wait_for(lambda: client.lrange(keys.SERVERS, 0, -1) == [url], 15,
                 what="the first instance back after a Redis restart")
        # The log line follows the write the test has just seen; wait for it, then count.
        wait_for(lambda: web.output().count("was missing from; added it back to servers") >= 3,
                 5, what="the third 'added it back' log line")
        assert web.output().count("was missing from; added it back to servers") == 3
    finally:
        web.stop()


def listening(port: int) -> tuple[str, int, int]:
    """The listening socket on ``port`` as the kernel sees it: its address, the connections
    waiting in its accept queue, and the queue's size (the backlog)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[3], int(out[1]), int(out[2])


def test_port_from_start_port_environment_on_loopback_with_a_real_backlog(redis_server, redis_db):
    port = free_port()
    web = Daemon("dockpart-web", "--redis", redis_server.url, ready="dockpart-web listening on",
                 env={"start_port": str(port)}).start()
    try:
        assert f":{port}" in requests.get(f"http://127.0.0.1:{port}/", timeout=10).text
        assert listening(port) == (f"127.0.0.1:{port}", 0, 1024)
    finally:
        web.stop()


def test_a_burst_of_200_new_connections_all_wait_in_the_accept_queue(redis_server, web):
    """Frozen, the app accepts nothing: every connection of the burst must fit in the queue
    (a backlog of 50 held 51, the others' SYNs were dropped and retried a second later)."""
    os.kill(web.proc.pid, signal.SIGSTOP)
    burst = []
    try:
        for _ in range(200):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", web.port))
            burst.append(s)
        wait_for(lambda: listening(web.port)[1] == 200, 10,
                 what="200 connections in the accept queue")
    finally:
        os.kill(web.proc.pid, signal.SIGCONT)
        for s in burst:
            s.close()
    assert get(web, "/").status_code == 200


@pytest.fixture(scope="module")
def guarded(redis_server):
    """An app with a scale token and room for two queued images."""
    daemon = start_web(redis_server.url, "--max-queued-images", "2", env={
        "DOCKPART_SCALE_TOKEN": "s3cret"})
    yield daemon
    daemon.stop()


def test_spawn_and_destroy_need_the_scale_token_when_one_is_set(guarded, redis_db):
    redis_db.rpush(keys.SERVERS, "http://127.0.0.1:3000", "http://127.0.0.1:3001")
    for path in ("/spawn", "/destroy", "/spawn?token=wrong", "/spawn?token="):
        r = get(guarded, path)
        assert r.status_code == 403 and "scale token" in r.text
    r = get(guarded, "/spawn", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 403
    assert redis_db.llen(keys.SPAWN_QUEUE) == 0 and redis_db.llen(keys.DESTROY_QUEUE) == 0
    assert get(guarded, "/spawn?token=s3cret").status_code == 202
    assert get(guarded, "/spawn", headers={"authorization": "Bearer s3cret"}).status_code == 202
    assert get(guarded, "/destroy?token=s3cret").status_code == 202
    assert redis_db.llen(keys.SPAWN_QUEUE) == 2 and redis_db.llen(keys.DESTROY_QUEUE) == 1
    assert "s3cret" not in get(guarded, "/recent").text  # the public list never shows it
    assert "wrong" not in get(guarded, "/recent").text


def raw_get(web, path: str, header: bytes) -> tuple[int, bytes]:
    """GET ``path`` with one header line sent as raw bytes (requests would encode it)."""
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\n".encode() + header
                  + b"\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


def test_header_values_that_are_not_utf8_are_read_not_a_500(guarded, redis_db):
    """Twisted decodes a header asked for by a str name as UTF-8: a client's \\xff made every
    route a 500 (Host, recorded for /recent), and /spawn one with a scale token set."""
    redis_db.rpush(keys.SERVERS, "http://127.0.0.1:3000", "http://127.0.0.1:3001")
    assert raw_get(guarded, "/", b"Host: \xffhost")[0] == 200
    assert "\ufffdhost/" in get(guarded, "/recent").text
    code, body = raw_get(guarded, "/spawn", b"Host: h\r\nAuthorization: Bearer \xff")
    assert code == 403 and b"scale token" in body
    code, body = raw_get(guarded, "/listservers", b"Host: h\r\nAccept: \xff, application/json")
    assert code == 200 and json.loads(body.split(b"\r\n\r\n", 1)[1])["servers"][1] \
        == "http://127.0.0.1:3001"
    assert redis_db.llen(keys.SPAWN_QUEUE) == 0
    assert "Traceback" not in guarded.output()


def test_an_upload_past_the_queue_cap_is_refused_and_changes_nothing(guarded, redis_db):
    for size in (10, 20):
        r = requests.post(guarded.base + "/upload", files={"image": ("a.png", png_bytes(size))},
                          timeout=10)
        assert r.status_code == 201, r.text
    before = redis_db.lrange(keys.IMAGES, 0, -1)
    r = requests.post(guarded.base + "/upload", files={"image": ("a.png", png_bytes(30))},
                      timeout=10)
    assert r.status_code == 503 and "2 images already wait" in r.text
    assert redis_db.lrange(keys.IMAGES, 0, -1) == before
    assert get(guarded, "/meow").status_code == 200
    r = requests.post(guarded.base + "/upload", files={"image": ("a.png", png_bytes(30))},
                      timeout=10)
    assert r.status_code == 201


def test_error_pages_name_no_redis_key_nor_address(web, redis_db, redis_server):
    redis_db.set(keys.IMAGES, "not a list")  # every upload and /meow now fails in Redis
    replies = [requests.post(web.base + "/upload", files={"image": ("a.png", png_bytes())},
                             timeout=10), get(web, "/meow")]
    redis_db.delete(keys.IMAGES)
    redis_db.set(keys.RECENT, "not a list")  # every route but / records here: all fail
    replies += [get(web, "/spawn"), get(web, "/listservers"), get(web, "/nope")]
    for r in replies:
        assert r.status_code == 500
        for secret in ("dockpart:", "WRONGTYPE", keys.IMAGES, keys.RECENT, str(redis_server.port)):
            assert secret not in r.text, (secret, r.text)
    assert "answering /meow" in web.output()  # the log has the details


def test_redis_down_gives_503_and_the_app_reconnects():
    redis = RedisProcess().start()
    web = start_web(redis.url)
    try:
        wait_for(lambda: get(web, "/set").status_code == 200, what="connected app")
        redis.stop()
        r = get(web, "/get")
        assert r.status_code == 503 and "Redis" in r.text
        assert get(web, "/").status_code == 200
        redis.start()
        wait_for(lambda: get(web, "/set").status_code == 200, timeout=15, what="reconnection")
        assert MESSAGE in get(web, "/get").text
    finally:
        web.stop()
        redis.stop()


def test_bad_options_are_refused_with_a_clear_message(redis_server):
    import subprocess
    from helpers import BIN
    out = subprocess.run([str(BIN / "twistd"), "-n", "dockpart-web", "--redis", "http://x"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "expected redis://HOST:PORT/DB" in out.stdout + out.stderr


def test_the_page_never_fails_while_redis_restarts_and_other_routes_say_503(own_redis):
    """``/`` needs no Redis: it answers 200 through Redis restarts (its visit goes unrecorded);
    a route that needs Redis answers 503 with Retry-After, never 500."""
    web = start_web(own_redis.url)
    codes = {"/": [], "/get": []}
    stop = threading.Event()

    def hammer(path):
        with requests.Session() as session:
            while not stop.is_set():
                r = session.get(web.base + path, timeout=10)
                codes[path].append((r.status_code, r.headers.get("retry-after")))
    try:
        wait_for(lambda: get(web, "/set").status_code == 200, what="connected app")
        threads = [threading.Thread(target=hammer, args=(p,)) for p in codes for _ in range(2)]
        for t in threads:
            t.start()
        for _ in range(3):
            own_redis.stop()
            wait_for(lambda: any(c == 503 for c, _ in codes["/get"][-5:]), 10, what="a 503")
            own_redis.start()
            wait_for(lambda: codes["/get"][-1][0] in (200, 404), 15, what="reconnection")
        stop.set()
        for t in threads:
            t.join(15)
    finally:
        stop.set()
        web.stop()
    assert {c for c, _ in codes["/"]} == {200}, codes["/"]
    assert {c for c, _ in codes["/get"]} <= {200, 404, 503}
    assert all(after == "2" for c, after in codes["/get"] if c == 503)
    assert "Traceback" not in web.output()


def raw_request(web, request_line: bytes, headers: bytes = b"") -> tuple[int, bytes]:
    """One request sent as raw bytes (requests would normalise ``%74oken`` to ``token``)."""
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as s:
        s.sendall(request_line + b"\r\nHost: h\r\n" + headers + b"Connection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


@pytest.mark.parametrize("request_line, headers", [
    (b"GET /spawn?token=wrong&token=s3cret HTTP/1.1", b""),
    (b"GET /spawn?token=wrong;token=s3cret HTTP/1.1", b""),
    (b"GET /spawn?token=wrong&%74oken=s3cret HTTP/1.1", b""),
    (b"GET /spawn?token=s3cret HTTP/1.1", b"Authorization: Bearer wrong\r\n"),
    (b"GET /spawn HTTP/1.1", b"Authorization: Bearer wrong\r\nAuthorization: Bearer s3cret\r\n"),
])
def test_a_request_carrying_several_tokens_is_a_400_whichever_matches(guarded, redis_db,
                                                                      request_line, headers):
    """One credential per request: 400 token values in one URI, one of them right, got a
    spawn (any match let it through)."""
    redis_db.rpush(keys.SERVERS, "http://127.0.0.1:3000")
    code, body = raw_request(guarded, request_line, headers)
    assert code == 400 and b"one token" in body, body
    assert redis_db.llen(keys.SPAWN_QUEUE) == 0


@pytest.mark.parametrize("query", [b"a=1;token=s3cret", b"%74oken=s3cret&a=1",
                                   b"a=1&t%6Fken=s3cret"])
def test_a_token_however_spelled_reaches_neither_recent_nor_the_log(guarded, redis_db, query):
    """Twisted reads ``;`` as a separator and unquotes names: such a token passed the check
    (rightly) and went into /recent and the access log (wrongly)."""
    redis_db.rpush(keys.SERVERS, "http://127.0.0.1:3000")
    code, _ = raw_request(guarded, b"GET /spawn?" + query + b" HTTP/1.1")
    assert code == 202
    recent = get(guarded, "/recent").text
    assert "/spawn" in recent and "s3cret" not in recent, recent
    wait_for(lambda: "GET /recent" in guarded.output(), what="the access log line")
    assert "s3cret" not in guarded.output()


def test_a_clean_stop_writes_every_access_log_line(redis_server, redis_db):
    """The access log is written a second at a time: what the last second served must still
    reach the log when the daemon is stopped (SIGTERM), as a user reading it afterwards expects."""
    redis_db.rpush(keys.SERVERS, "http://127.0.0.1:3000")
    daemon = start_web(redis_server.url)
    try:
        for i in range(3):
            assert get(daemon, f"/recent?last={i}").status_code == 200
    finally:
        daemon.stop()
    lines = [line for line in daemon.output().splitlines() if "GET /recent?last=" in line]
    assert [line.split('"GET ')[1].split()[0] for line in lines] == [
        "/recent?last=0", "/recent?last=1", "/recent?last=2"], daemon.output()


def test_head_answers_like_get_but_never_changes_state(web, redis_db):
    """HEAD /meow took an image and HEAD /spawn queued a spawn: routes that change state on
    GET answer HEAD with 405; the others answer it as GET without a body, and record nothing."""
    redis_db.rpush(keys.SERVERS, "http://127.0.0.1:3000")
    requests.post(web.base + "/upload", files={"image": ("cat.png", png_bytes())}, timeout=10)
    for path in ("/meow", "/spawn", "/destroy", "/set"):
        r = requests.head(web.base + path, timeout=10)
        assert r.status_code == 405 and r.headers["allow"] == "GET", (path, r.headers)
    assert redis_db.llen(keys.IMAGES) == 1 and redis_db.llen(keys.SPAWN_QUEUE) == 0
    assert not redis_db.exists(keys.user_key("message"))
    recent = redis_db.lrange(keys.RECENT, 0, -1)
    r = requests.head(web.base + "/", timeout=10)
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
    assert redis_db.lrange(keys.RECENT, 0, -1) == recent
    assert requests.head(web.base + "/listservers", timeout=10).status_code == 200
    r = requests.post(web.base + "/", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
