"""A plain ``pip install .`` ships every twistd plugin (no editable-install luck)."""

import site
import subprocess
import sys
import venv

from helpers import ROOT

PLUGINS = ["dockpart-web", "dockpart-infra", "dockpart-forward", "dockpart-writer", "dockpart-socat",
           "dockpart-fileweb", "dockpart-proxy"]


def test_pip_install_lists_every_plugin_in_twistd_help(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # Dependencies come from this environment (a .pth file); dockpart is built from the tree.
    purelib = subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    with open(f"{purelib}/deps.pth", "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
                   check=True, cwd=tmp_path, timeout=300)
    twistd = subprocess.run([py, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    for name in PLUGINS:
        assert name in twistd.stdout, twistd.stdout + twistd.stderr
    where = subprocess.check_output(
        [py, "-c", "import dockpart, twisted.plugins.dockpart_plugins as p; print(dockpart.__file__, p.__file__)"],
        text=True, cwd=tmp_path)
    assert where.count(str(env_dir)) == 2, where
