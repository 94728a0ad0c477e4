"""The scheduler: periodic jobs run by exactly one process of all that share a database.

Every ``hsmca serve`` runs a :class:`SchedulerService` in its supervisor process. It tries
the database's leader lock (:meth:`pki.store.Store.leader_lock`) every few seconds; the
one that holds it runs APScheduler 3 with its job store in the same database, plus the
fast publisher loop (CRLs and pre-signed OCSP responses after revocations). The lock is
released by the operating system (SQLite: ``flock``) or by PostgreSQL (a session advisory
lock) when its holder dies, so a standby instance takes over within
:data:`LEADER_POLL_SECONDS`. Each run of a job is recorded in ``job_runs`` (start, end,
outcome, error, summary); ``hsmca jobs list`` shows them, ``hsmca jobs run NAME`` runs one
now.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pki.errors import InvalidInput
from pki.service import Pki

log = logging.getLogger("hsmca.scheduler")

#: how often a standby instance tries to become the scheduler
LEADER_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class JobSpec:
    """A periodic job: ``run(pki)`` returns a summary of what it did."""

    name: str
    run: Callable[[Pki], dict[str, Any]]
    interval: dt.timedelta
    description: str


def _refresh_revocation(pki: Pki) -> dict[str, Any]:
    return dict(pki.publish_due())


def _renew_service_certificates(pki: Pki) -> dict[str, Any]:
    from pki.lifecycle import renew_service_certificates

    return renew_service_certificates(pki)


def _purge(pki: Pki) -> dict[str, Any]:
    from pki.lifecycle import purge_stale

    return purge_stale(pki)


def _expiry_scan(pki: Pki) -> dict[str, Any]:
    from pki.expiry import expiry_scan

    return dict(expiry_scan(pki))


def _reconcile_pending(pki: Pki) -> dict[str, Any]:
    from pki.acme.service import Acme

    revoked = len(pki.reconcile_pending())
    return {"revoked": revoked, "acme_orders_failed": Acme(pki).fail_interrupted_orders()}


def _rotate_issuing_ca(pki: Pki) -> dict[str, Any]:
    from pki.lifecycle import rotate_issuing_cas

    return rotate_issuing_cas(pki)


JOBS: dict[str, JobSpec] = {
    spec.name: spec
    for spec in (
        JobSpec(
            "refresh-revocation",
            _refresh_revocation,
            dt.timedelta(minutes=5),
            "publish CRLs and pre-sign OCSP responses due before their nextUpdate",
        ),
        JobSpec(
            "renew-service-certificates",
            _renew_service_certificates,
            dt.timedelta(hours=1),
            "re-issue OCSP responder and server TLS certificates past two thirds of their life",
        ),
        JobSpec(
            "rotate-issuing-ca",
            _rotate_issuing_ca,
            dt.timedelta(hours=6),
            "replace an issuing CA that has used ca.issuing_rotate_at of its life",
        ),
        JobSpec(
            "expiry-scan",
            _expiry_scan,
            dt.timedelta(minutes=5),
            "notify (webhook, e-mail) of certificates near expiry that were not renewed",
        ),
        JobSpec(
            "reconcile-pending",
            _reconcile_pending,
            dt.timedelta(minutes=5),
            "revoke rows left pending past ca.pending_grace_seconds by an issuance that "
            "failed after its signature (database outage, crash), and fail the ACME orders "
            "whose finalize it interrupted",
        ),
        JobSpec(
            "purge",
            _purge,
            dt.timedelta(hours=1),
            "delete expired ACME orders, used nonces, and spent or expired enrolment tokens "
            "and device credentials",
        ),
    )
}


def _running(scheduler: Any) -> bool:
    """APScheduler 3 can lose its main thread to a job-store error while still saying it
    runs; a leader whose scheduler thread died stands down so another can take over."""
    thread = getattr(scheduler, "_thread", None)
    return bool(scheduler.running and thread is not None and thread.is_alive())


def instance_name(prefix: str = "") -> str:
    """``host:pid`` of this process (``prefix`` distinguishes CLI runs)."""
    return f"{prefix}{socket.gethostname()}:{os.getpid()}"


def run_job(pki: Pki, name: str, instance: str) -> tuple[str, dict[str, Any], str | None]:
    """Run job ``name`` once and record the run; (outcome, summary, error). Never raises
    for a failure of the job itself (it is recorded, and logged)."""
    spec = JOBS.get(name)
    if spec is None:
        raise InvalidInput(f"unknown job {name!r}; one of: {', '.join(JOBS)}")
    jobs = pki.store.jobs
    run_id = jobs.start_run(name, instance, pki.clock.now())
    try:
        summary = spec.run(pki)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.exception("job failed", extra={"job": name, "error": error})
        jobs.finish_run(run_id, pki.clock.now(), "error", {}, error)
        return "error", {}, error
    jobs.finish_run(run_id, pki.clock.now(), "ok", summary)
    if any(v for v in summary.values() if isinstance(v, int)):
        log.info("job done", extra={"job": name, **summary})
    return "ok", summary, None


# APScheduler stores a job as a reference to a module-level function: this one runs the
# named job on the core of the scheduler service that is active in this process.
_active: dict[str, Any] = {}


def scheduled(name: str) -> None:
    """Entry point of every stored APScheduler job."""
    pki, instance = _active.get("pki"), _active.get("instance")
    if pki is not None:
        run_job(pki, name, instance)


class SchedulerService(threading.Thread):
    """Becomes the scheduler when it gets the leader lock; runs until :meth:`stop`.
    ``on_leader(pki)`` starts whatever else only the leader runs and returns its stop."""

    def __init__(
        self,
        pki_factory: Callable[[], Pki],
        on_leader: Callable[[Pki], Callable[[], None]] | None = None,
        poll: float = LEADER_POLL_SECONDS,
    ) -> None:
        super().__init__(name="hsmca-scheduler", daemon=True)
        self._pki_factory = pki_factory
        self._on_leader = on_leader
        self._poll = poll
        self._stop_event = threading.Event()
        self.instance = instance_name()
        self.is_leader = threading.Event()

    def run(self) -> None:
        pki = self._pki_factory()
        lock = pki.store.leader_lock()
        scheduler = None
        self._stop_extra: Callable[[], None] | None = None
        try:
            while not self._stop_event.is_set():
                try:
                    if scheduler is None:
                        if lock.try_acquire():
                            scheduler = self._lead(pki)
                    elif not lock.still_held() or not _running(scheduler):
                        log.warning("lost the leader lock or the scheduler stopped; standing down")
                        self._stand_down(scheduler, lock)
                        scheduler = None
                except Exception:
                    log.exception("scheduler error; retrying")
                    self._stand_down(scheduler, lock)
                    scheduler = None
                self._stop_event.wait(self._poll)
        finally:
            self._stand_down(scheduler, lock)
            pki.close()

    def _stand_down(self, scheduler: Any, lock: Any) -> None:
        """Stop whatever runs as leader and release the lock (safe to call twice)."""
        self.is_leader.clear()
        if self._stop_extra is not None:
            with contextlib.suppress(Exception):
                self._stop_extra()
            self._stop_extra = None
        if scheduler is not None:
            with contextlib.suppress(Exception):
                scheduler.shutdown(wait=True)
        _active.clear()
        lock.release()

    def _lead(self, pki: Pki) -> Any:
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        log.info("this instance is the scheduler", extra={"instance": self.instance})
        _active.update(pki=pki, instance=self.instance)
        options: dict[str, Any] = {"pool_pre_ping": True}
        if pki.store.is_sqlite:
            options["connect_args"] = {"timeout": 30}  # waits for our writers, not 5 s
        store = SQLAlchemyJobStore(
            url=pki.store.url, tablename="apscheduler_jobs", engine_options=options
        )
        scheduler = BackgroundScheduler(
            jobstores={"default": store},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
            timezone=dt.UTC,
        )
        now = pki.clock.now()
        for spec in JOBS.values():
            scheduler.add_job(
                "pki.scheduler:scheduled",
                "interval",
                args=[spec.name],
                id=spec.name,
                name=spec.name,
                seconds=spec.interval.total_seconds(),
                next_run_time=now,  # every job runs once when an instance takes over
                replace_existing=True,
            )
        scheduler.start()
        self.is_leader.set()
        if self._on_leader is not None:
            self._stop_extra = self._on_leader(pki)
        return scheduler

    def stop(self) -> None:
        self._stop_event.set()
