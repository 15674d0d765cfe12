"""What the Docker and Swarm drivers share: how a Docker engine's objects are marked as ours.

Containers (Docker) and services (Swarm) carry ``dockpart.managed=true``,
``dockpart.port=<port>`` and ``dockpart.redis=<the tier's Redis>``; one without the first
label is never touched, even with our name, and one of another tier (another Redis on the
same engine) is left to that tier's infra.
"""

LABEL_MANAGED = "dockpart.managed"
LABEL_PORT = "dockpart.port"
LABEL_TIER = "dockpart.redis"


def labels(tier: str, port: int | None = None) -> dict[str, str]:
    """The labels of this tier's instance on ``port`` (without it: of every instance)."""
    marks = {LABEL_MANAGED: "true", LABEL_TIER: tier}
    if port is not None:
        marks[LABEL_PORT] = str(port)
    return marks


def label_filter(tier: str) -> list[str]:
    """The engine's list filter that finds every instance of ``tier``."""
    return [f"{k}={v}" for k, v in labels(tier).items()]
