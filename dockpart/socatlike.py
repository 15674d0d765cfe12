"""dockpart-socat: every TCP connection gets a file's bytes, then the connection closes.

A one-process stand-in for the seed's ``socat TCP-LISTEN:7000,fork,reuseaddr,crlf
OPEN:random,rdonly``: no process per connection, the file opened afresh for each one (so a
file replaced by rename reaches each reader whole, old or new), streamed in chunks as the
client reads (memory stays flat for any size), ``--crlf`` byte for byte like socat's.  A client
that takes nothing for ``--timeout`` seconds is cut off (socat's ``-T``), so clients that never
read cannot hold every ``--max-connections`` slot for ever.
Run it with ``twistd -n dockpart-socat --listen tcp:7000 --file random --crlf``.
"""

from typing import BinaryIO

from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.protocols.policies import TimeoutMixin
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from dockpart.listening import ConnectionCap, Listener, server_endpoint

DEFAULT_LISTEN = "tcp:7000:interface=127.0.0.1"
DEFAULT_MAX_CONNECTIONS = 1000
#: Seconds a client may take nothing before it is cut off (socat's ``-T``).
DEFAULT_TIMEOUT = 10.0
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
    ``progress`` is called each time the client has taken the previous chunk.
    """

    CHUNK_SIZE = 64 * 1024

    def __init__(self, progress=lambda: None):
        self.progress = progress

    def resumeProducing(self):
        self.progress()
        try:
            super().resumeProducing()
        except OSError as e:
            self.file = None
            self.consumer.unregisterProducer()
            d, self.deferred = self.deferred, None
            if d is not None:
                d.errback(e)


@implementer(IHalfCloseableProtocol)
class FileServer(Protocol, TimeoutMixin):
    """Sends the file, half-closes, and closes when the client hangs up (or after a grace).

    The idle timer runs from the start and restarts each time the client takes a chunk: one
    that takes nothing for the factory's ``timeout`` is aborted (its unsent bytes dropped).
    """

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
        self.admitted = factory.connections.admit()
        if not self.admitted:
            self.log.warn("{n} connections already: turning one away",
                          n=factory.connections.active)
            self.transport.abortConnection()
            return
        self.callLater = factory.clock.callLater  # type: ignore[method-assign]  # TimeoutMixin's clock
        self.setTimeout(factory.timeout)
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
        sender = ChunkSender(self.resetTimeout)
        d = sender.beginFileTransfer(self.file, self.transport, factory.transform)
        d.addCallbacks(self._sent, self._not_sent)

    def dataReceived(self, data):
        """The file is read-only (socat's ``rdonly``): what the client sends is ignored (and
        does not count as activity: a client that writes but never reads is still idle)."""

    def timeoutConnection(self):
        self.log.info("a client took nothing for {timeout:g} s: cutting it off",
                      timeout=self.factory.timeout)
        self.transport.abortConnection()

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
        self.setTimeout(None)
        if self.closer is not None and self.closer.active():
            self.closer.cancel()
        if self.file is not None:
            self.file.close()
        if self.admitted:
            self.factory.connections.release()


class FileServerFactory(Factory):
    """At ``max_connections`` it stops accepting (socat's ``max-children``): further clients
    wait in the listen queue until one finishes or is cut off after ``timeout``."""

    protocol = FileServer
    noisy = False
    log = Logger()

    def __init__(self, path: str, transform=None, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 clock=None, timeout: float = DEFAULT_TIMEOUT):
        if clock is None:
            from twisted.internet import reactor as clock
        self.path = path
        self.transform = transform
        self.connections = ConnectionCap(max_connections)
        self.clock = clock
        self.timeout = timeout


def file_listener(name: str, reactor, listen: str, path: str, crlf_lines: bool,
                  max_connections: int, timeout: float = DEFAULT_TIMEOUT) -> Listener:
    """A service serving ``path`` on the endpoint string ``listen`` (shared with the writer)."""
    description = listen
    if listen.startswith(("tcp:", "tcp6:")) and "backlog=" not in listen:
        description += f":backlog={BACKLOG}"
    server_endpoint(reactor, "listen", listen)  # the error names what the person typed
    endpoint = server_endpoint(reactor, "listen", description)
    factory = FileServerFactory(path, crlf if crlf_lines else None, max_connections, reactor,
                                timeout)
    return Listener(name, endpoint, factory, factory.connections)


#: The serving options of dockpart-socat and the writer's ``--serve dockpart``.
SERVER_OPTIONS = [
    ["max-connections", None, DEFAULT_MAX_CONNECTIONS,
     "Simultaneous connections at most; more wait in the listen queue.", int],
    ["timeout", "T", DEFAULT_TIMEOUT,
     "Seconds a client may take nothing before it is cut off (socat's -T).", float],
]


def check_options(config: usage.Options) -> None:
    """What the writer and dockpart-socat check alike: --max-connections, --timeout, --listen."""
    if config["max-connections"] < 1:
        raise usage.UsageError("--max-connections must be at least 1")
    if not config["timeout"] > 0:
        raise usage.UsageError("--timeout must be a positive number of seconds")
    from twisted.internet import reactor
    server_endpoint(reactor, "listen", config["listen"])  # a usage error here, not a traceback


class Options(usage.Options):
    synopsis = (f"[--listen {DEFAULT_LISTEN}] [--file random] [--crlf] [--max-connections N] "
                f"[--timeout {DEFAULT_TIMEOUT:g}]")
    longdesc = ("Serve a file's bytes to every TCP connection, then close it; like "
                "`socat TCP-LISTEN:7000,fork,reuseaddr,crlf OPEN:random,rdonly` in one process.")
    optFlags = [
        ["crlf", None, "Turn each LF into CRLF on the way out, as socat's crlf option does."],
    ]
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN, "Endpoint to listen on (loopback unless told otherwise)."],
        ["file", "f", "random", "The file to serve; opened afresh for each connection."],
        *SERVER_OPTIONS,
    ]

    def postOptions(self):
        check_options(self)


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    return file_listener("dockpart-socat", reactor, config["listen"], config["file"],
                         config["crlf"], config["max-connections"], config["timeout"])
