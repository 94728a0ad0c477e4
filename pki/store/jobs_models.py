"""SQLAlchemy models of the scheduler's records: job runs and expiry notifications sent."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pki.store.models import Base, UTCDateTime


class JobRun(Base):
    """One run of a scheduled job (or of ``hsmca jobs run``)."""

    __tablename__ = "job_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(64))
    #: who ran it: ``host:pid`` of the scheduler, or ``cli:host:pid``
    instance: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))  # running | ok | error
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (Index("ix_job_runs_job_started_at", "job", "started_at"),)


class ExpiryNotification(Base):
    """An expiry notification for one certificate, threshold and channel: claimed once,
    then sent (with retries) — never twice."""

    __tablename__ = "expiry_notifications"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    threshold: Mapped[str] = mapped_column(String(16), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)  # webhook | email
    claimed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
