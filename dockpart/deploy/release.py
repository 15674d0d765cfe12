"""Releases and each slice's history, kept as JSON in the deploy directory's ``run/``."""

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from dockpart.deploy.repos import DeployConfig, DeployDir, DeployError
from dockpart.files import write_atomically


@dataclass
class Release:
    """One image built from one commit for one slice."""

    slice: str
    commit: str
    image: str  # registry/app:slice-short
    deployed_at: float = 0.0
    #: The manifest digest the registry gave at the push: a tag can be overwritten, this cannot.
    digest: str = ""

    @property
    def tag(self) -> str:
        return self.image.rsplit(":", 1)[1]

    @property
    def pinned(self) -> str:
        """registry/app@sha256:..., what a rollback pulls (the tag, for a release without one)."""
        return f"{self.image.rsplit(':', 1)[0]}@{self.digest}" if self.digest else self.image

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
        write_atomically(self.path, json.dumps({"releases": [asdict(r) for r in kept]}, indent=2) + "\n")
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
def slice_lock(deploy_dir: DeployDir, slice_name: str, say=print, doing: str = "a push"):
    """One deployment per slice at a time: a second push (or rollback) waits for the first."""
    deploy_dir.run.mkdir(exist_ok=True)
    with file_lock(deploy_dir.run / f"{slice_name}.lock", f"push to {slice_name}", say,
                   doing):
        yield


@contextmanager
def file_lock(path, what: str, say=print, doing: str = "a push"):
    # what: "push to green", as in "waiting for the push to green in progress"
    """Hold ``path``'s lock; a second holder waits for the first, saying whom it waits for.

    The holder writes what it does into the lock file, so the one waiting can say it.
    """
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            say(f"waiting for the {what} in progress" + (f" ({holder})" if holder else ""))
            fcntl.flock(f, fcntl.LOCK_EX)
            say(f"the previous {what} is done; going on")
        f.seek(0)
        f.truncate()
        f.write(f"{doing}, pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
