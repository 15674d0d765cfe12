"""dockpart-web as a user meets it: a real twistd process on a real Redis."""

import http.client
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


def test_set_then_get_shows_the_message_and_it_expires_after_10s(web, redis_db):
    r = get(web, "/set")
    assert r.status_code == 200 and MESSAGE in r.text
    assert 8 <= redis_db.ttl(keys.user_key("message")) <= 10
    r = get(web, "/get")
    assert r.status_code == 200 and MESSAGE in r.text
    redis_db.delete(keys.user_key("message"))  # what 10 seconds do
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


def test_unknown_route_and_wrong_method(web, redis_db):
    assert get(web, "/nope").status_code == 404
    assert requests.post(web.base + "/spawn", timeout=10).status_code == 405


def test_first_instance_registers_itself_once(redis_server, redis_db):
    port = free_port()
    for _ in range(2):
        web = start_web(redis_server.url, "--first-port", str(port), port=port)
        try:
            wait_for(lambda: redis_db.lrange("servers", 0, -1), what="registration")
        finally:
            web.stop()
    assert redis_db.lrange("servers", 0, -1) == [f"http://127.0.0.1:{port}"]


def test_port_from_start_port_environment(redis_server, redis_db):
    port = free_port()
    web = Daemon("dockpart-web", "--redis", redis_server.url, ready="dockpart-web listening on",
                 env={"start_port": str(port)}).start()
    try:
        assert f":{port}" in requests.get(f"http://127.0.0.1:{port}/", timeout=10).text
    finally:
        web.stop()


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
