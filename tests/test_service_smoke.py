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
