"""``hsmca init``: the home, the SoftHSM2 token, the CA hierarchy, the server's TLS
certificate and the first CRLs. Idempotent: each step checks before it creates.

Keys carry fixed labels (``root-1``, ``issuing-1``, ``ocsp-<issuer>-1``), so an ``init``
interrupted after generating a key picks the same key up on the next run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pki.actors import SYSTEM
from pki.audit import AuditRecord
from pki.clock import Clock, SystemClock
from pki.config import load_settings, write_default_config
from pki.durations import parse_duration
from pki.hsm_keys import hsm_private_key
from pki.policy import classify_names
from pki.records import pem_of
from pki.serials import new_serial
from pki.service import Pki
from pki.signer import (
    build_intermediate,
    build_root,
    ca_name,
    spki_der,
)
from pki.softhsm import ensure_token, is_softhsm, write_secret
from pki.store import Issuer


@dataclass
class InitReport:
    home: Path
    created: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created)


def issuer_id_for(public_key: object) -> str:
    """A short stable id for an issuer, from its public key (used in CRL/CA URLs)."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()[:16]


def initialise(
    home: Path,
    organisation: str | None = None,
    hostnames: tuple[str, ...] = (),
    clock: Clock | None = None,
) -> InitReport:
    """Create whatever of the home is missing; report what was created."""
    clock = clock or SystemClock()
    report = InitReport(home=home)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in hostnames:
        classify_names([name])
    if not (home / "hsmca.toml").exists():
        ca: dict[str, object] = {"hostnames": list(hostnames)}
        if organisation:
            ca["organisation"] = organisation
        write_default_config(home, {"ca": ca})
        report.created.append(f"configuration {home / 'hsmca.toml'}")
    else:
        settings = load_settings(home)
        if organisation and organisation != settings.ca.organisation:
            report.notes.append("--org ignored: the home exists (edit ca.organisation)")
        missing = [h for h in hostnames if h not in settings.ca.hostnames]
        if missing:
            report.notes.append(
                f"--hostname {' '.join(missing)} ignored: add them to ca.hostnames in hsmca.toml"
            )
    settings = load_settings(home)
    settings.secrets_dir.mkdir(mode=0o700, exist_ok=True)
    if is_softhsm(settings.hsm.module) and ensure_token(settings):
        report.created.append(f"SoftHSM2 token {settings.hsm.token_label!r} in {home / 'tokens'}")
    pki = Pki.from_settings(settings, clock)
    try:
        _ensure_hierarchy(pki, report)
        _ensure_server_certificate(pki, report)
        _ensure_crls(pki, report)
        export_ca_files(pki)
    finally:
        pki.close()
    return report


def _key(pki: Pki, label: str, spec: str, report: InitReport) -> object:
    if not pki.hsm.has_key(label):
        pki.hsm.generate_key(label, spec)
        report.created.append(f"{spec} key {label!r} inside the HSM (non-extractable)")
    return hsm_private_key(pki.hsm, label)


def _ensure_hierarchy(pki: Pki, report: InitReport) -> None:
    s = pki.settings.ca
    now = pki.clock.now().replace(microsecond=0)
    issuers = pki.issuers(refresh=True)
    roots = [i for i in issuers.values() if i.kind == "root"]
    if not roots:
        key = _key(pki, "root-1", s.root_key, report)
        cert = build_root(
            key,  # type: ignore[arg-type]
            ca_name(s.organisation, f"{s.organisation} Root CA"),
            new_serial(),
            now - dt.timedelta(minutes=5),
            now + parse_duration(s.root_ttl),
        )
        _add_issuer(pki, cert, "root", None, "root-1", s.root_key, now)
        report.created.append(f"root CA certificate {cert.subject.rfc4514_string()}")
        issuers = pki.issuers(refresh=True)
    root = pki.root_issuer()
    if not [i for i in issuers.values() if i.kind == "intermediate"]:
        key = _key(pki, "issuing-1", s.issuing_key, report)
        cert = build_intermediate(
            pki.signer(root.id),
            key.public_key(),  # type: ignore[attr-defined]
            ca_name(s.organisation, f"{s.organisation} Issuing CA 1"),
            new_serial(),
            now - dt.timedelta(minutes=5),
            now + parse_duration(s.issuing_ttl),
            pki.urls,
            s.name_constraints,
        )
        _add_issuer(pki, cert, "intermediate", root.id, "issuing-1", s.issuing_key, now)
        report.created.append(f"issuing CA certificate {cert.subject.rfc4514_string()}")
        pki.issuers(refresh=True)
    for issuer in list(pki.issuers().values()):
        if issuer.kind == "intermediate" and issuer.active and not issuer.ocsp_serial:
            _issue_ocsp_responder(pki, issuer, report)


def _add_issuer(
    pki: Pki,
    cert: x509.Certificate,
    kind: str,
    parent: str | None,
    label: str,
    key_type: str,
    now: dt.datetime,
) -> None:
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    issuer_id = issuer_id_for(cert.public_key())
    pki.store.add_issuer(
        Issuer(
            id=issuer_id,
            name=cert.subject.rfc4514_string(),
            kind=kind,
            parent_id=parent,
            key_label=label,
            key_type=key_type,
            der=cert.public_bytes(serialization.Encoding.DER),
            subject=cert.subject.rfc4514_string(),
            ski=ski.hex(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            active=True,
            crl_number=0,
            created_at=now,
        ),
        AuditRecord(
            action="ca.create",
            actor=SYSTEM.name,
            subject=issuer_id,
            details={"kind": kind, "subject": cert.subject.rfc4514_string(), "key": label},
        ),
    )


def _issue_ocsp_responder(pki: Pki, issuer: Issuer, report: InitReport) -> None:
    """A delegated OCSP responder key in the HSM and its certificate."""
    label = f"ocsp-{issuer.id}-1"
    _key(pki, label, "ec-p256", report)
    serial = pki.issue_ocsp_responder(issuer.id, label)
    report.created.append(f"OCSP responder certificate {serial} (key {label!r} in the HSM)")


def server_names(pki: Pki) -> list[str]:
    return list(dict.fromkeys(["localhost", "127.0.0.1", *pki.settings.ca.hostnames]))


def _ensure_server_certificate(pki: Pki, report: InitReport) -> None:
    tls = pki.settings.tls_dir
    tls.mkdir(mode=0o700, exist_ok=True)
    cert_path, key_path = tls / "server.pem", tls / "server.key"
    wanted = server_names(pki)
    if cert_path.exists() and key_path.exists():
        current = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        try:
            san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
                str(v) for v in san.get_values_for_type(x509.IPAddress)
            }
        except x509.ExtensionNotFound:
            have = set()
        if set(wanted) <= have and current.not_valid_after_utc > pki.clock.now():
            return
    issue_server_certificate(pki)
    report.created.append(f"server TLS certificate {cert_path} for {', '.join(wanted)}")


def issue_server_certificate(pki: Pki) -> Path:
    """Issue the server's TLS certificate (key in a 0600 file) for the configured names."""
    tls = pki.settings.tls_dir
    tls.mkdir(mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    record = pki.issue_for_key(
        key.public_key(),
        classify_names(server_names(pki)),
        "localhost",
        "mtls-server",
        parse_duration(pki.settings.ca.server_ttl),
        SYSTEM,
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    write_secret(tls / "server.key.tmp", key_pem.strip())
    os.replace(tls / "server.key.tmp", tls / "server.key")
    assert record.certificate_pem is not None
    (tls / "server.pem.tmp").write_text(record.certificate_pem + record.chain_pem)
    os.replace(tls / "server.pem.tmp", tls / "server.pem")
    return tls / "server.pem"


def _ensure_crls(pki: Pki, report: InitReport) -> None:
    crl_dir = pki.settings.home / "crl"
    crl_dir.mkdir(exist_ok=True)
    for issuer in pki.issuers().values():
        path = crl_dir / f"{issuer.id}.crl"
        if not path.exists():
            path.write_bytes(pki.build_crl(issuer.id))
            report.created.append(f"first CRL of {issuer.subject} at {path}")


def export_ca_files(pki: Pki) -> None:
    """Write ``ca/root.pem``, the current issuing CA (``intermediate.pem``, ``chain.pem``)
    and ``trust.pem``: every issuing CA still vouching for live certificates, the root,
    and the configured manufacturer CAs, which the HTTPS listener uses to verify client
    certificates (so certificates of a retired issuing CA still renew over mTLS during
    the overlap, and devices can present an IDevID)."""
    ca_dir = pki.settings.home / "ca"
    ca_dir.mkdir(exist_ok=True)
    root = pki.root_issuer()
    issuing = pki.issuing_issuer()
    root_pem = pem_of(root.der)
    now = pki.clock.now()
    serving = [
        i
        for i in pki.issuers().values()
        if i.kind == "intermediate" and (i.active or i.not_after > now)
    ]
    _write_if_changed(ca_dir / "root.pem", root_pem)
    _write_if_changed(ca_dir / "intermediate.pem", pem_of(issuing.der))
    _write_if_changed(ca_dir / "chain.pem", pki.chain_pem(issuing.id) + root_pem)
    # the manufacturer CAs let devices present their IDevID over TLS; the EST views still
    # tell an IDevID from a certificate of this CA (pki.manufacturer)
    _write_if_changed(
        ca_dir / "trust.pem",
        "".join(pem_of(i.der) for i in serving) + root_pem + pki.manufacturers.pem(),
    )


def create_issuing_ca(pki: Pki, previous: Issuer) -> Issuer:
    """A new issuing CA under the root, like ``previous`` (key type, name constraints):
    its key generated in the HSM, its certificate, its OCSP responder. Returns it."""
    s = pki.settings.ca
    now = pki.clock.now().replace(microsecond=0)
    number = sum(1 for i in pki.issuers(refresh=True).values() if i.kind == "intermediate") + 1
    label = f"issuing-{number}"
    key = _key(pki, label, previous.key_type, InitReport(home=pki.settings.home))
    root = pki.root_issuer()
    cert = build_intermediate(
        pki.signer(root.id),
        key.public_key(),  # type: ignore[attr-defined]
        ca_name(s.organisation, f"{s.organisation} Issuing CA {number}"),
        new_serial(),
        now - dt.timedelta(minutes=5),
        min(now + parse_duration(s.issuing_ttl), root.not_after),
        pki.urls,
        s.name_constraints,
    )
    _add_issuer(pki, cert, "intermediate", root.id, label, previous.key_type, now)
    issuer = pki.issuers(refresh=True)[issuer_id_for(cert.public_key())]
    ensure_ocsp_responder(pki, issuer)
    return pki.issuers(refresh=True)[issuer.id]


def ensure_ocsp_responder(pki: Pki, issuer: Issuer) -> None:
    """Give ``issuer`` its OCSP responder (key in the HSM, certificate) and first CRLs."""
    _issue_ocsp_responder(pki, issuer, InitReport(home=pki.settings.home))
    pki.publish_base_crls(issuer.id)
    pki.issuers(refresh=True)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
