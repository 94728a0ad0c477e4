"""Use-cases: one method per operation, called by the HTTP and CLI layers.

:class:`Pki` wires policy (RA), signer (CA), store (SA), HSM and audit together. It owns
no web or CLI concerns; it takes plain values and an :class:`~pki.actors.Actor`, and
returns records or raises :mod:`pki.errors`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

from cryptography import x509

from pki.access import AccessMixin, CreatedToken, token_digest
from pki.actors import Actor
from pki.audit import AuditRecord, VerifyResult, verify_chain
from pki.clock import Clock, SystemClock
from pki.config import Settings, load_settings, resolve_home
from pki.devices import DevicesMixin
from pki.errors import (
    Conflict,
    Forbidden,
    HsmcaError,
    HsmError,
    InvalidInput,
    NotFound,
    NotInitialised,
)
from pki.hsm import Hsm
from pki.hsm_keys import hsm_private_key
from pki.issuance import IssuanceMixin, IssueRequest
from pki.ocsp import OcspResult
from pki.profiles import ProfileRegistry
from pki.publishing import PublishingMixin
from pki.records import CertificateRecord, pem_of
from pki.renewal import RenewalMixin
from pki.revocation import parse_reason
from pki.serials import parse_serial
from pki.signer import (
    CaUrls,
    SigningIssuer,
    spki_der,
)
from pki.store import CertificateQuery, Issuer, Store

log = logging.getLogger("hsmca.core")

#: how often a process re-reads the issuers (to see a rotation done by another process)
ISSUER_REFRESH_SECONDS = 30.0


class Pki(AccessMixin, IssuanceMixin, RenewalMixin, DevicesMixin, PublishingMixin):
    """The core of one process: settings, store, HSM and clock, plus the use-cases."""

    def __init__(self, settings: Settings, store: Store, hsm: Hsm, clock: Clock) -> None:
        self.settings = settings
        self.store = store
        self.hsm = hsm
        self.clock = clock
        self.profiles = ProfileRegistry(settings)
        self.urls = CaUrls(settings.server.public_http_url, settings.crl.shards)
        self._signers: dict[str, SigningIssuer] = {}
        self._chains: dict[str, str] = {}
        self._publishing_init()
        self._issuers: dict[str, Issuer] | None = None
        self._issuers_read = 0.0

    @classmethod
    def open(
        cls, home: str | Path | None = None, clock: Clock | None = None, upgrade: bool = True
    ) -> Pki:
        """Open an initialised home. Raises NotInitialised with a hint if it is not."""
        root = resolve_home(home)
        settings = load_settings(root)
        if not (root / "hsmca.toml").exists():
            raise NotInitialised(f"{root} is not initialised: run `hsmca init --home {root}`")
        return cls.from_settings(settings, clock, upgrade)

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: Clock | None = None, upgrade: bool = True
    ) -> Pki:
        clock = clock or SystemClock()
        store = Store(settings.database.url, clock, settings.database.busy_timeout_seconds)
        if upgrade:
            store.upgrade()
        hsm = Hsm(
            settings.hsm.module,
            settings.hsm.token_label,
            settings.hsm_pin,
            settings.hsm.softhsm2_conf or None,
        )
        return cls(settings, store, hsm, clock)

    def close(self) -> None:
        self.hsm.close()
        self.store.dispose()

    # -- issuers ---------------------------------------------------------------------------

    def issuers(self, refresh: bool = False) -> dict[str, Issuer]:
        """The issuers by id. Re-read every :data:`ISSUER_REFRESH_SECONDS` (another
        process may have rotated the issuing CA); the caches built on them are dropped only
        when something changed."""
        now = time.monotonic()
        if self._issuers is None or refresh or now - self._issuers_read > ISSUER_REFRESH_SECONDS:
            fresh = {i.id: i for i in self.store.issuers()}
            self._issuers_read = now
            if (
                refresh
                or self._issuers is None
                or _issuer_state(fresh) != _issuer_state(self._issuers)
            ):
                self._signers.clear()
                self._chains.clear()
                self._responders.clear()
                self._ocsp_hashes = None
            self._issuers = fresh
        return self._issuers

    def root_issuer(self) -> Issuer:
        roots = [i for i in self.issuers().values() if i.kind == "root" and i.active]
        if not roots:
            raise NotInitialised("no root CA: run `hsmca init`")
        return roots[-1]

    def issuing_issuer(self, issuer_id: str | None = None) -> Issuer:
        """The issuer ``issuer_id`` or the newest active intermediate."""
        issuers = self.issuers()
        if issuer_id:
            if issuer_id not in issuers:
                raise NotFound(f"no issuer {issuer_id!r}")
            return issuers[issuer_id]
        active = [i for i in issuers.values() if i.kind == "intermediate" and i.active]
        if not active:
            raise NotInitialised("no issuing CA: run `hsmca init`")
        return active[-1]

    def signer(self, issuer_id: str) -> SigningIssuer:
        """The issuer ready to sign (its HSM key handle cached for the process)."""
        if issuer_id not in self._signers:
            issuer = self.issuers()[issuer_id]
            self._signers[issuer_id] = SigningIssuer(
                id=issuer.id,
                certificate=x509.load_der_x509_certificate(issuer.der),
                key=hsm_private_key(self.hsm, issuer.key_label),
            )
        return self._signers[issuer_id]

    def chain_pem(self, issuer_id: str) -> str:
        """PEM of the issuing CA up to, not including, the root (leaf-to-root order)."""
        if issuer_id not in self._chains:
            issuers = self.issuers()
            parts: list[str] = []
            current = issuers.get(issuer_id)
            while current is not None and current.kind != "root":
                parts.append(pem_of(current.der))
                current = issuers.get(current.parent_id) if current.parent_id else None
            self._chains[issuer_id] = "".join(parts)
        return self._chains[issuer_id]

    # -- reading ---------------------------------------------------------------------------

    def show(self, serial: str) -> CertificateRecord:
        row = self.store.certificate(parse_serial(serial))
        return CertificateRecord.from_row(row, self.clock.now(), self.chain_pem(row.issuer_id))

    def list_certificates(
        self, query: CertificateQuery
    ) -> tuple[list[CertificateRecord], str | None]:
        if query.status not in (None, "pending", "good", "revoked", "expired"):
            raise InvalidInput(
                f"unknown status {query.status!r}; one of pending, good, revoked, expired"
            )
        if not 1 <= query.limit <= 1000:
            raise InvalidInput("limit must be between 1 and 1000")
        page = self.store.list_certificates(query)
        now = self.clock.now()
        return (
            [CertificateRecord.from_row(r, now, self.chain_pem(r.issuer_id)) for r in page.items],
            page.next_cursor,
        )

    # -- revocation ------------------------------------------------------------------------

    def revoke(
        self,
        serial: str,
        reason: str | None,
        actor: Actor,
        invalidity_date: dt.datetime | None = None,
    ) -> CertificateRecord:
        """Revoke a certificate (admin, or the issuer token that requested it). Its OCSP
        responses are re-signed at once; CRLs follow within the debounce interval."""
        canonical = parse_serial(serial)
        reason_name = parse_reason(reason)
        row = self.store.certificate(canonical)
        if actor.role != "admin" and not (actor.role == "issuer" and row.requester == actor.name):
            self._refused(actor, "certificate.revoke", canonical, "not allowed")
            raise Forbidden(f"{actor.name} may not revoke {canonical}")
        now = self.clock.now()
        if invalidity_date is not None and invalidity_date > now:
            raise InvalidInput("invalidity_date must not be in the future")
        self.store.revoke(
            canonical,
            reason_name,
            now,
            AuditRecord(
                action="certificate.revoke",
                actor=actor.name,
                subject=canonical,
                details={"reason": reason_name},
            ),
            invalidity_date,
        )
        issuer = self.issuers().get(row.issuer_id)
        if issuer is not None and issuer.ocsp_serial:
            try:
                self.presign_ocsp(row.issuer_id, [canonical])
            except HsmError as exc:
                # revoked all the same (its old "good" response is gone, so OCSP answers
                # tryLater, never good); the publisher signs its response when it can
                log.warning("revoked %s; its OCSP response waits for the HSM: %s", canonical, exc)
        return self.show(canonical)

    def reconcile_pending(self, grace: dt.timedelta | None = None) -> list[str]:
        """Revoke rows left ``pending`` by an interrupted issuance (maybe signed, never
        stored): a known, revoked row is safe whichever side of the HSM call the crash was."""
        if grace is None:
            grace = dt.timedelta(seconds=self.settings.ca.pending_grace_seconds)
        done = []
        for row in self.store.pending_before(self.clock.now() - grace):
            try:
                self.store.revoke(
                    row.serial,
                    "cessationOfOperation",
                    self.clock.now(),
                    AuditRecord(
                        action="certificate.reconcile",
                        actor="system",
                        subject=row.serial,
                        details={"was": "pending", "now": "revoked"},
                    ),
                )
                done.append(row.serial)
            except Conflict:
                continue
        return done

    # -- service information ---------------------------------------------------------------

    def health(self) -> dict[str, str]:
        """Check the database and the HSM (the issuing key is reachable)."""
        status: dict[str, str] = {}
        try:
            self.store.ping()
            status["database"] = "ok"
        except Exception as exc:
            status["database"] = f"error: {type(exc).__name__}"
        try:
            issuer = self.issuing_issuer()
            self.hsm.public_key(issuer.key_label)
            status["hsm"] = "ok" if self.hsm.has_key(issuer.key_label) else "key missing"
        except HsmcaError as exc:
            status["hsm"] = f"error: {exc.kind}"
        return status

    def issuer_der(self, issuer_id: str) -> bytes:
        """The DER certificate of issuer ``issuer_id`` (the AIA caIssuers document)."""
        issuer = self.issuers().get(issuer_id) or self.issuers(refresh=True).get(issuer_id)
        if issuer is None:
            raise NotFound(f"no issuer {issuer_id!r}")
        return issuer.der

    # -- audit -----------------------------------------------------------------------------

    def verify_audit(self) -> VerifyResult:
        return verify_chain(self.store.audit_events())


def _issuer_state(issuers: dict[str, Issuer]) -> set[tuple[str, bool, str | None]]:
    return {(i.id, i.active, i.ocsp_serial) for i in issuers.values()}


__all__ = ["CreatedToken", "IssueRequest", "OcspResult", "Pki", "spki_der", "token_digest"]
