"""The hook's side of a slice's forwarder: start it unless it runs, point it, stop it.

The forwarder itself (:mod:`dockpart.deploy.forward`) is a ``twistd`` daemon; this module
runs in the blocking command-line program and knows it only by its pid file, log file and
target file in ``DIR/run/``.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from dockpart.deploy.forward import DEFAULT_BIND_TIMEOUT, read_target
from dockpart.deploy.repos import DeployConfig, DeployDir, DeployError
from dockpart.files import write_atomically

#: The line the forwarder logs once its port is bound.
LISTENING = "dockpart-forward listening on"
#: Seconds the forwarder has to start, on top of the time it may retry a port in use.
START_TIMEOUT = 15.0


def _paths(deploy_dir: DeployDir, slice_name: str) -> tuple[Path, Path, Path]:
    run = deploy_dir.run
    return run / f"{slice_name}.target", run / f"{slice_name}-forward.pid", run / f"{slice_name}-forward.log"


def forwarder_pid(deploy_dir: DeployDir, slice_name: str) -> int | None:
    """The pid of the slice's running forwarder, or None."""
    pidfile = _paths(deploy_dir, slice_name)[1]
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"dockpart-forward" in cmdline else None


def set_target(deploy_dir: DeployDir, slice_name: str, host: str, port: int) -> None:
    """Send the slice's new connections to HOST:PORT from now on (atomic)."""
    write_atomically(_paths(deploy_dir, slice_name)[0], f"{host}:{port}\n")


def current_target(deploy_dir: DeployDir, slice_name: str) -> tuple[str, int] | None:
    try:
        return read_target(_paths(deploy_dir, slice_name)[0])
    except (OSError, ValueError):
        return None


def _log_since(path: Path, offset: int) -> str:
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return ""


def ensure_forwarder(deploy_dir: DeployDir, config: DeployConfig, slice_name: str,
                     say=print, bind_timeout: float = DEFAULT_BIND_TIMEOUT) -> int:
    """Start the slice's forwarder unless it runs; return its pid once its port is bound."""
    pid = forwarder_pid(deploy_dir, slice_name)
    if pid:
        return pid
    target, pidfile, logfile = _paths(deploy_dir, slice_name)
    port = config.ports[slice_name]
    say(f"starting the forwarder of {slice_name} on {config.host}:{port}")
    # Not our running forwarder: a stale pid file (its pid may even be a zombie) would stop twistd.
    pidfile.unlink(missing_ok=True)
    offset = logfile.stat().st_size if logfile.exists() else 0
    twistd = Path(sys.executable).parent / "twistd"
    # twistd without -n daemonizes and points its stdio at /dev/null, so a git push does not
    # wait for it; its first process exits once the daemon runs, or with the reason.
    started = subprocess.run(
        [str(twistd), f"--pidfile={pidfile}", f"--logfile={logfile}", "dockpart-forward",
         "--listen", f"tcp:{port}:interface={config.host}", "--target-file", str(target),
         "--bind-timeout", f"{bind_timeout:g}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=deploy_dir.run,
        timeout=START_TIMEOUT)
    deadline = time.monotonic() + bind_timeout + START_TIMEOUT
    told = False
    while started.returncode == 0 and time.monotonic() < deadline:
        log = _log_since(logfile, offset)
        pid = forwarder_pid(deploy_dir, slice_name)
        if LISTENING in log and pid:
            return pid
        if "is in use" in log and not told:
            say(f"port {port} is in use (a TIME_WAIT connection?); the forwarder keeps trying "
                f"for up to {bind_timeout:g} s")
            told = True
        if "gave up" in log:
            break
        time.sleep(0.05)
    said = (started.stderr + started.stdout).strip().splitlines()
    raise DeployError(f"the forwarder of {slice_name} did not start on port {port}: "
                      f"{_reason(logfile, offset, said[0] if said else 'no word from it')} "
                      f"(log: {logfile})")


#: A log line that names an exception: ``twisted.internet.error.CannotListenError: ...``.
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")
_CHAINED = "above exception"


def _reason(logfile: Path, offset: int, fallback: str, wait: float = 2.0) -> str:
    """Why the forwarder stopped, from its log: its 'gave up' line or its exception in full.

    twistd's own message cuts the exception short; the log has it, once the dying daemon's
    last lines are written (waited for, briefly).
    """
    deadline = time.monotonic() + wait
    while True:
        lines = [line.split("] ", 1)[-1] for line in _log_since(logfile, offset).splitlines()]
        found = ([line for line in lines if "gave up" in line]
                 or [line for line in lines if _EXCEPTION.match(line)])
        # A chained exception ("During handling of the above exception...") ends with its last one.
        chained = found and any(_CHAINED in line for line in lines[lines.index(found[-1]):])
        if (found and not chained) or time.monotonic() > deadline:
            return found[-1] if found else fallback
        time.sleep(0.05)


def stop_forwarder(deploy_dir: DeployDir, slice_name: str, timeout: float = 10.0) -> bool:
    """Stop the slice's forwarder; False if none ran."""
    pid = forwarder_pid(deploy_dir, slice_name)
    if not pid:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    return True
