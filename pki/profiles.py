"""Certificate profiles: what a certificate of each kind looks like and how long it lives."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from pki.config import ProfileSettings, Settings
from pki.errors import ConfigError, UnknownProfile

EKU_NAMES: dict[str, ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
}

BUILT_IN_EKUS: dict[str, tuple[str, ...]] = {
    "mtls-server": ("serverAuth",),
    "mtls-client": ("clientAuth",),
    "mtls": ("serverAuth", "clientAuth"),
    "device": ("clientAuth",),
}


@dataclass(frozen=True)
class Profile:
    """A certificate profile. ``device`` profiles carry the device id as URI SAN and
    subject serialNumber."""

    name: str
    extended_key_usages: tuple[ObjectIdentifier, ...]
    default_ttl: dt.timedelta
    max_ttl: dt.timedelta
    device: bool = False
    issuer: str = ""


def _profile(name: str, settings: ProfileSettings) -> Profile:
    eku_names = settings.extended_key_usage or BUILT_IN_EKUS.get(name, ("serverAuth", "clientAuth"))
    unknown = [e for e in eku_names if e not in EKU_NAMES]
    if unknown:
        raise ConfigError(
            f"profiles.{name}.extended_key_usage: unknown {unknown}; use {sorted(EKU_NAMES)}"
        )
    return Profile(
        name=name,
        extended_key_usages=tuple(EKU_NAMES[e] for e in eku_names),
        default_ttl=settings.default,
        max_ttl=settings.maximum,
        device=name == "device" or name.startswith("device-"),
        issuer=settings.issuer,
    )


class ProfileRegistry:
    """The configured profiles by name."""

    def __init__(self, settings: Settings) -> None:
        self._profiles = {name: _profile(name, p) for name, p in settings.profiles.items()}

    def get(self, name: str) -> Profile:
        try:
            return self._profiles[name]
        except KeyError:
            raise UnknownProfile(
                f"unknown profile {name!r}; known: {', '.join(sorted(self._profiles))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._profiles)
