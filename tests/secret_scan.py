"""Secret hygiene across the whole suite (issue #8): every secret the tests hand out is
remembered here, and every ``hsmca serve`` log is searched for them when the service
stops (the suite runs its servers with ``server.log_level = debug``, see conftest)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

#: every bearer token, device secret or EAB HMAC key handed out in this process
SECRETS: list[str] = []

#: what a leaked secret looks like even when no test remembered it
_SHAPES = re.compile(
    r"\bhsmcad?_[A-Za-z0-9_-]{16,}|-----BEGIN [A-Z ]*PRIVATE KEY-----|PRIVATE KEY-----"
)


def remember(*secrets: str) -> None:
    """Add secrets that no log, problem document or audit event may ever show."""
    SECRETS.extend(s for s in secrets if s)


def home_secrets(home: Path) -> list[str]:
    """The PINs of a home's token (user and SO), as ``init`` wrote them."""
    found = []
    for name in ("hsm.pin", "hsm-so.pin"):
        path = home / "secrets" / name
        if path.exists():
            found.append(path.read_text().strip())
    return found


def leaks(text: str, secrets: Iterable[str] = ()) -> list[str]:
    """Descriptions of every secret (given, remembered, or by its shape) in ``text``."""
    found = [f"secret ...{s[-4:]}" for s in {*SECRETS, *secrets} if len(s) >= 8 and s in text]
    found += [f"shape {m.group(0)[:12]}..." for m in _SHAPES.finditer(text)]
    return found
