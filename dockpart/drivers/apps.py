"""The drivers run an app's instances the way they run dockpart-web's, from the app's record.

The same drivers, told what to run: the process driver runs the app's ``command`` with
``/bin/sh`` in a session of its own, the docker driver runs the app's ``image`` on the host
network; either way the instance's port is in ``PORT``.  Each app's instances are marked as
that app's (a state directory of its own; a tier label of its own), so one app's driver never
lists, adopts or removes another's, nor the seed's.

An app with releases (``git push``, :mod:`dockpart.releases`) runs, on each port, the release
infra asked that port for (:class:`ReleasePlan`, kept by :mod:`dockpart.rollover`): during a
roll-over the old release's instances and the new one's run side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dockpart.app_logs import LogTail
from dockpart.apps import App
from dockpart.drivers import DriverError
from dockpart.drivers.process import ProcessDriver
from dockpart.releases import Release

#: Runs the app's command in a new session (signals to the infra's group spare it).
APP_LAUNCHER = "import os, sys; os.setsid(); os.execv('/bin/sh', ['/bin/sh', '-c', sys.argv[1]])"


class ReleasePlan:
    """Which release each of an app's ports runs: ``releases`` by port, else ``live`` (the
    app's live release), else none (the app's own ``command`` or ``image``)."""

    app: App
    releases: dict[int, Release]
    live: Release | None = None
    known: dict[str, Release] = {}  # every release of the app, by id
    what = "instance"  # what one port runs, in log lines: a process, a container

    def describe(self, port: int) -> str:
        release = self.release_for(port)
        return (f"{self.what} of app {self.app.name}{' ' + release.id if release else ''} "
                f"on port {port}")

    def assign(self, port: int, release_id: str) -> None:
        """The spawn just asked for on ``port`` runs ``release_id``: say so before the
        worker takes it (the next plan would be too late)."""
        self.releases[port] = self.known[release_id]

    def release_for(self, port: int) -> Release | None:
        return self.releases.get(port, self.live)

    def release_env(self, port: int) -> dict[str, str]:
        release = self.release_for(port)
        return {**(release.env if release else {}), "PORT": str(port)}


class AppProcessDriver(ReleasePlan, ProcessDriver):
    """``--driver process`` for one app: ``sh -c COMMAND`` with ``PORT`` set, in the
    release's directory."""

    what = "process"

    def __init__(self, app: App, pool, state_dir: str, stop_timeout: float, reactor):
        super().__init__(pool, str(Path(state_dir) / "apps" / app.name), "", "127.0.0.1", 0,
                         stop_timeout, reactor)
        self.app = app
        self.releases = {}
        self.logs = LogTail(app.name, self.state_dir, pool)

    def workdir(self, port: int) -> Path:
        release = self.release_for(port)
        return Path(release.dir) if release and release.dir else self.state_dir

    def launch(self, port: int) -> tuple[list[str], dict[str, str]]:
        release = self.release_for(port)
        command = release.command if release else self.app.command
        if not command:
            raise DriverError(f"app {self.app.name} has no --command and no release with a "
                              f"Procfile (the process driver runs commands; an image needs "
                              f"--driver docker)")
        return [sys.executable, "-c", APP_LAUNCHER, command], self.release_env(port)


def app_driver(app: App, config, pool, reactor):
    """The driver ``--driver`` names, for ``app``."""
    if config["driver"] == "process":
        return AppProcessDriver(app, pool, config["state-dir"], config["stop-timeout"], reactor)
    from dockpart.drivers.docker_apps import AppDockerDriver
    return AppDockerDriver(app, pool, str(config["redis"]), config["stop-timeout"])
