"""SQLAlchemy models of the device inventory and its one-time enrolment credentials."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from pki.store.models import Base, UTCDateTime


class Device(Base):
    """A device known by its id: provisioned, enrolled, or revoked for good."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # provisioned | enrolled | revoked
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    enrolled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    #: how it enrolled first: credential | idevid | api
    enrolled_via: Mapped[str | None] = mapped_column(String(16))
    last_reenrolled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    current_serial: Mapped[str | None] = mapped_column(String(64))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class DeviceCredential(Base):
    """A one-time enrolment secret bound to one device; only its SHA-256 is stored."""

    __tablename__ = "device_credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(255))

    __table_args__ = (Index("ix_device_credentials_device_id", "device_id"),)
