"""dockpart-proxy --workers, graceful stop and restart with no refused connection: real twistd
processes, a real Redis and real backends."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from twisted.python import usage

from dockpart import keys
from dockpart.proxy import Options as ProxyOptions
from dockpart.proxy_workers import merge_metrics, sum_status
from helpers import BIN, ROOT, Daemon, free_port, port_open, wait_for
from proxykit import Backend

MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


@pytest.fixture(scope="module")
def backends():
    started = [Backend(free_port(), f"b{i}").start() for i in range(2)]
    yield started
    for backend in started:
        backend.stop()


@pytest.fixture
def tier(redis_db, redis_server, backends):
    """Redis listing two backends; proxies started through ``tier.proxy`` are stopped after."""

    class Tier:
        redis = redis_server
        daemons: list[Daemon] = []

        def proxy(self, *args, port=None, ready="dockpart-proxy listening on"):
            port = port or free_port()
            admin = free_port()
            daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                            "--admin", f"tcp:{admin}:interface=127.0.0.1",
                            "--redis", redis_server.url, *args, ready=ready)
            daemon.port = port
            daemon.admin = admin
            daemon.base = f"http://127.0.0.1:{port}"
            self.daemons.append(daemon)
            return daemon.start()

    redis_db.rpush(keys.SERVERS, *[b.url for b in backends])
    made = Tier()
    made.daemons = []
    yield made
    for daemon in made.daemons:
        daemon.stop(signal.SIGKILL)


@pytest.fixture
def migrate_req():
    """net.ipv4.tcp_migrate_req on, as docs/operations.md's restart asks (scripts/up restart-proxy
    sets it when root): connections queued on the old proxy's closing listener go to the new
    one instead of being reset.  Put back as it was afterwards."""
    before = MIGRATE_REQ.read_text() if MIGRATE_REQ.exists() else None
    if before is not None and os.access(MIGRATE_REQ, os.W_OK):
        MIGRATE_REQ.write_text("1")
    yield
    if before is not None and os.access(MIGRATE_REQ, os.W_OK):
        MIGRATE_REQ.write_text(before)


def admin_status(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/", timeout=5).json()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has stopped all the same.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def start_workers(tier, count=2):
    return tier.proxy("--workers", str(count), ready=f"with {count} workers")


def wait_in_flight(proxy) -> None:
    """Until a request is at a backend, as the proxy's admin listener counts."""
    wait_for(lambda: any(b["active"] for b in admin_status(proxy.admin)["backends"]),
             what="a request to reach a backend")


class RequestLoop:
    """Clients that request ``url`` over and over until stopped; every failure is kept.

    ``keep_alive`` clients reuse their connection, the others open one per request.
    """

    def __init__(self, url: str, clients: int = 2, keep_alive: bool = True):
        self.url = url
        self.failures: list = []
        self.served = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(keep_alive and i % 2 == 0,))
                         for i in range(clients)]

    def _run(self, keep_alive: bool) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    reply = session.get(self.url, timeout=10) if keep_alive \
                        else requests.get(self.url, timeout=10)
                    if reply.status_code == 200:
                        self.served += 1
                    else:
                        self.failures.append(reply.status_code)
                except requests.RequestException as e:
                    self.failures.append(("keep-alive" if keep_alive else "new connection",
                                          repr(e)))

    def __enter__(self) -> "RequestLoop":
        for thread in self._threads:
            thread.start()
        wait_for(lambda: self.served > 50, what="the request loop to run")
        return self

    def more(self, count: int = 100) -> None:
        """Until ``count`` more requests were served."""
        target = self.served + count
        wait_for(lambda: self.served >= target, what=f"{count} more requests served")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def test_n_workers_share_the_port_and_the_admin_listener_adds_them_up(tier):
    proxy = start_workers(tier, 2)
    for _ in range(40):  # a new connection each: the kernel spreads them over the workers
        reply = requests.get(proxy.base + "/hello", headers={"Connection": "close"}, timeout=5)
        assert reply.status_code == 200 and reply.text.endswith("/hello\n")
    status = admin_status(proxy.admin)
    workers = status["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    assert all(alive(w["pid"]) and w["pid"] != proxy.proc.pid for w in workers)
    assert all(w["requests"] > 0 for w in workers), workers
    assert status["requests"] == 40 == sum(b["requests"] for b in status["backends"])
    metrics = requests.get(f"http://127.0.0.1:{proxy.admin}/metrics", timeout=5).text
    assert 'dockpart_proxy_requests_total{worker="1"}' in metrics
    assert 'dockpart_proxy_requests_total{worker="2"}' in metrics
    assert metrics.count("# TYPE dockpart_proxy_requests_total counter") == 1


def test_a_killed_worker_is_restarted_and_serves_again(tier):
    proxy = start_workers(tier, 2)
    before = {w["worker"]: w["pid"] for w in admin_status(proxy.admin)["workers"]}
    os.kill(before[1], signal.SIGKILL)

    def replaced():
        now = {w["worker"]: w["pid"] for w in admin_status(proxy.admin)["workers"]}
        return len(now) == 2 and now[1] != before[1] and now[2] == before[2] and now

    now = wait_for(replaced, timeout=15, what="worker 1 to be restarted")
    assert "worker 1 exited" in proxy.output()
    for _ in range(40):
        assert requests.get(proxy.base + "/", headers={"Connection": "close"},
                            timeout=5).status_code == 200
    assert {w["worker"]: w["requests"] > 0 for w in admin_status(proxy.admin)["workers"]} \
        == {1: True, 2: True}, now


def test_sigterm_to_the_parent_stops_every_worker(tier):
    proxy = start_workers(tier, 2)
    pids = [w["pid"] for w in admin_status(proxy.admin)["workers"]]
    os.kill(proxy.proc.pid, signal.SIGTERM)
    proxy.proc.wait(15)
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=10, what="workers to exit")
    assert not port_open(proxy.port)
    assert "worker 1 exited" not in proxy.output()  # stopped, not restarted


def test_a_killed_parent_takes_its_workers_with_it(tier):
    proxy = start_workers(tier, 2)
    pids = [w["pid"] for w in admin_status(proxy.admin)["workers"]]
    os.kill(proxy.proc.pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=10,
             what="workers to exit after their parent was killed")


def test_workers_refuse_a_unix_listener_clearly(tier, tmp_path):
    daemon = Daemon("dockpart-proxy", "--listen", f"unix:{tmp_path}/p.sock", "--workers", "2",
                    "--redis", tier.redis.url, ready="<a line no twistd writes>")
    with pytest.raises(AssertionError, match="needs a tcp: listener"):
        daemon.start(timeout=10)


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "positive number or auto"),
    (["--workers", "many"], "positive number or auto"),
    (["--workers", "2", "--listen", "tcp:0"], "fixed --listen port"),
    (["--workers", "2", "--listen", "unix:/tmp/p.sock"], "needs a tcp: listener"),
    (["--shutdown-timeout", "0"], "--shutdown-timeout must be positive"),
    (["--backlog", "-1"], "--backlog must be positive"),
])
def test_bad_worker_options_are_refused_clearly(args, message):
    with pytest.raises(usage.UsageError, match=message):
        ProxyOptions().parseOptions(args)


def test_workers_auto_is_one_per_cpu():
    options = ProxyOptions()
    options.parseOptions(["--workers", "auto", "--listen", "tcp:3456"])
    expected = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count())  # PyPy 3.9 has no sched_getaffinity
    assert options["workers"] == expected


def raw_keep_alive(port: int) -> socket.socket:
    """A client connection that made one request and now sits idle, keep-alive."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while b"/idle\n" not in reply:
        reply += sock.recv(65536)
    return sock


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_requests_in_flight_finish_and_closes_idle_connections(tier, workers):
    proxy = start_workers(tier, workers) if workers > 1 else tier.proxy()
    idle = raw_keep_alive(proxy.port)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(requests.get, proxy.base + "/slow?s=2", timeout=15)
        wait_in_flight(proxy)
        os.kill(proxy.proc.pid, signal.SIGTERM)
        assert idle.recv(100) == b""  # the idle keep-alive connection is closed at once
        wait_for(lambda: not port_open(proxy.port), timeout=5, what="the port to close")
        reply = slow.result(15)
    assert reply.status_code == 200 and reply.text == "slow\n"
    assert reply.headers.get("Connection") == "close"
    proxy.proc.wait(10)


def test_sigterm_cuts_what_outlasts_the_shutdown_timeout(tier):
    proxy = tier.proxy("--shutdown-timeout", "0.5")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(requests.get, proxy.base + "/slow?s=8", timeout=15)
        wait_in_flight(proxy)
        os.kill(proxy.proc.pid, signal.SIGTERM)
        proxy.proc.wait(5)  # well before the backend's answer
        with pytest.raises(requests.ConnectionError):
            slow.result(15)
    assert "cut 1 connections still busy after 0.5 s" in proxy.output()


def listen_queue(port: int) -> int:
    """The backlog of the socket listening on ``port``, as the kernel reports it (ss)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[2])  # State Recv-Q Send-Q ...: Send-Q is the backlog


def test_a_burst_of_200_new_connections_all_connect_and_are_served(tier):
    """The listen queue holds the whole burst (the old default of 50 did not: the overflow
    waited for a SYN retry), and every connection gets its answer.  The request is one the
    proxy answers itself (405), so that the test backends' own small queues play no part."""
    proxy = tier.proxy()
    assert listen_queue(proxy.port) >= 1024
    barrier = threading.Barrier(200)

    def connect(_):
        barrier.wait(10)
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                sock.sendall(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n")
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
                return reply.split(b"\r\n", 1)[0]
        except OSError as e:
            return repr(e)

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(connect, range(200)))
    assert results == [b"HTTP/1.1 405 Method Not Allowed"] * 200


def test_backlog_sets_the_listen_queue(tier):
    proxy = tier.proxy("--backlog", "300")
    assert listen_queue(proxy.port) == 300


@pytest.mark.parametrize("workers", [1, 2])
def test_a_new_proxy_replaces_the_old_under_a_request_loop_with_no_failed_request(
        tier, workers, migrate_req):
    """The documented restart: start the new proxy on the same port, then SIGTERM the old."""
    def start(port=None):
        args = ("--workers", str(workers)) if workers > 1 else ()
        ready = f"with {workers} workers" if workers > 1 else "dockpart-proxy listening on"
        return tier.proxy(*args, port=port, ready=ready)

    old = start()
    with ThreadPoolExecutor(1) as pool, RequestLoop(old.base + "/loop", clients=4) as loop:
        slow = pool.submit(requests.get, old.base + "/slow?s=1.5", timeout=15)
        wait_in_flight(old)
        new = start(port=old.port)
        os.kill(old.proc.pid, signal.SIGTERM)
        old.proc.wait(15)
        loop.more(100)
        assert slow.result(15).text == "slow\n"
    assert loop.failures == []
    assert requests.get(new.base + "/after", timeout=5).status_code == 200


def test_scripts_up_restart_proxy_replaces_a_process_proxy_under_a_request_loop(
        tier, tmp_path, migrate_req):
    run = tmp_path / "run"
    run.mkdir()
    port, admin = free_port(), free_port()
    # scripts/up starts the new proxy on the interpreter this test runs on.
    venv = ({"DOCKPART_PROXY_PYTHON": "pypy", "DOCKPART_PYPY_VENV": str(BIN.parent)}
            if platform.python_implementation() == "PyPy"
            else {"DOCKPART_PROXY_PYTHON": "cpython", "DOCKPART_VENV": str(BIN.parent)})
    env = {**os.environ, "DOCKPART_RUN": str(run), **venv,
           "COMPOSE_PROJECT_NAME": f"dockpart-restart-{port}"}
    subprocess.run([str(BIN / "twistd"), f"--pidfile={run}/dockpart-proxy.pid",
                    f"--logfile={run}/dockpart-proxy.log", "dockpart-proxy",
                    "--listen", f"tcp:{port}:interface=127.0.0.1", "--workers", "2",
                    "--admin", f"tcp:{admin}:interface=127.0.0.1", "--redis", tier.redis.url],
                   check=True, env=env, timeout=30)
    old_pid = int(wait_for(lambda: (run / "dockpart-proxy.pid").read_text(), what="pid file"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "with 2 workers" in (run / "dockpart-proxy.log").read_text(),
                 what="the proxy's workers")
        with ThreadPoolExecutor(1) as pool, RequestLoop(base + "/loop", clients=4) as loop:
            slow = pool.submit(requests.get, base + "/slow?s=1.5", timeout=15)
            wait_for(lambda: any(b["active"] for b in admin_status(admin)["backends"]),
                     what="the slow request to reach a backend")
            done = subprocess.run(["bash", str(ROOT / "scripts" / "up"), "restart-proxy"],
                                  env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            loop.more(100)
            assert slow.result(15).text == "slow\n"
        assert loop.failures == []
        assert not alive(old_pid)
        new_pid = int((run / "dockpart-proxy.pid").read_text())
        assert new_pid != old_pid and alive(new_pid)
    finally:
        for pid_file in run.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass


def test_the_parent_adds_up_its_workers_figures():
    statuses = {
        1: {"requests": 3, "responses": {"200": 3}, "client_connections": 2,
            "backends": [{"url": "http://a", "healthy": True, "requests": 2, "errors": 0,
                          "active": 1, "idle_connections": 1},
                         {"url": "http://b", "healthy": False, "requests": 1, "errors": 4,
                          "active": 0, "idle_connections": 0}]},
        2: {"requests": 5, "responses": {"200": 4, "502": 1}, "client_connections": 1,
            "backends": [{"url": "http://a", "healthy": True, "requests": 5, "errors": 1,
                          "active": 0, "idle_connections": 2}]}}
    total = sum_status(statuses, {1: 100, 2: 200})
    assert total["requests"] == 8 and total["client_connections"] == 3
    assert total["responses"] == {"200": 7, "502": 1}
    assert total["backends"] == [
        {"url": "http://a", "healthy": True, "requests": 7, "errors": 1, "active": 1,
         "idle_connections": 3},
        {"url": "http://b", "healthy": False, "requests": 1, "errors": 4, "active": 0,
         "idle_connections": 0}]
    assert [(w["worker"], w["pid"], w["requests"]) for w in total["workers"]] == \
        [(1, 100, 3), (2, 200, 5)]


def test_the_parent_labels_each_workers_metrics_and_keeps_one_header_per_family():
    text = ("# HELP dockpart_proxy_requests_total Requests.\n"
            "# TYPE dockpart_proxy_requests_total counter\n"
            "dockpart_proxy_requests_total {n}\n"
            "# HELP dockpart_proxy_backend_up Up.\n"
            "# TYPE dockpart_proxy_backend_up gauge\n"
            'dockpart_proxy_backend_up{{backend="http://a"}} 1\n')
    merged = merge_metrics({1: text.format(n=3), 2: text.format(n=5)})
    assert merged.splitlines() == [
        "# HELP dockpart_proxy_requests_total Requests.",
        "# TYPE dockpart_proxy_requests_total counter",
        'dockpart_proxy_requests_total{worker="1"} 3',
        'dockpart_proxy_requests_total{worker="2"} 5',
        "# HELP dockpart_proxy_backend_up Up.",
        "# TYPE dockpart_proxy_backend_up gauge",
        'dockpart_proxy_backend_up{worker="1",backend="http://a"} 1',
        'dockpart_proxy_backend_up{worker="2",backend="http://a"} 1']
