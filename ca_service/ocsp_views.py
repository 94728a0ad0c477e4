"""OCSP over HTTP (RFC 6960 appendix A, RFC 5019): POST and GET, cache headers."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, Response, request

from ca_service.context import core
from ca_service.problems import RETRY_AFTER_SECONDS
from pki.errors import HsmError
from pki.ocsp import MAX_REQUEST_BYTES, MalformedRequest, decode_get_path, error_response
from pki.store.faults import unavailable

ocsp = Blueprint("ocsp", __name__)
OCSP_RESPONSE = "application/ocsp-response"


def _answer(der: bytes) -> Response:
    try:
        result = core().ocsp_respond(der)
    except Exception as exc:  # the database or HSM is down: tryLater (RFC 6960 4.2.1)
        if not isinstance(exc, HsmError) and unavailable(exc) is None:
            raise
        resp = Response(error_response("try_later"), mimetype=OCSP_RESPONSE)
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return resp
    resp = Response(result.der, mimetype=OCSP_RESPONSE)
    resp.headers.extend(result.http_headers(dt.datetime.now(dt.UTC)))
    return resp


def _malformed() -> Response:
    resp = Response(error_response("malformed_request"), mimetype=OCSP_RESPONSE)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@ocsp.post("/ocsp")
@ocsp.post("/ocsp/")
def ocsp_post() -> Response:
    # read the raw stream ourselves: an oversized request is malformed, not a 413 page
    body = request.environ["wsgi.input"].read(MAX_REQUEST_BYTES + 1)
    if len(body) > MAX_REQUEST_BYTES:
        return _malformed()
    return _answer(body)


@ocsp.get("/ocsp/<path:encoded>")
def ocsp_get(encoded: str) -> Response:
    raw_path = request.environ.get("RAW_URI", "").split("?", 1)[0]
    if raw_path.startswith("/ocsp/"):
        encoded = raw_path[len("/ocsp/") :]  # keep %2F and '+' exactly as sent
    if len(encoded) > 2 * MAX_REQUEST_BYTES:
        return _malformed()
    try:
        der = decode_get_path(encoded)
    except MalformedRequest:
        return _malformed()
    return _answer(der)
