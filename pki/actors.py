"""Who is asking: the authenticated caller of a use-case and what it may do."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

from pki.errors import Forbidden
from pki.policy import NamePolicy

ROLES = ("admin", "issuer", "auditor")


@dataclass(frozen=True)
class Actor:
    """An authenticated caller. ``profiles`` empty means every profile."""

    name: str
    role: str
    allowed_names: tuple[str, ...] = ("*",)
    profiles: tuple[str, ...] = ()
    max_ttl: dt.timedelta | None = None
    #: the single-use token this actor authenticated with; consumed by its first issuance
    single_use_token_id: int | None = None
    #: the one-time device enrolment credential this actor presented; consumed likewise
    enrollment_credential_id: int | None = None

    @functools.cached_property
    def name_policy(self) -> NamePolicy:
        return NamePolicy(self.allowed_names)

    def require_role(self, *roles: str) -> None:
        if self.role not in roles:
            raise Forbidden(f"role {self.role!r} may not do this (needs {' or '.join(roles)})")

    def may_use_profile(self, profile: str) -> bool:
        return not self.profiles or profile in self.profiles


def operator(name: str = "cli") -> Actor:
    """The local operator at the command line: full rights."""
    return Actor(name=f"operator:{name}", role="admin")


SYSTEM = Actor(name="system", role="admin")
