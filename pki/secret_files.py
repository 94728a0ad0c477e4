"""The files that hold secrets, and the rule they must keep: no access for other users.

``init`` writes them 0600 (directories 0700); ``serve`` refuses to start when any of them
can be read or written by other users, or written by the group, as OpenSSH refuses a
private key that others can read. The SQLite database holds EAB HMAC keys and token
digests, so it counts as a secret, and so does ``hsmca.toml`` when it holds ``hsm.pin`` or
a database password.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

from pki.config import CONFIG_NAME, Settings
from pki.errors import ConfigError

#: permission bits a secret must not have: anything for others, group write
FORBIDDEN_BITS = stat.S_IRWXO | stat.S_IWGRP


def secret_paths(settings: Settings) -> Iterator[Path]:
    """Every existing file or directory of this home that holds a secret."""
    candidates: list[Path] = [settings.secrets_dir, settings.tls_dir / "server.key"]
    if settings.secrets_dir.is_dir():
        candidates += sorted(settings.secrets_dir.iterdir())
    if not settings.hsm.pin and settings.hsm.pin_file:
        candidates.append(Path(settings.hsm.pin_file))
    url = settings.database.url
    if url.startswith("sqlite:///") and ":memory:" not in url:
        db = Path(url.split("///", 1)[-1])
        candidates += [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    if settings.hsm.softhsm2_conf:
        candidates.append(settings.home / "tokens")
    if _config_holds_secrets(settings.home / CONFIG_NAME):
        candidates.append(settings.home / CONFIG_NAME)
    seen: set[Path] = set()
    for path in candidates:
        if path not in seen and path.exists():
            seen.add(path)
            yield path


def _config_holds_secrets(path: Path) -> bool:
    """True when the configuration file itself holds a secret: ``hsm.pin``, or a
    password in ``database.url``."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    hsm, database = doc.get("hsm", {}), doc.get("database", {})
    url = str(database.get("url", "")) if isinstance(database, dict) else ""
    return bool(isinstance(hsm, dict) and hsm.get("pin")) or bool(_url_password(url))


def _url_password(url: str) -> str | None:
    """The password of a database URL, if it has one."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password if url else None
    except ArgumentError:
        return None


def exposed_secrets(settings: Settings) -> list[tuple[Path, int]]:
    """The secret paths other users may read or write, with their permission bits."""
    exposed = []
    for path in secret_paths(settings):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & FORBIDDEN_BITS:
            exposed.append((path, mode))
    return exposed


def check_secret_files(settings: Settings) -> None:
    """Raise ConfigError naming every exposed secret and the command that fixes it."""
    exposed = exposed_secrets(settings)
    if not exposed:
        return
    listed = ", ".join(f"{path} (mode {mode:04o})" for path, mode in exposed)
    fixes = " ".join(f"chmod {'700' if path.is_dir() else '600'} {path};" for path, _ in exposed)
    raise ConfigError(
        f"refusing to start: secret file(s) readable or writable by other users: {listed}. "
        f"Fix with: {fixes.rstrip(';')}"
    )
