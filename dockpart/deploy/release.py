"""Releases and each slice's history, kept as JSON in the deploy directory's ``run/``."""

import fcntl
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from dockpart.deploy.repos import DeployConfig, DeployDir, DeployError


@dataclass
class Release:
    """One image built from one commit for one slice."""

    slice: str
    commit: str
    image: str  # registry/app:slice-short
    deployed_at: float = 0.0

    @property
    def tag(self) -> str:
        return self.image.rsplit(":", 1)[1]

    @property
    def short(self) -> str:
        return self.commit[:7]

    @classmethod
    def new(cls, config: DeployConfig, slice_name: str, commit: str) -> "Release":
        return cls(slice_name, commit, f"{config.repository()}:{slice_name}-{commit[:7]}")

    def since(self) -> str:
        return datetime.fromtimestamp(self.deployed_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class History:
    """A slice's releases, newest first; the first one is what the slice runs."""

    def __init__(self, deploy_dir: DeployDir, slice_name: str):
        self.path = deploy_dir.run / f"{slice_name}.json"
        self.slice = slice_name

    def releases(self) -> list[Release]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [Release(**item) for item in data["releases"]]

    def current(self) -> Release | None:
        releases = self.releases()
        return releases[0] if releases else None

    def record(self, release: Release, keep: int) -> list[Release]:
        """Put ``release`` first (once); return the releases that fell off the end."""
        release.deployed_at = time.time()
        others = [r for r in self.releases() if r.tag != release.tag]
        releases = [release, *others]
        kept, dropped = releases[:keep], releases[keep:]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"releases": [asdict(r) for r in kept]}, indent=2) + "\n")
        tmp.replace(self.path)
        return dropped

    def find(self, name: str | None) -> Release:
        """The named release (tag or commit prefix), or the one before the current one."""
        releases = self.releases()
        if name is None:
            if len(releases) < 2:
                raise DeployError(f"{self.slice} has no previous release to roll back to")
            return releases[1]
        for release in releases:
            if name in (release.tag, release.image) or (len(name) >= 4 and release.commit.startswith(name)):
                return release
        known = ", ".join(r.tag for r in releases) or "none"
        raise DeployError(f"{self.slice} has no release {name!r} (kept: {known})")


@contextmanager
def slice_lock(deploy_dir: DeployDir, slice_name: str, say=print):
    """One deployment per slice at a time; a second push waits for the first."""
    deploy_dir.run.mkdir(exist_ok=True)
    with open(deploy_dir.run / f"{slice_name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another deployment of {slice_name} is running; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield

