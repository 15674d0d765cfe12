"""The coroutine route base both sites share (dockpart.routes), in memory."""

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
