"""What an instance URL is, shared by the web app, the infra daemon and the proxy."""

from urllib.parse import urlsplit

#: The first instance: never destroyed, registers itself at start.
FIRST_PORT = 3000

#: Ports an instance may take (the first port up to the last unprivileged one).
MAX_PORT = 65535


class BadInstanceURL(ValueError):
    """An entry that is not ``http://HOST:PORT`` with a port in range."""


def instance_url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def parse_instance_url(url: str, low: int = 1, high: int = MAX_PORT) -> tuple[str, int]:
    """Split ``http://HOST:PORT`` into host and port, refusing anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadInstanceURL(f"{url!r} is not a URL: {e}") from None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise BadInstanceURL(f"{url!r} is not of the form http://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise BadInstanceURL(f"{url!r} has more than a host and a port")
    if not low <= port <= high:
        raise BadInstanceURL(f"{url!r} names port {port}, outside {low}-{high}")
    return parts.hostname, port
