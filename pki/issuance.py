"""Issuance: the RA's checks, lint before sign, record before sign, the HSM signature.

:class:`IssuanceMixin` is the issuing part of :class:`pki.service.Pki`: every way in (REST,
ACME, EST, the CLI, renewal) ends in :meth:`IssuanceMixin.issue_for_key`, which decides
(policy, authorisation), lints the to-be-signed certificate, commits the pending row,
has the HSM sign and stores the result.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.actors import SYSTEM, Actor
from pki.audit import AuditRecord
from pki.devices import check_device_id
from pki.errors import (
    Conflict,
    Forbidden,
    HsmcaError,
    HsmError,
    NameNotAllowed,
    PolicyError,
    Unauthorised,
)
from pki.lint import Expectations, LintFailed, lint_before_sign, refusing
from pki.policy import RequestedNames, parse_csr, resolve_ttl
from pki.profiles import Profile
from pki.records import CertificateRecord, pem_of
from pki.serials import new_serial, serial_hex
from pki.signer import (
    EndEntityRequest,
    SigningIssuer,
    end_entity_builder,
    end_entity_subject,
    sign_end_entity,
    signature_hash,
    spki_der,
)
from pki.store.claims import SingleUseClaim
from pki.store.device_store import DeviceNote

if TYPE_CHECKING:
    from pki.clock import Clock
    from pki.config import Settings
    from pki.profiles import ProfileRegistry
    from pki.signer import CaUrls
    from pki.store import Store


@dataclass(frozen=True)
class IssueRequest:
    """A request to issue from a CSR (PEM or DER)."""

    csr: str | bytes
    profile: str
    ttl: dt.timedelta | None = None
    device_id: str | None = None


class IssuanceMixin:
    """Issuance use-cases of :class:`pki.service.Pki`."""

    settings: Settings
    store: Store
    clock: Clock
    profiles: ProfileRegistry
    urls: CaUrls

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
        request = EndEntityRequest(
            serial=new_serial(),
            subject=subject,
            names=names,
            public_key=public_key,
            not_before=not_before.replace(microsecond=0),
            not_after=not_after.replace(microsecond=0),
            profile=profile,
        )
        tbs = end_entity_builder(issuer, request, self.urls)
        self._lint(tbs, issuer, request, device_id, actor, action)
        spki = spki_der(public_key)
        subject_text = subject.rfc4514_string()
        claim = _claim_of(actor)
        serial = self._reserve_serial(
            request.serial,
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
        if int(serial, 16) != request.serial:  # the first serial was taken: lint again
            request = replace(request, serial=int(serial, 16))
            tbs = end_entity_builder(issuer, request, self.urls)
            try:
                self._lint(tbs, issuer, request, device_id, actor, action)
            except LintFailed:
                self.store.abort_pending(serial, None, claim)  # the refusal is audited
                raise
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
            der = sign_end_entity(issuer, tbs).public_bytes(Encoding.DER)
        except HsmError as exc:
            # the HSM returned no certificate: nothing exists that anyone could hold
            self.store.abort_pending(serial, _failed(actor, action, serial, exc), claim)
            raise
        try:
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

    def _lint(
        self,
        tbs: x509.CertificateBuilder,
        issuer: SigningIssuer,
        request: EndEntityRequest,
        device_id: str | None,
        actor: Actor,
        action: str,
    ) -> None:
        """Lint before sign (``ca.lint_before_sign``): refuse and audit on an ERROR."""
        if not self.settings.ca.lint_before_sign:
            return
        expected = Expectations(
            issuer=issuer.certificate,
            profile=request.profile,
            names=request.names,
            device_id=device_id if request.profile.device else None,
            max_lifetime=request.profile.max_ttl
            + dt.timedelta(seconds=self.settings.ca.backdate_seconds),
        )
        found = lint_before_sign(tbs, issuer.key, signature_hash(issuer.key), expected)
        refused = refusing(found)
        if refused:
            failure = LintFailed(refused)
            self._refused(
                actor,
                action,
                None,
                str(failure),
                lint=[f.code for f in refused],
                names=request.names.all(),
            )
            raise failure

    def _reserve_serial(
        self,
        first: int,
        claim: SingleUseClaim | None,
        values: dict[str, object],
        actor: Actor,
        action: str,
    ) -> str:
        """Commit the pending row under ``first`` (else a fresh serial), spending
        ``claim`` with it."""
        number = first
        for _ in range(5):
            serial = serial_hex(number)
            try:
                self.store.insert_pending(
                    dict(values, serial=serial, crl_shard=self.urls.shard_of(number)), claim
                )
                return serial
            except Conflict:
                number = new_serial()
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

    def _refused(
        self, actor: Actor, action: str, subject: str | None, why: str, **details: object
    ) -> None:
        self.store.audit(
            AuditRecord(
                action=action,
                actor=actor.name,
                subject=subject,
                outcome="refused",
                details={"reason": why[:500], **details},
            )
        )


def _failed(actor: Actor, action: str, serial: str, exc: HsmcaError) -> AuditRecord:
    """The audit event of an issuance the HSM could not sign."""
    return AuditRecord(
        action=action,
        actor=actor.name,
        subject=serial,
        outcome="failed",
        details={"reason": str(exc)[:500], "kind": exc.kind},
    )


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
