"""Fast checks of dockpart-web's option parsing, input rules and /work (no sockets)."""

import io

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.web.static import Data
from twisted.web.test.requesthelper import DummyRequest

from dockpart import web
from dockpart.website import BoundedSite
from dockpart.tier import BadInstanceURL, parse_instance_url
from dockpart.redisconn import RedisAddress, RedisUnavailable


def options(*argv):
    config = web.Options()
    config.parseOptions(list(argv))
    return config


def test_listen_falls_back_to_start_port_then_3000_on_loopback(monkeypatch):
    monkeypatch.delenv("start_port", raising=False)
    assert options()["listen"] == "tcp:3000:interface=127.0.0.1"
    monkeypatch.setenv("start_port", "3007")
    assert options()["listen"] == "tcp:3007:interface=127.0.0.1"
    assert options("--listen", "tcp:4000")["listen"] == "tcp:4000"


def test_scale_token_from_the_option_then_the_environment(monkeypatch):
    monkeypatch.delenv("DOCKPART_SCALE_TOKEN", raising=False)
    assert options()["scale-token"] is None
    monkeypatch.setenv("DOCKPART_SCALE_TOKEN", "from-env")
    assert options()["scale-token"] == "from-env"
    assert options("--scale-token", "given")["scale-token"] == "given"


def test_bad_start_port_and_sizes_are_usage_errors(monkeypatch):
    monkeypatch.setenv("start_port", "http")
    with pytest.raises(usage.UsageError, match="start_port"):
        options()
    monkeypatch.delenv("start_port")
    with pytest.raises(usage.UsageError, match="max-upload"):
        options("--max-upload", "lots")
    for size in ("-5", "0", "0k", "-1MiB"):
        with pytest.raises(usage.UsageError, match="must be positive"):
            options("--max-upload", size)
    with pytest.raises(usage.UsageError, match="max-queued-images"):
        options("--max-queued-images", "0")
    for port in ("0", "65536"):
        with pytest.raises(usage.UsageError, match=f"--first-port {port}: need 1 to 65535"):
            options("--first-port", port)
    assert options("--max-upload", "2MiB")["max-upload"] == 2 * 1024 * 1024
    assert options("--max-upload", "512k")["max-upload"] == 512 * 1024


def test_redis_option_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("DOCKPART_REDIS", raising=False)
    assert options()["redis"] == RedisAddress("127.0.0.1", 6379, 0)
    monkeypatch.setenv("DOCKPART_REDIS", "redis://cache:6380/2")
    assert options()["redis"] == RedisAddress("cache", 6380, 2)
    assert options("--redis", "redis://x/3")["redis"] == RedisAddress("x", 6379, 3)
    with pytest.raises(usage.UsageError, match="database must be a number"):
        options("--redis", "redis://x/db")


@pytest.mark.parametrize("data, mime", [
    (b"\xff\xd8\xff\xe0rest", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\nrest", "image/png"),
    (b"GIF89a....", "image/gif"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
    (b"<svg xmlns=...>", None),
    (b"", None),
])
def test_images_are_known_by_their_first_bytes(data, mime):
    assert web.sniff_image(data) == mime


@pytest.mark.parametrize("url", ["http://127.0.0.1", "https://127.0.0.1:3001", "127.0.0.1:3001",
                                 "http://127.0.0.1:3001/x", "http://127.0.0.1:99999", "garbage"])
def test_instance_urls_are_http_host_and_port_only(url):
    with pytest.raises(BadInstanceURL):
        parse_instance_url(url)


def test_instance_url_within_range():
    assert parse_instance_url("http://127.0.0.1:3001") == ("127.0.0.1", 3001)
    with pytest.raises(BadInstanceURL, match="outside 3001-3010"):
        parse_instance_url("http://127.0.0.1:3000", 3001, 3010)


class RecordsNothing:
    """Redis for routes that only record the visit."""

    def eval(self, *args):
        return defer.succeed(None)


def test_work_answers_after_n_ms_of_the_reactors_clock():
    clock = Clock()
    app = web.WebApp(RecordsNothing(), "127.0.0.1", 3000, 10, 1024, reactor=clock)
    request = DummyRequest([b"work"])
    request.uri, request.args = b"/work?ms=500", {b"ms": [b"500"]}
    app.render(request)
    clock.advance(0.499)
    assert not request.finished
    clock.advance(0.001)
    assert request.finished and b"".join(request.written) == b"worked 500 ms\n"


class Recorder:
    """Redis that records every command and answers as an empty one (or fails, when away)."""

    def __init__(self, away: bool = False):
        self.commands, self.away = [], away

    def _answer(self, *args):
        self.commands.append(args)
        if self.away:
            return defer.fail(RedisUnavailable("no connection"))
        return defer.succeed(None)

    call = eval = _answer


def stub(redis, **kw):
    return StubTreq(web.WebApp(redis, "127.0.0.1", 3000, 10, 1024, reactor=Clock(), **kw))


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", ["/meow", "/spawn", "/destroy", "/set", "/set/k"])
async def test_head_on_a_route_that_changes_state_runs_nothing(path):
    redis = Recorder()
    reply = await stub(redis).head("http://h" + path)
    assert reply.code == 405 and reply.headers.getRawHeaders("allow") == ["GET"]
    assert redis.commands == []  # not even the visit


@pytest_twisted.ensureDeferred
async def test_the_page_answers_without_redis_and_the_rest_say_503_retry_after():
    client = stub(Recorder(away=True))
    page = await client.get("http://h/")
    assert page.code == 200 and "Served by the instance" in await page.text()
    reply = await client.get("http://h/get")
    assert reply.code == 503 and reply.headers.getRawHeaders("retry-after") == ["2"]


@pytest_twisted.ensureDeferred
async def test_two_scale_tokens_are_a_400_before_redis_is_asked_for_a_spawn():
    redis = Recorder()
    reply = await stub(redis, scale_token="s3cret").get("http://h/spawn?token=x;token=s3cret")
    assert reply.code == 400
    assert [c for c in redis.commands if c[0] != web._RECORD] == []  # only the visit


@pytest.mark.parametrize("argv, lines", [((), 1), (("--no-access-log",), 0)])
def test_no_access_log_leaves_out_the_line_per_request(argv, lines):
    config = options(*argv)
    page = Data(b"ok", "text/plain")
    page.isLeaf = True
    site = BoundedSite(page, reactor=MemoryReactorClock(),
                       access_log=not config["no-access-log"])
    site.startFactory()
    site.logFile = written = io.StringIO()
    channel, transport = site.buildProtocol(None), StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200")
    assert written.getvalue().count("\n") == lines
    site.stopFactory()
