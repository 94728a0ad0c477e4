"""Minimal DER writing for the hot paths (CRL entries, OCSP responses) where building
asn1crypto objects cost more than the signature. Structures stay defined by asn1crypto
and cryptography everywhere else."""

from __future__ import annotations

import datetime as dt


def length(size: int) -> bytes:
    """A DER definite length."""
    if size < 0x80:
        return bytes((size,))
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: ``tag`` (a single identifier octet), length, ``content``."""
    return bytes((tag,)) + length(len(content)) + content


def generalized_time(value: dt.datetime) -> bytes:
    """GeneralizedTime ``YYYYMMDDHHMMSSZ`` (whole seconds, UTC; RFC 5280 4.1.2.5.2)."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC)
    return b"\x18\x0f" + value.strftime("%Y%m%d%H%M%SZ").encode()
