"""Fragments the OpenAPI document's modules share: problem and JSON responses,
pagination parameters, the revocation request body."""

from __future__ import annotations

from typing import Any

PROBLEM = {"$ref": "#/components/schemas/Problem"}

#: the query parameters of every paginated listing
PAGE = [
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
    },
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
]

#: the optional body of a revocation (certificate or device)
REVOKE_BODY = {
    "required": False,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RevokeRequest"}}},
}


def problems(*codes: int) -> dict[str, Any]:
    """Responses ``codes``, each a problem document (RFC 9457)."""
    return {
        str(code): {
            "description": "problem document (RFC 9457)",
            "content": {"application/problem+json": {"schema": PROBLEM}},
        }
        for code in codes
    }


def json_response(schema_name: str, description: str) -> dict[str, Any]:
    """A 2xx response whose JSON body is the component schema ``schema_name``."""
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
        },
    }
