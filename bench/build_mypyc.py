"""A copy of this checkout with the proxy's per-request modules compiled by mypyc, to measure.

Copies the checkout's tracked files to DEST (emptied first), compiles there with
``.venv/bin/mypyc`` the modules every request goes through, and gives DEST a virtualenv,
``DEST/.venv``, whose Python imports DEST's ``dockpart`` (the compiled modules) and everything
else from this checkout's ``.venv`` (a ``.pth`` file, as ``.venv-pypy`` does).  The checkout
itself is left as it is: the proxy ships interpreted.

    .venv/bin/python bench/build_mypyc.py [--dest /tmp/dockpart-mypyc] [MODULE ...]
    .venv/bin/python bench/bench_proxy.py --compare-venv /tmp/dockpart-mypyc/.venv \\
        --compare-label "CPython, mypyc"
    cd /tmp/dockpart-mypyc && .venv/bin/python -m pytest tests/test_proxy.py   # its tests
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: What a request goes through, from its first byte to its answer's last, on CPython (whose
#: parser is httptools: dockpart.http11, compiled, fails at run time, see docs/benchmarks.md).
MODULES = ["proxy_exchange", "proxy_framing", "proxy_dispatch", "proxy_client", "proxy_upstream",
           "proxy_backends", "proxy_limits", "proxy_retry"]
#: Attributes declared narrower than what they hold (a ``type: ignore``'d default, or a ``None``
#: that mypy takes for the type): compiled code checks the type on every assignment and raises
#: a TypeError, so the copy declares them ``Any``.
ADAPTED = {
    "proxy_exchange": [
        ("    _paused: set = frozenset()  # type: ignore[assignment]",
         "    _paused: Any = frozenset()"),
        ("        self.backends: BackendSet = None  # type: ignore[assignment]",
         "        self.backends: Any = None"),
        ("        self.held = None  #", "        self.held: Any = None  #"),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default="/tmp/dockpart-mypyc",
                        help="where the copy goes (replaced if an earlier copy)")
    parser.add_argument("modules", nargs="*", default=MODULES,
                        help="modules of dockpart/ to compile (default: %(default)s)")
    args = parser.parse_args()
    dest = Path(args.dest).resolve()
    if dest == ROOT or ROOT in dest.parents:
        sys.exit("--dest must be outside this checkout: mypyc writes .so files beside the sources")
    if dest.exists() and not (dest / ".venv" / "bin" / "twistd").exists():
        sys.exit(f"{dest} exists and is no copy this script made: give another --dest")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for module, changes in ADAPTED.items():
        source = dest / "dockpart" / f"{module}.py"
        text = source.read_text()
        for old, new in changes:
            if old not in text:
                sys.exit(f"{source}: no longer has {old.strip()!r}: see ADAPTED")
            text = text.replace(old, new)
        source.write_text(text)
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "mypyc"), *(f"dockpart/{m}.py" for m in args.modules)],
                   cwd=dest, check=True)

    env = dest / ".venv"
    venv.EnvBuilder(with_pip=False).create(env)
    site = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
    ours = sysconfig.get_paths()["purelib"]
    # DEST first (the compiled dockpart and mypyc's shared module), then our packages: the
    # editable install's path to this checkout comes after, so DEST's dockpart wins.
    (site / "dockpart-mypyc.pth").write_text(f"{dest}\nimport site; site.addsitedir({ours!r})\n")
    twistd = (bin_dir / "twistd").read_text().split("\n", 1)[1]
    (env / "bin" / "twistd").write_text(f"#!{env / 'bin' / 'python'}\n{twistd}")
    (env / "bin" / "twistd").chmod(0o755)

    loaded = subprocess.run(
        [str(env / "bin" / "python"), "-c",
         f"import importlib; print(*(importlib.import_module('dockpart.' + m).__file__ "
         f"for m in {args.modules!r}), sep='\\n')"],
        cwd=env, capture_output=True, text=True, check=True).stdout.split()
    interpreted = [path for path in loaded if not path.endswith(".so")]
    if interpreted:
        sys.exit(f"not compiled: {interpreted}")
    print(f"{len(loaded)} modules compiled in {dest}; measure them with\n"
          f"  .venv/bin/python bench/bench_proxy.py --compare-venv {env} "
          f"--compare-label 'CPython, mypyc'")


if __name__ == "__main__":
    main()
