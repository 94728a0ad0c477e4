"""Home directory, ``hsmca.toml`` and ``HSMCA_<SECTION>__<KEY>`` overrides.

The home is ``--home DIR``, else ``$HSMCA_HOME``, else ``./.hsmca``. ``init`` writes the
config with every default spelled out; any key can then be overridden from the
environment, the value parsed as TOML when it parses and taken as a string otherwise.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pki.durations import parse_duration
from pki.errors import BadDuration, ConfigError

CONFIG_NAME = "hsmca.toml"
SECTIONS = (
    "server",
    "database",
    "hsm",
    "ca",
    "acme",
    "policy",
    "crl",
    "ocsp",
    "notify",
    "devices",
    "profiles",
)
ENV_PREFIX = "HSMCA_"
LOG_LEVELS = ("debug", "info", "warning", "error")
#: an ``acme.dns_resolver``: an IPv4 address or a bracketed IPv6 one, with an optional port
_RESOLVER = re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    """Return the absolute home directory: argument, ``$HSMCA_HOME``, or ``./.hsmca``."""
    chosen = home or os.environ.get("HSMCA_HOME") or ".hsmca"
    return Path(chosen).expanduser().resolve()


def default_softhsm_module() -> str:
    """Path of the SoftHSM2 module on this machine (first candidate if none exists)."""
    for candidate in SOFTHSM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return SOFTHSM_CANDIDATES[0]


def default_workers() -> int:
    """HTTPS workers when none are configured: two per CPU core, at most 8. A worker
    runs Python under one GIL, and keep-alive clients stay with the worker that accepted
    them, so one per core left a core idle whenever the connections were unevenly
    spread (measured on 2 cores: 226-297 certificates/s with 2 workers, 312-383 with 4)."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    https_port: int = 8443
    http_port: int = 8080
    public_https_url: str = ""
    public_http_url: str = ""
    workers: int = field(default_factory=default_workers)
    max_body_bytes: int = 65536
    #: debug | info | warning | error (secrets are never logged, whatever the level)
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"server.log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}"
            )


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = ""
    #: how long a SQLite write waits for a lock held outside hsmca before a 503
    busy_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class HsmSettings:
    module: str = ""
    token_label: str = "hsmca"
    pin_file: str = ""
    pin: str = field(default="", repr=False)
    softhsm2_conf: str = ""


@dataclass(frozen=True)
class CaSettings:
    organisation: str = "hsmca"
    root_key: str = "ec-p384"
    issuing_key: str = "ec-p256"
    root_ttl: str = "3650d"
    issuing_ttl: str = "1825d"
    ocsp_ttl: str = "7d"
    server_ttl: str = "30d"
    hostnames: tuple[str, ...] = ()
    name_constraints: tuple[str, ...] = ()
    device_uri_template: str = "urn:dev:serial:{device_id}"
    backdate_seconds: int = 60
    pending_grace_seconds: int = 300
    #: lint every end-entity certificate (pkilint RFC 5280 and profile checks) on a
    #: throwaway-key copy before the HSM signs it; an ERROR refuses the issuance
    lint_before_sign: bool = True
    #: the scheduler replaces the issuing CA once it has used this fraction of its life
    issuing_rotate_at: float = 0.75

    def __post_init__(self) -> None:
        if not 0.1 <= self.issuing_rotate_at < 1:
            raise ConfigError("ca.issuing_rotate_at must be at least 0.1 and below 1")


@dataclass(frozen=True)
class AcmeSettings:
    http01_port: int = 80
    tlsalpn01_port: int = 443
    dns_resolver: str = ""
    require_eab: bool = False
    allowed_domains: tuple[str, ...] = ("*",)
    default_profile: str = "mtls-server"
    #: shown in the directory; "" serves a short statement at /acme/terms
    terms_of_service_url: str = ""
    #: new orders one account may create per rolling hour (rateLimited beyond)
    orders_per_hour: int = 300
    #: how long a challenge response waits for a prompt validation before answering
    #: ``processing`` (validation itself always runs off the request thread)
    validation_wait_seconds: float = 5.0
    #: total time one validation may take (DNS, connect, TLS, HTTP and redirects)
    validation_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        for name in ("http01_port", "tlsalpn01_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ConfigError(f"acme.{name} must be a port number (1-65535)")
        if not 0 < self.validation_timeout_seconds <= 50:
            raise ConfigError("acme.validation_timeout_seconds must be above 0 and at most 50")
        if not 0 <= self.validation_wait_seconds <= 30:
            raise ConfigError("acme.validation_wait_seconds must be between 0 and 30")
        if self.orders_per_hour < 1:
            raise ConfigError("acme.orders_per_hour must be at least 1")
        if self.dns_resolver and not _RESOLVER.fullmatch(self.dns_resolver):
            raise ConfigError(
                f'acme.dns_resolver {self.dns_resolver!r}: use "" (the system resolver), '
                '"IP:PORT" or "[IPv6]:PORT"'
            )


@dataclass(frozen=True)
class DeviceSettings:
    """Device enrolment (EST and ``/api/v1/devices``)."""

    #: the profile devices enrol with (a ``device`` or ``device-*`` profile)
    profile: str = "device"
    #: lifetime of a one-time enrolment credential unless ``--ttl`` says otherwise
    credential_ttl: str = "24h"
    #: PEM bundle of the manufacturer CAs whose IDevID certificates may enrol over mTLS
    #: ("" = none; relative paths are relative to the home)
    manufacturer_ca_file: str = ""
    #: an IDevID enrols only a device already in the inventory (provisioned or enrolled)
    idevid_known_devices_only: bool = False

    def __post_init__(self) -> None:
        if self.profile != "device" and not self.profile.startswith("device-"):
            raise ConfigError('devices.profile must be "device" or a "device-..." profile')
        _durations("devices.credential_ttl", (self.credential_ttl,))


@dataclass(frozen=True)
class CrlSettings:
    shards: int = 1
    validity: str = "24h"
    delta_validity: str = "1h"
    debounce_seconds: int = 2


@dataclass(frozen=True)
class OcspSettings:
    validity: str = "1h"


@dataclass(frozen=True)
class NotifySettings:
    """Expiry notifications (:mod:`pki.expiry`): a signed webhook, e-mail, both or none."""

    webhook_url: str = ""
    #: file holding the HMAC-SHA256 key that signs webhook bodies (relative: to the home)
    webhook_secret_file: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_from: str = "hsmca@localhost"
    email_to: tuple[str, ...] = ()
    #: thresholds of profiles without ``notify_before`` ([]: derived from each lifetime)
    default_thresholds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.webhook_url:  # never quoted: a webhook URL may carry a token
            parts = urlsplit(self.webhook_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("notify.webhook_url must be an http:// or https:// URL")
            if not self.webhook_secret_file:
                raise ConfigError(
                    "notify.webhook_url needs notify.webhook_secret_file: a file with the "
                    "HMAC key, e.g. `openssl rand -hex 32 > secrets/webhook.key`"
                )
        if not 0 < self.smtp_port < 65536:
            raise ConfigError("notify.smtp_port must be a port number (1-65535)")
        if bool(self.smtp_host) != bool(self.email_to):
            raise ConfigError("notify.smtp_host and notify.email_to: set both or neither")
        _durations("notify.default_thresholds", self.default_thresholds)


def _durations(name: str, values: tuple[str, ...]) -> tuple[dt.timedelta, ...]:
    try:
        return tuple(parse_duration(v) for v in values)
    except BadDuration as exc:
        raise ConfigError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class PolicySettings:
    max_names: int = 100
    allowed_key_types: tuple[str, ...] = ("rsa", "ec-p256", "ec-p384", "ed25519")
    min_rsa_bits: int = 2048


@dataclass(frozen=True)
class ProfileSettings:
    default_ttl: str
    max_ttl: str
    issuer: str = ""
    extended_key_usage: tuple[str, ...] = ()
    #: expiry notification thresholds ([]: notify.default_thresholds, else derived)
    notify_before: tuple[str, ...] = ()

    @property
    def default(self) -> dt.timedelta:
        return parse_duration(self.default_ttl)

    @property
    def maximum(self) -> dt.timedelta:
        return parse_duration(self.max_ttl)

    @property
    def notify_deltas(self) -> tuple[dt.timedelta, ...]:
        return tuple(parse_duration(v) for v in self.notify_before)


DEFAULT_PROFILES: dict[str, ProfileSettings] = {
    "mtls-server": ProfileSettings("24h", "30d"),
    "mtls-client": ProfileSettings("24h", "30d"),
    "mtls": ProfileSettings("24h", "30d"),
    "device": ProfileSettings("7d", "90d"),
}


@dataclass(frozen=True)
class Settings:
    """Every setting, resolved: file, then environment, then derived defaults."""

    home: Path
    server: ServerSettings
    database: DatabaseSettings
    hsm: HsmSettings
    ca: CaSettings
    acme: AcmeSettings
    policy: PolicySettings
    profiles: dict[str, ProfileSettings]
    crl: CrlSettings = CrlSettings()
    ocsp: OcspSettings = OcspSettings()
    notify: NotifySettings = NotifySettings()
    devices: DeviceSettings = DeviceSettings()

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def manufacturer_ca_path(self) -> Path | None:
        """The IDevID manufacturer CA bundle, if one is configured."""
        name = self.devices.manufacturer_ca_file
        return (self.home / name) if name else None

    def hsm_pin(self) -> str:
        """The user PIN: ``HSMCA_HSM__PIN`` or the PIN file. Raises ConfigError if neither."""
        if self.hsm.pin:
            return self.hsm.pin
        path = Path(self.hsm.pin_file)
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(
                f"HSM PIN file {path} not found: run `hsmca init` or set HSMCA_HSM__PIN"
            ) from None


def default_document(home: Path) -> dict[str, Any]:
    """The configuration ``init`` writes for ``home``: every key with its default."""
    server = ServerSettings()
    profiles = {
        name: {"default_ttl": p.default_ttl, "max_ttl": p.max_ttl, "notify_before": []}
        for name, p in DEFAULT_PROFILES.items()
    }
    return {
        "server": {
            "host": server.host,
            "https_port": server.https_port,
            "http_port": server.http_port,
            "public_https_url": f"https://localhost:{server.https_port}",
            "public_http_url": f"http://127.0.0.1:{server.http_port}",
            "workers": server.workers,
            "max_body_bytes": server.max_body_bytes,
            "log_level": server.log_level,
        },
        "database": {
            "url": f"sqlite:///{home / 'hsmca.db'}",
            "busy_timeout_seconds": DatabaseSettings().busy_timeout_seconds,
        },
        "hsm": {
            "module": default_softhsm_module(),
            "token_label": "hsmca",
            "pin_file": str(home / "secrets" / "hsm.pin"),
            "softhsm2_conf": str(home / "softhsm2.conf"),
        },
        "ca": _asdict(CaSettings()),
        "acme": _asdict(AcmeSettings()),
        "policy": _asdict(PolicySettings()),
        "crl": _asdict(CrlSettings()),
        "ocsp": _asdict(OcspSettings()),
        "notify": _asdict(NotifySettings()),
        "devices": _asdict(DeviceSettings()),
        "profiles": profiles,
    }


def _asdict(obj: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(obj).items()}


def load_settings(home: Path, environ: dict[str, str] | None = None) -> Settings:
    """Read ``home/hsmca.toml`` (defaults if absent) and apply environment overrides."""
    environ = dict(os.environ if environ is None else environ)
    doc = default_document(home)
    path = home / CONFIG_NAME
    if path.exists():
        try:
            _merge(doc, tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            _apply_override(doc, name[len(ENV_PREFIX) :], raw)
    return _build(home, doc)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_override(doc: dict[str, Any], path: str, raw: str) -> None:
    parts = [p.lower() for p in path.split("__")]
    node = doc
    for i, part in enumerate(parts):
        key = part
        if key not in node and key.replace("_", "-") in node:
            key = key.replace("_", "-")
        if i == len(parts) - 1:
            node[key] = _parse_env_value(raw)
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{ENV_PREFIX}{path}: {part} is not a section")


def _section(cls: type, data: dict[str, Any], name: str) -> Any:
    known = {f for f in cls.__dataclass_fields__}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    kwargs = {}
    for key, value in data.items():
        spec = cls.__dataclass_fields__[key]
        default = spec.default
        if default is MISSING and spec.default_factory is not MISSING:
            default = spec.default_factory()  # a computed default has the field's type too
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise ConfigError(f"{name}.{key} must be a list")
            value = tuple(str(v) for v in value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}.{key} must be true or false")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}.{key} must be an integer, not {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name}.{key} must be a non-negative number, not {value!r}")
            value = float(value)
        elif not isinstance(value, str):
            value = str(value)
        kwargs[key] = value
    return cls(**kwargs)


def _build(home: Path, doc: dict[str, Any]) -> Settings:
    for section in SECTIONS:
        if not isinstance(doc.get(section), dict):
            raise ConfigError(f"[{section}] must be a table")
    unknown = set(doc) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")
    profiles: dict[str, ProfileSettings] = {}
    for name, data in doc["profiles"].items():
        if not isinstance(data, dict) or "default_ttl" not in data or "max_ttl" not in data:
            raise ConfigError(f"[profiles.{name}] needs default_ttl and max_ttl")
        profile = _section(ProfileSettings, data, f"profiles.{name}")
        try:
            if profile.default > profile.maximum:
                raise ConfigError(f"profiles.{name}: default_ttl exceeds max_ttl")
        except ValueError as exc:
            raise ConfigError(f"profiles.{name}: {exc}") from None
        _durations(f"profiles.{name}.notify_before", profile.notify_before)
        profiles[name] = profile
    return Settings(
        home=home,
        server=_section(ServerSettings, doc["server"], "server"),
        database=_section(DatabaseSettings, doc["database"], "database"),
        hsm=_section(HsmSettings, doc["hsm"], "hsm"),
        ca=_section(CaSettings, doc["ca"], "ca"),
        acme=_section(AcmeSettings, doc["acme"], "acme"),
        policy=_section(PolicySettings, doc["policy"], "policy"),
        profiles=profiles,
        crl=_section(CrlSettings, doc["crl"], "crl"),
        ocsp=_section(OcspSettings, doc["ocsp"], "ocsp"),
        notify=_section(NotifySettings, doc["notify"], "notify"),
        devices=_section(DeviceSettings, doc["devices"], "devices"),
    )


def dump_toml(doc: dict[str, Any]) -> str:
    """Serialise the (two-level) configuration document as TOML."""
    lines: list[str] = []

    def table(prefix: str, data: dict[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
        if scalars or not data:
            lines.append(f"[{prefix}]")
            lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
            lines.append("")
        for key, value in data.items():
            if isinstance(value, dict):
                table(f"{prefix}.{_key(key)}", value)

    for section, data in doc.items():
        table(_key(section), data)
    return "\n".join(lines)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _value(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_default_config(home: Path, overrides: dict[str, dict[str, Any]]) -> Path:
    """Write ``home/hsmca.toml`` with defaults plus ``overrides``; return its path."""
    doc = default_document(home)
    _merge(doc, overrides)
    path = home / CONFIG_NAME
    path.write_text(
        "# hsmca configuration. Any key can be overridden by HSMCA_<SECTION>__<KEY>.\n"
        + dump_toml(doc)
    )
    return path
