"""The plain-HTTP front end (``ca_service.ocsp_front``) seen from raw TCP clients.

``hsmca serve`` gives its plain-HTTP port to a single-threaded front end that answers a
nonce-less single-CertID OCSP request from its pre-signed response and forwards the rest
(nonce requests, misses, CRLs, CA certificates, 404s) to the Flask app on a Unix socket.
These tests speak HTTP/1.1 over plain sockets and parse the responses themselves (status
line, headers, ``Content-Length`` body), so that several requests can share one
connection, be pipelined, or end with the server closing it.

Forwarded responses carry the Flask app's ``X-Request-Id``; the front end's own answers
do not (they are not access-logged one by one): :attr:`RawResponse.from_front` tells
which of the two answered, so that a fast-path test cannot pass on the slow path.

Each xdist worker that runs tests from this module starts its own ``hsmca serve`` (module
scope) on a fresh home whose public URL names the port it really listens on.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from pki.actors import operator
from pki.ocsp import issuer_name_hash
from pki.service import Pki
from pki.store import Store
from tests.helpers import sqlite_query
from tests.issuance_helpers import issue
from tests.revocation_helpers import (
    OCSP_REQUEST,
    OCSP_RESPONSE,
    TIMEOUT,
    Leaf,
    PinnedService,
    issue_leaf,
    opened,
    percent_encode,
    plain_session,
    poll,
    revoke_api,
    start_pinned_service,
    wait_presigned,
)

#: how long a socket may take to deliver a response, or to be closed by the server
SOCKET_DEADLINE_S = 10.0
#: the front end publishes its counters once a second; slack for a busy machine
METRICS_DEADLINE_S = 10.0
PROBLEM_JSON = "application/problem+json"
ACTOR = operator("ocsp-front-tests")


# -- raw HTTP/1.1 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    """One response read off a socket (header names lower-cased)."""

    status_line: str
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def from_front(self) -> bool:
        """Answered by the front end itself, not forwarded to the Flask app."""
        return "x-request-id" not in self.headers

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def ocsp(self) -> ocsp.OCSPResponse:
        assert self.status == 200, (self.status_line, self.body[:300])
        assert self.headers["content-type"] == OCSP_RESPONSE, self.headers
        return ocsp.load_der_ocsp_response(self.body)


class RawClient:
    """One TCP connection to the plain-HTTP port: requests go out as given, responses are
    read back in order (``Content-Length`` delimited; whatever follows stays buffered)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_DEADLINE_S)
        self.pending = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, *requests_: bytes) -> None:
        """All of ``requests_`` in a single ``sendall`` (pipelined when several)."""
        self.sock.sendall(b"".join(requests_))

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError(f"server closed the connection; had {self.pending[:300]!r}")
        self.pending += data

    def response(self) -> RawResponse:
        while (end := self.pending.find(b"\r\n\r\n")) < 0:
            self._receive()
        status_line, *lines = self.pending[:end].decode("latin-1").split("\r\n")
        version, code, _reason = status_line.split(" ", 2)
        assert version in ("HTTP/1.1", "HTTP/1.0"), status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            assert name.lower() not in headers, f"header {name} sent twice: {lines}"
            headers[name.lower()] = value.strip()
        assert "content-length" in headers, f"no Content-Length: {lines}"
        start = end + 4
        stop = start + int(headers["content-length"])
        while len(self.pending) < stop:
            self._receive()
        body, self.pending = self.pending[start:stop], self.pending[stop:]
        return RawResponse(status_line, int(code), headers, body)

    def exchange(self, request: bytes) -> RawResponse:
        self.send(request)
        return self.response()

    def closed_by_server(self) -> bool:
        """Whether the server closes the connection (recv returns b'') within the socket
        deadline, with nothing more sent."""
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        assert data == b"", f"unexpected bytes after the response: {data[:200]!r}"
        return True


def http_request(
    method: str,
    target: str,
    body: bytes = b"",
    *,
    version: str = "HTTP/1.1",
    headers: tuple[str, ...] = (),
) -> bytes:
    lines = [f"{method} {target} {version}", "Host: 127.0.0.1", *headers]
    if (body or method == "POST") and not any(
        h.lower().startswith("content-length:") for h in headers
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def post_ocsp(der: bytes, *, version: str = "HTTP/1.1", headers: tuple[str, ...] = ()) -> bytes:
    """``POST /ocsp`` with the DER request as body."""
    return http_request(
        "POST", "/ocsp", der, version=version, headers=(f"Content-Type: {OCSP_REQUEST}", *headers)
    )


def get_ocsp(der: bytes) -> bytes:
    """``GET /ocsp/<URL-encoded base64>`` (RFC 6960 appendix A.1)."""
    return http_request("GET", "/ocsp/" + percent_encode(base64.b64encode(der).decode()))


def ocsp_request(
    leaf: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None = None
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def never_issued_request(issuer: x509.Certificate) -> tuple[bytes, int]:
    """A request for a random 64-bit serial of ``issuer`` (hsmca issues 20-byte serials,
    so this one was never issued); the DER and the serial."""
    serial = int.from_bytes(os.urandom(8), "big") | 1
    name_hash = issuer_name_hash(issuer, "sha1")
    key_hash = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    return der, serial


def stored_response(home: Path, serial: str) -> bytes:
    """The pre-signed SHA-1 response in the database, read behind the service's back."""
    (row,) = sqlite_query(
        home,
        "SELECT der FROM ocsp_responses WHERE serial = ? AND hash_algorithm = 'sha1'",
        (serial,),
    )
    return bytes(row[0])


def assert_rfc5019_headers(answer: RawResponse) -> None:
    """Cache-Control max-age up to nextUpdate, Last-Modified = thisUpdate,
    Expires = nextUpdate, a quoted ETag (RFC 5019 section 6.2)."""
    resp = answer.ocsp()
    assert resp.next_update_utc is not None
    cache_control = [d.strip() for d in answer.headers["cache-control"].split(",")]
    (max_age,) = [int(d.split("=", 1)[1]) for d in cache_control if d.startswith("max-age=")]
    left = (resp.next_update_utc - dt.datetime.now(dt.UTC)).total_seconds()
    assert 0 < max_age <= left + 2, (max_age, left)
    assert "no-store" not in cache_control, cache_control
    assert parsedate_to_datetime(answer.headers["last-modified"]) == resp.this_update_utc
    assert parsedate_to_datetime(answer.headers["expires"]) == resp.next_update_utc
    assert re.fullmatch(r'"[^"]+"', answer.headers["etag"]), answer.headers["etag"]


def assert_problem(answer: RawResponse, status: int) -> dict[str, object]:
    assert answer.status == status, (answer.status_line, answer.body[:300])
    assert answer.headers["content-type"] == PROBLEM_JSON, answer.headers
    document = json.loads(answer.body)
    assert document["status"] == status, document
    assert document["title"] and document["detail"], document
    return document


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PinnedService]:
    running = start_pinned_service(tmp_path_factory.mktemp("ocsp-front"))
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def intermediate(svc: PinnedService) -> x509.Certificate:
    return x509.load_pem_x509_certificate(svc.intermediate.read_bytes())


@pytest.fixture(scope="module")
def leaves(svc: PinnedService, tmp_path_factory: pytest.TempPathFactory) -> tuple[Leaf, Leaf]:
    """Two good certificates whose responses the publisher has pre-signed."""
    directory = tmp_path_factory.mktemp("front-leaves")
    pair = issue_leaf(svc, directory, "front-a"), issue_leaf(svc, directory, "front-b")
    for leaf in pair:
        wait_presigned(svc.home, leaf.serial)
    return pair


def assert_good_presigned(answer: RawResponse, leaf: Leaf, home: Path) -> None:
    """A 200 from the front end itself: the stored pre-signed response, saying good."""
    assert answer.from_front, answer.headers
    resp = answer.ocsp()
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.serial_number == leaf.cert.serial_number
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert answer.body == stored_response(home, leaf.serial)


# -- 1. keep-alive -----------------------------------------------------------------------------


def test_one_keep_alive_connection_serves_presigned_forwarded_and_live_answers(
    svc: PinnedService, leaves: tuple[Leaf, Leaf], intermediate: x509.Certificate
) -> None:
    """Pre-signed POST, CRL GET (forwarded), nonce POST (forwarded, signed live), the
    pre-signed POST again: four answers, in order, on one connection that stays open.
    Pre-signed answers carry the RFC 5019 headers; the live one is no-store."""
    leaf = leaves[0]
    plain = post_ocsp(ocsp_request(leaf.cert, intermediate))
    nonce = os.urandom(16)
    with RawClient(svc.http_port) as conn:
        first = conn.exchange(plain)
        crl = conn.exchange(http_request("GET", f"/crl/{svc.issuer_id}.crl"))
        live = conn.exchange(post_ocsp(ocsp_request(leaf.cert, intermediate, nonce)))
        again = conn.exchange(plain)

    for answer in (first, crl, live, again):
        assert answer.status_line.startswith("HTTP/1.1 200 "), answer.status_line
        assert not answer.closes, answer.headers
        assert parsedate_to_datetime(answer.headers["date"]).tzinfo is not None

    for answer in (first, again):
        assert_good_presigned(answer, leaf, svc.home)
        assert_rfc5019_headers(answer)
    assert again.body == first.body
    assert again.headers["etag"] == first.headers["etag"]

    assert not crl.from_front
    assert crl.headers["content-type"] == "application/pkix-crl"
    assert x509.load_der_x509_crl(crl.body).issuer == intermediate.subject

    assert not live.from_front
    assert live.headers["cache-control"] == "no-store"
    assert "etag" not in live.headers and "expires" not in live.headers
    signed_live = live.ocsp()
    assert signed_live.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert signed_live.serial_number == leaf.cert.serial_number
    assert signed_live.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    assert live.body != first.body


# -- 2. pipelining -----------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_request_order(
    svc: PinnedService, leaves: tuple[Leaf, Leaf], intermediate: x509.Certificate
) -> None:
    """Four OCSP requests in one sendall: pre-signed POST for A, a never-issued serial
    (forwarded, signed live: unknown), pre-signed GET for B, a nonce POST for A
    (forwarded). The answers come back in request order, each about its own serial."""
    a, b = leaves
    unknown, unknown_serial = never_issued_request(intermediate)
    nonce = os.urandom(16)
    pipelined = [
        post_ocsp(ocsp_request(a.cert, intermediate)),
        post_ocsp(unknown),
        get_ocsp(ocsp_request(b.cert, intermediate)),
        post_ocsp(ocsp_request(a.cert, intermediate, nonce)),
    ]
    with RawClient(svc.http_port) as conn:
        conn.send(*pipelined)
        answers = [conn.response() for _ in pipelined]
        # the connection is still usable after the pipelined burst
        assert_good_presigned(conn.exchange(pipelined[0]), a, svc.home)

    parsed = [answer.ocsp() for answer in answers]
    assert [r.serial_number for r in parsed] == [
        a.cert.serial_number,
        unknown_serial,
        b.cert.serial_number,
        a.cert.serial_number,
    ]
    assert [r.certificate_status for r in parsed] == [
        ocsp.OCSPCertStatus.GOOD,
        ocsp.OCSPCertStatus.UNKNOWN,
        ocsp.OCSPCertStatus.GOOD,
        ocsp.OCSPCertStatus.GOOD,
    ]
    assert [answer.from_front for answer in answers] == [True, False, True, False]
    assert parsed[3].extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce


# -- 3. closing connections --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "connection"),
    [("HTTP/1.0", ()), ("HTTP/1.1", ("Connection: close",))],
    ids=["http1.0", "http1.1-connection-close"],
)
@pytest.mark.parametrize("answered_by", ["front", "flask"])
def test_a_non_persistent_request_gets_connection_close_and_a_closed_socket(
    svc: PinnedService,
    leaves: tuple[Leaf, Leaf],
    intermediate: x509.Certificate,
    version: str,
    connection: tuple[str, ...],
    answered_by: str,
) -> None:
    """HTTP/1.0 without keep-alive, or HTTP/1.1 with ``Connection: close``: the answer
    (pre-signed OCSP, or the forwarded CA certificate) says ``Connection: close`` and the
    server closes the socket."""
    if answered_by == "front":
        request = post_ocsp(
            ocsp_request(leaves[1].cert, intermediate), version=version, headers=connection
        )
    else:
        request = http_request(
            "GET", f"/ca/{svc.issuer_id}.der", version=version, headers=connection
        )
    with RawClient(svc.http_port) as conn:
        answer = conn.exchange(request)
        assert answer.status == 200, answer.status_line
        assert answer.from_front == (answered_by == "front"), answer.headers
        assert answer.closes, answer.headers
        assert conn.closed_by_server(), "the server kept the connection open"
    if answered_by == "front":
        assert_good_presigned(answer, leaves[1], svc.home)
    else:
        assert answer.body == intermediate.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("answered_by", ["front", "flask"])
def test_an_http10_keep_alive_request_is_confirmed_and_the_connection_reused(
    svc: PinnedService,
    leaves: tuple[Leaf, Leaf],
    intermediate: x509.Certificate,
    answered_by: str,
) -> None:
    """HTTP/1.0 with ``Connection: keep-alive``: the front end keeps the connection open
    (``parse_head`` honours the token), so the answer must say so. An HTTP/1.0 client
    treats a connection as persistent only when the response carries the keep-alive
    token (RFC 2068 19.7.1, RFC 9112 9.3 and C.2.2); gunicorn, which served this port
    before the front end, sends ``Connection: keep-alive`` here. Without it a client
    such as ``ab -k`` waits for a close that comes only at the 15 s idle timeout."""
    if answered_by == "front":
        der = ocsp_request(leaves[1].cert, intermediate)
        request = post_ocsp(der, version="HTTP/1.0", headers=("Connection: keep-alive",))
    else:
        request = http_request(
            "GET",
            f"/ca/{svc.issuer_id}.der",
            version="HTTP/1.0",
            headers=("Connection: keep-alive",),
        )
    with RawClient(svc.http_port) as conn:
        first = conn.exchange(request)
        assert first.status == 200, first.status_line
        assert first.from_front == (answered_by == "front"), first.headers
        assert first.headers.get("connection", "").lower() == "keep-alive", (
            f"{first.status_line!r} to an HTTP/1.0 keep-alive request (which the front "
            f"end keeps open) without 'Connection: keep-alive': {first.headers}"
        )
        second = conn.exchange(request)
        assert second.status == 200 and second.body == first.body


# -- 4. the front end's own errors -------------------------------------------------------------

_FILLER = "X-Filler: " + "a" * (17 * 1024)
FRONT_ERRORS = {
    "head-over-16k": (http_request("GET", "/ocsp", headers=(_FILLER,)), 431),
    "unfinished-head-over-16k": (
        f"GET /crl/x.crl HTTP/1.1\r\nHost: 127.0.0.1\r\n{_FILLER}".encode(),
        431,
    ),
    "chunked": (
        http_request(
            "POST",
            "/ocsp",
            headers=(f"Content-Type: {OCSP_REQUEST}", "Transfer-Encoding: chunked"),
        )
        + b"5\r\nhello\r\n0\r\n\r\n",
        501,
    ),
    "body-over-64kib": (
        http_request(
            "POST",
            "/crl/whatever.crl",
            headers=("Content-Type: application/octet-stream", f"Content-Length: {64 * 1024 + 1}"),
        ),
        413,
    ),
    "garbage-request-line": (b"this is not http at all\r\n\r\n", 400),
    "unknown-http-version": (b"GET /ocsp HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", list(FRONT_ERRORS))
def test_front_end_errors_are_problem_json_and_close_the_connection(
    svc: PinnedService, leaves: tuple[Leaf, Leaf], intermediate: x509.Certificate, case: str
) -> None:
    """431 (head over 16 KiB, finished or not), 501 (chunked), 413 (Content-Length over
    64 KiB, not to /ocsp), 400 (garbage request line): problem+json from the front end itself, with
    ``Connection: close``, and the socket closed. A new connection is served normally."""
    request, status = FRONT_ERRORS[case]
    with RawClient(svc.http_port) as conn:
        conn.send(request)
        answer = conn.response()
        assert_problem(answer, status)
        assert answer.from_front, answer.headers
        assert answer.closes, answer.headers
        assert conn.closed_by_server(), "the server kept the connection open"
    with RawClient(svc.http_port) as conn:
        after = conn.exchange(post_ocsp(ocsp_request(leaves[0].cert, intermediate)))
    assert_good_presigned(after, leaves[0], svc.home)


# -- 5. the front end's memo and revocations ---------------------------------------------------


def test_a_revocation_shows_on_the_very_next_presigned_answer(
    svc: PinnedService, tmp_path: Path, intermediate: x509.Certificate
) -> None:
    """The same request bytes three times (the front end now remembers the parsed
    request and the response), a revocation through the API, and the very next request
    with the same bytes, on the same connection, with no wait: revoked, pre-signed."""
    leaf = issue_leaf(svc, tmp_path, "memo")
    wait_presigned(svc.home, leaf.serial)  # nothing races the publisher's first batch
    request_der = ocsp_request(leaf.cert, intermediate)
    post, get = post_ocsp(request_der), get_ocsp(request_der)
    with RawClient(svc.http_port) as conn:
        before = [conn.exchange(post) for _ in range(3)] + [conn.exchange(get)]
        for answer in before:
            assert_good_presigned(answer, leaf, svc.home)
        assert len({answer.body for answer in before}) == 1

        record = revoke_api(svc, leaf.serial, "keyCompromise")
        after_post = conn.exchange(post)
        after_get = conn.exchange(get)

    revoked_at = dt.datetime.fromisoformat(record["revoked_at"].replace("Z", "+00:00"))
    for answer in (after_post, after_get):
        assert answer.from_front, answer.headers
        resp = answer.ocsp()
        assert resp.serial_number == leaf.cert.serial_number
        assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED, resp.certificate_status
        assert resp.revocation_reason == x509.ReasonFlags.key_compromise
        assert resp.revocation_time_utc == revoked_at.replace(microsecond=0)
        assert answer.body != before[0].body
        assert answer.body == stored_response(svc.home, leaf.serial)
        assert_rfc5019_headers(answer)
    assert after_get.body == after_post.body


# -- 6. the store's memo -----------------------------------------------------------------------


def test_store_remembers_a_presigned_response_until_another_store_commits(
    fresh_home: Path,
) -> None:
    """``Store.presigned_ocsp`` returns the very same object while nothing was committed;
    once another Store on the same SQLite file commits a new response (a revocation
    through a second Pki, which re-signs at once), the first store returns the new one."""
    first_core, second_core = Pki.open(fresh_home), Pki.open(fresh_home)
    store = Store(first_core.settings.database.url)
    try:
        issuer_id = first_core.issuing_issuer().id
        serial = issue(first_core, "mtls-server").record.serial
        assert first_core.presign_ocsp(issuer_id, [serial]) == 2  # SHA-1 and SHA-256

        remembered = [store.presigned_ocsp(serial, "sha1") for _ in range(3)]
        good = remembered[0]
        assert good is not None
        assert all(found is good for found in remembered), remembered
        good_resp = ocsp.load_der_ocsp_response(good.der)
        assert good_resp.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert good.issuer_id == issuer_id

        second_core.revoke(serial, "keyCompromise", ACTOR)  # commits through its own Store

        revoked = store.presigned_ocsp(serial, "sha1")
        assert revoked is not None and revoked is not good
        assert revoked.der != good.der
        revoked_resp = ocsp.load_der_ocsp_response(revoked.der)
        assert revoked_resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
        assert revoked_resp.serial_number == good_resp.serial_number
        assert store.presigned_ocsp(serial, "sha1") is revoked  # remembered again
        sha256 = store.presigned_ocsp(serial, "sha256")
        assert sha256 is not None
        assert (
            ocsp.load_der_ocsp_response(sha256.der).certificate_status
            == ocsp.OCSPCertStatus.REVOKED
        )
    finally:
        store.dispose()
        second_core.close()
        first_core.close()


# -- 7. metrics --------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^hsmca_http_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def request_count(svc: PinnedService, route: str, method: str) -> float:
    """``hsmca_http_requests_total{route,method,status="200"}`` from HTTPS /metrics."""
    with svc.session() as session:  # type: ignore[attr-defined]
        resp = session.get(f"{svc.base}/metrics", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    total = 0.0
    for line in resp.text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if labels == {"route": route, "method": method, "status": "200"}:
            total += float(match["value"])
    return total


def test_metrics_count_the_presigned_answers(
    svc: PinnedService, leaves: tuple[Leaf, Leaf], intermediate: x509.Certificate
) -> None:
    """Pre-signed answers are counted under the Flask app's labels on HTTPS /metrics
    (flushed by the front end once a second)."""
    sent = 7
    routes = {"POST": "/ocsp", "GET": "/ocsp/<path:encoded>"}
    before = {method: request_count(svc, route, method) for method, route in routes.items()}
    der = ocsp_request(leaves[1].cert, intermediate)
    with RawClient(svc.http_port) as conn:
        for request in [post_ocsp(der)] * sent + [get_ocsp(der)] * sent:
            answer = conn.exchange(request)
            assert answer.from_front and answer.status == 200, answer.headers

    def counted() -> bool:
        return all(
            request_count(svc, route, method) >= before[method] + sent
            for method, route in routes.items()
        )

    poll(counted, METRICS_DEADLINE_S, "the front end's answers in /metrics", every=0.2)


# -- 8. forwarded documents --------------------------------------------------------------------


def test_ca_certificates_and_crls_are_forwarded_unchanged(svc: PinnedService) -> None:
    """/ca/<id>.der and /crl/<id>.crl through the front end: the bytes the core returns
    in-process, with the Flask app's content types and cache headers."""
    with opened(svc.home) as core, plain_session() as session:
        for issuer_id in (svc.issuer_id, svc.root_id):
            resp = session.get(f"{svc.http_base}/ca/{issuer_id}.der", timeout=TIMEOUT)
            assert resp.status_code == 200, resp.text
            assert resp.headers["Content-Type"] == "application/pkix-cert"
            assert resp.headers["Cache-Control"] == "public, max-age=3600"
            assert resp.content == core.issuer_der(issuer_id)

        for name in (svc.issuer_id, f"{svc.issuer_id}-delta", svc.root_id):
            url = f"{svc.http_base}/crl/{name}.crl"
            # a CRL may be republished between the two reads (debounced revocations of
            # other tests): poll until the served and the in-process documents agree
            served = poll(
                lambda url=url, name=name: _served_crl_matching(session, url, core, name),
                5.0,
                f"{url} to match Pki.crl_document",
            )
            assert x509.load_der_x509_crl(served).next_update_utc is not None


def _served_crl_matching(session: requests.Session, url: str, core: Pki, name: str) -> bytes | None:
    """The CRL served at ``url`` if it is the one ``Pki.crl_document(name)`` returns."""
    resp = session.get(url, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/pkix-crl"
    assert resp.headers["Cache-Control"] == "public, max-age=60"
    return resp.content if resp.content == core.crl_document(name) else None


def test_unknown_paths_are_forwarded_and_get_a_404_problem(
    svc: PinnedService, leaves: tuple[Leaf, Leaf], intermediate: x509.Certificate
) -> None:
    """Unknown paths (and an unknown CRL) get the Flask app's 404 problem+json; a 404
    does not end a keep-alive connection."""
    with RawClient(svc.http_port) as conn:
        for path in ("/no-such-document", "/crl/0000000000000000.crl", "/ocsp"):
            answer = conn.exchange(http_request("GET", path))
            assert not answer.from_front, answer.headers
            assert_problem(answer, 405 if path == "/ocsp" else 404)
            assert not answer.closes, answer.headers
        assert_good_presigned(
            conn.exchange(post_ocsp(ocsp_request(leaves[0].cert, intermediate))),
            leaves[0],
            svc.home,
        )


# -- 9. out of file descriptors ------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_front_end_out_of_descriptors_rests_and_recovers(
    svc: PinnedService, leaves: tuple[Leaf, Leaf], intermediate: x509.Certificate
) -> None:
    """More idle clients than descriptors: accept fails with EMFILE; the front end must
    neither spin on its readable listener nor stop serving once clients leave."""
    import resource
    import subprocess
    import sys
    import time

    from tests.conftest import free_port

    port = free_port()

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    front = subprocess.Popen(
        [
            *(sys.executable, "-m", "ca_service.ocsp_front", "--home", str(svc.home)),
            *("--host", "127.0.0.1", "--port", str(port), "--backend", "/nonexistent.sock"),
        ],
        preexec_fn=few_descriptors,
        stderr=subprocess.DEVNULL,
    )
    idle: list[socket.socket] = []
    try:
        request = post_ocsp(ocsp_request(leaves[0].cert, intermediate))
        answer = poll(lambda: _try_exchange(port, request), SOCKET_DEADLINE_S, "front end up")
        assert answer.status == 200 and answer.from_front
        for _ in range(80):  # well past the 48 descriptors it may hold
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        fds = Path(f"/proc/{front.pid}/fd")
        poll(lambda: len(list(fds.iterdir())) >= 47 or None, SOCKET_DEADLINE_S, "EMFILE")
        before = _cpu_seconds(front.pid)
        time.sleep(1.0)  # the measurement window
        assert _cpu_seconds(front.pid) - before < 0.5, "the front end spun on EMFILE"
        for sock in idle:
            sock.close()
        idle.clear()
        answer = poll(lambda: _try_exchange(port, request), SOCKET_DEADLINE_S, "recovered")
        assert answer.status == 200 and answer.from_front
    finally:
        for sock in idle:
            sock.close()
        front.terminate()
        front.wait(timeout=10)


def _try_exchange(port: int, request: bytes) -> RawResponse | None:
    try:
        with RawClient(port) as client:
            return client.exchange(request)
    except OSError:
        return None


# -- 10. hardening found in review ---------------------------------------------------------------


def test_a_cert_id_hash_cryptography_does_not_know_is_answered_not_dropped(
    svc: PinnedService, leaves: tuple[Leaf, Leaf]
) -> None:
    """An MD5 CertID made cryptography's parser raise UnsupportedAlgorithm out of the
    fast path: the client got nothing and waited out the keep-alive deadline."""
    from asn1crypto import ocsp as aocsp

    request = aocsp.OCSPRequest(
        {
            "tbs_request": {
                "request_list": [
                    {
                        "req_cert": {
                            "hash_algorithm": {"algorithm": "md5"},
                            "issuer_name_hash": b"\0" * 16,
                            "issuer_key_hash": b"\0" * 16,
                            "serial_number": int(leaves[0].serial, 16),
                        }
                    }
                ]
            }
        }
    ).dump()
    with RawClient(svc.http_port) as client:
        answer = client.exchange(post_ocsp(request))
        assert answer.status == 200
        assert answer.headers["content-type"] == "application/ocsp-response"
        status = ocsp.load_der_ocsp_response(answer.body).response_status
        assert status != ocsp.OCSPResponseStatus.SUCCESSFUL
        # and the connection still serves
        again = client.exchange(post_ocsp(ocsp_request(leaves[0].cert, _issuer_of(svc))))
        assert again.status == 200 and again.from_front


def test_proxy_headers_from_clients_do_not_reach_the_app(svc: PinnedService) -> None:
    """gunicorn trusts its Unix-socket peer as a proxy: a client's SCRIPT_NAME header
    would have re-rooted the request path (and X-Forwarded-Proto changed its scheme)."""
    with opened(svc.home) as core:
        issuer_id = core.issuing_issuer().id
        expected = core.issuer_der(issuer_id)
    request = http_request(
        "GET",
        f"/ca/{issuer_id}.der",
        headers=("SCRIPT_NAME: /ca", "X-Forwarded-Proto: https", "X-Forwarded-Host: evil.test"),
    )
    with RawClient(svc.http_port) as client:
        answer = client.exchange(request)
    assert answer.status == 200, answer.body[:200]
    assert answer.body == expected


def _issuer_of(svc: PinnedService) -> x509.Certificate:
    with opened(svc.home) as core:
        return x509.load_der_x509_certificate(core.issuer_der(core.issuing_issuer().id))


def test_a_huge_ocsp_body_is_malformed_at_once_and_discarded_not_buffered(
    svc: PinnedService, leaves: tuple[Leaf, Leaf], intermediate: x509.Certificate
) -> None:
    """A POST /ocsp announcing 8 MiB is answered malformedRequest before its body is
    sent; the body is then read and dropped, and the same connection serves on."""
    size = 8 * 1024 * 1024
    head = http_request(
        "POST", "/ocsp", headers=(f"Content-Type: {OCSP_REQUEST}", f"Content-Length: {size}")
    )
    with RawClient(svc.http_port) as client:
        answer = client.exchange(head)
        assert answer.status == 200 and answer.from_front
        status = ocsp.load_der_ocsp_response(answer.body).response_status
        assert status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        chunk = b"\0" * 65536
        for _ in range(size // len(chunk)):
            client.sock.sendall(chunk)
        again = client.exchange(post_ocsp(ocsp_request(leaves[0].cert, intermediate)))
        assert_good_presigned(again, leaves[0], svc.home)


def test_a_backend_response_cut_short_ends_the_client_connection(svc: PinnedService) -> None:
    """A worker that dies mid-body: the short body is passed on and the connection
    closed, so the client cannot read the next response as the rest of this one."""
    import subprocess
    import sys
    import tempfile
    import threading

    from tests.conftest import free_port

    directory = Path(tempfile.mkdtemp(prefix="hsmca-t-"))  # a socket path has < 108 bytes
    backend_path = str(directory / "backend.sock")
    backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.bind(backend_path)
    backend.listen(4)

    def serve_truncated() -> None:
        conn, _ = backend.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)

    thread = threading.Thread(target=serve_truncated, daemon=True)
    thread.start()
    port = free_port()
    front = subprocess.Popen(
        [
            *(sys.executable, "-m", "ca_service.ocsp_front", "--home", str(svc.home)),
            *("--host", "127.0.0.1", "--port", str(port), "--backend", backend_path),
        ],
        stderr=subprocess.DEVNULL,
    )
    try:

        def connected() -> socket.socket | None:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=SOCKET_DEADLINE_S)
            except OSError:
                return None

        client = poll(connected, SOCKET_DEADLINE_S, "front end up")
        with client:
            client.sendall(http_request("GET", "/crl/anything.crl"))
            received = b""
            while chunk := client.recv(65536):  # ends only when the front end closes
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), received[:200]
        assert b"connection: close" in head.lower()
        assert body == b"x" * 10
    finally:
        front.terminate()
        front.wait(timeout=10)
        backend.close()
        thread.join(timeout=5)
