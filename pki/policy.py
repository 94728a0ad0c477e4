"""The RA: decides whether a request may be issued, and with which names and lifetime.

* :func:`parse_csr` accepts a PKCS#10 request only if it is well-formed, its signature
  verifies, its key is of an allowed type and size, it does not ask for CA:true, and
  its names are syntactically valid and not too many.
* :class:`NamePolicy` matches names against allowed patterns (``*.example`` allows any
  name below ``example``, wildcard names included; ``*`` allows everything; an IP pattern
  may be a CIDR block).
* :func:`resolve_ttl` applies profile defaults and maximums and a caller's own cap.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from pki.config import PolicySettings
from pki.durations import format_duration
from pki.errors import BadCsr, NameNotAllowed, PolicyError
from pki.profiles import Profile

MAX_CSR_BYTES = 64 * 1024
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*:[^\s]+$", re.IGNORECASE)


@dataclass(frozen=True)
class RequestedNames:
    """Names a request asks for, normalised (DNS lower-case, IPs canonical)."""

    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()

    def all(self) -> list[str]:
        return [*self.dns, *self.ips, *self.uris]

    def tagged(self) -> list[str]:
        """``dns:x``, ``ip:x``, ``uri:x`` — the form stored with the certificate."""
        return (
            [f"dns:{n}" for n in self.dns]
            + [f"ip:{n}" for n in self.ips]
            + [f"uri:{n}" for n in self.uris]
        )


@dataclass(frozen=True)
class ParsedCsr:
    csr: x509.CertificateSigningRequest
    public_key: object
    key_type: str
    common_name: str | None
    subject_serial: str | None
    names: RequestedNames


def key_type_of(public_key: object) -> str:
    """``rsa``, ``ec-p256``, ``ec-p384``, ``ec-p521``, ``ed25519`` or ``unknown``."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}.get(
            public_key.curve.name, f"ec-{public_key.curve.name}"
        )
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return "unknown"


def check_public_key(public_key: object, settings: PolicySettings) -> str:
    """Refuse weak or unknown keys; return the key type."""
    kind = key_type_of(public_key)
    if kind not in settings.allowed_key_types:
        raise BadCsr(
            f"key type {kind} is not allowed; use one of {', '.join(settings.allowed_key_types)}"
        )
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < settings.min_rsa_bits:
            raise BadCsr(
                f"RSA key of {public_key.key_size} bits is too weak; "
                f"at least {settings.min_rsa_bits} bits are required"
            )
        if public_key.public_numbers().e != 65537:
            raise BadCsr("RSA public exponent must be 65537")
    return kind


def load_csr(data: str | bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER PKCS#10 request; BadCsr with a hint otherwise."""
    # a JSON string may hold a lone surrogate, which strict UTF-8 cannot encode
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
    if len(raw) > MAX_CSR_BYTES:
        raise BadCsr(f"CSR too large ({len(raw)} bytes; limit {MAX_CSR_BYTES})")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(raw.strip())
        return x509.load_der_x509_csr(raw)
    except ValueError:
        raise BadCsr(
            "not a PKCS#10 certificate signing request (expected PEM "
            "'-----BEGIN CERTIFICATE REQUEST-----' or DER)"
        ) from None


def normalise_dns(name: str) -> str:
    """Lower-case and check an LDH DNS name; a wildcard only as the whole leftmost label."""
    n = name.strip().lower()
    n = n.removesuffix(".")  # one trailing dot (the root label) only: "a.b.." is invalid
    if not n or len(n) > 253:
        raise BadCsr(f"invalid DNS name {name!r}")
    labels = n.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 2:
            continue
        try:
            label.encode("ascii")
        except UnicodeEncodeError:
            raise BadCsr(f"invalid DNS name {name!r}: use the A-label (punycode) form") from None
        if not _LABEL.fullmatch(label):  # fullmatch: "$" would accept a trailing newline
            raise BadCsr(f"invalid DNS name {name!r}")
    if labels[-1].isdigit():
        raise BadCsr(f"invalid DNS name {name!r}: the last label is numeric")
    return n


def normalise_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise BadCsr(f"invalid IP address {value!r}") from None


def normalise_uri(value: str) -> str:
    if not _URI.match(value) or len(value) > 2048:
        raise BadCsr(f"invalid URI {value!r}")
    return value


def classify_names(names: Iterable[str]) -> RequestedNames:
    """Sort free-form names (CLI ``--san``) into DNS, IP and URI, validating each."""
    dns: list[str] = []
    ips: list[str] = []
    uris: list[str] = []
    for name in names:
        value = name.strip()
        try:
            ips.append(str(ipaddress.ip_address(value)))
            continue
        except ValueError:
            pass
        if ":" in value:
            uris.append(normalise_uri(value))
        else:
            dns.append(normalise_dns(value))
    return RequestedNames(_dedupe(dns), _dedupe(ips), _dedupe(uris))


def _dedupe(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_csr(data: str | bytes, settings: PolicySettings, names_from_cn: bool = True) -> ParsedCsr:
    """Parse and check a CSR (signature, key, CA:true, names). Raises BadCsr. Without a
    SAN, the CN is taken as the name to certify, unless ``names_from_cn`` is false (a
    device's CN is a label such as "Acme Sensor 2", not a host name)."""
    csr = load_csr(data)
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):  # an EC point off its curve, an unknown key
        raise BadCsr("the CSR's public key cannot be parsed") from None
    if not valid:
        raise BadCsr("the CSR's signature does not verify with its own public key")
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise BadCsr("the CSR's public key cannot be parsed") from None
    kind = check_public_key(public_key, settings)
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise BadCsr("the CSR's requested extensions cannot be parsed") from None
    try:
        bc = extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
        if bc.ca:
            raise BadCsr("the CSR asks for CA:true; end-entity certificates only")
    except x509.ExtensionNotFound:
        pass
    dns: list[str] = []
    ips: list[str] = []
    uris: list[str] = []
    try:
        san = extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        dns = [normalise_dns(n) for n in san.get_values_for_type(x509.DNSName)]
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        uris = [normalise_uri(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        other = len(san) - len(dns) - len(ips) - len(uris)
        if other:
            raise BadCsr("only DNS, IP and URI subject alternative names are supported")
    except x509.ExtensionNotFound:
        pass
    try:
        cn_attrs = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        sn_attrs = csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    except ValueError:
        raise BadCsr("the CSR's subject cannot be parsed") from None
    common_name = str(cn_attrs[0].value).strip() if cn_attrs else None
    subject_serial = str(sn_attrs[0].value).strip() if sn_attrs else None
    names = RequestedNames(_dedupe(dns), _dedupe(ips), _dedupe(uris))
    if names_from_cn and common_name and not names.all():
        names = classify_names([common_name])
    if len(names.all()) > settings.max_names:
        raise BadCsr(f"too many names: {len(names.all())} (at most {settings.max_names})")
    return ParsedCsr(csr, public_key, kind, common_name, subject_serial, names)


def check_name_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    """The allowed-name patterns (``--allowed-names`` of tokens and EAB keys) stripped;
    BadCsr naming a DNS pattern that could never match a valid name."""
    found = tuple(p.strip() for p in patterns if p.strip())
    for pattern in found:
        probe = pattern.replace("*.", "x.", 1) if pattern.startswith("*.") else pattern
        if pattern != "*" and "/" not in pattern and ":" not in pattern:
            classify_names([probe])
    return found


class NamePolicy:
    """Allowed-name patterns: exact names, ``*.zone`` for anything below, ``*``, CIDRs."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(p.strip().lower() for p in patterns if p.strip())
        self._nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for p in self.patterns:
            # CIDR blocks and single addresses (as /32 or /128, so that "2001:0db8::1"
            # matches the canonical "2001:db8::1"); DNS patterns raise ValueError
            with contextlib.suppress(ValueError):
                self._nets.append(ipaddress.ip_network(p, strict=False))

    def allows_dns(self, name: str) -> bool:
        n = name.lower()
        for p in self.patterns:
            if p == "*" or p == n:
                return True
            if p.startswith("*.") and n.endswith(p[1:]) and len(n) > len(p) - 1:
                return True
        return False

    def allows_ip(self, value: str) -> bool:
        ip = ipaddress.ip_address(value)
        if "*" in self.patterns or str(ip) in self.patterns:
            return True
        return any(ip.version == net.version and ip in net for net in self._nets)

    def allows_uri(self, value: str) -> bool:
        v = value.lower()
        for p in self.patterns:
            if p == "*" or p == v:
                return True
            if p.endswith("*") and ":" in p and v.startswith(p[:-1]):
                return True
        return False

    def check(self, names: RequestedNames) -> None:
        """Raise NameNotAllowed naming the first name no pattern allows."""
        for n in names.dns:
            if not self.allows_dns(n):
                raise NameNotAllowed(f"name {n!r} is not allowed (allowed: {self._hint()})")
        for n in names.ips:
            if not self.allows_ip(n):
                raise NameNotAllowed(f"IP address {n} is not allowed (allowed: {self._hint()})")
        for n in names.uris:
            if not self.allows_uri(n):
                raise NameNotAllowed(f"URI {n!r} is not allowed (allowed: {self._hint()})")

    def _hint(self) -> str:
        return ", ".join(self.patterns) or "none"


def resolve_ttl(
    profile: Profile, requested: dt.timedelta | None, cap: dt.timedelta | None = None
) -> dt.timedelta:
    """The lifetime to issue: requested or the profile default, within every maximum."""
    limit = profile.max_ttl if cap is None else min(profile.max_ttl, cap)
    if requested is None:
        return min(profile.default_ttl, limit)
    if requested > limit:
        raise PolicyError(
            f"ttl {format_duration(requested)} exceeds the maximum of "
            f"{format_duration(limit)} for profile {profile.name}"
        )
    return requested
