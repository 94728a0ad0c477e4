"""The real service starts, answers health checks and issues over HTTPS."""

from __future__ import annotations


def test_issue_over_https(service, make_csr) -> None:
    s = service.session(service.admin_token)
    resp = s.post(
        f"{service.base}/api/v1/certificates",
        json={"csr": make_csr().decode(), "profile": "mtls-server"},
        timeout=10,
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    got = s.get(f"{service.base}/api/v1/certificates/{body['serial']}", timeout=10)
    assert got.json()["status"] == "good"


def test_serve_runs_with_the_configured_number_of_workers(fresh_home) -> None:
    """``init`` writes ``server.workers`` (two per core by default) and ``serve`` without
    ``--workers`` uses it: a default made by a factory was once read back as a string."""
    from pki.config import default_workers, load_settings
    from tests.conftest import RunningService

    workers = load_settings(fresh_home).server.workers
    assert isinstance(workers, int) and workers == default_workers()
    running = RunningService(fresh_home, workers=None)
    try:
        running.wait_ready()
        resp = running.session().get(f"{running.base}/healthz", timeout=10)
        assert resp.status_code == 200, resp.text
    finally:
        assert running.stop() == 0, running.log.read_text()[-2000:]
