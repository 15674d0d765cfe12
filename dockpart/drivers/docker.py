"""``--driver docker``: each instance is a container on the host network.

Containers are named ``dockpart-web-<port>`` and labelled as
:mod:`dockpart.drivers.engine` says: a container without our labels is never touched,
even one with our name, and one of another tier is left to that tier's infra.
The image is built once, if missing, from the web app's Dockerfile; ``rebuild``
instead does the seed's stop, rm, rmi, build (``--build-arg start_port=PORT``),
run for every spawn.  Every SDK call runs in the driver's own thread pool.
"""

import threading

import docker
import requests
from docker.errors import APIError, BuildError, DockerException, ImageNotFound, NotFound
from twisted.internet import defer
from twisted.logger import Logger

from dockpart.drivers import (DriverError, Instance, Status, ThreadPoolService, Unavailable,
                              instance_name)
from dockpart.drivers.engine import (LABEL_MANAGED, LABEL_PORT, LABEL_TIER,  # noqa: F401
                                     label_filter, labels)
#: Instances come back by themselves after a crash or an engine restart, not after a stop.
RESTART_POLICY = {"Name": "unless-stopped"}
#: Container states that count as running: the engine restarts it, or someone paused it.
#: Anything else (exited, dead, created and never started) is an instance that exited.
ALIVE = ("running", "restarting", "paused")


def _thd_container(client, tier: str, port: int):
    """Our container on ``port``, None if there is none; DriverError if the name is not ours."""
    try:
        container = client.containers.get(instance_name(port))
    except NotFound:
        return None
    if container.labels.get(LABEL_MANAGED) != "true":
        raise DriverError(f"a container named {container.name} exists that dockpart does not "
                          f"manage (no {LABEL_MANAGED}=true label); leaving it alone")
    if container.labels.get(LABEL_TIER) != tier:
        raise DriverError(f"the container {container.name} belongs to the dockpart tier of "
                          f"{container.labels.get(LABEL_TIER)}, not {tier}; leaving it alone")
    return container


def _thd_instances(client, tier: str) -> dict[int, Instance]:
    found = {}
    for c in client.containers.list(all=True, sparse=True, filters={"label": label_filter(tier)}):
        port = (c.attrs.get("Labels") or {}).get(LABEL_PORT, "")  # sparse: no inspect
        if port.isdigit():
            status = Status.RUNNING if c.status in ALIVE else Status.EXITED
            found[int(port)] = Instance(int(port), status, state=c.status, id=c.short_id)
    return found


def _thd_remove(client, tier: str, port: int, stop_timeout: float,
                image: str | None = None) -> None:
    container = _thd_container(client, tier, port)
    if container is not None:
        if container.status in ("running", "restarting"):
            container.stop(timeout=int(stop_timeout))
        container.remove(force=True)
    if image is not None:
        try:
            client.images.remove(image)
        except ImageNotFound:
            pass


def _thd_build(client, image: str, context: str, dockerfile: str, build_args: dict) -> None:
    client.images.build(path=context, dockerfile=dockerfile, tag=image, buildargs=build_args,
                        network_mode="host", rm=True, forcerm=True)


def _thd_ensure_image(client, image: str, *build) -> bool:
    """Build ``image`` if it is missing; whether it had to be built."""
    try:
        client.images.get(image)
        return False
    except ImageNotFound:
        _thd_build(client, image, *build)
        return True


def _thd_run(client, tier: str, port: int, image: str, environment: dict,
             args: list[str]) -> bool:
    """Run our container on ``port`` unless it runs already; whether it was started."""
    container = _thd_container(client, tier, port)
    if container is not None:
        if container.status == "running":
            return False
        container.remove(force=True)  # exited or dead: start afresh
    client.containers.run(
        image, args or None, name=instance_name(port), detach=True, network_mode="host",
        labels=labels(tier, port),
        environment={"start_port": str(port), **environment},
        restart_policy=RESTART_POLICY)
    return True


class DockerDriver:
    name = "docker"
    log = Logger()

    def __init__(self, pool: ThreadPoolService, image: str, context: str, dockerfile: str,
                 build_args: dict, redis_url: str, tier: str, rebuild: bool = False,
                 stop_timeout: float = 5.0, client_factory=None, instance_args=()):
        self.pool = pool
        self.image = image
        self.build = (context, dockerfile, build_args)
        self.environment = {"DOCKPART_REDIS": redis_url}
        # dockpart-web options after the image name (its entrypoint), e.g. --first-port.
        self.instance_args = list(instance_args)
        self.tier = tier
        self.rebuild = rebuild
        self.stop_timeout = stop_timeout
        self.client_factory = client_factory or (lambda: docker.from_env(timeout=60))
        self._client = None
        self._client_lock = threading.Lock()
        self._build_lock = defer.DeferredLock()

    def describe(self, port: int) -> str:
        return f"container {instance_name(port)}"

    def _thd_client(self):
        with self._client_lock:
            if self._client is None:
                self._client = self.client_factory()  # asks the engine for its API version
            return self._client

    def _call(self, f, *args) -> defer.Deferred:
        """``f(client, *args)`` in the pool, its errors sorted into retry or give up."""
        def thd():
            try:
                return f(self._thd_client(), *args)
            except (APIError, BuildError) as e:
                raise DriverError(str(e)) from None
            except (DockerException, requests.exceptions.RequestException) as e:
                raise Unavailable(f"Docker: {e}") from None
        return self.pool.run(thd)

    def _port_image(self, port: int) -> str:
        """``--rebuild``: the seed's image per instance, built for its port."""
        return f"{instance_name(port)}:latest"

    async def ensure_image(self) -> str:
        """``--image``, built first if it is missing (the swarm driver's too)."""
        async with self._build_lock:  # one build, however many spawns wait for it
            if await self._call(_thd_ensure_image, self.image, *self.build):
                self.log.info("built the image {image}", image=self.image)
        return self.image

    async def instances(self) -> dict[int, Instance]:
        return await self._call(_thd_instances, self.tier)

    async def start(self, port: int) -> None:
        found = (await self.instances()).get(port)
        if found is not None and found.running:
            return  # already runs: adopt it
        if self.rebuild:
            image = self._port_image(port)
            await self._call(_thd_remove, self.tier, port, self.stop_timeout, image)
            context, dockerfile, build_args = self.build
            await self._call(_thd_build, image, context, dockerfile,
                             {**build_args, "start_port": str(port)})
        else:
            image = await self.ensure_image()
        # Instances answer on loopback only, as the process driver's do; the proxy faces users.
        args = [*self.instance_args, "--listen", f"tcp:{port}:interface=127.0.0.1"]
        if await self._call(_thd_run, self.tier, port, image, self.environment, args):
            self.log.info("started {what} from {image}", what=self.describe(port), image=image)

    async def remove(self, port: int) -> None:
        image = self._port_image(port) if self.rebuild else None
        await self._call(_thd_remove, self.tier, port, self.stop_timeout, image)
