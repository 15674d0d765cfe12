"""The deploy directory: its configuration, its two bare repositories and their hooks.

``dockpart deploy init DIR`` writes everything here and nothing else; running it again
with the same options changes nothing, and an option given again replaces only itself.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dockpart.files import write_atomically

SLICES = ("green", "blue")
CONFIG_NAME = "dockpart-deploy.json"
#: Branches that deploy when no branch is configured.
DEFAULT_BRANCHES = ("main", "master")
BASE_IMAGE_ENV = "DOCKPART_BASE_IMAGE"
#: Where Linux keeps ip_local_port_range and ip_local_reserved_ports.
SYSCTL_IPV4 = Path("/proc/sys/net/ipv4")


class DeployError(Exception):
    """A step failed; the message says why, for the person who pushed."""


@dataclass
class DeployConfig:
    """What every hook of a deploy directory needs to know (saved as JSON in the directory)."""

    app: str
    registry: str = "localhost:5000"
    branch: str = ""  # empty: main or master
    host: str = "127.0.0.1"
    ports: dict = field(default_factory=lambda: {"green": 50100, "blue": 50101})
    build_args: dict = field(default_factory=dict)
    health_path: str = "/health"
    health_timeout: float = 30.0
    drain: float = 1.0
    keep: int = 5

    def repository(self) -> str:
        return f"{self.registry}/{self.app}"

    def url(self, slice_name: str) -> str:
        return f"http://{self.host}:{self.ports[slice_name]}"

    def deploys(self, branch: str) -> bool:
        return branch == self.branch if self.branch else branch in DEFAULT_BRANCHES

    def branch_label(self) -> str:
        return self.branch or " or ".join(DEFAULT_BRANCHES)


def app_name(text: str) -> str:
    """A registry repository name from a directory name (lower case, no odd characters)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return name or "app"


class DeployDir:
    """Paths inside a deploy directory, and its configuration."""

    def __init__(self, path):
        self.path = Path(path).resolve()

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def run(self) -> Path:
        """Slice state, forwarder pid and log files, locks."""
        return self.path / "run"

    def git_dir(self, slice_name: str) -> Path:
        return self.path / f"{slice_name}.git"

    def work_tree(self, slice_name: str) -> Path:
        return self.path / f"{slice_name}-www"

    def load(self) -> DeployConfig:
        try:
            data = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise DeployError(f"{self.path} is no deploy directory "
                              f"(run: dockpart deploy init {self.path})") from None
        known = {f.name for f in fields(DeployConfig)}
        return DeployConfig(**{k: v for k, v in data.items() if k in known})


def write_if_changed(path: Path, text: str, mode: int | None = None) -> bool:
    if path.exists() and path.read_text() == text and (
            mode is None or path.stat().st_mode & 0o777 == mode):
        return False
    write_atomically(path, text, 0o644 if mode is None else mode)
    return True


def hook_script(deploy_dir: DeployDir, slice_name: str) -> str:
    """The pre-receive shim: hands the pushed refs (on stdin) to dockpart's hook code."""
    command = shlex.join([sys.executable, "-m", "dockpart.deploy", "hook", slice_name,
                          "--dir", str(deploy_dir.path)])
    return ("#!/bin/sh\n"
            "# Written by `dockpart deploy init`: deploys pushes to this slice.\n"
            "unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE\n"
            f"exec {command}\n")


def init(path, overrides: dict, say=print) -> list[str]:
    """Create or complete the deploy directory; return what changed (empty: nothing did)."""
    deploy_dir = DeployDir(path)
    deploy_dir.path.mkdir(parents=True, exist_ok=True)
    deploy_dir.run.mkdir(exist_ok=True)
    changed = []
    if deploy_dir.config_path.exists():
        config = asdict(deploy_dir.load())
    else:
        config = asdict(DeployConfig(app=app_name(deploy_dir.path.name)))
    for key, value in overrides.items():
        if isinstance(config.get(key), dict) and isinstance(value, dict):
            value = {**config[key], **value}
        config[key] = value
    if write_if_changed(deploy_dir.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n"):
        changed.append(str(deploy_dir.config_path))
    for slice_name in SLICES:
        git_dir = deploy_dir.git_dir(slice_name)
        if not (git_dir / "HEAD").exists():
            subprocess.run(["git", "init", "-q", "--bare", str(git_dir)], check=True,
                           env=clean_git_env())
            changed.append(str(git_dir))
        work_tree = deploy_dir.work_tree(slice_name)
        if not work_tree.is_dir():
            work_tree.mkdir()
            changed.append(str(work_tree))
        hook = git_dir / "hooks" / "pre-receive"
        if write_if_changed(hook, hook_script(deploy_dir, slice_name), 0o755):
            changed.append(str(hook))
    reserve_ports(sorted(set(config["ports"].values())), say)
    for item in changed:
        say(f"wrote {item}")
    if not changed:
        say(f"{deploy_dir.path} is up to date; nothing changed")
    return changed


def _port_ranges(text: str) -> list[tuple[int, int]]:
    """``"50100-50101,8080"`` (sysctl's list of reserved ports) as (low, high) pairs."""
    ranges = []
    for item in text.split(","):
        if item.strip():
            low, _, high = item.strip().partition("-")
            ranges.append((int(low), int(high or low)))
    return ranges


def reserve_ports(ports: list[int], say=print, sysctl: Path = SYSCTL_IPV4,
                  is_root: bool | None = None) -> list[int]:
    """Keep the slice ports out of Linux's ephemeral range; return the ports newly reserved.

    An outgoing connection (or its TIME_WAIT, for a minute) may otherwise take a slice port,
    and the forwarder cannot listen on it.  ``net.ipv4.ip_local_reserved_ports`` keeps them
    out; the ports are added to what is reserved already.  Without root, only a warning.
    """
    try:
        low, high = map(int, (sysctl / "ip_local_port_range").read_text().split())
        reserved = (sysctl / "ip_local_reserved_ports").read_text().strip()
    except (OSError, ValueError):
        return []  # not Linux, or no such setting: nothing to keep apart
    taken = _port_ranges(reserved)
    exposed = [p for p in ports if low <= p <= high and not any(a <= p <= b for a, b in taken)]
    if not exposed:
        return []
    listed = ",".join(map(str, exposed))
    if not (os.geteuid() == 0 if is_root is None else is_root):
        say(f"warning: ports {listed} lie in the ephemeral port range {low}-{high}: an outgoing "
            "connection can hold one and a push then fails to listen on it; reserve them as root: "
            f"sysctl -w net.ipv4.ip_local_reserved_ports={','.join(filter(None, [reserved, listed]))}")
        return []
    (sysctl / "ip_local_reserved_ports").write_text(",".join(filter(None, [reserved, listed])) + "\n")
    say(f"reserved ports {listed} (net.ipv4.ip_local_reserved_ports; add it to /etc/sysctl.d/ "
        "to keep it after a reboot)")
    return exposed


def clean_git_env() -> dict:
    """The environment without the GIT_* variables a hook inherits (they name the hook's repo)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
