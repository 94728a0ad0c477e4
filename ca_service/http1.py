"""Just enough HTTP/1.1 for the OCSP front end: request heads, responses, forwarding.

Requests are read with ``Content-Length`` bodies only (OCSP clients send no chunked
bodies; a ``Transfer-Encoding`` is refused with 501, as RFC 9112 6.1 allows). Whatever
the front end does not answer itself is forwarded, head and body unchanged apart from
hop-by-hop headers, to the plain-HTTP app on a Unix socket, one connection per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from dataclasses import dataclass
from email.utils import format_datetime

MAX_HEAD_BYTES = 16 * 1024
#: a Content-Length with more digits is refused (413) before it is converted
MAX_LENGTH_DIGITS = 18
#: gunicorn's limit_request_line and limit_request_field_size, and its limit_request_fields
#: (100) less room for the headers the front end adds when it forwards
MAX_LINE_BYTES = 8190
MAX_FIELDS = 90
#: hop-by-hop headers (RFC 9110 7.6.1) are not forwarded
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
#: not forwarded either: the body is sent whole, and what the proxy states is ours alone
NOT_FORWARDED = HOP_BY_HOP | {b"expect", b"forwarded"}


def forwardable(name: bytes, connection_tokens: frozenset[bytes]) -> bool:
    """Whether a request header goes on to the backend. gunicorn trusts a Unix-socket
    peer as a proxy, so X-Forwarded-* (scheme, address) and underscore names (a
    ``SCRIPT_NAME`` header becomes the WSGI variable) are dropped, with the hop-by-hop
    headers and those the client's Connection header names (RFC 9110 7.6.1)."""
    return not (
        name in NOT_FORWARDED
        or name in connection_tokens
        or b"_" in name
        or name.startswith(b"x-forwarded-")
    )


REASONS = {
    400: b"Bad Request",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
}


class BadRequest(Exception):
    """The bytes are not a request we accept; answer ``status`` and close."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    content_length: int
    keep_alive: bool
    expects_continue: bool
    size: int  # bytes of the head, final blank line included


def parse_head(buffer: bytearray) -> RequestHead | None:
    """The head at the start of ``buffer``; None while it is incomplete. Raises
    :class:`BadRequest` for a malformed or oversized head."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadRequest(431, "request head too large")
        return None
    if end > MAX_HEAD_BYTES:
        raise BadRequest(431, "request head too large")
    lines = bytes(buffer[:end]).split(b"\r\n")
    # what the backend (gunicorn) would refuse with an HTML page is refused here
    if len(lines[0]) > MAX_LINE_BYTES:
        raise BadRequest(414, "request line too long")
    if len(lines) > MAX_FIELDS + 1 or any(len(line) > MAX_LINE_BYTES for line in lines):
        raise BadRequest(431, "too many or too large header fields")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    connection = expect = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        name = name.lower()
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        value = value.strip()
        if name == b"content-length":
            if not value.isdigit():
                raise BadRequest(400, "invalid Content-Length")
            if len(value) > MAX_LENGTH_DIGITS:  # over every limit, and int() refuses 4301+
                raise BadRequest(413, "request body too large")
            if length is not None and int(value) != length:
                raise BadRequest(400, "invalid Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            raise BadRequest(501, "chunked request bodies are not accepted here")
        elif name == b"connection":
            connection = value.lower()
        elif name == b"expect":
            expect = value.lower()
        headers.append((name, value))
    length = length or 0
    if version == b"HTTP/1.1":
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection
    return RequestHead(
        method, target, version, headers, length, keep_alive, expect == b"100-continue", end + 4
    )


class HttpDate:
    """The Date header value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = format_datetime(
                dt.datetime.fromtimestamp(now, dt.UTC), usegmt=True
            ).encode()
        return self._value


def problem_response(status: int, detail: str, date: bytes) -> bytes:
    """A whole problem+json response (RFC 9457) that closes the connection."""
    body = json.dumps(
        {
            "type": "about:blank",
            "title": REASONS[status].decode(),
            "status": status,
            "detail": detail,
        }
    ).encode()
    head = (
        b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: application/problem+json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, REASONS[status], date, len(body))
    )
    return head + body


@dataclass(frozen=True)
class ForwardedResponse:
    head: bytes  # status line and headers, hop-by-hop ones removed, no final blank line
    body: bytes
    delimited: bool  # False: only closing the connection ends the body


async def forward(backend: str, head: RequestHead, body: bytes, peer: str) -> ForwardedResponse:
    """Send one request to the HTTP server on the Unix socket ``backend`` and read its
    whole response (the backend closes after it). Raises OSError or ValueError."""
    reader, writer = await asyncio.open_unix_connection(backend)
    try:
        lines = [b"%s %s %s" % (head.method, head.target, head.version)]
        named = frozenset(
            token.strip().lower()
            for n, v in head.headers
            if n == b"connection"
            for token in v.split(b",")
        )
        lines += [n + b": " + v for n, v in head.headers if forwardable(n, named)]
        lines += [b"X-Forwarded-For: " + peer.encode(), b"Connection: close"]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        with contextlib.suppress(ConnectionError):  # it may answer before reading all
            await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
    end = response.find(b"\r\n\r\n")
    if end < 0:
        raise ValueError("incomplete response from the backend")
    status_line, *header_lines = response[:end].split(b"\r\n")
    body = response[end + 4 :]
    kept = [status_line]
    delimited = head.method == b"HEAD"
    for line in header_lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name in HOP_BY_HOP:
            continue
        # a body cut short (a worker died mid-response) must end the client's connection,
        # or its next response would be read as the rest of this one
        if name == b"content-length":
            delimited = head.method == b"HEAD" or value.strip() == str(len(body)).encode()
        elif name == b"transfer-encoding":
            delimited = body.endswith(b"0\r\n\r\n")
        kept.append(line)
    return ForwardedResponse(b"\r\n".join(kept) + b"\r\n", body, delimited)
