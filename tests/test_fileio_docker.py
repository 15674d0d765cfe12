"""End to end on the real engine: the `fileio` compose profile, served by us and by the real socat."""

import os
import subprocess

import pytest
import requests

from dockerkit import compose, docker_client
from dockpart.socatlike import crlf
from helpers import free_port, wait_for

pytestmark = pytest.mark.docker

INTERVAL = 2  # seconds between rewrites: short enough to see one, long enough to compare


class FileIO:
    """One `fileio` profile up on free ports, in its own compose project."""

    def __init__(self, serve: str):
        self.serve = serve
        self.writer_port, self.web_port = free_port(), free_port()
        self.project = f"dockpart-e2e-fileio-{serve}-{os.getpid()}"
        self.env = {**os.environ, "DOCKPART_SERVE": serve,
                    "DOCKPART_WRITER_PORT": str(self.writer_port),
                    "DOCKPART_FILEWEB_PORT": str(self.web_port),
                    "DOCKPART_WRITER_INTERVAL": str(INTERVAL)}
        self.url = f"http://127.0.0.1:{self.web_port}/"

    def compose(self, *args: str) -> str:
        return compose(self.project, "fileio", self.env, *args)

    def the_file(self) -> bytes:
        """The writer's file as it is now, read inside its container."""
        client = docker_client()
        try:
            [writer] = client.containers.list(filters={"label": [
                f"com.docker.compose.project={self.project}", "com.docker.compose.service=writer"]})
            code, output = writer.exec_run(["cat", "random"])
        finally:
            client.close()
        assert code == 0, output
        return output

    def nc(self) -> bytes:
        return subprocess.run(["nc", "127.0.0.1", str(self.writer_port)], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=10, check=True).stdout

    def get(self) -> bytes:
        answer = requests.get(self.url, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.content

    def while_unchanged(self, fetch) -> tuple[bytes, bytes]:
        """``fetch()`` between two reads of the file that agree: (the file, what fetch got)."""
        for _ in range(10):
            before, got, after = self.the_file(), fetch(), self.the_file()
            if before == after:
                return before, got
        pytest.fail("the file changed during every attempt")


@pytest.fixture(scope="module", params=["dockpart", "socat"])
def fileio(request, docker_images):
    stack = FileIO(request.param)
    try:
        stack.compose("up", "-d", "--wait", "--wait-timeout", "60", "writer", "fileweb")
        yield stack
    finally:
        stack.compose("down", "--timeout", "5")


def test_the_chosen_server_serves_the_port(fileio):
    """DOCKPART_SERVE picks our listener (the default) or the real socat with the seed's options."""
    log = fileio.compose("logs", "writer")
    if fileio.serve == "socat":
        assert (f"/usr/bin/socat TCP-LISTEN:{fileio.writer_port},fork,reuseaddr,crlf,"
                f"bind=127.0.0.1 OPEN:random,rdonly") in log
    else:
        assert f"dockpart-writer listening on 127.0.0.1:{fileio.writer_port}" in log


def test_nc_and_http_return_the_current_file(fileio):
    current, by_nc = fileio.while_unchanged(fileio.nc)
    assert current.endswith(b"\n") and len(current) > 1000
    assert by_nc == crlf(current)
    current, by_http = fileio.while_unchanged(fileio.get)
    assert by_http == crlf(current)


def test_a_rewrite_shows_up_on_the_next_request(fileio):
    first = fileio.get()
    wait_for(lambda: fileio.get() != first, timeout=5 * INTERVAL, interval=0.2,
             what="a rewrite to show on port 8000")
    current, by_http = fileio.while_unchanged(fileio.get)
    assert by_http == crlf(current) != first
