"""The device inventory's part of the SA: devices, one-time enrolment credentials, and
the certificates each device holds."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pki.audit import AuditRecord
from pki.errors import InvalidInput, NotFound
from pki.store.device_models import Device, DeviceCredential
from pki.store.driver import CompiledStatement
from pki.store.models import Certificate, UTCDateTime

if TYPE_CHECKING:
    from pki.store.db import Store


_DEVICES = Device.__table__
_CREDENTIALS = DeviceCredential.__table__
_ID = bindparam("p_id")
_NOW = bindparam("p_now", type_=UTCDateTime())
# Hot-path statements (issuance): compiled once, run on the issuance transaction's cursor.
_CREDENTIAL_BY_DIGEST = select(_CREDENTIALS).where(
    _CREDENTIALS.c.secret_sha256 == bindparam("p_digest")
)
_DEVICE_STATUS = select(_DEVICES.c.status).where(_DEVICES.c.id == _ID)
_DEVICE_FOR_NOTE = (
    select(_DEVICES.c.status, _DEVICES.c.enrolled_at).where(_DEVICES.c.id == _ID).with_for_update()
)
_ENROL = (
    _DEVICES.update()
    .where(_DEVICES.c.id == _ID)
    .values(
        status="enrolled",
        enrolled_at=_NOW,
        enrolled_via=bindparam("p_via"),
        current_serial=bindparam("p_serial"),
    )
)
_REENROL = (
    _DEVICES.update()
    .where(_DEVICES.c.id == _ID)
    .values(status="enrolled", last_reenrolled_at=_NOW, current_serial=bindparam("p_serial"))
)


@dataclass(frozen=True)
class DeviceNote:
    """The device a certificate being issued is for, and how it asked (``credential``,
    ``idevid``, ``api``, ``renewal``)."""

    device_id: str
    via: str


@dataclass(frozen=True)
class NewCredential:
    """A credential to store: the device it is bound to and the digest of its secret."""

    device_id: str
    secret_sha256: str


@dataclass(frozen=True)
class DevicePage:
    items: list[Device]
    next_cursor: str | None


class DeviceStore:
    """Queries of device enrolment and the device inventory."""

    def __init__(self, store: Store) -> None:
        self._store = store
        dialect = store.engine.dialect
        upsert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
        self._upsert = upsert
        self._fast = {
            "credential": CompiledStatement(_CREDENTIAL_BY_DIGEST, dialect),
            "status": CompiledStatement(_DEVICE_STATUS, dialect),
            "for_note": CompiledStatement(_DEVICE_FOR_NOTE, dialect),
            "add": CompiledStatement(
                upsert(_DEVICES).on_conflict_do_nothing(index_elements=[_DEVICES.c.id]),
                dialect,
                ["id", "status", "created_at"],
            ),
            "enrol": CompiledStatement(_ENROL, dialect),
            "reenrol": CompiledStatement(_REENROL, dialect),
        }

    def revoked_among(self, device_ids: Sequence[str]) -> list[str]:
        """The ids among ``device_ids`` whose device is revoked."""
        found: list[str] = []
        with self._store._ro() as s:
            for start in range(0, len(device_ids), 500):
                chunk = list(device_ids[start : start + 500])
                found += s.execute(
                    select(Device.id).where(Device.id.in_(chunk), Device.status == "revoked")
                ).scalars()
        return sorted(found)

    def add_credentials(
        self,
        credentials: Sequence[NewCredential],
        expires_at: dt.datetime,
        created_by: str,
        record: AuditRecord,
    ) -> None:
        """Store credentials (creating unknown devices as ``provisioned``) and audit, in one
        transaction. InvalidInput, and nothing stored, if one of the devices is revoked."""
        now = self._store.clock.now()
        ids = list(dict.fromkeys(c.device_id for c in credentials))
        with self._store._tx() as s:
            revoked = list(
                s.execute(
                    select(Device.id).where(Device.id.in_(ids), Device.status == "revoked")
                ).scalars()
            )
            if revoked:
                raise InvalidInput(
                    f"device(s) revoked, no credential issued: {', '.join(sorted(revoked)[:5])}"
                )
            s.execute(
                self._upsert(Device).on_conflict_do_nothing(index_elements=[Device.id]),
                [{"id": i, "status": "provisioned", "created_at": now} for i in ids],
            )
            s.execute(
                insert(DeviceCredential),
                [
                    {
                        "device_id": c.device_id,
                        "secret_sha256": c.secret_sha256,
                        "created_at": now,
                        "expires_at": expires_at,
                        "used_at": None,
                        "created_by": created_by,
                    }
                    for c in credentials
                ],
            )
            self._store._append_audit(s, record)

    def credential(self, digest: str) -> Any:
        """The credential (attribute access like :class:`DeviceCredential`) whose secret
        has SHA-256 ``digest``, or None. One compiled statement on this thread's reader."""
        return self._store._hot_read(self._fast["credential"], {"p_digest": digest})

    def note(self, cursor: Any, note: DeviceNote, serial: str) -> str:
        """Inside the caller's write transaction, record that the device now holds
        ``serial``: its first certificate enrols it, later ones are re-enrolments. Returns
        the device's status (``revoked``: the caller must not hand the certificate out)."""
        fast, now = self._fast, self._store.clock.now()
        fast["add"].run(cursor, {"id": note.device_id, "status": "provisioned", "created_at": now})
        row = fast["for_note"].fetch_one(cursor, {"p_id": note.device_id})
        if row.status == "revoked":
            return "revoked"
        params = {"p_id": note.device_id, "p_now": now, "p_serial": serial}
        if row.enrolled_at is None:
            fast["enrol"].run(cursor, {**params, "p_via": note.via})
        else:
            fast["reenrol"].run(cursor, params)
        return "enrolled"

    def purge_credentials(self, before: dt.datetime) -> int:
        """Delete credentials spent or expired before ``before`` (their digests are useless
        by then; the audit log keeps their history). Returns how many."""
        with self._store._tx() as s:
            return s.execute(
                delete(DeviceCredential).where(
                    or_(DeviceCredential.expires_at < before, DeviceCredential.used_at < before)
                )
            ).rowcount

    def device(self, device_id: str) -> Device:
        with self._store._ro() as s:
            found = s.get(Device, device_id)
        if found is None:
            raise NotFound(f"no device {device_id!r}")
        return found

    def status(self, device_id: str) -> str | None:
        """The device's status, or None when it is not in the inventory."""
        row = self._store._hot_read(self._fast["status"], {"p_id": device_id})
        return None if row is None else str(row.status)

    def list_devices(self, status: str | None, limit: int, cursor: str | None) -> DevicePage:
        """One page of devices in id order; ``next_cursor`` continues it."""
        stmt = select(Device).order_by(Device.id).limit(limit + 1)
        if status:
            stmt = stmt.where(Device.status == status)
        if cursor:
            stmt = stmt.where(Device.id > _decode(cursor))
        with self._store._ro() as s:
            rows = list(s.execute(stmt).scalars())
        if len(rows) > limit:
            return DevicePage(rows[:limit], _encode(rows[limit - 1].id))
        return DevicePage(rows, None)

    def mark_revoked(self, device_id: str, record: AuditRecord) -> list[str]:
        """Revoke the device (its unused credentials die with it) and audit; return the
        serials of its certificates that are still good or pending."""
        now = self._store.clock.now()
        with self._store._tx() as s:
            device = s.get(Device, device_id, with_for_update=True)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            if device.status != "revoked":  # a second revocation keeps the first's time
                device.status, device.revoked_at = "revoked", now
            s.execute(
                update(DeviceCredential)
                .where(DeviceCredential.device_id == device_id, DeviceCredential.used_at.is_(None))
                .values(expires_at=now)
            )
            self._store._append_audit(s, record)
        return [c.serial for c in self.certificates(device_id) if c.status != "revoked"]

    def certificates(self, device_id: str) -> list[Certificate]:
        """Every certificate issued for the device, oldest first."""
        with self._store._ro() as s:
            stmt = (
                select(Certificate)
                .where(Certificate.device_id == device_id)
                .order_by(Certificate.id)
            )
            return list(s.execute(stmt).scalars())


def _encode(device_id: str) -> str:
    return base64.urlsafe_b64encode(device_id.encode()).decode().rstrip("=")


def _decode(cursor: str) -> str:
    try:
        device_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        device_id = ""
    if not device_id:
        raise InvalidInput("invalid cursor")
    return device_id
