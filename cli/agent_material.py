"""Key material and files of the renewal agent: new keys, CSRs, certificate checks, and
atomic writes (temp file in the same directory, fsync, rename, fsync of the directory)."""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.errors import HsmcaError
from pki.policy import classify_names

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519")


class AgentError(HsmcaError):
    """A failure the agent cannot retry its way out of (refusal, bad files, no token)."""


def new_private_key(key_type: str) -> Any:
    """A fresh software key of ``key_type`` (one of :data:`KEY_TYPES`)."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(key_type[4:]))
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise AgentError(f"unknown key type {key_type!r}; one of {', '.join(KEY_TYPES)}")


def normalise_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names as the CA will write them (DNS lower-cased, IPs canonical), in order."""
    requested = classify_names(names)
    if requested.uris:
        raise AgentError(f"--name takes DNS names and IP addresses, not {requested.uris[0]!r}")
    return (*requested.dns, *requested.ips)


def build_csr(names: tuple[str, ...], key: Any) -> bytes:
    """A PEM CSR for ``names`` (the first is also the CN) signed with ``key``."""
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def public_key_der(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    dns = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    return dns | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def allows_client_auth(cert: x509.Certificate) -> bool:
    """True unless the certificate has an EKU without clientAuth (no mTLS renewal then)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return any(
        oid in eku
        for oid in (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
    )


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file in the same directory
    (created with ``mode``), fsync, rename over ``path``, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
