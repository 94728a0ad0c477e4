"""The SA: the only code that touches the database. See :class:`pki.store.db.Store`."""

from pki.store.db import CertificateQuery, Page, Store
from pki.store.models import ApiToken, AuditEvent, Certificate, Issuer

__all__ = ["ApiToken", "AuditEvent", "Certificate", "CertificateQuery", "Issuer", "Page", "Store"]
