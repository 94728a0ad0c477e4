"""Replay nonces (RFC 8555 section 6.5) that need no shared memory.

A nonce is ``time || random || MAC(key, time || random)``: any instance holding the
server-wide key (kept in the database) can tell one of ours from a forgery and how old it
is, and a used nonce is recorded in the database until it would have expired anyway, so
a replay is caught whichever instance or worker it reaches.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets

from pki.acme.jws import b64u, b64u_decode
from pki.acme.problems import AcmeProblem
from pki.clock import Clock
from pki.store.acme_store import AcmeStore

NONCE_LIFETIME = dt.timedelta(hours=1)
#: one redemption in this many also deletes expired records of use
PRUNE_EVERY = 500
_TIME_BYTES = 6
_RANDOM_BYTES = 10
_MAC_BYTES = 16


class Nonces:
    """Mints and redeems nonces with the MAC key ``key``."""

    def __init__(self, key: bytes, store: AcmeStore, clock: Clock) -> None:
        self._key = key
        self._store = store
        self._clock = clock

    def mint(self) -> str:
        """A fresh nonce."""
        stamp = int(self._clock.now().timestamp()).to_bytes(_TIME_BYTES, "big")
        body = stamp + os.urandom(_RANDOM_BYTES)
        return b64u(body + self._mac(body))

    def redeem(self, nonce: str) -> None:
        """Accept ``nonce`` once; badNonce if it is forged, expired or used before."""
        try:
            raw = b64u_decode(nonce, "nonce")
        except AcmeProblem:
            raise AcmeProblem("badNonce", "the nonce is not one this server issued") from None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(body) != _TIME_BYTES + _RANDOM_BYTES or not hmac.compare_digest(
            mac, self._mac(body)
        ):
            raise AcmeProblem("badNonce", "the nonce is not one this server issued")
        minted = dt.datetime.fromtimestamp(int.from_bytes(body[:_TIME_BYTES], "big"), dt.UTC)
        now = self._clock.now()
        expires = minted + NONCE_LIFETIME
        if expires <= now or minted > now + dt.timedelta(minutes=5):
            raise AcmeProblem("badNonce", "the nonce has expired; use the fresh Replay-Nonce")
        if not self._store.use_nonce(nonce, expires):
            raise AcmeProblem("badNonce", "the nonce was already used; use the fresh Replay-Nonce")
        if secrets.randbelow(PRUNE_EVERY) == 0:
            self._store.prune_nonces(now)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]
