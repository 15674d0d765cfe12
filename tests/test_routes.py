"""The coroutine route base both sites share (dockpart.routes), in memory."""

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from dockpart import routes


class Failing(routes.CoroutineResource):
    async def dispatch(self, request):
        raise RuntimeError("a handler bug")


def test_an_unexpected_error_is_a_500_and_its_log_line_names_no_token():
    """Either site's ?token= (scale or dashboard token) must not reach the log with the failure."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        request = DummyRequest([b"spawn"])
        request.uri = b"/spawn?token=s3cret&x=1"
        Failing().render(request)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert request.responseCode == 500
    assert b"a handler bug" not in b"".join(request.written)
    logged = [formatEvent(e) for e in events]
    assert any("/spawn?x=1" in line for line in logged), logged
    assert not any("s3cret" in line for line in logged), logged


def test_without_token_keeps_every_other_parameter():
    assert routes.without_token(b"/a?token=t&b=2&token=u") == b"/a?b=2"
    assert routes.without_token(b"/a?token=t") == b"/a"
    assert routes.without_token(b"/a") == b"/a"


@pytest.mark.parametrize("uri", [b"/a?b=2;token=t", b"/a?%74oken=t&b=2", b"/a?b=2&t%6Fk%65n=t",
                                 b"/a?b=2&token", b"/a?b=2&token=t%26"])
def test_without_token_cuts_what_twisted_reads_as_token(uri):
    """Twisted splits at ';' too and unquotes names (twisted.web.http.parse_qs)."""
    assert routes.without_token(uri) == b"/a?b=2"


class Site(routes.CoroutineResource):
    """A site of three routes, one of which changes state on GET."""

    def __init__(self):
        super().__init__()
        self.ran = []
        self.routes = routes.Routes()
        self.routes.add("GET", "", self.page)
        self.routes.add("GET", "take", self.page, changes_state=True)
        self.routes.add("POST", "form", self.page)

    async def page(self, request):
        self.ran.append(request.method)
        return routes.Reply(200, "page")

    async def dispatch(self, request):
        try:
            handler = self.routes.find(request.method.decode(), request.path.decode()[1:])
        except routes.NoRoute as e:
            return routes.Reply(e.code, str(e), headers=e.headers)
        try:
            given = routes.credential(request)
        except routes.TooManyCredentials:
            return routes.Reply(400, "one token")
        if given is not None and not routes.same_token(given, b"t"):
            return routes.Reply(403, "no")
        return await handler(request)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method, path, code, allow, ran", [
    ("GET", "/", 200, None, [b"GET"]),
    ("HEAD", "/", 200, None, [b"HEAD"]),
    ("HEAD", "/take", 405, "GET", []),
    ("GET", "/take", 200, None, [b"GET"]),
    ("DELETE", "/", 405, "GET, HEAD", []),
    ("GET", "/form", 405, "POST", []),
    ("GET", "/nothing", 404, None, []),
])
async def test_one_route_table_answers_404_405_and_head(method, path, code, allow, ran):
    site = Site()
    reply = await StubTreq(site).request(method, "http://h" + path)
    assert reply.code == code
    assert reply.headers.getRawHeaders("allow", [None])[0] == allow
    assert site.ran == ran


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path, headers, code", [
    ("/?token=t", {}, 200),
    ("/?%74oken=t", {}, 200),
    ("/", {"Authorization": ["Bearer t"]}, 200),
    ("/?token=x&token=t", {}, 400),
    ("/?token=x;token=t", {}, 400),
    ("/?token=x&%74oken=t", {}, 400),
    ("/?token=t", {"Authorization": ["Bearer t"]}, 400),
    ("/", {"Authorization": ["Bearer x", "Bearer t"]}, 400),
    ("/?token=x", {}, 403),
])
async def test_one_token_per_request(path, headers, code):
    reply = await StubTreq(Site()).get("http://h" + path, headers=headers)
    assert reply.code == code
