"""One health definition: the reactor's probe (proxy, infra) and the deploy CLI's blocking check
agree on what "healthy" is, against a real HTTP server."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from dockpart import probe
from dockpart.deploy.docker_ops import http_ok


class _Answers(BaseHTTPRequestHandler):
    """``GET /CODE`` answers with that status code (a 3xx to /200, which is healthy)."""

    def do_GET(self):
        code = int(self.path.strip("/"))
        self.send_response(code)
        if 300 <= code < 400:
            self.send_header("Location", "/500")  # followed, it would turn unhealthy
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("code, healthy", [(200, True), (204, True), (302, True), (404, False),
                                           (429, False), (500, False), (503, False)])
async def test_the_probe_and_the_deploy_cli_agree_on_healthy(server, code, healthy):
    """The deploy CLI took 2xx (and followed redirects), the probe anything below 500."""
    assert probe.healthy_status(code) is healthy
    by_probe = await probe.answers(reactor, "127.0.0.1", server, f"/{code}")
    by_cli = await deferToThread(http_ok, f"http://127.0.0.1:{server}/{code}")  # it blocks
    assert (by_probe, by_cli) == (healthy, healthy)

