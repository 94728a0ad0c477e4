"""The OpenAPI 3.1 document of REST API v1 (served at ``/api/v1/openapi.json``).

Written by hand and kept honest by tests: every route of the ``api`` blueprint must be
described here and vice versa, and schemathesis checks the live server against it.
"""

from __future__ import annotations

from typing import Any

from ca_service.openapi_devices import DEVICE_SCHEMAS, device_paths
from ca_service.openapi_parts import PAGE, REVOKE_BODY, json_response, problems
from pki.revocation import REASONS

SERIAL = {
    "name": "serial",
    "in": "path",
    "required": True,
    "description": "serial number, lower-case hex",
    "schema": {"type": "string", "pattern": "^[0-9a-fA-F:]{1,64}$"},
}

_CERTIFICATE: dict[str, Any] = {
    "type": "object",
    "required": [
        "serial",
        "issuer_id",
        "subject",
        "sans",
        "profile",
        "requester",
        "status",
        "not_before",
        "not_after",
        "revoked_at",
        "revocation_reason",
        "certificate",
        "chain",
    ],
    "properties": {
        "serial": {"type": "string", "pattern": "^[0-9a-f]+$"},
        "issuer_id": {"type": "string"},
        "subject": {"type": "string"},
        "sans": {"type": "array", "items": {"type": "string"}},
        "profile": {"type": "string"},
        "requester": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "good", "revoked", "expired"]},
        "not_before": {"type": "string", "format": "date-time"},
        "not_after": {"type": "string", "format": "date-time"},
        "revoked_at": {"type": ["string", "null"], "format": "date-time"},
        "revocation_reason": {"type": ["string", "null"]},
        "certificate": {"type": ["string", "null"], "description": "PEM"},
        "chain": {"type": "string", "description": "PEM, issuing CA up to the root (excl.)"},
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI document as a dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hsmca REST API",
            "version": "1",
            "description": "Issue, inspect, revoke and renew certificates of an HSM-backed CA.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/certificates": {
                "post": {
                    "operationId": "issueCertificate",
                    "summary": "Issue a certificate from a CSR",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/IssueRequest"}
                            }
                        },
                    },
                    "responses": {
                        "201": json_response("Certificate", "the issued certificate"),
                        **problems(400, 401, 403, 413, 415, 503),
                    },
                },
                "get": {
                    "operationId": "listCertificates",
                    "summary": "List certificates (issuers see their own)",
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": ["pending", "good", "revoked", "expired"],
                            },
                        },
                        {
                            "name": "expiring_within",
                            "in": "query",
                            "schema": {"type": "string", "pattern": "^[0-9]+[smhdw]$"},
                        },
                        {"name": "profile", "in": "query", "schema": {"type": "string"}},
                        *PAGE,
                    ],
                    "responses": {
                        "200": json_response("CertificateList", "one page"),
                        **problems(400, 401),
                    },
                },
            },
            "/api/v1/certificates/{serial}": {
                "get": {
                    "operationId": "getCertificate",
                    "parameters": [SERIAL],
                    "responses": {
                        "200": json_response("Certificate", "the certificate and its status"),
                        **problems(400, 401, 403, 404),
                    },
                }
            },
            "/api/v1/certificates/{serial}/revoke": {
                "post": {
                    "operationId": "revokeCertificate",
                    "parameters": [SERIAL],
                    "requestBody": REVOKE_BODY,
                    "responses": {
                        "200": json_response("Certificate", "the revoked certificate"),
                        **problems(400, 401, 403, 404, 409, 413, 415),
                    },
                }
            },
            "/api/v1/certificates/renew": {
                "post": {
                    "operationId": "renewCertificate",
                    "summary": "Renew the TLS client certificate of this connection",
                    "security": [{"mutualTLS": []}],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/RenewRequest"}
                            }
                        },
                    },
                    "responses": {
                        "201": json_response("Certificate", "the new certificate"),
                        **problems(400, 401, 403, 413, 415),
                    },
                }
            },
            **device_paths(),
            "/api/v1/ca": {
                "get": {
                    "operationId": "getCa",
                    "security": [],
                    "responses": {"200": json_response("CaInfo", "CA certificates and URLs")},
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "this document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "mutualTLS": {"type": "mutualTLS"},
                "enrolmentCredential": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "IssueRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["csr"],
                    "properties": {
                        "csr": {"type": "string", "description": "PKCS#10 PEM"},
                        "profile": {"type": "string", "default": "mtls-server"},
                        "ttl": {"type": "string", "pattern": "^[0-9]+[smhdw]$"},
                        "device_id": {"type": "string", "maxLength": 64},
                    },
                },
                "RevokeRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"reason": {"type": "string", "enum": list(REASONS)}},
                },
                "RenewRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"csr": {"type": "string"}},
                },
                "Certificate": _CERTIFICATE,
                **DEVICE_SCHEMAS,
                "CertificateList": {
                    "type": "object",
                    "required": ["items", "next_cursor"],
                    "properties": {
                        "items": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Certificate"},
                        },
                        "next_cursor": {"type": ["string", "null"]},
                    },
                },
                "CaInfo": {
                    "type": "object",
                    "required": ["root", "intermediate", "chain", "issuers", "ocsp_url"],
                    "properties": {
                        "root": {"type": "string"},
                        "intermediate": {"type": "string"},
                        "chain": {"type": "string"},
                        "issuers": {"type": "array", "items": {"type": "object"}},
                        "ocsp_url": {"type": "string"},
                        "profiles": {"type": "object"},
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "request_id": {"type": "string"},
                    },
                },
            },
        },
    }
