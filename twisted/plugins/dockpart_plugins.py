"""twistd plugins for dockpart; each daemon's module is imported only when used."""

from twisted.application.service import ServiceMaker

dockpart_web = ServiceMaker(
    "dockpart web app",
    "dockpart.web",
    "The course's web app: cache, recent sites, image queue, spawn/destroy requests.",
    "dockpart-web",
)

dockpart_proxy = ServiceMaker(
    "dockpart reverse proxy",
    "dockpart.proxy",
    "Forwards HTTP requests to the backends listed in Redis, in rotation (local or shared).",
    "dockpart-proxy",
)

dockpart_infra = ServiceMaker(
    "dockpart infrastructure daemon",
    "dockpart.infra",
    "Spawns and destroys web app instances (Docker containers or local processes) as queued.",
    "dockpart-infra",
)

dockpart_forward = ServiceMaker(
    "dockpart deploy slice forwarder",
    "dockpart.deploy.forward",
    "A deploy slice's port: sends each new connection to the slice's current release.",
    "dockpart-forward",
)

dockpart_writer = ServiceMaker(
    "dockpart file writer",
    "dockpart.writer",
    "Rewrites a file with random text every interval, atomically, and serves it (ours or socat).",
    "dockpart-writer",
)

dockpart_socat = ServiceMaker(
    "dockpart socat stand-in",
    "dockpart.socatlike",
    "Serves a file's bytes to every TCP connection, like socat TCP-LISTEN,fork OPEN:file,rdonly.",
    "dockpart-socat",
)

dockpart_fileweb = ServiceMaker(
    "dockpart file web page",
    "dockpart.fileweb",
    "Answers each HTTP request with what a TCP source sends (502/504 when it cannot).",
    "dockpart-fileweb",
)
