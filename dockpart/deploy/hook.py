"""What a slice's pre-receive shim runs: deploy the pushed deploy branch, or say why not.

The shim is a pre-receive hook, so a failed deployment also refuses the push: git exits
non-zero, the branch keeps naming the commit that serves, and pushing the same commit again
after a fix deploys it (a post-receive hook can do neither).
"""

import os
import traceback

from dockpart.deploy.release import slice_lock
from dockpart.deploy.repos import DeployDir, DeployError
from dockpart.deploy.slices import deploy_commit

ZERO = "0" * 40


def run_hook(deploy_dir: DeployDir, slice_name: str, lines, say=print) -> int:
    """Handle the ``OLD NEW REF`` lines git gives the hook; return its exit status."""
    try:
        config = deploy_dir.load()
        commit = None
        for line in lines:
            if not line.strip():
                continue
            _old, new, ref = line.split()
            branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
            if branch is None or not config.deploys(branch):
                say(f"accepted {ref}; only {config.branch_label()} deploys to {slice_name}")
            elif new == ZERO:
                say(f"accepted the deletion of {ref}; {slice_name} keeps serving")
            else:
                commit = new
        if commit is None:
            return 0
        say(f"deploying {commit[:7]} to {slice_name}")
        with slice_lock(deploy_dir, slice_name, say):
            # The pushed objects sit in git's quarantine until this hook succeeds;
            # the GIT_* variables that say where are kept for the checkout.
            deploy_commit(deploy_dir, config, slice_name, commit, say, git_env=dict(os.environ))
        return 0
    except DeployError as e:
        say(f"DEPLOY FAILED, {slice_name} keeps serving its previous release: {e}")
    except Exception:
        say(f"DEPLOY FAILED, {slice_name} keeps serving its previous release:\n"
            + traceback.format_exc())
    return 1
