"""``git push ssh://...`` to an app through a real sshd on loopback: a key added with
``dockpart apps keys add`` may push (its forced command runs git-receive-pack on the app's
repository, whose hook releases and rolls over) and do nothing else.

The test runs its own sshd (its own port, host key, configuration and authorized_keys file,
as root, which may log in only with a forced command); the machine's sshd is never touched.
"""

import os
import shutil
import subprocess
import sys

import pytest

from dockpart.deploy.cli import main
from helpers import free_port, wait_for, port_open
from test_apps import get
from test_apps_push import create, git, push, source, tier  # noqa: F401 (fixture)

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test sshd logs in as root")


@pytest.fixture
def sshd(tmp_path):
    """A sshd of the test's own on a free loopback port; a client key for the pusher."""
    conf = tmp_path / "sshd"
    conf.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(conf / "host")],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(conf / "client")],
                   check=True)
    port = free_port()
    keys_file = tmp_path / "apps" / ".ssh" / "authorized_keys"
    (conf / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {conf / 'host'}\n"
        f"PidFile {conf / 'sshd.pid'}\nAuthorizedKeysFile {keys_file}\n"
        "PermitRootLogin forced-commands-only\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "AllowTcpForwarding no\nX11Forwarding no\nPrintMotd no\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(conf / "sshd.log", "wb"))
    try:
        wait_for(lambda: port_open(port), 10, what="the test's sshd to listen")
        ssh = (f"ssh -i {conf / 'client'} -p {port} -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR")
        yield port, conf / "client.pub", ssh
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_key_added_may_git_push_over_ssh_and_nothing_else(tier, sshd, tmp_path, capsys):
    redis, infra, proxy, state = tier
    port, public_key, ssh = sshd
    create(redis, tmp_path, "shop", "--scale", "1")
    work = source(tmp_path, "v1")
    remote = f"ssh://root@127.0.0.1:{port}/shop"
    env = {**os.environ, "GIT_SSH_COMMAND": ssh}

    def ssh_push(target=remote):
        return subprocess.run(["git", "push", target, "main"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)

    refused = ssh_push()  # no key yet
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert main(["apps", "keys", "add", str(public_key),
                 "--apps-dir", str(tmp_path / "apps")]) == 0
    assert "added the key" in capsys.readouterr().out
    pushed = ssh_push()
    assert pushed.returncode == 0, pushed.stderr
    assert "shop serves v1" in pushed.stderr
    assert get(proxy, "shop.localhost").text.startswith("v1 on port")
    # The key runs git on the apps' repositories, nothing else.
    shell = subprocess.run([*ssh.split(), "root@127.0.0.1", "id"], capture_output=True,
                           text=True, timeout=30)
    assert shell.returncode != 0 and "can only git push" in shell.stderr
    elsewhere = ssh_push(f"ssh://root@127.0.0.1:{port}/../../etc")
    assert elsewhere.returncode != 0 and "not a DNS label" in elsewhere.stderr
    nobody = ssh_push(f"ssh://root@127.0.0.1:{port}/blog")
    assert nobody.returncode != 0 and "no app named blog" in nobody.stderr
