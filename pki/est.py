"""EST (RFC 7030, as clarified by RFC 8951) wire formats, without any web framework:
base64 PKCS#10 bodies in, base64 certs-only PKCS#7 and CSR attributes out."""

from __future__ import annotations

import base64
import binascii
import re

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import AttributeOID

from pki.errors import InvalidInput

CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CSR_ATTRS = "application/csrattrs"
PKCS10 = "application/pkcs10"
_WHITESPACE = re.compile(rb"\s+")
_PEM_CSR = re.compile(
    rb"-----BEGIN (?:NEW )?CERTIFICATE REQUEST-----(.*?)-----END (?:NEW )?CERTIFICATE REQUEST-----",
    re.S,
)


def decode_pkcs10(body: bytes) -> bytes:
    """The DER CSR of an EST enrolment body: base64 (line breaks allowed), or PEM.
    InvalidInput with a hint otherwise."""
    pem = _PEM_CSR.search(body)
    text = _WHITESPACE.sub(b"", pem.group(1) if pem else body)
    if not text:
        raise InvalidInput("the request body is empty; send a base64-encoded PKCS#10 CSR")
    try:
        der = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            "the request body is not base64: EST takes a base64-encoded DER PKCS#10 CSR "
            "(RFC 7030 section 4.2.1), e.g. `openssl req ... -outform DER | base64`"
        ) from None
    if not der.startswith(b"\x30"):
        raise InvalidInput("the request body decodes to something that is not a PKCS#10 CSR")
    return der


def encode_base64(der: bytes) -> bytes:
    """Base64 in lines of 64 characters, as EST bodies are sent."""
    text = base64.b64encode(der)
    return b"".join(text[i : i + 64] + b"\n" for i in range(0, len(text), 64))


def certs_only(certificates: list[bytes]) -> bytes:
    """A base64 certs-only (degenerate SignedData) PKCS#7 holding ``certificates`` (DER)."""
    certs = [x509.load_der_x509_certificate(der) for der in certificates]
    return encode_base64(pkcs7.serialize_certificates(certs, Encoding.DER))


class _AttributeValues(core.SetOf):
    _child_spec = core.Any


class _Attribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _AttributeValues)]


class _AttrOrOid(core.Choice):
    _alternatives = [("oid", core.ObjectIdentifier), ("attribute", _Attribute)]


class CsrAttrs(core.SequenceOf):
    """RFC 7030 section 4.5.2: ``CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID``."""

    _child_spec = _AttrOrOid


def csr_attributes() -> bytes:
    """What a device's CSR should carry, base64: a P-256 key signed with ECDSA-SHA256, the
    device id as subject serialNumber, and a challengePassword for the optional tls-unique
    channel binding (RFC 7030 section 3.5)."""
    attrs = CsrAttrs(
        [
            _AttrOrOid(name="oid", value=core.ObjectIdentifier("1.2.840.113549.1.9.7")),
            _AttrOrOid(
                name="attribute",
                value=_Attribute(
                    {
                        "type": "1.2.840.10045.2.1",  # id-ecPublicKey
                        "values": [core.ObjectIdentifier("1.2.840.10045.3.1.7")],  # P-256
                    }
                ),
            ),
            _AttrOrOid(name="oid", value=core.ObjectIdentifier("1.2.840.10045.4.3.2")),
            _AttrOrOid(name="oid", value=core.ObjectIdentifier("2.5.4.5")),  # serialNumber
        ]
    )
    return encode_base64(attrs.dump())


def challenge_password(csr: x509.CertificateSigningRequest) -> str | None:
    """The CSR's challengePassword attribute, or None when it has none."""
    try:
        value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        return None
    except ValueError:
        raise InvalidInput("the CSR's attributes cannot be parsed") from None
    return value.decode("utf-8", "replace")


def tls_unique_password(tls_unique: bytes) -> str:
    """The challengePassword that binds a CSR to a TLS connection: base64 of tls-unique
    (RFC 7030 section 3.5)."""
    return base64.b64encode(tls_unique).decode()
