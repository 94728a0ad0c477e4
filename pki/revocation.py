"""CRLs (RFC 5280): full, partitioned (sharded) and delta, signed in the HSM.

A million revoked entries must build in seconds, so entries are DER-encoded here with
a few byte operations each (cryptography's builder needs one Python object per entry,
and ``add_revoked_certificate`` in a loop is quadratic); the header and extensions are
built with asn1crypto, which copies the pre-encoded entry list verbatim. The
to-be-signed bytes are signed by the issuer's HSM key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from asn1crypto import crl as acrl
from asn1crypto import x509 as ax
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from pki.der import length
from pki.errors import InvalidInput
from pki.signer import SigningIssuer, signature_hash

REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
REASON_CODES = {
    "unspecified": 0,
    "keyCompromise": 1,
    "cACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "certificateHold": 6,
    "privilegeWithdrawn": 9,
    "aACompromise": 10,
}
_BY_LOWER = {name.lower(): name for name in REASONS}


def parse_reason(text: str | None) -> str:
    """The RFC 5280 reason name for ``text`` (case-insensitive, ``_``/``-`` ignored)."""
    if not text:
        return "unspecified"
    key = text.replace("_", "").replace("-", "").lower()
    if key not in _BY_LOWER:
        raise InvalidInput(f"unknown revocation reason {text!r}; one of: {', '.join(REASONS)}")
    return _BY_LOWER[key]


# -- DER of the revoked-certificate entries -------------------------------------------------


def _time(value: str | dt.datetime) -> bytes:
    """UTCTime before 2050, GeneralizedTime after (RFC 5280 5.1.2.4). A ``str`` is the
    store's SQLite form ``YYYY-MM-DD HH:MM:SS[.ffffff]`` (UTC), sliced without parsing."""
    if isinstance(value, str):
        digits = value[0:4] + value[5:7] + value[8:10] + value[11:13] + value[14:16] + value[17:19]
    else:
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        digits = f"{value.year:04d}{value.month:02d}{value.day:02d}{value.hour:02d}" + (
            f"{value.minute:02d}{value.second:02d}"
        )
    if digits < "2050":
        return b"\x17\x0d" + digits[2:].encode() + b"Z"
    return b"\x18\x0f" + digits.encode() + b"Z"


_REASON_EXT = {
    name: bytes.fromhex("300a0603551d1504030a01") + bytes((code,))
    for name, code in REASON_CODES.items()
    if code
}
# SEQUENCE { OID invalidityDate, OCTET STRING { GeneralizedTime (17 octets) } }
_INVALIDITY_PREFIX = bytes.fromhex("30180603551d180411")


def encode_entry(
    serial_hex: str,
    revoked_at: str | dt.datetime,
    reason: str | None,
    invalidity: str | dt.datetime | None,
) -> bytes:
    """One ``revokedCertificates`` element: serial, date, reasonCode, invalidityDate."""
    serial = bytes.fromhex(serial_hex)
    if serial[0] & 0x80:
        serial = b"\x00" + serial
    body = b"\x02" + bytes((len(serial),)) + serial + _time(revoked_at)
    exts = _REASON_EXT.get(reason, b"") if reason else b""
    if invalidity is not None:
        generalized = _time(invalidity)
        if generalized[0] == 0x17:  # invalidityDate is always GeneralizedTime
            year = generalized[2:4]
            generalized = b"\x18\x0f" + (b"19" if year >= b"50" else b"20") + generalized[2:]
        exts += _INVALIDITY_PREFIX + generalized
    if exts:
        body += b"\x30" + length(len(exts)) + exts
    return b"\x30" + length(len(body)) + body


_DROP = str.maketrans("", "", "-: ")


def encode_entries(
    rows: Iterable[tuple[str, str | dt.datetime, str | None, str | dt.datetime | None, int]],
    shards: int = 1,
) -> list[list[bytes]]:
    """:func:`encode_entry` for many ``(serial, revoked_at, reason, invalidity, shard)``
    rows at once, partitioned by shard: the CRL hot loop, about 1 µs an entry."""
    buckets: list[list[bytes]] = [[] for _ in range(max(1, shards))]
    fromhex = bytes.fromhex
    reason_ext = _REASON_EXT
    for serial_hex, revoked, reason, invalidity, shard in rows:
        if revoked.__class__ is str and invalidity is None:
            serial = fromhex(serial_hex)
            if serial[0] & 0x80:
                serial = b"\x00" + serial
            digits = revoked[:19].translate(_DROP)  # type: ignore[union-attr]
            if digits < "2050":
                date = b"\x17\x0d" + digits[2:].encode() + b"Z"
            else:
                date = b"\x18\x0f" + digits.encode() + b"Z"
            body = b"\x02" + bytes((len(serial),)) + serial + date
            ext = reason_ext.get(reason, b"") if reason else b""
            if ext:
                body += b"\x30" + bytes((len(ext),)) + ext
            entry = b"\x30" + bytes((len(body),)) + body  # always < 128 octets here
        else:
            entry = encode_entry(serial_hex, revoked, reason, invalidity)
        buckets[0 if shards <= 1 else shard % shards].append(entry)
    return buckets


# -- the CRL ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CrlScope:
    """What a CRL covers and where it lives."""

    url: str | None = None  # issuingDistributionPoint; None for a complete CRL
    delta_of: int | None = None  # base CRL number for a delta CRL
    freshest_url: str | None = None  # where the delta of this base is published


def build_crl_der(
    issuer: SigningIssuer,
    entries: Iterable[bytes],
    number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
    scope: CrlScope = CrlScope(),
) -> bytes:
    """A signed CRL (DER) listing the pre-encoded ``entries``."""
    body = b"".join(entries)
    cert = ax.Certificate.load(issuer.certificate.public_bytes(Encoding.DER))
    ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    extensions = [
        {
            "extn_id": "authority_key_identifier",
            "critical": False,
            "extn_value": {"key_identifier": ski.value.digest},
        },
        {"extn_id": "crl_number", "critical": False, "extn_value": number},
    ]
    if scope.url is not None:
        extensions.append(
            {
                "extn_id": "issuing_distribution_point",
                "critical": True,
                "extn_value": {
                    "distribution_point": {"full_name": [_uri(scope.url)]},
                    "only_contains_user_certs": True,
                },
            }
        )
    if scope.delta_of is not None:
        extensions.append(
            {"extn_id": "delta_crl_indicator", "critical": True, "extn_value": scope.delta_of}
        )
    if scope.freshest_url is not None:
        extensions.append(
            {
                "extn_id": "freshest_crl",
                "critical": False,
                "extn_value": [{"distribution_point": {"full_name": [_uri(scope.freshest_url)]}}],
            }
        )
    key = issuer.key
    algorithm = _algorithm(key, signature_hash(key))
    tbs = acrl.TbsCertList(
        {
            "version": "v2",
            "signature": {"algorithm": algorithm},
            "issuer": cert.subject,
            "this_update": _asn1_time(this_update),
            "next_update": _asn1_time(next_update),
            "crl_extensions": extensions,
        }
    )
    if body:
        tbs["revoked_certificates"] = acrl.RevokedCertificates.load(
            b"\x30" + length(len(body)) + body
        )
    tbs_der = tbs.dump()
    signature = _sign(key, tbs_der)
    return acrl.CertificateList(
        {
            "tbs_cert_list": acrl.TbsCertList.load(tbs_der),
            "signature_algorithm": {"algorithm": algorithm},
            "signature": signature,
        }
    ).dump()


def _uri(url: str) -> ax.GeneralName:
    return ax.GeneralName(name="uniform_resource_identifier", value=url)


def _asn1_time(value: dt.datetime) -> ax.Time:
    value = value.astimezone(dt.UTC).replace(microsecond=0)
    if value.year < 2050:
        return ax.Time(name="utc_time", value=value)
    return ax.Time(name="general_time", value=value)


def _algorithm(key: object, digest: hashes.HashAlgorithm) -> str:
    kind = "ecdsa" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsa"
    return f"{digest.name}_{kind}"


def _sign(key: object, data: bytes) -> bytes:
    digest = signature_hash(key)  # type: ignore[arg-type]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(digest))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), digest)
    raise TypeError("unsupported CA key")
