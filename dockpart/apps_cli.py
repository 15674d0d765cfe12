"""``dockpart apps create|scale|autoscale|list|info|destroy|releases|rollback|config|logs``:
the user's apps on the tier (``git push`` releases: :mod:`dockpart.apps_deploy`).

A blocking program, as ``dockpart deploy`` is: it writes the app's record (:mod:`dockpart.apps`)
through redis-py and returns (``destroy`` first waits, bounded, for infra to remove the
instances, whose release directories it then removes); dockpart-infra spawns and removes the
instances, and every dockpart-proxy routes to them, both told by pub/sub.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from twisted.python import usage

from dockpart import apps, apps_deploy, keys, releases
from dockpart.deploy import front
from dockpart.deploy.repos import DeployError
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


class _DirMixin(usage.Options):
    """``--apps-dir`` (env DOCKPART_APPS_DIR): where the apps' repositories and releases are."""
    optParameters: list = [
        ["apps-dir", None, None, f"The apps' repositories and releases (env "
                                 f"{apps_deploy.APPS_DIR_ENV}; default {apps_deploy.ROOT_APPS_DIR} "
                                 f"for root, $XDG_DATA_HOME/dockpart/apps otherwise)."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self.apps_dir = apps_deploy.AppsDir(self["apps-dir"] or apps_deploy.default_apps_dir())


class CreateOptions(_DirMixin, _AppOptions):
    longdesc = ("Add an app with one instance, and its git repository (printed: git push to "
                "it). Its instances run the pushed release, else --image (docker and swarm "
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
        if self["image"] and self["command"]:
            raise usage.UsageError("give one of --image IMAGE and --command 'CMD', not both")
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
        ["scale-to-zero-after", None, 0.0, "With --min 0: seconds without a request in flight "
                                           "or held before the app goes to zero instances (its "
                                           "next request is held while one starts); 0: never.",
         float],
    ]


class _ShowOptions(_AnyOrder, RedisOptions):
    optFlags = [["json", None, "Print JSON."]]


class InfoOptions(_DirMixin, _ShowOptions):
    synopsis = "NAME [options]"

    def parseArgs(self, name):  # type: ignore[override]  # usage.Options passes the arguments
        self["name"] = _name(name)


class DestroyOptions(_DirMixin, _AppOptions):
    longdesc = ("Remove the app: its routes at once, its git repository, then (once "
                "dockpart-infra has drained and removed its instances, waited for) its "
                "directory: releases and push log. The name is free again after that.")


class ReleasesOptions(_ShowOptions):
    synopsis = "NAME [options]"
    longdesc = "The app's releases, newest first: id, commit, when, what runs, which is live."

    def parseArgs(self, name):  # type: ignore[override]  # usage.Options passes the arguments
        self["name"] = _name(name)


class RollbackOptions(_DirMixin, _AppOptions):
    synopsis = "NAME [RELEASE] [options]"
    longdesc = ("Roll the app's instances over to RELEASE (v3, or a commit's first letters), "
                "by default the release before the live one, as a push does.")

    def parseArgs(self, name, release=None):  # type: ignore[override]  # usage.Options passes the arguments
        super().parseArgs(name)
        self["release"] = release


class ConfigOptions(_DirMixin, _AppOptions):
    synopsis = "NAME [KEY=VALUE ...] [--unset KEY ...] [options]"
    longdesc = ("Without changes: the app's environment. With changes: a new release of the "
                "live one's build with the environment changed, rolled over as a push is.")

    def __init__(self):
        super().__init__()
        self["unset"] = []

    def opt_unset(self, name: str) -> None:
        """A variable to remove (repeatable)."""
        self["unset"].append(name)

    def parseArgs(self, name, *assignments):  # type: ignore[override]  # usage.Options passes the arguments
        super().parseArgs(name)
        try:
            self["set"], self["unset"] = releases.parse_env(assignments, self["unset"])
        except apps.BadApp as e:
            raise usage.UsageError(str(e)) from None


class LogsOptions(_AppOptions):
    longdesc = ("The output of the app's instances (process driver), newest last, each line "
                "after its instance's port; -f follows it.")
    optFlags = [["follow", "f", "Go on printing new lines until interrupted."]]
    optParameters = [["lines", "n", 50, "How many of the last lines.", int]]

    def postOptions(self) -> None:
        super().postOptions()
        if self["lines"] < 0:
            raise usage.UsageError("-n cannot be negative")


class KeyAddOptions(_DirMixin, _AnyOrder):
    synopsis = "FILE [--apps-dir DIR]"
    longdesc = ("Let the OpenSSH public key in FILE ('-': standard input) git push to every "
                "app: a line of APPS_DIR/.ssh/authorized_keys that only runs git on the apps' "
                "repositories. Point the pushing user's sshd at it (AuthorizedKeysFile).")

    def parseArgs(self, path):  # type: ignore[override]  # usage.Options passes the arguments
        self["file"] = path


class KeysOptions(usage.Options):
    subCommands = [["add", None, KeyAddOptions, "Let a public key push to the apps."]]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: add")


class ServeGitOptions(_DirMixin, _AnyOrder):
    longdesc = "What an SSH key of 'keys add' runs: git-receive-pack on one app's repository."


class HookOptions(_DirMixin, _AppOptions):
    synopsis = "NAME --apps-dir DIR  (git's hook lines on stdin)"
    longdesc = "Make a release of what git pushed and roll the app over to it (the git hook)."


class AppsOptions(usage.Options):
    synopsis = "dockpart apps COMMAND [options]"
    subCommands = [
        ["create", None, CreateOptions, "Add an app."],
        ["scale", None, ScaleOptions, "Run a fixed number of an app's instances."],
        ["autoscale", None, AutoscaleOptions, "Let the autoscaler size an app."],
        ["list", None, _ShowOptions, "Every app: name, domains, instances, desired, release."],
        ["info", None, InfoOptions, "Everything about one app."],
        ["destroy", None, DestroyOptions, "Remove an app: its routes, instances (drained), "
                                          "records, repository and releases."],
        ["releases", None, ReleasesOptions, "An app's releases; which one is live."],
        ["rollback", None, RollbackOptions, "Roll an app over to an earlier release."],
        ["config", None, ConfigOptions, "Show or change an app's environment."],
        ["logs", None, LogsOptions, "An app's instances' output."],
        ["keys", None, KeysOptions, "SSH keys that may push to the apps."],
        ["serve-git", None, ServeGitOptions, "Run git for an SSH key (its forced command)."],
        ["hook", None, HookOptions, "Release what git pushed (run by the app's git hook)."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: create, scale, autoscale, list, info, destroy")


def _scale_text(app: apps.App) -> str:
    if app.autoscale:
        return (f"autoscaled {app.min}-{app.max} at {app.target:g} in flight each"
                + (f", to zero after {app.zero_after:g} s idle" if app.zero_after else "")
                + f" (now {app.desired})")
    return f"{app.desired} instance{'s' if app.desired != 1 else ''}"


def _print_app(app: apps.App, say) -> None:
    say(f"app       {app.name}")
    say("runs      " + (f"image {app.image}" if app.image else f"command {app.command}"
                         if app.command else "its pushed releases (git push)"))
    say(f"hosts     {' '.join((app.name + '.<apps domain>',) + app.domains)}")
    say(f"scale     {_scale_text(app)}")
    say(f"release   {app.release or '-'}"
        + (f" (rolling over to {app.rollover})" if app.rollover else ""))
    say(f"instances {' '.join(app.instances) or '(none yet)'}")


def _print_releases(app: apps.App, found: list[releases.Release], say) -> None:
    if not found:
        say(f"app {app.name} has no release yet (git push to it)")
        return
    say(f"   {'ID':<5} {'COMMIT':<8} {'WHEN':<24} {'NOTE':<18} WHAT")
    for release in found:
        mark = "*" if release.id == app.release else (">" if release.id == app.rollover else " ")
        say(f" {mark} {release.id:<5} {release.commit[:7] or '-':<8} {release.when():<24} "
            f"{release.note[:18]:<18} {release.what}")
    say("(* live, > rolling over to)")


def _logs(client, name: str, lines: int, follow: bool, say) -> None:
    """The last ``lines`` lines of the app's stream, then (``follow``) each new one, until
    Ctrl-C, which ends it quietly."""
    stream = keys.app_log(name)
    try:
        newest = client.xrevrange(stream, count=max(lines, 1))
        for _, fields in reversed(newest[:lines]):
            say(f"[{fields.get('port')}] {fields.get('line')}")
        last = newest[0][0] if newest else "0-0"
        while follow:
            for _, entries in client.xread({stream: last}, block=1000) or []:
                for entry_id, fields in entries:
                    say(f"[{fields.get('port')}] {fields.get('line')}")
                    last = entry_id
    except KeyboardInterrupt:
        pass


def run(options: AppsOptions, say) -> int:
    """Carry out one ``dockpart apps`` command; the exit status."""
    command, sub = options.subCommand, options.subOptions
    if command == "hook":
        return apps_deploy.run_hook(sub.apps_dir, sub["name"], sys.stdin, sub["redis"],
                                    sub["redis-timeout"], say)
    try:
        if command == "serve-git":
            argv = apps_deploy.serve_git(sub.apps_dir, os.environ.get("SSH_ORIGINAL_COMMAND"))
            os.execvp(argv[0], argv)
        if command == "keys":
            key_options = sub.subOptions
            path = key_options["file"]
            key = sys.stdin.read() if path == "-" else open(path).read()
            added = apps_deploy.add_key(key_options.apps_dir, key.strip())
            where = apps_deploy.authorized_keys(key_options.apps_dir)
            say(f"{'added the key to' if added else 'the key was already in'} {where}")
            return 0
    except (apps.BadApp, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
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
                remote = sub.apps_dir.create(app.name, sub["redis"].url())
                say(f"git remote: {remote}  (git push {remote} main)")
                say(f"from another machine: git push ssh://dockpart@{socket.gethostname()}/"
                    f"{app.name} main  (once 'dockpart apps keys add FILE' let your key in)")
            elif command == "scale":
                apps.scale(redis, sub["name"], sub["count"])
                say(f"app {sub['name']}: {sub['count']} instance"
                    f"{'s' if sub['count'] != 1 else ''} asked for")
            elif command == "autoscale":
                app = apps.read_one(redis, sub["name"])
                zero = sub["scale-to-zero-after"]
                apps.autoscale(redis, app.name, sub["min"], sub["max"], sub["target"],
                               app.desired, zero)
                say(f"app {app.name}: autoscaled between {sub['min']} and {sub['max']} "
                    f"instances at {sub['target']:g} requests in flight each"
                    + (f"; to zero after {zero:g} s without a request" if zero else ""))
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
                remote = str(sub.apps_dir.git_dir(app.name))
                if sub["json"]:
                    say(json.dumps({**app.as_json(), "remote": remote}, indent=2))
                else:
                    _print_app(app, say)
                    say(f"remote    {remote}")
            elif command == "releases":
                app = apps.read_one(redis, sub["name"])
                found = releases.read(redis, app.name)
                if sub["json"]:
                    say(json.dumps([{**vars(r), "live": r.id == app.release} for r in found],
                                   indent=2))
                else:
                    _print_releases(app, found, say)
            elif command == "rollback":
                apps_deploy.rollback(sub.apps_dir, client, sub["name"], sub["release"], say)
            elif command == "logs":
                apps.read_one(redis, sub["name"])
                _logs(client, sub["name"], sub["lines"], sub["follow"], say)
            elif command == "config":
                if sub["set"] or sub["unset"]:
                    apps_deploy.configure(sub.apps_dir, client, sub["name"], sub["set"],
                                          sub["unset"], say)
                else:
                    app = apps.read_one(redis, sub["name"])
                    live = next((r for r in releases.read(redis, app.name)
                                 if r.id == app.release), None)
                    for key, value in sorted((live.env if live else {}).items()):
                        say(f"{key}={value}")
            elif command == "destroy":
                apps_deploy.destroy(sub.apps_dir, client, sub["name"], say)
    except (apps.BadApp, DeployError, RedisUnavailable, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
