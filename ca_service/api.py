"""REST API v1 (CONTRACT.md): parse the request, call one use-case, format the record."""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, request

from ca_service import metrics
from ca_service.context import bearer_actor, core, peer_certificate
from ca_service.validation import Field, json_body, query_args
from pki.actors import Actor
from pki.durations import parse_duration
from pki.errors import Forbidden, Unauthorised
from pki.records import CertificateRecord, iso
from pki.service import IssueRequest
from pki.store import CertificateQuery

api = Blueprint("api", __name__, url_prefix="/api/v1")

ISSUE_FIELDS = (
    Field("csr", str, required=True),
    Field("profile", str),
    Field("ttl", str, max_length=32),
    Field("device_id", str, max_length=64),
)
REVOKE_FIELDS = (Field("reason", str, max_length=64),)
RENEW_FIELDS = (Field("csr", str),)


def _can_read(actor: Actor, record: CertificateRecord) -> bool:
    return actor.role in ("admin", "auditor") or record.requester == actor.name


@api.post("/certificates")
def issue_certificate() -> tuple[Response, int]:
    actor = bearer_actor()
    body = json_body(request, ISSUE_FIELDS)
    profile = body.get("profile") or core().settings.acme.default_profile
    ttl = parse_duration(body["ttl"]) if body.get("ttl") else None
    started = time.perf_counter()
    record = core().issue(IssueRequest(body["csr"], profile, ttl, body.get("device_id")), actor)
    metrics.ISSUANCE_SECONDS.observe(time.perf_counter() - started)
    metrics.ISSUED.labels(record.profile).inc()
    resp = jsonify(record.to_dict())
    resp.headers["Location"] = f"/api/v1/certificates/{record.serial}"
    return resp, 201


@api.get("/certificates")
def list_certificates() -> Response:
    actor = bearer_actor()
    args, limit = query_args(request, ("status", "expiring_within", "profile", "cursor"))
    expiring = args.get("expiring_within")
    query = CertificateQuery(
        status=args.get("status") or None,
        expiring_within=parse_duration(expiring) if expiring else None,
        profile=args.get("profile") or None,
        requester=None if actor.role in ("admin", "auditor") else actor.name,
        limit=limit,
        cursor=args.get("cursor") or None,
    )
    records, cursor = core().list_certificates(query)
    return jsonify({"items": [r.to_dict() for r in records], "next_cursor": cursor})


@api.get("/certificates/<serial>")
def get_certificate(serial: str) -> Response:
    actor = bearer_actor()
    record = core().show(serial)
    if not _can_read(actor, record):
        raise Forbidden(f"{actor.name} may not read {record.serial}")
    return jsonify(record.to_dict())


@api.post("/certificates/<serial>/revoke")
def revoke_certificate(serial: str) -> Response:
    actor = bearer_actor()
    body = json_body(request, REVOKE_FIELDS, optional=True)
    record = core().revoke(serial, body.get("reason"), actor)
    metrics.REVOKED.labels(record.profile).inc()
    return jsonify(record.to_dict())


@api.post("/certificates/renew")
def renew_certificate() -> tuple[Response, int]:
    der = peer_certificate()
    if der is None:
        core().audit_refusal("certificate.renew", None, "no client certificate")
        raise Unauthorised("renewal needs the current certificate as TLS client certificate")
    body = json_body(request, RENEW_FIELDS, optional=True)
    started = time.perf_counter()
    record = core().renew(der, body.get("csr"))
    metrics.ISSUANCE_SECONDS.observe(time.perf_counter() - started)
    metrics.ISSUED.labels(record.profile).inc()
    return jsonify(record.to_dict()), 201


@api.get("/ca")
def ca_info() -> Response:
    pki = core()
    root = pki.root_issuer()
    issuing = pki.issuing_issuer()
    from pki.records import pem_of

    issuers = [
        {
            "id": i.id,
            "kind": i.kind,
            "subject": i.subject,
            "active": i.active,
            "not_before": iso(i.not_before),
            "not_after": iso(i.not_after),
            "certificate": pem_of(i.der),
            "ca_issuers_url": pki.urls.ca_issuers(i.id),
            "crl_url": pki.urls.crl(i.id),
        }
        for i in pki.issuers().values()
    ]
    return jsonify(
        {
            "root": pem_of(root.der),
            "intermediate": pem_of(issuing.der),
            "chain": pki.chain_pem(issuing.id) + pem_of(root.der),
            "issuers": issuers,
            "ocsp_url": pki.urls.ocsp(),
            "profiles": {
                name: {
                    "default_ttl": str(pki.profiles.get(name).default_ttl),
                    "max_ttl": str(pki.profiles.get(name).max_ttl),
                }
                for name in pki.profiles.names()
            },
        }
    )


@api.get("/openapi.json")
def openapi() -> Response:
    from ca_service.openapi import document

    return jsonify(document())
