"""Exceptions raised by the core. Each carries a message safe to show a user.

The HTTP layer maps them onto problem documents and the CLI onto usage errors, so the
message must never contain a secret (PIN, token, key material).
"""

from __future__ import annotations


class HsmcaError(Exception):
    """Base class of every error the core raises on purpose."""

    #: short machine-readable kind, used as the problem ``type`` suffix
    kind = "error"


class ConfigError(HsmcaError):
    kind = "config"


class NotInitialised(HsmcaError):
    kind = "not-initialised"


class HsmError(HsmcaError):
    kind = "hsm"


class HsmModuleNotFound(HsmError):
    kind = "hsm-module-not-found"


class HsmTokenNotFound(HsmError):
    kind = "hsm-token-not-found"


class HsmWrongPin(HsmError):
    kind = "hsm-wrong-pin"


class HsmKeyNotFound(HsmError):
    kind = "hsm-key-not-found"


class HsmSessionLost(HsmError):
    kind = "hsm-session-lost"


class HsmUnavailable(HsmError):
    """The token cannot be reached now; the process keeps trying to reconnect."""

    kind = "hsm-unavailable"


class DatabaseUnavailable(HsmcaError):
    """The database cannot be reached, or stayed locked longer than allowed."""

    kind = "database-unavailable"


class PolicyError(HsmcaError):
    """A request the policy refuses: bad CSR, name not allowed, TTL too long."""

    kind = "policy"


class BadCsr(PolicyError):
    kind = "bad-csr"


class NameNotAllowed(PolicyError):
    kind = "name-not-allowed"


class UnknownProfile(PolicyError):
    kind = "unknown-profile"


class BadDuration(PolicyError):
    kind = "bad-duration"


class NotFound(HsmcaError):
    kind = "not-found"


class Conflict(HsmcaError):
    kind = "conflict"


class Unauthorised(HsmcaError):
    kind = "unauthorised"


class Forbidden(HsmcaError):
    kind = "forbidden"


class InvalidInput(HsmcaError):
    """A malformed argument: bad cursor, unknown reason, wrong type."""

    kind = "invalid-input"
