"""The store (SA): migrations, WAL, certificate queries and paging, constraints, UTC time,
and concurrent SQLite writers."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from pki.actors import operator
from pki.audit import AuditRecord
from pki.clock import FrozenClock
from pki.errors import Conflict, InvalidInput
from pki.serials import new_serial, serial_hex
from pki.service import IssueRequest, Pki
from pki.store import CertificateQuery, Store
from pki.store.db import MIGRATIONS
from pki.store.models import Base
from tests.conftest import build_csr
from tests.helpers import issue_concurrently

TABLES = {"certificates", "issuers", "api_tokens", "audit_events"}


def head_revision() -> str:
    """The newest Alembic revision in the migrations directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def schema_of(engine: Engine) -> dict[str, Any]:
    """Tables with their columns, indexes and unique constraints, as the database says."""
    insp = inspect(engine)
    schema: dict[str, Any] = {}
    for table in insp.get_table_names():
        columns = insp.get_columns(table)
        schema[table] = {
            "columns": sorted((c["name"], str(c["type"]), c["nullable"]) for c in columns),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"])) for i in insp.get_indexes(table)
            ),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
        }
    return schema


def versions(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]


def model_drift(engine: Engine) -> list[Any]:
    """What autogenerate would still emit: the migrated schema against the models."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    return [d for d in diff if not (isinstance(d, tuple) and d[0] == "remove_table")]


def issue(core: Pki, name: str, profile: str = "mtls-server", ttl: str | None = None) -> str:
    """Issue for ``name`` through the real core and HSM; return the serial."""
    from pki.durations import parse_duration

    csr, _key = build_csr(cn=name, sans=(name,))
    request = IssueRequest(csr, profile, parse_duration(ttl) if ttl else None)
    return core.issue(request, operator()).serial


def pending_values(core: Pki, name: str, profile: str, not_after: dt.datetime) -> dict[str, Any]:
    """A complete to-be-signed row, as the core would commit it before signing."""
    now = core.clock.now()
    return {
        "serial": serial_hex(new_serial()),
        "issuer_id": core.issuing_issuer().id,
        "subject": f"CN={name}",
        "common_name": name,
        "sans": [f"dns:{name}"],
        "profile": profile,
        "requester": "operator:test",
        "public_key_sha256": hashlib.sha256(name.encode()).hexdigest(),
        "spki": b"\x30\x00",
        "not_before": now,
        "not_after": not_after,
    }


def serials(core: Pki, **query: Any) -> set[str]:
    records, cursor = core.list_certificates(CertificateQuery(limit=1000, **query))
    assert cursor is None
    return {r.serial for r in records}


# -- migrations and SQLite set-up ------------------------------------------------------------


def test_migrations_apply_to_fresh_sqlite_and_are_idempotent(tmp_path: Path) -> None:
    """upgrade() builds the whole schema on an empty file; a second upgrade changes nothing."""
    store = Store(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        store.upgrade()
        first = schema_of(store.engine)
        assert set(first) >= TABLES | {"alembic_version"}
        assert versions(store.engine) == [head_revision()]
        assert model_drift(store.engine) == []
        assert ("serial",) in first["certificates"]["unique"]

        store.upgrade()
        assert schema_of(store.engine) == first
        assert versions(store.engine) == [head_revision()]
        assert store.count_certificates() == 0
    finally:
        store.dispose()


def test_sqlite_runs_in_wal_mode(fresh_home: Path) -> None:
    """The store's connections and the file itself are in WAL mode."""
    core = Pki.open(fresh_home)
    try:
        with core.store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        core.close()
    plain = sqlite3.connect(fresh_home / "hsmca.db")  # a connection the store never saw
    try:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        plain.close()


# -- certificate queries ---------------------------------------------------------------------


def test_list_filters_by_status_expiry_and_profile(fresh_home: Path) -> None:
    """good/revoked/expired/pending, expiring_within and profile select exactly the right rows."""
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0)
    core = Pki.open(fresh_home, clock=FrozenClock(t0))
    try:
        from_init = serials(core)
        assert len(from_init) == 2  # the OCSP responder and the server's TLS certificate
        day = [issue(core, f"day{i}.svc.test", "mtls-server", "24h") for i in range(3)]
        three_days = [issue(core, f"b{i}.svc.test", "mtls-client", "3d") for i in range(2)]
        twenty_days = issue(core, "c.svc.test", "mtls", "20d")
        core.revoke(day[2], "superseded", operator())
        pending = pending_values(core, "p.svc.test", "mtls-client", t0 + dt.timedelta(days=3))
        core.store.insert_pending(pending)

        assert serials(core, status="good") == from_init | {*day[:2], *three_days, twenty_days}
        assert serials(core, status="expired") == set()
        assert serials(core, expiring_within=dt.timedelta(hours=25)) == set(day[:2])
    finally:
        core.close()

    later = Pki.open(fresh_home, clock=FrozenClock(t0 + dt.timedelta(days=2)))
    try:
        assert serials(later, status="expired") == set(day[:2])
        assert serials(later, status="revoked") == {day[2]}
        assert serials(later, status="pending") == {pending["serial"]}
        assert serials(later, status="good") == from_init | {*three_days, twenty_days}
        assert serials(later, expiring_within=dt.timedelta(days=2)) == set(three_days)
        assert serials(later, profile="mtls-client") == {*three_days, pending["serial"]}
        assert serials(later, profile="mtls-client", status="good") == set(three_days)
        assert serials(later, profile="mtls", expiring_within=dt.timedelta(days=2)) == set()
        assert later.show(day[0]).status == "expired"
        assert later.show(day[2]).status == "revoked"
        assert later.show(pending["serial"]).status == "pending"
        with pytest.raises(InvalidInput, match="unknown status"):
            later.list_certificates(CertificateQuery(status="valid"))
    finally:
        later.close()


def test_cursor_paging_returns_every_row_exactly_once(fresh_home: Path) -> None:
    """25 certificates, limit 10: pages of 10, 10, 5, in issuance order, then no cursor."""
    core = Pki.open(fresh_home)
    try:
        issued = [issue(core, f"page{i}.svc.test", "mtls-client") for i in range(25)]
        for query, expected in (
            ({"profile": "mtls-client"}, issued),
            ({}, None),  # every row, the two init certificates included
        ):
            seen: list[str] = []
            sizes: list[int] = []
            cursor: str | None = None
            while True:
                page, cursor = core.list_certificates(
                    CertificateQuery(limit=10, cursor=cursor, **query)
                )
                seen.extend(r.serial for r in page)
                sizes.append(len(page))
                if cursor is None:
                    break
                assert len(sizes) < 10, "paging does not terminate"
            assert len(seen) == len(set(seen)), "a row came back twice"
            if expected is not None:
                assert seen == expected
                assert sizes == [10, 10, 5]
            else:
                assert set(seen) == set(issued) | serials(core)
                assert len(seen) == core.store.count_certificates() == 27
                assert sizes == [10, 10, 7]
    finally:
        core.close()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!",
        "abc",
        _b64(b"\xff\xfe"),
        _b64(b"not-a-number"),
        _b64(b"-5"),
        _b64(b"99999999999999999999999"),  # beyond any row id the database can compare
    ],
)
def test_invalid_cursor_raises_invalid_input(pki: Pki, cursor: str) -> None:
    """A cursor the store did not hand out is InvalidInput (a 400), never a crash."""
    with pytest.raises(InvalidInput, match="invalid cursor"):
        pki.list_certificates(CertificateQuery(cursor=cursor))


def test_duplicate_serial_is_a_conflict_and_changes_nothing(pki: Pki) -> None:
    """The unique serial constraint refuses a second row with a taken serial."""
    serial = issue(pki, "dup.svc.test")
    before = pki.store.count_certificates()
    values = pending_values(pki, "other.svc.test", "mtls", pki.clock.now() + dt.timedelta(hours=1))
    with pytest.raises(Conflict, match="already exists"):
        pki.store.insert_pending(dict(values, serial=serial))
    assert pki.store.count_certificates() == before
    row = pki.store.certificate(serial)
    assert (row.status, row.common_name) == ("good", "dup.svc.test")
    assert row.der is not None


def test_other_integrity_errors_are_not_reported_as_duplicate_serials(pki: Pki) -> None:
    """A row naming an unknown issuer is a bug to surface, not a serial to retry."""
    values = pending_values(pki, "fk.svc.test", "mtls", pki.clock.now() + dt.timedelta(hours=1))
    before = pki.store.count_certificates()
    with pytest.raises(Exception, match=r"(?i)foreign key") as raised:
        pki.store.insert_pending(dict(values, issuer_id="no-such-issuer"))
    assert not isinstance(raised.value, Conflict)
    assert type(raised.value).__name__ == "IntegrityError"  # SQLAlchemy's or the driver's
    assert pki.store.count_certificates() == before


def test_timestamps_come_back_timezone_aware_utc(fresh_home: Path) -> None:
    """Aware datetimes in any zone are stored as the same instant and returned in UTC."""
    pki = Pki.open(fresh_home)
    try:
        _check_timestamps(pki)
    finally:
        pki.close()


def _check_timestamps(pki: Pki) -> None:
    plus_five = dt.timezone(dt.timedelta(hours=5))
    not_after = dt.datetime(2031, 1, 1, 5, 0, 0, tzinfo=plus_five)
    values = pending_values(pki, "tz.svc.test", "mtls", not_after)
    pki.store.insert_pending(values)
    row = pki.store.certificate(values["serial"])
    assert row.not_after == dt.datetime(2031, 1, 1, 0, 0, 0, tzinfo=dt.UTC)
    serial = issue(pki, "tz2.svc.test")
    pki.revoke(serial, "keyCompromise", operator())
    issued = pki.store.certificate(serial)
    stamps = [
        row.not_before,
        row.not_after,
        row.created_at,
        issued.not_before,
        issued.not_after,
        issued.created_at,
        issued.revoked_at,
        *(e.at for e in pki.store.audit_events()),
        *(i.created_at for i in pki.store.issuers()),
    ]
    for stamp in stamps:
        assert stamp is not None
        assert stamp.tzinfo is not None and stamp.utcoffset() == dt.timedelta(0), stamp
    with pytest.raises(Exception, match="naive datetime"):
        pki.store.insert_pending(
            pending_values(pki, "naive.svc.test", "mtls", dt.datetime(2031, 1, 1))
        )


# -- concurrent SQLite writers -----------------------------------------------------------------


def test_two_processes_issue_into_one_sqlite_home_at_once(fresh_home: Path) -> None:
    """2 x 40 issuances at the same time: no "database is locked", 80 rows, chain intact."""
    reports = issue_concurrently(fresh_home, 40, ("alpha", "beta"), "mtls-client")
    a, b = reports
    assert a["first"] < b["last"] and b["first"] < a["last"], "the workers did not overlap"
    issued = [s for r in reports for s in r["serials"]]
    assert len(issued) == len(set(issued)) == 80
    core = Pki.open(fresh_home)
    try:
        rows = serials(core, profile="mtls-client")
        assert rows == set(issued)
        assert serials(core, profile="mtls-client", status="good") == rows
        result = core.verify_audit()
        assert result.ok, result.problem
        issue_events = [e for e in core.store.audit_events() if e.action == "certificate.issue"]
        assert {e.subject for e in issue_events} >= set(issued)
        assert {e.actor for e in issue_events} >= {"operator:alpha", "operator:beta"}
    finally:
        core.close()


def _wal_index(db_path: Path) -> tuple[int, int]:
    """(mxFrame, nBackfill) of the WAL-index (sqlite.org/walformat.html): frames in the
    WAL, and how many of them a checkpoint has copied back into the database file."""
    with (db_path.parent / (db_path.name + "-shm")).open("rb") as shm:
        header = shm.read(136)
    return int.from_bytes(header[16:20], "little"), int.from_bytes(header[96:100], "little")


def test_commits_never_checkpoint_and_the_background_checkpointer_does(tmp_path: Path) -> None:
    db_path = tmp_path / "store.db"
    store = Store(f"sqlite:///{db_path}")
    store.upgrade()
    try:
        checkpoints = store._checkpoints
        assert checkpoints is not None
        checkpoints.every = 10**9  # none in the background yet
        # each commit appends at least one frame: past SQLite's default automatic
        # checkpoint at 1000 frames, which would run inside a COMMIT
        for n in range(1200):
            store.audit(AuditRecord(action="test.commit", actor="test", subject=str(n)))
        frames, backfilled = _wal_index(db_path)
        # an automatic checkpoint would have restarted the WAL (fewer frames than commits)
        assert frames >= 1200 and backfilled == 0, "a COMMIT ran a checkpoint"

        checkpoints.every = 5
        for n in range(5):
            store.audit(AuditRecord(action="test.commit", actor="test", subject=f"b{n}"))
        deadline = time.monotonic() + 10
        while _wal_index(db_path)[1] == 0:
            assert time.monotonic() < deadline, "no background checkpoint within 10 s"
            time.sleep(0.02)
        assert len(list(store.audit_events())) == 1205
    finally:
        store.dispose()
