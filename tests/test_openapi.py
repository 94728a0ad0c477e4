"""The OpenAPI document matches the routes, and the live server matches the document."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ca_service import create_app
from ca_service.openapi import document
from pki.service import Pki


def _flask_routes(pki: Pki) -> set[tuple[str, str]]:
    app = create_app(pki.settings.home, "https", pki=pki)
    routes = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1"):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    return routes


def test_every_route_is_documented_and_every_documented_route_exists(pki: Pki) -> None:
    documented = {(path, method) for path, ops in document()["paths"].items() for method in ops}
    assert _flask_routes(pki) == documented


def test_document_is_served(service) -> None:
    resp = service.session().get(f"{service.base}/api/v1/openapi.json", timeout=10)
    assert resp.status_code == 200
    assert resp.json()["openapi"] == "3.1.0"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(service, tmp_path) -> None:
    """Property-based run against the live server (bounded: 15 examples per operation)."""
    st = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [
            str(st),
            "run",
            f"{service.base}/api/v1/openapi.json",
            "-H",
            f"Authorization: Bearer {service.admin_token}",
            "--tls-verify",
            str(service.root),
            "-n",
            "15",
            "--seed",
            "7",
            "--request-timeout",
            "10",
            "--checks",
            "not_a_server_error,response_schema_conformance,"
            "status_code_conformance,content_type_conformance",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SCHEMATHESIS_HOOKS": ""},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
