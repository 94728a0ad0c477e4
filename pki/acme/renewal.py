"""ACME Renewal Information (RFC 9773): certificate ids and suggested renewal windows."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509

from pki.acme.jws import b64u, b64u_decode
from pki.acme.problems import AcmeProblem
from pki.errors import NotFound
from pki.records import iso
from pki.serials import serial_hex
from pki.store import Certificate, Store

#: a renewal window is centred at this fraction of the lifetime
WINDOW_CENTRE = 2 / 3
#: and is this fraction of the lifetime wide
WINDOW_WIDTH = 1 / 10
#: clients are asked to check again at most this often, and at least every six hours
MIN_RETRY = dt.timedelta(minutes=1)
MAX_RETRY = dt.timedelta(hours=6)


@dataclass(frozen=True)
class RenewalWindow:
    start: dt.datetime
    end: dt.datetime
    retry_after: int  # seconds

    def to_json(self) -> dict[str, dict[str, str]]:
        start, end = (iso(t.replace(microsecond=0)) for t in (self.start, self.end))
        return {"suggestedWindow": {"start": start, "end": end}}


def cert_id(cert: x509.Certificate) -> str:
    """``base64url(AKI keyIdentifier) "." base64url(serial DER content)`` (RFC 9773 4.1)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if aki.key_identifier is None:
        raise ValueError("the certificate has no authority key identifier")
    return f"{b64u(aki.key_identifier)}.{b64u(_serial_bytes(cert.serial_number))}"


def parse_cert_id(text: object) -> tuple[bytes, str]:
    """(AKI keyIdentifier, serial as lower-case hex) of a certificate id; malformed if
    it is not one."""
    if not isinstance(text, str) or text.count(".") != 1 or len(text) > 255:
        raise AcmeProblem("malformed", "a certificate id is base64url(AKI).base64url(serial)")
    aki_text, serial_text = text.split(".")
    aki = b64u_decode(aki_text, "the certificate id's key identifier")
    raw = b64u_decode(serial_text, "the certificate id's serial")
    negative = bool(raw) and raw[0] & 0x80
    padded = len(raw) > 1 and raw[0] == 0 and not raw[1] & 0x80  # not DER
    if not aki or not raw or negative or padded:
        raise AcmeProblem("malformed", "the certificate id names no valid serial number")
    return aki, serial_hex(int.from_bytes(raw, "big"))


def certificate_for_id(store: Store, cert_id: object) -> Certificate:
    """The issued certificate a certificate id names (serial and issuer key id both
    match); notFound otherwise, malformed if the id is not one."""
    aki, serial = parse_cert_id(cert_id)
    try:
        row = store.certificate(serial)
    except NotFound:
        raise AcmeProblem("notFound", "no certificate with that id") from None
    if row.der is None:
        raise AcmeProblem("notFound", "no certificate with that id")
    cert = x509.load_der_x509_certificate(row.der)
    found = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if found.key_identifier != aki:
        raise AcmeProblem("notFound", "no certificate with that id")
    return row


def suggested_window(
    not_before: dt.datetime,
    not_after: dt.datetime,
    revoked_at: dt.datetime | None,
    now: dt.datetime,
) -> RenewalWindow:
    """Renew at about two thirds of the lifetime; at once if the certificate is revoked."""
    lifetime = not_after - not_before
    width = lifetime * WINDOW_WIDTH
    retry = min(MAX_RETRY, max(MIN_RETRY, lifetime / 20))
    if revoked_at is not None:
        start = min(revoked_at, now) - dt.timedelta(minutes=1)
        return RenewalWindow(start, start + max(width, dt.timedelta(minutes=2)), 60)
    centre = not_before + lifetime * WINDOW_CENTRE
    return RenewalWindow(centre - width / 2, centre + width / 2, int(retry.total_seconds()))


def _serial_bytes(serial: int) -> bytes:
    # DER INTEGER content: big-endian, a leading zero when the high bit is set
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big")
