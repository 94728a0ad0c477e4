"""Revocation use-cases of :class:`pki.service.Pki`: publishing CRLs and answering OCSP.

* Base CRLs per issuer and partition (``crl.shards``), each with an issuingDistribution
  Point naming its URL and a Freshest CRL pointer to its delta; delta CRLs list what was
  revoked since their base. :meth:`publish_due` rebuilds what is due: bases before half
  their validity has passed, deltas a debounce interval after the newest revocation (a
  burst of revocations makes one CRL). Expired certificates leave the CRLs.
* OCSP answers from pre-signed responses (per serial and CertID hash); a revocation
  re-signs that certificate's responses at once; a request with a nonce or several
  CertIDs is signed live.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.audit import AuditRecord
from pki.durations import parse_duration
from pki.errors import NotFound
from pki.hsm_keys import hsm_private_key
from pki.ocsp import (
    HASHES,
    Answer,
    CertIdKey,
    CertIdRequest,
    MalformedRequest,
    OcspResult,
    Responder,
    build_response,
    error_response,
    issuer_name_hash,
    parse_request,
    public_key_hash,
)
from pki.ocsp_presigned import answering_issuers, stored_answer
from pki.revocation import CrlScope, build_crl_der, encode_entries
from pki.serials import new_serial, serial_hex
from pki.signer import build_ocsp_responder, ca_name, spki_der
from pki.store import Certificate, Crl, Issuer

if TYPE_CHECKING:
    from pki.config import Settings
    from pki.signer import CaUrls
    from pki.store import Store

#: certificates pre-signed per transaction: the writer lock is held only briefly
PRESIGN_BATCH = 100

log = logging.getLogger("hsmca.publisher")


class PublishingMixin:
    """CRL and OCSP use-cases; relies on the attributes :class:`Pki` provides."""

    settings: Settings
    store: Store
    urls: CaUrls
    clock: object

    def _publishing_init(self) -> None:
        self._responders: dict[str, Responder] = {}
        self._ocsp_hashes: dict[CertIdKey, str] | None = None
        self._publish_lock = threading.Lock()
        self._crls: dict[str, tuple[dt.datetime, bytes]] = {}
        #: when each retired issuer's last subscriber certificate expires (fixed once it is
        #: retired: it signs none after), so the per-second publisher asks only once
        self._retired_until: dict[str, dt.datetime | None] = {}

    # -- CRLs ------------------------------------------------------------------------------

    def _crl_shards(self, issuer: Issuer) -> list[int]:
        """Partitions of an issuer: issuing CAs are sharded, a root has one CRL."""
        if issuer.kind == "root":
            return [0]
        return list(range(max(1, self.settings.crl.shards)))

    def _scope_url(self, issuer: Issuer, shard: int) -> str:
        return self.urls.crl(issuer.id, None if issuer.kind == "root" else shard)

    def _delta_url(self, issuer: Issuer, shard: int) -> str:
        return self.urls.delta_crl(issuer.id, None if issuer.kind == "root" else shard)

    def publish_base_crls(self, issuer_id: str, kind: str = "base") -> list[Crl]:
        """Build and store a complete CRL for every partition of ``issuer_id``: a periodic
        ``base`` (what delta CRLs refer to) or a ``full`` refresh after revocations."""
        issuer = self._issuer(issuer_id)
        signer = self.signer(issuer_id)  # type: ignore[attr-defined]
        built_at = self.clock.now()  # type: ignore[attr-defined]
        now = built_at.replace(microsecond=0)
        validity = parse_duration(self.settings.crl.validity)
        shards = self._crl_shards(issuer)
        by_shard = encode_entries(self.store.revoked_entries(issuer_id, now), len(shards))
        published = []
        for shard in shards:
            number = self.store.next_crl_number(issuer_id)
            der = build_crl_der(
                signer,
                by_shard[shard],
                number,
                now,
                now + validity,
                # a root's CRL is complete for everything it signed: no IDP, no delta (the
                # self-signed root has no CDP, so a named scope would not match it)
                CrlScope()
                if issuer.kind == "root"
                else CrlScope(
                    url=self._scope_url(issuer, shard),
                    freshest_url=self._delta_url(issuer, shard),
                ),
            )
            crl = Crl(
                issuer_id=issuer_id,
                shard=shard,
                kind=kind,
                number=number,
                base_number=None,
                entries=len(by_shard[shard]),
                built_at=built_at,
                this_update=now,
                next_update=now + validity,
                der=der,
            )
            self.store.save_crl(crl)
            published.append(crl)
        self.store.prune_crls(issuer_id, now - validity)
        return published

    def publish_delta_crls(self, issuer_id: str) -> list[Crl]:
        """Delta CRLs (RFC 5280 5.2.4) against each partition's current base."""
        issuer = self._issuer(issuer_id)
        if issuer.kind == "root":
            return []  # root CRLs are complete and small: no deltas
        signer = self.signer(issuer_id)  # type: ignore[attr-defined]
        built_at = self.clock.now()  # type: ignore[attr-defined]
        now = built_at.replace(microsecond=0)
        validity = parse_duration(self.settings.crl.delta_validity)
        shards = self._crl_shards(issuer)
        published = []
        for shard in shards:
            base = self.store.latest_crl(issuer_id, shard, ("base",))
            if base is None:
                continue
            # whole seconds, like thisUpdate: an entry is never missed, at worst repeated
            since = base.this_update
            mine = encode_entries(self.store.revoked_entries(issuer_id, now, since), len(shards))[
                0 if len(shards) == 1 else shard
            ]
            number = self.store.next_crl_number(issuer_id)
            der = build_crl_der(
                signer,
                mine,
                number,
                now,
                min(now + validity, base.next_update),
                CrlScope(url=self._scope_url(issuer, shard), delta_of=base.number),
            )
            crl = Crl(
                issuer_id=issuer_id,
                shard=shard,
                kind="delta",
                number=number,
                base_number=base.number,
                entries=len(mine),
                built_at=built_at,
                this_update=now,
                next_update=min(now + validity, base.next_update),
                der=der,
            )
            self.store.save_crl(crl)
            published.append(crl)
        return published

    def current_crl(
        self, issuer_id: str, max_age: dt.timedelta = dt.timedelta(seconds=30)
    ) -> bytes:
        """The complete CRL of ``issuer_id`` (all partitions), rebuilt when older than
        ``max_age`` or than the newest revocation."""
        if issuer_id not in self.issuers():  # type: ignore[attr-defined]
            raise NotFound(f"no issuer {issuer_id!r}")
        cached = self._crls.get(issuer_id)
        now = self.clock.now()  # type: ignore[attr-defined]
        newest = self.store.latest_revocation(issuer_id)
        if (
            cached is None
            or now - cached[0] > max_age
            or (newest is not None and newest >= cached[0])
        ):
            cached = (now, self.build_crl(issuer_id))
            self._crls[issuer_id] = cached
        return cached[1]

    def build_crl(self, issuer_id: str, validity: dt.timedelta = dt.timedelta(days=1)) -> bytes:
        """A fresh full CRL (DER) for ``issuer_id`` with the next CRL number."""
        now = self.clock.now().replace(microsecond=0)  # type: ignore[attr-defined]
        number = self.store.next_crl_number(issuer_id)
        return build_crl_der(
            self.signer(issuer_id),  # type: ignore[attr-defined]
            encode_entries(self.store.revoked_entries(issuer_id, now))[0],
            number,
            now,
            now + validity,
        )

    def crl_document(self, name: str) -> bytes:
        """The DER CRL published as ``/crl/<name>.crl``: the newest complete CRL of that
        partition (refreshed first if a revocation is newer), or its delta."""
        issuer_id, shard, kind = self._parse_crl_name(name)
        issuer = self._issuer(issuer_id)
        if shard is None and len(self._crl_shards(issuer)) > 1:
            return self.current_crl(issuer_id)
        shard = shard or 0
        if shard not in self._crl_shards(issuer):
            raise NotFound(f"no CRL {name!r}")
        kinds = ("base", "full") if kind == "base" else ("delta",)
        latest = self.store.latest_crl(issuer_id, shard, kinds)
        if latest is None or self._outdated(issuer, shard, latest):
            with self._publish_lock:
                latest = self.store.latest_crl(issuer_id, shard, kinds)
                if latest is None or self._outdated(issuer, shard, latest):
                    if self.store.latest_crl(issuer_id, shard, ("base",)) is None:
                        self.publish_base_crls(issuer_id)
                    if kind == "base":
                        self.publish_base_crls(issuer_id, "full")
                    else:
                        self.publish_delta_crls(issuer_id)
                    latest = self.store.latest_crl(issuer_id, shard, kinds)
        if latest is None:
            raise NotFound(f"no CRL {name!r}")
        return latest.der

    def _outdated(self, issuer: Issuer, shard: int, crl: Crl) -> bool:
        now = self.clock.now()  # type: ignore[attr-defined]
        if crl.next_update <= now:
            return True
        newest = self.store.latest_revocation(
            issuer.id, None if len(self._crl_shards(issuer)) == 1 else shard
        )
        return newest is not None and newest > crl.built_at

    def _parse_crl_name(self, name: str) -> tuple[str, int | None, str]:
        kind = "base"
        if name.endswith("-delta"):
            kind, name = "delta", name[: -len("-delta")]
        issuer_id, _, shard = name.partition("-")
        if shard:
            if not shard.isdigit():
                raise NotFound(f"no CRL {name!r}")
            return issuer_id, int(shard), kind
        return issuer_id, None, kind

    def publish_due(self) -> dict[str, int]:
        """Rebuild whatever is due: base CRLs past half their validity, delta CRLs a
        debounce interval after new revocations (a burst makes one CRL) or past half their
        validity, OCSP responses about to go stale. Returns what was published."""
        counts = {"base_crls": 0, "delta_crls": 0, "ocsp": 0, "responders": 0}
        now = self.clock.now()  # type: ignore[attr-defined]
        base_half = parse_duration(self.settings.crl.validity) / 2
        delta_half = parse_duration(self.settings.crl.delta_validity) / 2
        debounce = dt.timedelta(seconds=self.settings.crl.debounce_seconds)
        with self._publish_lock:
            for issuer in list(self.issuers().values()):  # type: ignore[attr-defined]
                if issuer.not_after <= now:
                    continue  # an expired CA vouches for nothing any more
                if not issuer.active and not self._still_vouching(issuer, now):
                    continue  # retired, and its last certificate has expired
                try:
                    self._publish_issuer(issuer, now, counts, base_half, delta_half, debounce)
                except Exception:
                    # one issuer's trouble must not stop the others' CRLs and OCSP
                    log.exception("publishing failed", extra={"issuer": issuer.id})
        return counts

    def _publish_issuer(
        self,
        issuer: Issuer,
        now: dt.datetime,
        counts: dict[str, int],
        base_half: dt.timedelta,
        delta_half: dt.timedelta,
        debounce: dt.timedelta,
    ) -> None:
        base = self.store.latest_crl(issuer.id, 0, ("base",))
        if base is None or base.next_update - now < base_half:
            counts["base_crls"] += len(self.publish_base_crls(issuer.id))
            base = self.store.latest_crl(issuer.id, 0, ("base",))
        assert base is not None
        delta = self.store.latest_crl(issuer.id, 0, ("delta",))
        if delta is not None and delta.base_number != base.number:
            delta = None
        covered = delta.built_at if delta is not None else base.built_at
        newest = self.store.latest_revocation(issuer.id)
        revoked_since = newest is not None and newest > covered
        if revoked_since and now - newest < debounce:  # type: ignore[operator]
            return  # more may follow: one CRL for the whole burst
        if revoked_since:
            counts["base_crls"] += len(self.publish_base_crls(issuer.id, "full"))
        needs_delta = issuer.kind != "root" and (
            delta is None or delta.next_update - now < delta_half
        )
        if revoked_since or needs_delta:
            counts["delta_crls"] += len(self.publish_delta_crls(issuer.id))
        if issuer.kind == "intermediate" and issuer.ocsp_serial:
            if self._responder_due(issuer):
                self.issue_ocsp_responder(issuer.id)
                counts["responders"] += 1
            counts["ocsp"] += self.presign_ocsp(issuer.id)

    def _still_vouching(self, issuer: Issuer, now: dt.datetime) -> bool:
        """A retired issuer keeps its CRLs and OCSP until its last certificate expires."""
        if issuer.id not in self._retired_until:
            self._retired_until[issuer.id] = self.store.lifecycle.last_expiry(issuer.id)
        last = self._retired_until[issuer.id]
        return last is not None and last > now

    # -- OCSP ------------------------------------------------------------------------------

    def _issuer(self, issuer_id: str) -> Issuer:
        issuer = self.issuers().get(issuer_id) or self.issuers(  # type: ignore[attr-defined]
            refresh=True
        ).get(issuer_id)
        if issuer is None:
            raise NotFound(f"no issuer {issuer_id!r}")
        return issuer

    def responder(self, issuer_id: str) -> Responder:
        """The delegated OCSP responder of ``issuer_id`` (certificate and HSM key)."""
        if issuer_id not in self._responders:
            issuer = self._issuer(issuer_id)
            if not issuer.ocsp_serial or not issuer.ocsp_key_label:
                raise NotFound(f"issuer {issuer_id} has no OCSP responder")
            row = self.store.certificate(issuer.ocsp_serial)
            assert row.der is not None
            self._responders[issuer_id] = Responder(
                certificate=x509.load_der_x509_certificate(row.der),
                key=hsm_private_key(self.hsm, issuer.ocsp_key_label),  # type: ignore[attr-defined]
            )
        return self._responders[issuer_id]

    def issue_ocsp_responder(self, issuer_id: str, key_label: str | None = None) -> str:
        """Issue (or re-issue) the delegated OCSP responder certificate of ``issuer_id``
        for its HSM key; recorded before it is signed, like every certificate."""
        issuer = self._issuer(issuer_id)
        label = key_label or issuer.ocsp_key_label
        if not label:
            raise NotFound(f"issuer {issuer_id} has no OCSP responder key")
        signer = self.signer(issuer_id)  # type: ignore[attr-defined]
        public_key = hsm_private_key(self.hsm, label).public_key()  # type: ignore[attr-defined]
        now = self.clock.now().replace(microsecond=0)  # type: ignore[attr-defined]
        org = self.settings.ca.organisation
        subject = ca_name(org, f"{org} OCSP {issuer_id[:8]}")
        not_before = max(now - dt.timedelta(minutes=5), signer.certificate.not_valid_before_utc)
        not_after = min(
            now + parse_duration(self.settings.ca.ocsp_ttl), signer.certificate.not_valid_after_utc
        )
        number = new_serial()
        serial = serial_hex(number)
        spki = spki_der(public_key)
        self.store.insert_pending(
            {
                "serial": serial,
                "issuer_id": issuer_id,
                "subject": subject.rfc4514_string(),
                "common_name": None,
                "sans": [],
                "profile": "ocsp-responder",
                "requester": "system",
                "public_key_sha256": hashlib.sha256(spki).hexdigest(),
                "spki": spki,
                "not_before": not_before,
                "not_after": not_after,
                "crl_shard": self.urls.shard_of(number),
            }
        )
        cert = build_ocsp_responder(signer, public_key, subject, number, not_before, not_after)
        self.store.complete_issuance(
            serial,
            cert.public_bytes(Encoding.DER),
            AuditRecord(
                action="certificate.issue",
                actor="system",
                subject=serial,
                details={"profile": "ocsp-responder", "issuer": issuer_id, "key": label},
            ),
        )
        self.store.set_issuer_ocsp(issuer_id, label, serial)
        self.issuers(refresh=True)  # type: ignore[attr-defined]
        return serial

    def _responder_due(self, issuer: Issuer) -> bool:
        """True when the responder certificate has used two thirds of its life."""
        responder = self.responder(issuer.id)
        cert = responder.certificate
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        remaining = cert.not_valid_after_utc - self.clock.now()  # type: ignore[attr-defined]
        return remaining < life / 3

    def _issuer_for(self, item: CertIdRequest) -> str | None:
        if self._ocsp_hashes is None:
            self._ocsp_hashes = answering_issuers(
                self.issuers().values()  # type: ignore[attr-defined]
            )
        return self._ocsp_hashes.get(
            (item.hash_algorithm, item.issuer_name_hash, item.issuer_key_hash)
        )

    def _answer(self, issuer_id: str, item: CertIdRequest, now: dt.datetime) -> Answer:
        try:
            row = self.store.certificate(serial_hex(item.serial))
        except NotFound:
            row = None
        validity = parse_duration(self.settings.ocsp.validity)
        return _answer_from(row, issuer_id, item, now.replace(microsecond=0), validity)

    def ocsp_respond(self, request_der: bytes) -> OcspResult:
        """Answer an OCSP request (RFC 6960): pre-signed when possible, else signed now."""
        try:
            request = parse_request(request_der)
        except MalformedRequest:
            return OcspResult(error_response("malformed_request"))
        issuer_ids = [self._issuer_for(item) for item in request.items]
        if any(i is None for i in issuer_ids) or len(set(issuer_ids)) != 1:
            return OcspResult(error_response("unauthorized"))
        issuer_id = issuer_ids[0]
        assert issuer_id is not None
        now = self.clock.now()  # type: ignore[attr-defined]
        if len(request.items) == 1 and request.nonce is None:
            item = request.items[0]
            stored = stored_answer(
                self.store, issuer_id, serial_hex(item.serial), item.hash_algorithm, now
            )
            if stored is not None:
                return stored
        answers = [self._answer(issuer_id, item, now) for item in request.items]
        der = build_response(
            self.responder(issuer_id), answers, now.replace(microsecond=0), request.nonce
        )
        if len(answers) == 1 and request.nonce is None:
            answer = answers[0]
            if answer.status != "unknown":
                self.store.save_ocsp_responses([_ocsp_row(issuer_id, answer, der)])
            return OcspResult(
                der, answer.this_update, answer.next_update, answer.status != "unknown"
            )
        return OcspResult(der)

    def presign_ocsp(self, issuer_id: str, serials: list[str] | None = None) -> int:
        """Sign and store fresh responses (SHA-1 and SHA-256 CertIDs) for ``serials`` or
        for every certificate whose response is missing or past half its validity."""
        now = self.clock.now()  # type: ignore[attr-defined]
        validity = parse_duration(self.settings.ocsp.validity)
        if serials is None:
            rows = self.store.certificates_for_ocsp(
                issuer_id, now + validity / 2, now, PRESIGN_BATCH
            )
        else:
            rows = self.store.certificates_by_serial(serials)
        issuer_cert = x509.load_der_x509_certificate(self._issuer(issuer_id).der)
        issuer_hashes = {
            alg: (issuer_name_hash(issuer_cert, alg), public_key_hash(issuer_cert, alg))
            for alg in HASHES
        }
        responder = self.responder(issuer_id)
        this_update = now.replace(microsecond=0)
        saved = []
        for row in rows:
            for alg, (name_hash, key_hash) in issuer_hashes.items():
                item = _cert_id(alg, name_hash, key_hash, int(row.serial, 16))
                answer = _answer_from(row, issuer_id, item, this_update, validity)
                if answer.status == "unknown":
                    continue
                der = build_response(responder, [answer], this_update, None)
                saved.append(_ocsp_row(issuer_id, answer, der))
        return self.store.save_ocsp_responses(saved)


def _answer_from(
    row: Certificate | None,
    issuer_id: str,
    item: CertIdRequest,
    this_update: dt.datetime,
    validity: dt.timedelta,
) -> Answer:
    """What to state for ``item``, given its certificate row (None: never issued)."""
    next_update = this_update + validity
    if row is None or row.issuer_id != issuer_id or row.status == "pending":
        return Answer(item, "unknown", this_update, next_update)
    if row.status == "revoked":
        revoked_at = row.revoked_at.replace(microsecond=0) if row.revoked_at else None
        return Answer(item, "revoked", this_update, next_update, revoked_at, row.revocation_reason)
    return Answer(item, "good", this_update, next_update)


def _cert_id(algorithm: str, name_hash: bytes, key_hash: bytes, serial: int) -> CertIdRequest:
    from asn1crypto import ocsp

    cert_id = ocsp.CertId(
        {
            "hash_algorithm": {"algorithm": algorithm},
            "issuer_name_hash": name_hash,
            "issuer_key_hash": key_hash,
            "serial_number": serial,
        }
    )
    return CertIdRequest(cert_id, algorithm, name_hash, key_hash, serial)


def _ocsp_row(issuer_id: str, answer: Answer, der: bytes) -> dict[str, object]:
    return {
        "serial": serial_hex(answer.request.serial),
        "hash_algorithm": answer.request.hash_algorithm,
        "issuer_id": issuer_id,
        "status": answer.status,
        "this_update": answer.this_update,
        "next_update": answer.next_update,
        "der": der,
    }
