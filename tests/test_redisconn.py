"""RedisService against a real redis-server (first connection waited for, later outages not),
and Redis URLs read as redis-py reads them."""

import re

import pytest
import pytest_twisted
import redis as redis_py
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure

from dockpart.redisconn import (INCOMPLETE, RedisAddress, RedisError, RedisService,
                                RedisUnavailable, _Connection, command, read_reply)
from helpers import RedisProcess, free_port


@pytest_twisted.ensureDeferred
async def test_a_command_sent_at_start_waits_for_the_first_connection(redis_server, redis_db):
    redis = RedisService(RedisAddress("127.0.0.1", redis_server.port, 0), timeout=5)
    redis.startService()  # no reactor turn yet: not connected
    try:
        assert not redis.connected
        assert await redis.call("SET", "k", "v") == "OK"
        assert redis_db.get("k") == "v"
    finally:
        await redis.stopService()


@pytest_twisted.ensureDeferred
async def test_no_server_gives_unavailable_after_the_timeout():
    redis = RedisService(RedisAddress("127.0.0.1", free_port(), 0), timeout=0.3)
    redis.startService()
    try:
        with pytest.raises(RedisUnavailable):
            await redis.call("PING")
    finally:
        await redis.stopService()


@pytest.mark.parametrize("url, address", [
    ("redis://h", RedisAddress("h", 6379, 0)),
    ("redis://h:6380/2", RedisAddress("h", 6380, 2)),
    ("redis://", RedisAddress("localhost", 6379, 0)),
    ("redis://:p%40ss%3Aw%2Frd@h/1", RedisAddress("h", 6379, 1, "p@ss:w/rd")),
    ("redis://alice:pw@h", RedisAddress("h", 6379, 0, "pw", "alice")),
    ("redis://al%20ice:@h", RedisAddress("h", 6379, 0, None, "al ice")),
    ("redis://h/3?db=5", RedisAddress("h", 6379, 5)),  # ?db= wins, as in redis-py
    ("redis://h?db=4", RedisAddress("h", 6379, 4)),
    ("redis://[::1]:6390/0", RedisAddress("::1", 6390, 0)),
])
def test_redis_urls_are_read_as_redis_py_reads_them(url, address):
    assert RedisAddress.parse(url) == address
    kwargs = redis_py.connection.parse_url(url)  # the reference
    assert (kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0),
            kwargs.get("password"), kwargs.get("username")) == (
        address.host, address.port, address.db, address.password,
        address.username)


@pytest.mark.parametrize("url, reason", [
    ("rediss://:secret@h", "TLS (rediss://) is not supported"),
    ("unix:///tmp/redis.sock", "UNIX sockets are not supported"),
    ("http://h", "expected redis://HOST:PORT/DB"),
    ("REDIS://h", "expected redis://HOST:PORT/DB"),  # redis-py's schemes are lower case
    ("redis://:secret@h/db", "the database must be a number"),
    ("redis://:secret@h:port", "Port could not be cast"),
])
def test_bad_redis_urls_are_refused_without_showing_the_password(url, reason):
    with pytest.raises(usage.UsageError, match=re.escape(reason)) as refused:
        RedisAddress.parse(url)
    assert "secret" not in str(refused.value)


def test_an_address_turns_back_into_the_url_it_came_from():
    for url in ("redis://h:6379/0", "redis://:p%40ss%3Aw%2Frd@h:6379/1",
                "redis://alice:pw@h:6380/2", "redis://[::1]:6379/0"):
        assert RedisAddress.parse(url).url() == url
        assert RedisAddress.parse(RedisAddress.parse(url).url()) == RedisAddress.parse(url)
    assert str(RedisAddress.parse("redis://alice:pw@h:6380/2")) == "redis://h:6380/2"


@pytest_twisted.ensureDeferred
async def test_a_user_and_a_percent_encoded_password_log_in_to_a_real_redis():
    server = RedisProcess().start()
    try:
        admin = server.client()
        admin.acl_setuser("alice", enabled=True, passwords=["+p@ss:w/rd"], keys=["*"],
                          commands=["+@all"])
        admin.config_set("requirepass", "default p@ss")
        url = f"redis://alice:p%40ss%3Aw%2Frd@127.0.0.1:{server.port}/2"
        for url in (url, f"redis://:default%20p%40ss@127.0.0.1:{server.port}/2"):
            redis = RedisService(RedisAddress.parse(url), timeout=5)
            redis.startService()
            try:
                assert await redis.call("SET", "k", url) == "OK"
            finally:
                await redis.stopService()
        check = redis_py.Redis(port=server.port, db=2, password="default p@ss",
                               decode_responses=True)
        assert check.get("k").startswith("redis://:default")
        check.close()
        admin.close()
    finally:
        server.stop()


@pytest.mark.parametrize("password", ["xq1/xq2", "xq1?xq2", "xq1#xq2", "xq1/xq2?xq3#xq4@xq5"])
@pytest.mark.parametrize("rest, reason", [
    ("h/db", "the database must be a number"),
    ("h:port/0", "Port could not be cast"),
])
def test_no_character_of_a_password_lets_it_into_an_error(password, rest, reason):
    """The password's characters are not URL syntax: a '/', '?' or '#' in it printed the part
    after it (as the database, or the port) in the error."""
    with pytest.raises(usage.UsageError, match=re.escape(reason)) as refused:
        RedisAddress.parse(f"redis://:{password}@{rest}")
    for part in re.split(r"[/?#@]", password):
        assert part not in str(refused.value), str(refused.value)
    address = RedisAddress.parse(f"redis://:{password}@h:6390/1")
    assert (address.host, address.port, address.db, address.password) == ("h", 6390, 1, password)
    assert password not in repr(address) and password not in str(address)


@pytest_twisted.ensureDeferred
async def test_redis_loading_its_data_is_unavailable_not_an_error(redis_server):
    """A restarted Redis answers LOADING until its data is read: a caller gets RedisUnavailable
    (503 and Retry-After for a person), as while it was away."""
    from twisted.internet import defer

    redis = RedisService(RedisAddress("127.0.0.1", redis_server.port, 0), timeout=5)
    failure = defer.fail(RedisError("LOADING Redis is loading the dataset in memory"))
    with pytest.raises(RedisUnavailable, match="cannot serve now: LOADING"):
        await failure.addErrback(redis._unavailable)
    other = defer.fail(RedisError("WRONGTYPE Operation against a key"))
    with pytest.raises(RedisError):
        await other.addErrback(redis._unavailable)


# -- the connection, in memory


class TCPStringTransport(StringTransport):
    def setTcpNoDelay(self, enabled):
        self.nodelay = enabled


def connection(address=RedisAddress("127.0.0.1", 6379, 0), timeout=2.0):
    """A RedisService on a clock, with one in-memory connection made: (service, its
    connection, what was written to Redis, the clock)."""
    clock = Clock()
    service = RedisService(address, timeout, reactor=clock)
    factory = Factory.forProtocol(_Connection)
    factory.service = service
    conn = factory.buildProtocol(None)
    transport = TCPStringTransport()
    conn.makeConnection(transport)
    return service, conn, transport, clock


@pytest.mark.parametrize("reply, value", [
    (b"+OK\r\n", "OK"),
    (b":-3\r\n", -3),
    (b"$-1\r\n", None),
    (b"$5\r\nh\xc3\xa9!!\r\n", "hé!!"),
    (b"$2\r\n\xff\xfe\r\n", b"\xff\xfe"),  # not UTF-8: the bytes
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n$-1\r\n$0\r\n\r\n", ["a", [1, None], ""]),
])
def test_replies_are_read_whole_and_only_whole(reply, value):
    for cut in range(len(reply)):
        assert read_reply(reply[:cut], 0) == (INCOMPLETE, 0)
    assert read_reply(reply + b"+next\r\n", 0) == (value, len(reply))


def test_an_error_is_a_redis_error_and_the_next_answer_still_reaches_its_caller():
    service, conn, transport, _ = connection()
    assert service.connected and transport.nodelay
    wrong = service.call("LPUSH", "k", "v")
    right = service.call("GET", "k")
    assert transport.value() == command(b"LPUSH", b"k", b"v") + command(b"GET", b"k")
    conn.dataReceived(b"-WRONGTYPE Operation against a key\r\n$1")
    conn.dataReceived(b"\r\nx\r\n")
    assert isinstance(wrong.result.value, RedisError) and "WRONGTYPE" in str(wrong.result.value)
    wrong.addErrback(lambda _: None)
    assert right.result == "x"


def test_an_answer_later_than_the_timeout_is_unavailable_and_goes_nowhere():
    service, conn, _, clock = connection(timeout=2.0)
    late, failures = service.call("GET", "a"), []
    late.addErrback(failures.append)
    clock.advance(2.0)
    assert failures and failures[0].check(RedisUnavailable)
    on_time = service.call("GET", "b")
    conn.dataReceived(b"$1\r\nA\r\n$1\r\nB\r\n")
    assert on_time.result == "B"


def test_a_lost_connection_fails_what_waits_and_later_calls_at_once():
    service, conn, transport, _ = connection()
    waiting, failures = service.call("GET", "a"), []
    waiting.addErrback(failures.append)
    conn.connectionLost(Failure(ConnectionLost()))
    assert failures and failures[0].check(RedisUnavailable)
    assert not service.connected
    refused = service.call("GET", "a")
    assert refused.called and isinstance(refused.result.value, RedisUnavailable)
    refused.addErrback(lambda _: None)


def test_the_connection_is_offered_only_once_redis_took_its_login_and_database():
    address = RedisAddress("127.0.0.1", 6379, 3, "pw", "alice")
    service, conn, transport, _ = connection(address)
    assert transport.value() == (command(b"AUTH", b"alice", b"pw")
                                 + command(b"SELECT", b"3"))
    assert not service.connected
    conn.dataReceived(b"+OK\r\n+OK\r\n")
    assert service.connected


def test_a_refused_login_drops_the_connection_to_try_again():
    service, conn, transport, _ = connection(RedisAddress("127.0.0.1", 6379, 0, "wrong"))
    conn.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
    assert not service.connected and transport.disconnecting


def test_a_login_left_unanswered_drops_the_connection_after_the_timeout():
    service, conn, transport, clock = connection(RedisAddress("127.0.0.1", 6379, 1), timeout=2)
    clock.advance(2)
    assert not service.connected and transport.disconnecting


@pytest.mark.parametrize("data", [b"+OK\r\n", b"!not resp\r\n"])
def test_what_is_no_answer_to_a_command_drops_the_connection(data):
    service, conn, transport, _ = connection()
    conn.dataReceived(data)
    assert transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_a_restarted_redis_is_reached_again_by_itself():
    from twisted.internet import reactor, task

    server = RedisProcess().start()
    redis = RedisService(RedisAddress("127.0.0.1", server.port, 0), timeout=2)
    redis.startService()
    try:
        assert await redis.call("SET", "k", "before") == "OK"
        server.stop()
        with pytest.raises(RedisUnavailable):
            await redis.call("GET", "k")
        server.start()
        for _ in range(100):  # reconnecting: never more than RECONNECT_MAX (2 s) apart
            if redis.connected:
                break
            await task.deferLater(reactor, 0.05)
        assert await redis.call("SET", "k", "after") == "OK"
    finally:
        await redis.stopService()
        server.stop()
