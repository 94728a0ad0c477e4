"""Lint before sign, as Boulder does: the to-be-signed certificate is first signed with a
throwaway in-memory key of the issuer's key type, and that copy is checked by pkilint's
RFC 5280 validators and by our own profile checks. Only a clean certificate goes to the
HSM; a finding of ERROR (or FATAL) refuses the issuance.

The throwaway key signs nothing anybody receives: its certificate is parsed, linted and
dropped. Its signature algorithm is the issuer's, so the linted bytes differ from the
real certificate only in the signature value.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from pki.errors import PolicyError
from pki.policy import RequestedNames
from pki.profiles import Profile

#: severities that refuse an issuance (pkilint's FATAL and ERROR)
REFUSING = ("FATAL", "ERROR")


@dataclass(frozen=True)
class LintFinding:
    """One finding: pkilint's code and node path, or ``hsmca.*`` for our own checks."""

    severity: str
    code: str
    where: str
    message: str | None = None

    def describe(self) -> str:
        text = f"{self.code} at {self.where}"
        return f"{text} ({self.message})" if self.message else text


class LintFailed(PolicyError):
    """The certificate would violate RFC 5280 or its profile; nothing was signed."""

    kind = "lint-failed"

    def __init__(self, findings: Sequence[LintFinding]) -> None:
        self.findings = tuple(findings)
        shown = "; ".join(f.describe() for f in self.findings[:5])
        more = f" and {len(self.findings) - 5} more" if len(self.findings) > 5 else ""
        super().__init__(f"the certificate failed pre-issuance linting: {shown}{more}")


@dataclass(frozen=True)
class Expectations:
    """What the profile promises about an end-entity certificate."""

    issuer: x509.Certificate
    profile: Profile
    names: RequestedNames
    device_id: str | None
    max_lifetime: dt.timedelta


_throwaway_lock = threading.Lock()
_throwaway: dict[tuple[str, int], Any] = {}
_local = threading.local()


def _throwaway_key(issuer_key: Any) -> Any:
    """A process-wide in-memory key of the issuer key's type and size."""
    if isinstance(issuer_key, ec.EllipticCurvePrivateKey):
        spec = ("ec", issuer_key.curve.key_size)
    elif isinstance(issuer_key, rsa.RSAPrivateKey):
        spec = ("rsa", issuer_key.key_size)
    else:  # pragma: no cover - the HSM only holds EC and RSA keys
        raise PolicyError(f"cannot lint for an issuer key of type {type(issuer_key).__name__}")
    with _throwaway_lock:
        key = _throwaway.get(spec)
        if key is None:
            if spec[0] == "ec":
                key = ec.generate_private_key(type(issuer_key.curve)())
            else:
                key = rsa.generate_private_key(public_exponent=65537, key_size=spec[1])
            _throwaway[spec] = key
    return key


def _validator() -> Any:
    """pkilint's RFC 5280 certificate validators (one set per thread; built in ~1 ms)."""
    validator = getattr(_local, "validator", None)
    if validator is None:
        _memoise_name_syntax()
        from pkilint.pkix import certificate, extension, name

        validator = certificate.create_pkix_certificate_validator_container(
            certificate.create_decoding_validators(
                name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
            ),
            [
                certificate.create_issuer_validator_container([]),
                certificate.create_validity_validator_container(),
                certificate.create_subject_validator_container([]),
                certificate.create_extensions_validator_container([]),
                certificate.create_spki_validator_container([]),
            ],
        )
        _local.validator = validator
    return validator


def _memoise_name_syntax() -> None:
    """pkilint checks every URI and DNS name with the ``validators`` package, a pure
    function of the string and ~0.3 ms a URI; the CDP and AIA URLs are the same in every
    certificate, so the answers are memoised (about 15% of a lint)."""
    from pkilint.pkix import general_name

    check = general_name.validators_predicate
    if not hasattr(check, "cache_info"):
        general_name.validators_predicate = functools.lru_cache(maxsize=4096)(check)


def warm() -> None:
    """Import pkilint and build this thread's validators (at worker start)."""
    _validator()


#: a single DNS label in RFC 1034 preferred name syntax ("localhost", "redis")
_SINGLE_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: RFC 3986 URI without an authority (a URN such as ``urn:dev:serial:42``): scheme ":"
#: then only unreserved, sub-delims, ":", "@", "/", "?", "%XX"
RFC3986_URI = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*:(?!//)([A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})+"
)


def _dns_name_allowed(name: str) -> bool:
    """A dNSName pkilint's ``validators.domain`` check refuses that RFC 5280 allows: a
    single label ("localhost": RFC 1034 preferred name syntax needs no dot), or a
    wildcard ``*.`` in front of a name that passes pkilint's own check (RFC 6125 6.4.3;
    ACME orders them with dns-01)."""
    import validators

    if _SINGLE_LABEL.fullmatch(name):
        return True
    rest = name.removeprefix("*.")
    return rest != name and validators.domain(rest) is True


#: pkilint codes stricter than RFC 5280, with the names RFC 5280 allows despite them
_STRICTER_THAN_RFC5280: dict[str, Callable[[str], bool]] = {
    "pkix.invalid_domain_name_syntax": _dns_name_allowed,
    "pkix.invalid_uri_syntax": lambda uri: RFC3986_URI.fullmatch(uri) is not None,
}


def _tolerated(code: str, value: str) -> bool:
    """pkilint findings stricter than RFC 5280 that an internal CA issues on purpose:
    single-label and wildcard dNSNames (see :func:`_dns_name_allowed`), and URIs without
    an authority (a URN, the device profile's SAN), for which RFC 5280 4.2.1.6 requires
    no host while pkilint wants one in every URI. ``value`` is the flagged name itself."""
    allowed = _STRICTER_THAN_RFC5280.get(code)
    return allowed is not None and allowed(value)


def pkilint_findings(der: bytes) -> list[LintFinding]:
    """Every finding of pkilint's RFC 5280 validators on a DER certificate."""
    from pkilint import loader

    try:
        document = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "tbs")
    except ValueError as exc:
        return [LintFinding("FATAL", "pkilint.decode", "certificate", str(exc))]
    found = []
    for result in _validator().validate(document.root):
        for description in result.finding_descriptions:
            code, message = description.finding.code, description.message
            tolerated = code in _STRICTER_THAN_RFC5280 and _tolerated(code, str(result.node.pdu))
            severity = "NOTICE" if tolerated else description.finding.severity.name
            found.append(LintFinding(severity, code, result.node.path, message))
    return found


def profile_findings(cert: x509.Certificate, expected: Expectations) -> list[LintFinding]:
    """Our own checks: what every end-entity certificate of this profile must carry."""
    found: list[LintFinding] = []

    def error(code: str, message: str) -> None:
        found.append(LintFinding("ERROR", f"hsmca.{code}", "certificate", message))

    def extension(cls: type[x509.ExtensionType]) -> x509.Extension[Any] | None:
        try:
            return cert.extensions.get_extension_for_class(cls)
        except x509.ExtensionNotFound:
            error(f"missing_{cls.__name__.lower()}", f"no {cls.__name__} extension")
            return None

    serial = cert.serial_number
    if not 64 < serial.bit_length() <= 159:
        error("serial_entropy", "the serial needs more than 64 bits and at most 20 octets")
    issuer = expected.issuer
    if cert.issuer != issuer.subject:
        error("issuer_name", "the issuer name is not the issuing CA's subject")
    if (
        cert.not_valid_before_utc < issuer.not_valid_before_utc
        or cert.not_valid_after_utc > issuer.not_valid_after_utc
    ):
        error("validity_outside_issuer", "the validity is not inside the issuing CA's")
    if cert.not_valid_after_utc - cert.not_valid_before_utc > expected.max_lifetime:
        error("validity_too_long", f"longer than the profile allows ({expected.max_lifetime})")
    basic = extension(x509.BasicConstraints)
    if basic is not None and (basic.value.ca or not basic.critical):
        error("basic_constraints", "basicConstraints must be critical with CA:false")
    usage = extension(x509.KeyUsage)
    if usage is not None and not (usage.critical and usage.value.digital_signature):
        error("key_usage", "keyUsage must be critical with digitalSignature")
    eku = extension(x509.ExtendedKeyUsage)
    if eku is not None and list(eku.value) != list(expected.profile.extended_key_usages):
        error("extended_key_usage", f"EKU differs from profile {expected.profile.name!r}")
    san = extension(x509.SubjectAlternativeName)
    if san is not None:
        dns = tuple(san.value.get_values_for_type(x509.DNSName))
        ips = tuple(str(i) for i in san.value.get_values_for_type(x509.IPAddress))
        uris = tuple(san.value.get_values_for_type(x509.UniformResourceIdentifier))
        names = expected.names
        if (dns, ips, uris) != (tuple(names.dns), tuple(names.ips), tuple(names.uris)):
            error("subject_alt_name", "the SAN is not exactly the authorised names")
    aki = extension(x509.AuthorityKeyIdentifier)
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    if aki is not None and aki.value.key_identifier != ski.digest:
        error("authority_key_identifier", "the AKI is not the issuing CA's SKI")
    extension(x509.SubjectKeyIdentifier)
    extension(x509.CRLDistributionPoints)
    extension(x509.AuthorityInformationAccess)
    if expected.profile.device:
        serials = cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)
        if expected.device_id is None or [a.value for a in serials] != [expected.device_id]:
            error("device_serial_number", "the subject serialNumber is not the device id")
    return found


def lint_before_sign(
    builder: x509.CertificateBuilder,
    issuer_key: Any,
    algorithm: hashes.HashAlgorithm,
    expected: Expectations,
) -> list[LintFinding]:
    """Sign ``builder`` with a throwaway key like ``issuer_key`` and lint the result;
    return every finding (refuse when any is in :data:`REFUSING`)."""
    der = builder.sign(_throwaway_key(issuer_key), algorithm).public_bytes(Encoding.DER)
    cert = x509.load_der_x509_certificate(der)
    return pkilint_findings(der) + profile_findings(cert, expected)


def refusing(findings: Sequence[LintFinding]) -> list[LintFinding]:
    """The findings that refuse an issuance."""
    return [f for f in findings if f.severity in REFUSING]
