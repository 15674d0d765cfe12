"""The proxy's framing rules: which headers go on, which frame or route a message, which are refused.

Framing is the point where a proxy gets smuggled through, so each message is framed from the
same view of its headers as what is forwarded (:func:`end_to_end`), and anything ambiguous is
refused (:class:`Refused`) rather than guessed.
"""

from __future__ import annotations

import re

#: RFC 9110 7.6.1, plus the Proxy-* family (checked by prefix).
HOP_BY_HOP = frozenset([b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade"])
#: Request headers the proxy sets itself (X-Forwarded-For is appended to).
OWN_HEADERS = frozenset([b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for"])
#: Headers whose values the proxy needs (framing, forwarding).
WATCHED = frozenset([b"host", b"x-forwarded-for", b"content-length", b"transfer-encoding",
                     b"connection"])
#: Headers that decide where a message ends or where it goes: never dropped by Connection.
FRAMING = frozenset([b"content-length", b"transfer-encoding", b"host"])
#: Connection tokens that name no header.
CONNECTION_OPTIONS = frozenset([b"keep-alive", b"close", b"upgrade"])
NO_BODY_STATUS = frozenset([204, 304])
#: A Host value: RFC 3986's reg-name / IP-literal characters and an optional port.
HOST_VALUE = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")

REASONS = {400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed",
           408: b"Request Timeout", 429: b"Too Many Requests",
           431: b"Request Header Fields Too Large", 501: b"Not Implemented",
           505: b"HTTP Version Not Supported",
           502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}


class Refused(Exception):
    """A message the proxy will not forward: its framing or routing is ambiguous.

    ``code`` is the status a refused request is answered with.
    """

    def __init__(self, text: str, code: int = 400):
        super().__init__(text)
        self.code = code


def request_head(method: bytes, url: bytes, version: str, headers, upgrade: bool,
                 peer_ip: bytes, proto: bytes) -> tuple[list[bytes], bytes | None, bool, bool]:
    """The head to forward for a request, as lines without CRLF: ``(lines, host, has_body,
    chunked)``, from the same view of its headers as what goes on (:func:`end_to_end`).

    X-Forwarded-For is appended to (``peer_ip`` is empty on a UNIX socket), X-Forwarded-Proto
    and -Host are set.  Raises :class:`Refused` with the answer's code for what is ambiguous.
    """
    if version != "1.1" and version != "1.0":
        raise Refused("only HTTP/1.0 and HTTP/1.1 are served", 505)
    out = [method + b" " + url + b" HTTP/1.1"]
    append = out.append
    seen = end_to_end(headers, out, OWN_HEADERS, upgrade)
    host = seen.get(b"host")
    if host is None:
        if version == "1.1":
            raise Refused("an HTTP/1.1 request needs a Host header")
    elif not HOST_VALUE.fullmatch(host):
        raise Refused("the Host header is not a valid host[:port]")
    forwarded_for = seen.get(b"x-forwarded-for")
    coded = seen.get(b"transfer-encoding")
    chunked = coded is not None
    has_body = chunked or seen.get(b"content-length", b"0").strip() != b"0"
    if upgrade and has_body:
        # The parser takes what follows an Upgrade head as the new protocol's bytes.
        raise Refused("an Upgrade request cannot carry a body here")
    if coded is not None:
        them = codings(coded)
        if not them or them[-1] != b"chunked":
            # Without a final chunked the body's end cannot be known (RFC 9112 6.3).
            raise Refused("a request body must be chunked last", 501)
        # The parser accepts only codings that end in one chunked; the others go on.
        append(b"Transfer-Encoding: " + b", ".join(them))
    if forwarded_for or peer_ip:
        append(b"X-Forwarded-For: " + (forwarded_for + b", " + peer_ip
                                        if forwarded_for and peer_ip
                                        else forwarded_for or peer_ip))
    append(b"X-Forwarded-Proto: " + proto)
    if host is not None:
        append(b"X-Forwarded-Host: " + host)
    return out, host, has_body, chunked


def end_to_end(headers, out: list, skip=frozenset(), upgrade: bool = False) -> dict:
    """Append the headers to forward to ``out`` as ``Name: value`` lines.

    Hop-by-hop headers (and the ones ``Connection`` names) and those in ``skip`` stay behind;
    ``Upgrade`` and ``Connection`` go on when ``upgrade``.  Returns the values of the
    WATCHED headers by lower-case name (repeated ones joined with ", "), from the same view
    as what is forwarded: a header ``Connection`` names is neither forwarded nor returned.
    Raises :class:`Refused` for a second ``Host`` and for ``Connection`` naming a header that
    frames or routes the message (``Content-Length``, ``Transfer-Encoding``, ``Host``): the
    proxy would frame by a header the next hop never sees.
    """
    seen: dict = {}
    start = len(out)
    append = out.append
    for name, value in headers:
        lname = name.lower()
        if lname in WATCHED:
            if lname in seen:
                if lname == b"host":
                    raise Refused("two Host headers")
                seen[lname] = seen[lname] + b", " + value
            else:
                seen[lname] = value
        if lname in HOP_BY_HOP or lname in skip or lname[:6] == b"proxy-":
            if upgrade and (lname == b"upgrade" or lname == b"connection"):
                append(name + b": " + value)
            continue
        append(name + b": " + value)
    connection = seen.get(b"connection")
    if connection is not None:
        named = {t.strip().lower() for t in connection.split(b",")} - CONNECTION_OPTIONS
        if named:
            if not named.isdisjoint(FRAMING):
                raise Refused("Connection names a header that frames or routes the message: "
                              + ", ".join(sorted(t.decode("latin-1") for t in named & FRAMING)))
            out[start:] = [line for line in out[start:]
                           if line.split(b":", 1)[0].lower() not in named]
            for lname in named & WATCHED:
                seen.pop(lname, None)
    return seen


def codings(value: bytes) -> list[bytes]:
    """The transfer codings of a ``Transfer-Encoding`` value, lower-cased, in order."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]
