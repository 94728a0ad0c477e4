"""mTLS identity and renewal: a certificate this CA issued authenticates its holder, who
may renew it for the same identity (REST renew, EST simplereenroll, the agent)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_der_public_key

from pki.actors import Actor
from pki.errors import Forbidden, NotFound, PolicyError, Unauthorised
from pki.policy import RequestedNames, parse_csr
from pki.records import CertificateRecord
from pki.serials import serial_hex

if TYPE_CHECKING:
    from pki.clock import Clock
    from pki.config import Settings
    from pki.profiles import ProfileRegistry
    from pki.store import Store


class RenewalMixin:
    """Renewal use-cases of :class:`pki.service.Pki`."""

    settings: Settings
    store: Store
    clock: Clock
    profiles: ProfileRegistry

    def authenticate_certificate(self, der: bytes) -> CertificateRecord:
        """The record of a client certificate this CA issued, still good; else Unauthorised."""
        try:
            cert = x509.load_der_x509_certificate(der)
            row = self.store.certificate(serial_hex(cert.serial_number))
        except (ValueError, NotFound):
            row = None
        if row is None or row.der != der:
            self.audit_refusal("auth.mtls", None, "client certificate not issued by this CA")
            raise Unauthorised("client certificate was not issued by this CA")
        if row.status != "good" or row.not_after <= self.clock.now():
            self.audit_refusal("auth.mtls", row.serial, f"client certificate {row.status}")
            raise Unauthorised("client certificate is revoked or expired")
        return CertificateRecord.from_row(row, self.clock.now(), self.chain_pem(row.issuer_id))

    def renew(
        self,
        presented_der: bytes,
        csr: str | bytes | None = None,
        action: str = "certificate.renew",
        details: dict[str, object] | None = None,
        names_from_certificate: bool = False,
    ) -> CertificateRecord:
        """A new certificate for the identity of ``presented_der`` (same names and profile),
        for a new key from ``csr`` or the same key; authenticated by the TLS handshake.
        ``names_from_certificate``: the CSR supplies only the key (the caller checked its
        identity), as for a device re-enrolling over EST."""
        current = self.authenticate_certificate(presented_der)
        row = self.store.certificate(current.serial)
        actor = Actor(name=row.requester, role="issuer", allowed_names=("*",))
        profile = self.profiles.get(row.profile)
        device_id = (row.device_id or row.common_name) if profile.device else None
        if csr is None:
            public_key = load_der_public_key(row.spki)
            names = _names_from_tags(row.sans)
            common_name = row.common_name
        else:
            try:
                parsed = parse_csr(csr, self.settings.policy, not profile.device)
            except PolicyError as exc:
                self._refused(actor, action, row.serial, str(exc))
                raise
            public_key, common_name = parsed.public_key, row.common_name
            # a device's identity is its id (checked by the caller), not the CSR's names
            names = (
                _names_from_tags(row.sans)
                if names_from_certificate
                else self._names_for(profile, parsed.names, device_id)
            )
            if set(names.tagged()) != set(row.sans):
                why = "a renewal must request the same names as the current certificate"
                self._refused(actor, action, row.serial, why)
                raise Forbidden(f"{why} ({', '.join(row.sans)})")
        lifetime = row.not_after - row.not_before
        lifetime -= dt.timedelta(seconds=self.settings.ca.backdate_seconds)
        old_issuer = self.issuers().get(row.issuer_id)
        if old_issuer is not None and row.not_after >= old_issuer.not_after:
            # cut short by its issuing CA's end of life: renew with the profile's lifetime,
            # not the shortened one (which would otherwise be inherited from then on)
            lifetime = profile.default_ttl
        lifetime = min(max(lifetime, dt.timedelta(minutes=5)), profile.max_ttl)
        return self.issue_for_key(
            public_key,
            names,
            common_name,
            profile.name,
            lifetime,
            actor,
            device_id,
            action=action,
            details={"renewal_of": row.serial, "authenticated_by": "mtls", **(details or {})},
            via="renewal",
        )


def _names_from_tags(tags: list[str]) -> RequestedNames:
    """Inverse of :meth:`RequestedNames.tagged`."""
    by_kind: dict[str, list[str]] = {"dns": [], "ip": [], "uri": []}
    for tag in tags:
        kind, _, value = tag.partition(":")
        by_kind[kind].append(value)
    return RequestedNames(tuple(by_kind["dns"]), tuple(by_kind["ip"]), tuple(by_kind["uri"]))
