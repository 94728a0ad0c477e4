"""The OCSP front end's HTTP/1.1 request-head parser: any bytes give a head, "need more",
or a clean BadRequest, never another exception; well-formed heads parse exactly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ca_service.http1 import MAX_HEAD_BYTES, BadRequest, parse_head

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 /;=.", max_size=20).map(str.strip)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_escape_as_another_exception(data: bytes) -> None:
    buffer = bytearray(data)
    try:
        head = parse_head(buffer)
    except BadRequest as exc:
        assert exc.status in (400, 431, 501)
        return
    if head is not None:
        assert 0 < head.size <= len(data)
        assert head.content_length >= 0
    assert buffer == data  # parsing never consumes


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "HEAD"]),
    path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/%+=", min_size=1, max_size=40),
    headers=st.dictionaries(TOKEN, VALUE, max_size=6),
    length=st.integers(min_value=0, max_value=2**40),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
    close=st.booleans(),
)
def test_well_formed_heads_parse_exactly(
    method: str, path: str, headers: dict[str, str], length: int, version: str, close: bool
) -> None:
    fields = {
        k: v
        for k, v in headers.items()
        if k not in ("content-length", "transfer-encoding", "connection", "expect")
    }
    fields["content-length"] = str(length)
    fields["connection"] = "close" if close else "keep-alive"
    lines = [f"{method} /{path} {version}", *(f"{k}: {v}" for k, v in fields.items())]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
    head = parse_head(bytearray(raw + b"trailing body bytes"))
    assert head is not None
    assert (head.method, head.target, head.version) == (
        method.encode(),
        f"/{path}".encode(),
        version.encode(),
    )
    assert head.size == len(raw)
    assert head.content_length == length
    assert head.keep_alive is not close
    assert dict(head.headers) == {k.encode(): v.encode() for k, v in fields.items()}


def test_an_incomplete_head_needs_more_until_it_is_too_large() -> None:
    assert parse_head(bytearray(b"POST /ocsp HTTP/1.1\r\nHost: x\r\n")) is None
    try:
        parse_head(bytearray(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES))
    except BadRequest as exc:
        assert exc.status == 431
    else:
        raise AssertionError("an endless head was accepted")


def test_conflicting_content_lengths_are_refused() -> None:
    try:
        parse_head(bytearray(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"))
    except BadRequest as exc:
        assert exc.status == 400
    else:
        raise AssertionError("two different Content-Length values were accepted")
