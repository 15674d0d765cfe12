"""dockpart-socat: every TCP connection gets a file's bytes, then the connection closes.

A one-process stand-in for the seed's ``socat TCP-LISTEN:7000,fork,reuseaddr,crlf
OPEN:random,rdonly``: no process per connection, the file opened afresh for each one (so a
file replaced by rename reaches each reader whole, old or new), streamed in chunks as the
client reads (memory stays flat for any size), ``--crlf`` byte for byte like socat's.
Run it with ``twistd -n dockpart-socat --listen tcp:7000 --file random --crlf``.
"""

from typing import BinaryIO

from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from dockpart.listening import Listener, server_endpoint

DEFAULT_LISTEN = "tcp:7000:interface=127.0.0.1"
DEFAULT_MAX_CONNECTIONS = 1000
#: Listen queue for TCP endpoints that do not say: Twisted's 50 overflows in a burst of 200
#: clients, and a client that only reads never learns that its connection was dropped.
BACKLOG = 1024
#: After the last byte, how long the client has to hang up before we close (socat's ``-t``).
CLOSE_TIMEOUT = 0.5


def crlf(data: bytes) -> bytes:
    """socat's ``crlf`` on the way out: a CR before every LF, even after an existing CR.

    socat 1.7.4 turns ``a\\r\\n`` into ``a\\r\\r\\n``; parity tests check it against socat.
    Context-free, so chunk boundaries cannot change the result.
    """
    return data.replace(b"\n", b"\r\n")


class ChunkSender(FileSender):
    """A pull producer of the file in 64 KiB chunks that reports a read error as a failure.

    ``FileSender`` lets a read error escape into the transport; here it ends the transfer.
    """

    CHUNK_SIZE = 64 * 1024

    def resumeProducing(self):
        try:
            super().resumeProducing()
        except OSError as e:
            self.file = None
            self.consumer.unregisterProducer()
            d, self.deferred = self.deferred, None
            if d is not None:
                d.errback(e)


@implementer(IHalfCloseableProtocol)
class FileServer(Protocol):
    """Sends the file, half-closes, and closes when the client hangs up (or after a grace)."""

    log = Logger()
    transport: ITCPTransport  # set by a TCP (or UNIX) listener before connectionMade

    def __init__(self):
        self.file: BinaryIO | None = None
        self.admitted = False
        self.sent = False
        self.client_done = False
        self.closer = None

    def connectionMade(self):
        factory = self.factory
        self.admitted = factory.admit()
        if not self.admitted:
            self.log.warn("{n} connections already: turning one away", n=factory.active - 1)
            self.transport.abortConnection()
            return
        try:
            self.file = open(factory.path, "rb")
            first = self.file.read(ChunkSender.CHUNK_SIZE)
        except OSError as e:
            # A reset, not a clean close: the client cannot mistake it for an empty file.
            self.log.warn("cannot serve {path}: {error}", path=factory.path, error=e)
            self.transport.abortConnection()
            return
        self.transport.write(factory.transform(first) if factory.transform else first)
        if len(first) < ChunkSender.CHUNK_SIZE:
            self._sent(None)  # a short read is the end: a small file needs no producer
            return
        d = ChunkSender().beginFileTransfer(self.file, self.transport, factory.transform)
        d.addCallbacks(self._sent, self._not_sent)

    def dataReceived(self, data):
        """The file is read-only (socat's ``rdonly``): what the client sends is ignored."""

    def _sent(self, _):
        self.sent = True
        assert self.file is not None  # only called once the file is open
        self.file.close()
        self.file = None
        if self.client_done:
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()
            self.closer = self.factory.clock.callLater(CLOSE_TIMEOUT, self.transport.loseConnection)

    def _not_sent(self, failure):
        if failure.check(OSError):
            self.log.warn("reading {path} failed: {error}", path=self.factory.path,
                          error=failure.value)
            self.transport.abortConnection()
        # Otherwise the client left before the end: nothing more to do.

    def readConnectionLost(self):
        self.client_done = True
        if self.sent:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        """Our FIN is out; the grace timer (or the client's own close) finishes the job."""

    def connectionLost(self, reason: Failure = connectionDone):
        if self.closer is not None and self.closer.active():
            self.closer.cancel()
        if self.file is not None:
            self.file.close()
        if self.admitted:
            self.factory.release()


class FileServerFactory(Factory):
    """Counts connections; at ``max_connections`` it stops accepting (socat's ``max-children``):
    further clients wait in the listen queue until one finishes."""

    protocol = FileServer
    noisy = False
    log = Logger()

    def __init__(self, path: str, transform=None, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.path = path
        self.transform = transform
        self.max_connections = max_connections
        self.clock = clock
        self.active = 0
        self.listener: Listener | None = None  # a Listener, whose port is paused at the ceiling

    def admit(self) -> bool:
        """Count one more connection; False if it is over the ceiling (a burst accepted at once)."""
        self.active += 1
        if self.active > self.max_connections:
            self.active -= 1
            return False
        if self.active == self.max_connections:
            self._port_reading(False)
        return True

    def release(self) -> None:
        self.active -= 1
        if self.active == self.max_connections - 1:
            self._port_reading(True)

    def _port_reading(self, on: bool) -> None:
        port = self.listener.port if self.listener is not None else None
        if port is not None and port.connected:
            port.startReading() if on else port.stopReading()


def file_listener(name: str, reactor, listen: str, path: str, crlf_lines: bool,
                  max_connections: int) -> Listener:
    """A service serving ``path`` on the endpoint string ``listen`` (shared with the writer)."""
    description = listen
    if listen.startswith(("tcp:", "tcp6:")) and "backlog=" not in listen:
        description += f":backlog={BACKLOG}"
    server_endpoint(reactor, "listen", listen)  # the error names what the person typed
    endpoint = server_endpoint(reactor, "listen", description)
    factory = FileServerFactory(path, crlf if crlf_lines else None, max_connections, reactor)
    factory.listener = Listener(name, endpoint, factory)
    return factory.listener


def check_options(config: usage.Options) -> None:
    """What the writer and dockpart-socat check alike: --max-connections and --listen."""
    if config["max-connections"] < 1:
        raise usage.UsageError("--max-connections must be at least 1")
    from twisted.internet import reactor
    server_endpoint(reactor, "listen", config["listen"])  # a usage error here, not a traceback


class Options(usage.Options):
    synopsis = f"[--listen {DEFAULT_LISTEN}] [--file random] [--crlf] [--max-connections N]"
    longdesc = ("Serve a file's bytes to every TCP connection, then close it; like "
                "`socat TCP-LISTEN:7000,fork,reuseaddr,crlf OPEN:random,rdonly` in one process.")
    optFlags = [
        ["crlf", None, "Turn each LF into CRLF on the way out, as socat's crlf option does."],
    ]
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN, "Endpoint to listen on (loopback unless told otherwise)."],
        ["file", "f", "random", "The file to serve; opened afresh for each connection."],
        ["max-connections", None, DEFAULT_MAX_CONNECTIONS,
         "Simultaneous connections at most; more wait in the listen queue.", int],
    ]

    def postOptions(self):
        check_options(self)


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    return file_listener("dockpart-socat", reactor, config["listen"], config["file"],
                         config["crlf"], config["max-connections"])
