"""The default HSM: a SoftHSM2 token kept inside the home (``softhsm2.conf``, ``tokens/``).

Only :func:`ensure_token` runs the ``softhsm2-util`` tool; everything else talks PKCS#11.
PINs are random, written to ``secrets/`` with mode 0600, and handed to ``softhsm2-util``
only for the moment of token creation.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from pki.config import Settings
from pki.errors import HsmError, HsmModuleNotFound


def is_softhsm(module: str) -> bool:
    return "softhsm" in Path(module).name.lower()


def write_secret(path: Path, value: str) -> None:
    """Create ``path`` with mode 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.chmod(path, 0o600)


def write_conf(conf: Path, token_dir: Path) -> None:
    token_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf.write_text(
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )


def token_exists(conf: Path, label: str) -> bool:
    """True if a token labelled ``label`` is initialised under ``conf``'s token dir."""
    tool = _tool()
    out = subprocess.run(
        [tool, "--show-slots"],
        env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
        capture_output=True,
        text=True,
        check=False,
    )
    labels = (
        line.split(":", 1)[1].strip()
        for line in out.stdout.splitlines()
        if line.strip().startswith("Label:")
    )
    return label in labels


def _tool() -> str:
    tool = shutil.which("softhsm2-util")
    if tool is None:
        raise HsmModuleNotFound(
            "softhsm2-util not found: install SoftHSM2 (apt-get install softhsm2) "
            "or set hsm.module to your HSM vendor's PKCS#11 module"
        )
    return tool


def ensure_token(settings: Settings) -> bool:
    """Create the home's SoftHSM2 token and PINs unless present. True if created."""
    conf = Path(settings.hsm.softhsm2_conf or settings.home / "softhsm2.conf")
    if not Path(settings.hsm.module).exists():
        raise HsmModuleNotFound(
            f"PKCS#11 module not found: {settings.hsm.module} "
            "(install SoftHSM2: apt-get install softhsm2)"
        )
    if not conf.exists():
        write_conf(conf, settings.home / "tokens")
    if token_exists(conf, settings.hsm.token_label):
        return False
    pin_file = Path(settings.hsm.pin_file)
    if settings.hsm.pin:
        user_pin = settings.hsm.pin
    elif pin_file.exists():
        user_pin = pin_file.read_text().strip()
    else:
        user_pin = secrets.token_hex(16)
        write_secret(pin_file, user_pin)
    so_pin = secrets.token_hex(16)
    write_secret(settings.secrets_dir / "hsm-so.pin", so_pin)
    result = subprocess.run(
        [
            _tool(),
            "--init-token",
            "--free",
            "--label",
            settings.hsm.token_label,
            "--so-pin",
            so_pin,
            "--pin",
            user_pin,
        ],
        env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).replace(so_pin, "***").replace(user_pin, "***")
        raise HsmError(f"softhsm2-util could not create the token: {detail.strip()}")
    return True
