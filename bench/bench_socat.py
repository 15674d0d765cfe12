#!/usr/bin/env python3
"""dockpart-socat against the real socat: connections per second, failures, and memory.

    /work/venv/bin/python bench/bench_socat.py [--seconds 5] [--big-clients 20]

1. The same 4 KiB file served by our listener and by ``socat TCP-LISTEN:PORT,fork,reuseaddr,crlf
   OPEN:FILE,rdonly``; clients on loopback, 50 then 200 at a time, each connecting, reading to
   the end and starting over for ``--seconds``.  A connection counts as failed when it errs,
   stalls for 5 s or brings fewer bytes than the file.
2. Peak memory of our listener (VmRSS sampled, and VmHWM) while 20 clients read a 1 GiB file,
   made in a temporary folder and deleted afterwards.

Every load is bounded in count and time; nothing leaves loopback.
"""

import argparse
import multiprocessing
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CONNECT_TIMEOUT = 5.0
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def start(argv: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_port(port)
    time.sleep(0.3)  # the probe connection of wait_port is finished
    return proc


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def ours(port: int, path: Path, *extra: str) -> subprocess.Popen:
    return start([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=/dev/null", "dockpart-socat",
                  "--listen", f"tcp:{port}:interface=127.0.0.1", "--file", str(path), *extra],
                 port)


def real_socat(port: int, path: Path) -> subprocess.Popen:
    return start([shutil.which("socat"), f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,crlf",
                  f"OPEN:{path},rdonly"], port)


# --- connections per second -------------------------------------------------------------------

def _client_process(port: int, expected: int, clients: int, seconds: float, queue) -> None:
    """Keeps ``clients`` connections going on one epoll loop (asyncio costs more than socat)."""
    poller, open_, counts = select.epoll(), {}, {"ok": 0, "in time": 0, "short": 0}

    def connect() -> None:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        poller.register(s.fileno(), select.EPOLLIN)
        open_[s.fileno()] = [s, 0, time.monotonic()]

    def finish(fd: int, outcome: str) -> None:
        s = open_.pop(fd)[0]
        poller.unregister(fd)
        s.close()
        counts[outcome] = counts.get(outcome, 0) + 1
        if time.monotonic() < until:
            counts["in time"] += outcome == "ok"
            connect()

    started = time.monotonic()
    until = started + seconds
    for _ in range(clients):
        connect()
    next_check = started + 0.1
    while open_:
        for fd, _ in poller.poll(0.1):
            conn = open_[fd]
            try:
                data = conn[0].recv(65536)
            except OSError as e:
                finish(fd, type(e).__name__)
                continue
            if data:
                conn[1] += len(data)
            else:
                finish(fd, "ok" if conn[1] == expected else "short")
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.1
            for fd in [fd for fd, c in open_.items() if now - c[2] > CONNECT_TIMEOUT]:
                finish(fd, "TimeoutError")
    queue.put(counts)


def load(port: int, expected: int, clients: int, seconds: float) -> dict:
    """``clients`` connections at a time for ``seconds``, from one client process (it keeps up)."""
    queue = multiprocessing.Queue()
    worker = multiprocessing.Process(target=_client_process,
                                     args=(port, expected, clients, seconds, queue))
    worker.start()
    counts = queue.get(timeout=seconds + 2 * CONNECT_TIMEOUT + 30)
    worker.join(10)
    return counts


def connection_rates(seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-socat-") as folder:
        path = Path(folder) / "random"
        path.write_bytes((os.urandom(2016).hex()[:63] + "\n").encode() * 64)  # 4 KiB, 64 lines
        expected = len(path.read_bytes().replace(b"\n", b"\r\n"))
        print(f"4 KiB file ({expected} bytes sent with crlf), {seconds:g} s per run")
        print(f"{'server':<18}{'clients':>8}{'conn/s':>10}{'ok':>9}{'failed':>8}  failures")
        for name, server in (("dockpart-socat", lambda p: ours(p, path, "--crlf")),
                             ("socat (fork)", lambda p: real_socat(p, path))):
            for clients in (50, 200):
                port = free_port()
                proc = server(port)
                try:
                    r = load(port, expected, clients, seconds)
                finally:
                    stop(proc)
                failed = {k: v for k, v in r.items() if k not in ("ok", "in time") and v}
                print(f"{name:<18}{clients:>8}{r['in time'] / seconds:>10.0f}{r['ok']:>9}"
                      f"{sum(failed.values()):>8}  {failed or ''}", flush=True)


# --- memory while streaming a big file ----------------------------------------------------------

def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def big_file_memory(clients: int, size: int, timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-socat-big-", dir=os.environ.get("TMPDIR")) as folder:
        path = Path(folder) / "big"
        block = os.urandom(MiB)
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(block)
        port = free_port()
        proc = ours(port, path)
        try:
            before = status_kib(proc.pid, "VmRSS")
            peak, received, errors = before, [0] * clients, []

            def read(i: int) -> None:
                buffer = bytearray(MiB)
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                        while n := s.recv_into(buffer):
                            received[i] += n
                except OSError as e:
                    errors.append(repr(e))

            threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(clients)]
            started = time.monotonic()
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads) and time.monotonic() - started < timeout:
                peak = max(peak, status_kib(proc.pid, "VmRSS"))
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            hwm = status_kib(proc.pid, "VmHWM")
        finally:
            stop(proc)
    whole = sum(r == size for r in received)
    print(f"{clients} clients x {size // MiB} MiB file: {whole}/{clients} got it all in "
          f"{elapsed:.1f} s ({sum(received) / MiB / elapsed:.0f} MiB/s in all); listener RSS "
          f"{before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB sampled "
          f"(+{(peak - before) / 1024:.1f} MiB), VmHWM {hwm / 1024:.1f} MiB"
          + (f"; errors: {errors[:3]}" if errors else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    parser.add_argument("--big-clients", type=int, default=20)
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the big file")
    parser.add_argument("--big-timeout", type=float, default=180.0)
    args = parser.parse_args()
    connection_rates(args.seconds)
    big_file_memory(args.big_clients, args.big_mib * MiB, args.big_timeout)


if __name__ == "__main__":
    main()
