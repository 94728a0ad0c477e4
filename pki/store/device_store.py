"""The device inventory's part of the SA: devices, one-time enrolment credentials, and
the certificates each device holds."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pki.audit import AuditRecord
from pki.errors import InvalidInput, NotFound
from pki.store.device_models import Device, DeviceCredential
from pki.store.models import Certificate

if TYPE_CHECKING:
    from pki.store.db import Store


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
        upsert = (
            postgresql.insert if self._store.engine.dialect.name == "postgresql" else sqlite.insert
        )
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
                upsert(Device).on_conflict_do_nothing(index_elements=[Device.id]),
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

    def credential(self, digest: str) -> DeviceCredential | None:
        """The credential whose secret has SHA-256 ``digest``, or None."""
        with self._store._ro() as s:
            return s.execute(
                select(DeviceCredential).where(DeviceCredential.secret_sha256 == digest)
            ).scalar()

    def claim_credential(self, credential_id: int) -> bool:
        """Mark a credential used; False if it was used or expired meanwhile (race-safe)."""
        now = self._store.clock.now()
        with self._store._tx() as s:
            done = s.execute(
                update(DeviceCredential)
                .where(
                    DeviceCredential.id == credential_id,
                    DeviceCredential.used_at.is_(None),
                    DeviceCredential.expires_at > now,
                )
                .values(used_at=now)
            )
            return done.rowcount == 1

    def device(self, device_id: str) -> Device:
        with self._store._ro() as s:
            found = s.get(Device, device_id)
        if found is None:
            raise NotFound(f"no device {device_id!r}")
        return found

    def status(self, device_id: str) -> str | None:
        """The device's status, or None when it is not in the inventory."""
        with self._store._ro() as s:
            return s.execute(select(Device.status).where(Device.id == device_id)).scalar()

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

    def note_certificate(self, device_id: str, serial: str, via: str) -> str:
        """Record that ``device_id`` now holds ``serial``: its first certificate enrols it,
        later ones are re-enrolments. Returns the device's status afterwards."""
        now = self._store.clock.now()
        with self._store._tx() as s:
            device = s.get(Device, device_id, with_for_update=True)
            if device is None:
                device = Device(id=device_id, status="provisioned", created_at=now)
                s.add(device)
            if device.status == "revoked":
                return "revoked"
            if device.enrolled_at is None:
                device.enrolled_at, device.enrolled_via = now, via
            else:
                device.last_reenrolled_at = now
            device.status, device.current_serial = "enrolled", serial
            return device.status

    def mark_revoked(self, device_id: str, record: AuditRecord) -> list[str]:
        """Revoke the device (its unused credentials die with it) and audit; return the
        serials of its certificates that are still good or pending."""
        now = self._store.clock.now()
        with self._store._tx() as s:
            device = s.get(Device, device_id, with_for_update=True)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
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
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("invalid cursor") from None
