"""The lifecycle jobs' part of the SA: issuer rotation state and purges of stale rows."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from sqlalchemy import case, delete, func, or_, select, update

from pki.audit import AuditRecord
from pki.store.acme_models import AcmeAuthorization, AcmeChallenge, AcmeNonceUse, AcmeOrder
from pki.store.models import ApiToken, Certificate, Crl, Issuer, OcspResponse

if TYPE_CHECKING:
    from pki.store.db import Store


class LifecycleStore:
    """Queries of the scheduled lifecycle jobs."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def set_issuer_active(self, issuer_id: str, active: bool, record: AuditRecord) -> None:
        with self._store._tx() as s:
            s.execute(update(Issuer).where(Issuer.id == issuer_id).values(active=active))
            self._store._append_audit(s, record)

    def last_expiry(self, issuer_id: str) -> dt.datetime | None:
        """When the last certificate ``issuer_id`` signed for a subscriber (good or revoked)
        expires."""
        with self._store._ro() as s:
            found = s.execute(
                select(func.max(Certificate.not_after)).where(
                    Certificate.issuer_id == issuer_id,
                    Certificate.status.in_(("good", "revoked")),
                    # its own OCSP responder certificate would keep a retired CA alive
                    Certificate.profile != "ocsp-responder",
                )
            ).scalar()
        if found is not None and found.tzinfo is None:
            found = found.replace(tzinfo=dt.UTC)  # func.max skips the column type
        return found

    def purge_acme(self, expired_before: dt.datetime, now: dt.datetime) -> dict[str, int]:
        """Delete unfinished ACME orders (and their authorizations and challenges) that
        expired before ``expired_before``, and records of nonces that expired anyway."""
        with self._store._tx() as s:
            stale = select(AcmeOrder.id).where(
                AcmeOrder.status.in_(("pending", "ready", "invalid")),
                AcmeOrder.expires < expired_before,
            )
            authzs = select(AcmeAuthorization.id).where(AcmeAuthorization.order_id.in_(stale))
            challenges = s.execute(
                delete(AcmeChallenge).where(AcmeChallenge.authorization_id.in_(authzs))
            ).rowcount
            s.execute(delete(AcmeAuthorization).where(AcmeAuthorization.order_id.in_(stale)))
            orders = s.execute(delete(AcmeOrder).where(AcmeOrder.id.in_(stale))).rowcount
            nonces = s.execute(delete(AcmeNonceUse).where(AcmeNonceUse.expires_at < now)).rowcount
        return {"acme_orders": orders, "acme_challenges": challenges, "acme_nonces": nonces}

    def purge_tokens(self, before: dt.datetime, record: AuditRecord) -> int:
        """Delete single-use enrolment tokens spent or expired before ``before`` (their
        hashes are useless by then; the audit log keeps their history)."""
        with self._store._tx() as s:
            # only single-use enrolment tokens: a long-lived token's name stays reserved,
            # since certificates name their requester and renewals act as it
            done = s.execute(
                delete(ApiToken).where(
                    ApiToken.single_use.is_(True),
                    or_(ApiToken.expires_at < before, ApiToken.used_at < before),
                )
            ).rowcount
            if done:
                self._store._append_audit(s, record)
        return done

    def expiring_counts(
        self, now: dt.datetime, windows: dict[str, dt.timedelta]
    ) -> dict[tuple[str, str], int]:
        """Good certificates expiring within each window, by profile: one indexed scan
        over (status, not_after) up to the widest window."""
        widest = max(windows.values())
        columns = [
            func.sum(case((Certificate.not_after <= now + span, 1), else_=0)).label(name)
            for name, span in windows.items()
        ]
        with self._store._ro() as s:
            rows = s.execute(
                select(Certificate.profile, *columns)
                .where(
                    Certificate.status == "good",
                    Certificate.not_after > now,
                    Certificate.not_after <= now + widest,
                )
                .group_by(Certificate.profile)
            ).all()
        return {
            (row[0], name): int(row[i + 1] or 0) for row in rows for i, name in enumerate(windows)
        }

    def newest_crl_built_at(self) -> dt.datetime | None:
        with self._store._ro() as s:
            found = s.execute(select(func.max(Crl.built_at))).scalar()
        return found.replace(tzinfo=dt.UTC) if found and found.tzinfo is None else found

    def stale_ocsp_responses(self, now: dt.datetime) -> int:
        """Pre-signed OCSP responses past their nextUpdate for unexpired certificates."""
        with self._store._ro() as s:
            return int(
                s.execute(
                    select(func.count())
                    .select_from(OcspResponse)
                    .join(Certificate, Certificate.serial == OcspResponse.serial)
                    .where(OcspResponse.next_update < now, Certificate.not_after > now)
                ).scalar_one()
            )
