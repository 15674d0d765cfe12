"""``--driver docker`` for one app: its ``image`` on the host network, ``PORT`` set.

Its containers carry the tier label ``<Redis> app NAME``, so the app's driver lists and
removes only the app's own; the image is never built here (``git push`` releases build it).
"""

from docker.errors import ImageNotFound

from dockpart.apps import App
from dockpart.drivers import DriverError
from dockpart.drivers.docker import DockerDriver, _thd_run


def _thd_has_image(client, image: str) -> bool:
    try:
        client.images.get(image)
        return True
    except ImageNotFound:
        return False


class AppDockerDriver(DockerDriver):
    def __init__(self, app: App, pool, tier: str, stop_timeout: float, client_factory=None):
        super().__init__(pool, app.image, ".", "", {}, "", f"{tier} app {app.name}",
                         stop_timeout=stop_timeout, client_factory=client_factory)
        self.app = app
        self.environment = {}

    def describe(self, port: int) -> str:
        return f"container of app {self.app.name} on port {port}"

    async def start(self, port: int) -> None:
        found = (await self.instances()).get(port)
        if found is not None and found.running:
            return  # already runs: adopt it
        if not self.app.image:
            raise DriverError(f"app {self.app.name} has no --image (the docker driver runs "
                              f"images; --command needs --driver process)")
        if not await self._call(_thd_has_image, self.app.image):
            raise DriverError(f"image {self.app.image} of app {self.app.name} is not on this engine")
        if await self._call(_thd_run, self.tier, port, self.app.image, {"PORT": str(port)}, []):
            self.log.info("started {what} from {image}", what=self.describe(port),
                          image=self.app.image)
