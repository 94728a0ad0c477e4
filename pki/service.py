"""Use-cases: one method per operation, called by the HTTP and CLI layers.

:class:`Pki` wires policy (RA), signer (CA), store (SA), HSM and audit together. It owns
no web or CLI concerns; it takes plain values and an :class:`~pki.actors.Actor`, and
returns records or raises :mod:`pki.errors`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pki.actors import ROLES, Actor
from pki.audit import AuditRecord, VerifyResult, verify_chain
from pki.clock import Clock, SystemClock
from pki.config import Settings, load_settings, resolve_home
from pki.errors import (
    Conflict,
    Forbidden,
    HsmcaError,
    InvalidInput,
    NameNotAllowed,
    NotFound,
    NotInitialised,
    PolicyError,
    Unauthorised,
)
from pki.hsm import Hsm
from pki.hsm_keys import hsm_private_key
from pki.policy import RequestedNames, classify_names, parse_csr, resolve_ttl
from pki.profiles import Profile, ProfileRegistry
from pki.records import CertificateRecord, pem_of
from pki.revocation import build_crl, parse_reason
from pki.serials import new_serial, parse_serial, serial_hex
from pki.signer import (
    CaUrls,
    EndEntityRequest,
    SigningIssuer,
    build_end_entity,
    end_entity_subject,
)
from pki.store import ApiToken, CertificateQuery, Issuer, Store

TOKEN_PREFIX = "hsmca_"


@dataclass(frozen=True)
class IssueRequest:
    """A request to issue from a CSR (PEM or DER)."""

    csr: str | bytes
    profile: str
    ttl: dt.timedelta | None = None
    device_id: str | None = None


@dataclass(frozen=True)
class CreatedToken:
    secret: str
    token: ApiToken


def token_digest(secret: str) -> str:
    """The stored form of a bearer token: SHA-256 hex (tokens are 256-bit random)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def spki_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


class Pki:
    """The core of one process: settings, store, HSM and clock, plus the use-cases."""

    def __init__(self, settings: Settings, store: Store, hsm: Hsm, clock: Clock) -> None:
        self.settings = settings
        self.store = store
        self.hsm = hsm
        self.clock = clock
        self.profiles = ProfileRegistry(settings)
        self.urls = CaUrls(settings.server.public_http_url)
        self._signers: dict[str, SigningIssuer] = {}
        self._chains: dict[str, str] = {}
        self._issuers: dict[str, Issuer] | None = None

    @classmethod
    def open(
        cls, home: str | Path | None = None, clock: Clock | None = None, upgrade: bool = True
    ) -> Pki:
        """Open an initialised home. Raises NotInitialised with a hint if it is not."""
        root = resolve_home(home)
        settings = load_settings(root)
        if not (root / "hsmca.toml").exists():
            raise NotInitialised(f"{root} is not initialised: run `hsmca init --home {root}`")
        return cls.from_settings(settings, clock, upgrade)

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: Clock | None = None, upgrade: bool = True
    ) -> Pki:
        clock = clock or SystemClock()
        store = Store(settings.database.url, clock)
        if upgrade:
            store.upgrade()
        hsm = Hsm(
            settings.hsm.module,
            settings.hsm.token_label,
            settings.hsm_pin,
            settings.hsm.softhsm2_conf or None,
        )
        return cls(settings, store, hsm, clock)

    def close(self) -> None:
        self.hsm.close()
        self.store.dispose()

    # -- issuers ---------------------------------------------------------------------------

    def issuers(self, refresh: bool = False) -> dict[str, Issuer]:
        if self._issuers is None or refresh:
            self._issuers = {i.id: i for i in self.store.issuers()}
            self._signers.clear()
            self._chains.clear()
        return self._issuers

    def root_issuer(self) -> Issuer:
        roots = [i for i in self.issuers().values() if i.kind == "root" and i.active]
        if not roots:
            raise NotInitialised("no root CA: run `hsmca init`")
        return roots[-1]

    def issuing_issuer(self, issuer_id: str | None = None) -> Issuer:
        """The issuer ``issuer_id`` or the newest active intermediate."""
        issuers = self.issuers()
        if issuer_id:
            if issuer_id not in issuers:
                raise NotFound(f"no issuer {issuer_id!r}")
            return issuers[issuer_id]
        active = [i for i in issuers.values() if i.kind == "intermediate" and i.active]
        if not active:
            raise NotInitialised("no issuing CA: run `hsmca init`")
        return active[-1]

    def signer(self, issuer_id: str) -> SigningIssuer:
        """The issuer ready to sign (its HSM key handle cached for the process)."""
        if issuer_id not in self._signers:
            issuer = self.issuers()[issuer_id]
            self._signers[issuer_id] = SigningIssuer(
                id=issuer.id,
                certificate=x509.load_der_x509_certificate(issuer.der),
                key=hsm_private_key(self.hsm, issuer.key_label),
            )
        return self._signers[issuer_id]

    def chain_pem(self, issuer_id: str) -> str:
        """PEM of the issuing CA up to, not including, the root (leaf-to-root order)."""
        if issuer_id not in self._chains:
            issuers = self.issuers()
            parts: list[str] = []
            current = issuers.get(issuer_id)
            while current is not None and current.kind != "root":
                parts.append(pem_of(current.der))
                current = issuers.get(current.parent_id) if current.parent_id else None
            self._chains[issuer_id] = "".join(parts)
        return self._chains[issuer_id]

    # -- issuance --------------------------------------------------------------------------

    def issue(self, request: IssueRequest, actor: Actor) -> CertificateRecord:
        """Issue from a CSR after policy checks; the row is committed before the HSM signs."""
        try:
            parsed = parse_csr(request.csr, self.settings.policy)
        except PolicyError as exc:
            self._refused(actor, "certificate.issue", None, str(exc))
            raise
        device_id = request.device_id or (
            parsed.subject_serial or parsed.common_name
            if self.profiles.get(request.profile).device
            else None
        )
        return self.issue_for_key(
            parsed.public_key,
            parsed.names,
            parsed.common_name,
            request.profile,
            request.ttl,
            actor,
            device_id,
        )

    def issue_for_key(
        self,
        public_key: object,
        names: RequestedNames,
        common_name: str | None,
        profile_name: str,
        ttl: dt.timedelta | None,
        actor: Actor,
        device_id: str | None = None,
    ) -> CertificateRecord:
        """Issue for a checked public key and names (the CSR-less path used by ``init``)."""
        try:
            profile = self.profiles.get(profile_name)
            names = self._names_for(profile, names, device_id)
            self._authorise_issue(actor, profile, names)
            lifetime = resolve_ttl(profile, ttl, actor.max_ttl)
        except (PolicyError, Forbidden) as exc:
            self._refused(actor, "certificate.issue", None, str(exc))
            raise
        issuer = self.signer(self.issuing_issuer(profile.issuer or None).id)
        now = self.clock.now()
        not_before = now - dt.timedelta(seconds=self.settings.ca.backdate_seconds)
        not_before = max(not_before, issuer.certificate.not_valid_before_utc)
        not_after = min(now + lifetime, issuer.certificate.not_valid_after_utc)
        if not_after <= now:
            raise PolicyError("the issuing CA expires before this certificate would start")
        subject = end_entity_subject(names, common_name, device_id if profile.device else None)
        spki = spki_der(public_key)
        serial = self._reserve_serial(
            {
                "issuer_id": issuer.id,
                "subject": subject.rfc4514_string(),
                "common_name": _cn(subject),
                "sans": names.tagged(),
                "profile": profile.name,
                "requester": actor.name,
                "public_key_sha256": hashlib.sha256(spki).hexdigest(),
                "spki": spki,
                "not_before": not_before.replace(microsecond=0),
                "not_after": not_after.replace(microsecond=0),
            }
        )
        request = EndEntityRequest(
            serial=int(serial, 16),
            subject=subject,
            names=names,
            public_key=public_key,
            not_before=not_before.replace(microsecond=0),
            not_after=not_after.replace(microsecond=0),
            profile=profile,
        )
        certificate = build_end_entity(issuer, request, self.urls)
        self.store.complete_issuance(
            serial,
            certificate.public_bytes(Encoding.DER),
            AuditRecord(
                action="certificate.issue",
                actor=actor.name,
                subject=serial,
                details={
                    "profile": profile.name,
                    "names": names.all(),
                    "issuer": issuer.id,
                    "not_after": request.not_after.isoformat(),
                },
            ),
        )
        return CertificateRecord(
            serial=serial,
            issuer_id=issuer.id,
            subject=subject.rfc4514_string(),
            sans=names.tagged(),
            profile=profile.name,
            requester=actor.name,
            status="good",
            not_before=request.not_before,
            not_after=request.not_after,
            revoked_at=None,
            revocation_reason=None,
            certificate_pem=certificate.public_bytes(Encoding.PEM).decode(),
            chain_pem=self.chain_pem(issuer.id),
        )

    def _names_for(
        self, profile: Profile, names: RequestedNames, device_id: str | None
    ) -> RequestedNames:
        if not profile.device:
            if not names.all():
                raise PolicyError("the request names no DNS name, IP address or URI")
            return names
        if not device_id:
            raise PolicyError(
                "the device profile needs a device id (CSR subject serialNumber or CN)"
            )
        if len(device_id) > 64 or not device_id.isprintable() or "/" in device_id:
            raise PolicyError(f"invalid device id {device_id!r}")
        uri = self.settings.ca.device_uri_template.format(device_id=device_id)
        dns = tuple(n for n in names.dns if n != device_id.lower())
        uris = tuple(dict.fromkeys((uri, *names.uris)))
        return RequestedNames(dns, names.ips, uris)

    def _authorise_issue(self, actor: Actor, profile: Profile, names: RequestedNames) -> None:
        actor.require_role("admin", "issuer")
        if not actor.may_use_profile(profile.name):
            raise Forbidden(f"{actor.name} may not issue profile {profile.name!r}")
        try:
            actor.name_policy.check(names)
        except NameNotAllowed as exc:
            raise Forbidden(str(exc)) from None

    def _reserve_serial(self, values: dict[str, object]) -> str:
        for _ in range(5):
            serial = serial_hex(new_serial())
            try:
                self.store.insert_pending(dict(values, serial=serial))
                return serial
            except Conflict:
                continue
        raise HsmcaError("could not allocate a unique serial number")

    def _refused(self, actor: Actor, action: str, subject: str | None, why: str) -> None:
        self.store.audit(
            AuditRecord(
                action=action,
                actor=actor.name,
                subject=subject,
                outcome="refused",
                details={"reason": why[:500]},
            )
        )

    # -- reading ---------------------------------------------------------------------------

    def show(self, serial: str) -> CertificateRecord:
        row = self.store.certificate(parse_serial(serial))
        return CertificateRecord.from_row(row, self.clock.now(), self.chain_pem(row.issuer_id))

    def list_certificates(
        self, query: CertificateQuery
    ) -> tuple[list[CertificateRecord], str | None]:
        if query.status not in (None, "pending", "good", "revoked", "expired"):
            raise InvalidInput(
                f"unknown status {query.status!r}; one of pending, good, revoked, expired"
            )
        if not 1 <= query.limit <= 1000:
            raise InvalidInput("limit must be between 1 and 1000")
        page = self.store.list_certificates(query)
        now = self.clock.now()
        return (
            [CertificateRecord.from_row(r, now, self.chain_pem(r.issuer_id)) for r in page.items],
            page.next_cursor,
        )

    # -- revocation ------------------------------------------------------------------------

    def revoke(self, serial: str, reason: str | None, actor: Actor) -> CertificateRecord:
        """Revoke a certificate (admin, or the issuer token that requested it)."""
        canonical = parse_serial(serial)
        reason_name = parse_reason(reason)
        row = self.store.certificate(canonical)
        if actor.role != "admin" and not (actor.role == "issuer" and row.requester == actor.name):
            self._refused(actor, "certificate.revoke", canonical, "not allowed")
            raise Forbidden(f"{actor.name} may not revoke {canonical}")
        now = self.clock.now()
        self.store.revoke(
            canonical,
            reason_name,
            now,
            AuditRecord(
                action="certificate.revoke",
                actor=actor.name,
                subject=canonical,
                details={"reason": reason_name},
            ),
        )
        return self.show(canonical)

    def reconcile_pending(self, grace: dt.timedelta | None = None) -> list[str]:
        """Revoke rows left ``pending`` by an interrupted issuance (maybe signed, never
        stored): a known, revoked row is safe whichever side of the HSM call the crash was."""
        if grace is None:
            grace = dt.timedelta(seconds=self.settings.ca.pending_grace_seconds)
        done = []
        for row in self.store.pending_before(self.clock.now() - grace):
            try:
                self.store.revoke(
                    row.serial,
                    "cessationOfOperation",
                    self.clock.now(),
                    AuditRecord(
                        action="certificate.reconcile",
                        actor="system",
                        subject=row.serial,
                        details={"was": "pending", "now": "revoked"},
                    ),
                )
                done.append(row.serial)
            except Conflict:
                continue
        return done

    def build_crl(self, issuer_id: str, validity: dt.timedelta = dt.timedelta(days=1)) -> bytes:
        """A fresh full CRL (DER) for ``issuer_id`` with the next CRL number."""
        now = self.clock.now().replace(microsecond=0)
        number = self.store.next_crl_number(issuer_id)
        crl = build_crl(
            self.signer(issuer_id),
            self.store.revoked_entries(issuer_id, now),
            number,
            now,
            now + validity,
        )
        return crl.public_bytes(Encoding.DER)

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
    ) -> CreatedToken:
        """Create a bearer token; the secret is returned once and only its hash stored."""
        actor.require_role("admin")
        if role not in ROLES:
            raise InvalidInput(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        for p in profiles:
            self.profiles.get(p)
        if allowed_names:
            for pattern in allowed_names:
                probe = pattern.replace("*.", "x.", 1) if pattern.startswith("*.") else pattern
                if pattern != "*" and "/" not in pattern and ":" not in pattern:
                    classify_names([probe])
        now = self.clock.now()
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        name = name or f"{role}-{secrets.token_hex(4)}"
        token = ApiToken(
            name=name,
            role=role,
            token_sha256=token_digest(secret),
            allowed_names=list(allowed_names or (("*",) if role != "issuer" else ())),
            profiles=list(profiles),
            max_ttl_seconds=None,
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
        )

    def list_tokens(self) -> list[ApiToken]:
        """Every token (hashes only; secrets are never stored)."""
        return self.store.tokens()

    def revoke_token(self, name: str, actor: Actor) -> ApiToken:
        actor.require_role("admin")
        return self.store.revoke_token(
            name, AuditRecord(action="token.revoke", actor=actor.name, subject=name)
        )

    # -- audit -----------------------------------------------------------------------------

    def verify_audit(self) -> VerifyResult:
        return verify_chain(self.store.audit_events())


def _cn(subject: x509.Name) -> str | None:
    attrs = subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None
