"""Apps' logs: what their instances print, gathered by infra into one capped Redis stream per
app (:func:`keys.app_log`), which ``dockpart apps logs NAME [-f] [-n N]`` reads from anywhere.

The process driver writes each instance's output to ``dockpart-web-PORT.log`` in the app's
state directory (kept after the instance is removed); :class:`LogTail` reads what was added
since its last look, in the driver's thread pool, a bounded amount per look.  Files already
there when infra starts are read from their end: a restarted infra does not repeat them.
"""

from __future__ import annotations

import os
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
    found = []
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


class LogTail:
    """One app's instances' output, moved into its stream a look at a time."""

    def __init__(self, name: str, state_dir: Path, pool):
        self.name = name
        self.state_dir = state_dir
        self.pool = pool
        self.offsets: dict[str, int] = {}
        self._first = True

    async def look(self, redis) -> int:
        """Publish the new lines; how many there were."""
        if not os.path.isdir(self.state_dir):
            return 0
        lines = await self.pool.run(_thd_read_new, self.state_dir, self.offsets, self._first)
        self._first = False
        for port, line in lines:
            await redis.call("XADD", keys.app_log(self.name), "MAXLEN", "~", KEEP_LINES, "*",
                             "port", port, "line", line)
        return len(lines)
