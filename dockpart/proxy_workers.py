"""dockpart-proxy on every core: a port several processes share, and the parent that runs them.

Every proxy process listens on its own socket with ``SO_REUSEPORT``, so the kernel spreads
new connections over all of them.  With ``--workers N`` the parent does not serve: it starts
N ``twistd dockpart-proxy`` workers (one reactor each, own backend pools), restarts one
that dies (with a backoff), stops them all on SIGTERM (each finishes its requests in
flight), and answers the admin listener with the sum over its workers, asked over each
worker's own admin socket.  The same shared port lets a new proxy start listening before the
old one stops: a restart refuses no one.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from dockpart.listening import check_bind, tcp_address

#: The file descriptor a worker writes READY to once it listens (a pipe its parent reads).
READY_FD = 3
READY = b"ready\n"


def usable_cpus() -> int:
    """The CPUs this process may run on (``--workers auto``).  PyPy 3.9's ``os`` has no
    ``sched_getaffinity``: there, the machine's count."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    return len(getaffinity(0)) if getaffinity is not None else os.cpu_count() or 1


def die_with_parent(parent_pid: int) -> None:
    """A worker ends when its parent does, even when the parent is killed (SIGKILL).

    It also leaves the parent's process group: signals to the group (a terminal's Ctrl-C, a
    supervisor's kill) reach the parent, which passes one SIGTERM on to each worker.
    """
    os.setpgid(0, 0)
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


class ReadySignal(Service):
    """A worker's word to its parent that it listens: READY on ``fd``, then the pipe closed.

    Started after the listeners (added last to the worker's services, whose listeners bind in
    ``privilegedStartService``), so the word is true when it is said.
    """

    def __init__(self, fd: int):
        self.fd = fd

    def startService(self) -> None:
        super().startService()
        try:
            os.write(self.fd, READY)
        finally:
            os.close(self.fd)


class _Worker(protocol.ProcessProtocol):
    """One worker process: its log lines go into the parent's log, prefixed; its READY comes
    on its own pipe (:data:`READY_FD`)."""

    log = Logger()
    transport: IProcessTransport  # set by spawnProcess
    _stamp = re.compile(r"^\d{4}-\d\d-\d\dT\S+ ")

    def __init__(self, workers: "Workers", number: int):
        self.workers = workers
        self.number = number
        self.ready = False
        self.ended: defer.Deferred = defer.Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = self._stamp.sub("", raw.decode(errors="replace"))
            self.log.info("worker {number} (pid {pid}): {line}", number=self.number,
                          pid=self.transport.pid, line=line)

    errReceived = outReceived

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != READY_FD:
            return super().childDataReceived(childFD, data)
        if not self.ready and READY.strip() in data:
            self.ready = True
            self.workers.worker_ready(self)

    def processEnded(self, reason) -> None:
        self.workers.worker_ended(self, reason.value)
        self.ended.callback(None)


@implementer(IAgentEndpointFactory)
class _WorkerSockets:
    """An Agent's endpoints: ``http://worker-N/`` is worker N's admin UNIX socket."""

    def __init__(self, reactor, workers: "Workers"):
        self.reactor = reactor
        self.workers = workers

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self.reactor, self.workers.admin_socket(int(uri.host[7:])),
                                  timeout=5)


class Workers(Service):
    """Runs ``count`` worker processes of ``twistd dockpart-proxy ARGS``; restarts the dead."""

    log = Logger()

    def __init__(self, args: list[str], count: int, listen: str, shutdown_timeout: float,
                 admin: bool, reactor):
        self.args = args
        self.count = count
        self.listen = listen
        self.shutdown_timeout = shutdown_timeout
        self.admin = admin
        self.reactor = reactor
        self.running_workers: dict[int, _Worker] = {}
        self.failures = [0] * count
        # Seconds before restarting a worker that died: 0.2 at first, then longer, up to 30.
        self.delay = backoffPolicy(initialDelay=0.2, maxDelay=30.0)
        self.run_dir = ""  # made in startService
        self._restarts: dict[int, IDelayedCall] = {}
        self._announced = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        check_bind(*tcp_address(self.listen))  # a taken port stops twistd, with the reason

    def startService(self) -> None:
        super().startService()
        self.run_dir = tempfile.mkdtemp(prefix="dockpart-proxy-")
        for number in range(1, self.count + 1):
            self.spawn(number)

    def admin_socket(self, number: int) -> str:
        return os.path.join(self.run_dir, f"worker-{number}.sock")

    def spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile=-", "dockpart-proxy", *self.args,
                "--workers", "1", "--worker-of", str(os.getpid()), "--ready-fd", str(READY_FD)]
        if self.admin:
            path = self.admin_socket(number)
            if os.path.exists(path):
                os.unlink(path)  # left by a worker that died
            argv += ["--admin", f"unix:{path}"]
        worker = _Worker(self, number)
        self.reactor.spawnProcess(worker, sys.executable, argv, env=os.environ.copy(),
                                  childFDs={0: "w", 1: "r", 2: "r", READY_FD: "r"})
        self.running_workers[number] = worker

    def worker_ready(self, worker: _Worker) -> None:
        self.failures[worker.number - 1] = 0
        if not self._announced and all(w.ready for w in self.running_workers.values()) \
                and len(self.running_workers) == self.count:
            self._announced = True
            self.log.info("dockpart-proxy listening on {listen} with {count} workers",
                          listen=self.listen, count=self.count)

    def worker_ended(self, worker: _Worker, why) -> None:
        number = worker.number
        if self.running_workers.get(number) is worker:
            del self.running_workers[number]
        if not self.running:
            return
        delay = self.delay(self.failures[number - 1])
        self.failures[number - 1] += 1
        self.log.warn("worker {number} exited ({why}); restarting it in {delay:.1f} s",
                      number=number, why=why, delay=delay)
        self._restarts[number] = self.reactor.callLater(delay, self.spawn, number)

    def stopService(self):
        """SIGTERM to every worker (each finishes its requests in flight); SIGKILL if late."""
        super().stopService()
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        workers = list(self.running_workers.values())
        for worker in workers:
            try:
                worker.transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass

        def kill_late():
            for worker in workers:
                if not worker.ended.called:
                    self.log.warn("worker {number} still runs; killing it", number=worker.number)
                    try:
                        worker.transport.signalProcess("KILL")
                    except error.ProcessExitedAlready:
                        pass

        late = self.reactor.callLater(self.shutdown_timeout + 5.0, kill_late)

        def done(_):
            if late.active():
                late.cancel()
            shutil.rmtree(self.run_dir, ignore_errors=True)

        return defer.DeferredList([w.ended for w in workers]).addBoth(done)

    # The admin listener's figures: each worker's, and their sum.

    @defer.inlineCallbacks
    def ask(self, path: bytes):
        """``path`` from each worker's admin listener: {worker number: body}, failures left out."""
        agent = Agent.usingEndpointFactory(self.reactor, _WorkerSockets(self.reactor, self))
        numbers = sorted(self.running_workers)

        def get(number):
            url = b"http://worker-%d%s" % (number, path)
            return agent.request(b"GET", url).addCallback(readBody)

        results = yield defer.DeferredList([get(n) for n in numbers], consumeErrors=True)
        return {n: body for n, (ok, body) in zip(numbers, results) if ok}


def sum_status(statuses: dict[int, dict], pids: dict[int, int]) -> dict:
    """The workers' JSON statuses added up; per backend too; each worker's under "workers"."""
    total: dict[str, Any] = {"workers": [], "requests": 0, "responses": {}, "retries": 0, "tunnels": 0,
             "open_client_connections": 0, "client_connections": 0, "backends": []}
    by_url: dict[str, dict] = {}
    for number, status in sorted(statuses.items()):
        total["workers"].append({"worker": number, "pid": pids.get(number), **status})
        for name in ("requests", "retries", "tunnels", "open_client_connections",
                     "client_connections"):
            total[name] += status.get(name, 0)
        for code, count in status.get("responses", {}).items():
            total["responses"][code] = total["responses"].get(code, 0) + count
        for key in ("list_key", "balance", "redis_connected", "list_known"):
            total.setdefault(key, status.get(key))
        for backend in status.get("backends", []):
            into = by_url.setdefault(backend["url"], {"url": backend["url"], "healthy": False,
                                                      "requests": 0, "errors": 0, "active": 0,
                                                      "idle_connections": 0})
            into["healthy"] = into["healthy"] or backend.get("healthy", False)
            for name in ("requests", "errors", "active", "idle_connections"):
                into[name] += backend.get(name, 0)
    total["backends"] = list(by_url.values())
    return total


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (.*)$")


def merge_metrics(texts: dict[int, str]) -> str:
    """The workers' Prometheus texts as one, each sample labelled ``worker="N"``."""
    families: dict[str, list[str]] = {}
    for number, text in sorted(texts.items()):
        name = None
        for line in text.splitlines():
            if line.startswith("# "):
                name = line.split()[2]
                heads = families.setdefault(name, [])
                if line not in heads:
                    heads.append(line)
                continue
            match = _SAMPLE.match(line)
            if match and name is not None:
                sample, labels, value = match.groups()
                labels = f'worker="{number}"' + (f",{labels}" if labels else "")
                families[name].append(f"{sample}{{{labels}}} {value}")
    return "".join(line + "\n" for lines in families.values() for line in lines)


class WorkersAdmin(resource.Resource):
    """The parent's admin listener: ``/`` (JSON, summed) and ``/metrics`` (per worker)."""

    isLeaf = True

    def __init__(self, workers: Workers):
        super().__init__()
        self.workers = workers

    def render_GET(self, request):
        path = request.path.rstrip(b"/")
        if path not in (b"", b"/status", b"/metrics"):
            request.setResponseCode(404)
            return b"try / (JSON status) or /metrics\n"
        pids = {n: w.transport.pid for n, w in self.workers.running_workers.items()}

        def answer(bodies):
            if path == b"/metrics":
                request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
                body = merge_metrics({n: b.decode() for n, b in bodies.items()}).encode()
            else:
                request.setHeader(b"content-type", b"application/json")
                body = json.dumps(sum_status({n: json.loads(b) for n, b in bodies.items()}, pids),
                                  indent=2).encode() + b"\n"
            request.write(body)
            request.finish()

        self.workers.ask(b"/metrics" if path == b"/metrics" else b"/").addCallback(answer)
        return server.NOT_DONE_YET
