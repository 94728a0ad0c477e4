"""What use-cases return: plain records the HTTP and CLI layers format."""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from typing import Any

from pki.store.models import Certificate


def pem_of(der: bytes) -> str:
    """PEM text of a DER certificate (RFC 7468: base64 in lines of 64 characters)."""
    text = base64.b64encode(der).decode()
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    issuer_id: str
    subject: str
    sans: list[str]
    profile: str
    requester: str
    status: str  # pending | good | revoked | expired
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    certificate_pem: str | None
    chain_pem: str

    @classmethod
    def from_row(cls, row: Certificate, now: dt.datetime, chain_pem: str) -> CertificateRecord:
        status = row.status
        if status == "good" and row.not_after <= now:
            status = "expired"
        return cls(
            serial=row.serial,
            issuer_id=row.issuer_id,
            subject=row.subject,
            sans=list(row.sans),
            profile=row.profile,
            requester=row.requester,
            status=status,
            not_before=row.not_before,
            not_after=row.not_after,
            revoked_at=row.revoked_at,
            revocation_reason=row.revocation_reason,
            certificate_pem=pem_of(row.der) if row.der else None,
            chain_pem=chain_pem,
        )

    def to_dict(self, with_pem: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "serial": self.serial,
            "issuer_id": self.issuer_id,
            "subject": self.subject,
            "sans": self.sans,
            "profile": self.profile,
            "requester": self.requester,
            "status": self.status,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "revoked_at": iso(self.revoked_at),
            "revocation_reason": self.revocation_reason,
        }
        if with_pem:
            data["certificate"] = self.certificate_pem
            data["chain"] = self.chain_pem
        return data
