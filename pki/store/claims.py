"""Single-use secrets (API enrolment tokens, device enrolment credentials), spent inside
the transaction that records the pending certificate they pay for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select

from pki.store.device_models import DeviceCredential
from pki.store.driver import CompiledStatement
from pki.store.models import ApiToken, UTCDateTime

if TYPE_CHECKING:
    from pki.store.db import Store

_CREDENTIALS = DeviceCredential.__table__
_TOKENS = ApiToken.__table__
_ID = bindparam("p_id")
_NOW = bindparam("p_now", type_=UTCDateTime())
_CLAIM_TOKEN = (
    _TOKENS.update().where(_TOKENS.c.id == _ID, _TOKENS.c.used_at.is_(None)).values(used_at=_NOW)
)
_CLAIM_CREDENTIAL = (
    _CREDENTIALS.update()
    .where(
        _CREDENTIALS.c.id == _ID,
        _CREDENTIALS.c.used_at.is_(None),
        _CREDENTIALS.c.expires_at > _NOW,
    )
    .values(used_at=_NOW)
)
# enrolling with one credential retires the device's other unused ones (a leaked spare
# must not enrol the device again)
_RETIRE_SIBLINGS = (
    _CREDENTIALS.update()
    .where(
        _CREDENTIALS.c.device_id
        == select(_CREDENTIALS.c.device_id).where(_CREDENTIALS.c.id == _ID).scalar_subquery(),
        _CREDENTIALS.c.id != _ID,
        _CREDENTIALS.c.used_at.is_(None),
        _CREDENTIALS.c.expires_at > _NOW,
    )
    .values(expires_at=_NOW)
)
_RELEASE = {
    "token": _TOKENS.update().where(_TOKENS.c.id == _ID).values(used_at=None),
    "credential": _CREDENTIALS.update().where(_CREDENTIALS.c.id == _ID).values(used_at=None),
}


@dataclass(frozen=True)
class SingleUseClaim:
    """A single-use secret to spend in the transaction that records the issuance:
    ``kind`` is ``token`` (an API token) or ``credential`` (a device credential)."""

    kind: str
    id: int


class Claims:
    """Spending and releasing single-use secrets."""

    def __init__(self, store: Store) -> None:
        self._store = store
        dialect = store.engine.dialect
        self._claim = {
            "token": CompiledStatement(_CLAIM_TOKEN, dialect),
            "credential": CompiledStatement(_CLAIM_CREDENTIAL, dialect),
        }
        self._retire_siblings = CompiledStatement(_RETIRE_SIBLINGS, dialect)

    def claim(self, cursor: Any, claim: SingleUseClaim) -> bool:
        """Spend ``claim`` inside the caller's write transaction; False if it was used or
        expired meanwhile."""
        params = {"p_id": claim.id, "p_now": self._store.clock.now()}
        if self._claim[claim.kind].run(cursor, params).rowcount != 1:
            return False
        if claim.kind == "credential":
            self._retire_siblings.run(cursor, params)
        return True

    def release(self, claim: SingleUseClaim) -> None:
        """Make a spent secret usable again: the issuance it was spent on failed before
        any certificate was handed out (its pending row is reconciled as usual)."""
        with self._store._tx() as s:
            self.release_in(s, claim)

    def release_in(self, session: Any, claim: SingleUseClaim) -> None:
        """:meth:`release` inside the caller's ORM write transaction."""
        session.execute(_RELEASE[claim.kind], {"p_id": claim.id})
