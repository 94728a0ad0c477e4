"""JSON structured logs, one line per event, each request with an id."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
import uuid

from flask import Flask, Response, g, request

from pki.config import Settings
from pki.errors import HsmcaError

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access_log = logging.getLogger("hsmca.access")
debug_log = logging.getLogger("hsmca.http.debug")

#: secrets with a recognisable shape: API tokens, device credentials, PEM private keys
_SECRET_SHAPES = re.compile(
    r"\bhsmcad?_[A-Za-z0-9_-]{16,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
    re.DOTALL,
)
#: headers whose values are credentials: never logged, at any level
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_known_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """A secret without a recognisable shape (the HSM PIN) that logs must never show
    (shorter than 8 characters it would mask ordinary words and numbers)."""
    if len(value) >= 8:
        _known_secrets.add(value)
        _known_secrets.add(json.dumps(value)[1:-1])  # as it appears inside a JSON log line


def register_settings_secrets(settings: Settings) -> None:
    """Register the secrets the settings lead to (the HSM user PIN)."""
    with contextlib.suppress(HsmcaError, OSError):
        register_secret(settings.hsm_pin())


def redact(text: str) -> str:
    """``text`` with every secret shape and registered secret replaced by [redacted]."""
    text = _SECRET_SHAPES.sub("[redacted]", text)
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return text


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object; ``extra`` fields are included."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._skip and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(data, default=str))


def configure_logging(level: str = "info") -> None:
    """Send every hsmca log line to stderr as JSON, at ``level`` (``server.log_level``);
    the handler is installed once, the level set on every call."""
    root = logging.getLogger("hsmca")
    root.setLevel(level.upper())
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.Formatter.converter = time.gmtime
    root.addHandler(handler)
    root.propagate = False


def install_request_ids(app: Flask) -> None:
    """Give each request an id (``X-Request-Id`` kept when sane) and log it when done."""

    @app.before_request
    def _start() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()
        if debug_log.isEnabledFor(logging.DEBUG):
            debug_log.debug(
                "request received",
                extra={
                    "request_id": g.request_id,
                    "method": request.method,
                    "path": request.path,
                    "query": request.query_string.decode("latin-1")[:512],
                    "headers": {
                        k: "[redacted]" if k.lower() in _SECRET_HEADERS else v[:256]
                        for k, v in request.headers.items()
                    },
                    "content_length": request.content_length,
                },
            )

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        actor = g.get("actor")
        access_log.info(
            "request",
            extra={
                "request_id": g.get("request_id"),
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": round(elapsed * 1000, 2),
                "remote": request.remote_addr,
                "actor": actor.name if actor is not None else None,
            },
        )
        return response
