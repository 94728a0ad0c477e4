"""Prometheus metrics. In multi-process mode (``PROMETHEUS_MULTIPROC_DIR`` set by
``hsmca serve``) every worker writes its own files and ``/metrics`` aggregates them."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

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
REVOKED = Counter("hsmca_certificates_revoked_total", "Certificates revoked", ["profile"])
HSM_SIGN_SECONDS = Histogram(
    "hsmca_hsm_sign_seconds",
    "Latency of one HSM signature",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)


def render() -> tuple[bytes, str]:
    """The exposition text for this process, or aggregated over all workers."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
