"""Invariant 2, nothing signed is unknown: the complete to-be-signed row is committed
(``pending``) before the HSM signs, so a process killed at the signature leaves a known,
revocable row that reconciliation revokes; serials are never reused."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pki.actors import operator
from pki.errors import Conflict
from pki.service import IssueRequest, Pki
from pki.store import CertificateQuery
from pki.store.models import Certificate
from tests.conftest import build_csr
from tests.helpers import run_worker
from tests.issue_worker import CRASH_EXIT

TBS_COLUMNS = (
    "serial",
    "issuer_id",
    "subject",
    "common_name",
    "sans",
    "profile",
    "requester",
    "public_key_sha256",
    "spki",
    "not_before",
    "not_after",
)


def crash_issuance(home: Path, point: str = "sign") -> bytes:
    """Kill a real issuance in another process at ``point``; return the CSR it sent."""
    csr_file = home.parent / f"crash-{point}.csr"
    code, out, err = run_worker("crash", str(home), "--csr-out", str(csr_file), "--point", point)
    assert code == CRASH_EXIT, f"exit {code}; stdout {out!r}; stderr {err[-2000:]}"
    return csr_file.read_bytes()


def only_pending(core: Pki) -> Certificate:
    records, _ = core.list_certificates(CertificateQuery(status="pending"))
    assert len(records) == 1, [r.serial for r in records]
    return core.store.certificate(records[0].serial)


def assert_complete_record(row: Certificate, csr_pem: bytes, issuer_id: str) -> None:
    """The pending row carries everything the signed certificate will say."""
    csr = x509.load_pem_x509_csr(csr_pem)
    spki = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert row.status == "pending" and row.der is None
    assert re.fullmatch(r"(?:[0-9a-f]{2})+", row.serial), row.serial
    assert int(row.serial, 16).bit_length() > 64
    assert row.issuer_id == issuer_id
    assert row.subject == "CN=crash.svc.test"
    assert row.common_name == "crash.svc.test"
    assert row.sans == ["dns:crash.svc.test"]
    assert row.profile == "mtls-server"
    assert row.requester == "operator:crash"
    assert row.spki == spki
    assert row.public_key_sha256 == hashlib.sha256(spki).hexdigest()
    lifetime = row.not_after - row.not_before
    assert dt.timedelta(hours=24) <= lifetime <= dt.timedelta(hours=24, minutes=2)
    assert row.created_at <= dt.datetime.now(dt.UTC)


def test_crash_at_signature_leaves_a_known_revocable_row(fresh_home: Path) -> None:
    """Killed at the HSM signature: a complete pending row exists, unaudited as issued,
    revocable, listed in the next CRL; its serial is never reused."""
    csr_pem = crash_issuance(fresh_home, "sign")
    core = Pki.open(fresh_home)
    try:
        row = only_pending(core)
        assert_complete_record(row, csr_pem, core.issuing_issuer().id)
        serial = row.serial
        assert core.show(serial).status == "pending"
        assert core.show(serial).certificate_pem is None
        assert serial not in {e.subject for e in core.store.audit_events()}
        assert core.verify_audit().ok

        revoked = core.revoke(serial, "keyCompromise", operator())
        assert (revoked.status, revoked.revocation_reason) == ("revoked", "keyCompromise")
        crl = x509.load_der_x509_crl(core.build_crl(row.issuer_id))
        entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
        assert entry is not None
        assert core.reconcile_pending(grace=dt.timedelta(0)) == []  # nothing left pending
        assert core.verify_audit().ok

        more = [
            core.issue(IssueRequest(build_csr()[0], "mtls-client"), operator()).serial
            for _ in range(50)
        ]
        assert len({serial, *more}) == 51
        with pytest.raises(Conflict, match="already exists"):
            core.store.insert_pending({c: getattr(row, c) for c in TBS_COLUMNS})
        assert core.store.certificate(serial).status == "revoked"
    finally:
        core.close()


@pytest.mark.parametrize("point", ["sign", "store"])
def test_restart_reconciles_pending_rows_into_revoked(fresh_home: Path, point: str) -> None:
    """Killed at (``sign``) or just after (``store``) the signature: reconciliation leaves
    young rows alone, then revokes the row and audits ``certificate.reconcile``."""
    csr_pem = crash_issuance(fresh_home, point)
    core = Pki.open(fresh_home)
    try:
        row = only_pending(core)
        assert_complete_record(row, csr_pem, core.issuing_issuer().id)
        assert core.reconcile_pending() == []  # within the default grace: maybe in flight
        assert core.store.certificate(row.serial).status == "pending"

        assert core.reconcile_pending(grace=dt.timedelta(0)) == [row.serial]
        after = core.store.certificate(row.serial)
        assert (after.status, after.revocation_reason) == ("revoked", "cessationOfOperation")
        assert after.revoked_at is not None
        last = list(core.store.audit_events())[-1]
        assert (last.action, last.actor, last.subject, last.outcome) == (
            "certificate.reconcile",
            "system",
            row.serial,
            "ok",
        )
        assert last.details == {"was": "pending", "now": "revoked"}
        assert core.reconcile_pending(grace=dt.timedelta(0)) == []
        result = core.verify_audit()
        assert result.ok, result.problem
    finally:
        core.close()
