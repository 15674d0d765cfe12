"""``dockpart apps create|scale|autoscale|list|info|destroy``: the user's apps on the tier.

A blocking program, as ``dockpart deploy`` is: it writes the app's record (:mod:`dockpart.apps`)
through redis-py and returns; dockpart-infra spawns and removes the instances, and every
dockpart-proxy routes to them, both told by pub/sub.
"""

from __future__ import annotations

import json
import sys

from twisted.python import usage

from dockpart import apps
from dockpart.deploy import front
from dockpart.deploy.cli import _AnyOrder
from dockpart.redisconn import RedisOptions, RedisUnavailable


def _name(value: str) -> str:
    try:
        return apps.check_name(value)
    except apps.BadApp as e:
        raise usage.UsageError(str(e)) from None


class _AppOptions(_AnyOrder, RedisOptions):
    """One app named by the first argument; ``--redis`` (env DOCKPART_REDIS)."""
    synopsis = "NAME [options]"

    def parseArgs(self, name):  # type: ignore[override]  # usage.Options passes the arguments
        self["name"] = _name(name)


class CreateOptions(_AppOptions):
    longdesc = ("Add an app with one instance. Its instances run --image (docker and swarm "
                "drivers) or --command (process driver, run by /bin/sh); each gets its port in "
                "PORT and must listen on it. The proxies route Host NAME.<apps domain> and each "
                "--domain to it.")
    optParameters = [
        ["image", None, None, "Container image of the app (docker, swarm drivers)."],
        ["command", None, None, "Command that runs the app (process driver), e.g. "
                                "'python3 app.py'."],
        ["scale", None, 1, "Instances to start with.", int],
    ]

    def __init__(self):
        super().__init__()
        self["domains"] = []

    def opt_domain(self, value: str) -> None:
        """A host name routed to the app besides NAME.<apps domain> (repeatable)."""
        try:
            self["domains"].append(apps.check_domain(value))
        except apps.BadApp as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        super().postOptions()
        if bool(self["image"]) == bool(self["command"]):
            raise usage.UsageError("give exactly one of --image IMAGE and --command 'CMD'")
        if self["scale"] < 0:
            raise usage.UsageError("--scale cannot be negative")


class ScaleOptions(_AppOptions):
    synopsis = "NAME N [options]"
    longdesc = "Run exactly N instances of the app (and stop autoscaling it)."

    def parseArgs(self, name, count):  # type: ignore[override]  # usage.Options passes the arguments
        super().parseArgs(name)
        if not count.isdigit():
            raise usage.UsageError(f"N must be a number of instances, not {count!r}")
        self["count"] = int(count)


class AutoscaleOptions(_AppOptions):
    longdesc = ("Let the autoscaler choose the app's instances between --min and --max, "
                "aiming at --target requests in flight per instance.")
    optParameters = [
        ["min", None, 1, "Fewest instances.", int],
        ["max", None, apps.DEFAULT_MAX, "Most instances.", int],
        ["target", None, apps.DEFAULT_TARGET, "Requests in flight per instance.", float],
    ]


class _ShowOptions(_AnyOrder, RedisOptions):
    optFlags = [["json", None, "Print JSON."]]


class InfoOptions(_ShowOptions):
    synopsis = "NAME [options]"

    def parseArgs(self, name):  # type: ignore[override]  # usage.Options passes the arguments
        self["name"] = _name(name)


class AppsOptions(usage.Options):
    synopsis = "dockpart apps COMMAND [options]"
    subCommands = [
        ["create", None, CreateOptions, "Add an app."],
        ["scale", None, ScaleOptions, "Run a fixed number of an app's instances."],
        ["autoscale", None, AutoscaleOptions, "Let the autoscaler size an app."],
        ["list", None, _ShowOptions, "Every app: name, domains, instances, desired, release."],
        ["info", None, InfoOptions, "Everything about one app."],
        ["destroy", None, _AppOptions, "Drain and remove an app's instances; its routes go."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: create, scale, autoscale, list, info, destroy")


def _scale_text(app: apps.App) -> str:
    if app.autoscale:
        return (f"autoscaled {app.min}-{app.max} at {app.target:g} in flight each "
                f"(now {app.desired})")
    return f"{app.desired} instance{'s' if app.desired != 1 else ''}"


def _print_app(app: apps.App, say) -> None:
    say(f"app       {app.name}")
    say(f"runs      {'image ' + app.image if app.image else 'command ' + app.command}")
    say(f"hosts     {' '.join((app.name + '.<apps domain>',) + app.domains)}")
    say(f"scale     {_scale_text(app)}")
    say(f"release   {app.release or '-'}")
    say(f"instances {' '.join(app.instances) or '(none yet)'}")


def run(options: AppsOptions, say) -> int:
    """Carry out one ``dockpart apps`` command; the exit status."""
    command, sub = options.subCommand, options.subOptions
    try:
        with front.connected(sub["redis"], sub["redis-timeout"]) as client:
            redis = front.Scripts(client)
            if command == "create":
                app = apps.App(sub["name"], image=sub["image"] or "",
                               command=sub["command"] or "", domains=tuple(sub["domains"]),
                               desired=sub["scale"])
                apps.create(redis, app)
                say(f"created app {app.name}: {_scale_text(app)}, routed from Host "
                    f"{' '.join((app.name + '.<apps domain>',) + app.domains)}")
            elif command == "scale":
                apps.scale(redis, sub["name"], sub["count"])
                say(f"app {sub['name']}: {sub['count']} instance"
                    f"{'s' if sub['count'] != 1 else ''} asked for")
            elif command == "autoscale":
                app = apps.read_one(redis, sub["name"])
                apps.autoscale(redis, app.name, sub["min"], sub["max"], sub["target"],
                               app.desired)
                say(f"app {app.name}: autoscaled between {sub['min']} and {sub['max']} "
                    f"instances at {sub['target']:g} requests in flight each")
            elif command == "list":
                found = apps.read_all(redis)
                if sub["json"]:
                    say(json.dumps([app.as_json() for app in found], indent=2))
                elif not found:
                    say("no apps (dockpart apps create NAME --command 'CMD' adds one)")
                else:
                    say(f"{'NAME':<20} {'INSTANCES':>9} {'DESIRED':>7}  {'RELEASE':<10} DOMAINS")
                    for app in found:
                        say(f"{app.name:<20} {len(app.instances):>9} {app.desired:>7}  "
                            f"{app.release or '-':<10} {' '.join(app.domains) or '-'}")
            elif command == "info":
                app = apps.read_one(redis, sub["name"])
                if sub["json"]:
                    say(json.dumps(app.as_json(), indent=2))
                else:
                    _print_app(app, say)
            elif command == "destroy":
                apps.destroy(redis, sub["name"])
                say(f"app {sub['name']} destroyed: its routes are gone; dockpart-infra drains "
                    f"and removes its instances")
    except (apps.BadApp, RedisUnavailable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
