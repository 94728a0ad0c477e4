"""SQLAlchemy models of the ACME server's state: accounts, orders, authorizations,
challenges, External Account Binding keys, used nonces and the nonce key.

Every piece of protocol state lives here (none in a worker's memory), so several workers
and several instances sharing one database behave as one ACME server.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from pki.store.models import Base, UTCDateTime


class AcmeAccount(Base):
    """An ACME account, identified by the RFC 7638 thumbprint of its public key."""

    __tablename__ = "acme_accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_thumbprint: Mapped[str] = mapped_column(String(64), unique=True)
    jwk: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # valid | deactivated | revoked
    contact: Mapped[list[str]] = mapped_column(JSON)
    tos_agreed: Mapped[bool] = mapped_column(Boolean, default=False)
    eab_kid: Mapped[str | None] = mapped_column(String(64))
    #: name patterns and profiles inherited from the EAB key (None or empty: no limit)
    allowed_names: Mapped[list[str] | None] = mapped_column(JSON)
    profiles: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class AcmeEabKey(Base):
    """An External Account Binding key: single use, bound to the account it created; its
    name patterns and profiles (None or empty: no limit) pass to that account."""

    __tablename__ = "acme_eab_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    hmac_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    account_id: Mapped[int | None] = mapped_column(Integer)
    allowed_names: Mapped[list[str] | None] = mapped_column(JSON)
    profiles: Mapped[list[str] | None] = mapped_column(JSON)


class AcmeOrder(Base):
    """An order: pending → ready → processing → valid, or invalid."""

    __tablename__ = "acme_orders"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("acme_accounts.id"))
    status: Mapped[str] = mapped_column(String(16))
    #: [{"type": "dns"|"ip", "value": ...}] in request order
    identifiers: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    profile: Mapped[str] = mapped_column(String(64))
    expires: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    certificate_serial: Mapped[str | None] = mapped_column(String(64))
    #: the ARI certificate id (RFC 9773) this order replaces
    replaces: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: when finalize started issuing (an order processing long after was interrupted)
    processing_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_acme_orders_account_id_created_at", "account_id", "created_at"),
        Index("ix_acme_orders_certificate_serial", "certificate_serial"),
        Index("ix_acme_orders_replaces", "replaces"),
    )


class AcmeAuthorization(Base):
    """The authorization of one identifier for one order."""

    __tablename__ = "acme_authorizations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("acme_orders.id"), index=True)
    account_id: Mapped[int] = mapped_column(Integer)
    identifier_type: Mapped[str] = mapped_column(String(8))
    identifier_value: Mapped[str] = mapped_column(String(255))
    wildcard: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16))
    expires: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class AcmeChallenge(Base):
    """One way of proving control of an authorization's identifier."""

    __tablename__ = "acme_challenges"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    authorization_id: Mapped[str] = mapped_column(ForeignKey("acme_authorizations.id"), index=True)
    type: Mapped[str] = mapped_column(String(16))
    token: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    #: when validation was last started (a stale ``processing`` is started again)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    validated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class AcmeNonceUse(Base):
    """A nonce that has been used; nonces are self-authenticating until then."""

    __tablename__ = "acme_nonce_uses"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class AcmeSecret(Base):
    """Server-wide secrets shared by every instance (the nonce MAC key)."""

    __tablename__ = "acme_secrets"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
