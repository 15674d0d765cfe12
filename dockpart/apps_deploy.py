"""``git push`` to an app: its repository, the hook that makes a release, and the wait for
infra's roll-over (:mod:`dockpart.rollover`); rollback and config changes roll over the same way.

The apps directory (``--apps-dir``, env ``DOCKPART_APPS_DIR``; ``/var/lib/dockpart/apps`` for
root, ``$XDG_DATA_HOME/dockpart/apps`` otherwise) holds per app ``NAME.git`` (a bare
repository whose pre-receive hook runs ``dockpart apps hook NAME``, so a release that fails
refuses the push, as the seed's slices do) and ``NAME/``: the releases' directories, the push
log and the push lock (one push, rollback or config change per app at a time); ``destroy``
removes both (:func:`destroy`).

A blocking program, as ``dockpart deploy`` is: each step is printed as it happens, and git
shows the hook's lines to the pusher.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from dockpart import apps, keys, releases
from dockpart.apps import BadApp
from dockpart.deploy import front
from dockpart.deploy.hook import ZERO, ref_value, run_logged
from dockpart.deploy.release import file_lock
from dockpart.deploy.repos import (BASE_IMAGE_ENV, DEFAULT_BRANCHES, DeployConfig, DeployError,
                                   write_if_changed, clean_git_env)
from dockpart.deploy.slices import checkout_into
from dockpart.releases import BadRelease, Release
from dockpart.redisconn import RedisUnavailable

APPS_DIR_ENV = "DOCKPART_APPS_DIR"
ROOT_APPS_DIR = "/var/lib/dockpart/apps"
REGISTRY_ENV = "DOCKPART_REGISTRY"
#: Releases kept per app besides the live one (for rollback); older ones are forgotten.
KEEP = 5
#: Seconds a push waits for infra to finish its roll-over.
ROLLOVER_TIMEOUT = 600.0
#: Seconds ``destroy`` waits for infra to remove the app's instances before it leaves their
#: directory to the next ``create`` of the name.
DESTROY_TIMEOUT = 120.0
#: What a failure says the app keeps.
FAILED = "PUSH FAILED, app {name} keeps serving its current release"
class StillRolling(DeployError):
    """The wait ended before infra's roll-over did; the release stays (infra goes on, to the
    release or back on the live one: the pusher is told so, not that the push failed)."""

    def __init__(self, app: str, release: str, why: str):
        super().__init__(f"{why}; dockpart-infra goes on with it (dockpart apps info {app})")
        self.headline = f"PUSH UNFINISHED, app {app} is still rolling over to {release}"


#: Errors whose message is the whole story for the pusher.
EXPECTED = (DeployError, BadApp, BadRelease, RedisUnavailable)


def default_apps_dir() -> Path:
    """``DOCKPART_APPS_DIR``, else /var/lib/dockpart/apps for root, else under
    ``$XDG_DATA_HOME`` (``~/.local/share``)."""
    if os.environ.get(APPS_DIR_ENV):
        return Path(os.environ[APPS_DIR_ENV])
    if os.geteuid() == 0:
        return Path(ROOT_APPS_DIR)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "dockpart" / "apps"


class AppsDir:
    """Paths inside the apps directory."""

    def __init__(self, path):
        self.path = Path(path).resolve()

    def git_dir(self, name: str) -> Path:
        return self.path / f"{name}.git"

    def home(self, name: str) -> Path:
        return self.path / name

    def release_dir(self, name: str, release_id: str) -> Path:
        return self.home(name) / "releases" / release_id

    def log(self, name: str) -> Path:
        return self.home(name) / "push.log"

    def lock(self, name: str, say, doing: str):
        """One push, rollback or config change of the app at a time."""
        self.home(name).mkdir(parents=True, exist_ok=True)
        return file_lock(self.home(name) / "push.lock", f"push to app {name}", say, doing)

    def hook_script(self, name: str, redis_url: str) -> str:
        command = shlex.join([sys.executable, "-m", "dockpart", "apps", "hook", name,
                              "--apps-dir", str(self.path)])
        exports = [f"export DOCKPART_REDIS={shlex.quote(redis_url)}"]
        for var in (BASE_IMAGE_ENV, REGISTRY_ENV):  # as the app's creator had them
            if os.environ.get(var):
                exports.append(f"export {var}={shlex.quote(os.environ[var])}")
        return ("#!/bin/sh\n"
                "# Written by `dockpart apps create`: makes a release of each push and rolls "
                "the app over to it.\n"
                "unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE\n"
                + "".join(line + "\n" for line in exports) + f"exec {command}\n")

    def remove(self, path: Path) -> bool:
        """Delete an app's repository or directory (``path``: ``NAME.git`` or ``NAME`` right
        in the apps directory, checked on the resolved path: nothing outside it).  A symlink
        is removed, never followed (rmtree does not follow those inside either); whether there
        was something to remove."""
        name = path.name.removesuffix(".git")
        apps.check_name(name)
        if Path(os.path.realpath(path.parent)) != self.path or path.name not in (
                name, f"{name}.git"):
            raise BadApp(f"{path} is not an app's repository or directory in {self.path}")
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        else:
            return False
        return True

    def create(self, name: str, redis_url: str) -> Path:
        """The app's bare repository and its hook (again: only what changed is written).

        Without a repository, what a destroyed app of that name left (a directory whose
        instances were still draining when ``destroy`` stopped waiting, or that a push cut
        short by the destroy wrote) goes first, so the app starts fresh."""
        git_dir = self.git_dir(name)
        if not (git_dir / "HEAD").exists():
            self.remove(git_dir)
            self.remove(self.home(name))
            self.path.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(git_dir)],
                           check=True, env=clean_git_env())
        # 0700: it holds the Redis URL, password included.
        write_if_changed(git_dir / "hooks" / "pre-receive", self.hook_script(name, redis_url),
                          0o700)
        return git_dir


def run_hook(apps_dir: AppsDir, name: str, lines, address, timeout: float, say=print) -> int:
    """The pre-receive hook: ``OLD NEW REF`` lines from git; the exit status."""
    return run_logged(apps_dir.log(name), f"push to app {name}", FAILED.format(name=name),
                      lambda tell: _push(apps_dir, name, lines, address, timeout, tell), say,
                      expected=EXPECTED)


def _push(apps_dir: AppsDir, name: str, lines, address, timeout: float, say) -> int:
    pushed = None
    for line in lines:
        if not line.strip():
            continue
        old, new, ref = line.split()
        if ref.removeprefix("refs/heads/") not in DEFAULT_BRANCHES:
            say(f"accepted {ref}; only {' or '.join(DEFAULT_BRANCHES)} makes a release")
        elif new == ZERO:
            say(f"accepted the deletion of {ref}; app {name} keeps serving")
        else:
            pushed = old, new, ref
    if pushed is None:
        return 0
    old, commit, ref = pushed
    say(f"-----> app {name}: release of {commit[:7]}")
    with apps_dir.lock(name, say, f"pushing {commit[:7]}"):
        if not (apps_dir.git_dir(name) / "HEAD").exists():
            raise BadApp(f"app {name} was destroyed while this push waited")
        if ref_value(apps_dir.git_dir(name), ref) != old:
            raise DeployError(f"{ref} moved while this push waited; fetch, merge and push again")
        with front.connected(address, timeout) as client:
            redis = front.Scripts(client)
            app = apps.read_one(redis, name)
            driver = str(client.get(keys.APPS_DRIVER) or "")
            if not driver:
                raise DeployError("no dockpart-infra runs apps on this Redis yet (it says its "
                                  f"driver in {keys.APPS_DRIVER})")
            live = _live(redis, app)
            release_id = releases.next_id(redis, name)
            # What a failure forgets until the release is made: its directory.
            release = Release(release_id, dir=str(apps_dir.release_dir(name, release_id)))
            try:
                release = _make(apps_dir, name, release_id, commit, driver, live, say)
            except BaseException:
                _forget(redis, name, [release], say)
                raise
            _keep_and_roll(redis, client, app, release, say)
    return 0


def _live(redis, app: apps.App) -> Release | None:
    found = releases.read(redis, app.name)
    return next((r for r in found if r.id == app.release), None)


def _make(apps_dir: AppsDir, name: str, release_id: str, commit: str, driver: str,
          live: Release | None, say) -> Release:
    """Check out ``commit``; a Procfile's command (process driver) or a built image."""
    work = apps_dir.release_dir(name, release_id)
    work.mkdir(parents=True, exist_ok=True)
    say(f"checking out {commit[:7]} into {work}")
    # The pushed objects sit in git's quarantine until the hook succeeds: keep GIT_* for it.
    checkout_into(apps_dir.git_dir(name), work, commit, dict(os.environ))
    env = dict(live.env) if live else {}
    note = f"push {commit[:7]}"
    if driver == "process":
        procfile = work / "Procfile"
        if not procfile.is_file():
            raise BadRelease("no Procfile in the pushed tree (the process driver runs its "
                             "'web: COMMAND', which listens on $PORT)")
        command = releases.web_command(procfile.read_text())
        say(f"Procfile: web: {command}")
        return Release(release_id, commit, time.time(), command=command, dir=str(work),
                       env=env, note=note)
    if not (work / "Dockerfile").is_file():
        raise BadRelease(f"no Dockerfile in the pushed tree (the {driver} driver runs images)")
    image = build_image(name, release_id, work, say)
    shutil.rmtree(work, ignore_errors=True)  # the image is the release
    return Release(release_id, commit, time.time(), image=image, env=env, note=note)


def build_image(name: str, release_id: str, work: Path, say) -> str:
    """Build ``work`` with the engine, push it to the registry; the image by digest."""
    from dockpart.deploy import docker_ops  # here: the process driver never needs docker
    registry = os.environ.get(REGISTRY_ENV) or DeployConfig.registry
    tag = f"{registry}/{name}:{release_id}"
    c = docker_ops.client()
    build_args = {"BASE_IMAGE": os.environ[BASE_IMAGE_ENV]} if os.environ.get(
        BASE_IMAGE_ENV) else {}
    say(f"building {tag} (the running release keeps serving)")
    docker_ops.build(c, str(work), tag, build_args, lambda line: say("  " + line))
    say(f"pushing {tag}")
    digest = docker_ops.push(c, tag, lambda line: say("  " + line))
    say(f"the registry keeps {tag} as {digest}")
    return f"{registry}/{name}@{digest}"


def roll(client, app: apps.App, release: Release, say, timeout: float = ROLLOVER_TIMEOUT) -> None:
    """Ask infra to roll ``app`` over to ``release``; relay its news until done or failed.

    Once asked, the roll-over is infra's and goes on to its end, on ``release`` or back on
    the live one.  So does this wait, through Ctrl-C and a closed terminal (SIGINT, SIGHUP:
    a pusher's Ctrl-C reaches a local push's hook too), so that the caller still keeps or
    forgets the release by the outcome; a wait that breaks otherwise is StillRolling, which
    keeps it.  An app never ends live on a release whose record or directory was forgotten.
    """
    redis = front.Scripts(client)
    if not client.exists(app.tier.lease):
        raise DeployError(f"no dockpart-infra works app {app.name} (nobody holds "
                          f"{app.tier.lease}); nothing was changed")
    with _noted(signal.SIGINT, signal.SIGHUP) as interrupted:
        releases.start_rollover(redis, app.name, release.id)
        try:
            _relay(client, app, release, say, timeout, interrupted)
        except DeployError:
            raise
        except Exception as e:
            raise StillRolling(app.name, release.id, f"lost sight of the roll-over to "
                                                     f"{release.id} ({e})") from e


def _relay(client, app: apps.App, release: Release, say, timeout: float, interrupted) -> None:
    """Infra's news of the roll-over, said until its end; DeployError if it failed."""
    say(f"-----> rolling {app.name} over to {release.id} ({release.what})")
    news = keys.app_rollover_news(app.name)
    deadline = time.monotonic() + timeout
    told = False
    while time.monotonic() < deadline:
        if interrupted and not told:
            told = True
            say(f"-----> interrupted: the roll-over goes on (dockpart-infra ends it on "
                f"{release.id}, or back on the live release); waiting for its end")
        line = client.rpop(news)
        if line is None:
            time.sleep(0.05)
            continue
        item = json.loads(line)
        if "say" in item:
            say("       " + item["say"])
        elif item.get("done"):
            say(f"-----> {item.get('reason') or 'done'}")
            return
        else:
            raise DeployError(item.get("reason") or "the roll-over failed")
    raise StillRolling(app.name, release.id, f"dockpart-infra did not finish the roll-over to "
                                             f"{release.id} within {timeout:g} s")


@contextmanager
def _noted(*signums):
    """While inside, the signals ``signums`` are only noted, in the list yielded (from the
    main thread: elsewhere, Python delivers no signal anyway)."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    before = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in signums}
    try:
        yield seen
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _forget(redis, name: str, dropped: list[Release], say) -> None:
    """Forget releases no longer kept (or never live), and what no kept release uses: their
    directories (a config release runs in its push's), their images (a config release runs
    its push's) in the registry and on the engine."""
    releases.forget(redis, name, [r.id for r in dropped])
    kept = releases.read(redis, name)
    for path in {r.dir for r in dropped} - {r.dir for r in kept} - {""}:
        shutil.rmtree(path, ignore_errors=True)
    images = {r.image for r in dropped} - {r.image for r in kept} - {""}
    if images:
        _drop_images(sorted(images), say)


def _drop_images(images: list[str], say) -> None:
    """Delete images (``REGISTRY/NAME@sha256:...``) from their registry and the engine, each
    step said; best effort: the push that prunes has succeeded already."""
    from dockpart.deploy import docker_ops  # here: the process driver never needs docker
    for image in images:
        say(docker_ops.registry_delete(image, image.partition("@")[2], set()))
    try:
        c = docker_ops.client()
    except DeployError as e:
        say(f"the engine keeps {' '.join(images)}: {e}")
        return
    for image in images:
        docker_ops.remove_pinned(c, image)


def _prune(redis, name: str, live: str, say) -> None:
    """Keep the live release and the KEEP before it; forget the rest."""
    dropped = [r for r in releases.read(redis, name) if r.id != live][KEEP:]
    if dropped:
        _forget(redis, name, dropped, say)


def rollback(apps_dir: AppsDir, client, name: str, wanted: str | None, say) -> Release:
    """Roll the app over to an earlier release (the one before the live one by default)."""
    redis = front.Scripts(client)
    with apps_dir.lock(name, say, "a rollback"):
        app = apps.read_one(redis, name)
        release = releases.find(releases.read(redis, name), wanted, app.release)
        if release.id == app.release:
            raise BadApp(f"{release.id} is live already")
        roll(client, app, release, say)
    return release


def configure(apps_dir: AppsDir, client, name: str, env: dict, unset, say) -> Release:
    """A new release of the live one's build with the environment changed, rolled over."""
    redis = front.Scripts(client)
    with apps_dir.lock(name, say, "a config change"):
        app = apps.read_one(redis, name)
        live = _live(redis, app)
        base = live or Release("", command=app.command, image=app.image)
        new_env = {k: v for k, v in {**base.env, **env}.items() if k not in unset}
        if new_env == base.env and live is not None:
            raise BadApp("nothing changes")
        release_id = releases.next_id(redis, name)
        changed = " ".join([*(f"{k}=" for k in env), *(f"-{k}" for k in unset)])
        release = Release(release_id, base.commit, time.time(), command=base.command,
                          dir=base.dir, image=base.image, env=new_env, note=f"config {changed}")
        _keep_and_roll(redis, client, app, release, say)
    return release


def destroy(apps_dir: AppsDir, client, name: str, say, timeout: float = DESTROY_TIMEOUT) -> None:
    """Destroy the app: its records and routes (:func:`apps.destroy`), its repository at once
    (nothing runs from it; a push under way ends first, refused), and its directory once
    infra has removed its instances: the process driver runs them from their release's
    directory in it, and they still drain.  So this waits for infra to forget the app (at
    most ``timeout``, and not at all when no infra works the app); what the wait leaves, the
    next ``create`` of the name removes, as the name is only free again once infra forgot it.
    """
    apps.destroy(front.Scripts(client), name)
    say(f"app {name} destroyed: its routes are gone; dockpart-infra drains and removes its "
        f"instances")
    home = apps_dir.home(name)
    pushed = home.is_dir()  # else no push ever took the lock there
    with apps_dir.lock(name, say, "destroying the app") if pushed else nullcontext():
        if apps_dir.remove(apps_dir.git_dir(name)):
            say(f"removed its repository {apps_dir.git_dir(name)}")
    if pushed and _forgotten(client, name, home, say, timeout):
        apps_dir.remove(home)
        say(f"removed {home} (its releases and push log); the name {name} is free again")


def _forgotten(client, name: str, home: Path, say, timeout: float) -> bool:
    """Whether infra forgot the destroyed app (no instance left) within ``timeout``; what
    the wait is for is said once, and why it ended early."""
    lease = keys.app_tier(name).lease
    deadline = time.monotonic() + timeout
    told = False
    try:
        while client.sismember(keys.APPS_DESTROYED, name):
            if not client.exists(lease):
                say(f"no dockpart-infra works app {name} now: {home} stays until one has "
                    f"removed its instances; 'dockpart apps create {name}' then removes it")
                return False
            if time.monotonic() >= deadline:
                say(f"dockpart-infra still drains app {name} after {timeout:g} s: {home} stays; "
                    f"'dockpart apps create {name}' removes it once the instances are gone")
                return False
            if not told:
                told = True
                say(f"waiting for dockpart-infra to drain and remove its instances before "
                    f"removing {home} (the process driver runs them from their release's "
                    f"directory there)")
            time.sleep(0.1)
    except KeyboardInterrupt:
        say(f"interrupted: {home} stays; 'dockpart apps create {name}' removes it once the "
            f"instances are gone")
        return False
    return True


def _keep_and_roll(redis, client, app, release: Release, say) -> None:
    """Record the release and roll the app over to it; a release that fails is forgotten
    (one still rolling is the roll-over's to finish), and one that serves prunes the history."""
    try:
        releases.keep(redis, app.name, release)
        roll(client, app, release, say)
    except StillRolling:
        raise
    except BaseException:
        _forget(redis, app.name, [release], say)
        raise
    _prune(redis, app.name, release.id, say)


# -- pushing over SSH (as Dokku and gitolite: one system user, keys with a forced command)

#: The git commands a key may run, and what each is.
GIT_COMMANDS = {"git-receive-pack": "push", "git-upload-pack": "fetch"}


def authorized_line(apps_dir: AppsDir, key: str) -> str:
    """An ``authorized_keys`` line: ``key`` may only run git on the apps' repositories."""
    parts = key.split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise BadApp("not an OpenSSH public key (expected e.g. 'ssh-ed25519 AAAA... you@host')")
    command = shlex.join([sys.executable, "-m", "dockpart", "apps", "serve-git",
                          "--apps-dir", str(apps_dir.path)])
    if '"' in command:
        raise BadApp(f'the apps directory {apps_dir.path} has a " in its path: sshd could not '
                     f"read the key's forced command")
    return f'command="{command}",restrict {" ".join(parts)}'


def authorized_keys(apps_dir: AppsDir) -> Path:
    return apps_dir.path / ".ssh" / "authorized_keys"


def add_key(apps_dir: AppsDir, key: str) -> bool:
    """Let ``key`` push to every app (once); whether it was new."""
    line = authorized_line(apps_dir, key)
    path = authorized_keys(apps_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = path.read_text().splitlines() if path.exists() else []
    blob = key.split()[1]
    if any(blob in old.split() for old in existing):
        return False
    with open(path, "a") as f:
        f.write(line + "\n")
    os.chmod(path, 0o600)
    return True


def serve_git(apps_dir: AppsDir, original: str | None) -> list[str]:
    """The git command an SSH key's ``SSH_ORIGINAL_COMMAND`` may run; BadApp for anything
    else (a shell, another path, an app that is not there)."""
    try:
        words = shlex.split(original or "")
    except ValueError:
        words = []
    if len(words) != 2 or words[0] not in GIT_COMMANDS:
        raise BadApp("this key can only git push to (or fetch from) an app: "
                     "git push ssh://dockpart@HOST/NAME main")
    name = words[1].strip("/").removesuffix(".git")
    apps.check_name(name)
    git_dir = apps_dir.git_dir(name)
    if not (git_dir / "HEAD").exists():
        raise BadApp(f"no app named {name} (dockpart apps create {name})")
    return [words[0], str(git_dir)]
