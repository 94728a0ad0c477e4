"""What the metrics endpoint reports about the CA's state (read at scrape time)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pki.service import Pki

#: the expiry windows reported per profile
EXPIRY_WINDOWS = {
    "1h": dt.timedelta(hours=1),
    "24h": dt.timedelta(hours=24),
    "7d": dt.timedelta(days=7),
    "30d": dt.timedelta(days=30),
}


@dataclass(frozen=True)
class CaState:
    """Gauges: certificates expiring per (profile, window); seconds until the earliest
    expiry of an active CA certificate; age of the newest CRL; pre-signed OCSP
    responses past their nextUpdate; when each job last succeeded (Unix time)."""

    expiring: dict[tuple[str, str], int]
    ca_seconds_left: float
    newest_crl_age_seconds: float | None
    stale_ocsp_responses: int
    job_last_success: dict[str, float]


def ca_state(pki: Pki) -> CaState:
    now = pki.clock.now()
    lifecycle = pki.store.lifecycle
    in_use = [i for i in pki.issuers().values() if i.active]  # a retired CA is no alarm
    earliest = min((i.not_after for i in in_use), default=now)
    built = lifecycle.newest_crl_built_at()
    return CaState(
        expiring=lifecycle.expiring_counts(now, EXPIRY_WINDOWS),
        ca_seconds_left=(earliest - now).total_seconds(),
        newest_crl_age_seconds=(now - built).total_seconds() if built else None,
        stale_ocsp_responses=lifecycle.stale_ocsp_responses(now),
        job_last_success={job: at.timestamp() for job, at in pki.store.jobs.last_success().items()},
    )
