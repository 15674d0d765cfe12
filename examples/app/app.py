"""A tiny web app for dockpart's git-push deploy: pure standard library, listens on $PORT.

``GET /`` greets with the version in the VERSION file; ``GET /health`` answers 200 once the
app serves, which is what the deploy hook waits for before a release takes traffic.
"""

import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VERSION = (Path(__file__).parent / "VERSION").read_text().strip()


class Server(ThreadingHTTPServer):
    daemon_threads = False  # so server_close() waits for the requests in hand


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            self.reply(200, "ok\n")
        elif self.path == "/":
            self.reply(200, f"hello from version {VERSION}\n")
        else:
            self.reply(404, "not found\n")

    def reply(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # one line per request would drown the container's log


def main() -> None:
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))
    server = Server((host, port), Handler)
    # docker stop sends SIGTERM: stop accepting, finish the requests in hand, exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"version {VERSION} listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except SystemExit:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
