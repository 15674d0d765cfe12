"""dockpart-writer: rewrite a file with fresh random text at start and every interval, and serve it.

The seed's writer container: a file of random text, rewritten every two minutes, served on
port 7000.  Each rewrite goes to a temporary file beside the target and is renamed over it,
so a reader sees the whole old text or the whole new one, never half.  ``--serve`` (or
``DOCKPART_SERVE``) picks who serves it: ``dockpart`` (our listener, in this process),
``socat`` (the real ``socat`` with the seed's exact options, as a child process kept running),
or ``none``.  Run it with ``twistd -n dockpart-writer --file random --interval 120``.
"""

import os
import random
import re
import shutil
import string

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage
from twisted.runner.procmon import ProcessMonitor

from dockpart import socatlike
from dockpart.files import write_atomically

SERVE_ENV = "DOCKPART_SERVE"
SERVE_CHOICES = ("dockpart", "socat", "none")
ALPHABET = string.ascii_letters + string.digits
LINE = 64
#: The text is written on the reactor thread, so it stays small.
MAX_SIZE = 1024 * 1024
#: socat's address syntax gives these characters a meaning; such a path cannot be passed to it.
SOCAT_SPECIAL = re.compile(r"[,:!\s\\'\"]")
TCP_LISTEN = re.compile(r"^tcp:(?:port=)?(\d+)(?::interface=([0-9a-fA-F.:]+))?$")

log = Logger()


#: Random bytes below 248 (4 x 62) map evenly onto ALPHABET; the others are dropped.
_TO_ALPHABET = bytes(ord(ALPHABET[i % len(ALPHABET)]) for i in range(256))
_UNEVEN = bytes(range(len(ALPHABET) * (256 // len(ALPHABET)), 256))


def random_text(size: int, rng: random.Random) -> bytes:
    """``size`` random letters and digits in lines of 64, each ending with LF.

    Made from whole random byte strings, not a call per character: it runs on the reactor
    thread, and ``choices`` on ``SystemRandom`` took 1.7 s for the largest ``--size``.
    """
    chars = b""
    while len(chars) < size:
        chars += rng.randbytes(size).translate(_TO_ALPHABET, _UNEVEN)
    chars = chars[:size]
    return b"".join(chars[i:i + LINE] + b"\n" for i in range(0, size, LINE))


class Rewriter:
    """One rewrite per call; errors are logged so the timer keeps going."""

    def __init__(self, path: str, size: int, rng: random.Random | None = None):
        self.path = path
        self.size = size
        self.rng = rng or random.SystemRandom()

    def __call__(self) -> None:
        try:
            write_atomically(self.path, random_text(self.size, self.rng))
        except OSError as e:
            log.error("cannot rewrite {path}: {error}", path=self.path, error=e)
        else:
            log.info("dockpart-writer wrote {path}", path=self.path)


def socat_argv(socat: str, listen: str, path: str) -> list[str]:
    """The seed's ``socat TCP-LISTEN:7000,fork,reuseaddr,crlf OPEN:random,rdonly`` for ``listen``."""
    match = TCP_LISTEN.match(listen)
    if match is None:
        raise usage.UsageError(f"--serve socat needs --listen tcp:PORT[:interface=ADDRESS], "
                               f"not {listen!r}")
    if SOCAT_SPECIAL.search(path):
        raise usage.UsageError(f"--serve socat cannot pass the file name {path!r} to socat "
                               "(it contains one of , : ! quotes, backslash or space)")
    port, interface = match.groups()
    bind = f",bind={interface}" if interface else ""
    return [socat, f"TCP-LISTEN:{port},fork,reuseaddr,crlf{bind}", f"OPEN:{path},rdonly"]


class Options(usage.Options):
    synopsis = ("[--file random] [--interval 120] [--serve dockpart|socat|none] "
                f"[--listen {socatlike.DEFAULT_LISTEN}]")
    longdesc = ("Rewrite a file with random text at start and every interval, atomically, and "
                "serve it like `socat TCP-LISTEN:7000,fork,reuseaddr,crlf OPEN:random,rdonly`.")
    optParameters = [
        ["file", "f", "random", "The file to rewrite."],
        ["interval", "i", 120.0, "Seconds between rewrites (fractions allowed).", float],
        ["size", "s", 1024, f"Random characters per rewrite (newline every {LINE}).", int],
        ["serve", None, None,
         f"Who serves the file: dockpart (default), socat (the real one) or none "
         f"(env {SERVE_ENV})."],
        ["listen", "l", socatlike.DEFAULT_LISTEN,
         "Endpoint the file is served on (loopback unless told otherwise)."],
        *socatlike.SERVER_OPTIONS,  # for --serve dockpart
    ]

    def postOptions(self):
        if not self["interval"] > 0:
            raise usage.UsageError("--interval must be a positive number of seconds")
        if not 1 <= self["size"] <= MAX_SIZE:
            raise usage.UsageError(f"--size must be between 1 and {MAX_SIZE}")
        socatlike.check_options(self)
        serve = self["serve"] or os.environ.get(SERVE_ENV) or "dockpart"
        if serve not in SERVE_CHOICES:
            raise usage.UsageError(f"--serve {serve!r}: choose one of {', '.join(SERVE_CHOICES)}")
        self["serve"] = serve
        if serve == "socat":
            socat = shutil.which("socat")
            if socat is None:
                raise usage.UsageError("--serve socat: socat is not installed")
            self["socat-argv"] = socat_argv(socat, self["listen"], self["file"])


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    timer = TimerService(config["interval"], Rewriter(config["file"], config["size"]))
    timer.clock = reactor
    timer.setServiceParent(top)
    if config["serve"] == "dockpart":
        socatlike.file_listener("dockpart-writer", reactor, config["listen"], config["file"],
                                True, config["max-connections"],
                                config["timeout"]).setServiceParent(top)
    elif config["serve"] == "socat":
        monitor = ProcessMonitor(reactor=reactor)
        monitor.addProcess("socat", config["socat-argv"], env={})
        monitor.setServiceParent(top)
        log.info("dockpart-writer serving {path} with {argv}", path=config["file"],
                 argv=" ".join(config["socat-argv"]))
    return top
