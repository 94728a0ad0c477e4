"""The same store, audit chain and record-before-sign guarantees on a real PostgreSQL server
(skipped loudly by the ``pg_url`` fixture when PostgreSQL cannot be started)."""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from pki.actors import operator
from pki.clock import FrozenClock
from pki.errors import Conflict, InvalidInput
from pki.service import Pki
from pki.store import CertificateQuery, Store
from tests.helpers import hsmca, issue_concurrently
from tests.pg import create_database
from tests.test_record_before_sign import assert_complete_record, crash_issuance, only_pending
from tests.test_store import (
    TABLES,
    head_revision,
    issue,
    model_drift,
    pending_values,
    schema_of,
    serials,
    versions,
)

pytestmark = pytest.mark.postgres


def test_migrations_apply_to_fresh_postgres_and_are_idempotent(pg_url: str, tmp_path: Path) -> None:
    """upgrade() builds the schema on an empty PostgreSQL database; again changes nothing."""
    url = create_database(pg_url, f"mig{tmp_path.name.lower().replace('-', '_')[-40:]}")
    store = Store(url)
    try:
        assert store.engine.dialect.name == "postgresql"
        store.upgrade()
        first = schema_of(store.engine)
        assert set(first) >= TABLES | {"alembic_version"}
        assert versions(store.engine) == [head_revision()]
        assert model_drift(store.engine) == []
        store.upgrade()
        assert schema_of(store.engine) == first
        assert versions(store.engine) == [head_revision()]
    finally:
        store.dispose()


def test_postgres_home_issues_revokes_lists_and_audits(pg_home: Path) -> None:
    """20 issuances and a revocation on PostgreSQL: filters, paging, constraints, UTC, audit."""
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0)
    core = Pki.open(pg_home, clock=FrozenClock(t0))
    try:
        assert core.store.engine.dialect.name == "postgresql"
        from_init = serials(core)
        servers = [issue(core, f"s{i}.svc.test", "mtls-server", "24h") for i in range(12)]
        clients = [issue(core, f"c{i}.svc.test", "mtls-client", "3d") for i in range(8)]
        core.revoke(clients[0], "keyCompromise", operator())

        seen: list[str] = []
        cursor: str | None = None
        sizes: list[int] = []
        while True:
            page, cursor = core.list_certificates(CertificateQuery(limit=7, cursor=cursor))
            seen.extend(r.serial for r in page)
            sizes.append(len(page))
            if cursor is None:
                break
        assert sizes == [7, 7, 7, 1]
        assert seen == [*sorted(from_init, key=seen.index), *servers, *clients]
        assert len(set(seen)) == 22

        assert serials(core, profile="mtls-client") == set(clients)
        assert serials(core, status="revoked") == {clients[0]}
        with pytest.raises(Conflict, match="already exists"):
            core.store.insert_pending(
                dict(pending_values(core, "d.svc.test", "mtls", t0), serial=servers[0])
            )
        with pytest.raises(InvalidInput, match="invalid cursor"):
            core.list_certificates(CertificateQuery(cursor="OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk"))
        row = core.store.certificate(clients[0])
        for stamp in (row.not_before, row.not_after, row.created_at, row.revoked_at):
            assert stamp is not None and stamp.utcoffset() == dt.timedelta(0)
        assert row.created_at == t0 and row.revoked_at == t0
    finally:
        core.close()

    later = Pki.open(pg_home, clock=FrozenClock(t0 + dt.timedelta(days=2)))
    try:
        assert serials(later, status="expired") == set(servers)
        assert serials(later, status="good") == from_init | set(clients[1:])
        assert serials(later, expiring_within=dt.timedelta(days=2)) == set(clients[1:])
        assert serials(later, status="revoked") == {clients[0]}
        issued = [e.subject for e in later.store.audit_events() if e.action == "certificate.issue"]
        assert set(issued) == from_init | set(servers) | set(clients)
        result = later.verify_audit()
        assert result.ok, result.problem
    finally:
        later.close()
    proc = hsmca(pg_home, "audit", "verify")
    assert proc.returncode == 0, proc.stderr
    assert "chain intact" in proc.stdout


def test_record_before_sign_on_postgres(pg_home: Path) -> None:
    """Crashes at and after the signature leave complete pending rows on PostgreSQL: one
    revoked by the operator, the other by reconciliation; the chain stays intact."""
    csr_sign = crash_issuance(pg_home, "sign")
    core = Pki.open(pg_home)
    try:
        first = only_pending(core)
        assert_complete_record(first, csr_sign, core.issuing_issuer().id)
        assert core.revoke(first.serial, "keyCompromise", operator()).status == "revoked"
    finally:
        core.close()

    csr_store = crash_issuance(pg_home, "store")
    core = Pki.open(pg_home)
    try:
        second = only_pending(core)
        assert second.serial != first.serial
        assert_complete_record(second, csr_store, core.issuing_issuer().id)
        assert core.reconcile_pending(grace=dt.timedelta(0)) == [second.serial]
        assert core.store.certificate(second.serial).status == "revoked"
        last = list(core.store.audit_events())[-1]
        assert (last.action, last.subject) == ("certificate.reconcile", second.serial)
        assert serials(core, status="pending") == set()
        result = core.verify_audit()
        assert result.ok, result.problem
    finally:
        core.close()


def test_concurrent_audit_appends_on_postgres(pg_home: Path) -> None:
    """Two processes issuing 30 certificates each at once leave one valid, gap-free chain."""
    reports = issue_concurrently(pg_home, 30, ("pa", "pb"), "mtls-client")
    a, b = reports
    assert a["first"] < b["last"] and b["first"] < a["last"], "the workers did not overlap"
    issued = {s for r in reports for s in r["serials"]}
    assert len(issued) == 60
    core = Pki.open(pg_home)
    try:
        assert serials(core, profile="mtls-client") == issued
        chain = list(core.store.audit_events())
        assert [e.id for e in chain] == list(range(1, len(chain) + 1))
        by_actor = {
            actor: {e.subject for e in chain if e.actor == actor}
            for actor in ("operator:pa", "operator:pb")
        }
        assert by_actor == {"operator:pa": set(a["serials"]), "operator:pb": set(b["serials"])}
        result = core.verify_audit()
        assert result.ok, result.problem
    finally:
        core.close()


def _waiting_backends(url: str) -> int:
    with psycopg.connect(**_conninfo(url), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
        return int(row[0]) if row else 0


def _conninfo(url: str) -> dict[str, object]:
    parsed = make_url(url)
    return {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "dbname": parsed.database,
    }


def test_simultaneous_revocations_of_one_certificate_on_postgres(pg_home: Path) -> None:
    """Two instances revoking the same certificate at once: one wins, the other gets
    Conflict; one revocation time and reason, one audit event."""
    instances = [Pki.open(pg_home), Pki.open(pg_home)]
    try:
        serial = issue(instances[0], "race.svc.test")
        url = instances[0].settings.database.url
        reasons = ("keyCompromise", "superseded")

        def attempt(index: int) -> str:
            try:
                instances[index].revoke(serial, reasons[index], operator(f"i{index}"))
                return "revoked"
            except Conflict:
                return "conflict"

        with psycopg.connect(**_conninfo(url)) as blocker, ThreadPoolExecutor(2) as pool:
            # hold the row so both revocations are in flight before either can finish
            blocker.execute("SELECT id FROM certificates WHERE serial = %s FOR UPDATE", (serial,))
            futures = [pool.submit(attempt, i) for i in range(2)]
            deadline = time.monotonic() + 30
            while _waiting_backends(url) < 2:
                assert time.monotonic() < deadline, "the revocations never reached the database"
                assert not any(f.done() for f in futures), [f.result() for f in futures]
                time.sleep(0.01)  # polling interval, bounded by the deadline
            blocker.rollback()
            outcomes = [f.result(timeout=60) for f in futures]

        assert sorted(outcomes) == ["conflict", "revoked"]
        winner = outcomes.index("revoked")
        row = instances[0].store.certificate(serial)
        assert (row.status, row.revocation_reason) == ("revoked", reasons[winner])
        revocations = [
            e
            for e in instances[0].store.audit_events()
            if e.action == "certificate.revoke" and e.subject == serial
        ]
        assert [e.actor for e in revocations] == [f"operator:i{winner}"]
        assert instances[0].verify_audit().ok
    finally:
        for core in instances:
            core.close()
