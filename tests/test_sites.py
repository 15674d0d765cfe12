"""Every twisted.web site on a real daemon and real sockets, against hostile clients: bodies
refused from the head, bounded forms, a deadline on heads, unread answers dropped, a
connection cap (dockpart/website.py; the same without sockets is in test_website.py)."""

import socket
import time

import pytest
import requests

from dockpart import keys
from helpers import Daemon, free_port, start_web

MiB = 1024 * 1024


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (a timeout fails the test)."""
    chunks = []
    while chunk := s.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def trickle(port: int, every: float = 0.2, bound: float = 10.0) -> tuple[float, bytes]:
    """Send a head one byte every ``every`` s until the server answers or closes; the
    seconds that took and what came back."""
    started = time.monotonic()
    with connect(port) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        s.settimeout(every)
        got = b""
        while time.monotonic() - started < bound:
            try:
                s.sendall(b"X")
                chunk = s.recv(1 << 16)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            got += chunk
        else:
            pytest.fail(f"the connection was still open after {bound} s")
    return time.monotonic() - started, got


@pytest.fixture(scope="module")
def web(redis_server):
    daemon = start_web(redis_server.url, "--max-upload", "6MiB", "--header-timeout", "1")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def fileweb_on_socat(tmp_path_factory):
    """dockpart-socat serving 8 MiB, and a fileweb in front with one connection and short
    deadlines."""
    path = tmp_path_factory.mktemp("sites") / "big"
    path.write_bytes(b"z" * (8 * MiB))
    source, port = free_port(), free_port()
    socat = Daemon("dockpart-socat", "--listen", f"tcp:{source}:interface=127.0.0.1",
                   "--file", str(path), ready="listening on").start()
    fileweb = Daemon("dockpart-fileweb", "--listen", f"tcp:{port}:interface=127.0.0.1",
                     "--source", f"tcp:127.0.0.1:{source}", "--max-connections", "1",
                     "--header-timeout", "1", "--send-timeout", "1",
                     ready="dockpart-fileweb listening on").start()
    fileweb.port = port
    yield fileweb
    fileweb.stop()
    socat.stop()


def test_web_answers_an_announced_512_MiB_upload_413_at_once_without_its_body(web, redis_db):
    started = time.monotonic()
    with connect(web.port) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                  b"boundary=b\r\nContent-Length: %d\r\n\r\n" % (512 * MiB))
        assert s.recv(1 << 16).startswith(b"HTTP/1.1 413 ")  # before a single body byte
        assert time.monotonic() - started < 2
        s.sendall(b"z" * (4 * MiB))  # what it sends anyway is discarded, and reading goes on
        assert until_closed(s) == b""
    assert redis_db.llen(keys.IMAGES) == 0
    assert requests.get(web.base + "/", timeout=5).status_code == 200


def test_web_refuses_a_form_of_100k_tiny_parts_with_413_quickly(web, redis_db):
    """5 MB of ~100k parts, under --max-upload, blocked an instance 2.2 s in the email parser."""
    body = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nx\r\n"
                    for _ in range(100_000)) + b"--b--\r\n"
    assert len(body) < 6 * MiB
    started = time.monotonic()
    r = requests.post(web.base + "/upload", data=body, timeout=10,
                      headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "1000 parts" in r.text
    assert time.monotonic() - started < 1
    assert redis_db.llen(keys.IMAGES) == 0


def test_web_still_takes_an_image_near_the_limit(web, redis_db):
    from helpers import png_bytes
    image = png_bytes(5 * MiB)
    r = requests.post(web.base + "/upload", files={"image": ("big.png", image)}, timeout=10)
    assert r.status_code == 201, r.text
    assert redis_db.llen(keys.IMAGES) == 1


@pytest.mark.parametrize("site", ["web", "fileweb_on_socat"])
def test_a_head_trickled_a_byte_at_a_time_is_cut_at_the_header_timeout(site, request):
    """One byte every 0.2 s kept a per-byte idle timer from ever firing (80 s and more)."""
    daemon = request.getfixturevalue(site)
    took, answer = trickle(daemon.port)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert 0.9 < took < 4


def test_fileweb_drops_an_answer_left_unread_and_frees_its_only_connection(fileweb_on_socat):
    """With --max-connections 1, a client that never reads its 8 MiB held fileweb for ever
    (and its answer in memory); now it is dropped after --send-timeout and the next client,
    waiting in the listen queue meanwhile, is served whole."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    holder.connect(("127.0.0.1", fileweb_on_socat.port))
    holder.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        started = time.monotonic()
        r = requests.get(f"http://127.0.0.1:{fileweb_on_socat.port}/", timeout=15)
        assert r.status_code == 200 and len(r.content) == 8 * MiB
        assert time.monotonic() - started < 10
        assert "dropping its answer" in fileweb_on_socat.output()
    finally:
        holder.close()
