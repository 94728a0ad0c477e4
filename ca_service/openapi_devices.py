"""The device routes' part of the OpenAPI document (``/api/v1/devices``)."""

from __future__ import annotations

from typing import Any

from ca_service.openapi_parts import PAGE, REVOKE_BODY, json_response, problems

DEVICE_ID = {
    "name": "device_id",
    "in": "path",
    "required": True,
    "description": "device id (1-64 characters of A-Z a-z 0-9 . : -)",
    "schema": {"type": "string", "maxLength": 64},
}

_DATE = {"type": ["string", "null"], "format": "date-time"}


def device_paths() -> dict[str, Any]:
    """The ``/api/v1/devices`` paths."""
    return {
        "/api/v1/devices/enroll": {
            "post": {
                "operationId": "enrollDevice",
                "summary": "Enrol a device with its one-time enrolment credential",
                "description": "Authorization: Bearer <enrolment secret> (or Basic "
                "DEVICE_ID:SECRET, or an IDevID client certificate). The credential is "
                "consumed only when the certificate is issued.",
                "security": [{"enrolmentCredential": []}, {"mutualTLS": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/DeviceEnrollRequest"}
                        }
                    },
                },
                "responses": {
                    "201": json_response("Certificate", "the device certificate"),
                    **problems(400, 401, 403, 413, 415),
                },
            }
        },
        "/api/v1/devices": {
            "get": {
                "operationId": "listDevices",
                "summary": "The device inventory (admin or auditor)",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": ["provisioned", "enrolled", "revoked"],
                        },
                    },
                    *PAGE,
                ],
                "responses": {
                    "200": json_response("DeviceList", "one page of devices"),
                    **problems(400, 401, 403),
                },
            }
        },
        "/api/v1/devices/{device_id}": {
            "get": {
                "operationId": "getDevice",
                "parameters": [DEVICE_ID],
                "responses": {
                    "200": json_response("Device", "the device and its certificates"),
                    **problems(401, 403, 404),
                },
            }
        },
        "/api/v1/devices/{device_id}/revoke": {
            "post": {
                "operationId": "revokeDevice",
                "summary": "Revoke a device and every certificate it holds (admin)",
                "parameters": [DEVICE_ID],
                "requestBody": REVOKE_BODY,
                "responses": {
                    "200": json_response("Device", "the revoked device"),
                    **problems(400, 401, 403, 404, 413, 415),
                },
            }
        },
    }


DEVICE_SCHEMAS: dict[str, Any] = {
    "DeviceEnrollRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["csr"],
        "properties": {
            "csr": {"type": "string", "description": "PKCS#10 PEM"},
            "device_id": {"type": "string", "maxLength": 64},
        },
    },
    "Device": {
        "type": "object",
        "required": ["device_id", "status", "created_at"],
        "properties": {
            "device_id": {"type": "string"},
            "status": {"type": "string", "enum": ["provisioned", "enrolled", "revoked"]},
            "created_at": {"type": "string", "format": "date-time"},
            "enrolled_at": _DATE,
            "enrolled_via": {"type": ["string", "null"]},
            "last_reenrolled_at": _DATE,
            "current_serial": {"type": ["string", "null"]},
            "revoked_at": _DATE,
            "certificates": {"type": "array", "items": {"type": "object"}},
        },
    },
    "DeviceList": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
}
