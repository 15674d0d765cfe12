"""The ``dockpart`` console script: ``dockpart deploy init|status|rollback|switch|hook|up|down``.

A plain command-line program (no daemon), so it blocks on Docker and prints each step as it
happens: git relays a hook's output to the pusher line by line.
"""

import os
import sys

from twisted.python import usage

from dockpart import keys
from dockpart.deploy import docker_ops, front, repos, slices, supervise
from dockpart.deploy.hook import run_hook
from dockpart.deploy.release import History, slice_lock
from dockpart.redisconn import RedisOptions, RedisUnavailable

DIR_ENV = "DOCKPART_DEPLOY_DIR"


def say(line: str = "") -> None:
    print(line, flush=True)


def _slice(name: str) -> str:
    if name not in repos.SLICES:
        raise usage.UsageError(f"no slice {name!r}: choose {' or '.join(repos.SLICES)}")
    return name


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"{value} is no TCP port")
    return port


class _AnyOrder(usage.Options):
    """Options may also follow the arguments (``switch green --dir D``), as people type them."""

    def parseOptions(self, options=None):
        options = sys.argv[1:] if options is None else list(options)
        with_value = {"--" + o[:-1] for o in self.longOpt if o.endswith("=")}
        with_value |= {"-" + c for c, after in zip(self.shortOpt, self.shortOpt[1:] + " ")
                       if after == ":" and c != ":"}
        flags, arguments = [], []
        items = iter(options)
        for item in items:
            if item == "--":
                arguments.extend(items)
            elif item.startswith("-") and item != "-":
                flags.append(item)
                if item in with_value:
                    flags.extend(value for value in [next(items, None)] if value is not None)
            else:
                arguments.append(item)
        super().parseOptions(flags + ["--"] + arguments)


class _DirOptions(_AnyOrder):
    optParameters = [
        ["dir", "d", None, f"The deploy directory (env {DIR_ENV}, default: the current one)."],
    ]

    def postOptions(self) -> None:
        self.deploy_dir = repos.DeployDir(self["dir"] or os.environ.get(DIR_ENV) or ".")


class InitOptions(_AnyOrder):
    synopsis = "DIR [options]"
    longdesc = ("Create DIR/green.git and DIR/blue.git, their work trees and hooks, and the "
                "configuration. Running it again changes only what an option given again changes.")
    optParameters = [
        ["app", None, None, "Image name in the registry (default: DIR's name)."],
        ["registry", None, None, "Registry HOST:PORT (default localhost:5000)."],
        ["branch", None, None, "The branch that deploys (default: main or master)."],
        ["host", None, None, "Interface of the slice ports (default 127.0.0.1)."],
        ["green-port", None, None, "Port of the green slice (default 50100).", _port],
        ["blue-port", None, None, "Port of the blue slice (default 50101).", _port],
        ["base-image", None, None,
         f"Build argument BASE_IMAGE for the app's Dockerfile (env {repos.BASE_IMAGE_ENV})."],
        ["health-path", None, None, "Path that must answer 2xx or 3xx before a release serves (/health)."],
        ["health-timeout", None, None, "Seconds a new release has to get healthy (30).", float],
        ["drain", None, None, "Seconds the old release finishes open connections (1).", float],
        ["keep", None, None, "Releases kept per slice for rollback (5).", int],
    ]

    def __init__(self):
        super().__init__()
        self.build_args = {}

    def opt_build_arg(self, value: str) -> None:
        """NAME=VALUE, a build argument for the app's Dockerfile (repeatable)."""
        name, sep, arg = value.partition("=")
        if not sep or not name:
            raise usage.UsageError(f"--build-arg {value!r}: expected NAME=VALUE")
        self.build_args[name] = arg

    def parseArgs(self, directory):  # type: ignore[override]  # usage.Options passes the arguments
        self["directory"] = directory

    def postOptions(self) -> None:
        overrides = {}
        for option, key in [("app", "app"), ("registry", "registry"), ("branch", "branch"),
                            ("host", "host"), ("health-path", "health_path"),
                            ("health-timeout", "health_timeout"), ("drain", "drain"),
                            ("keep", "keep")]:
            if self[option] is not None:
                overrides[key] = self[option]
        if "app" in overrides:
            overrides["app"] = repos.app_name(overrides["app"])
        if "health_path" in overrides and not overrides["health_path"].startswith("/"):
            raise usage.UsageError("--health-path must start with /")
        if overrides.get("keep", 2) < 2:
            raise usage.UsageError("--keep must be at least 2 (the current and one to roll back to)")
        for key in ("health_timeout", "drain"):
            if overrides.get(key, 1) < 0:
                raise usage.UsageError(f"--{key.replace('_', '-')} cannot be negative")
        ports = {s: self[f"{s}-port"] for s in repos.SLICES if self[f"{s}-port"] is not None}
        if ports:
            overrides["ports"] = ports
        base_image = self["base-image"] or os.environ.get(repos.BASE_IMAGE_ENV)
        build_args = dict(self.build_args)
        if base_image:
            build_args["BASE_IMAGE"] = base_image
        if build_args:
            overrides["build_args"] = build_args
        self.overrides = overrides


class StatusOptions(_DirOptions, RedisOptions):  # type: ignore[misc]  # each adds its own optParameters
    def postOptions(self) -> None:
        _DirOptions.postOptions(self)
        RedisOptions.postOptions(self)


class RollbackOptions(_DirOptions):
    synopsis = "SLICE [RELEASE] [options]"
    longdesc = "Run SLICE's previous release again, or RELEASE (a tag such as green-1a2b3c4 or a commit)."

    def parseArgs(self, slice_name, release=None):  # type: ignore[override]  # usage.Options passes the arguments
        self["slice"] = _slice(slice_name)
        self["release"] = release


class SwitchOptions(_DirOptions, RedisOptions):  # type: ignore[misc]  # each adds its own optParameters
    synopsis = "SLICE [options]"
    longdesc = f"Send the front route ({keys.DEPLOY_LIVE}) to SLICE, once it answers its health path."
    optFlags = [["force", None, "Switch even when the slice does not answer its health path."]]

    def parseArgs(self, slice_name):  # type: ignore[override]  # usage.Options passes the arguments
        self["slice"] = _slice(slice_name)

    def postOptions(self) -> None:
        _DirOptions.postOptions(self)
        RedisOptions.postOptions(self)


class HookOptions(_DirOptions):
    synopsis = "SLICE --dir DIR  (git's hook lines on stdin)"

    def parseArgs(self, slice_name):  # type: ignore[override]  # usage.Options passes the arguments
        self["slice"] = _slice(slice_name)


class DeployOptions(usage.Options):
    subCommands = [
        ["init", None, InitOptions, "Create or update a deploy directory."],
        ["status", None, StatusOptions, "What each slice runs, and its releases."],
        ["rollback", None, RollbackOptions, "Run a slice's previous (or a named) release."],
        ["switch", None, SwitchOptions, "Move the front route to a slice."],
        ["hook", None, HookOptions, "Deploy what git pushed (run by the slices' hooks)."],
        ["up", None, _DirOptions, "Serve each slice's container on its port again (after a reboot)."],
        ["down", None, _DirOptions, "Stop both slices' containers and forwarders."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: " + ", ".join(
                c[0] for c in self.subCommands))  # type: ignore[index]


def _apps_options():
    from dockpart.apps_cli import AppsOptions  # here: it imports this module
    return AppsOptions()


class Options(usage.Options):
    synopsis = "dockpart deploy|apps COMMAND [options]"
    subCommands = [["deploy", None, DeployOptions, "Git-push blue/green deployment."],
                   ["apps", None, _apps_options, "Your web apps on the tier (dockpart apps)."]]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: deploy or apps")


def status(options) -> None:
    deploy_dir = options.deploy_dir
    config = deploy_dir.load()
    try:
        live = front.live(options["redis"], options["redis-timeout"])
        say(f"front route ({keys.DEPLOY_LIVE}): {', '.join(live) or 'not set'}")
    except RedisUnavailable as e:
        live = []
        say(f"front route: unknown ({e})")
    try:
        c = docker_ops.client()
    except repos.DeployError as e:
        c = None
        say(f"containers: unknown ({e})")
    for slice_name in repos.SLICES:
        url = config.url(slice_name)
        is_live = " [live]" if url in live else ""
        say(f"\n{slice_name}: {url}{is_live}")
        container = c and docker_ops.get(c, slices.container_name(slice_name))
        if container is None:
            say("  no container runs")
        else:
            labels = container.labels
            port = int(labels.get(f"{docker_ops.LABEL}.port", 0))
            healthy = docker_ops.http_ok(f"http://127.0.0.1:{port}{config.health_path}")
            forwarding = supervise.current_target(deploy_dir, slice_name) == ("127.0.0.1", port)
            pid = supervise.forwarder_pid(deploy_dir, slice_name)
            say(f"  container {container.name}: {container.status}, "
                f"{'healthy' if healthy else 'NOT healthy'} on 127.0.0.1:{port}")
            say(f"  image     {container.attrs['Config']['Image']}")
            say(f"  commit    {labels.get(f'{docker_ops.LABEL}.commit', '?')}")
            say(f"  since     {container.attrs['State']['StartedAt']}")
            say(f"  forwarder {'pid %d' % pid if pid else 'NOT running (dockpart deploy up)'}"
                f"{'' if forwarding else ', pointing elsewhere'}")
        releases = History(deploy_dir, slice_name).releases()
        say("  releases (newest first):" if releases else "  no releases yet")
        for i, release in enumerate(releases):
            mark = "*" if i == 0 else " "
            say(f"  {mark} {release.tag}  {release.commit}  {release.since()}  "
                f"{release.digest or 'no digest recorded'}")


def main(argv=None) -> int:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"{options.getSynopsis()}\nerror: {e}", file=sys.stderr)
        return 2
    if options.subCommand == "apps":
        from dockpart.apps_cli import run
        return run(options.subOptions, say)
    command = options.subOptions.subCommand
    sub = options.subOptions.subOptions
    try:
        if command == "init":
            repos.init(sub["directory"], sub.overrides, say)
        elif command == "hook":
            return run_hook(sub.deploy_dir, sub["slice"], sys.stdin, say)
        elif command == "status":
            status(sub)
        elif command == "rollback":
            config = sub.deploy_dir.load()
            with slice_lock(sub.deploy_dir, sub["slice"], say, "a rollback"):
                slices.rollback(sub.deploy_dir, config, sub["slice"], sub["release"], say)
        elif command == "switch":
            config = sub.deploy_dir.load()
            url = config.url(sub["slice"])
            if not sub["force"] and not docker_ops.http_ok(url + config.health_path):
                raise repos.DeployError(f"{url}{config.health_path} does not answer 2xx or 3xx; "
                                        "the front route stays (--force switches anyway)")
            front.switch(sub["redis"], sub["redis-timeout"], url)
            say(f"the front route now sends to {sub['slice']} ({url})")
        elif command == "up":
            slices.up(sub.deploy_dir, sub.deploy_dir.load(), say)
        elif command == "down":
            slices.down(sub.deploy_dir, say)
    except (repos.DeployError, RedisUnavailable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
