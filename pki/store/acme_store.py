"""The ACME part of the SA: every query the ACME server makes.

State changes that race between workers (a challenge started twice, an order finalized
twice, an EAB key or a nonce used twice) are compare-and-set updates: the caller learns
whether it won, and the loser changes nothing.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pki.audit import AuditRecord
from pki.errors import Conflict
from pki.store.acme_models import (
    AcmeAccount,
    AcmeAuthorization,
    AcmeChallenge,
    AcmeEabKey,
    AcmeNonceUse,
    AcmeOrder,
    AcmeSecret,
)

if TYPE_CHECKING:
    from pki.store.db import Store


class AcmeStore:
    """ACME accounts, orders, authorizations, challenges, EAB keys and nonces."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def warm(self, now: dt.datetime) -> None:
        """Compile every ACME read and write once: the writes run in a transaction that is
        rolled back, so nothing is stored (a worker's first order no longer pays for it)."""
        reads = (
            lambda: self.account(-1),
            lambda: self.account_by_thumbprint(""),
            lambda: self.order(""),
            lambda: self.orders_since(-1, now),
            lambda: self.order_for_certificate(""),
            lambda: self.order_replacing("", now),
            lambda: self.authorizations(""),
            lambda: self.authorization(""),
            lambda: self.challenges(""),
            lambda: self.challenge(""),
        )
        for read in reads:
            read()
        with self._store._writers, self._store._write() as s:
            s.begin()
            try:
                account = AcmeAccount(
                    key_thumbprint="", jwk={}, status="x", contact=[], created_at=now
                )
                s.add(account)
                s.flush()
                s.add(
                    AcmeOrder(
                        id="-",
                        account_id=account.id,
                        status="x",
                        identifiers=[],
                        profile="",
                        expires=now,
                        created_at=now,
                    )
                )
                s.flush()
                s.add(
                    AcmeAuthorization(
                        id="-",
                        order_id="-",
                        account_id=account.id,
                        identifier_type="",
                        identifier_value="",
                        status="x",
                        expires=now,
                    )
                )
                s.flush()
                s.add(AcmeChallenge(id="-", authorization_id="-", type="", token="", status="x"))
                s.add(AcmeNonceUse(nonce="", expires_at=now))
                s.flush()
                s.execute(update(AcmeOrder).where(AcmeOrder.id == "").values(status="x"))
                s.execute(
                    update(AcmeChallenge)
                    .where(AcmeChallenge.id == "", AcmeChallenge.status == "pending")
                    .values(status="processing", started_at=now)
                )
                self._settle_order(s, "", None)
            finally:
                s.rollback()

    # -- secrets and nonces ----------------------------------------------------------------

    def secret(self, name: str, size: int = 32) -> bytes:
        """The server-wide secret ``name``, created (randomly) by whichever instance asks
        first; every instance sharing the database gets the same value."""
        with self._store._ro() as s:
            found = s.get(AcmeSecret, name)
            if found is not None:
                return found.value
        try:
            with self._store._tx() as s:
                s.add(AcmeSecret(name=name, value=os.urandom(size)))
        except IntegrityError:
            pass  # another instance created it first
        with self._store._ro() as s:
            return s.get(AcmeSecret, name).value  # type: ignore[union-attr]

    def use_nonce(self, nonce: str, expires_at: dt.datetime) -> bool:
        """Record ``nonce`` as used; False if it was used before (a replay)."""
        try:
            with self._store._tx() as s:
                s.add(AcmeNonceUse(nonce=nonce, expires_at=expires_at))
        except IntegrityError:
            return False
        return True

    def prune_nonces(self, now: dt.datetime) -> int:
        """Forget used nonces that have expired anyway; returns how many."""
        with self._store._tx() as s:
            return s.execute(delete(AcmeNonceUse).where(AcmeNonceUse.expires_at < now)).rowcount

    # -- accounts --------------------------------------------------------------------------

    def account(self, account_id: int) -> AcmeAccount | None:
        with self._store._ro() as s:
            return s.get(AcmeAccount, account_id)

    def account_by_thumbprint(self, thumbprint: str) -> AcmeAccount | None:
        with self._store._ro() as s:
            stmt = select(AcmeAccount).where(AcmeAccount.key_thumbprint == thumbprint)
            return s.execute(stmt).scalar()

    def create_account(
        self, account: AcmeAccount, record: AuditRecord, eab_kid: str | None = None
    ) -> AcmeAccount:
        """Insert ``account`` (and consume its EAB key) with its audit event.

        Conflict if the key already has an account or the EAB key was used meanwhile."""
        try:
            with self._store._tx() as s:
                s.add(account)
                s.flush()
                if eab_kid is not None:
                    used = s.execute(
                        update(AcmeEabKey)
                        .where(AcmeEabKey.kid == eab_kid, AcmeEabKey.used_at.is_(None))
                        .values(used_at=account.created_at, account_id=account.id)
                    )
                    if used.rowcount != 1:
                        raise Conflict(f"external account key {eab_kid!r} was already used")
                self._store._append_audit(s, _with_subject(record, account.id))
        except IntegrityError:
            raise Conflict("an account already exists for this key") from None
        return account

    def update_account(
        self, account_id: int, changes: dict[str, Any], record: AuditRecord | None = None
    ) -> AcmeAccount:
        """Apply ``changes`` (column → value) to the account; Conflict on a taken key."""
        try:
            with self._store._tx() as s:
                account = s.get(AcmeAccount, account_id)
                assert account is not None
                for column, value in changes.items():
                    setattr(account, column, value)
                s.flush()
                if record is not None:
                    self._store._append_audit(s, record)
                return account
        except IntegrityError:
            raise Conflict("another account already uses this key") from None

    def add_eab_key(self, key: AcmeEabKey, record: AuditRecord) -> None:
        with self._store._tx() as s:
            s.add(key)
            self._store._append_audit(s, record)

    def eab_key(self, kid: str) -> AcmeEabKey | None:
        with self._store._ro() as s:
            return s.get(AcmeEabKey, kid)

    # -- orders ----------------------------------------------------------------------------

    def create_order(
        self,
        order: AcmeOrder,
        authorizations: list[AcmeAuthorization],
        challenges: list[AcmeChallenge],
    ) -> None:
        """Insert an order with its authorizations and challenges in one transaction."""
        with self._store._tx() as s:
            s.add(order)
            s.flush()
            s.add_all(authorizations)
            s.flush()
            s.add_all(challenges)

    def orders_since(self, account_id: int, since: dt.datetime) -> tuple[int, dt.datetime | None]:
        """How many orders the account created since ``since``, and the oldest of them."""
        with self._store._ro() as s:
            count, oldest = s.execute(
                select(func.count(), func.min(AcmeOrder.created_at)).where(
                    AcmeOrder.account_id == account_id, AcmeOrder.created_at >= since
                )
            ).one()
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=dt.UTC)  # func.min skips the column type
        return int(count), oldest

    def order(self, order_id: str) -> AcmeOrder | None:
        with self._store._ro() as s:
            return s.get(AcmeOrder, order_id)

    def order_view(self, order_id: str) -> tuple[AcmeOrder, list[str]] | None:
        """The order and its authorization ids, read together."""
        with self._store._ro() as s:
            order = s.get(AcmeOrder, order_id)
            if order is None:
                return None
            ids = s.execute(
                select(AcmeAuthorization.id)
                .where(AcmeAuthorization.order_id == order_id)
                .order_by(AcmeAuthorization.id)
            ).scalars()
            return order, list(ids)

    def order_ids(self, account_id: int, limit: int = 1000) -> list[str]:
        """The account's most recent orders that are still of interest (not invalid)."""
        with self._store._ro() as s:
            stmt = (
                select(AcmeOrder.id)
                .where(AcmeOrder.account_id == account_id, AcmeOrder.status != "invalid")
                .order_by(AcmeOrder.created_at.desc())
                .limit(limit)
            )
            return list(s.execute(stmt).scalars())

    def order_for_certificate(self, serial: str) -> AcmeOrder | None:
        with self._store._ro() as s:
            stmt = select(AcmeOrder).where(AcmeOrder.certificate_serial == serial)
            return s.execute(stmt).scalar()

    def order_replacing(self, cert_id: str, now: dt.datetime) -> AcmeOrder | None:
        """An order that already replaces the certificate ``cert_id`` (ARI): finished, or
        still live (an abandoned order stops counting when it expires)."""
        with self._store._ro() as s:
            live = AcmeOrder.status.in_(("pending", "ready")) & (AcmeOrder.expires > now)
            done = AcmeOrder.status.in_(("processing", "valid"))
            stmt = select(AcmeOrder).where(AcmeOrder.replaces == cert_id, live | done)
            return s.execute(stmt).scalars().first()

    def set_order(self, order_id: str, expected: tuple[str, ...], **changes: Any) -> bool:
        """Compare-and-set: apply ``changes`` if the order's status is in ``expected``."""
        with self._store._tx() as s:
            done = s.execute(
                update(AcmeOrder)
                .where(AcmeOrder.id == order_id, AcmeOrder.status.in_(expected))
                .values(**changes)
            )
            return done.rowcount == 1

    def fail_interrupted_orders(
        self, started_before: dt.datetime, error: dict[str, Any], order_id: str | None = None
    ) -> int:
        """Make ``invalid`` (with ``error``) the orders ``processing`` since before
        ``started_before`` (all of them, or ``order_id``): their finalize was cut off."""
        started = func.coalesce(AcmeOrder.processing_since, AcmeOrder.created_at)
        stmt = update(AcmeOrder).where(AcmeOrder.status == "processing", started < started_before)
        if order_id is not None:
            stmt = stmt.where(AcmeOrder.id == order_id)
        with self._store._tx() as s:
            return s.execute(stmt.values(status="invalid", error=error)).rowcount

    def expire(self, now: dt.datetime, order_id: str) -> None:
        """Mark the order and its unfinished authorizations invalid once they expired."""
        with self._store._tx() as s:
            s.execute(
                update(AcmeAuthorization)
                .where(
                    AcmeAuthorization.order_id == order_id,
                    AcmeAuthorization.status == "pending",
                    AcmeAuthorization.expires <= now,
                )
                .values(status="invalid")
            )
            s.execute(
                update(AcmeOrder)
                .where(
                    AcmeOrder.id == order_id,
                    AcmeOrder.status.in_(("pending", "ready")),
                    AcmeOrder.expires <= now,
                )
                .values(status="invalid", error=_problem("malformed", "the order expired"))
            )

    # -- authorizations and challenges -----------------------------------------------------

    def authorizations(self, order_id: str) -> list[AcmeAuthorization]:
        with self._store._ro() as s:
            stmt = (
                select(AcmeAuthorization)
                .where(AcmeAuthorization.order_id == order_id)
                .order_by(AcmeAuthorization.id)
            )
            return list(s.execute(stmt).scalars())

    def authorization(self, authz_id: str) -> AcmeAuthorization | None:
        with self._store._ro() as s:
            return s.get(AcmeAuthorization, authz_id)

    def challenges(self, authz_id: str) -> list[AcmeChallenge]:
        with self._store._ro() as s:
            stmt = (
                select(AcmeChallenge)
                .where(AcmeChallenge.authorization_id == authz_id)
                .order_by(AcmeChallenge.type)
            )
            return list(s.execute(stmt).scalars())

    def challenge(self, challenge_id: str) -> AcmeChallenge | None:
        with self._store._ro() as s:
            return s.get(AcmeChallenge, challenge_id)

    def challenge_view(
        self, challenge_id: str
    ) -> tuple[AcmeChallenge, AcmeAuthorization, AcmeAccount] | None:
        """The challenge with its authorization and account, read together."""
        with self._store._ro() as s:
            chall = s.get(AcmeChallenge, challenge_id)
            authz = s.get(AcmeAuthorization, chall.authorization_id) if chall else None
            account = s.get(AcmeAccount, authz.account_id) if authz else None
            if chall is None or authz is None or account is None:
                return None
            return chall, authz, account

    def start_challenge(
        self, challenge_id: str, now: dt.datetime, stale_before: dt.datetime
    ) -> bool:
        """Claim the challenge for validation: pending → processing, or a ``processing``
        whose validator has been silent since before ``stale_before``. False if another
        worker holds it, it is finished, or its authorization is no longer pending."""
        with self._store._tx() as s:
            chall = s.get(AcmeChallenge, challenge_id)
            if chall is None:
                return False
            authz = s.get(AcmeAuthorization, chall.authorization_id)
            if authz is None or authz.status != "pending":
                return False
            claimable = (AcmeChallenge.status == "pending") | (
                (AcmeChallenge.status == "processing") & (AcmeChallenge.started_at < stale_before)
            )
            done = s.execute(
                update(AcmeChallenge)
                .where(AcmeChallenge.id == challenge_id, claimable)
                .values(status="processing", started_at=now)
            )
            return done.rowcount == 1

    def finish_challenge(
        self, challenge_id: str, now: dt.datetime, error: dict[str, Any] | None
    ) -> None:
        """Record a validation result: the challenge and its authorization become valid
        (no ``error``) or invalid, and the order becomes ready once every authorization
        is valid, or invalid as soon as one is not."""
        valid = error is None
        with self._store._tx() as s:
            chall = s.get(AcmeChallenge, challenge_id)
            if chall is None:
                return
            # compare-and-set on the status: a racing finish, deactivation or expiry wins
            # or loses as a whole
            done = s.execute(
                update(AcmeChallenge)
                .where(AcmeChallenge.id == challenge_id, AcmeChallenge.status == "processing")
                .values(
                    status="valid" if valid else "invalid",
                    validated_at=now if valid else None,
                    error=error,
                )
            )
            if done.rowcount != 1:
                return
            settled = s.execute(
                update(AcmeAuthorization)
                .where(
                    AcmeAuthorization.id == chall.authorization_id,
                    AcmeAuthorization.status == "pending",
                )
                .values(status="valid" if valid else "invalid")
            )
            if settled.rowcount == 1:
                authz = s.get(AcmeAuthorization, chall.authorization_id)
                assert authz is not None
                self._settle_order(s, authz.order_id, error)

    def deactivate_authorization(self, authz_id: str) -> bool:
        """pending or valid → deactivated; the order becomes invalid. False otherwise."""
        with self._store._tx() as s:
            done = s.execute(
                update(AcmeAuthorization)
                .where(
                    AcmeAuthorization.id == authz_id,
                    AcmeAuthorization.status.in_(("pending", "valid")),
                )
                .values(status="deactivated")
            )
            authz = s.get(AcmeAuthorization, authz_id)
            if done.rowcount != 1 or authz is None:
                return False
            self._settle_order(
                s, authz.order_id, _problem("unauthorized", "an authorization was deactivated")
            )
            return True

    def _settle_order(self, s: Session, order_id: str, error: dict[str, Any] | None) -> None:
        statuses = s.execute(
            select(AcmeAuthorization.status).where(AcmeAuthorization.order_id == order_id)
        ).scalars()
        statuses = set(statuses)
        if statuses == {"valid"}:
            s.execute(
                update(AcmeOrder)
                .where(AcmeOrder.id == order_id, AcmeOrder.status == "pending")
                .values(status="ready")
            )
        elif statuses & {"invalid", "deactivated", "revoked"}:
            s.execute(
                update(AcmeOrder)
                .where(AcmeOrder.id == order_id, AcmeOrder.status.in_(("pending", "ready")))
                .values(status="invalid", error=error)
            )


def _problem(kind: str, detail: str) -> dict[str, Any]:
    return {"type": f"urn:ietf:params:acme:error:{kind}", "detail": detail, "status": 403}


def _with_subject(record: AuditRecord, account_id: int) -> AuditRecord:
    return AuditRecord(
        action=record.action,
        actor=record.actor,
        subject=f"acme-account:{account_id}",
        outcome=record.outcome,
        details=record.details,
    )
