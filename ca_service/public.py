"""Unauthenticated documents: issuer certificates, CRLs, health and metrics."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ca_service import metrics
from ca_service.context import core

public = Blueprint("public", __name__)


@public.get("/ca/<issuer_id>.der")
def issuer_certificate(issuer_id: str) -> Response:
    der = core().issuer_der(issuer_id)
    resp = Response(der, mimetype="application/pkix-cert")
    resp.headers["Cache-Control"] = "public, max-age=3600"
    return resp


@public.get("/crl/<name>.crl")
def crl(name: str) -> Response:
    der = core().crl_document(name)
    resp = Response(der, mimetype="application/pkix-crl")
    resp.headers["Cache-Control"] = "public, max-age=60"
    return resp


@public.get("/healthz")
def healthz() -> tuple[Response, int]:
    checks = core().health()
    ok = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ok" if ok else "degraded", **checks}), 200 if ok else 503


@public.get("/metrics")
def prometheus() -> Response:
    from pki.monitoring import ca_state

    body, content_type = metrics.render(ca_state(core()))
    return Response(body, content_type=content_type)
