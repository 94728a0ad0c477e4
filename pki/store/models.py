"""SQLAlchemy 2 declarative models. Timestamps are stored as naive UTC, returned aware."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in, naive UTC in the column, aware UTC out."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Issuer(Base):
    """A CA certificate whose key is in the HSM: the root, issuing CAs, and their history."""

    __tablename__ = "issuers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # root | intermediate
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("issuers.id"))
    key_label: Mapped[str] = mapped_column(String(200), unique=True)
    key_type: Mapped[str] = mapped_column(String(16))
    der: Mapped[bytes] = mapped_column(LargeBinary)
    subject: Mapped[str] = mapped_column(Text)
    ski: Mapped[str] = mapped_column(String(128))
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    ocsp_key_label: Mapped[str | None] = mapped_column(String(200))
    ocsp_serial: Mapped[str | None] = mapped_column(String(64))
    crl_number: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Certificate(Base):
    """An end-entity certificate; the row exists (``pending``) before the HSM signs it."""

    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    subject: Mapped[str] = mapped_column(Text)
    common_name: Mapped[str | None] = mapped_column(String(255))
    sans: Mapped[list[str]] = mapped_column(JSON)
    profile: Mapped[str] = mapped_column(String(64))
    requester: Mapped[str] = mapped_column(String(255))
    public_key_sha256: Mapped[str] = mapped_column(String(64))
    spki: Mapped[bytes] = mapped_column(LargeBinary)
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16))  # pending | good | revoked
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revocation_reason: Mapped[str | None] = mapped_column(String(32))
    invalidity_date: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    der: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: the CRL partition named in this certificate's CDP, fixed at issuance
    crl_shard: Mapped[int] = mapped_column(SmallInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: the device a ``device`` profile certificate identifies (None for the others)
    device_id: Mapped[str | None] = mapped_column(String(64))

    # Few indexes on purpose: each one is written by every issuance. Pending rows are
    # found through (status, not_after); revoked and device rows through partial indexes
    # that other rows never enter.
    __table_args__ = (
        Index("ix_certificates_status_not_after", "status", "not_after"),
        Index(
            "ix_certificates_device_id",
            "device_id",
            sqlite_where=text("device_id IS NOT NULL"),
            postgresql_where=text("device_id IS NOT NULL"),
        ),
        # covering: a CRL of a million entries is read from this index alone
        Index(
            "ix_certificates_revoked_issuer",
            "issuer_id",
            "not_after",
            "revoked_at",
            "serial",
            "revocation_reason",
            "invalidity_date",
            "crl_shard",
            "status",
            sqlite_where=text("status = 'revoked'"),
            postgresql_where=text("status = 'revoked'"),
        ),
    )


class ApiToken(Base):
    """A bearer token; only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    allowed_names: Mapped[list[str]] = mapped_column(JSON)
    profiles: Mapped[list[str]] = mapped_column(JSON)
    max_ttl_seconds: Mapped[int | None] = mapped_column(Integer)
    single_use: Mapped[bool] = mapped_column(Boolean, default=False)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """One hash-chained audit event: ``hash = SHA-256(prev_hash || canonical body)``."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16))  # ok | refused | error
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class Crl(Base):
    """A published CRL: a base (complete for its shard) or a delta since a base."""

    __tablename__ = "crls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    shard: Mapped[int] = mapped_column(SmallInteger)
    kind: Mapped[str] = mapped_column(String(8))  # base | delta
    number: Mapped[int] = mapped_column(BigInteger)
    base_number: Mapped[int | None] = mapped_column(BigInteger)
    entries: Mapped[int] = mapped_column(Integer)
    #: when the revocation list was read (exact); thisUpdate is whole seconds
    built_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    this_update: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    next_update: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    der: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (
        Index("ix_crls_issuer_shard_kind_number", "issuer_id", "shard", "kind", "number"),
    )


class OcspResponse(Base):
    """A pre-signed OCSP response for one certificate and one CertID hash algorithm."""

    __tablename__ = "ocsp_responses"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    hash_algorithm: Mapped[str] = mapped_column(String(8), primary_key=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    status: Mapped[str] = mapped_column(String(8))
    this_update: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    next_update: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    der: Mapped[bytes] = mapped_column(LargeBinary)
