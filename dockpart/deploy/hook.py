"""What a slice's pre-receive shim runs: deploy the pushed deploy branch, or say why not.

The shim is a pre-receive hook, so a failed deployment also refuses the push: git exits
non-zero, the branch keeps naming the commit that serves, and pushing the same commit again
after a fix deploys it (a post-receive hook can do neither).  Everything the pusher sees also
goes to ``DIR/run/SLICE-deploy.log``, with the details (a traceback) the pusher is spared.
"""

import contextlib
import os
import subprocess
import time
import traceback
from pathlib import Path

from dockpart.deploy.release import slice_lock
from dockpart.deploy.repos import DeployDir, DeployError, clean_git_env
from dockpart.deploy.slices import deploy_commit

ZERO = "0" * 40


def log_path(deploy_dir: DeployDir, slice_name: str) -> Path:
    return deploy_dir.run / f"{slice_name}-deploy.log"


def ref_value(git_dir, ref: str) -> str:
    """What ``ref`` names in the repository ``git_dir`` now (ZERO if nothing)."""
    found = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse",
                            "--verify", "-q", ref], capture_output=True, text=True,
                           env=clean_git_env())
    return found.stdout.strip() if found.returncode == 0 else ZERO


def run_hook(deploy_dir: DeployDir, slice_name: str, lines, say=print) -> int:
    """Handle the ``OLD NEW REF`` lines git gives the hook; return its exit status."""
    return run_logged(log_path(deploy_dir, slice_name), f"push to {slice_name}",
                      f"DEPLOY FAILED, {slice_name} keeps serving its previous release",
                      lambda tell: _deploy(deploy_dir, slice_name, lines, tell), say)


def run_logged(path: Path, title: str, failed: str, work, say=print,
               expected=(DeployError,)) -> int:
    """Run ``work(tell)``: each line told goes to the pusher and to the log at ``path``; a
    failure is one line for the pusher (``failed: reason (log: path)``, or the error's own
    ``headline`` for ``failed``), the details (a traceback) for the log only.  The exit
    status: ``work``'s, or 1."""
    try:
        path.parent.mkdir(exist_ok=True)
        log = open(path, "a")
    except OSError:  # no deploy directory: loading its configuration says so
        log, path = None, None  # type: ignore[assignment]  # no log file to name
    pusher_left = False

    def reach(line: str) -> None:
        """Say ``line`` to the pusher while they are there: one who left (Ctrl-C, a dropped
        connection: git's pipe is closed) is not told the rest, and the work goes on."""
        nonlocal pusher_left
        if pusher_left:
            return
        try:
            say(line)
        except OSError:
            pusher_left = True

    with log or contextlib.nullcontext():

        def tell(line: str = "") -> None:
            reach(line)
            if log is not None:
                log.write(line + "\n")
                log.flush()

        if log is not None:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S %z')} {title}\n")
        try:
            return work(tell)
        except expected as e:
            reason, details = str(e), ""
            failed = getattr(e, "headline", failed)  # an outcome still open says so
        except Exception as e:
            reason, details = f"unexpected error: {type(e).__name__}: {e}", traceback.format_exc()
        if log is not None:
            log.write(f"{reason}\n{details}")
    # One line for the pusher: the steps above it and the log say the rest.
    first, *more = reason.splitlines() or [""]
    reach(f"{failed}: {first}" + (" [...]" if more else "") + (f" (log: {path})" if path else ""))
    return 1


def _deploy(deploy_dir: DeployDir, slice_name: str, lines, say) -> int:
    config = deploy_dir.load()
    pushed = None
    moved = []  # deploy branches this push moves: one release per push, or which one serves?
    for line in lines:
        if not line.strip():
            continue
        old, new, ref = line.split()
        branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
        if branch is None or not config.deploys(branch):
            say(f"accepted {ref}; only {config.branch_label()} deploys to {slice_name}")
        elif new == ZERO:
            say(f"accepted the deletion of {ref}; {slice_name} keeps serving")
        else:
            pushed = old, new, ref
            moved.append(ref)
    if len(moved) > 1:
        raise DeployError(f"this push moves {' and '.join(moved)}, and each deploys to "
                          f"{slice_name}: push one of them at a time (nothing was accepted)")
    if pushed is None:
        return 0
    old, commit, ref = pushed
    say(f"deploying {commit[:7]} to {slice_name}")
    with slice_lock(deploy_dir, slice_name, say, f"deploying {commit[:7]} from {ref}"):
        # A push that waited must not deploy over what the push before it made the branch.
        now = ref_value(deploy_dir.git_dir(slice_name), ref)
        if now != old:
            raise DeployError(f"{ref} moved to {now[:7]} while this push waited; "
                              "fetch, merge and push again")
        # The pushed objects sit in git's quarantine until this hook succeeds;
        # the GIT_* variables that say where are kept for the checkout.
        deploy_commit(deploy_dir, config, slice_name, commit, say, git_env=dict(os.environ))
    return 0
