"""ACME errors (RFC 8555 section 6.7): one exception that the web layer turns into a
problem document with the ``urn:ietf:params:acme:error:`` type."""

from __future__ import annotations

from typing import Any

ERROR_PREFIX = "urn:ietf:params:acme:error:"

#: HTTP status for each error type; anything not listed is 400
STATUS: dict[str, int] = {
    "unauthorized": 403,
    "orderNotReady": 403,
    "rateLimited": 429,
    "serverInternal": 500,
    "accountDoesNotExist": 400,
    "notFound": 404,
    "conflict": 409,
    "alreadyReplaced": 409,
}


class AcmeProblem(Exception):
    """A refused ACME request. ``kind`` is the error type without its URN prefix
    (``notFound`` and ``conflict`` are sent as ``malformed`` with a 404 or 409)."""

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status or STATUS.get(kind, 400)
        self.headers = headers or {}
        self.extra = extra

    def document(self) -> dict[str, Any]:
        """The problem document (RFC 7807 fields plus any extra members)."""
        kind = "malformed" if self.kind in ("notFound", "conflict") else self.kind
        return {
            "type": ERROR_PREFIX + kind,
            "detail": self.detail,
            "status": self.status,
            **self.extra,
        }


def problem_json(kind: str, detail: str, status: int = 403) -> dict[str, Any]:
    """A problem document as stored in an order or a challenge."""
    return {"type": ERROR_PREFIX + kind, "detail": detail, "status": status}
