"""Lifecycle use-cases run by the scheduler: renewing the CA's own service certificates,
rotating issuing CAs before they age out, and purging stale rows.

OCSP responder certificates are renewed by :meth:`Pki.publish_due` (two thirds of their
life), which the scheduler's leader runs every second; this module renews the server's
TLS certificate the same way.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509

from pki.actors import SYSTEM
from pki.audit import AuditRecord
from pki.service import Pki
from pki.store import Issuer

#: a service certificate is renewed once it has used this fraction of its life
SERVICE_RENEW_AT = 2 / 3
#: unfinished ACME orders are deleted this long after they expired
ACME_KEEP = dt.timedelta(days=1)
#: spent or expired enrolment tokens are deleted this long after
TOKEN_KEEP = dt.timedelta(days=30)


def _used(not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime) -> float:
    life = (not_after - not_before).total_seconds()
    return (now - not_before).total_seconds() / life if life > 0 else 1.0


def renew_service_certificates(pki: Pki) -> dict[str, Any]:
    """Re-issue the server's TLS certificate past two thirds of its life (the listeners
    load the new file for new connections)."""
    from pki.bootstrap import issue_server_certificate

    path = pki.settings.tls_dir / "server.pem"
    current = x509.load_pem_x509_certificates(path.read_bytes())[0]
    now = pki.clock.now()
    if _used(current.not_valid_before_utc, current.not_valid_after_utc, now) < SERVICE_RENEW_AT:
        return {"server_tls": 0}
    issue_server_certificate(pki)
    return {"server_tls": 1}


def rotate_issuing_cas(pki: Pki) -> dict[str, Any]:
    """Replace the newest active issuing CA once it has used ``ca.issuing_rotate_at`` of
    its life: a new key in the HSM, a certificate from the root, an OCSP responder; the
    old CA stops issuing but keeps its CRLs and OCSP until its last certificate expires."""
    from pki.bootstrap import create_issuing_ca, ensure_ocsp_responder, export_ca_files

    now = pki.clock.now()
    active = [
        i for i in pki.issuers(refresh=True).values() if i.kind == "intermediate" and i.active
    ]
    if not active:
        return {"rotated": 0}
    current = active[-1]
    summary: dict[str, Any] = {"rotated": 0}
    if len(active) > 1:  # a rotation was cut short before the old CA was retired
        if not current.ocsp_serial:
            ensure_ocsp_responder(pki, current)
        for old in active[:-1]:
            _retire(pki, old, current)
        export_ca_files(pki)
        summary["completed"] = len(active) - 1
    if _used(current.not_before, current.not_after, now) < pki.settings.ca.issuing_rotate_at:
        return summary
    new = create_issuing_ca(pki, current)
    _retire(pki, current, new)
    export_ca_files(pki)
    summary["rotated"] = 1
    return summary


def _retire(pki: Pki, old: Issuer, new: Issuer) -> None:
    pki.store.lifecycle.set_issuer_active(
        old.id,
        False,
        AuditRecord(
            action="ca.retire",
            actor=SYSTEM.name,
            subject=old.id,
            details={"replaced_by": new.id, "not_after": old.not_after.isoformat()},
        ),
    )
    pki.issuers(refresh=True)


def purge_stale(pki: Pki) -> dict[str, Any]:
    """Delete ACME orders that expired unfinished a day ago (with their authorizations and
    challenges), expired nonce records, and enrolment tokens and device enrolment
    credentials spent or expired 30 days ago."""
    now = pki.clock.now()
    counts: dict[str, Any] = pki.store.lifecycle.purge_acme(now - ACME_KEEP, now)
    counts["tokens"] = pki.store.lifecycle.purge_tokens(
        now - TOKEN_KEEP,
        AuditRecord(action="token.purge", actor=SYSTEM.name, details={"before": str(now)}),
    )
    counts["device_credentials"] = pki.store.devices.purge_credentials(now - TOKEN_KEEP)
    return counts
