"""Use-cases: one method per operation, called by the HTTP and CLI layers.

:class:`Pki` wires policy (RA), signer (CA), store (SA), HSM and audit together. It owns
no web or CLI concerns; it takes plain values and an :class:`~pki.actors.Actor`, and
returns records or raises :mod:`pki.errors`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
)

from pki.access import AccessMixin, CreatedToken, token_digest
from pki.actors import SYSTEM, Actor
from pki.audit import AuditRecord, VerifyResult, verify_chain
from pki.clock import Clock, SystemClock
from pki.config import Settings, load_settings, resolve_home
from pki.devices import DevicesMixin, check_device_id
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
from pki.ocsp import OcspResult
from pki.policy import RequestedNames, parse_csr, resolve_ttl
from pki.profiles import Profile, ProfileRegistry
from pki.publishing import PublishingMixin
from pki.records import CertificateRecord, pem_of
from pki.renewal import RenewalMixin
from pki.revocation import parse_reason
from pki.serials import new_serial, parse_serial, serial_hex
from pki.signer import (
    CaUrls,
    EndEntityRequest,
    SigningIssuer,
    build_end_entity,
    end_entity_subject,
    spki_der,
)
from pki.store import CertificateQuery, Issuer, Store
from pki.store.claims import SingleUseClaim
from pki.store.device_store import DeviceNote

#: how often a process re-reads the issuers (to see a rotation done by another process)
ISSUER_REFRESH_SECONDS = 30.0


@dataclass(frozen=True)
class IssueRequest:
    """A request to issue from a CSR (PEM or DER)."""

    csr: str | bytes
    profile: str
    ttl: dt.timedelta | None = None
    device_id: str | None = None


class Pki(AccessMixin, RenewalMixin, DevicesMixin, PublishingMixin):
    """The core of one process: settings, store, HSM and clock, plus the use-cases."""

    def __init__(self, settings: Settings, store: Store, hsm: Hsm, clock: Clock) -> None:
        self.settings = settings
        self.store = store
        self.hsm = hsm
        self.clock = clock
        self.profiles = ProfileRegistry(settings)
        self.urls = CaUrls(settings.server.public_http_url, settings.crl.shards)
        self._signers: dict[str, SigningIssuer] = {}
        self._chains: dict[str, str] = {}
        self._publishing_init()
        self._issuers: dict[str, Issuer] | None = None
        self._issuers_read = 0.0

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
        """The issuers by id. Re-read every :data:`ISSUER_REFRESH_SECONDS` (another
        process may have rotated the issuing CA); the caches built on them are dropped only
        when something changed."""
        now = time.monotonic()
        if self._issuers is None or refresh or now - self._issuers_read > ISSUER_REFRESH_SECONDS:
            fresh = {i.id: i for i in self.store.issuers()}
            self._issuers_read = now
            if (
                refresh
                or self._issuers is None
                or _issuer_state(fresh) != _issuer_state(self._issuers)
            ):
                self._signers.clear()
                self._chains.clear()
                self._responders.clear()
                self._ocsp_hashes = None
            self._issuers = fresh
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
            profile = self.profiles.get(request.profile)
            parsed = parse_csr(request.csr, self.settings.policy, not profile.device)
        except PolicyError as exc:
            self._refused(actor, "certificate.issue", None, str(exc))
            raise
        device_id = request.device_id or (
            parsed.subject_serial or parsed.common_name if profile.device else None
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
        action: str = "certificate.issue",
        details: dict[str, object] | None = None,
        via: str = "api",
    ) -> CertificateRecord:
        """Issue for a checked public key and names (the CSR-less path used by ``init``).
        ``via`` says how a device asked (``credential``, ``idevid``, ``api``, ``renewal``)."""
        try:
            profile = self.profiles.get(profile_name)
            names = self._names_for(profile, names, device_id)
            self._authorise_issue(actor, profile, names)
            lifetime = resolve_ttl(profile, ttl, actor.max_ttl)
            subject = end_entity_subject(names, common_name, device_id if profile.device else None)
            if profile.device and self.store.devices.status(device_id or "") == "revoked":
                raise Forbidden(f"device {device_id} is revoked and cannot enrol again")
        except (PolicyError, Forbidden) as exc:
            self._refused(actor, action, device_id, str(exc))
            raise
        issuer = self.signer(self.issuing_issuer(profile.issuer or None).id)
        now = self.clock.now()
        not_before = now - dt.timedelta(seconds=self.settings.ca.backdate_seconds)
        not_before = max(not_before, issuer.certificate.not_valid_before_utc)
        not_after = min(now + lifetime, issuer.certificate.not_valid_after_utc)
        if not_after <= now:
            raise PolicyError("the issuing CA expires before this certificate would start")
        spki = spki_der(public_key)
        subject_text = subject.rfc4514_string()
        claim = _claim_of(actor)
        serial = self._reserve_serial(
            claim,
            {
                "issuer_id": issuer.id,
                "subject": subject_text,
                "common_name": _cn(subject),
                "sans": names.tagged(),
                "profile": profile.name,
                "requester": actor.name,
                "public_key_sha256": hashlib.sha256(spki).hexdigest(),
                "spki": spki,
                "not_before": not_before.replace(microsecond=0),
                "not_after": not_after.replace(microsecond=0),
                "device_id": device_id if profile.device else None,
            },
            actor,
            action,
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
        record = AuditRecord(
            action=action,
            actor=actor.name,
            subject=serial,
            details={
                "profile": profile.name,
                "names": names.all(),
                "issuer": issuer.id,
                "not_after": request.not_after.isoformat(),
                **(details or {}),
            },
        )
        note = DeviceNote(device_id, via) if profile.device and device_id else None
        try:
            der = build_end_entity(issuer, request, self.urls).public_bytes(Encoding.DER)
            device_status = self.store.complete_issuance(serial, der, record, note)
        except Exception as exc:
            if claim is not None:  # nothing was handed out: the secret may be used again
                self.store.claims.release(claim)
            if (
                isinstance(exc, Conflict)
                and note is not None
                and self.store.devices.status(note.device_id) == "revoked"
            ):  # the device's revocation reached the pending row first
                raise Forbidden(f"device {device_id} is revoked and cannot enrol again") from None
            raise
        if device_status == "revoked":
            # revoked while this certificate was being signed (the revocation could not
            # see the row in time): it is revoked before anyone receives it
            self.revoke(serial, "cessationOfOperation", SYSTEM)
            raise Forbidden(f"device {device_id} is revoked and cannot enrol again")
        return CertificateRecord(
            serial=serial,
            issuer_id=issuer.id,
            subject=subject_text,
            sans=names.tagged(),
            profile=profile.name,
            requester=actor.name,
            status="good",
            not_before=request.not_before,
            not_after=request.not_after,
            revoked_at=None,
            revocation_reason=None,
            certificate_pem=pem_of(der),
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
        check_device_id(device_id, PolicyError)
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

    def _reserve_serial(
        self, claim: SingleUseClaim | None, values: dict[str, object], actor: Actor, action: str
    ) -> str:
        """Commit the pending row under a fresh serial, spending ``claim`` with it."""
        for _ in range(5):
            number = new_serial()
            serial = serial_hex(number)
            try:
                self.store.insert_pending(
                    dict(values, serial=serial, crl_shard=self.urls.shard_of(number)), claim
                )
                return serial
            except Conflict:
                continue
            except Unauthorised as exc:
                self._refused(actor, action, None, str(exc))
                raise
        raise HsmcaError("could not allocate a unique serial number")

    def audit_refusal(
        self, action: str, subject: str | None, why: str, actor: str = "anonymous"
    ) -> None:
        """Record a refused request (failed authentication, forbidden operation)."""
        self._refused(Actor(name=actor, role="none"), action, subject, why)

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

    def revoke(
        self,
        serial: str,
        reason: str | None,
        actor: Actor,
        invalidity_date: dt.datetime | None = None,
    ) -> CertificateRecord:
        """Revoke a certificate (admin, or the issuer token that requested it). Its OCSP
        responses are re-signed at once; CRLs follow within the debounce interval."""
        canonical = parse_serial(serial)
        reason_name = parse_reason(reason)
        row = self.store.certificate(canonical)
        if actor.role != "admin" and not (actor.role == "issuer" and row.requester == actor.name):
            self._refused(actor, "certificate.revoke", canonical, "not allowed")
            raise Forbidden(f"{actor.name} may not revoke {canonical}")
        now = self.clock.now()
        if invalidity_date is not None and invalidity_date > now:
            raise InvalidInput("invalidity_date must not be in the future")
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
            invalidity_date,
        )
        issuer = self.issuers().get(row.issuer_id)
        if issuer is not None and issuer.ocsp_serial:
            self.presign_ocsp(row.issuer_id, [canonical])
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

    # -- service information ---------------------------------------------------------------

    def health(self) -> dict[str, str]:
        """Check the database and the HSM (the issuing key is reachable)."""
        status: dict[str, str] = {}
        try:
            self.store.ping()
            status["database"] = "ok"
        except Exception as exc:
            status["database"] = f"error: {type(exc).__name__}"
        try:
            issuer = self.issuing_issuer()
            self.hsm.public_key(issuer.key_label)
            status["hsm"] = "ok" if self.hsm.has_key(issuer.key_label) else "key missing"
        except HsmcaError as exc:
            status["hsm"] = f"error: {exc.kind}"
        return status

    def issuer_der(self, issuer_id: str) -> bytes:
        """The DER certificate of issuer ``issuer_id`` (the AIA caIssuers document)."""
        issuer = self.issuers().get(issuer_id) or self.issuers(refresh=True).get(issuer_id)
        if issuer is None:
            raise NotFound(f"no issuer {issuer_id!r}")
        return issuer.der

    # -- audit -----------------------------------------------------------------------------

    def verify_audit(self) -> VerifyResult:
        return verify_chain(self.store.audit_events())


def _issuer_state(issuers: dict[str, Issuer]) -> set[tuple[str, bool, str | None]]:
    return {(i.id, i.active, i.ocsp_serial) for i in issuers.values()}


def _claim_of(actor: Actor) -> SingleUseClaim | None:
    """The single-use secret ``actor`` authenticated with, spent by its first issuance."""
    if actor.single_use_token_id is not None:
        return SingleUseClaim("token", actor.single_use_token_id)
    if actor.enrollment_credential_id is not None:
        return SingleUseClaim("credential", actor.enrollment_credential_id)
    return None


def _cn(subject: x509.Name) -> str | None:
    attrs = subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


__all__ = ["CreatedToken", "IssueRequest", "OcspResult", "Pki", "spki_der", "token_digest"]
