"""``/api/v1/devices``: REST enrolment with a one-time credential, and the inventory."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from ca_service import metrics
from ca_service.context import bearer_actor, core, tls_unique
from ca_service.est import device_auth
from ca_service.validation import Field, json_body, query_args

devices = Blueprint("devices", __name__, url_prefix="/api/v1/devices")

ENROLL_FIELDS = (Field("csr", str, required=True), Field("device_id", str, max_length=64))
REVOKE_FIELDS = (Field("reason", str, max_length=64),)


@devices.post("/enroll")
def enroll() -> tuple[Response, int]:
    """``Authorization: Bearer <enrolment secret>`` (or Basic, or an IDevID) and
    ``{"csr": PEM, "device_id"?: ID}`` → 201 with the certificate record."""
    auth = device_auth()
    body = json_body(request, ENROLL_FIELDS)
    record = core().enroll_device(body["csr"], auth, tls_unique(), body.get("device_id"))
    metrics.DEVICE_ENROLMENTS.labels("api", auth.method).inc()
    metrics.ISSUED.labels(record.profile).inc()
    resp = jsonify({**record.to_dict(), "device_id": auth.device_id})
    resp.headers["Location"] = f"/api/v1/certificates/{record.serial}"
    return resp, 201


@devices.get("")
def list_devices() -> Response:
    actor = bearer_actor()
    args, limit = query_args(request, ("status", "cursor"))
    records, cursor = core().list_devices(
        actor, args.get("status") or None, limit, args.get("cursor") or None
    )
    return jsonify({"items": [r.to_dict() for r in records], "next_cursor": cursor})


@devices.get("/<device_id>")
def show_device(device_id: str) -> Response:
    return jsonify(core().show_device(device_id, bearer_actor()).to_dict())


@devices.post("/<device_id>/revoke")
def revoke_device(device_id: str) -> Response:
    actor = bearer_actor()
    body = json_body(request, REVOKE_FIELDS, optional=True)
    return jsonify(core().revoke_device(device_id, body.get("reason"), actor).to_dict())
