"""OCSP (RFC 6960, RFC 5019 profile): request parsing and response assembly.

cryptography parses and builds OCSP for one certificate only, so requests are parsed
with asn1crypto and responses written as DER directly (:mod:`pki.der`; structures as in
RFC 6960 4.2.1); the tbsResponseData is signed by the delegated responder's HSM key
through :mod:`pki.hsm_keys`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import format_datetime
from functools import cached_property
from urllib.parse import unquote

from asn1crypto import algos, core, ocsp
from asn1crypto import x509 as ax
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pki.der import generalized_time, tlv
from pki.hsm_keys import HsmPrivateKey
from pki.revocation import REASON_CODES

MAX_REQUEST_BYTES = 8192
MAX_CERT_IDS = 32
HASHES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}


class MalformedRequest(ValueError):
    """The request cannot be parsed (RFC 6960 malformedRequest)."""


@dataclass(frozen=True)
class CertIdRequest:
    """One CertID of a request, kept as received so the answer echoes it exactly."""

    cert_id: ocsp.CertId
    hash_algorithm: str
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int


@dataclass(frozen=True)
class OcspRequest:
    items: tuple[CertIdRequest, ...]
    nonce: bytes | None


@dataclass(frozen=True)
class Answer:
    """The status to state for one CertID."""

    request: CertIdRequest
    status: str  # good | revoked | unknown
    this_update: dt.datetime
    next_update: dt.datetime
    revoked_at: dt.datetime | None = None
    reason: str | None = None


@dataclass(frozen=True)
class OcspResult:
    """An OCSP answer and how HTTP may cache it (``cacheable`` False: signed live)."""

    der: bytes
    this_update: dt.datetime | None = None
    next_update: dt.datetime | None = None
    cacheable: bool = False

    def http_headers(self, now: dt.datetime) -> list[tuple[str, str]]:
        """Caching headers for the answer (RFC 5019 section 6.2): a pre-signed response
        may be cached until its nextUpdate; one signed live, or ``unknown``, may not."""
        return [("Cache-Control", self.cache_control(now)), *self.validator_headers()]

    def cache_control(self, now: dt.datetime) -> str:
        if not (self.cacheable and self.next_update):
            return "no-store"
        max_age = max(0, int((self.next_update - now).total_seconds()))
        return f"max-age={max_age}, public, no-transform, must-revalidate"

    def validator_headers(self) -> list[tuple[str, str]]:
        """Last-Modified, Expires and ETag of a cacheable answer (none otherwise): they
        depend on the response alone, so a server may render them once."""
        if not (self.cacheable and self.this_update and self.next_update):
            return []
        return [
            ("Last-Modified", format_datetime(self.this_update, usegmt=True)),
            ("Expires", format_datetime(self.next_update, usegmt=True)),
            ("ETag", '"' + hashlib.sha1(self.der).hexdigest() + '"'),
        ]


@dataclass(frozen=True)
class Responder:
    """A delegated OCSP responder: certificate and HSM key."""

    certificate: x509.Certificate
    key: HsmPrivateKey

    @cached_property
    def key_hash(self) -> bytes:
        """SHA-1 of the responder's public key BIT STRING (ResponderID byKey)."""
        return public_key_hash(self.certificate, "sha1")

    @cached_property
    def certs_field(self) -> bytes:
        """The DER ``certs [0] EXPLICIT SEQUENCE OF Certificate`` of every response."""
        return tlv(0xA0, tlv(0x30, self.certificate.public_bytes(Encoding.DER)))


def issuer_name_hash(issuer: x509.Certificate, algorithm: str) -> bytes:
    return HASHES[algorithm](issuer.subject.public_bytes()).digest()


def public_key_hash(cert: x509.Certificate, algorithm: str) -> bytes:
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    bits = ax.PublicKeyInfo.load(spki)["public_key"].contents[1:]  # drop unused-bits octet
    return HASHES[algorithm](bits).digest()


#: (hash algorithm, issuerNameHash, issuerKeyHash): how a CertID names its issuer
CertIdKey = tuple[str, bytes, bytes]


def cert_id_index(issuers: Iterable[tuple[str, bytes]]) -> dict[CertIdKey, str]:
    """Map every CertID issuer key (each supported hash) to its issuer id, for the
    ``(issuer_id, certificate DER)`` pairs given."""
    index: dict[CertIdKey, str] = {}
    for issuer_id, der in issuers:
        cert = x509.load_der_x509_certificate(der)
        for alg in HASHES:
            index[(alg, issuer_name_hash(cert, alg), public_key_hash(cert, alg))] = issuer_id
    return index


def decode_get_path(path_part: str) -> bytes:
    """The DER request of a GET (RFC 6960 appendix A): URL-encoded base64, URL-safe too."""
    text = unquote(path_part).strip().replace("-", "+").replace("_", "/").replace(" ", "+")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest("GET path is not base64") from None


def parse_request(der: bytes) -> OcspRequest:
    """Parse a DER OCSPRequest; MalformedRequest when it is not one."""
    if not der or len(der) > MAX_REQUEST_BYTES:
        raise MalformedRequest("empty or oversized request")
    try:
        req = ocsp.OCSPRequest.load(der, strict=True)
        tbs = req["tbs_request"]
        items = []
        for single in tbs["request_list"]:
            cert_id = single["req_cert"]
            algorithm = cert_id["hash_algorithm"]["algorithm"].native
            items.append(
                CertIdRequest(
                    cert_id=cert_id,
                    hash_algorithm=algorithm,
                    issuer_name_hash=cert_id["issuer_name_hash"].native,
                    issuer_key_hash=cert_id["issuer_key_hash"].native,
                    serial=cert_id["serial_number"].native,
                )
            )
        nonce = None
        for ext in tbs["request_extensions"] or []:
            if ext["extn_id"].native == "nonce":
                nonce = ext["extn_value"].parsed.native
                if isinstance(nonce, bytes) and not 1 <= len(nonce) <= 128:
                    raise MalformedRequest("nonce must be 1 to 128 octets")
    except MalformedRequest:
        raise
    except (ValueError, TypeError, KeyError, AttributeError):
        raise MalformedRequest("not a DER OCSPRequest") from None
    if not items or len(items) > MAX_CERT_IDS:
        raise MalformedRequest(f"a request must name 1 to {MAX_CERT_IDS} certificates")
    return OcspRequest(tuple(items), nonce if isinstance(nonce, bytes) else None)


def _single(answer: Answer) -> bytes:
    """The DER SingleResponse stating ``answer`` (RFC 6960 4.2.1)."""
    if answer.status == "good":
        status = b"\x80\x00"  # [0] IMPLICIT NULL
    elif answer.status == "revoked":
        if answer.revoked_at is None:
            raise ValueError("a revoked answer needs its revocation time")
        info = generalized_time(answer.revoked_at)
        if answer.reason and answer.reason != "unspecified":
            info += tlv(0xA0, tlv(0x0A, bytes((REASON_CODES[answer.reason],))))
        status = tlv(0xA1, info)  # [1] IMPLICIT RevokedInfo
    else:
        status = b"\x82\x00"  # [2] IMPLICIT NULL (unknown)
    return tlv(
        0x30,
        answer.request.cert_id.dump()
        + status
        + generalized_time(answer.this_update)
        + tlv(0xA0, generalized_time(answer.next_update)),
    )


def build_response(
    responder: Responder, answers: list[Answer], produced_at: dt.datetime, nonce: bytes | None
) -> bytes:
    """A signed, successful OCSPResponse (DER) stating ``answers``."""
    # Written out directly: built with asn1crypto, a response cost ~5 ms of encoding (it
    # re-encoded the embedded responder certificate each time), most of pre-signing.
    data = (
        tlv(0xA2, tlv(0x04, responder.key_hash))  # responderID byKey
        + generalized_time(produced_at)
        + tlv(0x30, b"".join(_single(a) for a in answers))
    )
    if nonce is not None:
        nonce_ext = {"extn_id": "nonce", "critical": False, "extn_value": nonce}
        data += tlv(0xA1, ocsp.ResponseDataExtensions([nonce_ext]).dump())
    tbs = tlv(0x30, data)
    key = responder.key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        algorithm = "sha256_ecdsa"
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
        algorithm = "sha256_rsa"
    else:  # pragma: no cover - responder keys are EC or RSA
        raise TypeError("unsupported responder key")
    basic = tlv(
        0x30,
        tbs
        + _SIGNATURE_ALGORITHMS[algorithm]
        + tlv(0x03, b"\x00" + signature)
        + responder.certs_field,
    )
    response_bytes = tlv(0x30, _OCSP_BASIC + tlv(0x04, basic))
    return tlv(0x30, _SUCCESSFUL + tlv(0xA0, response_bytes))


_SIGNATURE_ALGORITHMS = {
    name: algos.SignedDigestAlgorithm({"algorithm": name}).dump()
    for name in ("sha256_ecdsa", "sha256_rsa")
}
_OCSP_BASIC = core.ObjectIdentifier("1.3.6.1.5.5.7.48.1.1").dump()  # id-pkix-ocsp-basic
_SUCCESSFUL = ocsp.OCSPResponseStatus("successful").dump()


def error_response(status: str) -> bytes:
    """An unsigned OCSPResponse with an error status (``malformed_request``, ``unauthorized``,
    ``internal_error``, ``try_later``)."""
    return ocsp.OCSPResponse({"response_status": status}).dump()
