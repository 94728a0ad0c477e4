"""The SA: the only code that touches the database. See :class:`pki.store.db.Store`."""

from pki.store.db import CertificateQuery, Page, RevokedEntry, Store
from pki.store.models import ApiToken, AuditEvent, Certificate, Crl, Issuer, OcspResponse

__all__ = [
    "ApiToken",
    "AuditEvent",
    "Certificate",
    "CertificateQuery",
    "Crl",
    "Issuer",
    "OcspResponse",
    "Page",
    "RevokedEntry",
    "Store",
]
