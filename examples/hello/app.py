"""The smallest app for ``dockpart apps``: standard library only, listens on $PORT.

    dockpart apps create hello --command 'python3 examples/hello/app.py hello'

``GET /`` answers which app and which instance (its port) served; ``GET /health`` answers
200.  On SIGTERM it stops taking connections and finishes the requests it has.
"""

import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1] if len(sys.argv) > 1 else "hello"
PORT = int(os.environ.get("PORT", "8000"))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        text = "ok\n" if self.path == "/health" else f"{NAME} on port {PORT}\n"
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # one line per request would fill the instance's log


def main() -> None:
    # A listen queue of 128, not socketserver's 5: the requests a proxy held while this
    # instance started arrive at once, and a full queue costs each extra one a SYN retry (1 s).
    ThreadingHTTPServer.request_queue_size = 128
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = False  # server_close() waits for the requests in hand
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{NAME} listening on 127.0.0.1:{PORT}", flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
