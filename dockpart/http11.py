"""A strict HTTP/1.1 message parser in pure Python, with the interface of ``httptools``.

Why: ``httptools`` is C (llhttp) reached through the C API, which PyPy emulates slowly; a
parser written in Python is what PyPy's JIT compiles, and the proxy runs about twice as fast
there (see ``bench/bench_proxy.py``).  It accepts and refuses what ``httptools`` 0.6-0.9
(llhttp 9, not lenient) does for everything the proxy depends on: the same characters in a
request target, header name and value, the same refusals of ambiguous framing (bare LF,
obs-fold, a repeated or malformed Content-Length, Content-Length with Transfer-Encoding, a
request whose codings do not end in one chunked, bad chunk sizes and extensions, bytes after
a message that closes the connection).  ``tests/test_http11.py`` compares the two on
generated messages.

It offers only what the proxy calls: ``HttpRequestParser`` / ``HttpResponseParser`` calling
``on_message_begin``, ``on_url`` / ``on_status``, ``on_header``, ``on_headers_complete``,
``on_body`` and ``on_message_complete`` on the protocol given (those it has), ``feed_data``,
``get_method``, ``get_http_version``, ``should_keep_alive``, ``should_upgrade``,
``get_status_code``, ``parse_url`` and the ``HttpParser*`` exceptions.  Differences from
``httptools``: ``on_url`` is called once per request line (not once per read), and a line of
the head (or a chunk-size line) is held until its end arrives; the proxy bounds both with
its own header size limit.
"""

from __future__ import annotations

import re


class HttpParserError(Exception):
    """The bytes are not an HTTP/1.x message this parser accepts."""


class HttpParserCallbackError(HttpParserError):
    """A callback raised; the exception it raised is this one's ``__context__``."""


class HttpParserInvalidStatusError(HttpParserError):
    pass


class HttpParserInvalidMethodError(HttpParserError):
    pass


class HttpParserInvalidURLError(HttpParserError):
    pass


class HttpParserUpgrade(Exception):
    """The message switched protocols; ``args[0]`` is where the new protocol's bytes start
    in the data last fed."""


#: llhttp's methods for HTTP (not RTSP) requests.
METHODS = frozenset(b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE "
                    b"PROPFIND PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY "
                    b"CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE "
                    b"MKCALENDAR LINK UNLINK SOURCE PRI QUERY".split())
VERSIONS = {b"0.9": "0.9", b"1.0": "1.0", b"1.1": "1.1", b"2.0": "2.0"}
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: origin-form, asterisk-form or absolute-form with llhttp's characters for each part.
_TARGET = rb"(?:[/*][\x21-\x7e]*|[A-Za-z]+://[!$-.0-;=@-\[\]_a-z~]*(?:[/?][\x21-\x7e]*)?)"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") +([^ ]*)(?: +HTTP/([0-9]\.[0-9]))?")
_TARGET_RE = re.compile(_TARGET)
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([^\r\n]*))?")
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*)")
#: A chunk extension as llhttp reads it: its name may hold ";" and "=", a value ";".
_EXT_NAME = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z;=]+"
_EXT_VALUE = (rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z;]+"
              rb"|\"(?:[\t !\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*\")")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)(?:;" + _EXT_NAME + rb"(?:=" + _EXT_VALUE + rb")?)*")
_NOT_SPACE = re.compile(rb"[^ \t]")
_MAX_LENGTH = (1 << 64) - 1

# What the parser expects next.
_START, _HEAD, _LENGTH, _CHUNK_SIZE_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _EOF, \
    _CLOSED, _DEAD = range(10)


class _Parser:
    """One direction of one connection: messages one after another."""

    _response = False

    def __init__(self, protocol):
        get = lambda name: getattr(protocol, name, None)  # noqa: E731
        self._on_message_begin = get("on_message_begin")
        self._on_url = get("on_url")
        self._on_status = get("on_status")
        self._on_header = get("on_header")
        self._on_headers_complete = get("on_headers_complete")
        self._on_body = get("on_body")
        self._on_message_complete = get("on_message_complete")
        self._state = _START
        self._buf = b""
        self._error: HttpParserError | None = None
        self._method = b"GET"
        self._version = "1.1"
        self._status = 0
        self._reset_message()

    def _reset_message(self) -> None:
        self._first_line = True
        self._length = -1  # Content-Length, -1 when absent
        self._codings = False  # a Transfer-Encoding header was seen
        self._chunked = False  # ... and its last coding is chunked
        self._close = False
        self._keep_alive = False
        self._conn_upgrade = False
        self._upgrade_header = False
        self._upgrade = False
        self._remaining = 0

    def _start_line(self, line: bytes) -> None:
        """The request or status line."""
        raise NotImplementedError

    def _check_partial_start(self, part: bytes) -> None:
        """Refuse a start line that cannot become valid, before its end arrives."""
        raise NotImplementedError

    # The httptools interface.

    def get_method(self) -> bytes:
        return self._method

    def get_http_version(self) -> str:
        return self._version

    def should_upgrade(self) -> bool:
        return self._upgrade

    def should_keep_alive(self) -> bool:
        if self._version == "1.1":
            if self._close:
                return False
        elif not self._keep_alive:
            return False
        return not self._needs_eof()

    def feed_data(self, data) -> None:
        if self._error is not None:
            raise type(self._error)(*self._error.args)
        data = bytes(data)
        held = len(self._buf)
        buf = self._buf + data if held else data
        self._buf = b""
        try:
            pos = self._run(buf, 0)
        except _Switch as e:
            raise HttpParserUpgrade(e.args[0] - held) from None
        except HttpParserError as e:
            self._state = _DEAD
            self._error = e
            raise
        except _CallbackFailed as e:
            failed = e.args[0]
        else:
            if pos < len(buf):
                self._buf = buf[pos:]
            return
        self._state = _DEAD
        self._error = HttpParserCallbackError("User callback error")
        error = HttpParserCallbackError("User callback error")
        error.__context__ = failed  # as httptools: the proxy reads it there
        raise error

    # The machine.

    def _call(self, callback, *args) -> None:
        try:
            callback(*args)
        except BaseException as e:  # noqa: B036 -- reported as httptools does
            raise _CallbackFailed(e) from e

    def _run(self, buf: bytes, pos: int) -> int:
        end = len(buf)
        while pos < end:
            state = self._state
            if state == _START or state == _CLOSED:
                while pos < end and buf[pos] in b"\r\n":
                    pos += 1
                if pos == end:
                    break
                if state == _CLOSED:
                    raise HttpParserError("Data after `Connection: close`")
                self._state = _HEAD
                self._reset_message()
                if self._on_message_begin is not None:
                    self._call(self._on_message_begin)
            elif state == _HEAD:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    self._check_partial_line(buf, pos)
                    if self._first_line:
                        self._check_partial_start(buf[pos:])
                    break
                if nl > pos and buf[nl - 1] == 13:
                    line = buf[pos:nl - 1]
                elif self._first_line and self._http09(buf[pos:nl]):
                    line = buf[pos:nl]  # llhttp lets an HTTP/0.9 request line end in LF
                else:
                    raise HttpParserError("Missing expected CR before LF")
                pos = nl + 1
                if self._first_line:
                    self._first_line = False
                    self._start_line(line)
                elif line:
                    self._header(line)
                else:
                    pos = self._headers_done(buf, pos)
            elif state == _LENGTH or state == _CHUNK_DATA or state == _EOF:
                if state == _EOF:
                    n = end - pos
                else:
                    n = min(self._remaining, end - pos)
                    self._remaining -= n
                if self._on_body is not None:
                    self._call(self._on_body, buf[pos:pos + n])
                pos += n
                if state != _EOF and not self._remaining:
                    if state == _LENGTH:
                        self._message_done()
                    else:
                        self._state = _CHUNK_END
            elif state == _CHUNK_SIZE_LINE:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if end - pos > 16384:
                        raise HttpParserError("Chunk extensions too long")
                    self._check_chunk_size(buf[pos:end], partial=True)
                    break
                if nl == pos or buf[nl - 1] != 13:
                    raise HttpParserError("Missing expected CR after chunk size")
                size = self._check_chunk_size(buf[pos:nl - 1], partial=False)
                pos = nl + 1
                if size:
                    self._remaining = size
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
            elif state == _CHUNK_END:
                if buf[pos] != 13:
                    raise HttpParserError("Expected LF after chunk data")
                if pos + 1 == end:
                    break
                if buf[pos + 1] != 10:
                    raise HttpParserError("Expected LF after chunk data")
                pos += 2
                self._state = _CHUNK_SIZE_LINE
            elif state == _TRAILERS:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    self._check_partial_line(buf, pos)
                    break
                if nl == pos or buf[nl - 1] != 13:
                    raise HttpParserError("Missing expected CR before LF")
                line = buf[pos:nl - 1]
                pos = nl + 1
                if line:
                    self._header(line)
                else:
                    self._message_done()
            else:
                raise AssertionError(f"no parser state {state}")
        return pos

    def _http09(self, line: bytes) -> bool:
        return False

    def _check_partial_line(self, buf: bytes, pos: int) -> None:
        """An error llhttp sees before the line ends: a CR not followed by LF."""
        cr = buf.find(b"\r", pos)
        if 0 <= cr < len(buf) - 1:
            raise HttpParserError("Missing expected LF after CR")

    def _header(self, line: bytes) -> None:
        m = _HEADER.fullmatch(line)
        if m is None:
            if line[:1] in b" \t":
                raise HttpParserError("Unexpected whitespace after header value")
            if _HEADER_NAME.match(line) is None:
                raise HttpParserError("Invalid header token")
            raise HttpParserError("Invalid header value char")
        name, value = m.group(1), m.group(2)
        self._watch(name.lower(), value)  # trailers too, as llhttp: no Content-Length there
        if self._on_header is not None:
            self._call(self._on_header, name, value)

    def _watch(self, lname: bytes, value: bytes) -> None:
        """The headers that frame the message or the connection (llhttp's flags)."""
        if lname == b"content-length":
            if self._length >= 0:
                raise HttpParserError("Duplicate Content-Length")
            if self._codings:
                raise HttpParserError("Content-Length can't be present with Transfer-Encoding")
            digits = value.rstrip(b" \t")
            if not digits:
                raise HttpParserError("Empty Content-Length")
            if not digits.isdigit():
                raise HttpParserError("Invalid character in Content-Length")
            length = int(digits)
            if length > _MAX_LENGTH:
                raise HttpParserError("Content-Length overflow")
            self._length = length
        elif lname == b"transfer-encoding":
            if self._length >= 0:
                raise HttpParserError("Transfer-Encoding can't be present with Content-Length")
            tokens = [t.strip(b" \t").lower() for t in value.split(b",")]
            if not self._response and tokens == [b""]:
                raise HttpParserError("Invalid `Transfer-Encoding` header value")
            # A request's chunked must be the last coding of all.
            if not self._response and (self._chunked or b"chunked" in tokens[:-1]):
                raise HttpParserError("Invalid `Transfer-Encoding` header value")
            self._codings = True
            self._chunked = tokens[-1] == b"chunked"
        elif lname == b"connection" or lname == b"proxy-connection":
            for token in value.split(b","):
                token = token.strip(b" \t").lower()
                if token == b"close":
                    self._close = True
                elif token == b"keep-alive":
                    self._keep_alive = True
                elif token == b"upgrade":
                    self._conn_upgrade = True
        elif lname == b"upgrade":
            if value:
                self._upgrade_header = True

    def _headers_done(self, buf: bytes, pos: int) -> int:
        if self._upgrade_header and self._conn_upgrade:
            self._upgrade = not self._response or self._status == 101
        else:
            self._upgrade = self._method == b"CONNECT" and not self._response
        if self._on_headers_complete is not None:
            self._call(self._on_headers_complete)
        if self._upgrade or (self._response and self._status == 101):
            self._message_done(switch=True)
            if not self._upgrade:
                raise HttpParserError("Pause on CONNECT/Upgrade")
            raise _Switch(pos)
        if self._response and self._status in (100, 102, 103, 204, 304):
            self._message_done()
        elif self._chunked:
            self._state = _CHUNK_SIZE_LINE
        elif self._codings:
            if not self._response:
                raise HttpParserError("Request has invalid `Transfer-Encoding`")
            self._state = _EOF
        elif self._length > 0:
            self._remaining = self._length
            self._state = _LENGTH
        elif self._length == 0 or not self._needs_eof():
            self._message_done()
        else:
            self._state = _EOF
        return pos

    def _needs_eof(self) -> bool:
        """llhttp_message_needs_eof: a response whose end is the connection's."""
        if not self._response:
            return False
        status = self._status
        if 100 <= status < 200 or status == 204 or status == 304:
            return False
        if self._codings and not self._chunked:
            return True
        return not (self._chunked or self._length >= 0)

    def _message_done(self, switch: bool = False) -> None:
        keep = switch or self.should_keep_alive()
        self._state = _START if keep else _CLOSED
        if self._on_message_complete is not None:
            self._call(self._on_message_complete)

    def _check_chunk_size(self, line: bytes, partial: bool) -> int:
        """The size a chunk-size line gives; a partial one is only checked for what it has."""
        if partial:
            if _CHUNK_PARTIAL.fullmatch(line) is None:
                raise HttpParserError("Invalid character in chunk size")
            return 0
        m = _CHUNK_SIZE.fullmatch(line)
        if m is None:
            raise HttpParserError("Invalid character in chunk size")
        size = int(m.group(1), 16)
        if size > _MAX_LENGTH:
            raise HttpParserError("Chunk size overflow")
        return size


_HEADER_NAME = re.compile(_TOKEN + rb":")
#: What an unfinished chunk-size line may still become valid from.
_CHUNK_PARTIAL = re.compile(rb"[0-9A-Fa-f]*(?:;[^\r\n]*)?\r?")


class HttpRequestParser(_Parser):
    """Requests, one after another, as llhttp's HTTP_REQUEST parser reads them."""

    def _http09(self, line: bytes) -> bool:
        m = _REQUEST_LINE.fullmatch(line)
        return m is not None and m.group(3) is None

    def _check_partial_start(self, part: bytes) -> None:
        """llhttp refuses a request line as soon as its method cannot become one."""
        method, space, _ = part.partition(b" ")
        if space and method not in METHODS or not space and not any(
                m.startswith(method) for m in METHODS):
            raise HttpParserInvalidMethodError("Invalid method encountered")

    def _start_line(self, line: bytes) -> None:
        m = _REQUEST_LINE.fullmatch(line)
        if m is None:
            if _NOT_SPACE.match(line) is None or b" " not in line:
                raise HttpParserInvalidMethodError("Invalid method encountered")
            raise HttpParserError("Expected CRLF after version")
        method, target, version = m.group(1), m.group(2), m.group(3)
        if method not in METHODS:
            raise HttpParserInvalidMethodError("Invalid method encountered")
        self._method = method
        if method != b"CONNECT" and _TARGET_RE.fullmatch(target) is None:
            raise HttpParserInvalidURLError("Invalid char in url path")
        if method == b"CONNECT" and not all(32 < c < 127 for c in target):
            raise HttpParserInvalidURLError("Invalid char in url path")
        v = "0.9" if version is None else VERSIONS.get(version)  # "GET /": HTTP/0.9
        if v is None:
            raise HttpParserError("Invalid HTTP version")
        self._version = v
        if self._on_url is not None:
            self._call(self._on_url, target)


class HttpResponseParser(_Parser):
    """Responses, one after another, as llhttp's HTTP_RESPONSE parser reads them.

    Like ``httptools``, it cannot be told that a response answers HEAD."""

    _response = True

    def _check_partial_start(self, part: bytes) -> None:
        """llhttp refuses a status line as soon as it cannot begin with HTTP/."""
        if part[:5] != b"HTTP/"[:len(part)]:
            raise HttpParserError("Expected HTTP/, RTSP/ or ICE/")

    def get_status_code(self) -> int:
        return self._status

    def _start_line(self, line: bytes) -> None:
        m = _STATUS_LINE.fullmatch(line)
        if m is None:
            if line[:5] != b"HTTP/":
                raise HttpParserError("Expected HTTP/, RTSP/ or ICE/")
            raise HttpParserInvalidStatusError("Invalid status code")
        v = VERSIONS.get(m.group(1))
        if v is None:
            raise HttpParserError("Invalid HTTP version")
        self._version = v
        self._status = int(m.group(2))
        reason = m.group(3)
        if reason and self._on_status is not None:
            self._call(self._on_status, reason)


class _Switch(Exception):
    """Internal: the message switched protocols at ``args[0]`` of the buffer."""


class _CallbackFailed(Exception):
    """Internal: a callback raised ``args[0]``."""


# Absolute-form targets (the proxy checks the host of ``GET http://host/ HTTP/1.1``).

class URL:
    __slots__ = ("schema", "host", "port", "path", "query", "fragment", "userinfo")

    def __init__(self, schema, host, port, path, query, fragment, userinfo):
        self.schema, self.host, self.port = schema, host, port
        self.path, self.query, self.fragment, self.userinfo = path, query, fragment, userinfo


_URL = re.compile(rb"(?:([A-Za-z]+)://(?:([^@/?#\[\]]*)@)?(\[[0-9A-Fa-f:.]+\]|[^:/?#\[\]@]+)"
                  rb"(?::([0-9]*))?)?(/[^?#]*)?(?:\?([^#]*))?(?:#(.*))?", re.S)


def parse_url(url: bytes) -> URL:
    """A target's parts, or :class:`HttpParserInvalidURLError` (as ``httptools.parse_url``)."""
    m = _URL.fullmatch(url)
    if m is None or not url or any(c <= 32 or c == 127 for c in url) or (
            m.group(1) is None and m.group(5) is None):
        raise HttpParserInvalidURLError(f"invalid url {url!r}")
    schema, userinfo, host, port, path, query, fragment = m.groups()
    if host is not None and host.startswith(b"["):
        host = host[1:-1]
    if port is not None:
        if not port or int(port) > 65535:
            raise HttpParserInvalidURLError(f"invalid url {url!r}")
        port = int(port)
    return URL(schema, host, port, path, query, fragment, userinfo)
