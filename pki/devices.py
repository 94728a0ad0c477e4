"""Device enrolment use-cases: one-time enrolment credentials (one or in bulk), enrolment
and re-enrolment (EST and REST share them), IDevID authentication, and the inventory."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hmac
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509

from pki.access import token_digest
from pki.actors import Actor
from pki.audit import AuditRecord
from pki.durations import parse_duration
from pki.errors import (
    Conflict,
    Forbidden,
    HsmcaError,
    InvalidInput,
    PolicyError,
    Unauthorised,
)
from pki.est import challenge_password, tls_unique_password
from pki.manufacturer import ManufacturerTrust, issued_by
from pki.policy import ParsedCsr, RequestedNames, parse_csr
from pki.records import CertificateRecord, iso
from pki.revocation import parse_reason
from pki.store.device_store import NewCredential

if TYPE_CHECKING:
    from pki.clock import Clock
    from pki.config import Settings
    from pki.profiles import ProfileRegistry
    from pki.store import Store

CREDENTIAL_PREFIX = "hsmcad_"
#: device ids must fit a subject serialNumber (PrintableString) and a URN unescaped
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,63}")
#: credentials committed (and audited) per transaction when provisioning in bulk
PROVISION_CHUNK = 5000
MAX_CREDENTIAL_TTL = dt.timedelta(days=366)


def check_device_id(device_id: str, error: type[HsmcaError] = InvalidInput) -> str:
    """``device_id`` if it can be a subject serialNumber and part of a URI; else
    ``error`` with the rule."""
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise error(
            f"invalid device id {device_id!r}: it becomes the subject serialNumber and a URI, "
            "so use 1-64 characters of A-Z a-z 0-9 . : - starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class EnrollmentCredential:
    """A one-time enrolment secret, shown once; only its SHA-256 is stored."""

    device_id: str
    secret: str
    expires_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "secret": self.secret,
            "expires_at": iso(self.expires_at),
        }


@dataclass(frozen=True)
class DeviceAuth:
    """Who an enrolling device proved to be, and how (``credential`` or ``idevid``)."""

    device_id: str
    method: str
    credential_id: int | None = None


@dataclass(frozen=True)
class DeviceRecord:
    """A device of the inventory, with its certificates when asked for one device."""

    device_id: str
    status: str  # provisioned | enrolled | revoked
    created_at: dt.datetime
    enrolled_at: dt.datetime | None
    enrolled_via: str | None
    last_reenrolled_at: dt.datetime | None
    current_serial: str | None
    revoked_at: dt.datetime | None
    certificates: tuple[CertificateRecord, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "device_id": self.device_id,
            "status": self.status,
            "created_at": iso(self.created_at),
            "enrolled_at": iso(self.enrolled_at),
            "enrolled_via": self.enrolled_via,
            "last_reenrolled_at": iso(self.last_reenrolled_at),
            "current_serial": self.current_serial,
            "revoked_at": iso(self.revoked_at),
        }
        if self.certificates:
            data["certificates"] = [c.to_dict(with_pem=False) for c in self.certificates]
        return data


class DevicesMixin:
    """Device use-cases of :class:`pki.service.Pki`."""

    settings: Settings
    store: Store
    clock: Clock
    profiles: ProfileRegistry

    # -- credentials -----------------------------------------------------------------------

    def create_enrollment_credential(
        self, device_id: str, ttl: dt.timedelta | None, actor: Actor
    ) -> EnrollmentCredential:
        """One single-use enrolment credential bound to ``device_id``."""
        return next(self.provision_devices([device_id], ttl, actor))[0]

    def provision_devices(
        self, device_ids: Sequence[str], ttl: dt.timedelta | None, actor: Actor
    ) -> Iterator[list[EnrollmentCredential]]:
        """Credentials for many devices, yielded a committed chunk at a time. Every id is
        checked first (valid, not repeated, device not revoked): bad input stores nothing."""
        actor.require_role("admin")
        ids = list(device_ids)
        if not ids:
            raise InvalidInput("no device ids given")
        seen: set[str] = set()
        for position, device_id in enumerate(ids, 1):
            try:
                check_device_id(device_id)
            except InvalidInput as exc:
                raise InvalidInput(f"device {position}: {exc}") from None
            if device_id in seen:
                raise InvalidInput(f"device {position}: device id {device_id!r} is repeated")
            seen.add(device_id)
        revoked = self.store.devices.revoked_among(ids)
        if revoked:
            raise InvalidInput(
                f"{len(revoked)} device(s) are revoked and cannot enrol again: "
                f"{', '.join(revoked[:5])}"
            )
        lifetime = ttl if ttl is not None else parse_duration(self.settings.devices.credential_ttl)
        if not dt.timedelta(minutes=1) <= lifetime <= MAX_CREDENTIAL_TTL:
            raise InvalidInput("an enrolment credential lives between 1m and 366d")
        return self._provision(ids, self.clock.now() + lifetime, actor)

    def _provision(
        self, ids: list[str], expires_at: dt.datetime, actor: Actor
    ) -> Iterator[list[EnrollmentCredential]]:
        expires_at = expires_at.replace(microsecond=0)
        for start in range(0, len(ids), PROVISION_CHUNK):
            chunk = ids[start : start + PROVISION_CHUNK]
            made = [
                EnrollmentCredential(i, CREDENTIAL_PREFIX + secrets.token_urlsafe(32), expires_at)
                for i in chunk
            ]
            self.store.devices.add_credentials(
                [NewCredential(c.device_id, token_digest(c.secret)) for c in made],
                expires_at,
                actor.name,
                AuditRecord(
                    action="device.credential.create",
                    actor=actor.name,
                    subject=chunk[0] if len(chunk) == 1 else None,
                    details={"count": len(chunk), "devices": chunk, "expires_at": iso(expires_at)},
                ),
            )
            yield made

    # -- authentication --------------------------------------------------------------------

    @functools.cached_property
    def manufacturers(self) -> ManufacturerTrust:
        """The manufacturer CAs whose IDevIDs may enrol (none unless configured)."""
        return ManufacturerTrust(self.settings.manufacturer_ca_path)

    def authenticate_device_secret(self, secret: str, device_id: str | None = None) -> DeviceAuth:
        """The device a one-time credential belongs to; Unauthorised (and audited) when it
        is unknown, used, expired, or bound to a device other than ``device_id``."""
        if device_id is not None and not DEVICE_ID.fullmatch(device_id):
            # never audited as given: it may be a secret sent in the wrong place
            self.audit_refusal("device.enroll", None, "malformed device id")
            raise Unauthorised("malformed device id (expected DEVICE_ID:SECRET)")
        # looked up by the digest of a 256-bit secret: there is nothing to time
        row = self.store.devices.credential(token_digest(secret))
        if row is None:
            why = "unknown enrolment credential"
        elif device_id is not None and row.device_id != device_id:
            why = f"the enrolment credential is not for device {device_id!r}"
        elif row.used_at is not None:
            why = "the enrolment credential was already used"
        elif row.expires_at <= self.clock.now():
            why = "the enrolment credential has expired"
        else:
            return DeviceAuth(row.device_id, "credential", row.id)
        subject = device_id or (row.device_id if row is not None else None)
        self.audit_refusal("device.enroll", subject, why, actor=_device_actor(subject))
        raise Unauthorised(why)

    def authenticate_idevid(self, der: bytes) -> DeviceAuth:
        """The device an IDevID certificate (from a configured manufacturer CA) names;
        Unauthorised (and audited) otherwise."""
        try:
            if not self.manufacturers.configured:
                raise Unauthorised("no manufacturer CA is configured for IDevID enrolment")
            if self._issued_here(der):
                raise Unauthorised(
                    "a certificate issued by this CA is no IDevID: a device renewing it uses "
                    "simplereenroll"
                )
            device_id = self.manufacturers.device_id_of(der, self.clock.now())
            try:
                check_device_id(device_id)
            except InvalidInput as exc:
                raise Unauthorised(f"the IDevID names an unusable device id: {exc}") from None
            if (
                self.settings.devices.idevid_known_devices_only
                and self.store.devices.status(device_id) is None
            ):
                raise Unauthorised(
                    f"device {device_id!r} is not in the inventory "
                    "(devices.idevid_known_devices_only): provision it first"
                )
        except Unauthorised as exc:
            self.audit_refusal("device.enroll", None, str(exc))
            raise
        return DeviceAuth(device_id, "idevid")

    # -- enrolment -------------------------------------------------------------------------

    def enroll_device(
        self,
        csr: str | bytes,
        auth: DeviceAuth,
        tls_unique: bytes | None = None,
        device_id: str | None = None,
    ) -> CertificateRecord:
        """A device certificate for an authenticated device. The CSR supplies the key; the
        identity comes from ``auth`` (a CSR, or a ``device_id`` the caller states, naming
        another device is refused). A challengePassword, when present, must be the
        connection's tls-unique."""
        profile = self.settings.devices.profile
        actor = Actor(
            name=_device_actor(auth.device_id),
            role="issuer",
            profiles=(profile,),
            enrollment_credential_id=auth.credential_id,
        )
        try:
            if device_id is not None and check_device_id(device_id) != auth.device_id:
                raise Forbidden(f"device_id {device_id!r} does not match the enrolment credential")
            parsed = parse_csr(csr, self.settings.policy, names_from_cn=False)
            bound = _check_device_csr(
                parsed, auth.device_id, self._device_uri(auth.device_id), tls_unique
            )
        except (PolicyError, Forbidden, InvalidInput) as exc:
            self._refused(actor, "device.enroll", auth.device_id, str(exc))  # type: ignore[attr-defined]
            raise
        return self.issue_for_key(  # type: ignore[attr-defined,no-any-return]
            parsed.public_key,
            RequestedNames(),
            None,
            profile,
            None,
            actor,
            auth.device_id,
            action="device.enroll",
            details={"via": auth.method, "channel_bound": bound},
            via=auth.method,
        )

    def reenroll_device(
        self, presented_der: bytes, csr: str | bytes, tls_unique: bytes | None = None
    ) -> CertificateRecord:
        """EST simplereenroll: a new certificate for the identity of the TLS client
        certificate (issued here, good, unexpired), for the CSR's key."""
        current = self.authenticate_certificate(presented_der)  # type: ignore[attr-defined]
        row = self.store.certificate(current.serial)
        device = self.profiles.get(row.profile).device
        device_id = row.device_id or row.common_name
        actor = Actor(name=row.requester, role="issuer")
        try:
            parsed = parse_csr(csr, self.settings.policy, names_from_cn=False)
            if device and device_id:
                bound = _check_device_csr(
                    parsed, device_id, self._device_uri(device_id), tls_unique
                )
            else:
                bound = _check_channel_binding(parsed, tls_unique)
        except (PolicyError, Forbidden, InvalidInput) as exc:
            self._refused(actor, "device.reenroll", row.serial, str(exc))  # type: ignore[attr-defined]
            raise
        return self.renew(  # type: ignore[attr-defined,no-any-return]
            presented_der,
            csr,
            action="device.reenroll",
            details={"channel_bound": bound},
            names_from_certificate=device,
        )

    def _issued_here(self, der: bytes) -> bool:
        """Whether ``der`` was signed by one of this CA's issuers (even if a manufacturer
        bundle wrongly contains them)."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return False
        return any(
            issued_by(cert, x509.load_der_x509_certificate(i.der))
            for i in self.issuers().values()  # type: ignore[attr-defined]
        )

    def _device_uri(self, device_id: str) -> str:
        return self.settings.ca.device_uri_template.format(device_id=device_id)

    # -- inventory -------------------------------------------------------------------------

    def list_devices(
        self, actor: Actor, status: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[DeviceRecord], str | None]:
        """One page of the inventory (admin or auditor)."""
        actor.require_role("admin", "auditor")
        if status not in (None, "provisioned", "enrolled", "revoked"):
            raise InvalidInput(f"unknown status {status!r}; one of provisioned, enrolled, revoked")
        if not 1 <= limit <= 1000:
            raise InvalidInput("limit must be between 1 and 1000")
        page = self.store.devices.list_devices(status, limit, cursor)
        return [_record(d) for d in page.items], page.next_cursor

    def show_device(self, device_id: str, actor: Actor) -> DeviceRecord:
        """One device with every certificate it was issued (admin or auditor)."""
        actor.require_role("admin", "auditor")
        device = self.store.devices.device(device_id)
        now = self.clock.now()
        certificates = tuple(
            CertificateRecord.from_row(c, now, "")
            for c in self.store.devices.certificates(device_id)
        )
        return _record(device, certificates)

    def revoke_device(self, device_id: str, reason: str | None, actor: Actor) -> DeviceRecord:
        """Revoke a device for good: every certificate it holds is revoked, its unused
        credentials die, and it can neither enrol nor re-enrol again (admin only)."""
        actor.require_role("admin")
        reason_name = parse_reason(reason or "cessationOfOperation")
        serials = self.store.devices.mark_revoked(
            device_id,
            AuditRecord(
                action="device.revoke",
                actor=actor.name,
                subject=device_id,
                details={"reason": reason_name},
            ),
        )
        for serial in serials:
            with contextlib.suppress(Conflict):  # revoked meanwhile
                self.revoke(serial, reason_name, actor)  # type: ignore[attr-defined]
        return self.show_device(device_id, actor)


def _device_actor(device_id: str | None) -> str:
    return f"device:{device_id}" if device_id else "anonymous"


def _check_device_csr(
    parsed: ParsedCsr, device_id: str, device_uri: str, tls_unique: bytes | None
) -> bool:
    """Refuse a CSR for another device or for names beyond the device's own; check the
    channel binding. Returns whether the CSR was bound to the TLS connection."""
    named = parsed.subject_serial or parsed.common_name
    if named and named != device_id:
        raise Forbidden(
            f"the CSR names device {named!r} but the credential is for device {device_id!r} "
            "(put the device id in the subject serialNumber or CN)"
        )
    # parsed without names from the CN: these are the CSR's SAN entries
    own = {f"uri:{device_uri}", f"dns:{device_id.lower()}"}
    extra = [n for n in parsed.names.tagged() if n not in own]
    if extra:
        raise Forbidden(
            f"a device certificate names only its device ({device_uri}); the CSR also "
            f"asks for {', '.join(extra[:5])}"
        )
    return _check_channel_binding(parsed, tls_unique)


def _check_channel_binding(parsed: ParsedCsr, tls_unique: bytes | None) -> bool:
    password = challenge_password(parsed.csr)
    if password is None:
        return False
    if tls_unique is None or not hmac.compare_digest(
        password.encode(), tls_unique_password(tls_unique).encode()
    ):
        raise PolicyError(
            "the CSR's challengePassword is not this TLS connection's tls-unique value "
            "(RFC 7030 section 3.5): build the CSR on the connection that sends it, or "
            "leave challengePassword out"
        )
    return True


def _record(device: Any, certificates: tuple[CertificateRecord, ...] = ()) -> DeviceRecord:
    return DeviceRecord(
        device_id=device.id,
        status=device.status,
        created_at=device.created_at,
        enrolled_at=device.enrolled_at,
        enrolled_via=device.enrolled_via,
        last_reenrolled_at=device.last_reenrolled_at,
        current_serial=device.current_serial,
        revoked_at=device.revoked_at,
        certificates=certificates,
    )
