"""Revocation over the plain-HTTP listener, with real clients against a real service.

The OCSP responder (RFC 6960 / RFC 5019) is queried with ``openssl ocsp``, ``curl`` and
requests; CRLs are fetched from the URLs inside the certificates and checked with
``openssl crl`` and ``openssl verify -crl_check``. Each xdist worker runs its own
``hsmca serve`` on a home whose ``public_http_url`` is that service's real port.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from pki.actors import operator
from tests.helpers import sqlite_query
from tests.issuance_helpers import errors_of, issue, pkilint, write_pem
from tests.revocation_helpers import (
    OCSP_RESPONSE,
    Leaf,
    PinnedService,
    aia_url,
    cdp_url,
    curl,
    der_crl_to_pem,
    http_get,
    issue_leaf,
    load_response,
    ocsp_post,
    open_idle_socket,
    opened,
    openssl_ocsp,
    openssl_verify,
    percent_encode,
    plain_session,
    poll,
    revoke_api,
    run,
    serials_of,
    start_pinned_service,
    status_line,
    wait_presigned,
)

#: the design: OCSP says revoked within a second of the API call (2 s with slack)
OCSP_REVOKED_DEADLINE_S = 2.0
#: a CDP/delta URL lists a revocation at once (rebuilt on demand); slack for a busy box
CRL_DEADLINE_S = 5.0
NEVER_ISSUED = "0x1234567"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PinnedService]:
    """This module's own service: its certificates' CDP/AIA URLs name its real port."""
    running = start_pinned_service(tmp_path_factory.mktemp("revocation"))
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


@pytest.fixture
def intermediate(svc: PinnedService) -> x509.Certificate:
    return x509.load_pem_x509_certificate(svc.intermediate.read_bytes())


def _ocsp_request(
    leaf: x509.Certificate,
    issuer: x509.Certificate,
    algorithm: hashes.HashAlgorithm | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """A DER OCSP request for one certificate built with cryptography."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, algorithm or hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _reqout(svc: PinnedService, tmp_path: Path, *args: str) -> bytes:
    """``openssl ocsp -reqout`` (no -url: only writes the DER request)."""
    out = tmp_path / "req.der"
    done = run(["openssl", "ocsp", "-issuer", str(svc.intermediate), *args, "-reqout", str(out)])
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def _assert_good(der: bytes, serial: int) -> ocsp.OCSPResponse:
    resp = load_response(der)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.serial_number == serial
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    return resp


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def _fetch_crl_listing(url: str, serial: int) -> bytes:
    """Poll ``url`` until the CRL there lists ``serial``; its DER."""

    def listed() -> bytes | None:
        resp = http_get(url)
        assert resp.status_code == 200, resp.text
        return resp.content if serial in serials_of(x509.load_der_x509_crl(resp.content)) else None

    return poll(listed, CRL_DEADLINE_S, f"{url} to list {serial:x}")


# -- OCSP: openssl ocsp ----------------------------------------------------------------------


def test_openssl_ocsp_says_good_and_verifies_signature_and_nonce(
    svc: PinnedService, tmp_path: Path
) -> None:
    """``openssl ocsp -resp_text`` (with its default nonce): good, responder signature
    verified against the chain, the nonce echoed (no nonce warning)."""
    leaf = issue_leaf(svc, tmp_path, "good")
    done = openssl_ocsp(svc, "-cert", str(leaf.path), "-resp_text")
    assert done.returncode == 0, done.stdout + done.stderr
    assert status_line(done, leaf.path) == "good"
    assert "Response verify OK" in done.stderr, done.stderr
    everything = done.stdout + done.stderr
    assert "WARNING: no nonce in response" not in everything, everything
    assert "nonce verify error" not in everything.lower(), everything
    assert "OCSP Nonce" in done.stdout, done.stdout
    assert f"Serial Number: {leaf.serial.upper()}" in done.stdout


def test_responder_certificate_is_a_delegated_ocsp_signer(
    svc: PinnedService, tmp_path: Path, intermediate: x509.Certificate
) -> None:
    """The response carries the delegated responder: EKU OCSPSigning, id-pkix-ocsp-nocheck,
    issued (and signed) by the issuing CA, short-lived, named byKey; the response
    signature verifies with its key."""
    leaf = issue_leaf(svc, tmp_path, "responder")
    out = tmp_path / "resp.der"
    done = openssl_ocsp(svc, "-cert", str(leaf.path), "-respout", str(out))
    assert done.returncode == 0, done.stderr
    resp = load_response(out.read_bytes())
    assert len(resp.certificates) == 1
    responder = resp.certificates[0]
    assert responder != intermediate
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert responder.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert responder.issuer == intermediate.subject
    responder.verify_directly_issued_by(intermediate)
    lifetime = responder.not_valid_after_utc - responder.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=8), lifetime  # [ca] ocsp_ttl = 7d
    assert (
        resp.responder_key_hash
        == x509.SubjectKeyIdentifier.from_public_key(responder.public_key()).digest
    )
    key = responder.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert resp.signature_hash_algorithm is not None
    key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))


def test_revoke_through_the_api_shows_in_ocsp_within_a_second(
    svc: PinnedService, tmp_path: Path
) -> None:
    """good, then a REST revoke (keyCompromise), then ``openssl ocsp`` says revoked with
    the reason and the revocation time, pre-signed (no nonce) and live (nonce) alike."""
    leaf = issue_leaf(svc, tmp_path, "torevoke")
    # let the publisher finish pre-signing the new certificate first: a batch that read
    # "good" before the revocation could otherwise overwrite the revoked response (see
    # the report; not what this test is about)
    wait_presigned(svc.home, leaf.serial)
    before = openssl_ocsp(svc, "-cert", str(leaf.path), "-no_nonce")
    assert status_line(before, leaf.path) == "good", before.stdout

    record = revoke_api(svc, leaf.serial, "keyCompromise")
    revoked_at = dt.datetime.fromisoformat(record["revoked_at"].replace("Z", "+00:00"))

    def revoked() -> object:
        done = openssl_ocsp(svc, "-cert", str(leaf.path), "-no_nonce")
        return done if status_line(done, leaf.path) == "revoked" else None

    done = poll(revoked, OCSP_REVOKED_DEADLINE_S, "OCSP to say revoked")
    assert "Reason: keyCompromise" in done.stdout, done.stdout
    assert "Response verify OK" in done.stderr, done.stderr

    out = tmp_path / "revoked.der"
    live = openssl_ocsp(svc, "-cert", str(leaf.path), "-resp_text", "-respout", str(out))
    assert status_line(live, leaf.path) == "revoked", live.stdout
    assert "Reason: keyCompromise" in live.stdout
    assert "Response verify OK" in live.stderr
    assert "WARNING" not in live.stdout + live.stderr
    resp = load_response(out.read_bytes())
    assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason == x509.ReasonFlags.key_compromise
    assert resp.revocation_time_utc == revoked_at.replace(microsecond=0)


def test_a_serial_never_issued_is_unknown(svc: PinnedService) -> None:
    """``-serial 0x1234567`` (never issued by this CA): unknown, signed and verified."""
    for nonce in ((), ("-no_nonce",)):
        done = openssl_ocsp(svc, "-serial", NEVER_ISSUED, *nonce)
        assert done.returncode == 0, done.stderr
        assert status_line(done, NEVER_ISSUED) == "unknown", done.stdout
        assert "Response verify OK" in done.stderr


def test_requests_without_nonce_get_the_pre_signed_response(
    svc: PinnedService, tmp_path: Path, intermediate: x509.Certificate
) -> None:
    """A new certificate's responses are pre-signed without any request; ``-no_nonce``
    works; nonce-less requests get the same pre-signed bytes (cacheable), requests with a
    nonce are signed live with that nonce (not cacheable)."""
    leaf = issue_leaf(svc, tmp_path, "presigned")
    wait_presigned(svc.home, leaf.serial)  # before any request: nothing races the publisher
    done = openssl_ocsp(svc, "-cert", str(leaf.path), "-no_nonce", "-resp_text")
    assert status_line(done, leaf.path) == "good"
    assert "Response verify OK" in done.stderr
    assert "OCSP Nonce" not in done.stdout

    plain = _reqout(svc, tmp_path, "-cert", str(leaf.path), "-no_nonce")
    first, second = ocsp_post(svc.ocsp_url, plain), ocsp_post(svc.ocsp_url, plain)
    assert first.content == second.content
    (stored,) = sqlite_query(
        svc.home,
        "SELECT der FROM ocsp_responses WHERE serial = ? AND hash_algorithm = 'sha1'",
        (leaf.serial,),
    )
    assert first.content == stored[0]
    assert "max-age=" in first.headers["Cache-Control"]
    _assert_good(first.content, leaf.cert.serial_number)

    nonces = [os.urandom(16), os.urandom(16)]
    answers = [
        ocsp_post(svc.ocsp_url, _ocsp_request(leaf.cert, intermediate, nonce=n)) for n in nonces
    ]
    for nonce, answer in zip(nonces, answers, strict=True):
        resp = _assert_good(answer.content, leaf.cert.serial_number)
        assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
        assert answer.headers["Cache-Control"] == "no-store"
    assert answers[0].content != answers[1].content


# -- OCSP: GET -----------------------------------------------------------------------------


def test_get_with_curl_and_rfc5019_cache_headers(svc: PinnedService, tmp_path: Path) -> None:
    """The DER request of ``openssl ocsp -reqout -no_nonce``, base64 and URL-encoded in
    the path, fetched with curl: a good response that ``openssl ocsp -respin`` verifies,
    with Content-Type, Cache-Control max-age, ETag and Last-Modified (= thisUpdate)."""
    leaf = issue_leaf(svc, tmp_path, "getcurl")
    wait_presigned(svc.home, leaf.serial)  # before any request: nothing races the publisher
    der = _reqout(svc, tmp_path, "-cert", str(leaf.path), "-no_nonce")
    url = f"{svc.http_base}/ocsp/{percent_encode(base64.b64encode(der).decode())}"
    out = tmp_path / "resp.der"
    headers = curl(url, out)

    assert headers["content-type"] == OCSP_RESPONSE
    directives = dict(
        [*part.strip().split("=", 1), ""][:2] for part in headers["cache-control"].split(",")
    )
    resp = _assert_good(out.read_bytes(), leaf.cert.serial_number)
    assert resp.next_update_utc is not None
    max_age = int(directives["max-age"])
    assert 0 < max_age <= (resp.next_update_utc - dt.datetime.now(dt.UTC)).total_seconds() + 2
    assert headers["etag"].startswith('"') and len(headers["etag"]) > 2
    last_modified = dt.datetime.strptime(headers["last-modified"], "%a, %d %b %Y %H:%M:%S GMT")
    assert last_modified.replace(tzinfo=dt.UTC) == resp.this_update_utc

    again = curl(url, tmp_path / "again.der")
    assert again["etag"] == headers["etag"]
    assert (tmp_path / "again.der").read_bytes() == out.read_bytes()

    done = run(
        [
            "openssl", "ocsp", "-respin", str(out), "-resp_text", "-CAfile", str(svc.chain),
            "-issuer", str(svc.intermediate), "-cert", str(leaf.path),
        ]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert status_line(done, leaf.path) == "good"
    assert "Response verify OK" in done.stderr


def _nonce_for_awkward_base64(leaf: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """A nonce that makes the request's standard base64 contain '+', '/' and '='."""
    for length in range(16, 40):
        for fill in (0xFB, 0xFF, 0xFE, 0xEF):
            nonce = bytes([fill]) * (length - 3) + b"\xfb\xef\xbe"
            text = base64.b64encode(_ocsp_request(leaf, issuer, nonce=nonce)).decode()
            if "+" in text and "/" in text and text.endswith("="):
                return nonce
    raise AssertionError("no nonce gave '+', '/' and '=' in the base64 request")


@pytest.mark.parametrize("alphabet", ["standard-url-encoded", "url-safe"])
def test_get_accepts_both_base64_alphabets(
    svc: PinnedService, tmp_path: Path, intermediate: x509.Certificate, alphabet: str
) -> None:
    """A request whose base64 contains '+', '/' and '=' works both URL-encoded in the
    standard alphabet (RFC 6960 appendix A) and in the URL-safe alphabet without padding;
    the nonce comes back."""
    leaf = issue_leaf(svc, tmp_path, f"get-{alphabet}")
    nonce = _nonce_for_awkward_base64(leaf.cert, intermediate)
    der = _ocsp_request(leaf.cert, intermediate, nonce=nonce)
    if alphabet == "url-safe":
        path = base64.urlsafe_b64encode(der).decode().rstrip("=")
        assert "-" in path and "_" in path
    else:
        path = percent_encode(base64.b64encode(der).decode())
        assert "%2B" in path and "%2F" in path and "%3D" in path
    out = tmp_path / "resp.der"
    headers = curl(f"{svc.http_base}/ocsp/{path}", out)
    assert headers["content-type"] == OCSP_RESPONSE
    resp = _assert_good(out.read_bytes(), leaf.cert.serial_number)
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce


# -- OCSP: several CertIDs, SHA-256 ----------------------------------------------------------


def test_several_cert_ids_in_one_request(svc: PinnedService, tmp_path: Path) -> None:
    """Three CertIDs in one ``openssl ocsp`` request (good, revoked, never issued): one
    signed response stating each."""
    good = issue_leaf(svc, tmp_path, "multi-good")
    bad = issue_leaf(svc, tmp_path, "multi-bad")
    wait_presigned(svc.home, bad.serial)
    revoke_api(svc, bad.serial, "superseded")
    out = tmp_path / "multi.der"
    done = openssl_ocsp(
        svc,
        "-cert", str(good.path), "-cert", str(bad.path), "-serial", NEVER_ISSUED,
        "-respout", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Response verify OK" in done.stderr
    assert status_line(done, good.path) == "good"
    assert status_line(done, bad.path) == "revoked"
    assert status_line(done, NEVER_ISSUED) == "unknown"
    singles = {s.serial_number: s for s in load_response(out.read_bytes()).responses}
    assert set(singles) == {good.cert.serial_number, bad.cert.serial_number, 0x1234567}
    assert singles[bad.cert.serial_number].revocation_reason == x509.ReasonFlags.superseded


def test_sha256_cert_ids_are_answered_with_sha256(
    svc: PinnedService, tmp_path: Path, intermediate: x509.Certificate
) -> None:
    """``openssl ocsp -sha256 -cert`` and cryptography's SHA-256 CertID: good, and the
    answer's CertID uses SHA-256 with the SHA-256 issuer hashes."""
    leaf = issue_leaf(svc, tmp_path, "sha256")
    for nonce in ((), ("-no_nonce",)):
        out = tmp_path / "sha256.der"
        done = openssl_ocsp(svc, *nonce, "-sha256", "-cert", str(leaf.path), "-respout", str(out))
        assert done.returncode == 0, done.stderr
        assert status_line(done, leaf.path) == "good"
        assert "Response verify OK" in done.stderr
        resp = _assert_good(out.read_bytes(), leaf.cert.serial_number)
        assert isinstance(resp.hash_algorithm, hashes.SHA256)

    der = _ocsp_request(leaf.cert, intermediate, hashes.SHA256())
    resp = _assert_good(ocsp_post(svc.ocsp_url, der).content, leaf.cert.serial_number)
    assert isinstance(resp.hash_algorithm, hashes.SHA256)
    expected = ocsp.load_der_ocsp_request(der)
    assert resp.issuer_key_hash == expected.issuer_key_hash
    assert resp.issuer_name_hash == expected.issuer_name_hash
    assert len(resp.issuer_key_hash) == 32


# -- OCSP: bad requests, foreign issuers, slow clients ---------------------------------------


def _good_request_works(svc: PinnedService, leaf: Leaf, der: bytes) -> None:
    """A fresh client still gets a good answer."""
    with plain_session() as s:
        _assert_good(ocsp_post(svc.ocsp_url, der, s).content, leaf.cert.serial_number)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "one-megabyte", "empty", "get-not-b64"])
def test_bad_requests_are_malformed_and_the_responder_keeps_serving(
    svc: PinnedService, tmp_path: Path, kind: str
) -> None:
    """Garbage, a truncated request, a 1 MB body, an empty body and a GET path that is not
    base64: HTTP 200 with responseStatus malformedRequest; good requests still work."""
    leaf = issue_leaf(svc, tmp_path, f"bad-{kind}")
    valid = _reqout(svc, tmp_path, "-cert", str(leaf.path), "-no_nonce")
    bodies = {
        "garbage": b"this is not DER at all \x00\xff",
        "truncated": valid[:-7],
        "one-megabyte": os.urandom(1 << 20),
        "empty": b"",
    }
    with plain_session() as s:
        if kind == "get-not-b64":
            resp = s.get(f"{svc.ocsp_url}/not%20base64%21%21", timeout=20)
        else:
            resp = ocsp_post(svc.ocsp_url, bodies[kind], s)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["Content-Type"] == OCSP_RESPONSE
    answer = load_response(resp.content)
    assert answer.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    _good_request_works(svc, leaf, valid)


def test_a_foreign_issuer_is_unauthorized(
    svc: PinnedService, tmp_path: Path, fresh_home: Path, intermediate: x509.Certificate
) -> None:
    """A CertID naming another CA (or mixing ours with it): ``unauthorized``."""
    with opened(fresh_home) as other:
        foreign = issue(other, "mtls-server").cert
    other_issuer = x509.load_pem_x509_certificate(
        (fresh_home / "ca" / "intermediate.pem").read_bytes()
    )
    foreign_path = write_pem(tmp_path / "foreign.pem", foreign)
    done = run(
        [
            "openssl", "ocsp", "-issuer", str(fresh_home / "ca" / "intermediate.pem"),
            "-cert", str(foreign_path), "-url", svc.ocsp_url, "-CAfile", str(svc.chain),
        ]
    )  # fmt: skip
    assert "unauthorized" in (done.stdout + done.stderr).lower(), done.stdout + done.stderr

    ours = issue_leaf(svc, tmp_path, "mixed")
    ours_only = _ocsp_request(ours.cert, intermediate)
    only_foreign = _ocsp_request(foreign, other_issuer)
    both = _two_cert_request(ours_only, only_foreign)
    for der in (only_foreign, both):
        resp = load_response(ocsp_post(svc.ocsp_url, der).content)
        assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    _assert_good(ocsp_post(svc.ocsp_url, ours_only).content, ours.cert.serial_number)


def _two_cert_request(first: bytes, second: bytes) -> bytes:
    """An OCSPRequest with the single Request of ``first`` and that of ``second``
    (cryptography builds single-CertID requests only)."""
    from asn1crypto import ocsp as aocsp

    a = aocsp.OCSPRequest.load(first)
    b = aocsp.OCSPRequest.load(second)
    items = [a["tbs_request"]["request_list"][0], b["tbs_request"]["request_list"][0]]
    return aocsp.OCSPRequest({"tbs_request": {"request_list": items}}).dump()


def _half_requests(valid: bytes) -> list[bytes]:
    """What stalling clients send: nothing, half the headers, the headers and half a body."""
    head = (
        b"POST /ocsp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
        b"Content-Length: " + str(len(valid)).encode() + b"\r\n\r\n"
    )
    return [b"", head[: len(head) // 2], head + valid[: len(valid) // 2]]


def _twenty_requests_complete(svc: PinnedService, valid: bytes, serial: int, limit: float) -> float:
    """20 sequential OCSP requests, each answered good; the seconds they took."""
    started = time.monotonic()
    with plain_session() as s:
        for _ in range(20):
            resp = s.post(
                svc.ocsp_url,
                data=valid,
                headers={"Content-Type": "application/ocsp-request"},
                timeout=limit,
            )
            _assert_good(resp.content, serial)
    return time.monotonic() - started


def test_idle_and_slow_clients_do_not_stall_other_clients(
    svc: PinnedService, tmp_path: Path
) -> None:
    """Clients that connect and close at once, one that sends nothing and two that send
    half a request and stall: meanwhile 20 OCSP requests complete within 5 s."""
    leaf = issue_leaf(svc, tmp_path, "stall")
    valid = _reqout(svc, tmp_path, "-cert", str(leaf.path), "-no_nonce")
    for _ in range(5):
        open_idle_socket(svc.http_port).close()  # connect and close without a request
    idle = [open_idle_socket(svc.http_port, data) for data in _half_requests(valid)]
    try:
        took = _twenty_requests_complete(svc, valid, leaf.cert.serial_number, 5.0)
        assert took < 5.0, took
    finally:
        for sock in idle:
            sock.close()


def test_more_stalling_clients_than_listener_threads_do_not_stall_ocsp(
    svc: PinnedService, tmp_path: Path
) -> None:
    """Eight clients that send half a request and stall (more than the listener has
    threads): 20 OCSP requests must still complete, each within 2 s."""
    leaf = issue_leaf(svc, tmp_path, "stall8")
    valid = _reqout(svc, tmp_path, "-cert", str(leaf.path), "-no_nonce")
    half = _half_requests(valid)[1:]
    stalled = [open_idle_socket(svc.http_port, half[i % 2]) for i in range(8)]
    try:
        took = _twenty_requests_complete(svc, valid, leaf.cert.serial_number, 2.0)
        assert took < 5.0, took
    except requests.RequestException as exc:
        raise AssertionError(f"OCSP stalled by 8 slow clients: {exc}") from None
    finally:
        for sock in stalled:
            sock.close()
        _wait_until_serving(svc, valid, leaf.cert.serial_number)


def _wait_until_serving(svc: PinnedService, valid: bytes, serial: int) -> None:
    """After stalling clients left, the responder serves again (for the next tests)."""

    def serving() -> bool:
        try:
            _assert_good(ocsp_post(svc.ocsp_url, valid).content, serial)
            return True
        except requests.RequestException:
            return False

    poll(serving, 30.0, "the OCSP responder to serve again", every=0.2)


# -- CRLs --------------------------------------------------------------------------------------


def test_the_cdp_crl_verifies_and_has_the_rfc5280_extensions(
    svc: PinnedService, tmp_path: Path, intermediate: x509.Certificate
) -> None:
    """The CRL at the leaf's CDP URL (fetched with curl): ``openssl crl -CAfile`` verifies
    it; CRL number, AKI, nextUpdate, a critical IDP naming the CDP URL, a Freshest CRL
    pointing at the delta; Content-Type and Cache-Control headers."""
    leaf = issue_leaf(svc, tmp_path, "cdp")
    url = cdp_url(leaf.cert)
    assert url == f"{svc.http_base}/crl/{svc.issuer_id}.crl"
    out = tmp_path / "base.crl"
    headers = curl(url, out)
    assert headers["content-type"] == "application/pkix-crl"
    assert "max-age=" in headers["cache-control"]

    done = run(
        ["openssl", "crl", "-inform", "DER", "-in", str(out), "-noout", "-CAfile", str(svc.chain)]
    )
    assert done.returncode == 0 and "verify OK" in done.stdout + done.stderr, done.stderr

    crl = x509.load_der_x509_crl(out.read_bytes())
    assert crl.is_signature_valid(intermediate.public_key())  # type: ignore[arg-type]
    assert crl.issuer == intermediate.subject
    assert _crl_number(crl) > 0
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.next_update_utc is not None
    assert crl.last_update_utc <= dt.datetime.now(dt.UTC) < crl.next_update_utc
    idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical
    assert idp.value.full_name == [x509.UniformResourceIdentifier(url)]
    freshest = crl.extensions.get_extension_for_class(x509.FreshestCRL).value
    assert [p.full_name for p in freshest] == [
        [x509.UniformResourceIdentifier(url.removesuffix(".crl") + "-delta.crl")]
    ]


def test_openssl_verify_crl_check_fails_for_a_revoked_certificate(
    svc: PinnedService, tmp_path: Path
) -> None:
    """Right after a REST revoke the CDP CRL lists the certificate (reasonCode entry,
    revocation date = the API's): ``openssl verify -crl_check`` fails with "certificate
    revoked" for it and passes for a good certificate."""
    good = issue_leaf(svc, tmp_path, "crl-good")
    bad = issue_leaf(svc, tmp_path, "crl-bad")
    record = revoke_api(svc, bad.serial, "keyCompromise")
    der = _fetch_crl_listing(cdp_url(bad.cert), bad.cert.serial_number)
    crl = x509.load_der_x509_crl(der)
    assert good.cert.serial_number not in serials_of(crl)
    entry = crl.get_revoked_certificate_by_serial_number(bad.cert.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    revoked_at = dt.datetime.fromisoformat(record["revoked_at"].replace("Z", "+00:00"))
    assert entry.revocation_date_utc == revoked_at.replace(microsecond=0)

    pem = der_crl_to_pem(der, tmp_path / "cdp.crl.pem")
    failed = openssl_verify(svc.chain, bad.path, [pem])
    assert failed.returncode != 0
    assert "certificate revoked" in failed.stdout + failed.stderr, failed.stdout + failed.stderr
    passed = openssl_verify(svc.chain, good.path, [pem])
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert f"{good.path}: OK" in passed.stdout


def test_invalidity_date_is_an_entry_extension(svc: PinnedService, tmp_path: Path) -> None:
    """A revocation through the core with an invalidity date: the CRL entry carries it
    (and the reason)."""
    leaf = issue_leaf(svc, tmp_path, "invalidity")
    invalid_since = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=3)
    with opened(svc.home) as core:
        core.revoke(
            leaf.serial,
            "keyCompromise",
            operator("revocation-tests"),
            invalidity_date=invalid_since,
        )
    crl = x509.load_der_x509_crl(_fetch_crl_listing(cdp_url(leaf.cert), leaf.cert.serial_number))
    entry = crl.get_revoked_certificate_by_serial_number(leaf.cert.serial_number)
    assert entry is not None
    invalidity = entry.extensions.get_extension_for_class(x509.InvalidityDate).value
    assert invalidity.invalidity_date_utc == invalid_since
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise


def test_the_delta_crl_lists_a_revocation_made_after_the_base(
    svc: PinnedService, tmp_path: Path, intermediate: x509.Certificate
) -> None:
    """Fetch the base, revoke, poll the Freshest CRL (delta) URL until it lists the
    serial: critical DeltaCRLIndicator that this base satisfies (RFC 5280 5.2.4), same IDP
    as the base, no Freshest CRL of its own; ``openssl verify -crl_check -use_deltas`` with
    base + delta fails (revoked) where the base alone still passes."""
    leaf = issue_leaf(svc, tmp_path, "delta")
    base_der = http_get(cdp_url(leaf.cert)).content
    base = x509.load_der_x509_crl(base_der)
    assert leaf.cert.serial_number not in serials_of(base)
    (delta_point,) = base.extensions.get_extension_for_class(x509.FreshestCRL).value
    assert delta_point.full_name is not None
    delta_url = delta_point.full_name[0].value

    revoke_api(svc, leaf.serial, "superseded")
    delta_der = _fetch_crl_listing(delta_url, leaf.cert.serial_number)
    delta = x509.load_der_x509_crl(delta_der)
    assert delta.is_signature_valid(intermediate.public_key())  # type: ignore[arg-type]
    indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert indicator.critical
    assert indicator.value.crl_number <= _crl_number(base) < _crl_number(delta)
    assert (
        delta.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
        == base.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    )
    with pytest.raises(x509.ExtensionNotFound):
        delta.extensions.get_extension_for_class(x509.FreshestCRL)
    entry = delta.get_revoked_certificate_by_serial_number(leaf.cert.serial_number)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        == x509.ReasonFlags.superseded
    )

    base_pem = der_crl_to_pem(base_der, tmp_path / "base.crl.pem")
    delta_pem = der_crl_to_pem(delta_der, tmp_path / "delta.crl.pem")
    alone = openssl_verify(svc.chain, leaf.path, [base_pem])
    assert alone.returncode == 0, alone.stdout + alone.stderr
    combined = openssl_verify(svc.chain, leaf.path, [base_pem, delta_pem], "-use_deltas")
    assert combined.returncode != 0
    assert "certificate revoked" in combined.stdout + combined.stderr


def test_the_aia_ca_issuers_url_serves_the_issuing_ca(
    svc: PinnedService, tmp_path: Path, intermediate: x509.Certificate
) -> None:
    """``/ca/<issuer-id>.der`` (the leaf's AIA caIssuers URL) is the issuing CA's DER
    certificate, which verifies the leaf; the AIA OCSP URL is our responder."""
    leaf = issue_leaf(svc, tmp_path, "aia")
    url = aia_url(leaf.cert, AuthorityInformationAccessOID.CA_ISSUERS)
    assert url == f"{svc.http_base}/ca/{svc.issuer_id}.der"
    assert aia_url(leaf.cert, AuthorityInformationAccessOID.OCSP) == svc.ocsp_url
    resp = http_get(url)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/pkix-cert"
    assert resp.headers.get("Cache-Control")
    served = x509.load_der_x509_certificate(resp.content)
    assert served == intermediate
    leaf.cert.verify_directly_issued_by(served)


@pytest.mark.parametrize("path", ["/crl/{missing}.crl", "/crl/{issuer}-7.crl", "/ca/{missing}.der"])
def test_unknown_revocation_documents_are_404(svc: PinnedService, path: str) -> None:
    """An issuer or partition that does not exist: 404, not a 500 or an empty CRL."""
    url = svc.http_base + path.format(missing="00" * 8, issuer=svc.issuer_id)
    assert http_get(url).status_code == 404


def test_the_whole_chain_verifies_with_crl_check_all(svc: PinnedService, tmp_path: Path) -> None:
    """``openssl verify -crl_check_all`` with the CRLs at the leaf's and at the issuing
    CA's CDP URLs: the chain verifies (the root's CRL must cover CA certificates)."""
    leaf = issue_leaf(svc, tmp_path, "crlall")
    inter = x509.load_pem_x509_certificate(svc.intermediate.read_bytes())
    root_url = cdp_url(inter)
    assert root_url == f"{svc.http_base}/crl/{svc.root_id}.crl"
    crls = [
        der_crl_to_pem(http_get(url).content, tmp_path / f"{name}.crl.pem")
        for name, url in (("leaf-crl", cdp_url(leaf.cert)), ("root-crl", root_url))
    ]
    done = openssl_verify(svc.chain, leaf.path, crls, "-crl_check_all")
    assert done.returncode == 0, done.stdout + done.stderr


def _wait_until_crls_cover_every_revocation(svc: PinnedService) -> None:
    """Poll until the newest delta CRL was built after the newest revocation (so the
    publisher has nothing pending from earlier tests)."""

    def covered() -> bool:
        ((newest, built),) = sqlite_query(
            svc.home,
            "SELECT (SELECT MAX(revoked_at) FROM certificates"
            "        WHERE issuer_id = ? AND status = 'revoked'),"
            "       (SELECT MAX(built_at) FROM crls WHERE issuer_id = ? AND kind = 'delta')",
            (svc.issuer_id, svc.issuer_id),
        )
        return newest is None or (built is not None and built >= newest)

    poll(covered, 10.0, "the publisher to cover earlier revocations", every=0.1)


def test_a_burst_of_revocations_makes_one_crl(svc: PinnedService, tmp_path: Path) -> None:
    """Ten REST revocations in about a second: the publisher waits until the burst has
    been quiet for ``debounce_seconds`` and then builds one complete CRL and one delta
    listing all ten (nobody fetches meanwhile, so only the publisher builds)."""
    leaves = [issue_leaf(svc, tmp_path, f"burst{i}") for i in range(10)]
    _wait_until_crls_cover_every_revocation(svc)  # earlier tests' revocations published
    (before,) = sqlite_query(
        svc.home, "SELECT COALESCE(MAX(number), 0) FROM crls WHERE issuer_id = ?", (svc.issuer_id,)
    )[0]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        records = list(pool.map(lambda leaf: revoke_api(svc, leaf.serial, "superseded"), leaves))
    burst_s = time.monotonic() - started
    last_revocation = max(
        dt.datetime.fromisoformat(r["revoked_at"].replace("Z", "+00:00")) for r in records
    )
    wanted = {leaf.cert.serial_number for leaf in leaves}

    def new_crls() -> list[tuple[str, int, str, bytes]]:
        return sqlite_query(
            svc.home,
            "SELECT kind, number, built_at, der FROM crls "
            "WHERE issuer_id = ? AND number > ? ORDER BY number",
            (svc.issuer_id, before),
        )

    def delta_lists_all() -> bool:
        return any(
            kind == "delta" and wanted <= serials_of(x509.load_der_x509_crl(der))
            for kind, _n, _b, der in new_crls()
        )

    poll(delta_lists_all, 15.0, "a published delta CRL listing all ten", every=0.2)
    rows = new_crls()
    kinds = [kind for kind, *_ in rows]
    assert 1 <= kinds.count("full") <= 2, (kinds, burst_s)
    assert kinds.count("delta") <= 2, (kinds, burst_s)
    with opened(svc.home) as core:
        debounce = dt.timedelta(seconds=core.settings.crl.debounce_seconds)
    first_built = min(
        dt.datetime.fromisoformat(built).replace(tzinfo=dt.UTC) for _k, _n, built, _d in rows
    )
    assert first_built >= last_revocation + debounce - dt.timedelta(milliseconds=50), (
        first_built,
        last_revocation,
        burst_s,
    )
    served = x509.load_der_x509_crl(
        http_get(f"{svc.http_base}/crl/{svc.issuer_id}-delta.crl").content
    )
    assert wanted <= serials_of(served)


# -- pkilint -----------------------------------------------------------------------------------


def _no_lint_errors(tool: str, path: Path, *args: str) -> None:
    findings = pkilint(tool, *args, "-s", "WARNING", str(path))
    assert errors_of(findings) == [], f"{path.name}: {errors_of(findings)}"


def test_served_crls_lint_clean(svc: PinnedService, tmp_path: Path) -> None:
    """pkilint ``lint_crl -t CRL -p PKIX``: no ERROR/FATAL on the base CRL (with a
    revoked entry), its delta and the root's CRL, as served."""
    leaf = issue_leaf(svc, tmp_path, "lintcrl")
    with opened(svc.home) as core:
        core.revoke(
            leaf.serial,
            "keyCompromise",
            operator("revocation-tests"),
            invalidity_date=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
        )
    base_url = cdp_url(leaf.cert)
    documents = {
        "base": _fetch_crl_listing(base_url, leaf.cert.serial_number),
        "delta": _fetch_crl_listing(
            base_url.removesuffix(".crl") + "-delta.crl", leaf.cert.serial_number
        ),
        "root": http_get(f"{svc.http_base}/crl/{svc.root_id}.crl").content,
    }
    for name, der in documents.items():
        path = tmp_path / f"{name}.crl"
        path.write_bytes(der)
        _no_lint_errors("lint_crl", path, "-t", "CRL", "-p", "PKIX")


def test_ocsp_responses_lint_clean(svc: PinnedService, tmp_path: Path) -> None:
    """pkilint ``lint_ocsp_response``: no ERROR/FATAL on a good (nonce, signed live), a
    revoked (pre-signed) and an unknown response."""
    good = issue_leaf(svc, tmp_path, "lint-good")
    bad = issue_leaf(svc, tmp_path, "lint-revoked")
    wait_presigned(svc.home, bad.serial)
    revoke_api(svc, bad.serial, "cessationOfOperation")
    cases = {
        "good": ("-cert", str(good.path)),
        "revoked": ("-cert", str(bad.path), "-no_nonce"),
        "unknown": ("-serial", NEVER_ISSUED),
    }
    for name, args in cases.items():
        out = tmp_path / f"{name}.der"
        done = openssl_ocsp(svc, *args, "-respout", str(out))
        assert done.returncode == 0, done.stderr
        assert f": {name}" in done.stdout, done.stdout
        _no_lint_errors("lint_ocsp_response", out)
