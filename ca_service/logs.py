"""JSON structured logs, one line per event, each request with an id."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from flask import Flask, Response, g, request

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access_log = logging.getLogger("hsmca.access")


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
        return json.dumps(data, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Send every hsmca log line to stderr as JSON (idempotent)."""
    root = logging.getLogger("hsmca")
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.Formatter.converter = time.gmtime
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def install_request_ids(app: Flask) -> None:
    """Give each request an id (``X-Request-Id`` kept when sane) and log it when done."""

    @app.before_request
    def _start() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()

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
