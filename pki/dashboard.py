"""Use-case of the operator dashboard: one read-only summary of the CA's state.

:func:`dashboard_summary` gathers counts by status and profile, expiries per day for the
next 30 days, the CA certificates with their remaining life, recent revocations and job
runs. Aggregates are computed by the database (:class:`pki.store.reports.Reports`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pki.store import Issuer
from pki.store.reports import STATUSES

if TYPE_CHECKING:
    from pki.service import Pki

#: the expiry chart covers this many days after ``now``, one bar per day
EXPIRY_DAYS = 30
RECENT_REVOCATIONS = 10
RECENT_JOB_RUNS = 10


@dataclass(frozen=True)
class StatusCounts:
    """Certificates per status; ``expired`` are ``good`` rows past their ``not_after``."""

    good: int = 0
    revoked: int = 0
    pending: int = 0
    expired: int = 0

    @property
    def total(self) -> int:
        return self.good + self.revoked + self.pending + self.expired

    @classmethod
    def of(cls, counts: dict[str, int]) -> StatusCounts:
        return cls(**{status: int(counts.get(status, 0)) for status in STATUSES})


@dataclass(frozen=True)
class ExpiryDay:
    """Good certificates with ``start < not_after <= end`` (one day of the chart)."""

    start: dt.datetime
    end: dt.datetime
    count: int


@dataclass(frozen=True)
class CaCertificate:
    """A CA certificate (root or intermediate) and how long it has left."""

    issuer_id: str
    name: str
    kind: str
    subject: str
    not_after: dt.datetime
    remaining_seconds: int
    active: bool

    @property
    def expired(self) -> bool:
        return self.remaining_seconds <= 0


@dataclass(frozen=True)
class RecentRevocation:
    serial: str
    subject: str
    profile: str
    revoked_at: dt.datetime
    reason: str | None


@dataclass(frozen=True)
class JobRunSummary:
    """One run of a scheduled job; ``duration_seconds`` is None while it runs."""

    id: int
    job: str
    instance: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    outcome: str
    error: str | None

    @property
    def duration_seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class DashboardSummary:
    """Everything the dashboard shows, as of ``generated_at``."""

    generated_at: dt.datetime
    counts: StatusCounts
    by_profile: tuple[tuple[str, StatusCounts], ...]
    expiries: tuple[ExpiryDay, ...]
    cas: tuple[CaCertificate, ...]
    revocations: tuple[RecentRevocation, ...]
    job_runs: tuple[JobRunSummary, ...]

    @property
    def expiring_total(self) -> int:
        """Good certificates expiring within the chart's window."""
        return sum(day.count for day in self.expiries)


def dashboard_summary(pki: Pki, now: dt.datetime | None = None) -> DashboardSummary:
    """The dashboard's figures as of ``now`` (default: the core's clock)."""
    now = (now or pki.clock.now()).astimezone(dt.UTC)
    reports = pki.store.reports
    day = dt.timedelta(days=1)
    per_day = reports.expiries(now, EXPIRY_DAYS, day)
    expiries = tuple(
        ExpiryDay(now + day * i, now + day * (i + 1), n) for i, n in enumerate(per_day)
    )
    cas = tuple(
        CaCertificate(
            issuer_id=i.id,
            name=i.name,
            kind=i.kind,
            subject=i.subject,
            not_after=i.not_after,
            remaining_seconds=int((i.not_after - now).total_seconds()),
            active=bool(i.active),
        )
        for i in sorted(pki.store.issuers(), key=_ca_order)
    )
    revocations = tuple(
        RecentRevocation(r.serial, r.subject, r.profile, r.revoked_at, r.reason)
        for r in reports.recent_revocations(RECENT_REVOCATIONS)
    )
    runs = tuple(
        JobRunSummary(
            id=r.id,
            job=r.job,
            instance=r.instance,
            started_at=r.started_at,
            finished_at=r.finished_at,
            outcome=r.outcome,
            error=r.error,
        )
        for r in pki.store.jobs.recent_runs(RECENT_JOB_RUNS)
    )
    return DashboardSummary(
        generated_at=now,
        counts=StatusCounts.of(reports.status_counts(now)),
        by_profile=tuple(
            (name, StatusCounts.of(c)) for name, c in reports.profile_counts(now).items()
        ),
        expiries=expiries,
        cas=cas,
        revocations=revocations,
        job_runs=runs,
    )


def _ca_order(issuer: Issuer) -> tuple[int, bool, float]:
    """Roots first, then intermediates; active before retired; latest expiry first."""
    return (0 if issuer.kind == "root" else 1, not issuer.active, -issuer.not_after.timestamp())
