"""``--driver docker`` for one app: its ``image`` on the host network, ``PORT`` set.

Its containers carry the tier label ``<Redis> app NAME``, so the app's driver lists and
removes only the app's own; the image is never built here (``git push`` releases build it,
push it to the registry and name it by digest: one the engine lacks is pulled).
"""

from docker.errors import DockerException, ImageNotFound

from dockpart.app_logs import ContainerLogTail
from dockpart.apps import App
from dockpart.drivers import DriverError
from dockpart.drivers.apps import ReleasePlan
from dockpart.drivers.docker import DockerDriver, _thd_run
from dockpart.drivers.engine import LABEL_PORT, label_filter


def _thd_has_image(client, image: str) -> bool:
    """Whether the engine has ``image``, pulling one named by digest (a release's)."""
    try:
        client.images.get(image)
        return True
    except ImageNotFound:
        if "@" not in image:
            return False
    try:
        client.images.pull(image)
        return True
    except DockerException:
        return False


class AppDockerDriver(ReleasePlan, DockerDriver):
    what = "container"

    def __init__(self, app: App, pool, tier: str, stop_timeout: float, client_factory=None):
        super().__init__(pool, app.image, ".", "", {}, "", f"{tier} app {app.name}",
                         stop_timeout=stop_timeout, client_factory=client_factory)
        self.app = app
        self.releases = {}
        self.logs = ContainerLogTail(app.name, self, label_filter(self.tier), LABEL_PORT)

    async def start(self, port: int) -> None:
        found = (await self.instances()).get(port)
        if found is not None and found.running:
            return  # already runs: adopt it
        release = self.release_for(port)
        image = release.image if release else self.app.image
        if not image:
            raise DriverError(f"app {self.app.name} has no --image and no release with a "
                              f"Dockerfile (the docker driver runs images; a command needs "
                              f"--driver process)")
        if not await self._call(_thd_has_image, image):
            raise DriverError(f"image {image} of app {self.app.name} is not on this engine")
        if await self._call(_thd_run, self.tier, port, image, self.release_env(port), []):
            self.log.info("started {what} from {image}", what=self.describe(port), image=image)
