"""Apps' logs: what their instances print, gathered by infra into one capped Redis stream per
app (:func:`keys.app_log`), which ``dockpart apps logs NAME [-f] [-n N]`` reads from anywhere.

The process driver writes each instance's output to ``dockpart-web-PORT.log`` in the app's
state directory (kept after the instance is removed); :class:`LogTail` reads what was added
since its last look, in the driver's thread pool, a bounded amount per look.  The docker
driver's containers are asked for their lines since the last one seen
(:class:`ContainerLogTail`).  Either way, what was there when infra started is not read
again: a restarted infra does not repeat it.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

from dockpart import keys
from dockpart.drivers import NAME_PREFIX

#: Lines kept per app (Redis trims to about this many).
KEEP_LINES = 5000
#: Bytes read from one file per look: a chatty instance cannot hold up the others.
READ_MOST = 256 * 1024


def _thd_read_new(state_dir: Path, offsets: dict[str, int], first: bool
                  ) -> list[tuple[int, str]]:
    """New complete lines of each instance's log, as (port, line); ``offsets`` moves on."""
    found: list[tuple[int, str]] = []
    for path in sorted(state_dir.glob(f"{NAME_PREFIX}*.log")):
        port = path.stem[len(NAME_PREFIX):]
        try:
            size = path.stat().st_size
        except OSError:
            continue
        at = offsets.setdefault(str(path), size if first else 0)
        if size < at:  # truncated or replaced: from its start
            at = 0
        if size == at or not port.isdigit():
            offsets[str(path)] = at
            continue
        with open(path, "rb") as f:
            f.seek(at)
            chunk = f.read(READ_MOST)
        end = chunk.rfind(b"\n") + 1
        if end == 0 and len(chunk) < READ_MOST:
            continue  # half a line: the rest next time
        end = end or len(chunk)
        offsets[str(path)] = at + end
        found.extend((int(port), line) for line in
                     chunk[:end].decode(errors="replace").splitlines())
    return found


def _thd_container_lines(client, labels: list[str], port_label: str, seen: dict[str, str],
                         first: bool) -> list[tuple[int, str]]:
    """New lines of each running container with ``labels``, as (port, line); ``seen`` holds
    the timestamp of the last line read per container."""
    found = []
    now = int(time.time())
    for c in client.containers.list(filters={"label": labels}):
        port = c.labels.get(port_label, "")
        last = seen.get(c.id)
        if last is None:
            last = seen[c.id] = "" if not first else datetime.fromtimestamp(
                now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        since = ({"since": int(datetime.fromisoformat(last[:19] + "+00:00").timestamp())}
                 if last else {})  # from its first line
        raw = c.logs(timestamps=True, stdout=True, stderr=True, **since)
        for item in raw.decode(errors="replace").splitlines():
            stamp, _, line = item.partition(" ")
            if stamp > last and port.isdigit():  # RFC 3339 in UTC, nanoseconds: they sort
                found.append((int(port), line))
                seen[c.id] = last = stamp
    return found


class _Tail:
    """Moves an app's new output lines into its stream, a look at a time."""

    name: str

    async def read(self) -> list[tuple[int, str]]:
        raise NotImplementedError

    async def look(self, redis) -> int:
        """Publish the new lines; how many there were."""
        lines = await self.read()
        for port, line in lines:
            await redis.call("XADD", keys.app_log(self.name), "MAXLEN", "~", KEEP_LINES, "*",
                             "port", port, "line", line)
        return len(lines)


class LogTail(_Tail):
    """The process driver's instances' log files."""

    def __init__(self, name: str, state_dir: Path, pool):
        self.name = name
        self.state_dir = state_dir
        self.pool = pool
        self.offsets: dict[str, int] = {}
        self._first = True

    async def read(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.state_dir):
            return []
        lines = await self.pool.run(_thd_read_new, self.state_dir, self.offsets, self._first)
        self._first = False
        return lines


class ContainerLogTail(_Tail):
    """The docker driver's containers' output (``docker logs``)."""

    def __init__(self, name: str, driver, labels: list[str], port_label: str):
        self.name = name
        self.driver = driver
        self.labels = labels
        self.port_label = port_label
        self.seen: dict[str, str] = {}
        self._first = True

    async def read(self) -> list[tuple[int, str]]:
        lines = await self.driver._call(_thd_container_lines, self.labels, self.port_label,
                                        self.seen, self._first)
        self._first = False
        return lines
