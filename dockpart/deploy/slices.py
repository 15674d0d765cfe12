"""Deploy a commit to a slice, or bring back an earlier release, without a refused connection.

The order is what keeps the old release serving through any failure: build, tag, push and
pull happen beside the running container; the new one starts as ``SLICE-app-next`` on a
port of its own and must answer its health path; only then does the slice's forwarder send
new connections to it, and the old ``SLICE-app`` is stopped after a short drain.
"""

import subprocess
import time

from dockpart.deploy import docker_ops, supervise
from dockpart.deploy.release import History, Release
from dockpart.deploy.repos import SLICES, DeployConfig, DeployDir, DeployError, clean_git_env


def container_name(slice_name: str) -> str:
    return f"{slice_name}-app"


def candidate_name(slice_name: str) -> str:
    return f"{slice_name}-app-next"


def checkout(deploy_dir: DeployDir, slice_name: str, commit: str, env: dict | None = None) -> None:
    """Make the slice's work tree exactly ``commit`` (tracked files only)."""
    checkout_into(deploy_dir.git_dir(slice_name), deploy_dir.work_tree(slice_name), commit, env,
                  deploy_dir.path)


def checkout_into(git_dir, work_tree, commit: str, env: dict | None = None, cwd=None) -> None:
    """Make ``work_tree`` exactly ``commit`` of the repository ``git_dir`` (tracked files)."""
    git = ["git", f"--git-dir={git_dir}", f"--work-tree={work_tree}"]
    env = env if env is not None else clean_git_env()
    for args in (["read-tree", "-u", "--reset", commit], ["clean", "-q", "-ffdx"]):
        result = subprocess.run(git + args, env=env, capture_output=True, text=True,
                                cwd=cwd or git_dir)
        if result.returncode:
            raise DeployError(f"git {args[0]} failed: {result.stderr.strip()}")


def deploy_commit(deploy_dir: DeployDir, config: DeployConfig, slice_name: str, commit: str,
                  say=print, git_env: dict | None = None) -> Release:
    """Check out, build, tag, push, pull, then activate ``commit`` on the slice."""
    release = Release.new(config, slice_name, commit)
    started = time.monotonic()
    say(f"checking out {release.short} into {deploy_dir.work_tree(slice_name)}")
    checkout(deploy_dir, slice_name, commit, git_env)
    c = docker_ops.client()
    say(f"building {release.image} (the running release keeps serving)")
    docker_ops.build(c, str(deploy_dir.work_tree(slice_name)), release.image,
                     config.build_args, lambda line: say("  " + line))
    say(f"pushing {release.image}")
    release.digest = docker_ops.push(c, release.image, lambda line: say("  " + line))
    say(f"the registry keeps {release.image} as {release.digest}")
    try:
        activate(deploy_dir, config, release, say, c)
    except DeployError:
        _forget_failed(c, config, deploy_dir, release, say)
        raise
    say(f"{slice_name} serves {release.tag} on {config.url(slice_name)} "
        f"({time.monotonic() - started:.1f} s after the push)")
    return release


def activate(deploy_dir: DeployDir, config: DeployConfig, release: Release, say=print,
             c=None) -> None:
    """Pull ``release`` from the registry, start it beside the old one, check it, swap it in."""
    c = c or docker_ops.client()
    slice_name = release.slice
    say(f"pulling {release.pinned}")
    docker_ops.pull(c, release.pinned, lambda line: say("  " + line))
    port = docker_ops.free_port()
    candidate = candidate_name(slice_name)
    say(f"starting {candidate} on 127.0.0.1:{port}")
    container = docker_ops.run(c, release.pinned, candidate, port, {
        f"{docker_ops.LABEL}.slice": slice_name, f"{docker_ops.LABEL}.commit": release.commit,
        f"{docker_ops.LABEL}.port": str(port)})
    try:
        docker_ops.wait_healthy(container, f"http://127.0.0.1:{port}{config.health_path}",
                                config.health_timeout, say)
        supervise.ensure_forwarder(deploy_dir, config, slice_name, say)
    except BaseException:
        say(f"removing {candidate}; the running release keeps serving")
        docker_ops.remove(c, candidate, stop_timeout=2)
        raise
    say(f"healthy; {config.url(slice_name)} now sends new connections to {candidate}")
    supervise.set_target(deploy_dir, slice_name, "127.0.0.1", port)
    # It serves from now on: a later failure must not make it a failed release to forget.
    dropped = History(deploy_dir, slice_name).record(release, config.keep)
    old = container_name(slice_name)
    if docker_ops.get(c, old) is not None:
        time.sleep(config.drain)  # connections opened just before the switch finish on the old one
        say(f"stopping the previous {old}")
        docker_ops.remove(c, old)
    container.rename(old)
    docker_ops.keep_running(container)
    # SLICE names what the slice runs, in the registry too.
    slice_image = f"{config.repository()}:{slice_name}"
    docker_ops.tag(c, release.pinned, slice_image)
    say(f"pushing {slice_image}")
    docker_ops.push(c, slice_image, lambda line: say("  " + line))
    prune(c, config, deploy_dir, slice_name, dropped, say)


def prune(c, config: DeployConfig, deploy_dir: DeployDir, slice_name: str,
          dropped: list[Release], say) -> None:
    """Forget releases no longer kept: their registry manifests and local tags."""
    if not dropped:
        return
    kept = History(deploy_dir, slice_name).releases()
    keep_digests = {r.digest or docker_ops.registry_digest(r.image) for r in kept}
    keep_digests.add(docker_ops.registry_digest(f"{config.repository()}:{slice_name}"))
    for release in dropped:
        say(docker_ops.registry_delete(release.image, release.digest, keep_digests - {None}))
        docker_ops.remove_image(c, release.image)


def _forget_failed(c, config: DeployConfig, deploy_dir: DeployDir, release: Release, say) -> None:
    """A release that never served leaves the registry (unless it once served and is kept)."""
    kept = History(deploy_dir, release.slice).releases()
    if any(r.tag == release.tag for r in kept):
        return
    prune(c, config, deploy_dir, release.slice, [release], say)


def rollback(deploy_dir: DeployDir, config: DeployConfig, slice_name: str,
             name: str | None, say=print) -> Release:
    release = History(deploy_dir, slice_name).find(name)
    say(f"rolling {slice_name} back to {release.tag} ({release.commit})")
    activate(deploy_dir, config, release, say)
    say(f"{slice_name} serves {release.tag} on {config.url(slice_name)}")
    return release


def up(deploy_dir: DeployDir, config: DeployConfig, say=print) -> None:
    """Serve each slice's running container on its port again (after a reboot, say).

    The engine restarts the containers by itself; the forwarders are ours to start.
    """
    c = docker_ops.client()
    for slice_name in SLICES:
        container = docker_ops.get(c, container_name(slice_name))
        if container is None:
            say(f"{slice_name}: no container; push to deploy one")
            continue
        if container.status != "running":
            container.start()
        port = int(container.labels[f"{docker_ops.LABEL}.port"])
        docker_ops.wait_healthy(container, f"http://127.0.0.1:{port}{config.health_path}",
                                config.health_timeout, say)
        supervise.set_target(deploy_dir, slice_name, "127.0.0.1", port)
        supervise.ensure_forwarder(deploy_dir, config, slice_name, say)
        say(f"{slice_name} serves {container.attrs['Config']['Image']} on {config.url(slice_name)}")


def down(deploy_dir: DeployDir, say=print) -> None:
    """Stop both slices: their containers and forwarders (the history stays)."""
    c = docker_ops.client()
    for slice_name in SLICES:
        for name in (candidate_name(slice_name), container_name(slice_name)):
            if docker_ops.remove(c, name, stop_timeout=2):
                say(f"removed {name}")
        if supervise.stop_forwarder(deploy_dir, slice_name):
            say(f"stopped the forwarder of {slice_name}")
