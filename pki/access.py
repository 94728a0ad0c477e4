"""Bearer tokens: creation, authentication, revocation. Only their SHA-256 is stored."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pki.actors import ROLES, Actor
from pki.audit import AuditRecord
from pki.errors import InvalidInput, Unauthorised
from pki.policy import check_name_patterns
from pki.store import ApiToken

if TYPE_CHECKING:
    from pki.clock import Clock
    from pki.profiles import ProfileRegistry
    from pki.store import Store

TOKEN_PREFIX = "hsmca_"


@dataclass(frozen=True)
class CreatedToken:
    secret: str
    token: ApiToken


def token_digest(secret: str) -> str:
    """The stored form of a bearer token: SHA-256 hex (tokens are 256-bit random)."""
    return hashlib.sha256(secret.encode()).hexdigest()


class AccessMixin:
    """Token use-cases of :class:`pki.service.Pki`."""

    store: Store
    clock: Clock
    profiles: ProfileRegistry

    # -- tokens ----------------------------------------------------------------------------

    def create_token(
        self,
        role: str,
        name: str | None,
        actor: Actor,
        allowed_names: tuple[str, ...] = (),
        profiles: tuple[str, ...] = (),
        ttl: dt.timedelta | None = None,
        single_use: bool = False,
        max_ttl: dt.timedelta | None = None,
    ) -> CreatedToken:
        """Create a bearer token; the secret is returned once and only its hash stored."""
        actor.require_role("admin")
        if role not in ROLES:
            raise InvalidInput(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        for p in profiles:
            self.profiles.get(p)
        check_name_patterns(allowed_names)
        now = self.clock.now()
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        name = name or f"{role}-{secrets.token_hex(4)}"
        token = ApiToken(
            name=name,
            role=role,
            token_sha256=token_digest(secret),
            allowed_names=list(allowed_names or (("*",) if role != "issuer" else ())),
            profiles=list(profiles),
            max_ttl_seconds=int(max_ttl.total_seconds()) if max_ttl else None,
            single_use=single_use,
            expires_at=(now + ttl) if ttl else None,
            created_at=now,
        )
        if role == "issuer" and not token.allowed_names:
            raise InvalidInput("an issuer token needs --allowed-names (e.g. '*.svc.internal')")
        self.store.add_token(
            token,
            AuditRecord(
                action="token.create",
                actor=actor.name,
                subject=name,
                details={
                    "role": role,
                    "allowed_names": token.allowed_names,
                    "profiles": token.profiles,
                    "single_use": single_use,
                },
            ),
        )
        return CreatedToken(secret, token)

    def authenticate_token(self, secret: str) -> Actor:
        """The actor for a bearer token, or Unauthorised (expired, revoked, unknown)."""
        row = self.store.token_by_digest(token_digest(secret))
        if row is None or not hmac.compare_digest(row.token_sha256, token_digest(secret)):
            raise Unauthorised("invalid bearer token")
        now = self.clock.now()
        if row.revoked_at is not None or (row.expires_at and row.expires_at <= now):
            raise Unauthorised("bearer token expired or revoked")
        if row.single_use and row.used_at is not None:
            raise Unauthorised("single-use token already used")
        return Actor(
            name=f"token:{row.name}",
            role=row.role,
            allowed_names=tuple(row.allowed_names),
            profiles=tuple(row.profiles),
            max_ttl=dt.timedelta(seconds=row.max_ttl_seconds) if row.max_ttl_seconds else None,
            single_use_token_id=row.id if row.single_use else None,
        )

    def list_tokens(self) -> list[ApiToken]:
        """Every token (hashes only; secrets are never stored)."""
        return self.store.tokens()

    def revoke_token(self, name: str, actor: Actor) -> ApiToken:
        actor.require_role("admin")
        return self.store.revoke_token(
            name, AuditRecord(action="token.revoke", actor=actor.name, subject=name)
        )
