"""Strict JSON bodies: known fields only, right types, a clear message naming the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Request, current_app

from ca_service.problems import ApiError


@dataclass(frozen=True)
class Field:
    name: str
    type: type
    required: bool = False
    max_length: int = 65536


def query_args(request: Request, allowed: tuple[str, ...]) -> tuple[dict[str, str], int]:
    """The query parameters (400 for unknown ones) and the page ``limit`` (default 100)."""
    args = request.args
    unknown = sorted(set(args) - set(allowed) - {"limit"})
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}", "unknown-field")
    try:
        limit = int(args.get("limit", "100"))
    except ValueError:
        raise ApiError(400, "query parameter 'limit' must be an integer", "wrong-type") from None
    return {k: v for k, v in args.items() if k != "limit"}, limit


def raw_body(request: Request) -> bytes:
    """The request body; 413 when it is over ``server.max_body_bytes`` (also when it
    came without a Content-Length)."""
    raw = request.get_data(cache=True)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    # werkzeug stops a body without Content-Length at the limit instead of refusing it
    if (
        limit
        and request.content_length is None
        and len(raw) >= limit
        and request.environ["wsgi.input"].read(1)
    ):
        raise ApiError(413, f"request body larger than {limit} bytes", "content-too-large")
    return raw


def json_body(
    request: Request, fields: tuple[Field, ...], optional: bool = False
) -> dict[str, Any]:
    """Parse the request body as a JSON object with exactly ``fields``."""
    raw = raw_body(request)
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "request body must be a JSON object")
    mimetype = request.mimetype or ""
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(
            415, f"expected Content-Type application/json, got {mimetype}", "unsupported-media-type"
        )
    try:
        data = request.get_json(force=True, silent=False)
    except Exception:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    known = {f.name: f for f in fields}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ApiError(
            400,
            f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(known)}",
            "unknown-field",
        )
    for f in fields:
        if f.name not in data or data[f.name] is None:
            if f.required:
                raise ApiError(400, f"field '{f.name}' is required", "missing-field")
            continue
        value = data[f.name]
        if not isinstance(value, f.type) or (isinstance(value, bool) and f.type is not bool):
            raise ApiError(400, f"field '{f.name}' must be a {_TYPE_NAMES[f.type]}", "wrong-type")
        if isinstance(value, str) and len(value) > f.max_length:
            raise ApiError(400, f"field '{f.name}' is too long", "too-long")
    return data


_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object"}
