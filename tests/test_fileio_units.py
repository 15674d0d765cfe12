"""File IO without sockets: the writer on a fake clock, options, fileweb against a memory reactor."""

import os
import stat

import pytest
from treq.testing import StubTreq
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage

from dockpart import fileweb, socatlike, writer


def writer_config(*args: str) -> writer.Options:
    config = writer.Options()
    config.parseOptions(list(args))
    return config


def test_writer_rewrites_at_start_and_every_interval(tmp_path):
    path = tmp_path / "random"
    clock = Clock()
    service = writer.makeService(
        writer_config("--file", str(path), "--interval", "0.12", "--size", "100", "--serve", "none"),
        reactor=clock)
    service.startService()
    try:
        first = path.read_bytes()
        assert len(first) == 100 + 2  # two lines: 64 and 36 characters, each with LF
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        clock.advance(0.11)
        assert path.read_bytes() == first
        clock.advance(0.01)
        second = path.read_bytes()
        assert second != first
        clock.advance(0.12)
        third = path.read_bytes()
        assert third not in (first, second)
        assert os.listdir(tmp_path) == ["random"]
    finally:
        service.stopService()
    clock.advance(10)
    assert path.read_bytes() == third  # untouched after stop
    assert not clock.getDelayedCalls()


def test_writer_keeps_going_after_a_failed_rewrite(tmp_path):
    clock = Clock()
    path = tmp_path / "gone" / "random"
    service = writer.makeService(
        writer_config("--file", str(path), "--interval", "1", "--serve", "none"), reactor=clock)
    service.startService()
    try:
        assert not path.exists()
        path.parent.mkdir()
        clock.advance(1)
        assert path.exists()
    finally:
        service.stopService()


def test_writer_default_is_the_seed_pace_of_two_minutes_served_by_us(monkeypatch):
    monkeypatch.delenv(writer.SERVE_ENV, raising=False)
    config = writer_config()
    assert (config["interval"], config["serve"], config["file"]) == (120.0, "dockpart", "random")
    monkeypatch.setenv(writer.SERVE_ENV, "socat")
    assert writer_config()["socat-argv"][1:] == [
        "TCP-LISTEN:7000,fork,reuseaddr,crlf,bind=127.0.0.1", "OPEN:random,rdonly"]
    assert writer_config("--serve", "none")["serve"] == "none"  # the option beats the env


@pytest.mark.parametrize("args, message", [
    (["--interval", "0"], "--interval must be a positive"),
    (["--size", "0"], "--size must be between"),
    (["--serve", "nginx"], "choose one of dockpart, socat, none"),
    (["--serve", "socat", "--listen", "unix:/tmp/x"], "needs --listen tcp:PORT"),
    (["--serve", "socat", "--file", "a,b"], "cannot pass the file name"),
    (["--max-connections", "0"], "--max-connections must be at least 1"),
])
def test_writer_refuses_bad_options(args, message):
    with pytest.raises(usage.UsageError, match=message):
        writer_config(*args)


def test_bad_endpoints_are_usage_errors():
    config = socatlike.Options()
    config.parseOptions(["--listen", "tcp:7000:interface=127.0.0.1"])
    config["listen"] = "tcp:notaport"  # past the options' own check: makeService checks too
    with pytest.raises(usage.UsageError, match="--listen 'tcp:notaport'"):
        socatlike.makeService(config, reactor=MemoryReactorClock())
    for options, args, message in [
            (socatlike.Options, ["--listen", "tcp:notaport"], "--listen 'tcp:notaport'"),
            (writer.Options, ["--listen", "tcp:notaport"], "--listen 'tcp:notaport'"),
            (fileweb.Options, ["--listen", "tcp:notaport"], "--listen 'tcp:notaport'"),
            (fileweb.Options, ["--source", "nonsense:x"], "--source 'nonsense:x'")]:
        with pytest.raises(usage.UsageError, match=message):
            options().parseOptions(args)


@pytest.mark.parametrize("daemon", [socatlike, writer, fileweb])
def test_daemons_listen_on_loopback_unless_told_otherwise(daemon, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the writer writes its file at start
    monkeypatch.delenv(writer.SERVE_ENV, raising=False)
    config = daemon.Options()
    config.parseOptions([])
    reactor = MemoryReactorClock()
    service = daemon.makeService(config, reactor=reactor)
    service.privilegedStartService()
    try:
        [(_port, _factory, _backlog, interface)] = reactor.tcpServers
        assert interface == "127.0.0.1"
    finally:
        service.stopService()


def test_fileweb_gives_up_on_a_silent_source_after_its_idle_timeout_not_before():
    clock = Clock()
    reader = fileweb.SourceReader(0.5, 1000, clock)
    reader.makeConnection(StringTransport())
    outcome = []
    reader.done.addBoth(outcome.append)
    clock.advance(0.4)
    reader.dataReceived(b"some")  # each byte restarts the idle time
    clock.advance(0.4)
    assert outcome == []
    clock.advance(0.1)
    [failure] = outcome
    assert failure.value.code == 504
    assert str(failure.value) == "the source sent nothing for 0.5 s (after 4 bytes)"


def test_at_max_connections_the_port_stops_accepting_until_one_ends():
    """socat's max-children: the listening port stops reading; the next client waits in the queue."""
    factory = socatlike.FileServerFactory("unused", max_connections=2, clock=Clock())
    port = MemoryReactorClock().listenTCP(0, factory)
    calls = []
    port.connected = True
    port.stopReading = lambda: calls.append("stop")
    port.startReading = lambda: calls.append("start")
    cap = factory.connections
    cap.port = port  # what the Listener does once it listens
    assert cap.admit() and calls == []
    assert cap.admit() and calls == ["stop"]
    assert not cap.admit()  # one accepted in the same burst is turned away
    cap.release()
    assert calls == ["stop", "start"]


def test_a_client_that_takes_nothing_is_cut_off_after_the_timeout(tmp_path):
    """socat's -T: the idle timer restarts each time the client takes a chunk; a client that
    stops taking is aborted after --timeout, and its slot is free again."""
    path = tmp_path / "big"
    path.write_bytes(b"z" * (3 * socatlike.ChunkSender.CHUNK_SIZE))
    clock = Clock()
    factory = socatlike.FileServerFactory(str(path), max_connections=1, clock=clock, timeout=2.0)
    server = factory.buildProtocol(None)
    transport = StringTransport()
    transport.abortConnection = lambda: server.connectionLost(None)
    server.makeConnection(transport)
    assert factory.connections.active == 1
    clock.advance(1.5)
    transport.producer.resumeProducing()  # the client took the first chunk: the time restarts
    clock.advance(1.5)
    assert factory.connections.active == 1
    clock.advance(0.5)  # then nothing for 2 s
    assert factory.connections.active == 0


def test_crlf_adds_a_cr_before_every_lf_like_socat():
    assert socatlike.crlf(b"a\nb\r\nc\r") == b"a\r\nb\r\r\nc\r"


def test_fileweb_504_when_the_source_never_accepts():
    """A connection attempt that never completes ends in 504 after the timeout."""
    reactor = MemoryReactorClock()
    page = fileweb.SourcePage(TCP4ClientEndpoint(reactor, "127.0.0.1", 7000),
                              "tcp:127.0.0.1:7000", 3.0, 1000, reactor)
    client = StubTreq(page)
    answers = []
    client.get("http://fileweb/").addBoth(answers.append)
    client.flush()
    assert answers == [] and len(reactor.tcpClients) == 1
    reactor.advance(3)
    client.flush()
    [response] = answers
    assert response.code == 504
    body = client.content(response)
    client.flush()
    assert body.result == (b"504 Gateway Timeout: the source accepted no connection within 3 s "
                           b"(source tcp:127.0.0.1:7000).\n")
