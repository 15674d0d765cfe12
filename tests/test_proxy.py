"""dockpart-proxy end to end: real twistd proxies, a real redis-server, real backend processes."""

from __future__ import annotations

import os
import platform
import re
import select
import socket
import threading
import time

import pytest
import requests
from twisted.python import usage

from dockpart import keys, proxy
from helpers import ROOT, Daemon, RedisProcess, free_port, shipped_pypy_gc, wait_for
from proxykit import Backend, RawBackend, exchange

MiB = 1024 * 1024
#: The proxy's resident memory stays under this while 200 MiB stream through it.  CPython,
#: Twisted and the parser take about 55 MiB; PyPy starts at about 115 MiB (its JIT, its
#: GC's nursery, a larger binary), and both grow by a few tens of MiB at most: buffering
#: a body would take 200 more.
RSS_LIMIT_KIB = (160 if platform.python_implementation() == "PyPy" else 100) * 1024


def set_servers(client, urls, key=keys.SERVERS, notify=True):
    """Replace a backend list the way dockpart's writers do: one step, then a notice."""
    pipe = client.pipeline()
    pipe.delete(key)
    if urls:
        pipe.rpush(key, *urls)
    if notify:
        pipe.publish(keys.changes_channel(key), "replace")
    pipe.execute()


def start_proxy(redis, *args):
    port = free_port()
    daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--redis", redis.url, *args, ready="dockpart-proxy listening on").start()
    daemon.url = f"http://127.0.0.1:{port}"
    daemon.port = port
    return daemon


class Stack:
    def __init__(self):
        self.redis = RedisProcess().start()
        self.client = self.redis.client()
        self.backends = [Backend(free_port(), f"b{i}").start() for i in range(3)]
        self.urls = [b.url for b in self.backends]
        set_servers(self.client, self.urls)
        self.admin_port = free_port()
        self.local = start_proxy(
            self.redis, "--admin", f"tcp:{self.admin_port}:interface=127.0.0.1",
            "--header-timeout", "1", "--backend-timeout", "1.5", "--max-header-size", "8192",
            "--health-path", "/", "--health-interval", "0.5", "--down-time", "30")
        self.shared = start_proxy(self.redis, "--balance", "shared")
        self.session = requests.Session()

    def reset(self):
        for b in self.backends:
            if b.proc is None:
                b.start()
        set_servers(self.client, self.urls)
        wait_for(lambda: self.status()["backends"].__len__() == 3
                 and all(b["healthy"] for b in self.status()["backends"]),
                 what="the local proxy to know three healthy backends")

    def get(self, path="/", proxy=None, **kw):
        return self.session.get((proxy or self.local).url + path, timeout=10, **kw)

    def status(self):
        return requests.get(f"http://127.0.0.1:{self.admin_port}/", timeout=5).json()

    def close(self):
        self.session.close()
        for daemon in (self.local, self.shared):
            daemon.stop()
        for b in self.backends:
            b.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def stack():
    s = Stack()
    yield s
    s.close()


@pytest.fixture
def fresh(stack):
    stack.reset()
    return stack


# Balancing.

def test_local_rotation_visits_every_backend_in_turn_and_never_rewrites_the_list(fresh):
    names = [fresh.get(f"/r{i}").text.split()[0] for i in range(9)]
    assert sorted(names[:3]) == ["b0", "b1", "b2"]
    assert names[3:6] == names[:3] and names[6:] == names[:3]
    assert fresh.client.lrange("servers", 0, -1) == fresh.urls


def test_shared_rotation_is_one_lmove_per_request_like_the_seed(fresh):
    names = [fresh.get(f"/s{i}", proxy=fresh.shared).text.split()[0] for i in range(4)]
    # RPOPLPUSH servers servers takes the last entry and puts it first.
    assert names == ["b2", "b1", "b0", "b2"]
    assert fresh.client.lrange("servers", 0, -1) == [fresh.urls[2], fresh.urls[0], fresh.urls[1]]
    # A second proxy takes its turns from the same rotation.
    other = start_proxy(fresh.redis, "--balance", "shared")
    try:
        names = [fresh.get(f"/t{i}", proxy=(other, fresh.shared)[i % 2]).text.split()[0]
                 for i in range(4)]
    finally:
        other.stop()
    assert names == ["b1", "b0", "b2", "b1"]


def test_list_changes_are_seen_at_once_by_notice_and_by_periodic_read(fresh):
    for only in (0, 1, 2):
        set_servers(fresh.client, [fresh.urls[only]])
        started = time.monotonic()
        wait_for(lambda: all(fresh.get().text.startswith(f"b{only} ") for _ in range(3)),
                 timeout=5, interval=0.01, what=f"only b{only} answering")
        # Much sooner than the one-second periodic read: the pub/sub notice did it.
        assert time.monotonic() - started < 0.5
    set_servers(fresh.client, [fresh.urls[0]], notify=False)
    wait_for(lambda: fresh.get().text.startswith("b0 "), timeout=3, what="the periodic read")


def test_servers_key_selects_the_list(fresh):
    front = start_proxy(fresh.redis, "--servers-key", keys.DEPLOY_LIVE)
    try:
        assert requests.get(front.url, timeout=5).status_code == 503
        set_servers(fresh.client, [fresh.urls[1]], key=keys.DEPLOY_LIVE)
        wait_for(lambda: requests.get(front.url, timeout=5).text.startswith("b1 "), timeout=3,
                 what="the deploy front route to follow dockpart:deploy:live")
    finally:
        front.stop()
        fresh.client.delete(keys.DEPLOY_LIVE)


def test_empty_list_answers_503_and_keeps_the_connection(fresh):
    set_servers(fresh.client, [])
    wait_for(lambda: fresh.get().status_code == 503, timeout=3, what="a 503")
    reply = exchange(fresh.local.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2,
                     read_until=b"available\n" * 2)
    assert reply.count(b"HTTP/1.1 503 Service Unavailable") == 2
    # Clients learn that nothing is available, not which Redis key was read.
    assert b"no backend is available\n" in reply and b"servers" not in reply
    # An answer to HEAD has no body, even one of the proxy's own.
    reply = exchange(fresh.local.port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
                                       b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                     read_until=b"available\n")
    head, rest = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503") and rest.startswith(b"HTTP/1.1 503")


# HTTP.

def test_bodies_stream_200_mib_each_way_with_flat_memory(fresh):
    pid = fresh.local.proc.pid
    size = 200 * MiB
    with fresh.session.get(fresh.local.url + f"/download?n={size}", stream=True, timeout=30) as r:
        assert r.headers["Content-Length"] == str(size)
        received = sum(len(chunk) for chunk in r.iter_content(1 << 20))
    assert received == size
    head = (f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", fresh.local.port), timeout=30) as s:
        s.sendall(head)
        block = b"u" * MiB
        for _ in range(200):
            s.sendall(block)
        reply = b""
        while not reply.endswith(b"\r\n\r\n%d\n" % size):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(f"{size}\n".encode())
    status = open(f"/proc/{pid}/status").read()
    peak_kib = int(status.split("VmHWM:")[1].split()[0])
    assert peak_kib < RSS_LIMIT_KIB, status


def test_the_proxy_under_test_has_the_gc_settings_that_ship(fresh):
    """PyPy's GC settings set the proxy's memory and tail latency: the proxies these tests
    start, scripts/up's and the proxy image's all get scripts/lib.sh's, so the memory limits
    above hold for what ships."""
    shipped = shipped_pypy_gc()
    assert {"PYPY_GC_NURSERY", "PYPY_GC_INCREMENT_STEP"} <= set(shipped), shipped
    environ = open(f"/proc/{fresh.local.proc.pid}/environ").read().split("\0")
    dockerfile = (ROOT / "Dockerfiles" / "proxy.Dockerfile").read_text()
    image_env = dict(pair.split("=", 1) for pair in re.search(
        r"^ENV (PYPY_GC_.*)$", dockerfile, re.M).group(1).split())
    assert image_env == shipped, dockerfile
    for name, value in shipped.items():
        assert f"{name}={os.environ.get(name) or value}" in environ, name


def test_a_client_that_does_not_read_pauses_the_backend_instead_of_filling_memory(fresh):
    total = 200 * MiB
    blocked = threading.Event()
    progress = {"sent": 0}

    def fast_download(request):
        def send(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            conn.setblocking(False)
            block = b"d" * MiB
            while progress["sent"] < total:
                _, writable, _ = select.select([], [conn], [], 1.0)
                if not writable:
                    blocked.set()  # a second without room to write: the proxy stopped reading
                    continue
                try:
                    progress["sent"] += conn.send(block[:total - progress["sent"]])
                except BlockingIOError:
                    pass
                except OSError:
                    return
        return send

    backend = RawBackend(fast_download)
    set_servers(fresh.client, [backend.url], key="memory:servers")
    lazy_proxy = start_proxy(fresh.redis, "--servers-key", "memory:servers")
    try:
        with socket.create_connection(("127.0.0.1", lazy_proxy.port), timeout=5) as lazy:
            lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            lazy.sendall(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
            # The backend writes as fast as it can, until the proxy stops reading it.
            assert blocked.wait(20), "the backend was never held back"
            assert progress["sent"] < 50 * MiB
            rss_kib = int(open(f"/proc/{lazy_proxy.proc.pid}/status").read()
                          .split("VmRSS:")[1].split()[0])
            assert rss_kib < RSS_LIMIT_KIB
            assert lazy.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        lazy_proxy.stop()
        backend.close()
    assert fresh.get("/after").status_code == 200


def test_chunked_bodies_both_ways(fresh):
    parts = [b"c" * 3000] * 700
    r = fresh.session.post(fresh.local.url + "/upload", data=iter(parts), timeout=10)
    assert r.status_code == 200 and r.text == f"{3000 * 700}\n"
    r = fresh.get("/chunked?n=1000000")
    assert r.headers["Transfer-Encoding"] == "chunked" and r.content == b"x" * 1000000
    # An HTTP/1.0 client cannot take chunks: the body ends with the connection.
    reply = exchange(fresh.local.port, b"GET /chunked?n=50000 HTTP/1.0\r\n\r\n")
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"chunked" not in head.lower() and body == b"x" * 50000 + b"<closed>"


def test_expect_100_continue_is_passed_on_before_the_body(fresh):
    with socket.create_connection(("127.0.0.1", fresh.local.port), timeout=5) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"12345")
        reply = b""
        while not reply.endswith(b"\r\n\r\n5\n"):
            chunk = s.recv(4096)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")


def test_head_204_and_304_carry_no_body_and_the_connection_goes_on(fresh):
    # Pipelined in one write: each answer must end where the next begins.
    reply = exchange(fresh.local.port, b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n"
                                       b"GET /nobody?code=204 HTTP/1.1\r\nHost: x\r\n\r\n"
                                       b"GET /nobody?code=304 HTTP/1.1\r\nHost: x\r\n\r\n"
                                       b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n", read_until=b" /b\n")
    answers = reply.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"204", b"304", b"200"]
    assert b"Content-Length: " in answers[0]
    for answer in answers[:3]:
        assert answer.endswith(b"\r\n\r\n") and b"chunked" not in answer.lower()
    assert answers[3].endswith(b" /b\n")


def test_hop_by_hop_headers_are_dropped_and_forwarding_headers_added(fresh):
    r = fresh.get("/headers", headers={
        "Connection": "keep-alive, X-Secret", "X-Secret": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-Forwarded-For": "10.1.2.3",
        "X-Kept": "yes"})
    seen = {k.lower(): v for k, v in r.json()}
    for gone in ("x-secret", "keep-alive", "te", "proxy-authorization", "connection"):
        assert gone not in seen, seen
    assert seen["x-kept"] == "yes"
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{fresh.local.port}"
    r = fresh.get("/hop")
    assert r.headers["X-End-To-End"] == "1"
    for gone in ("X-Private", "Keep-Alive", "Proxy-Authenticate"):
        assert gone not in r.headers


def test_websocket_upgrade_is_tunnelled_after_101(fresh):
    with socket.create_connection(("127.0.0.1", fresh.local.port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        assert b"upgrade: websocket" in head.lower()
        for word in (b"hello", b"again"):
            s.sendall(word)
            got = b""
            while len(got) < len(word):
                got += s.recv(4096)
            assert got == word.upper()


def test_absolute_form_to_a_foreign_host_is_refused(fresh):
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen(1)
        foreign.settimeout(0.5)
        port = foreign.getsockname()[1]
        reply = exchange(fresh.local.port, f"GET http://127.0.0.1:{port}/steal HTTP/1.1\r\n"
                                           f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 403") and b"not a forward proxy" in reply
        with pytest.raises(socket.timeout):
            foreign.accept()
    # Naming the proxy itself is fine, as RFC 9112 wants.
    own = f"GET http://127.0.0.1:{fresh.local.port}/own HTTP/1.1\r\n"
    reply = exchange(fresh.local.port, f"{own}Host: x\r\nConnection: close\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b" /own\n<closed>")


def test_oversized_headers_get_431(fresh):
    r = fresh.get("/", headers={"X-Big": "a" * 10000})
    assert r.status_code == 431
    assert fresh.get("/").status_code == 200


def test_a_slow_client_gets_408_and_holds_nothing_up(fresh):
    with socket.create_connection(("127.0.0.1", fresh.local.port), timeout=5) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert fresh.get("/meanwhile").status_code == 200
        reply = slow.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408")
        assert slow.recv(4096) == b""  # closed
        assert 0.9 < time.monotonic() - started < 3


def test_a_request_body_that_stops_coming_gets_408(fresh):
    patient = start_proxy(fresh.redis, "--idle-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", patient.port), timeout=5) as slow:
            slow.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
            started = time.monotonic()
            reply = slow.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408") and b"body stopped" in reply
            assert 0.9 < time.monotonic() - started < 3
    finally:
        patient.stop()


def test_a_slow_backend_gets_504(fresh):
    started = time.monotonic()
    r = fresh.get("/slow?s=3")
    assert r.status_code == 504 and time.monotonic() - started < 3
    assert fresh.get("/").status_code == 200


# Failures.

def test_backend_killed_under_a_request_loop_fails_no_request(fresh):
    codes = []
    for i in range(300):
        if i == 60:
            fresh.backends[1].stop()
        codes.append(fresh.get(f"/loop{i}").status_code)
    assert codes == [200] * 300
    dead = {b["url"]: b for b in fresh.status()["backends"]}[fresh.urls[1]]
    # Out of rotation: a failed request or the active health check, whichever came first (on a
    # busy machine the check may see it before any request is sent to it).
    assert not dead["healthy"]
    # The active health check puts it back once it answers again.
    fresh.backends[1].start()
    wait_for(lambda: {b["url"]: b for b in fresh.status()["backends"]}[fresh.urls[1]]["healthy"],
             timeout=5, what="the health check to see b1 again")
    assert {"b0", "b1", "b2"} == {fresh.get().text.split()[0] for _ in range(6)}


def test_every_backend_failing_gives_502_naming_them_in_the_log_only(fresh):
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    set_servers(fresh.client, dead)
    wait_for(lambda: fresh.status()["backends"][0]["url"] == dead[0], what="the dead list")
    r = fresh.get()
    assert r.status_code == 502 and r.text == "every backend failed\n"
    # The operator sees which ones; the client does not learn the tier's addresses.
    wait_for(lambda: all(url in fresh.local.output() for url in dead), timeout=3,
             what="the log to name the failed backends")


def test_redis_stopped_and_restarted_under_load_fails_no_request(fresh):
    codes = {"local": [], "shared": []}
    answered = {"local": [], "shared": []}  # when each request was answered
    stop = threading.Event()

    def load(name, daemon):
        with requests.Session() as session:
            while not stop.is_set():
                codes[name].append(session.get(daemon.url + "/load", timeout=10).status_code)
                answered[name].append(time.monotonic())

    threads = [threading.Thread(target=load, args=("local", fresh.local)),
               threading.Thread(target=load, args=("shared", fresh.shared))]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: answered["local"] and answered["shared"], what="the load to start")
        fresh.redis.stop()
        down_from = time.monotonic()
        wait_for(lambda: not fresh.status()["redis_connected"], timeout=5,
                 what="the proxy to see Redis gone")
        wait_for(lambda: all(sum(t > down_from for t in answered[n]) >= 20 for n in answered),
                 timeout=5, what="20 requests per proxy answered while Redis is down")
        fresh.redis.start()
        down_until = time.monotonic()
        # This Redis keeps nothing on disk: put the list back as a persistent one would have it.
        set_servers(fresh.client, fresh.urls)
        wait_for(lambda: fresh.status()["redis_connected"], timeout=5, what="the reconnection")
        after = time.monotonic()
        wait_for(lambda: all(sum(t > after for t in answered[n]) >= 20 for n in answered),
                 timeout=5, what="20 requests per proxy answered after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    for name in answered:
        while_down = [t for t in answered[name] if down_from < t < down_until]
        assert len(while_down) >= 20, (name, len(while_down))
    assert codes["local"] and set(codes["local"]) == {200}
    assert codes["shared"] and set(codes["shared"]) == {200}
    # The proxy reconnected and sees changes made there.
    set_servers(fresh.client, [fresh.urls[2]])
    wait_for(lambda: all(fresh.get().text.startswith("b2 ") for _ in range(3)), timeout=8,
             what="the proxy to read the list from the restarted Redis")


def test_an_empty_list_after_a_redis_restart_is_not_taken_without_a_notice(fresh):
    fresh.redis.stop()
    try:
        wait_for(lambda: not fresh.status()["redis_connected"], timeout=5,
                 what="the proxy to see Redis gone")
        assert [fresh.get(f"/down{i}").status_code for i in range(3)] == [200] * 3
    finally:
        fresh.redis.start()  # empty: this one keeps nothing on disk
    wait_for(lambda: fresh.status()["redis_connected"], timeout=5, what="the reconnection")
    # Several periodic reads (one a second) of the empty list later, both proxies still serve.
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        for server in (fresh.local, fresh.shared):
            assert fresh.get("/up", proxy=server).status_code == 200
    assert "read empty after Redis was away" in fresh.local.output()
    assert len(fresh.status()["backends"]) == 3
    # A notice says the tier really is empty now: that is taken at once.
    set_servers(fresh.client, [])
    wait_for(lambda: fresh.get().status_code == 503, timeout=3, what="503 after the notice")
    assert fresh.get(proxy=fresh.shared).status_code == 503


# Seeing it.

def test_admin_status_and_prometheus_metrics(fresh):
    for _ in range(3):
        fresh.get()
    status = fresh.status()
    assert status["balance"] == "local" and status["list_key"] == "servers"
    assert [b["url"] for b in status["backends"]] == fresh.urls
    assert all(b["requests"] >= 1 and b["mean_latency_ms"] > 0 for b in status["backends"])
    text = requests.get(f"http://127.0.0.1:{fresh.admin_port}/metrics", timeout=5).text
    assert "# TYPE dockpart_proxy_requests_total counter" in text
    assert f'dockpart_proxy_backend_up{{backend="{fresh.urls[0]}"}} 1' in text



def test_metrics_carry_each_backends_latency_as_a_histogram(fresh):
    for _ in range(3):
        fresh.get()
    text = requests.get(f"http://127.0.0.1:{fresh.admin_port}/metrics", timeout=5).text
    assert "# TYPE dockpart_proxy_backend_latency_seconds histogram" in text
    for url in fresh.urls:
        inf = re.search(rf'^dockpart_proxy_backend_latency_seconds_bucket\{{backend="{url}",'
                        rf'le="\+Inf"\}} (\d+)$', text, re.M)
        count = re.search(rf'^dockpart_proxy_backend_latency_seconds_count\{{backend="{url}"\}} '
                          rf'(\d+)$', text, re.M)
        assert inf and count and int(inf.group(1)) == int(count.group(1)) >= 1

@pytest.mark.parametrize("args, message", [
    (["--balance", "random"], "--balance"),
    (["--servers-key", ""], "--servers-key"),
    (["--health-path", "health"], "--health-path"),
    (["--backend-timeout", "0"], "--backend-timeout"),
    (["--max-inflight-per-client", "-1"], "--max-inflight-per-client must be 0 or more"),
    (["--body-timeout", "-5"], "--body-timeout must be 0 or more"),
])
def test_bad_options_are_refused_clearly(args, message):
    with pytest.raises(usage.UsageError, match=message):
        proxy.Options().parseOptions(args)
