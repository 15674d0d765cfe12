"""Real parts for the deploy tests and benchmark: a registry, an app repository, a request loop."""

import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from helpers import ROOT, wait_for

EXAMPLE_APP = ROOT / "examples" / "app"
REGISTRY_BIN = "/usr/bin/docker-registry"


RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


@pytest.fixture
def reserved_ports_restored():
    """``deploy init`` as root reserves the slice ports machine-wide: put the setting back.

    A test module that runs ``deploy init`` uses it for all its tests:
    ``pytestmark = pytest.mark.usefixtures("reserved_ports_restored")``.
    """
    before = RESERVED_PORTS.read_text() if RESERVED_PORTS.exists() else None
    try:
        yield before
    finally:
        if before is not None and os.geteuid() == 0 and RESERVED_PORTS.read_text() != before:
            RESERVED_PORTS.write_text(before.strip() + "\n" if before.strip() else "\n")


class Registry:
    """Debian's docker-registry (the registry:2 distribution) on 127.0.0.1:PORT, temp storage."""

    def __init__(self, port: int = 5000):
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="dockpart-registry-"))
        self.proc = None

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> "Registry":
        assert Path(REGISTRY_BIN).exists(), "apt-get install docker-registry (scripts/lib.sh does)"
        assert not self._answers(), f"something already serves a registry on port {self.port}"
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: dockpart-tests\n")
        self.log = open(self.dir / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for(self._answers, 20, what=f"the registry on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class AppRepo:
    """A git repository of the example app with the deploy directory's slices as remotes."""

    def __init__(self, path: Path, deploy_dir: Path):
        self.path = path
        shutil.copytree(EXAMPLE_APP, path)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "tests@dockpart.invalid")
        self.git("config", "user.name", "dockpart tests")
        for slice_name in ("green", "blue"):
            self.git("remote", "add", slice_name, str(deploy_dir / f"{slice_name}.git"))

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.path, check=True, capture_output=True,
                              text=True, timeout=60).stdout.strip()

    def commit(self, version: str, broken: bool = False) -> str:
        """Commit VERSION = ``version`` (an app that exits at once if ``broken``); its sha."""
        (self.path / "VERSION").write_text(version + "\n")
        app = (EXAMPLE_APP / "app.py").read_text()
        if broken:
            app = 'raise SystemExit("deliberately broken: no app today")\n' + app
        (self.path / "app.py").write_text(app)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", f"version {version}")
        return self.git("rev-parse", "HEAD")

    def push(self, remote: str, refspec: str = "main") -> subprocess.CompletedProcess:
        """``git push REMOTE REFSPEC``; output is stdout and stderr together (git's remote: lines)."""
        return subprocess.run(["git", "push", remote, refspec], cwd=self.path, timeout=300,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


class RequestLoop:
    """GETs ``url`` on new connections, one after another, until stopped or a bound is hit."""

    def __init__(self, url: str, max_requests: int = 20000, max_seconds: float = 120.0,
                 pause: float = 0.005):
        self.url = url
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.pause = pause
        self.answers = Counter()
        self.failures = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline \
                and self.count < self.max_requests:
            try:
                self.answers[get(self.url).strip()] += 1
            except Exception as e:  # every kind of failure counts
                self.failures.append(repr(e))
            time.sleep(self.pause)

    @property
    def count(self) -> int:
        return sum(self.answers.values()) + len(self.failures)

    def __enter__(self) -> "RequestLoop":
        self._thread.start()
        wait_for(lambda: self.count >= 3, 10, what=f"the first answers from {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.3)  # a few requests after the change, too
        self._stop.set()
        self._thread.join(10)
