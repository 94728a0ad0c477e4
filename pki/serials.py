"""Certificate serial numbers: 159 random bits, printed as lower-case even-length hex."""

from __future__ import annotations

import re
import secrets

from pki.errors import InvalidInput

SERIAL_BITS = 159  # 20 octets with the sign bit clear: RFC 5280's maximum, positive
_HEX = re.compile(r"[0-9a-f]+")


def new_serial() -> int:
    """A fresh random serial (never 0); uniqueness is enforced by the store."""
    while True:
        value = secrets.randbits(SERIAL_BITS)
        if value.bit_length() > 64:
            return value


def serial_hex(value: int) -> str:
    """Canonical text form: lower-case hex without separators, even length."""
    text = format(value, "x")
    return text if len(text) % 2 == 0 else "0" + text


def parse_serial(text: str) -> str:
    """Accept ``0A:1b``, ``0x0a1b`` or ``A1B`` and return the canonical form."""
    cleaned = text.strip().lower().replace(":", "")
    cleaned = cleaned.removeprefix("0x")
    try:
        if not _HEX.fullmatch(cleaned):  # int() alone takes "1_f", "+1f", "0x0x1f"
            raise ValueError(cleaned)
        value = int(cleaned, 16)
    except ValueError:
        raise InvalidInput(
            f"not a serial number: {text!r} (write it as hex, e.g. 3f1c9a...)"
        ) from None
    if value <= 0 or value.bit_length() > 160:
        raise InvalidInput(f"not a serial number: {text!r}")
    return serial_hex(value)
