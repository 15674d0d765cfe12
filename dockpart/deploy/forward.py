"""dockpart-forward: a slice port that sends each new connection to the slice's current container.

The deploy hook starts the new release's container on a port of its own, checks its health,
then rewrites the target file (an atomic rename): connections accepted from then on go to
the new container while those already open finish on the old one, which is stopped only
after a short drain.  No connection is refused at any moment, because the slice port never
closes.  Run by the hook as ``twistd --pidfile=... dockpart-forward --listen tcp:50100
--target-file DIR/run/green.target``; reading the target per connection costs a small
file read and needs no other channel.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols import portforward
from twisted.python import usage

from dockpart.deploy.repos import DeployConfig, DeployDir, DeployError
from dockpart.listening import Listener


class Options(usage.Options):
    optParameters = [
        ["listen", None, None, "Endpoint of the slice port, e.g. tcp:50100:interface=127.0.0.1."],
        ["target-file", None, None, "File holding HOST:PORT of the current container."],
    ]

    def postOptions(self) -> None:
        if not self["listen"]:
            raise usage.UsageError("--listen is required (e.g. tcp:50100)")
        if not self["target-file"]:
            raise usage.UsageError("--target-file is required")


def read_target(path: Path) -> tuple[str, int]:
    """HOST:PORT from the target file."""
    host, _, port = path.read_text().strip().rpartition(":")
    return host, int(port)


class _ForwardClientFactory(portforward.ProxyClientFactory):
    noisy = False  # no two log lines per connection


class _ForwardServer(portforward.ProxyServer):
    clientProtocolFactory = _ForwardClientFactory

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


def makeService(config, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    factory = ForwardFactory(Path(config["target-file"]), reactor)
    Listener("dockpart-forward", serverFromString(reactor, config["listen"]),
             factory).setServiceParent(top)
    return top


# ---- used by the hook: keep a slice's forwarder running and point it somewhere ----

def _paths(deploy_dir: DeployDir, slice_name: str) -> tuple[Path, Path, Path]:
    run = deploy_dir.run
    return run / f"{slice_name}.target", run / f"{slice_name}-forward.pid", run / f"{slice_name}-forward.log"


def forwarder_pid(deploy_dir: DeployDir, slice_name: str) -> int | None:
    """The pid of the slice's running forwarder, or None."""
    pidfile = _paths(deploy_dir, slice_name)[1]
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"dockpart-forward" in cmdline else None


def set_target(deploy_dir: DeployDir, slice_name: str, host: str, port: int) -> None:
    """Send the slice's new connections to HOST:PORT from now on (atomic)."""
    target = _paths(deploy_dir, slice_name)[0]
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(f"{host}:{port}\n")
    tmp.replace(target)


def current_target(deploy_dir: DeployDir, slice_name: str) -> tuple[str, int] | None:
    try:
        return read_target(_paths(deploy_dir, slice_name)[0])
    except (OSError, ValueError):
        return None


def ensure_forwarder(deploy_dir: DeployDir, config: DeployConfig, slice_name: str,
                     say=print, timeout: float = 15.0) -> int:
    """Start the slice's forwarder unless it runs; return its pid."""
    pid = forwarder_pid(deploy_dir, slice_name)
    if pid:
        return pid
    target, pidfile, logfile = _paths(deploy_dir, slice_name)
    port = config.ports[slice_name]
    say(f"starting the forwarder of {slice_name} on {config.host}:{port}")
    # Not our running forwarder: a stale pid file (its pid may even be a zombie) would stop twistd.
    pidfile.unlink(missing_ok=True)
    twistd = Path(sys.executable).parent / "twistd"
    # twistd without -n daemonizes and points its stdio at /dev/null, so a git push does not
    # wait for it; its first process exits once the port is bound, or with the reason.
    started = subprocess.run(
        [str(twistd), f"--pidfile={pidfile}", f"--logfile={logfile}", "dockpart-forward",
         "--listen", f"tcp:{port}:interface={config.host}", "--target-file", str(target)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=deploy_dir.run,
        timeout=timeout)
    deadline = time.monotonic() + timeout
    while started.returncode == 0 and time.monotonic() < deadline:
        pid = forwarder_pid(deploy_dir, slice_name)
        if pid and _port_open(config.host, port):
            return pid
        time.sleep(0.05)
    reason = started.stderr.strip() if started.returncode else _log_tail(logfile, 5)
    raise DeployError(f"the forwarder of {slice_name} did not start on port {port} "
                      f"(log: {logfile}):\n{reason}")


def stop_forwarder(deploy_dir: DeployDir, slice_name: str, timeout: float = 10.0) -> bool:
    """Stop the slice's forwarder; False if none ran."""
    pid = forwarder_pid(deploy_dir, slice_name)
    if not pid:
        return False
    os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    return True


def _port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
