"""IDevID trust: device certificates from a manufacturer CA (IEEE 802.1AR) that a device
presents over TLS to enrol without a one-time credential."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from pki.errors import ConfigError, Unauthorised


class ManufacturerTrust:
    """The configured manufacturer CA bundle, re-read when the file changes.

    The TLS layer has already verified the client's chain against ``ca/trust.pem`` (which
    includes this bundle); this decides whether the certificate is an IDevID, i.e. issued
    directly by one of the manufacturer CAs rather than by hsmca, and whose device it names.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._loaded: tuple[float, list[x509.Certificate]] | None = None

    @property
    def configured(self) -> bool:
        return self.path is not None

    def certificates(self) -> list[x509.Certificate]:
        """The manufacturer CA certificates (ConfigError if the bundle cannot be read)."""
        if self.path is None:
            return []
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as exc:
            raise ConfigError(f"devices.manufacturer_ca_file {self.path}: {exc.strerror}") from None
        with self._lock:
            if self._loaded is None or self._loaded[0] != mtime:
                try:
                    certs = x509.load_pem_x509_certificates(self.path.read_bytes())
                except ValueError:
                    raise ConfigError(
                        f"devices.manufacturer_ca_file {self.path}: not a PEM certificate bundle"
                    ) from None
                self._loaded = (mtime, certs)
            return self._loaded[1]

    def pem(self) -> str:
        """The bundle as PEM text (empty when none is configured)."""
        return "".join(c.public_bytes(Encoding.PEM).decode() for c in self.certificates())

    def device_id_of(self, der: bytes, now: dt.datetime) -> str:
        """The device id an IDevID names (subject serialNumber, else CN); Unauthorised when
        ``der`` is not a currently valid certificate issued by a manufacturer CA."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise Unauthorised("the client certificate cannot be parsed") from None
        if not any(issued_by(cert, ca) for ca in self.certificates()):
            raise Unauthorised(
                "the client certificate is not from a trusted manufacturer CA (a device "
                "renewing a certificate issued here uses simplereenroll)"
            )
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Unauthorised("the IDevID certificate is not valid at this time")
        try:
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise Unauthorised("a CA certificate is no IDevID")
        except x509.ExtensionNotFound:
            pass
        except ValueError:
            raise Unauthorised("the client certificate's extensions cannot be parsed") from None
        for oid in (NameOID.SERIAL_NUMBER, NameOID.COMMON_NAME):
            attrs = cert.subject.get_attributes_for_oid(oid)
            if attrs:
                return str(attrs[0].value).strip()
        raise Unauthorised("the IDevID certificate names no device (no serialNumber or CN)")


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (names match and the signature verifies)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
