"""RFC 9457 problem documents for every error the service returns."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, json, request
from werkzeug.exceptions import HTTPException

from pki import errors
from pki.store.faults import unavailable

PROBLEM_TYPE = "application/problem+json"
#: what a 503 (HSM or database unavailable) asks the client to wait before retrying
RETRY_AFTER_SECONDS = 2
log = logging.getLogger("hsmca.http")

_STATUS: list[tuple[type[errors.HsmcaError], int]] = [
    (errors.NotFound, 404),
    (errors.Unauthorised, 401),
    (errors.Forbidden, 403),
    (errors.Conflict, 409),
    (errors.InvalidInput, 400),
    (errors.PolicyError, 400),
    (errors.NotInitialised, 503),
    (errors.HsmError, 503),
    (errors.DatabaseUnavailable, 503),
    (errors.ConfigError, 500),
]


class ApiError(errors.HsmcaError):
    """An HTTP-level refusal raised by a view (bad JSON, wrong field type)."""

    def __init__(self, status: int, detail: str, kind: str = "invalid-request") -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind


def problem(
    status: int,
    title: str,
    detail: str,
    kind: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """A problem+json response; ``type`` is ``urn:hsmca:problem:<kind>``."""
    body = {
        "type": f"urn:hsmca:problem:{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    request_id = getattr(g, "request_id", None)
    if request_id:
        body["request_id"] = request_id
    resp = Response(json.dumps(body), status=status, mimetype=PROBLEM_TYPE)
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def status_for(exc: errors.HsmcaError) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def register(app: Flask) -> None:
    """Install handlers so that no error leaves as HTML or a stack trace."""

    @app.errorhandler(errors.HsmcaError)
    def _core(exc: errors.HsmcaError) -> Response:
        status = status_for(exc)
        headers = None
        if status == 401:
            headers = {"WWW-Authenticate": _challenge()}
        elif status == 503:
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        title = _TITLES.get(status, "Error")
        if status >= 500:
            log.error("request failed: %s", exc, extra={"kind": exc.kind})
        return problem(status, title, str(exc), exc.kind, headers)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        detail = exc.description or exc.name
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            detail = f"request body larger than {limit} bytes"
            drain_body()
        headers = {}
        if status == 405 and exc.response is None:
            allowed = getattr(exc, "valid_methods", None)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return problem(status, exc.name, detail, exc.name.lower().replace(" ", "-"), headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        fault = unavailable(exc)
        if fault is not None:
            return _core(fault)
        log.exception("unhandled error")
        return problem(500, "Internal Server Error", "an unexpected error occurred", "internal")


def _challenge() -> str:
    """The WWW-Authenticate challenge of a 401: EST devices answer Basic (RFC 7030 3.2.3)."""
    if request.path.startswith("/.well-known/est/"):
        return 'Basic realm="hsmca EST"'
    return 'Bearer realm="hsmca"'


DRAIN_LIMIT = 1 << 20


def drain_body() -> None:
    """Read (and drop) an unread body up to 1 MiB, so a keep-alive client can use the
    connection again after a 413; gunicorn would otherwise close it mid-stream. Only a
    body whose declared length is at most 1 MiB is drained: a larger or chunked one (whose
    sender may stall) is left for gunicorn to cut off with the connection."""
    stream = request.environ.get("wsgi.input")
    length = request.content_length
    if stream is None or length is None or length > DRAIN_LIMIT:
        return
    left = DRAIN_LIMIT
    try:
        while left > 0:
            chunk = stream.read(min(65536, left))
            if not chunk:
                break
            left -= len(chunk)
    except OSError:
        pass


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
