"""``--driver swarm``: each instance is a Docker Swarm service of its own, on the host network.

One service per instance (``dockpart-web-<port>``, one replica), not one service scaled to N:
scaling a service down lets Swarm pick the task that dies, which would defeat drain-before-remove;
with one service per port, ``/destroy`` drains exactly the instance it named.  Services carry
the labels of :mod:`dockpart.drivers.engine`, the Docker driver's environment and instance
arguments (this driver is a :class:`~dockpart.drivers.docker.DockerDriver` with another way to
run and find instances) and a Swarm restart policy.  ``MaxReplicas=1`` keeps two tasks of one port off one node.

The address: a task runs on whichever node Swarm picks, so the URL where it answers is known
only once it is placed: ``http://<node address>:<port>``.  :meth:`SwarmDriver.start` waits for
that and returns it; :meth:`SwarmDriver.instances` reports it (``Instance.url``) for each
running instance.  The worker probes and registers that URL (docs/swarm.md, "Addresses").
"""

from docker.errors import APIError, ImageNotFound, NotFound
from docker.types import RestartPolicy, ServiceMode
from twisted.internet import defer
from twisted.internet.task import deferLater

from dockpart.drivers import DriverError, Instance, Status, Unavailable, instance_name
from dockpart.drivers.docker import DockerDriver
from dockpart.drivers.engine import LABEL_MANAGED, LABEL_PORT, LABEL_TIER, label_filter, labels
from dockpart.tier import instance_url

#: Task states in which the container exists on its node (Swarm says "running" only once
#: the image's HEALTHCHECK passed; our own health gate decides before that).
UP_STATES = ("starting", "running")
#: States a task ends in; a task in none of them may still hold its port.
DONE_STATES = ("complete", "shutdown", "failed", "rejected", "orphaned", "remove")
#: Seconds between looks at a task being placed or stopped.
POLL = 0.1


def node_address(node: dict) -> str:
    """Where a node's instances answer: ``Status.Addr``, or the host part of the manager
    address when that reads 0.0.0.0 or 127.0.0.1 or is empty (as it can on a manager)."""
    addr = (node.get("Status") or {}).get("Addr") or ""
    manager = (node.get("ManagerStatus") or {}).get("Addr") or ""
    if addr in ("", "0.0.0.0", "127.0.0.1") and manager:
        addr = manager.rpartition(":")[0]
    return addr


def _thd_service(client, tier: str, port: int):
    """Our service on ``port``, None if there is none; DriverError if the name is not ours."""
    try:
        service = client.services.get(instance_name(port))
    except NotFound:
        return None
    labels = service.attrs["Spec"].get("Labels") or {}
    if labels.get(LABEL_MANAGED) != "true":
        raise DriverError(f"a service named {service.name} exists that dockpart does not "
                          f"manage (no {LABEL_MANAGED}=true label); leaving it alone")
    if labels.get(LABEL_TIER) != tier:
        raise DriverError(f"the service {service.name} belongs to the dockpart tier of "
                          f"{labels.get(LABEL_TIER)}, not {tier}; leaving it alone")
    return service


def _thd_addresses(client) -> dict[str, str]:
    return {node.id: node_address(node.attrs) for node in client.nodes.list()}


def _placed(tasks: list[dict], addresses: dict[str, str], port: int) -> str | None:
    """The URL of the task that is up among ``tasks``, if one is."""
    for task in tasks:
        if task["Status"]["State"] in UP_STATES and addresses.get(task.get("NodeID", "")):
            return instance_url(addresses[task["NodeID"]], port)
    return None


def _thd_instances(client, tier: str) -> dict[int, Instance]:
    """Per port: the URL where its task is up; without one, restarting while Swarm (re)starts
    its task (restart policy "any": a task that exited comes back by itself), or exited once
    a destroy scaled it to 0.  ``state`` is the newest task's, ``node`` its node's address."""
    services = client.services.list(filters={"label": label_filter(tier)})
    if not services:
        return {}
    tasks: dict[str, list] = {}
    for task in client.api.tasks(filters={"desired-state": "running"}):
        tasks.setdefault(task["ServiceID"], []).append(task)
    addresses = _thd_addresses(client)
    found = {}
    for service in services:
        port = (service.attrs["Spec"].get("Labels") or {}).get(LABEL_PORT, "")
        if port.isdigit():
            own = tasks.get(service.id, [])
            url = _placed(own, addresses, int(port))
            newest = max(own, key=lambda t: t.get("UpdatedAt", ""), default=None)
            replicas = service.attrs["Spec"]["Mode"].get("Replicated", {}).get("Replicas", 0)
            status = (Status.RUNNING if url is not None
                      else Status.RESTARTING if replicas else Status.EXITED)
            found[int(port)] = Instance(
                int(port), status, url, newest["Status"]["State"] if newest else "no task",
                service.short_id, addresses.get(newest.get("NodeID", "")) if newest else None)
    return found


def _thd_full_nodes(client, tier: str, most: int) -> list[str]:
    """Nodes that run (or were given) ``most`` of this tier's instances already."""
    ours = {s.id for s in client.services.list(filters={"label": f"{LABEL_TIER}={tier}"})}
    count: dict[str, int] = {}
    for task in client.api.tasks(filters={"desired-state": "running"}):
        if task["ServiceID"] in ours and task.get("NodeID"):
            count[task["NodeID"]] = count.get(task["NodeID"], 0) + 1
    return [node for node, n in count.items() if n >= most]


def _thd_pinned(client, image: str) -> str:
    """``image`` as a reference every task resolves the same way, without a registry lookup
    when the node has it: its registry digest once pushed, else the local image ID (which only
    this engine has: a one-node swarm)."""
    try:
        found = client.images.get(image)
    except ImageNotFound:
        raise DriverError(f"no image {image} on this engine") from None
    repo = image.rpartition(":")[0] if ":" in image.rpartition("/")[2] else image
    for digest in found.attrs.get("RepoDigests") or []:
        if digest.partition("@")[0] == repo:
            return digest
    return found.id


def _thd_create(client, tier: str, port: int, image: str, environment: dict, args: list[str],
                constraints: list[str], stop_timeout: float) -> bool:
    """Create our service on ``port`` unless it exists; whether it was created."""
    if _thd_service(client, tier, port) is not None:
        return False
    client.services.create(
        image, args=args or None, name=instance_name(port),
        labels=labels(tier, port), container_labels=labels(tier, port),
        env=[f"{k}={v}" for k, v in {"start_port": str(port), **environment}.items()],
        networks=["host"], mode=ServiceMode("replicated", replicas=1),
        # Back after a crash or a failed health check, wherever Swarm finds room.
        restart_policy=RestartPolicy(condition="any", delay=1_000_000_000),
        constraints=constraints or None, maxreplicas=1,
        stop_grace_period=int(stop_timeout * 1e9))
    return True


def _thd_tasks(client, tier: str, port: int) -> list[dict] | None:
    service = _thd_service(client, tier, port)
    return None if service is None else service.tasks()


def _thd_placement(client, tier: str, port: int) -> tuple[str | None, str | None, str]:
    """(the node the task went to, the URL where it is up, the last task error) for ``port``."""
    tasks = _thd_tasks(client, tier, port)
    if tasks is None:
        raise DriverError(f"the service {instance_name(port)} went away while starting")
    tasks.sort(key=lambda t: t.get("CreatedAt", ""))
    error = next((t["Status"].get("Err") for t in reversed(tasks) if t["Status"].get("Err")), "")
    live = [t for t in tasks if t["DesiredState"] == "running"]
    node = next((t["NodeID"] for t in live if t.get("NodeID")), None)
    url = _placed(live, _thd_addresses(client), port) if node else None
    return node, url, error


def _thd_node(client, tier: str, port: int) -> str | None:
    return _thd_placement(client, tier, port)[0]


def _thd_url(client, tier: str, port: int) -> str | None:
    return _thd_placement(client, tier, port)[1]


def _thd_scale_down(client, tier: str, port: int) -> bool:
    """Ask our service on ``port`` to stop its task; whether one may still be running."""
    service = _thd_service(client, tier, port)
    if service is None:
        return False
    if service.attrs["Spec"]["Mode"].get("Replicated", {}).get("Replicas"):
        service.scale(0)
    return True


def _thd_stopped(client, tier: str, port: int) -> bool:
    tasks = _thd_tasks(client, tier, port)
    return tasks is None or all(t["Status"]["State"] in DONE_STATES for t in tasks)


def _thd_remove(client, tier: str, port: int) -> None:
    service = _thd_service(client, tier, port)
    if service is not None:
        try:
            service.remove()
        except NotFound:
            pass  # removed meanwhile


class SwarmDriver(DockerDriver):
    name = "swarm"

    def __init__(self, *args, constraints=(), max_per_node: int | None = None,
                 interface: str = "127.0.0.1", place_timeout: float = 30.0, reactor=None, **kw):
        super().__init__(*args, **kw)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.constraints = list(constraints)
        self.max_per_node = max_per_node
        self.interface = interface
        self.place_timeout = place_timeout
        self._place_lock = defer.DeferredLock()  # with --max-per-node (see start)

    def describe(self, port: int) -> str:
        return f"service {instance_name(port)}"

    def _call(self, f, *args) -> defer.Deferred:
        """As the Docker driver's, and a swarm that cannot answer now (no leader, not a
        manager yet: HTTP 503) is an outage to wait out, not a reason to give up."""
        def sorted_503(client, *a):
            try:
                return f(client, *a)
            except APIError as e:
                if e.status_code == 503:
                    raise Unavailable(f"Swarm: {e.explanation or e}") from None
                raise
        return super()._call(sorted_503, *args)

    async def instances(self) -> dict[int, Instance]:
        return await self._call(_thd_instances, self.tier)

    async def _wait(self, f, *args, timeout: float):
        """Poll ``f(client, *args)`` until it returns something true or ``timeout`` passes."""
        deadline = self.reactor.seconds() + timeout
        while True:
            value = await self._call(f, *args)
            if value or self.reactor.seconds() > deadline:
                return value
            await deferLater(self.reactor, POLL, lambda: None)

    async def start(self, port: int) -> str:  # type: ignore[override]  # more than DockerDriver says
        """Create the service unless it exists; the URL where its task is up, once placed."""
        image = await self._call(_thd_pinned, await self.ensure_image())
        args = [*self.instance_args, "--listen", f"tcp:{port}:interface={self.interface}"]
        if self.max_per_node is None:
            await self._create(port, image, args, list(self.constraints))
        else:
            # --max-per-node counts the tasks already given a node: one placement at a time, and
            # the next counts only once this one's node is known (a moment, or place_timeout
            # for a task no node can take: without the limit, no spawn waits for another).
            async with self._place_lock:
                full = await self._call(_thd_full_nodes, self.tier, self.max_per_node)
                await self._create(port, image, args,
                                   [*self.constraints, *(f"node.id!={node}" for node in full)])
                await self._wait(_thd_node, self.tier, port, timeout=self.place_timeout)
        url = await self._wait(_thd_url, self.tier, port, timeout=self.place_timeout)
        if url is None:
            _, _, error = await self._call(_thd_placement, self.tier, port)
            raise DriverError(f"{self.describe(port)} was not placed and started within "
                              f"{self.place_timeout:g} s" + (f" (Swarm: {error})" if error else ""))
        self.log.info("{what} runs at {url}", what=self.describe(port), url=url)
        return url

    async def _create(self, port: int, image: str, args: list[str],
                      constraints: list[str]) -> None:
        if await self._call(_thd_create, self.tier, port, image, self.environment, args,
                            constraints, self.stop_timeout):
            self.log.info("created {what} from {image}", what=self.describe(port), image=image)

    async def remove(self, port: int) -> None:
        """Scale to zero, wait until the task stopped (its port is free), remove the service."""
        if await self._call(_thd_scale_down, self.tier, port):
            await self._wait(_thd_stopped, self.tier, port, timeout=self.stop_timeout + 10)
        await self._call(_thd_remove, self.tier, port)
