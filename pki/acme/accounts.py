"""ACME accounts: newAccount (with External Account Binding), update, deactivation,
key rollover (RFC 8555 7.3), and the EAB keys operators hand out."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pki.acme import jws
from pki.acme.problems import AcmeProblem
from pki.audit import AuditRecord
from pki.errors import Conflict, InvalidInput
from pki.policy import check_name_patterns
from pki.store.acme_models import AcmeAccount, AcmeEabKey

if TYPE_CHECKING:
    from pki.acme.service import Authenticated
    from pki.acme.urls import AcmeUrls
    from pki.actors import Actor
    from pki.clock import Clock
    from pki.config import AcmeSettings
    from pki.service import Pki
    from pki.store.acme_store import AcmeStore

MAX_CONTACTS = 10


@dataclass(frozen=True)
class CreatedEabKey:
    """A new EAB key: the HMAC key is shown once (base64url, as clients expect it).
    ``allowed_names`` and ``profiles`` limit the account it creates (empty: no limit)."""

    kid: str
    hmac_key: str
    name: str
    allowed_names: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()


class AccountsMixin:
    """Account use-cases of :class:`pki.acme.service.Acme`."""

    pki: Pki
    store: AcmeStore
    settings: AcmeSettings
    clock: Clock
    #: the profiles offered over ACME (:meth:`pki.acme.orders.OrdersMixin.profiles`)
    profiles: Callable[[], dict[str, str]]

    def new_account(
        self, auth: Authenticated, payload: dict[str, Any], urls: AcmeUrls
    ) -> tuple[AcmeAccount, bool]:
        """The account for the signing key, created if asked; (account, created)."""
        if auth.account is not None:
            if auth.account.status != "valid":
                raise AcmeProblem("unauthorized", f"the account is {auth.account.status}")
            return auth.account, False
        if payload.get("onlyReturnExisting") is True:
            raise AcmeProblem("accountDoesNotExist", "no account exists for this key")
        contact = _contacts(payload.get("contact", []))
        agreed = payload.get("termsOfServiceAgreed", False)
        if not isinstance(agreed, bool):
            raise AcmeProblem("malformed", "termsOfServiceAgreed must be a boolean")
        eab = payload.get("externalAccountBinding")
        bound = None
        if eab is not None:
            bound = self._check_eab(eab, auth.key, urls)
        elif self.settings.require_eab:
            raise AcmeProblem(
                "externalAccountRequired",
                "this CA requires external account binding: ask an operator for a key "
                "(`hsmca acme eab create`) and pass its key id and HMAC key to the client",
            )
        account = AcmeAccount(
            key_thumbprint=auth.key.thumbprint,
            jwk=auth.key.jwk,
            status="valid",
            contact=contact,
            tos_agreed=agreed,
            eab_kid=bound.kid if bound else None,
            # the EAB key's limits pass to its account (step-ca and EJBCA do likewise)
            allowed_names=list(bound.allowed_names or ()) if bound else None,
            profiles=list(bound.profiles or ()) if bound else None,
            created_at=self.clock.now(),
        )
        eab_kid = account.eab_kid
        record = AuditRecord(
            action="acme.account.create",
            actor="acme",
            details={
                "key_thumbprint": auth.key.thumbprint,
                "eab_kid": eab_kid,
                "allowed_names": account.allowed_names,
                "profiles": account.profiles,
            },
        )
        try:
            return self.store.create_account(account, record, eab_kid), True
        except Conflict as exc:
            existing = self.store.account_by_thumbprint(auth.key.thumbprint)
            if existing is not None and eab_kid is None:
                return existing, False  # a concurrent newAccount with the same key won
            raise AcmeProblem("unauthorized", str(exc)) from None

    def _check_eab(self, eab: Any, key: jws.AccountKey, urls: AcmeUrls) -> AcmeEabKey:
        inner = jws.parse_object(eab, inner=True)
        if not inner.alg.startswith("HS"):
            raise AcmeProblem("malformed", "externalAccountBinding must be signed with HS256")
        if inner.url != urls.new_account:
            raise AcmeProblem("unauthorized", "externalAccountBinding url is not newAccount")
        kid = inner.kid
        if not isinstance(kid, str):
            raise AcmeProblem("malformed", "externalAccountBinding has no kid")
        bound = jws.load_json(inner.payload, "the externalAccountBinding payload")
        if jws.account_key(bound).thumbprint != key.thumbprint:
            raise AcmeProblem("unauthorized", "externalAccountBinding binds a different key")
        stored = self.store.eab_key(kid)
        if stored is None or not jws.verify_hmac(inner, stored.hmac_key):
            raise AcmeProblem("unauthorized", "externalAccountBinding: unknown key id or bad MAC")
        if stored.used_at is not None:
            raise AcmeProblem("unauthorized", f"external account key {kid!r} was already used")
        return stored

    def update_account(
        self, auth: Authenticated, account_id: int, payload: dict[str, Any] | None
    ) -> AcmeAccount:
        """POST to the account URL: read (empty payload), new contacts, or deactivation."""
        account = self._own_account(auth, account_id)
        if not payload:
            return account
        changes: dict[str, Any] = {}
        if "contact" in payload:
            changes["contact"] = _contacts(payload["contact"])
        status = payload.get("status")
        if status is not None:
            if status != "deactivated":
                raise AcmeProblem("malformed", "an account's status can only become deactivated")
            changes["status"] = "deactivated"
        if not changes:
            return account
        action = "acme.account.deactivate" if "status" in changes else "acme.account.update"
        record = AuditRecord(
            action=action,
            actor=f"acme-account:{account.id}",
            subject=f"acme-account:{account.id}",
            details={"changed": sorted(changes)},
        )
        return self.store.update_account(account.id, changes, record)

    def change_key(
        self, auth: Authenticated, payload_jws: dict[str, Any], urls: AcmeUrls
    ) -> AcmeAccount:
        """keyChange (RFC 8555 7.3.5): the inner JWS, signed by the new key, names the
        account and its old key; 409 with the other account's URL if the new key is taken."""
        account = self._own_account(auth, auth.account.id if auth.account else -1)
        inner = jws.parse_object(payload_jws, inner=True)
        if inner.jwk is None or inner.kid is not None:
            raise AcmeProblem("malformed", "the inner keyChange JWS must carry the new key as jwk")
        if inner.url != urls.key_change:
            raise AcmeProblem("malformed", "the inner keyChange JWS url is not keyChange")
        new_key = jws.account_key(inner.jwk)
        jws.verify(inner, new_key)
        body = inner.payload_json()
        if body.get("account") != urls.account(account.id):
            raise AcmeProblem("malformed", "keyChange names another account")
        if jws.account_key(body.get("oldKey")).thumbprint != account.key_thumbprint:
            raise AcmeProblem("malformed", "keyChange oldKey is not the account's current key")
        other = self.store.account_by_thumbprint(new_key.thumbprint)
        if other is not None:
            raise AcmeProblem(
                "conflict",
                "the new key already belongs to an account",
                headers={"Location": urls.account(other.id)},
            )
        record = AuditRecord(
            action="acme.account.key_change",
            actor=f"acme-account:{account.id}",
            subject=f"acme-account:{account.id}",
            details={"key_thumbprint": new_key.thumbprint},
        )
        try:
            return self.store.update_account(
                account.id, {"key_thumbprint": new_key.thumbprint, "jwk": new_key.jwk}, record
            )
        except Conflict:
            raise AcmeProblem("conflict", "the new key already belongs to an account") from None

    def create_eab_key(
        self,
        name: str | None,
        actor: Actor,
        allowed_names: tuple[str, ...] = (),
        profiles: tuple[str, ...] = (),
    ) -> CreatedEabKey:
        """A new single-use External Account Binding key (the HMAC key is shown once).
        The account it creates may order only names matching ``allowed_names`` (the
        patterns of API tokens) and only ``profiles``; empty means no limit beyond
        ``acme.allowed_domains``. InvalidInput for a bad pattern or a profile not offered."""
        actor.require_role("admin")
        patterns = check_name_patterns(allowed_names)
        offered = self.profiles()
        for profile in profiles:
            if profile not in offered:
                raise InvalidInput(
                    f"profile {profile!r} is not offered over ACME; one of "
                    f"{', '.join(sorted(offered))}"
                )
        kinds = tuple(dict.fromkeys(profiles))
        kid = "eab_" + secrets.token_urlsafe(12)
        raw = os.urandom(32)
        label = name or kid
        key = AcmeEabKey(
            kid=kid,
            name=label,
            hmac_key=raw,
            created_at=self.clock.now(),
            allowed_names=list(patterns) or None,
            profiles=list(kinds) or None,
        )
        details = {"name": label, "allowed_names": list(patterns), "profiles": list(kinds)}
        self.store.add_eab_key(
            key,
            AuditRecord(action="acme.eab.create", actor=actor.name, subject=kid, details=details),
        )
        encoded = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return CreatedEabKey(kid, encoded, label, patterns, kinds)

    def _own_account(self, auth: Authenticated, account_id: int) -> AcmeAccount:
        if auth.account is None or auth.account.id != account_id:
            raise AcmeProblem("unauthorized", "the request is not signed by this account's key")
        return auth.account


def _contacts(raw: Any) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise AcmeProblem("malformed", "contact must be a list of strings")
    if len(raw) > MAX_CONTACTS:
        raise AcmeProblem("invalidContact", f"at most {MAX_CONTACTS} contacts")
    for contact in raw:
        if not contact.startswith("mailto:"):
            raise AcmeProblem("unsupportedContact", f"{contact!r}: only mailto: contacts")
        address = contact[len("mailto:") :]
        if "@" not in address or "," in address or "?" in address or len(address) > 254:
            raise AcmeProblem("invalidContact", f"{contact!r} is not a single email address")
    return list(raw)
