"""EST (RFC 7030) at ``/.well-known/est/``: thin views over the device use-cases.

Bodies are base64 (RFC 8951); errors are problem+json like every other route, and a
401 carries a Basic challenge. Devices authenticate with HTTP Basic ``DEVICE_ID:SECRET``
(a one-time enrolment credential), ``Bearer SECRET``, or an IDevID client certificate;
``simplereenroll`` with the certificate being renewed.
"""

from __future__ import annotations

import base64
import binascii

from flask import Blueprint, Response, request

from ca_service import metrics
from ca_service.context import core, peer_certificate, tls_unique
from ca_service.problems import ApiError
from ca_service.validation import raw_body
from pki.devices import DeviceAuth
from pki.errors import Unauthorised
from pki.est import CERTS_ONLY, CSR_ATTRS, PKCS10, certs_only, csr_attributes, decode_pkcs10
from pki.records import CertificateRecord

est = Blueprint("est", __name__, url_prefix="/.well-known/est")


def _base64_response(body: bytes, content_type: str) -> Response:
    resp = Response(body, 200, content_type=content_type)
    resp.headers["Content-Transfer-Encoding"] = "base64"
    return resp


@est.get("/cacerts")
def cacerts() -> Response:
    """The CA that issues device certificates and the root, certs-only PKCS#7 (no
    authentication)."""
    pki = core()
    profile = pki.profiles.get(pki.settings.devices.profile)
    issuing = pki.issuing_issuer(profile.issuer or None)
    return _base64_response(certs_only([issuing.der, pki.root_issuer().der]), CERTS_ONLY)


@est.get("/csrattrs")
def csrattrs() -> Response:
    return _base64_response(csr_attributes(), CSR_ATTRS)


@est.post("/simpleenroll")
def simpleenroll() -> Response:
    auth = device_auth()
    csr = _csr_body()
    record = core().enroll_device(csr, auth, tls_unique())
    metrics.DEVICE_ENROLMENTS.labels("est", auth.method).inc()
    return _issued(record)


@est.post("/simplereenroll")
def simplereenroll() -> Response:
    presented = peer_certificate()
    if presented is None:
        core().audit_refusal("device.reenroll", None, "no client certificate")
        raise Unauthorised("simplereenroll needs the current certificate as TLS client certificate")
    csr = _csr_body()
    record = core().reenroll_device(presented, csr, tls_unique())
    metrics.DEVICE_ENROLMENTS.labels("est", "reenroll").inc()
    return _issued(record)


def _issued(record: CertificateRecord) -> Response:
    metrics.ISSUED.labels(record.profile).inc()
    assert record.certificate_pem is not None
    der = base64.b64decode("".join(record.certificate_pem.splitlines()[1:-1]))
    return _base64_response(certs_only([der]), CERTS_ONLY)


def _csr_body() -> bytes:
    mimetype = request.mimetype or ""
    if mimetype and mimetype != PKCS10:
        raise ApiError(
            415,
            f"expected Content-Type {PKCS10}, got {mimetype} "
            "(curl: -H 'Content-Type: application/pkcs10')",
            "unsupported-media-type",
        )
    return decode_pkcs10(raw_body(request))


def device_auth() -> DeviceAuth:
    """Who the enrolling device is: HTTP Basic ``DEVICE_ID:SECRET``, ``Bearer SECRET``,
    or an IDevID client certificate; Unauthorised (and audited) otherwise."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, ValueError):
            raise _refused("malformed HTTP Basic credentials") from None
        # device ids may contain ':', secrets never do: split at the last one
        device_id, sep, secret = decoded.rpartition(":")
        if not sep or not device_id or not secret:
            raise _refused("HTTP Basic credentials must be DEVICE_ID:SECRET")
        return core().authenticate_device_secret(secret, device_id)
    if scheme.lower() == "bearer" and value.strip():
        return core().authenticate_device_secret(value.strip())
    if header:
        raise _refused(
            "unsupported Authorization scheme: use Basic DEVICE_ID:SECRET or Bearer SECRET"
        )
    presented = peer_certificate()
    if presented is not None:
        return core().authenticate_idevid(presented)
    raise _refused(
        "enrolment needs HTTP Basic DEVICE_ID:SECRET (a one-time enrolment credential from "
        "`hsmca device enroll-token`), Bearer SECRET, or an IDevID client certificate"
    )


def _refused(why: str) -> Unauthorised:
    """An audited refusal to authenticate a device."""
    core().audit_refusal("device.enroll", None, why)
    return Unauthorised(why)
