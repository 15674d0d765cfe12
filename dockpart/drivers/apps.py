"""The drivers run an app's instances the way they run dockpart-web's, from the app's record.

The same drivers, told what to run: the process driver runs the app's ``command`` with
``/bin/sh`` in a session of its own, the docker driver runs the app's ``image`` on the host
network; either way the instance's port is in ``PORT``.  Each app's instances are marked as
that app's (a state directory of its own; a tier label of its own), so one app's driver never
lists, adopts or removes another's, nor the seed's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dockpart.apps import App
from dockpart.drivers import DriverError
from dockpart.drivers.process import ProcessDriver

#: Runs the app's command in a new session (signals to the infra's group spare it).
APP_LAUNCHER = "import os, sys; os.setsid(); os.execv('/bin/sh', ['/bin/sh', '-c', sys.argv[1]])"


class AppProcessDriver(ProcessDriver):
    """``--driver process`` for one app: ``sh -c COMMAND`` with ``PORT`` set."""

    def __init__(self, app: App, pool, state_dir: str, stop_timeout: float, reactor):
        super().__init__(pool, str(Path(state_dir) / "apps" / app.name), "", "127.0.0.1", 0,
                         stop_timeout, reactor)
        self.app = app

    def describe(self, port: int) -> str:
        return f"process of app {self.app.name} on port {port}"

    def launch(self, port: int) -> tuple[list[str], dict[str, str]]:
        if not self.app.command:
            raise DriverError(f"app {self.app.name} has no --command (the process driver runs "
                              f"commands; --image needs --driver docker)")
        return [sys.executable, "-c", APP_LAUNCHER, self.app.command], {"PORT": str(port)}


def app_driver(app: App, config, pool, reactor):
    """The driver ``--driver`` names, for ``app``."""
    if config["driver"] == "process":
        return AppProcessDriver(app, pool, config["state-dir"], config["stop-timeout"], reactor)
    from dockpart.drivers.docker_apps import AppDockerDriver
    return AppDockerDriver(app, pool, str(config["redis"]), config["stop-timeout"])
