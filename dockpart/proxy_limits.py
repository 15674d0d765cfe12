"""What one client may hold of dockpart-proxy: requests in flight, time to send a body, load.

A client is a TCP peer address (``X-Forwarded-For`` is the client's own word, not trusted).

- **Requests in flight** (:class:`PerClient`, ``--max-inflight-per-client``): a client's
  connections with a request being handled, counted from its head to the end of its answer,
  as nginx's ``limit_conn``; one more is answered 429, as Traefik's ``InFlightReq``.
- **Body deadline** (:func:`body_overdue`, ``--body-timeout`` and ``--body-min-rate``): a body
  has ``--body-timeout`` seconds plus one second per ``--body-min-rate`` bytes received, as
  Apache's ``mod_reqtimeout`` (``body=20,MinRate=500``); past that it is answered 408 and
  the connection closed.  nginx's ``client_body_timeout`` only bounds each pause, which a byte
  every few seconds never reaches (the proxy keeps that one too: ``--idle-timeout``).
- **Load** (:func:`fair_inflight`, ``--load-per-client``): what the autoscaler is told is in
  flight per backend counts a request only once its body is in (one still receiving waits on
  its client, not on the instance) and at most ``--load-per-client`` requests of one client,
  so one client cannot hold the tier at its maximum.
"""

from __future__ import annotations

from collections import Counter


class PerClient:
    """Requests in flight per client address, each held from :meth:`admit` to :meth:`release`."""

    def __init__(self, max_inflight: int):
        self.max_inflight = max_inflight  # 0: no limit
        # A plain dict, not a Counter: a Counter's missing key is a Python-level call, and
        # both methods run on every request.
        self.inflight: dict[bytes, int] = {}
        self._held: dict = {}  # exchange -> its client's address

    def admit(self, exchange) -> bool:
        """Whether the exchange may go on; it then holds one of its client's places."""
        held = self._held
        if exchange in held:
            return True
        ip = exchange.client.peer_ip
        inflight = self.inflight
        now = inflight.get(ip, 0)
        if self.max_inflight and now >= self.max_inflight:
            return False
        inflight[ip] = now + 1
        held[exchange] = ip
        return True

    def release(self, exchange) -> None:
        """The exchange is over (answered, refused, or its connection gone); once."""
        ip = self._held.pop(exchange, None)
        if ip is not None:
            left = self.inflight[ip] - 1
            if left:
                self.inflight[ip] = left
            else:
                del self.inflight[ip]


def body_overdue(exchange, now: float, timeout: float, min_rate: float) -> bool:
    """Whether the body being read for ``exchange`` is later than its deadline allows."""
    if not timeout or not exchange.body_from:
        return False
    allowed = timeout + (exchange.body_bytes / min_rate if min_rate else float("inf"))
    return now - exchange.body_from > allowed


def fair_inflight(clients, per_client: int) -> Counter:
    """Requests in flight per backend URL, as load: bodies complete, ``per_client`` at most
    for one client address (0: no cap)."""
    counted: Counter = Counter()
    seen: Counter = Counter()
    for client in clients:
        exchange = client.current
        if exchange is None or not exchange.request_done or exchange.response_done \
                or client.tunnel_to is not None:
            continue
        backend = exchange.backend
        if backend is None:
            continue
        ip = client.peer_ip
        if per_client and seen[ip] >= per_client:
            continue
        seen[ip] += 1
        counted[backend.url] += 1
    return counted
