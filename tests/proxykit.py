"""A backend for the proxy tests: a real HTTP/1.1 server in its own process.

``python tests/proxykit.py PORT NAME`` serves, with keep-alive:
  GET  /anything          -> "NAME /anything" (and the request headers as X-Seen-* headers)
  GET  /headers           -> the request headers as JSON
  POST /upload            -> the number of body bytes read (Content-Length or chunked)
  GET  /download?n=N      -> N bytes with Content-Length
  GET  /chunked?n=N       -> N bytes in chunks
  GET  /slow?s=S          -> answers after S seconds
  GET  /nobody?code=C     -> status C (204, 304) without a body or a length
  GET  /hop               -> a response carrying hop-by-hop headers
  GET  /ws                -> 101 for an Upgrade: websocket request, then echoes bytes upper-cased

:class:`RawBackend` is the other kind: a socket server in a thread of the test that records every
byte and every request it receives and answers each with bytes the test chose, right or wrong.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

BLOCK = b"x" * 65536


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    name = "backend"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes, headers=()):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> int:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return total
                left = size
                while left:
                    left -= len(self.rfile.read(min(left, 1 << 20)))
                self.rfile.readline()
                total += size
        left = total = int(self.headers.get("Content-Length", 0))
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        return total

    def do_GET(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/headers":
            body = json.dumps([[k, v] for k, v in self.headers.items()]).encode()
            return self._send(200, body, [("Content-Type", "application/json")])
        if url.path == "/download":
            n = int(query["n"])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                self.wfile.write(BLOCK[:n])
                n -= len(BLOCK)
            return
        if url.path == "/chunked":
            n = int(query["n"])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while n > 0:
                part = BLOCK[:min(n, 10000)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                n -= len(part)
            self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/slow":
            time.sleep(float(query["s"]))
            return self._send(200, b"slow\n")
        if url.path == "/nobody":
            self.send_response(int(query["code"]))
            self.end_headers()
            return
        if url.path == "/hop":
            return self._send(200, b"hop\n", [("Connection", "X-Private"), ("X-Private", "1"),
                                              ("Keep-Alive", "timeout=5"),
                                              ("Proxy-Authenticate", "Basic"),
                                              ("X-End-To-End", "1")])
        if url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data.upper())
            self.close_connection = True
            return
        self._send(200, f"{self.name} {self.path}\n".encode(), [("Content-Type", "text/plain")])

    do_HEAD = do_GET

    def do_POST(self):
        count = self._read_body()
        self._send(200, f"{count}\n".encode())


def serve(port: int, name: str) -> None:
    Handler.name = name
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


class Backend:
    """The server above in a subprocess, killable like a crashed instance."""

    def __init__(self, port: int, name: str):
        self.port = port
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self) -> "Backend":
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.port), self.name],
                                     stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout.readline().strip() == b"ready"
        return self

    def stop(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None


class _Request:
    """One request as a backend parsed it."""

    def __init__(self):
        self.method = b""
        self.url = b""
        self.headers: list = []
        self.body = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class RequestParser:
    """What a backend received, parsed into :class:`_Request` objects (``done``) by the
    interpreter's parser (httptools' interface, :mod:`dockpart.http_parser`)."""

    def __init__(self):
        from dockpart.http_parser import httptools
        self._httptools = httptools
        self.parser = httptools.HttpRequestParser(self)
        self.done: list[_Request] = []
        self.current = _Request()

    def feed(self, data: bytes) -> bool:
        """Parse ``data``; False when it is not HTTP (the backend closes then)."""
        try:
            self.parser.feed_data(data)
        except self._httptools.HttpParserUpgrade:
            pass
        except self._httptools.HttpParserError:
            return False
        return True

    def on_message_begin(self):
        self.current = _Request()

    def on_url(self, url):
        self.current.url += url

    def on_header(self, name, value):
        self.current.headers.append((name, value))

    def on_body(self, body):
        self.current.body += body

    def on_message_complete(self):
        self.current.method = self.parser.get_method()
        self.done.append(self.current)


class RawBackend:
    """A recording backend: ``answer(request) -> bytes`` decides each reply, byte for byte.

    ``answer`` may also return a callable, called with the socket (to stall, or send in parts).
    ``received`` holds every byte per connection; ``requests`` every request parsed, in order.
    """

    def __init__(self, answer=None):
        self.answer = answer or (lambda request: b"HTTP/1.1 200 OK\r\nContent-Length: "
                                 b"%d\r\n\r\n%s" % (len(request.url), request.url))
        self.received: list[bytearray] = []
        self.requests: list[_Request] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._conns: list = []
        self.ended: list[bytearray] = []  # what each closed connection had received
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self, answer=None) -> None:
        with self.lock:
            self.received.clear()
            self.requests.clear()
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._conns.clear()
        if answer is not None:
            self.answer = answer

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self._conns.append(conn)
                raw = bytearray()
                self.received.append(raw)
            threading.Thread(target=self._serve, args=(conn, raw), daemon=True).start()

    def _serve(self, conn, raw: bytearray) -> None:
        parsed = RequestParser()
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                with self.lock:
                    raw += data
                if not parsed.feed(data):
                    break
                while parsed.done:
                    request = parsed.done.pop(0)
                    with self.lock:
                        self.requests.append(request)
                    reply = self.answer(request)
                    if callable(reply):
                        reply(conn)
                    else:
                        conn.sendall(reply)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.ended.append(raw)

    def closed_after(self, marker: bytes) -> bool:
        """Whether the connection that received ``marker`` was closed (by the proxy)."""
        with self.lock:
            return any(marker in raw for raw in self.ended)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self.reset()


class RawTier:
    """A Redis whose list ``key`` names one :class:`RawBackend`, and a proxy in front of it."""

    def __init__(self, key: str, answer=None, *proxy_args: str):
        from helpers import Daemon, RedisProcess, free_port
        self.redis = RedisProcess().start()
        self.backend = RawBackend(answer)
        self.redis.client().rpush(key, self.backend.url)
        self.port = free_port()
        self.admin = free_port()
        self.proxy = Daemon(
            "dockpart-proxy", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--admin", f"tcp:{self.admin}:interface=127.0.0.1",
            "--redis", self.redis.url, "--servers-key", key, *proxy_args,
            ready="dockpart-proxy listening on").start()

    def active(self) -> int:
        """The backend's requests in flight, as the proxy counts them (its admin listener)."""
        import json
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/", timeout=5) as r:
            return sum(b["active"] for b in json.load(r)["backends"])

    def close(self) -> None:
        self.proxy.stop()
        self.backend.close()
        self.redis.stop()


def exchange(port: int, data: bytes, read_until: bytes | None = None,
             timeout: float = 4.0) -> bytes:
    """Send ``data`` on a new connection; what came back until the proxy closed (``<closed>``
    or ``<reset>`` at the end), ``read_until`` appeared, or ``timeout`` passed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (read_until and read_until in got):
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                return got + b"<reset>"
            if not chunk:
                return got + b"<closed>"
            got += chunk
        return got


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
