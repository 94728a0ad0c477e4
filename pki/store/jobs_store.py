"""The scheduler's part of the SA: job runs, expiry notifications, and the leader lock
that lets exactly one scheduler run across workers and instances."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, case, cast, func, select, text, update
from sqlalchemy.exc import IntegrityError

from pki.store.jobs_models import ExpiryNotification, JobRun
from pki.store.models import Certificate

if TYPE_CHECKING:
    from pki.store.db import Store

#: the PostgreSQL advisory lock key of the scheduler ("hsmcasch")
_PG_LEADER_KEY = 0x68736D63617363


_EXPIRING_COLUMNS = (
    "id",
    "serial",
    "issuer_id",
    "subject",
    "common_name",
    "sans",
    "profile",
    "not_before",
    "not_after",
)


@dataclass(frozen=True)
class ExpiryCandidates:
    """Certificates close to expiry: ids of those not renewed, and a count of the rest."""

    unrenewed: list[int]
    renewed: int


@dataclass(frozen=True)
class ExpiringCertificate:
    """The columns an expiry notification needs (no DER)."""

    id: int
    serial: str
    issuer_id: str
    subject: str
    common_name: str | None
    sans: list[str]
    profile: str
    not_before: dt.datetime
    not_after: dt.datetime


class LeaderLock:
    """Held by the one scheduler of all instances sharing the database: ``flock`` of a
    file beside a SQLite database, a session-level advisory lock on PostgreSQL. Both are
    released by the operating system or the server when the holder's process or
    connection dies, so a standby takes over at its next attempt."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._fd: int | None = None
        self._conn: Any = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True if this process holds it now."""
        if self.held:
            return True
        if self._store.is_sqlite:
            path = Path(self._store.url.split("///", 1)[-1] + ".leader")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._fd = fd
            return True
        conn = self._store._thread_engine.connect()
        got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_LEADER_KEY})
        if got.scalar():
            conn.commit()
            self._conn = conn
            return True
        conn.close()
        return False

    def still_held(self) -> bool:
        """True while the lock is ours: a PostgreSQL session that dropped (server restart,
        killed backend) has lost it, and the holder must stand down."""
        if self._fd is not None:
            return True
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
        except Exception:
            self.release()
            return False
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None or self._conn is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # the session ends: PostgreSQL drops its advisory locks
            self._conn = None


class JobsStore:
    """Job runs and expiry notifications."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def start_run(self, job: str, instance: str, now: dt.datetime) -> int:
        with self._store._tx() as s:
            run = JobRun(job=job, instance=instance, started_at=now, outcome="running", summary={})
            s.add(run)
            s.flush()
            return run.id

    def finish_run(
        self,
        run_id: int,
        now: dt.datetime,
        outcome: str,
        summary: dict[str, Any],
        error: str | None = None,
    ) -> None:
        with self._store._tx() as s:
            s.execute(
                update(JobRun)
                .where(JobRun.id == run_id)
                .values(finished_at=now, outcome=outcome, summary=summary, error=error)
            )

    def recent_runs(self, limit: int = 50, job: str | None = None) -> list[JobRun]:
        with self._store._ro() as s:
            stmt = select(JobRun).order_by(JobRun.id.desc()).limit(limit)
            if job is not None:
                stmt = stmt.where(JobRun.job == job)
            return list(s.execute(stmt).scalars())

    def last_success(self) -> dict[str, dt.datetime]:
        """When each job last finished ``ok``."""
        with self._store._ro() as s:
            rows = s.execute(
                select(JobRun.job, func.max(JobRun.finished_at))
                .where(JobRun.outcome == "ok")
                .group_by(JobRun.job)
            ).all()
        return {job: _aware(at) for job, at in rows if at is not None}

    def claim_notification(
        self, serial: str, threshold: str, channel: str, now: dt.datetime
    ) -> bool:
        """Claim the notification (serial, threshold, channel); False if it was claimed
        before — so each is sent at most once, whichever instance scans."""
        try:
            with self._store._tx() as s:
                s.add(
                    ExpiryNotification(
                        serial=serial, threshold=threshold, channel=channel, claimed_at=now
                    )
                )
        except IntegrityError:
            return False
        return True

    def notification_result(
        self,
        serial: str,
        threshold: str,
        channel: str,
        now: dt.datetime,
        attempts: int,
        error: str | None,
    ) -> None:
        with self._store._tx() as s:
            s.execute(
                update(ExpiryNotification)
                .where(
                    ExpiryNotification.serial == serial,
                    ExpiryNotification.threshold == threshold,
                    ExpiryNotification.channel == channel,
                )
                .values(sent_at=None if error else now, attempts=attempts, last_error=error)
            )

    def notifications(self, serial: str | None = None) -> list[ExpiryNotification]:
        with self._store._ro() as s:
            stmt = select(ExpiryNotification)
            if serial is not None:
                stmt = stmt.where(ExpiryNotification.serial == serial)
            return list(s.execute(stmt).scalars())

    def expiry_candidates(
        self,
        now: dt.datetime,
        until: dt.datetime,
        profiles: Collection[str],
        other_profiles: bool = False,
    ) -> ExpiryCandidates:
        """Good certificates with ``now < not_after <= until`` of ``profiles`` (of every
        profile not in ``profiles`` if ``other_profiles``): the ids of those not renewed,
        by (not_after, id), and how many were renewed.

        Renewed: another good certificate with the same profile and the same names (as
        stored, in order) expires later. One query reads the good unexpired certificates
        of those profiles once — a range of the (status, not_after) index and a window
        function over (profile, names) — and returns one row per unrenewed certificate
        plus one count: no per-certificate sub-query, no join left to the planner (a
        correlated or joined form went quadratic on SQLite)."""
        cert = Certificate
        names = cast(cert.sans, String)  # the stored JSON text (json::text on PostgreSQL)
        in_scope = cert.profile.not_in(profiles) if other_profiles else cert.profile.in_(profiles)
        active = (
            select(
                cert.id,
                cert.not_after,
                func.max(cert.not_after).over(partition_by=(cert.profile, names)).label("latest"),
            )
            .where(cert.status == "good", cert.not_after > now, in_scope)
            .subquery("active")
        )
        renewed = active.c.latest > active.c.not_after
        key_id = case((renewed, None), else_=active.c.id)
        key_at = case((renewed, None), else_=active.c.not_after)
        stmt = (
            select(key_id, key_at, func.count())
            .where(active.c.not_after <= until)
            .group_by(key_id, key_at)
        )
        unrenewed: list[tuple[dt.datetime, int]] = []
        renewed_count = 0
        with self._store._ro() as s:
            for row_id, not_after, count in s.execute(stmt).all():
                if row_id is None:
                    renewed_count = count
                else:
                    unrenewed.append((_aware(_datetime(not_after)), row_id))
        unrenewed.sort()
        return ExpiryCandidates([row_id for _, row_id in unrenewed], renewed_count)

    def expiring_certificates(self, ids: Collection[int]) -> list[ExpiringCertificate]:
        """The notification columns of certificates ``ids`` that are still good, by
        (not_after, id)."""
        if not ids:
            return []
        cert = Certificate
        stmt = (
            select(*(getattr(cert, name) for name in _EXPIRING_COLUMNS))
            .where(cert.id.in_(list(ids)), cert.status == "good")
            .order_by(cert.not_after, cert.id)
        )
        with self._store._ro() as s:
            return [ExpiringCertificate(*r) for r in s.execute(stmt).all()]

    def claimed_notifications(self, serials: Collection[str]) -> set[tuple[str, str, str]]:
        """(serial, threshold, channel) of every notification claimed for ``serials``."""
        if not serials:
            return set()
        n = ExpiryNotification
        stmt = select(n.serial, n.threshold, n.channel).where(n.serial.in_(list(serials)))
        with self._store._ro() as s:
            return {(a, b, c) for a, b, c in s.execute(stmt).all()}


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _datetime(value: dt.datetime | str) -> dt.datetime:
    """A CASE over a datetime column loses its type on SQLite: the stored text comes back."""
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value
