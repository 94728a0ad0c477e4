"""Prometheus metrics. In multi-process mode (``PROMETHEUS_MULTIPROC_DIR`` set by
``hsmca serve``) every worker writes its own files and ``/metrics`` aggregates them."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from pki.monitoring import CaState

REQUESTS = Counter(
    "hsmca_http_requests_total", "HTTP requests by route and status", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "hsmca_http_request_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ISSUANCE_SECONDS = Histogram(
    "hsmca_issuance_seconds",
    "Latency of issuing one certificate (policy, store, sign)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
ISSUED = Counter("hsmca_certificates_issued_total", "Certificates issued", ["profile"])
DEVICE_ENROLMENTS = Counter(
    "hsmca_device_enrolments_total",
    "Device certificates issued through EST or the devices API",
    ["route", "method"],
)
REVOKED = Counter("hsmca_certificates_revoked_total", "Certificates revoked", ["profile"])
HSM_SIGN_SECONDS = Histogram(
    "hsmca_hsm_sign_seconds",
    "Latency of one HSM signature",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)


class CaStateCollector:
    """Gauges of the CA's state, read from the database when scraped."""

    def __init__(self, state: CaState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.state
        expiring = GaugeMetricFamily(
            "hsmca_certificates_expiring",
            "Good certificates expiring within the window, by profile",
            labels=["profile", "window"],
        )
        for (profile, window), count in sorted(s.expiring.items()):
            expiring.add_metric([profile, window], count)
        yield expiring
        yield GaugeMetricFamily(
            "hsmca_ca_certificate_seconds_to_expiry",
            "Seconds until the earliest expiry of a CA certificate in use",
            value=s.ca_seconds_left,
        )
        if s.newest_crl_age_seconds is not None:
            yield GaugeMetricFamily(
                "hsmca_crl_age_seconds", "Age of the newest CRL", value=s.newest_crl_age_seconds
            )
        yield GaugeMetricFamily(
            "hsmca_ocsp_responses_stale",
            "Pre-signed OCSP responses past their nextUpdate",
            value=s.stale_ocsp_responses,
        )
        jobs = GaugeMetricFamily(
            "hsmca_job_last_success_timestamp_seconds",
            "When each scheduled job last succeeded",
            labels=["job"],
        )
        for job, at in sorted(s.job_last_success.items()):
            jobs.add_metric([job], at)
        yield jobs


def render(state: CaState | None = None) -> tuple[bytes, str]:
    """The exposition text for this process, or aggregated over all workers, plus the
    CA-state gauges when ``state`` is given."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    text = generate_latest(registry)
    if state is not None:
        extra = CollectorRegistry()
        extra.register(CaStateCollector(state))
        text += generate_latest(extra)
    return text, CONTENT_TYPE_LATEST
