"""The CA: builds certificates with cryptography and signs them through the HSM.

Only this module decides what goes into a certificate. Every end-entity certificate
carries SAN, KU, EKU, AKI, SKI, basicConstraints CA:false, a CRL distribution point and
AIA (OCSP and caIssuers). The issuing key is an :mod:`pki.hsm_keys` object, so the
builder's ``sign()`` goes to PKCS#11.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from pki.errors import PolicyError
from pki.hsm_keys import HsmPrivateKey
from pki.policy import RequestedNames
from pki.profiles import Profile

#: X.520 serialNumber is a PrintableString: only these characters can be encoded
_PRINTABLE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]+")


@dataclass(frozen=True)
class CaUrls:
    """Where relying parties find CRLs, OCSP and issuer certificates."""

    base: str
    shards: int = 1

    def crl(self, issuer_id: str, shard: int | None = None) -> str:
        """The CRL of ``issuer_id``: of one partition, or complete when ``shard`` is None
        (with a single partition both are the same URL)."""
        return f"{self.base.rstrip('/')}/crl/{self.crl_name(issuer_id, shard)}.crl"

    def delta_crl(self, issuer_id: str, shard: int | None = None) -> str:
        return f"{self.base.rstrip('/')}/crl/{self.crl_name(issuer_id, shard)}-delta.crl"

    def crl_name(self, issuer_id: str, shard: int | None) -> str:
        if shard is None or self.shards <= 1:
            return issuer_id
        return f"{issuer_id}-{shard}"

    def shard_of(self, serial: int) -> int:
        """The partition a serial belongs to (fixed at issuance, stored with the row)."""
        return serial % max(1, self.shards)

    def ca_issuers(self, issuer_id: str) -> str:
        return f"{self.base.rstrip('/')}/ca/{issuer_id}.der"

    def ocsp(self) -> str:
        return f"{self.base.rstrip('/')}/ocsp"


@dataclass(frozen=True)
class SigningIssuer:
    """An issuer ready to sign: its id, certificate and HSM key."""

    id: str
    certificate: x509.Certificate
    key: HsmPrivateKey


@dataclass(frozen=True)
class EndEntityRequest:
    """Everything that goes into an end-entity TBS certificate."""

    serial: int
    subject: x509.Name
    names: RequestedNames
    public_key: object
    not_before: dt.datetime
    not_after: dt.datetime
    profile: Profile


def spki_der(public_key: object) -> bytes:
    """DER SubjectPublicKeyInfo of a public key."""
    return public_key.public_bytes(  # type: ignore[attr-defined]
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


def signature_hash(key: HsmPrivateKey) -> hashes.HashAlgorithm:
    """SHA-384 for P-384 keys and RSA >= 3072 bits, SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 3072:
        return hashes.SHA384()
    return hashes.SHA256()


def ca_name(organisation: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def general_names(names: RequestedNames) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = [x509.DNSName(n) for n in names.dns]
    result += [x509.IPAddress(ipaddress.ip_address(n)) for n in names.ips]
    result += [x509.UniformResourceIdentifier(n) for n in names.uris]
    return result


def _key_usage(public_key: object, *, ca: bool = False, ocsp: bool = False) -> x509.KeyUsage:
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    return x509.KeyUsage(
        digital_signature=not ca or ocsp,
        content_commitment=False,
        key_encipherment=rsa_key and not ca and not ocsp,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ski(public_key: object) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _revocation_pointers(
    builder: x509.CertificateBuilder,
    urls: CaUrls,
    issuer_id: str,
    ocsp: bool = True,
    shard: int | None = None,
) -> x509.CertificateBuilder:
    builder = builder.add_extension(
        x509.CRLDistributionPoints(
            [
                x509.DistributionPoint(
                    full_name=[x509.UniformResourceIdentifier(urls.crl(issuer_id, shard))],
                    relative_name=None,
                    reasons=None,
                    crl_issuer=None,
                )
            ]
        ),
        critical=False,
    )
    access = [
        x509.AccessDescription(
            AuthorityInformationAccessOID.CA_ISSUERS,
            x509.UniformResourceIdentifier(urls.ca_issuers(issuer_id)),
        )
    ]
    if ocsp:
        access.insert(
            0,
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(urls.ocsp())
            ),
        )
    return builder.add_extension(x509.AuthorityInformationAccess(access), critical=False)


def _sign(builder: x509.CertificateBuilder, key: HsmPrivateKey) -> x509.Certificate:
    return builder.sign(key, signature_hash(key))


def clamp_validity(
    issuer: x509.Certificate, not_before: dt.datetime, not_after: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """Keep a validity inside the issuer's; PolicyError if nothing is left."""
    start = max(not_before, issuer.not_valid_before_utc)
    end = min(not_after, issuer.not_valid_after_utc)
    if end <= start:
        raise PolicyError("the issuing CA's validity does not cover the requested period")
    return start, end


def build_root(
    key: HsmPrivateKey,
    subject: x509.Name,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int = 1,
) -> x509.Certificate:
    """A self-signed root CA certificate."""
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(public_key, ca=True), critical=True)
        .add_extension(_ski(public_key), critical=False)
    )
    return _sign(builder, key)


def _issued_by(
    issuer: SigningIssuer,
    subject: x509.Name,
    public_key: object,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    """A builder with names, key, serial and a validity clamped into the issuer's."""
    not_before, not_after = clamp_validity(issuer.certificate, not_before, not_after)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def build_intermediate(
    parent: SigningIssuer,
    public_key: object,
    subject: x509.Name,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    urls: CaUrls,
    permitted_dns: tuple[str, ...] = (),
) -> x509.Certificate:
    """An issuing CA certificate (pathLen 0) signed by ``parent``."""
    builder = (
        _issued_by(parent, subject, public_key, serial, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(public_key, ca=True), critical=True)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(parent.certificate), critical=False)
    )
    if permitted_dns:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(d.lstrip("*.")) for d in permitted_dns],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    builder = _revocation_pointers(builder, urls, parent.id, ocsp=False)
    return _sign(builder, parent.key)


def build_ocsp_responder(
    issuer: SigningIssuer,
    public_key: object,
    subject: x509.Name,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A delegated OCSP responder certificate: EKU OCSPSigning and id-pkix-ocsp-nocheck."""
    builder = (
        _issued_by(issuer, subject, public_key, serial, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(public_key, ocsp=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(issuer.certificate), critical=False)
    )
    return _sign(builder, issuer.key)


def end_entity_builder(
    issuer: SigningIssuer, request: EndEntityRequest, urls: CaUrls
) -> x509.CertificateBuilder:
    """The to-be-signed end-entity certificate for ``request`` under ``issuer``."""
    sans = general_names(request.names)
    if not sans:
        raise PolicyError("a certificate needs at least one subject alternative name")
    builder = (
        _issued_by(
            issuer,
            request.subject,
            request.public_key,
            request.serial,
            request.not_before,
            request.not_after,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(request.public_key), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(list(request.profile.extended_key_usages)), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=len(request.subject) == 0)
        .add_extension(_ski(request.public_key), critical=False)
        .add_extension(_aki(issuer.certificate), critical=False)
    )
    return _revocation_pointers(builder, urls, issuer.id, shard=urls.shard_of(request.serial))


def sign_end_entity(issuer: SigningIssuer, builder: x509.CertificateBuilder) -> x509.Certificate:
    """Sign a to-be-signed certificate with the issuer's HSM key."""
    return _sign(builder, issuer.key)


def build_end_entity(
    issuer: SigningIssuer, request: EndEntityRequest, urls: CaUrls
) -> x509.Certificate:
    """An end-entity certificate for ``request`` under ``issuer``, signed in the HSM."""
    return sign_end_entity(issuer, end_entity_builder(issuer, request, urls))


def end_entity_subject(
    names: RequestedNames, common_name: str | None, device_id: str | None = None
) -> x509.Name:
    """CN from the request when it is one of the names (or the device id), else the first
    DNS/IP name; serialNumber for devices. Empty when nothing fits in 64 characters."""
    if device_id and not _PRINTABLE.fullmatch(device_id):
        # checked here, before a serial is reserved: encoding it later fails mid-issuance
        raise PolicyError(
            f"device id {device_id!r} cannot be a subject serialNumber (PrintableString: "
            "letters, digits, space and ' ( ) + , - . / : = ? only)"
        )
    attrs: list[x509.NameAttribute] = []
    candidates = names.dns + names.ips
    cn = None
    if device_id:
        cn = device_id
    elif common_name and (common_name.lower() in candidates or common_name in names.uris):
        cn = common_name.lower() if common_name.lower() in candidates else common_name
    elif candidates:
        cn = candidates[0]
    if cn and len(cn) <= 64:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if device_id and len(device_id) <= 64:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id))
    return x509.Name(attrs)
