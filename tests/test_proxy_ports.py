"""Port sharing and a worker's readiness, in memory and in process: the SO_REUSEPORT socket
dockpart-proxy makes and hands to ``adoptStreamPort``, endpoint strings read as Twisted reads
them, and the ready pipe from a ``--workers`` worker to its parent."""

import os
import socket
import subprocess

import pytest
import pytest_twisted

from helpers import free_port


def listen_queue(port: int) -> int:
    """The backlog of the sockets listening on ``port``, as the kernel reports it (ss)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[2])  # State Recv-Q Send-Q ...: Send-Q is the backlog


def test_a_worker_is_ready_when_its_pipe_says_so_not_when_its_log_mentions_listening():
    from dockpart.proxy_workers import READY_FD, _Worker

    class Parent:
        ready: list = []

        def worker_ready(self, worker):
            self.ready.append(worker.number)

    parent = Parent()
    worker = _Worker(parent, 1)
    worker.transport = type("Process", (), {"pid": 4242})()
    worker.childDataReceived(1, b"2026-01-01T00:00:00+0000 [x] dockpart-proxy listening on "
                                b"127.0.0.1:3456\n")
    assert parent.ready == [] and not worker.ready  # a log line is no signal
    worker.childDataReceived(READY_FD, b"ready\n")
    assert parent.ready == [1] and worker.ready


def test_the_ready_signal_is_written_once_started_and_its_pipe_closed():
    from dockpart.proxy_workers import ReadySignal
    read_end, write_end = os.pipe()
    try:
        ReadySignal(write_end).startService()
        assert os.read(read_end, 100) == b"ready\n"
        assert os.read(read_end, 100) == b""  # closed: the parent sees the end too
    finally:
        os.close(read_end)


def test_a_shared_port_is_a_socket_of_ours_handed_to_adopt_stream_port():
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactor

    from dockpart.listening import shared_port_endpoint
    reactor = MemoryReactor()
    factory = Factory.forProtocol(Protocol)
    ports = []
    shared_port_endpoint(reactor, "listen", "tcp:0:interface=127.0.0.1", 77) \
        .listen(factory).addCallback(ports.append)
    assert len(ports) == 1 and reactor.tcpServers == []
    (fd, family, adopted), = reactor.adoptedPorts
    assert family == socket.AF_INET and adopted is factory


@pytest_twisted.inlineCallbacks
def test_two_listeners_in_one_process_share_a_port_and_keep_their_backlog():
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from dockpart.listening import shared_port_endpoint
    port = free_port()
    factory = Factory.forProtocol(Protocol)
    first = yield shared_port_endpoint(reactor, "listen", f"tcp:{port}:interface=127.0.0.1",
                                       123).listen(factory)
    second = yield shared_port_endpoint(reactor, "listen", f"tcp:{port}:interface=127.0.0.1",
                                        123).listen(factory)
    try:
        assert first.getHost().port == second.getHost().port == port
        assert listen_queue(port) == 123
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        yield first.stopListening()
        yield second.stopListening()


@pytest.mark.parametrize("description, address", [
    ("tcp:3456", ("", 3456)),
    ("tcp:port=3456:interface=127.0.0.1", ("127.0.0.1", 3456)),
    ("tcp6:3456:interface=\\:\\:1", ("::1", 3456)),
    ("tcp6:3456", ("::", 3456)),
])
def test_tcp_address_reads_endpoint_strings_as_twisted_does(description, address):
    from dockpart.listening import tcp_address
    assert tcp_address(description) == address
