"""The OCSP responder's fast path: a plain request answered from its pre-signed response.

It needs neither the HSM nor the ORM, so the OCSP front end runs it for every request
(about 20 us). :meth:`PresignedResponses.answer` returns ``None`` whenever the full
responder (:meth:`pki.service.Pki.ocsp_respond`) must answer instead: a request that is
not exactly one CertID without extensions (a nonce is signed live), an issuer it does not
know, no stored response, or one outside its validity window. ``None`` is never a
verdict, so this path cannot say anything the full responder would not.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable

from cryptography.x509 import ocsp

from pki.clock import Clock
from pki.ocsp import CertIdKey, OcspResult, cert_id_index
from pki.serials import serial_hex
from pki.store import Issuer, Store

#: how long an issuer index is trusted before it is read again (new issuing CAs appear
#: within this time; until then their requests take the full path, which knows them)
ISSUER_REFRESH_SECONDS = 30.0
#: parsed requests remembered (clients ask the same question again and again)
PARSED_MEMO_ENTRIES = 20_000
#: only requests this small are remembered (a plain one is ~100 bytes)
PARSED_MEMO_MAX_BYTES = 512


def _parse(request_der: bytes) -> tuple[CertIdKey, str] | None:
    """The CertID of a plain single request, or None (garbage, several CertIDs, an
    unsupported hash, any extension)."""
    try:
        request = ocsp.load_der_ocsp_request(request_der)
        if len(request.extensions):
            return None
        key = (request.hash_algorithm.name, request.issuer_name_hash, request.issuer_key_hash)
        return key, serial_hex(request.serial_number)
    except Exception:  # any parse failure (UnsupportedAlgorithm too): ask the full path
        return None


def stored_answer(
    store: Store, issuer_id: str, serial: str, hash_algorithm: str, now: dt.datetime
) -> OcspResult | None:
    """The pre-signed answer stored for one CertID of ``issuer_id``, if valid at ``now``."""
    stored = store.presigned_ocsp(serial, hash_algorithm)
    if stored is None or stored.issuer_id != issuer_id:
        return None
    if not stored.this_update <= now < stored.next_update:
        return None
    return OcspResult(stored.der, stored.this_update, stored.next_update, True)


def answering_issuers(issuers: Iterable[Issuer]) -> dict[CertIdKey, str]:
    """CertID issuer keys of the issuers this responder answers for (issuing CAs with a
    delegated responder), each mapped to its issuer id."""
    return cert_id_index(
        (issuer.id, issuer.der)
        for issuer in issuers
        if issuer.kind == "intermediate" and issuer.ocsp_serial
    )


class PresignedResponses:
    """Answers single-CertID requests from the store's pre-signed responses."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._issuers: dict[CertIdKey, str] = {}
        self._issuers_read_at = float("-inf")
        self._parsed: dict[bytes, tuple[CertIdKey, str]] = {}

    def answer(self, request_der: bytes) -> OcspResult | None:
        """The stored answer to ``request_der``, or ``None``: ask the full responder."""
        parsed = self._parsed.get(request_der)
        if parsed is None:
            parsed = _parse(request_der)
            if parsed is None:
                return None
            if len(request_der) <= PARSED_MEMO_MAX_BYTES:  # bound the memory it may hold
                if len(self._parsed) >= PARSED_MEMO_ENTRIES:
                    self._parsed.clear()
                self._parsed[request_der] = parsed
        key, serial = parsed
        issuer_id = self._issuer_index().get(key)
        if issuer_id is None:
            return None
        return stored_answer(self.store, issuer_id, serial, key[0], self.clock.now())

    def _issuer_index(self) -> dict[CertIdKey, str]:
        if time.monotonic() - self._issuers_read_at > ISSUER_REFRESH_SECONDS:
            self._issuers = answering_issuers(self.store.issuers())
            self._issuers_read_at = time.monotonic()
        return self._issuers
