"""Durations as operators write them: ``90s``, ``15m``, ``24h``, ``7d`` (also ``1d12h``)."""

from __future__ import annotations

import datetime as dt
import re

from pki.errors import BadDuration

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_SECONDS = 100 * 366 * 86400  # anything longer cannot be added to a date safely
_PART = re.compile(r"([0-9]+)([smhdw])")  # ASCII digits only


def parse_duration(text: str | int) -> dt.timedelta:
    """Parse ``text`` into a positive timedelta; an int is taken as seconds.

    Raises :class:`BadDuration` with a hint for anything else.
    """
    if isinstance(text, bool):
        raise BadDuration(f"not a duration: {text!r}")
    if isinstance(text, int):
        seconds = text
    else:
        s = text.strip().lower()
        if s.isascii() and s.isdigit():
            seconds = int(s)
        else:
            pos, seconds = 0, 0
            for m in _PART.finditer(s):
                if m.start() != pos:
                    break
                seconds += int(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos != len(s) or not s:
                raise BadDuration(f"not a duration: {text!r} (write it like 90s, 15m, 24h or 7d)")
    if seconds <= 0:
        raise BadDuration(f"duration must be positive: {text!r}")
    if seconds > MAX_SECONDS:
        raise BadDuration(f"duration too long: {text!r} (at most 100 years)")
    try:
        return dt.timedelta(seconds=seconds)
    except OverflowError:
        raise BadDuration(f"duration too long: {text!r}") from None


def format_duration(delta: dt.timedelta) -> str:
    """Format a timedelta in the largest unit that divides it exactly (``86400s`` -> ``1d``)."""
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
