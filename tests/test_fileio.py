"""File IO on real sockets and processes: dockpart-socat beside the real socat, the writer, fileweb."""

import os
import shutil
import signal
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import requests

from dockpart.files import write_atomically
from dockpart.socatlike import crlf
from helpers import BIN, Daemon, GaveUp, free_port, port_open, wait_for

#: A file already holding CRLF, lone CRs and a CR as the last byte of socat's 8 KiB buffer.
MIXED = b"a\nb\r\nc\rd\n\n\r\r\ne" + b"x" * (8192 - 17) + b"\r\nafter the buffer edge\n"
CONTENTS = {
    "lf": b"line one\nline two\n\nline four without end",
    "crlf": MIXED,
    "empty": b"",
    # Bigger than a chunk of ours (64 KiB) and of socat's (8 KiB), every byte value.
    "binary": bytes(range(256)) * 1024 + os.urandom(70_000),
}


def read_all(port: int, timeout: float = 10.0, rcvbuf: int | None = None) -> bytes:
    """Connect, read until the server closes, return what came."""
    with socket.socket() as s:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        return receive_rest(s)


def receive_rest(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on ``port`` (ss's Recv-Q)."""
    line = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                          check=True).stdout.split()
    return int(line[1])


def listen_on(port: int) -> str:
    return f"tcp:{port}:interface=127.0.0.1"


def replace(path, data: bytes) -> None:
    """Swap the served file's content the way the writer does (write aside, rename)."""
    write_atomically(path, data)


class RealSocat:
    """The seed's ``socat TCP-LISTEN:PORT,fork,reuseaddr[,crlf] OPEN:FILE,rdonly`` on loopback."""

    def __init__(self, path, crlf_lines: bool):
        self.port = free_port()
        option = ",crlf" if crlf_lines else ""
        self.proc = subprocess.Popen(
            [shutil.which("socat"),
             f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr{option}",
             f"OPEN:{path},rdonly"], start_new_session=True)
        wait_for(lambda: port_open(self.port), what=f"socat on {self.port}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("fileio") / "served"
    path.write_bytes(b"")
    return path


@pytest.fixture(scope="module")
def listeners(served):
    """Ours and socat's, with and without crlf, all serving the same file."""
    started = {}
    try:
        for mode, flag in (("raw", []), ("crlf", ["--crlf"])):
            port = free_port()
            ours = Daemon("dockpart-socat", "--listen", listen_on(port), "--file", str(served),
                          *flag, ready="dockpart-socat listening on").start()
            ours.port = port
            started[mode] = ours, RealSocat(served, mode == "crlf")
        yield started
    finally:
        for ours, theirs in started.values():
            ours.stop()
            theirs.stop()


@pytest.mark.parametrize("mode", ["raw", "crlf"])
@pytest.mark.parametrize("name", sorted(CONTENTS))
def test_same_bytes_as_real_socat(listeners, served, mode, name):
    """For each kind of file, our listener sends exactly what socat sends, crlf or not."""
    replace(served, CONTENTS[name])
    ours, theirs = listeners[mode]
    expected = crlf(CONTENTS[name]) if mode == "crlf" else CONTENTS[name]
    socat_sent = read_all(theirs.port)
    assert socat_sent == expected, "socat itself behaves differently than measured"
    assert read_all(ours.port) == socat_sent


def test_netcat_gets_the_file(listeners, served):
    """``nc 127.0.0.1 PORT`` prints the file (with CRLF line ends) and exits."""
    replace(served, b"first\nsecond\n")
    ours, _ = listeners["crlf"]
    done = subprocess.run(["nc", "127.0.0.1", str(ours.port)], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=10)
    assert done.stdout == b"first\r\nsecond\r\n"


def test_200_concurrent_clients_each_get_the_whole_file(listeners, served):
    data = os.urandom(256 * 1024)
    replace(served, data)
    ours, _ = listeners["raw"]
    start = threading.Barrier(200)

    def client(_):
        start.wait(10)
        return read_all(ours.port, timeout=20)

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(client, range(200)))
    assert [len(r) for r in results] == [len(data)] * 200
    assert all(r == data for r in results)


def test_file_replaced_mid_read_gives_each_reader_old_or_new_whole(listeners, served):
    """Readers halfway through the old file finish it; readers after the rename get the new."""
    old, new = b"old\n" * 2_000_000, b"new!\n" * 1_000_000  # 8 MiB and 5 MiB
    replace(served, old)
    ours, _ = listeners["raw"]
    early = []
    for _ in range(20):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", ours.port))
        early.append((s, s.recv(100)))  # started: the server is mid-stream
    replace(served, new)
    late = [read_all(ours.port) for _ in range(5)]
    for s, first in early:
        with s:
            assert first + receive_rest(s) == old
    assert late == [new] * 5


def test_writer_rewrites_never_show_half_a_file(tmp_path):
    """The real writer rewriting 20 times a second: every read is one whole text of its kind."""
    port = free_port()
    path = tmp_path / "random"
    writer = Daemon("dockpart-writer", "--file", str(path), "--interval", "0.05",
                    "--size", "200000", "--listen", listen_on(port),
                    ready="dockpart-writer wrote").start()
    try:
        wait_for(lambda: port_open(port), what="the writer's listener")
        seen = set()

        def five_texts_read_whole() -> bool:
            text = read_all(port)
            *lines, end = text.split(b"\r\n")  # 200000 = 3125 lines of 64
            if not (end == b"" and len(lines) == 3125
                    and all(len(line) == 64 and line.isalnum() for line in lines)):
                raise GaveUp(f"a read of {len(text)} bytes was not one whole text")
            seen.add(text)
            return len(seen) >= 5

        # The pace itself is the Clock test's (test_fileio_units); here: reads during rewrites.
        wait_for(five_texts_read_whole, 60, interval=0, what="five different texts, each whole")
    finally:
        writer.stop()
    assert os.listdir(tmp_path) == ["random"], "temporary files left behind"


def test_writer_serves_with_real_socat_when_told(tmp_path):
    """``DOCKPART_SERVE=socat``: the real socat, with the seed's options, serves the file."""
    port = free_port()
    path = tmp_path / "random"
    writer = Daemon("dockpart-writer", "--file", str(path), "--listen", listen_on(port),
                    env={"DOCKPART_SERVE": "socat"}, ready="dockpart-writer wrote").start()
    try:
        assert f"TCP-LISTEN:{port},fork,reuseaddr,crlf,bind=127.0.0.1" in writer.output()
        wait_for(lambda: port_open(port), what="socat started by the writer")
        assert read_all(port) == crlf(path.read_bytes())
        os.kill(writer.proc.pid, signal.SIGTERM)  # like `docker stop`: only the writer is told
        writer.proc.wait(10)
        wait_for(lambda: not port_open(port), timeout=5, what="socat to stop with the writer")
    finally:
        writer.stop()


def test_missing_or_unreadable_file_resets_and_logs(tmp_path):
    port = free_port()
    daemon = Daemon("dockpart-socat", "--listen", listen_on(port), "--file",
                    str(tmp_path / "nothing"), ready="listening on").start()
    try:
        with pytest.raises(ConnectionResetError):
            read_all(port)
        wait_for(lambda: "No such file or directory" in daemon.output(), what="the reason logged")
        (tmp_path / "nothing").mkdir()  # a directory cannot be read as a file
        with pytest.raises(ConnectionResetError):
            read_all(port)
        wait_for(lambda: "Is a directory" in daemon.output(), what="the reason logged")
    finally:
        daemon.stop()


def test_max_connections_makes_the_next_client_wait(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"z" * (32 * 1024 * 1024))
    port = free_port()
    daemon = Daemon("dockpart-socat", "--listen", listen_on(port), "--file", str(path),
                    "--max-connections", "2", ready="listening on").start()
    try:
        holders = []
        for _ in range(2):  # two clients that do not read: the server cannot finish them
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.recv(10)
            holders.append(s)
        waiting = socket.create_connection(("127.0.0.1", port), timeout=20)
        # Queued, not served: it sits in the listening socket's accept queue.
        wait_for(lambda: accept_queue(port) == 1, 10, what="the third client to wait in the queue")
        holders.pop().close()
        waiting.settimeout(20)
        assert len(receive_rest(waiting)) == 32 * 1024 * 1024
        waiting.close()
        holders.pop().close()
    finally:
        daemon.stop()


def test_clients_that_never_read_are_cut_off_after_the_timeout(tmp_path):
    """socat's -T: a client holding the only slot without reading is cut off after --timeout,
    and the client waiting in the listen queue gets the whole file."""
    path = tmp_path / "big"
    path.write_bytes(b"z" * (32 * 1024 * 1024))
    port = free_port()
    daemon = Daemon("dockpart-socat", "--listen", listen_on(port), "--file", str(path),
                    "--max-connections", "1", "--timeout", "0.5", ready="listening on").start()
    try:
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            holder.connect(("127.0.0.1", port))
            holder.recv(10)  # served, then never reads again
            with socket.create_connection(("127.0.0.1", port), timeout=20) as waiting:
                assert len(receive_rest(waiting)) == 32 * 1024 * 1024
        assert "took nothing for 0.5 s" in daemon.output()
    finally:
        daemon.stop()


def test_restart_on_the_same_port_right_away(tmp_path):
    """reuseaddr: the server closes first (TIME_WAIT on its port) and a restart still binds."""
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    port = free_port()
    args = ("dockpart-socat", "--listen", listen_on(port), "--file", str(path))
    daemon = Daemon(*args, ready="listening on").start()
    assert read_all(port) == b"hello\n"
    daemon.stop()
    daemon = Daemon(*args, ready="listening on").start()
    try:
        assert read_all(port) == b"hello\n"
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def fileweb_setup(tmp_path_factory):
    """dockpart-socat (crlf) on a file and dockpart-fileweb in front of it."""
    path = tmp_path_factory.mktemp("fileweb") / "random"
    path.write_bytes(b"one\n")
    source, web = free_port(), free_port()
    socat = Daemon("dockpart-socat", "--listen", listen_on(source), "--file", str(path),
                   "--crlf", ready="listening on").start()
    fileweb = Daemon("dockpart-fileweb", "--listen", listen_on(web),
                     "--source", f"tcp:127.0.0.1:{source}", "--max-bytes", "100000",
                     ready="dockpart-fileweb listening on").start()
    yield path, f"http://127.0.0.1:{web}/"
    fileweb.stop()
    socat.stop()


def test_fileweb_answers_with_the_current_file(fileweb_setup):
    path, url = fileweb_setup
    replace(path, b"first text\n")
    first = requests.get(url, timeout=10)
    assert (first.status_code, first.content) == (200, b"first text\r\n")
    assert first.headers["content-type"].startswith("text/plain")
    assert first.headers["x-content-type-options"] == "nosniff"  # never sniffed as HTML
    replace(path, b"second text\n")
    assert requests.get(url + "any/path", timeout=10).content == b"second text\r\n"


def test_fileweb_says_502_for_a_source_that_sends_too_much(fileweb_setup):
    path, url = fileweb_setup
    replace(path, b"x" * 200_000)
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 502
    assert "more than 100000 bytes" in answer.text


def test_fileweb_says_502_when_the_source_is_down():
    web, nobody = free_port(), free_port()
    fileweb = Daemon("dockpart-fileweb", "--listen", listen_on(web),
                     "--source", f"tcp:127.0.0.1:{nobody}", ready="listening on").start()
    try:
        answer = requests.get(f"http://127.0.0.1:{web}/", timeout=10)
        assert answer.status_code == 502
        assert answer.text.startswith("502 Bad Gateway: cannot reach the source")
        assert "refused" in answer.text
    finally:
        fileweb.stop()


@contextmanager
def fileweb_on_a_stalling_source(timeout: str):
    """A fileweb whose source accepts (in the kernel) and never says anything."""
    with socket.socket() as stalling:
        stalling.bind(("127.0.0.1", 0))
        stalling.listen(5)
        web = free_port()
        fileweb = Daemon("dockpart-fileweb", "--listen", listen_on(web), "--timeout", timeout,
                         "--source", f"tcp:127.0.0.1:{stalling.getsockname()[1]}",
                         ready="listening on").start()
        try:
            yield stalling, web, fileweb
        finally:
            fileweb.stop()


def test_fileweb_says_504_when_the_source_stalls():
    """(That it waits the whole idle time first is shown on a Clock in test_fileio_units.)"""
    with fileweb_on_a_stalling_source("0.5") as (_, web, _):
        answer = requests.get(f"http://127.0.0.1:{web}/", timeout=10)
        assert answer.status_code == 504
        assert answer.text.startswith("504 Gateway Timeout: the source sent nothing for 0.5 s")
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_a_busy_port_stops_the_daemon_with_the_reason(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        done = subprocess.run(
            [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "dockpart-socat",
             "--listen", listen_on(taken.getsockname()[1]), "--file", str(tmp_path / "f")],
            capture_output=True, text=True, timeout=20)
    assert done.returncode != 0
    assert "Address already in use" in done.stdout + done.stderr


def test_fileweb_hangs_up_on_the_source_when_the_browser_leaves():
    with fileweb_on_a_stalling_source("5") as (stalling, web, fileweb):
        with socket.create_connection(("127.0.0.1", web), timeout=5) as browser:
            browser.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            stalling.settimeout(5)
            fetch, _ = stalling.accept()
        with fetch:  # the browser is gone: fileweb drops its fetch at once, not after 5 s
            fetch.settimeout(2)
            try:
                assert fetch.recv(10) == b""
            except ConnectionResetError:
                pass
    assert "504" not in fileweb.output() and "Traceback" not in fileweb.output()


@pytest.mark.parametrize("args, message", [
    (["dockpart-fileweb", "--listen", "tcp:notaport"], "--listen 'tcp:notaport'"),
    (["dockpart-fileweb", "--source", "nonsense:x"], "--source 'nonsense:x'"),
    (["dockpart-socat", "--listen", "tcp:notaport"], "--listen 'tcp:notaport'"),
    (["dockpart-writer", "--listen", "tcp:notaport"], "--listen 'tcp:notaport'"),
])
def test_a_bad_endpoint_is_a_usage_error_not_a_traceback(args, message):
    done = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", *args], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
