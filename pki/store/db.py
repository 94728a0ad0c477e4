"""Store: engine set-up, migrations, and every query hsmca makes.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit is durable against a
process crash (the WAL is written before COMMIT returns) and against power loss up to
the last checkpoint; losing the newest commits in a power cut leaves ``pending`` rows or
missing rows, never a signed certificate without a row, because the pending row is
committed before the HSM signs. Writers take the lock at BEGIN (``BEGIN IMMEDIATE``) so
concurrent writers queue instead of failing on lock upgrade. PostgreSQL serialises the
audit chain with a transaction-level advisory lock.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, create_engine, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from pki.audit import GENESIS, AuditRecord, StoredEvent, canonical_body, chain_hash
from pki.clock import Clock, SystemClock
from pki.errors import Conflict, InvalidInput, NotFound, Unauthorised
from pki.store.acme_store import AcmeStore
from pki.store.claims import Claims, SingleUseClaim
from pki.store.device_store import DeviceNote, DeviceStore
from pki.store.driver import (
    DEFAULT_BUSY_TIMEOUT,
    Checkpointer,
    CompiledStatement,
    WalChanges,
    WriterLock,
    sqlite_engine,
)
from pki.store.jobs_store import JobsStore, LeaderLock
from pki.store.lifecycle_store import LifecycleStore
from pki.store.models import ApiToken, AuditEvent, Certificate, Crl, Issuer, OcspResponse
from pki.store.reports import Reports

MIGRATIONS = Path(__file__).parent / "migrations"
_AUDIT_LOCK_KEY = 0x68736D6361  # "hsmca"

# Hot-path statements, built once: values arrive as execute() parameters, so SQLAlchemy
# reuses the compiled form instead of coercing a fresh ``.values()`` on every call.
_CERTS = Certificate.__table__
_AUDIT = AuditEvent.__table__
_INSERT_CERTIFICATE = _CERTS.insert()
_COMPLETE_CERTIFICATE = (
    _CERTS.update()
    .where(_CERTS.c.serial == bindparam("p_serial"), _CERTS.c.status == "pending")
    .values(der=bindparam("p_der"), status="good")
)
_PENDING_DEFAULTS: dict[str, Any] = {
    "revoked_at": None,
    "revocation_reason": None,
    "invalidity_date": None,
    "der": None,
    "crl_shard": 0,
    "device_id": None,
}
_INSERT_AUDIT = _AUDIT.insert()
_LAST_AUDIT = select(_AUDIT.c.id, _AUDIT.c.hash).order_by(_AUDIT.c.id.desc()).limit(1)
_PG_AUDIT_LOCK = select(func.pg_advisory_xact_lock(_AUDIT_LOCK_KEY))
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: converted pre-signed OCSP rows remembered per CertID (reused while the row is unchanged)
PRESIGNED_MEMO_ENTRIES = 20_000
_TOKENS = ApiToken.__table__
_TOKEN_BY_DIGEST = select(_TOKENS).where(_TOKENS.c.token_sha256 == bindparam("p_digest"))
_OCSP = OcspResponse.__table__
_PRESIGNED_OCSP = select(
    _OCSP.c.issuer_id, _OCSP.c.this_update, _OCSP.c.next_update, _OCSP.c.der
).where(_OCSP.c.serial == bindparam("p_serial"), _OCSP.c.hash_algorithm == bindparam("p_alg"))
# Written out, not bound: SQLite uses a partial index only when the query states its
# WHERE clause literally (a bound 'revoked' made it scan the table).
IS_REVOKED = text("certificates.status = 'revoked'")
IS_PENDING = text("certificates.status = 'pending'")
_REVOKED_ENTRIES = select(
    _CERTS.c.serial,
    _CERTS.c.revoked_at,
    _CERTS.c.revocation_reason,
    _CERTS.c.invalidity_date,
    _CERTS.c.crl_shard,
).where(
    _CERTS.c.issuer_id == bindparam("p_issuer"),
    IS_REVOKED,
    _CERTS.c.not_after > bindparam("p_now", type_=_CERTS.c.not_after.type),
    _CERTS.c.revoked_at >= bindparam("p_since", type_=_CERTS.c.revoked_at.type),
)


@dataclass(frozen=True)
class PresignedOcsp:
    """A stored pre-signed OCSP response and the window it is valid in."""

    issuer_id: str
    this_update: dt.datetime
    next_update: dt.datetime
    der: bytes


def _utc(value: dt.datetime | str) -> dt.datetime:
    """A driver's datetime (``str`` on SQLite, naive ``datetime`` on PostgreSQL) as UTC."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.UTC)


def _ocsp_upsert(dialect: str) -> Any:
    """INSERT of pre-signed responses that replaces the one stored for the same CertID."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(_OCSP)
    replaced = ("issuer_id", "status", "this_update", "next_update", "der")
    return stmt.on_conflict_do_update(
        index_elements=[_OCSP.c.serial, _OCSP.c.hash_algorithm],
        set_={name: stmt.excluded[name] for name in replaced},
    )


@dataclass(frozen=True)
class CertificateQuery:
    """Filters for :meth:`Store.list_certificates`; ``status`` may be ``expired``."""

    status: str | None = None
    expiring_within: dt.timedelta | None = None
    profile: str | None = None
    issuer_id: str | None = None
    requester: str | None = None
    limit: int = 100
    cursor: str | None = None


#: A CRL row as the driver returns it: (serial, revoked_at, reason, invalidity_date,
#: crl_shard); times are ``str`` on SQLite (the store's format) and naive UTC
#: ``datetime`` on PostgreSQL, unconverted on purpose (a million rows).
RevokedEntry = tuple[str, "str | dt.datetime", "str | None", "str | dt.datetime | None", int]


@dataclass(frozen=True)
class Page:
    items: list[Certificate]
    next_cursor: str | None


class _FastStatements:
    def __init__(self, dialect: Any) -> None:
        self.insert_certificate = CompiledStatement(
            _INSERT_CERTIFICATE, dialect, [c.name for c in _CERTS.columns if c.name != "id"]
        )
        self.complete_certificate = CompiledStatement(_COMPLETE_CERTIFICATE, dialect)
        self.insert_audit = CompiledStatement(
            _INSERT_AUDIT, dialect, [c.name for c in _AUDIT.columns]
        )
        self.last_audit = CompiledStatement(_LAST_AUDIT, dialect)
        self.revoked_entries = CompiledStatement(_REVOKED_ENTRIES, dialect)
        self.presigned_ocsp = CompiledStatement(_PRESIGNED_OCSP, dialect)
        self.token_by_digest = CompiledStatement(_TOKEN_BY_DIGEST, dialect)
        if dialect.name == "sqlite":
            # SQLite's planner prefers (status, not_after) even after ANALYZE; the covering
            # partial index reads a million entries 2.5x faster (no table look-ups)
            self.revoked_entries.sql = self.revoked_entries.sql.replace(
                "FROM certificates", "FROM certificates INDEXED BY ix_certificates_revoked_issuer"
            )
        self.pg_lock = (
            CompiledStatement(_PG_AUDIT_LOCK, dialect) if dialect.name == "postgresql" else None
        )


class Store:
    """Typed access to the database. One instance per process; thread-safe."""

    def __init__(
        self, url: str, clock: Clock | None = None, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    ) -> None:
        """``busy_timeout``: seconds a SQLite write waits for a lock held outside hsmca
        before it fails (a 503); PostgreSQL ignores it."""
        self.url = url
        self.clock = clock or SystemClock()
        self.is_sqlite = url.startswith("sqlite")
        self._writers = WriterLock(None)
        self._checkpoints: Checkpointer | None = None
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                # it holds EAB keys and token digests: private from the start (SQLite
                # gives its -wal and -shm files the database file's mode)
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                self._writers = WriterLock(Path(path + ".writelock"))
                self._checkpoints = Checkpointer(path)
            self.engine = sqlite_engine(url, True, busy_timeout=busy_timeout)
            self.read_engine = sqlite_engine(url, False, busy_timeout=busy_timeout)
            self._thread_engine = sqlite_engine(url, False, False, busy_timeout)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
            self.read_engine = self.engine
            self._thread_engine = create_engine(url, poolclass=NullPool)
        self._fast = _FastStatements(self.engine.dialect)
        self._upsert_ocsp = _ocsp_upsert(self.engine.dialect.name)
        self._presigned_memo: dict[tuple[str, str], tuple[Any, PresignedOcsp, bytes | None]] = {}
        self._wal_changes: WalChanges | None = None
        self._wal_watch_tried = False
        self._local = threading.local()
        self._write = sessionmaker(self.engine, expire_on_commit=False)
        self._read = sessionmaker(self.read_engine, expire_on_commit=False)
        #: the ACME server's queries
        self.acme = AcmeStore(self)
        #: the scheduler's records
        self.jobs = JobsStore(self)
        self.reports = Reports(self)
        #: the lifecycle jobs' queries
        self.lifecycle = LifecycleStore(self)
        #: the device inventory and enrolment credentials
        self.devices = DeviceStore(self)
        #: single-use tokens and credentials, spent with the pending row they pay for
        self.claims = Claims(self)

    # -- plumbing --------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Apply every Alembic migration not yet applied (idempotent)."""
        from alembic import command  # imported here: costs ~1 s, needed only at start
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        """Close pooled connections (call after fork and at shutdown)."""
        self._drop_hot_connection()
        if self._wal_changes is not None:
            self._wal_changes.close()
        self._wal_changes = None
        self._wal_watch_tried = False
        self._presigned_memo.clear()
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()
        self._thread_engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._writers, self._write.begin() as session:
            yield session
        self._committed()

    def _committed(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.committed()

    @contextmanager
    def _ro(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    def leader_lock(self) -> LeaderLock:
        """A lock that one process of all sharing this database can hold (the scheduler)."""
        return LeaderLock(self)

    def ping(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        with self._ro() as s:
            s.execute(select(1)).scalar_one()

    # -- audit -----------------------------------------------------------------------------

    def _append_audit(self, s: Session, record: AuditRecord) -> None:
        """Append ``record`` inside the session's write transaction."""
        raw = s.connection().connection.dbapi_connection
        assert raw is not None
        self._append_audit_raw(raw.cursor(), record)

    def _append_audit_raw(self, cursor: Any, record: AuditRecord) -> None:
        """Append ``record`` to the chain inside the cursor's write transaction."""
        fast = self._fast
        if fast.pg_lock is not None:
            fast.pg_lock.run(cursor)
        last = fast.last_audit.run(cursor).fetchone()
        event_id, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
        at = self.clock.now()
        digest = chain_hash(prev, canonical_body(event_id, at, record))
        fast.insert_audit.run(
            cursor,
            {
                "id": event_id,
                "at": at,
                "actor": record.actor,
                "action": record.action,
                "subject": record.subject,
                "outcome": record.outcome,
                "details": record.details,
                "prev_hash": prev,
                "hash": digest,
            },
        )

    @contextmanager
    def _raw_tx(self) -> Iterator[Any]:
        """A write transaction on this thread's own driver connection (hot path only; a
        pool check-out and check-in per transaction cost ~40 us each)."""
        with self._writers:
            conn = self._hot_connection()
            try:
                cursor = conn.cursor()
                if self.is_sqlite:
                    cursor.execute("BEGIN IMMEDIATE")
                try:
                    yield cursor
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
            except BaseException:
                self._drop_hot_connection()
                raise
        self._committed()

    def _hot_connection(self) -> Any:
        """This thread's own driver connection for hot-path write transactions."""
        return self._thread_connection("writer")

    def _hot_reader(self) -> Any:
        """This thread's own autocommit driver connection for single-statement reads."""
        return self._thread_connection("reader")

    def _hot_reader_cursor(self) -> Any:
        """A driver cursor on :meth:`_hot_reader`, kept for the thread's next read."""
        conn = self._hot_reader()
        held = getattr(self._local, "reader_cursor", None)
        if held is None or held[0] is not conn:
            held = (conn, conn.driver_connection.cursor())
            self._local.reader_cursor = held
        return held[1]

    def _thread_connection(self, role: str) -> Any:
        """A driver connection this thread keeps (hot paths). It comes from an unpooled
        engine: held per thread, it must neither use up nor return to the shared pools
        (a plain-HTTP worker has 16 threads; the pools hold 15 connections)."""
        held = getattr(self._local, role, None)
        if held is None or held[1] != os.getpid():  # never use a parent's connection
            conn = self._thread_engine.raw_connection()
            if role == "reader" and not self.is_sqlite:
                conn.driver_connection.autocommit = True  # no transaction left open
            held = (conn, os.getpid())
            setattr(self._local, role, held)
        return held[0]

    def _drop_hot_connection(self) -> None:
        for role in ("writer", "reader"):
            held = getattr(self._local, role, None)
            setattr(self._local, role, None)
            if held is not None and held[1] == os.getpid():
                with contextlib.suppress(Exception):
                    held[0].close()

    def audit(self, record: AuditRecord) -> None:
        """Append one event on its own (for events with no other state change)."""
        with self._tx() as s:
            self._append_audit(s, record)

    def audit_events(self) -> Iterator[StoredEvent]:
        """All events in id order, streamed."""
        with self._ro() as s:
            for row in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars():
                yield StoredEvent(
                    id=row.id,
                    at=row.at,
                    actor=row.actor,
                    action=row.action,
                    subject=row.subject,
                    outcome=row.outcome,
                    details=row.details,
                    prev_hash=row.prev_hash,
                    hash=row.hash,
                )

    def tamper_audit_event(self, event_id: int, **changes: Any) -> None:
        """Rewrite or (``delete=True``) remove an event behind the chain's back. Tests only."""
        with self._tx() as s:
            if changes.pop("delete", False):
                s.execute(AuditEvent.__table__.delete().where(AuditEvent.id == event_id))
            else:
                s.execute(update(AuditEvent).where(AuditEvent.id == event_id).values(**changes))

    # -- issuers ---------------------------------------------------------------------------

    def add_issuer(self, issuer: Issuer, record: AuditRecord) -> None:
        with self._tx() as s:
            s.add(issuer)
            self._append_audit(s, record)

    def issuers(self) -> list[Issuer]:
        with self._ro() as s:
            return list(s.execute(select(Issuer).order_by(Issuer.created_at)).scalars())

    def issuer(self, issuer_id: str) -> Issuer:
        with self._ro() as s:
            found = s.get(Issuer, issuer_id)
        if found is None:
            raise NotFound(f"no issuer {issuer_id!r}")
        return found

    def set_issuer_ocsp(self, issuer_id: str, key_label: str, serial: str) -> None:
        with self._tx() as s:
            s.execute(
                update(Issuer)
                .where(Issuer.id == issuer_id)
                .values(ocsp_key_label=key_label, ocsp_serial=serial)
            )

    def next_crl_number(self, issuer_id: str) -> int:
        """Increment and return the issuer's CRL number (monotonic, never reused)."""
        with self._tx() as s:
            s.execute(
                update(Issuer)
                .where(Issuer.id == issuer_id)
                .values(crl_number=Issuer.crl_number + 1)
            )
            return s.execute(select(Issuer.crl_number).where(Issuer.id == issuer_id)).scalar_one()

    # -- certificates ----------------------------------------------------------------------

    def insert_pending(self, values: dict[str, Any], claim: SingleUseClaim | None = None) -> None:
        """Commit the to-be-signed record in state ``pending``, spending ``claim`` in the
        same transaction; Conflict if the serial exists, Unauthorised (nothing written) if
        the claim was spent already."""
        row = dict(_PENDING_DEFAULTS, **values, status="pending", created_at=self.clock.now())
        try:
            with self._raw_tx() as cursor:
                if claim is not None and not self.claims.claim(cursor, claim):
                    raise Unauthorised(
                        "single-use token already used"
                        if claim.kind == "token"
                        else "the enrolment credential was already used or has expired"
                    )
                self._fast.insert_certificate.run(cursor, row)
        except self.engine.dialect.loaded_dbapi.IntegrityError:
            # Only a taken serial is a Conflict (the caller retries with another); any
            # other violation (unknown issuer, missing value) is a bug and propagates.
            if not self._serial_exists(values["serial"]):
                raise
            raise Conflict(f"serial {values['serial']} already exists") from None

    def _serial_exists(self, serial: str) -> bool:
        with self._ro() as s:
            found = s.execute(select(Certificate.id).where(Certificate.serial == serial))
            return found.first() is not None

    def complete_issuance(
        self, serial: str, der: bytes, record: AuditRecord, device: DeviceNote | None = None
    ) -> str | None:
        """Store the signed DER, mark the row ``good``, audit, and note the certificate in
        the device inventory, in one transaction. Returns the device's status (or None)."""
        with self._raw_tx() as cursor:
            done = self._fast.complete_certificate.run(cursor, {"p_serial": serial, "p_der": der})
            if done.rowcount != 1:
                raise Conflict(f"certificate {serial} is no longer pending")
            # the device row before the audit lock, as a device revocation takes them: the
            # other order deadlocked on PostgreSQL
            status = None if device is None else self.devices.note(cursor, device, serial)
            self._append_audit_raw(cursor, record)
            return status

    def abort_pending(
        self, serial: str, record: AuditRecord | None, claim: SingleUseClaim | None = None
    ) -> None:
        """Drop the pending row of an issuance that was never signed (the HSM refused it,
        or the linter did), make its single-use secret usable again and audit ``record``,
        in one transaction."""
        with self._tx() as s:
            s.execute(
                delete(Certificate).where(
                    Certificate.serial == serial, Certificate.status == "pending"
                )
            )
            if claim is not None:
                self.claims.release_in(s, claim)
            if record is not None:
                self._append_audit(s, record)

    def certificate(self, serial: str) -> Certificate:
        with self._ro() as s:
            found = s.execute(select(Certificate).where(Certificate.serial == serial)).scalar()
        if found is None:
            raise NotFound(f"no certificate with serial {serial}")
        return found

    def certificates_by_serial(self, serials: list[str]) -> list[Certificate]:
        """The certificates among ``serials`` that exist (in no particular order)."""
        with self._ro() as s:
            stmt = select(Certificate).where(Certificate.serial.in_(serials))
            return list(s.execute(stmt).scalars())

    def count_certificates(self) -> int:
        with self._ro() as s:
            return s.execute(select(func.count()).select_from(Certificate)).scalar_one()

    def list_certificates(self, query: CertificateQuery) -> Page:
        """One page of certificates in issuance order; ``next_cursor`` continues it."""
        now = self.clock.now()
        stmt = select(Certificate).order_by(Certificate.id).limit(query.limit + 1)
        if query.status == "expired":
            stmt = stmt.where(Certificate.status == "good", Certificate.not_after <= now)
        elif query.status == "good":
            stmt = stmt.where(Certificate.status == "good", Certificate.not_after > now)
        elif query.status:
            stmt = stmt.where(Certificate.status == query.status)
        if query.expiring_within is not None:
            stmt = stmt.where(
                Certificate.status == "good",
                Certificate.not_after > now,
                Certificate.not_after <= now + query.expiring_within,
            )
        if query.profile:
            stmt = stmt.where(Certificate.profile == query.profile)
        if query.issuer_id:
            stmt = stmt.where(Certificate.issuer_id == query.issuer_id)
        if query.requester:
            stmt = stmt.where(Certificate.requester == query.requester)
        if query.cursor:
            stmt = stmt.where(Certificate.id > _decode_cursor(query.cursor))
        with self._ro() as s:
            rows = list(s.execute(stmt).scalars())
        if len(rows) > query.limit:
            return Page(rows[: query.limit], _encode_cursor(rows[query.limit - 1].id))
        return Page(rows, None)

    def revoke(
        self,
        serial: str,
        reason: str,
        at: dt.datetime,
        record: AuditRecord,
        invalidity_date: dt.datetime | None = None,
    ) -> Certificate:
        """Mark a good or pending certificate revoked and audit; Conflict if already revoked."""
        # FOR UPDATE: on PostgreSQL two concurrent revocations both saw "good" and both
        # wrote (second revocation time and reason, two audit events); SQLite ignores it
        # (BEGIN IMMEDIATE already serialises writers)
        stmt = select(Certificate).where(Certificate.serial == serial).with_for_update()
        with self._tx() as s:
            cert = s.execute(stmt).scalar()
            if cert is None:
                raise NotFound(f"no certificate with serial {serial}")
            if cert.status == "revoked":
                raise Conflict(f"certificate {serial} is already revoked")
            cert.status = "revoked"
            cert.revoked_at = at
            cert.revocation_reason = reason
            cert.invalidity_date = invalidity_date
            # its "good" answers go with it: until the revocation's own responses are
            # signed (or if that fails), OCSP signs live instead of serving "good"
            s.execute(_OCSP.delete().where(_OCSP.c.serial == serial))
            self._append_audit(s, record)
            s.flush()
            return cert

    def pending_before(self, cutoff: dt.datetime) -> list[Certificate]:
        """Pending rows created before ``cutoff``: issuance that never completed."""
        with self._ro() as s:
            stmt = select(Certificate).where(IS_PENDING, Certificate.created_at < cutoff)
            return list(s.execute(stmt).scalars())

    def revoked_entries(
        self, issuer_id: str, now: dt.datetime, since: dt.datetime | None = None
    ) -> list[RevokedEntry]:
        """Unexpired revoked certificates of an issuer (revoked at or after ``since`` if
        given), for CRLs. Rows come straight from the driver, unconverted: a million
        rows must not cost a million datetime conversions. Times are therefore the
        driver's own values: ``str`` in the store's format on SQLite, ``datetime``
        (naive UTC) on PostgreSQL."""
        params = {"p_issuer": issuer_id, "p_now": now, "p_since": since or _EPOCH}
        conn = self.read_engine.raw_connection()
        try:
            cursor = self._fast.revoked_entries.run(conn.cursor(), params)
            return cursor.fetchall()
        finally:
            conn.close()

    def latest_revocation(self, issuer_id: str, shard: int | None = None) -> dt.datetime | None:
        """Time of the newest revocation of an issuer (in one CRL partition if given)."""
        stmt = select(func.max(Certificate.revoked_at)).where(
            Certificate.issuer_id == issuer_id, IS_REVOKED
        )
        if shard is not None:
            stmt = stmt.where(Certificate.crl_shard == shard)
        with self._ro() as s:
            value = s.execute(stmt).scalar()
        if isinstance(value, str):  # SQLite: func.max loses the column type
            value = dt.datetime.fromisoformat(value)
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value

    # -- CRLs and OCSP responses -----------------------------------------------------------

    def save_crl(self, crl: Crl) -> None:
        with self._tx() as s:
            s.add(crl)

    def latest_crl(self, issuer_id: str, shard: int, kinds: tuple[str, ...]) -> Crl | None:
        """The highest-numbered CRL of a partition among ``kinds``."""
        stmt = (
            select(Crl)
            .where(Crl.issuer_id == issuer_id, Crl.shard == shard, Crl.kind.in_(kinds))
            .order_by(Crl.number.desc())
            .limit(1)
        )
        with self._ro() as s:
            return s.execute(stmt).scalar()

    def prune_crls(self, issuer_id: str, keep_after: dt.datetime) -> None:
        """Forget CRLs that stopped being valid before ``keep_after`` (latest ones stay)."""
        with self._tx() as s:
            s.execute(
                Crl.__table__.delete().where(
                    Crl.issuer_id == issuer_id, Crl.next_update < keep_after
                )
            )

    def save_ocsp_responses(self, rows: list[dict[str, Any]]) -> int:
        """Insert or replace pre-signed responses (one per serial and hash algorithm).

        A response is saved only if it still states the certificate's status at commit
        time: a batch signed before a concurrent revocation must not put "good" back
        over the "revoked" answer the revocation signed. The status is read under a
        share lock (SQLite: BEGIN IMMEDIATE already serialises writers; PostgreSQL:
        FOR SHARE waits for a revocation's FOR UPDATE). Returns how many were saved."""
        if not rows:
            return 0
        saved = 0
        with self._tx() as s:
            serials = {row["serial"] for row in rows}
            current = dict(
                s.execute(
                    select(Certificate.serial, Certificate.status)
                    .where(Certificate.serial.in_(serials))
                    .with_for_update(read=True)
                ).all()
            )
            keep = [row for row in rows if current.get(row["serial"]) == row["status"]]
            if keep:
                s.execute(self._upsert_ocsp, keep)
            saved = len(keep)
        return saved

    def presigned_ocsp(self, serial: str, hash_algorithm: str) -> PresignedOcsp | None:
        """The stored response for one certificate and CertID hash, if any: the OCSP hot
        path. A response read before is returned again without a query while SQLite
        reports no commit since (:class:`WalChanges`); otherwise it is read on this
        thread's own driver connection, without pool or ORM."""
        key = (serial, hash_algorithm)
        memo = self._presigned_memo.get(key)
        changes = self._wal_changes
        token = changes.token() if changes is not None else None
        if memo is not None and token is not None and memo[2] == token:
            return memo[1]
        params = {"p_serial": serial, "p_alg": hash_algorithm}
        try:
            row = self._fast.presigned_ocsp.run(self._hot_reader_cursor(), params).fetchone()
        except Exception:
            self._drop_hot_connection()
            raise
        if self.is_sqlite and not self._wal_watch_tried:
            self._wal_watch_tried = True  # the -shm file exists once a read has run
            self._wal_changes = WalChanges.open(self.url)
        if row is None:
            return None
        if memo is not None and memo[0] == row:
            found = memo[1]  # the same stored response: skip the conversions
        else:
            found = PresignedOcsp(row[0], _utc(row[1]), _utc(row[2]), bytes(row[3]))
        if len(self._presigned_memo) >= PRESIGNED_MEMO_ENTRIES:
            self._presigned_memo.clear()
        self._presigned_memo[key] = (row, found, token)
        return found

    def certificates_for_ocsp(
        self, issuer_id: str, stale_before: dt.datetime, now: dt.datetime, limit: int
    ) -> list[Certificate]:
        """Unexpired signed certificates whose SHA-1 response is missing or goes stale
        before ``stale_before``: the pre-signing work list."""
        stmt = (
            select(Certificate)
            .outerjoin(
                OcspResponse,
                (OcspResponse.serial == Certificate.serial)
                & (OcspResponse.hash_algorithm == "sha1"),
            )
            .where(
                Certificate.issuer_id == issuer_id,
                Certificate.status.in_(("good", "revoked")),
                Certificate.not_after > now,
                (OcspResponse.serial.is_(None)) | (OcspResponse.next_update < stale_before),
            )
            .limit(limit)
        )
        with self._ro() as s:
            return list(s.execute(stmt).scalars())

    # -- API tokens ------------------------------------------------------------------------

    def add_token(self, token: ApiToken, record: AuditRecord) -> None:
        try:
            with self._tx() as s:
                s.add(token)
                self._append_audit(s, record)
        except IntegrityError:
            raise Conflict(f"a token named {token.name!r} already exists") from None

    def token_by_digest(self, digest: str) -> Any:
        """The token row (attribute access like :class:`ApiToken`) for a digest, or None.
        Every authenticated request calls this: one compiled statement on this thread's
        own driver connection (an ORM session was 13% of an issuance request, a pooled
        Core execution still ~0.5 ms)."""
        return self._hot_read(self._fast.token_by_digest, {"p_digest": digest})

    def _hot_read(self, stmt: CompiledStatement, params: dict[str, Any]) -> Any:
        """The first row of a compiled SELECT on this thread's own reader, or None."""
        try:
            return stmt.fetch_one(self._hot_reader_cursor(), params)
        except Exception:
            self._drop_hot_connection()
            raise

    def tokens(self) -> list[ApiToken]:
        with self._ro() as s:
            return list(s.execute(select(ApiToken).order_by(ApiToken.id)).scalars())

    def revoke_token(self, name: str, record: AuditRecord) -> ApiToken:
        with self._tx() as s:
            token = s.execute(select(ApiToken).where(ApiToken.name == name)).scalar()
            if token is None:
                raise NotFound(f"no token named {name!r}")
            token.revoked_at = self.clock.now()
            self._append_audit(s, record)
            s.flush()
            return token


def _encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(str(row_id).encode()).decode().rstrip("=")


_MAX_ROW_ID = 2**63 - 1  # the largest id both databases can compare a column with


def _decode_cursor(cursor: str) -> int:
    """The row id a cursor continues after; InvalidInput for anything we did not hand out
    (an id too large for the database would otherwise escape as OverflowError)."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        text = ""
    if not (text.isascii() and text.isdigit()) or int(text) > _MAX_ROW_ID:
        raise InvalidInput(f"invalid cursor {cursor!r}")
    return int(text)
