"""CRLs (RFC 5280), signed in the HSM.

Revoked entries are handed to the ``CertificateRevocationListBuilder`` constructor in
one list: ``add_revoked_certificate`` in a loop is quadratic in cryptography.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from cryptography import x509

from pki.errors import InvalidInput
from pki.signer import SigningIssuer, signature_hash

REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
_BY_LOWER = {name.lower(): name for name in REASONS}


def parse_reason(text: str | None) -> str:
    """The RFC 5280 reason name for ``text`` (case-insensitive, ``_``/``-`` ignored)."""
    if not text:
        return "unspecified"
    key = text.replace("_", "").replace("-", "").lower()
    if key not in _BY_LOWER:
        raise InvalidInput(f"unknown revocation reason {text!r}; one of: {', '.join(REASONS)}")
    return _BY_LOWER[key]


def build_crl(
    issuer: SigningIssuer,
    entries: Iterable[tuple[str, dt.datetime, str | None]],
    number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> x509.CertificateRevocationList:
    """A full CRL of ``entries`` (serial hex, revocation time, reason) for ``issuer``."""
    revoked: list[Any] = []
    for serial, revoked_at, reason in entries:
        builder = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial, 16))
            .revocation_date(revoked_at)
        )
        if reason and reason != "unspecified":
            builder = builder.add_extension(x509.CRLReason(REASONS[reason]), critical=False)
        revoked.append(builder.build())
    ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    crl = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.certificate.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=[
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
            x509.Extension(
                x509.AuthorityKeyIdentifier.oid,
                False,
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value),
            ),
        ],
        revoked_certificates=revoked,
    )
    return crl.sign(issuer.key, signature_hash(issuer.key))
