"""dockpart-forward: a slice port that sends each new connection to the slice's current container.

The deploy hook starts the new release's container on a port of its own, checks its health,
then rewrites the target file (an atomic rename): connections accepted from then on go to
the new container while those already open finish on the old one, which is stopped only
after a short drain.  No connection is refused at any moment, because the slice port never
closes.  Run by the hook (:mod:`dockpart.deploy.supervise`) as ``twistd --pidfile=...
dockpart-forward --listen tcp:50100:interface=127.0.0.1 --target-file DIR/run/green.target``;
reading the target per connection costs a small file read and needs no other channel.
"""

import errno
from pathlib import Path

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols import portforward
from twisted.python import usage

from dockpart.listening import Listener, server_endpoint

#: Seconds a port in use is tried again: a TIME_WAIT socket holds it for up to a minute.
DEFAULT_BIND_TIMEOUT = 60.0


class Options(usage.Options):
    optParameters = [
        ["listen", None, None, "Endpoint of the slice port, e.g. tcp:50100:interface=127.0.0.1."],
        ["target-file", None, None, "File holding HOST:PORT of the current container."],
        ["bind-timeout", None, DEFAULT_BIND_TIMEOUT,
         "Seconds to keep trying a port that is in use before giving up (0: at once).", float],
    ]

    def postOptions(self) -> None:
        if not self["listen"]:
            raise usage.UsageError("--listen is required (e.g. tcp:50100)")
        from twisted.internet import reactor
        server_endpoint(reactor, "listen", self["listen"])  # a bad one is a usage error, here
        if not self["target-file"]:
            raise usage.UsageError("--target-file is required")
        if self["bind-timeout"] < 0:
            raise usage.UsageError("--bind-timeout cannot be negative")


def read_target(path: Path) -> tuple[str, int]:
    """HOST:PORT from the target file."""
    host, _, port = path.read_text().strip().rpartition(":")
    return host, int(port)


class _ForwardClientFactory(portforward.ProxyClientFactory):
    noisy = False  # no two log lines per connection


class _ForwardServer(portforward.ProxyServer):
    clientProtocolFactory = _ForwardClientFactory
    factory: "ForwardFactory"

    def connectionMade(self):
        try:
            host, port = read_target(self.factory.target_file)
        except (OSError, ValueError) as e:
            self.factory.log.warn("no target for a new connection: {error}", error=e)
            self.transport.loseConnection()
            return
        # As portforward.ProxyServer: hold the client's bytes until the target answers.
        self.transport.pauseProducing()
        client = self.clientProtocolFactory()
        client.setServer(self)
        self.factory.reactor.connectTCP(host, port, client, timeout=5)


class ForwardFactory(portforward.ProxyFactory):
    protocol = _ForwardServer
    log = Logger()
    noisy = False

    def __init__(self, target_file: Path, reactor):
        self.target_file = target_file
        self.reactor = reactor


def _in_use(e: CannotListenError) -> bool:
    return getattr(e.socketError, "errno", None) == errno.EADDRINUSE


class RetryingListener(Listener):
    """A :class:`Listener` that tries a port in use again, every ``interval``, for a while.

    The slice ports (50100, 50101) lie in Linux's ephemeral range, so after heavy outgoing
    traffic a TIME_WAIT socket can hold one for up to a minute (``deploy init`` as root
    reserves them).  Any other bind error, or a port still in use after ``bind_timeout``
    seconds, stops the daemon with the reason.
    """

    interval = 0.5

    def __init__(self, name: str, endpoint, factory, bind_timeout: float, reactor):
        super().__init__(name, endpoint, factory)
        self.bind_timeout = bind_timeout
        self.reactor = reactor
        self.busy: CannotListenError | None = None
        self._retry = None
        self._deadline = 0.0

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            if not _in_use(e) or self.bind_timeout <= 0:
                raise
            self.busy = e
            self.log.warn("{name}: port {port} is in use (a TIME_WAIT connection after heavy "
                          "outgoing traffic, or another listener); trying again for up to "
                          "{timeout:g} s", name=self.name, port=e.port, timeout=self.bind_timeout)

    def startService(self) -> None:
        super().startService()
        if self.busy is not None:
            self._deadline = self.reactor.seconds() + self.bind_timeout
            self._retry = self.reactor.callLater(self.interval, self._try_again)

    def _try_again(self) -> None:
        self._retry = None
        try:
            Listener.privilegedStartService(self)
        except CannotListenError as e:
            if _in_use(e) and self.reactor.seconds() < self._deadline:
                self._retry = self.reactor.callLater(self.interval, self._try_again)
                return
            self.log.error("{name} gave up: port {port} still cannot be bound after {timeout:g} s "
                           "({error}); see who holds it with: ss -tanp 'sport = :{port}'",
                           name=self.name, port=e.port, timeout=self.bind_timeout,
                           error=e.socketError)
            self.reactor.stop()
        else:
            self.busy = None

    def stopService(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        return super().stopService()


def makeService(config, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    factory = ForwardFactory(Path(config["target-file"]), reactor)
    RetryingListener("dockpart-forward", server_endpoint(reactor, "listen", config["listen"]),
                     factory, config["bind-timeout"], reactor).setServiceParent(top)
    return top
