"""The Docker steps of a deployment, as blocking docker SDK calls.

The deploy hook is a short-lived command-line program, not a reactor, so blocking here is
fine; every step reports through ``say`` (printed and flushed: git shows it to the pusher).
"""

import json
import socket
import time
import urllib.error
import urllib.request

import docker
from docker.errors import APIError, DockerException, NotFound

from dockpart.deploy.repos import DeployError
from dockpart.probe import healthy_status

LABEL = "dockpart.deploy"
#: Manifest types asked for when reading a digest from the registry.
_MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


def client() -> docker.DockerClient:
    try:
        c = docker.from_env(timeout=120)
        c.ping()
        return c
    except DockerException as e:
        raise DeployError(f"the Docker engine does not answer: {e}") from None


def _stream_errors(stream, say, show) -> str | None:
    """Relay a docker JSON progress stream; raise on its error; return the digest it names."""
    digest = None
    for item in stream:
        if "error" in item:
            raise DeployError(item["error"].strip())
        digest = (item.get("aux") or {}).get("Digest", digest)
        line = show(item)
        if line:
            say(line)
    return digest


def build(c: docker.DockerClient, context: str, image: str, build_args: dict, say) -> None:
    """Build ``context`` as ``image``; the old container keeps serving meanwhile."""
    try:
        stream = c.api.build(path=context, tag=image, buildargs=build_args, rm=True,
                             forcerm=True, decode=True)
        _stream_errors(stream, say, lambda item: item.get("stream", "").rstrip())
    except APIError as e:
        raise DeployError(f"the build failed: {e.explanation or e}") from None


def tag(c: docker.DockerClient, image: str, new_name: str) -> None:
    repository, new_tag = new_name.rsplit(":", 1)
    c.api.tag(image, repository, new_tag)


def _progress_line(item: dict) -> str:
    # Layer-by-layer progress would flood the pusher's terminal; keep the summaries.
    if item.get("progressDetail") or item.get("progress") or "id" in item:
        return ""
    return item.get("status", "")


def _transfer(c: docker.DockerClient, verb: str, name: str, say) -> str | None:
    repository, at, reference = name.partition("@")  # the engine takes a digest as the tag
    if not at:
        repository, reference = name.rsplit(":", 1)
    try:
        stream = getattr(c.api, verb)(repository, tag=reference, stream=True, decode=True)
        return _stream_errors(stream, say, _progress_line)
    except APIError as e:
        raise DeployError(f"the {verb} of {name} failed: {e.explanation or e}") from None


def push(c: docker.DockerClient, name: str, say) -> str:
    """Push ``name`` (repository:tag) to its registry; return the digest the registry keeps."""
    digest = _transfer(c, "push", name, say) or registry_digest(name)
    if digest is None:
        raise DeployError(f"the registry did not tell the digest of {name}")
    return digest


def pull(c: docker.DockerClient, name: str, say) -> None:
    """Pull ``name``: repository:tag, or repository@digest (what a tag named when pushed)."""
    _transfer(c, "pull", name, say)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(c: docker.DockerClient, image: str, name: str, port: int, labels: dict):
    """Start ``image`` as ``name`` on the host network, told to listen on ``port``."""
    remove(c, name)
    try:
        return c.containers.run(
            image, name=name, detach=True, network_mode="host",
            environment={"PORT": str(port), "HOST": "127.0.0.1"},
            labels={LABEL: "1", **labels})
    except APIError as e:
        raise DeployError(f"{name} did not start: {e.explanation or e}") from None


def keep_running(container) -> None:
    """From now on the engine restarts the container (after a crash, after a reboot)."""
    container.update(restart_policy={"Name": "unless-stopped"})


def last_logs(container, lines: int = 20) -> str:
    try:
        return container.logs(tail=lines).decode(errors="replace").rstrip()
    except DockerException:
        return "(no logs)"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is the answer, as for dockpart.probe: not followed."""

    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET url`` answers healthy by :func:`dockpart.probe.healthy_status`
    (this CLI blocks, so it asks with urllib rather than the reactor's probe)."""
    try:
        with _opener.open(url, timeout=timeout) as response:
            return healthy_status(response.status)
    except urllib.error.HTTPError as e:  # 3xx (not followed), 4xx, 5xx
        return healthy_status(e.code)
    except (OSError, ValueError):
        return False


def wait_healthy(container, url: str, timeout: float, say) -> None:
    """Wait until ``url`` answers healthy (2xx, 3xx); else show its last log lines and raise."""
    say(f"waiting up to {timeout:g} s for {url} to answer")
    deadline = time.monotonic() + timeout
    reason = f"{url} did not answer 2xx or 3xx within {timeout:g} s"
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        container.reload()
        if container.status not in ("created", "running"):
            reason = f"the container exited with code {container.attrs['State'].get('ExitCode')}"
            break
        time.sleep(0.2)
    say(f"last log lines of {container.name}:")
    for line in last_logs(container).splitlines():
        say("  " + line)
    raise DeployError(f"health check failed: {reason}")


def get(c: docker.DockerClient, name: str):
    try:
        return c.containers.get(name)
    except NotFound:
        return None


def remove(c: docker.DockerClient, name: str, stop_timeout: int = 10) -> bool:
    """Stop (SIGTERM, then SIGKILL after ``stop_timeout``) and remove a container if it exists."""
    container = get(c, name)
    if container is None:
        return False
    try:
        container.stop(timeout=stop_timeout)
    except NotFound:
        return False
    try:
        container.remove(force=True)
    except NotFound:
        pass
    return True


def remove_image(c: docker.DockerClient, name: str) -> None:
    """Drop a local tag; best effort (an image in use stays)."""
    try:
        c.images.remove(name, noprune=False)
    except DockerException:
        pass


def remove_pinned(c: docker.DockerClient, pinned: str) -> None:
    """Drop ``pinned`` (repository@digest) from the engine, with the tags of its repository
    that name the same image; best effort (an image a container runs stays)."""
    try:
        image = c.images.get(pinned)
    except DockerException:
        return
    repository = pinned.partition("@")[0]
    for name in [*(t for t in image.tags if t.rpartition(":")[0] == repository), pinned]:
        remove_image(c, name)


def _registry_url(name: str) -> tuple[str, str]:
    """The manifests URL of ``name``'s repository, and its tag (or digest, for repo@digest)."""
    registry, _, rest = name.partition("/")
    repository, at, reference = rest.partition("@")
    if not at:
        repository, _, reference = rest.rpartition(":")
    return f"http://{registry}/v2/{repository}/manifests/", reference


def registry_digest(name: str) -> str | None:
    base, name_tag = _registry_url(name)
    request = urllib.request.Request(base + name_tag, method="HEAD",
                                     headers={"Accept": _MANIFEST_TYPES})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers.get("Docker-Content-Digest")
    except (OSError, ValueError):
        return None


def registry_delete(name: str, digest: str | None, keep_digests: set) -> str:
    """Delete ``name``'s manifest (``digest``, recorded at its push, else what the tag names now)
    from the registry unless a kept release shares it; say what happened."""
    digest = digest or registry_digest(name)
    if digest is None:
        return f"{name} is not in the registry"
    if digest in keep_digests:
        return f"{name} shares its image with a kept release; left in the registry"
    base, _ = _registry_url(name)
    request = urllib.request.Request(base + digest, method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=10):
            return f"deleted {name} from the registry"
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return f"{name} is not in the registry"
        detail = e.read().decode(errors="replace")[:200]
        try:
            detail = json.loads(detail)["errors"][0]["message"]
        except (ValueError, KeyError, IndexError):
            pass
        return f"the registry kept {name}: {e.code} {detail}"
    except OSError as e:
        return f"the registry kept {name}: {e}"
