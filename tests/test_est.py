"""EST (RFC 7030) device enrolment at ``/.well-known/est/``, exercised as a device would:
curl over TLS (``--cacert`` the hsmca root, never ``-k``), CSRs and PKCS#7 handled by the
openssl command line. Operator steps go through the ``hsmca device`` CLI where the CLI is
the point (enroll-token, show, revoke); elsewhere credentials are made through the core.

One service per xdist worker (module scope) on its own home, whose ``hsmca.toml`` names a
manufacturer CA bundle so that IDevID enrolment can be tested next to one-time credentials.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import re
import sqlite3
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from pki.access import token_digest
from pki.actors import operator
from pki.audit import StoredEvent
from pki.bootstrap import initialise
from pki.serials import serial_hex
from pki.service import Pki
from tests.api_helpers import unique
from tests.conftest import RunningService, build_csr
from tests.revocation_helpers import status_line

EST = "/.well-known/est"
PKCS10 = "application/pkcs10"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
PROBLEM = "application/problem+json"
CHALLENGE = 'Basic realm="hsmca EST"'
DEVICE_LIFETIME = dt.timedelta(days=7, seconds=60)  # device profile default + backdating
TIMEOUT = 30
HSMCA = str(Path(sys.executable).parent / "hsmca")


# -- the service and its manufacturer CA ----------------------------------------------------


@dataclass(frozen=True)
class Authority:
    """A CA made in the test (a device manufacturer's)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@dataclass(frozen=True)
class Est:
    service: RunningService
    home: Path
    manufacturer: Authority
    #: the core on the same home, for assertions (opened once: opening costs ~0.2 s)
    core: Pki

    @property
    def root(self) -> Path:
        return self.home / "ca" / "root.pem"

    @property
    def intermediate(self) -> Path:
        return self.home / "ca" / "intermediate.pem"


def make_authority(name: str) -> Authority:
    """A self-signed P-256 CA named ``name``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def make_idevid(ca: Authority, device_id: str, directory: Path) -> tuple[Path, Path]:
    """An IDevID (IEEE 802.1AR) for ``device_id`` issued by ``ca``: subject serialNumber is
    the device id (the CN is the product name); return (cert PEM path, key PEM path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme Devices"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "Acme Sensor 2"),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    stem = directory / f"idevid-{uuid.uuid4().hex[:8]}"
    cert_path, key_path = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def est(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Est]:
    """A fresh home trusting a manufacturer CA for IDevIDs, served on loopback."""
    home = tmp_path_factory.mktemp("est") / "home"
    initialise(home, "EST Org")
    manufacturer = make_authority("Acme Devices Manufacturer CA")
    (home / "manufacturer").mkdir()
    (home / "manufacturer" / "ca.pem").write_bytes(
        manufacturer.cert.public_bytes(serialization.Encoding.PEM)
    )
    config = home / "hsmca.toml"
    text = config.read_text()
    assert 'manufacturer_ca_file = ""' in text, text
    config.write_text(
        text.replace('manufacturer_ca_file = ""', 'manufacturer_ca_file = "manufacturer/ca.pem"')
    )
    service = RunningService(home)
    core = Pki.open(home)
    try:
        yield Est(service, home, manufacturer, core)
    finally:
        core.close()
        assert service.stop() == 0, service.log.read_text()[-2000:]


# -- the device side: curl and openssl ------------------------------------------------------


def run(cmd: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command-line tool; never raises on failure."""
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=TIMEOUT, check=False)


def hsmca(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HSMCA, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@dataclass(frozen=True)
class Reply:
    """What curl saw: exit code, HTTP status (0 when there was none), the final
    response's headers (lower-case names) and body."""

    rc: int
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: str

    def problem(self, status: int, *mentions: str) -> dict[str, Any]:
        """The reply is an RFC 9457 problem with ``status`` whose detail names ``mentions``."""
        assert self.status == status, (self.status, self.body[:500], self.stderr)
        assert self.headers.get("content-type", "").split(";")[0] == PROBLEM, self.headers
        assert b"Traceback" not in self.body and b"<html" not in self.body.lower()
        body = json.loads(self.body)
        assert body["status"] == status, body
        for field in ("type", "title", "detail"):
            assert isinstance(body[field], str) and body[field], body
        for word in mentions:
            assert word in body["detail"], (word, body)
        if status == 401:
            assert self.headers.get("www-authenticate") == CHALLENGE, self.headers
        return body


def curl(
    est: Est,
    operation: str,
    body: bytes | None = None,
    *,
    user: str | None = None,
    authorization: str | None = None,
    cert: tuple[Path, Path] | None = None,
    content_type: str | None = PKCS10,
    headers: tuple[str, ...] = (),
) -> Reply:
    """``curl --cacert root.pem`` to ``/.well-known/est/<operation>``: a GET without a
    body, else a POST of ``body`` (``content_type=None`` sends no Content-Type)."""
    work = est.home / "curl"
    work.mkdir(exist_ok=True)
    stem = work / uuid.uuid4().hex
    headers_file, out_file = stem.with_suffix(".headers"), stem.with_suffix(".out")
    cmd = ["curl", "-sS", "--noproxy", "*", "--max-time", str(TIMEOUT)]
    cmd += ["--cacert", str(est.root), "-D", str(headers_file), "-o", str(out_file)]
    cmd += ["-w", "%{http_code}"]
    if body is not None:
        body_file = stem.with_suffix(".body")
        body_file.write_bytes(body)
        cmd += ["--data-binary", f"@{body_file}"]
        cmd += ["-H", f"Content-Type: {content_type}" if content_type else "Content-Type:"]
    if user is not None:
        cmd += ["-u", user]
    if authorization is not None:
        cmd += ["-H", f"Authorization: {authorization}"]
    if cert is not None:
        cmd += ["--cert", str(cert[0]), "--key", str(cert[1])]
    for header in headers:
        cmd += ["-H", header]
    done = run([*cmd, f"{est.service.base}{EST}/{operation}"])
    status = done.stdout.decode().strip()
    return Reply(
        rc=done.returncode,
        status=int(status) if status.isdigit() else 0,
        headers=_last_headers(headers_file),
        body=out_file.read_bytes() if out_file.exists() else b"",
        stderr=done.stderr.decode(errors="replace"),
    )


def _last_headers(path: Path) -> dict[str, str]:
    """The headers of the last response in a ``curl -D`` file (after any 100 Continue)."""
    if not path.exists():
        return {}
    blocks = [b for b in path.read_text().replace("\r\n", "\n").split("\n\n") if b.strip()]
    if not blocks:
        return {}
    headers: dict[str, str] = {}
    for line in blocks[-1].splitlines()[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def openssl_csr(directory: Path, subject: str) -> tuple[bytes, Path]:
    """``openssl req -new -newkey ec (P-256) -subj SUBJECT -outform DER``: (DER, key path)."""
    stem = directory / f"csr-{uuid.uuid4().hex[:8]}"
    key_path, csr_path = stem.with_suffix(".key"), stem.with_suffix(".der")
    done = run(
        [
            "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key_path), "-subj", subject, "-outform", "DER",
            "-out", str(csr_path),
        ]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return csr_path.read_bytes(), key_path


def b64(der: bytes) -> bytes:
    """Base64 as ``base64`` prints it (lines of 76)."""
    return base64.encodebytes(der)


def pkcs7_certificates(body: bytes) -> list[x509.Certificate]:
    """``base64 -d | openssl pkcs7 -inform DER -print_certs`` of an EST reply."""
    done = run(["sh", "-c", "base64 -d | openssl pkcs7 -inform DER -print_certs"], body)
    assert done.returncode == 0, done.stderr
    return x509.load_pem_x509_certificates(done.stdout)


def enrolled(reply: Reply, directory: Path) -> tuple[x509.Certificate, Path]:
    """The one certificate of a successful simpleenroll/simplereenroll, written as PEM."""
    assert reply.rc == 0 and reply.status == 200, (reply.status, reply.body[:500], reply.stderr)
    assert reply.headers.get("content-type") == CERTS_ONLY, reply.headers
    assert reply.headers.get("content-transfer-encoding") == "base64", reply.headers
    certs = pkcs7_certificates(reply.body)
    assert len(certs) == 1, certs
    path = directory / f"cert-{serial_hex(certs[0].serial_number)}.pem"
    path.write_bytes(certs[0].public_bytes(serialization.Encoding.PEM))
    return certs[0], path


def spki(key_or_cert: Any) -> bytes:
    public = key_or_cert.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_file(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), None)


def assert_device_certificate(
    est: Est, cert: x509.Certificate, path: Path, device_id: str, key: Path
) -> None:
    """``cert`` is hsmca's device certificate for ``device_id`` and the key in ``key``:
    openssl verifies it for TLS client use, it names the device only, lives ~7 days, and
    its row records the device."""
    done = run(
        [
            "openssl", "verify", "-purpose", "sslclient", "-CAfile", str(est.root),
            "-untrusted", str(est.intermediate), str(path),
        ]
    )  # fmt: skip
    assert done.returncode == 0 and b": OK" in done.stdout, (done.stdout, done.stderr)
    assert spki(cert) == spki(key_file(key))
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)] == [
        device_id
    ]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
        device_id
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"urn:dev:serial:{device_id}")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime - DEVICE_LIFETIME) <= dt.timedelta(seconds=2), lifetime
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    row = est.core.store.certificate(serial_hex(cert.serial_number))
    assert (
        row.device_id == device_id
        and row.profile == "device"
        and row.der == cert.public_bytes(serialization.Encoding.DER)
    )


# -- the core side: credentials and what the store holds -------------------------------------


def credential(est: Est, device_id: str, ttl: dt.timedelta | None = None) -> str:
    """A one-time enrolment credential, made through the core (a CLI run costs ~2 s)."""
    return est.core.create_enrollment_credential(device_id, ttl, operator("est-tests")).secret


@dataclass(frozen=True)
class Snapshot:
    certificates: int
    device_serials: list[str]
    credential_used: bool | None  # None: no credential asked about


def snapshot(est: Est, device_id: str, secret: str | None = None) -> Snapshot:
    store = est.core.store
    row = store.devices.credential(token_digest(secret)) if secret else None
    assert secret is None or row is not None
    return Snapshot(
        store.count_certificates(),
        [c.serial for c in store.devices.certificates(device_id)],
        None if row is None else row.used_at is not None,
    )


def certificate_count(est: Est) -> int:
    return est.core.store.count_certificates()


def last_event_id(est: Est) -> int:
    ids = [e.id for e in est.core.store.audit_events()]
    return ids[-1] if ids else 0


def events_since(est: Est, after_id: int) -> list[StoredEvent]:
    return [e for e in est.core.store.audit_events() if e.id > after_id]


def basic(device_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{device_id}:{secret}".encode()).decode()


# -- 1. cacerts and csrattrs ----------------------------------------------------------------


def test_cacerts_holds_the_issuing_ca_and_the_root(est: Est) -> None:
    reply = curl(est, "cacerts")
    assert reply.rc == 0 and reply.status == 200, (reply.status, reply.stderr)
    assert reply.headers.get("content-type") == CERTS_ONLY, reply.headers
    assert reply.headers.get("content-transfer-encoding") == "base64", reply.headers
    assert set(reply.body.replace(b"\n", b"")) <= set(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
    )
    certs = pkcs7_certificates(reply.body)
    root = x509.load_pem_x509_certificate(est.root.read_bytes())
    issuing = x509.load_pem_x509_certificate(est.intermediate.read_bytes())
    # certificates is a SET OF in SignedData: the order on the wire means nothing
    assert sorted(c.public_bytes(serialization.Encoding.DER) for c in certs) == sorted(
        c.public_bytes(serialization.Encoding.DER) for c in (issuing, root)
    )
    # a device can bootstrap from it: the chain it was given verifies the issuing CA
    chain = est.home / "curl" / f"cacerts-{uuid.uuid4().hex[:8]}.pem"
    chain.write_bytes(
        next(c for c in certs if c.subject == c.issuer).public_bytes(serialization.Encoding.PEM)
    )
    done = run(["openssl", "verify", "-CAfile", str(chain), str(est.intermediate)])
    assert done.returncode == 0, done.stderr


def test_csrattrs_lists_what_a_device_csr_needs(est: Est) -> None:
    reply = curl(est, "csrattrs")
    assert reply.rc == 0 and reply.status == 200, (reply.status, reply.stderr)
    assert reply.headers.get("content-type") == "application/csrattrs", reply.headers
    assert reply.headers.get("content-transfer-encoding") == "base64", reply.headers
    der = base64.b64decode(reply.body, validate=False)
    done = run(["openssl", "asn1parse", "-inform", "DER"], der)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    objects = [line.rsplit(":", 1)[1].strip() for line in text.splitlines() if "OBJECT" in line]
    assert objects == [
        "challengePassword",
        "id-ecPublicKey",
        "prime256v1",
        "ecdsa-with-SHA256",
        "serialNumber",
    ], text
    # a SEQUENCE OF AttrOrOID: the top-level SEQUENCE spans the whole body
    outer = re.match(r"\s*0:d=0\s+hl=(\d+)\s+l=\s*(\d+)\s+cons: SEQUENCE", text)
    assert outer and int(outer[1]) + int(outer[2]) == len(der), text


# -- 2. simpleenroll with a one-time credential ---------------------------------------------


def test_simpleenroll_with_a_credential_from_the_cli(est: Est, tmp_path: Path) -> None:
    device_id = unique("dev")
    made = hsmca(est.home, "device", "enroll-token", "--device-id", device_id)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret and "\n" not in secret and ":" not in secret, made.stdout
    der, key = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    before = last_event_id(est)
    reply = curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}")
    cert, path = enrolled(reply, tmp_path)
    assert_device_certificate(est, cert, path, device_id, key)
    after = snapshot(est, device_id, secret)
    assert after.credential_used is True
    assert after.device_serials == [serial_hex(cert.serial_number)]
    issued = [e for e in events_since(est, before) if e.action == "device.enroll"]
    assert [(e.outcome, e.subject) for e in issued] == [("ok", serial_hex(cert.serial_number))]
    assert issued[0].details["via"] == "credential"
    assert issued[0].details["channel_bound"] is False
    assert issued[0].actor == f"device:{device_id}"


@pytest.mark.parametrize(
    "form", ["pem-basic", "der-bearer", "der-no-content-type", "der-empty-subject"]
)
def test_simpleenroll_accepts_pem_bearer_and_no_content_type(
    est: Est, tmp_path: Path, form: str
) -> None:
    device_id = unique("dev")
    secret = credential(est, device_id)
    der, key = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    if form == "pem-basic":
        pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
        reply = curl(est, "simpleenroll", pem, user=f"{device_id}:{secret}")
    elif form == "der-bearer":
        reply = curl(est, "simpleenroll", b64(der), authorization=f"Bearer {secret}")
    elif form == "der-no-content-type":
        reply = curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}", content_type=None)
    else:  # the identity comes from the credential alone
        pem, software_key = build_csr(cn=None, sans=())
        key.write_bytes(
            software_key.private_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        assert x509.load_pem_x509_csr(pem).subject == x509.Name([])
        reply = curl(est, "simpleenroll", pem, user=f"{device_id}:{secret}")
    cert, path = enrolled(reply, tmp_path)
    assert_device_certificate(est, cert, path, device_id, key)
    assert snapshot(est, device_id, secret).credential_used is True


def test_simpleenroll_accepts_the_devices_own_names_in_a_san(est: Est, tmp_path: Path) -> None:
    """A SAN holding only ``URI:urn:dev:serial:<id>`` and ``DNS:<id>`` is allowed (the
    certificate still names the device by its URI only)."""
    device_id = unique("dev")
    secret = credential(est, device_id)
    pem, key = build_csr(
        cn=device_id, sans=(f"urn:dev:serial:{device_id}", device_id), serial_number=device_id
    )
    key_path = tmp_path / "san.key"
    key_path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    reply = curl(est, "simpleenroll", pem, user=f"{device_id}:{secret}")
    cert, path = enrolled(reply, tmp_path)
    assert_device_certificate(est, cert, path, device_id, key_path)


@pytest.mark.parametrize("naming", ["product-name-cn-and-serial-number", "numeric-id-in-cn"])
def test_a_cn_that_is_no_host_name_does_not_stop_enrolment(
    est: Est, tmp_path: Path, naming: str
) -> None:
    """The identity is the subject serialNumber, else the CN; nothing else of the CSR's
    subject matters (the certificate's subject is built from the device id). So
    ``/CN=<product name>/serialNumber=<id>`` (how IEEE 802.1AR devices name themselves,
    like the IDevIDs below) and ``/CN=<numeric serial>`` (a valid device id) must enrol."""
    # a device's CN is a label, not a host name: it must not be parsed as one
    if naming == "numeric-id-in-cn":
        device_id = str(uuid.uuid4().int)[:20]
        subject = f"/CN={device_id}"
    else:
        device_id = unique("dev")
        subject = f"/CN=Acme Sensor 2/serialNumber={device_id}"
    secret = credential(est, device_id)
    der, key = openssl_csr(tmp_path, subject)
    reply = curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}")
    cert, path = enrolled(reply, tmp_path)
    assert_device_certificate(est, cert, path, device_id, key)


# -- 3. a credential works once -------------------------------------------------------------


def test_a_credential_works_only_once(est: Est, tmp_path: Path) -> None:
    device_id = unique("dev")
    secret = credential(est, device_id)
    der, _ = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    first, _ = enrolled(curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}"), tmp_path)
    count = certificate_count(est)
    before = last_event_id(est)
    der2, _ = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    for attempt in (
        {"user": f"{device_id}:{secret}"},
        {"authorization": f"Bearer {secret}"},
    ):
        again = curl(est, "simpleenroll", b64(der2), **attempt)  # type: ignore[arg-type]
        again.problem(401, "already used")
    after = snapshot(est, device_id, secret)
    assert after.certificates == count
    assert after.device_serials == [serial_hex(first.serial_number)]
    refused = [
        e
        for e in events_since(est, before)
        if e.action == "device.enroll" and e.outcome == "refused"
    ]
    assert len(refused) == 2, refused
    assert all(e.subject == device_id for e in refused), refused
    assert all("already used" in e.details["reason"] for e in refused), refused
    assert not [e for e in events_since(est, before) if e.outcome == "ok"]


# -- 4. simplereenroll ----------------------------------------------------------------------


def test_simplereenroll_with_the_current_certificate(est: Est, tmp_path: Path) -> None:
    device_id = unique("dev")
    secret = credential(est, device_id)
    der, key = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    first, first_path = enrolled(
        curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}"), tmp_path
    )
    before = last_event_id(est)
    # a new key, as a device rotating its key would
    der2, key2 = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    second, second_path = enrolled(
        curl(est, "simplereenroll", b64(der2), cert=(first_path, key)), tmp_path
    )
    assert second.serial_number != first.serial_number
    assert_device_certificate(est, second, second_path, device_id, key2)
    assert spki(second) != spki(first)
    reenrolled = [e for e in events_since(est, before) if e.action == "device.reenroll"]
    assert [(e.outcome, e.subject) for e in reenrolled] == [
        ("ok", serial_hex(second.serial_number))
    ]
    assert reenrolled[0].details["renewal_of"] == serial_hex(first.serial_number)
    # the new certificate and the new key are a working identity: re-enrol again with them
    der3, key3 = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    third, third_path = enrolled(
        curl(est, "simplereenroll", b64(der3), cert=(second_path, key2)), tmp_path
    )
    assert_device_certificate(est, third, third_path, device_id, key3)
    shown = hsmca(est.home, "device", "show", device_id, "--json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["status"] == "enrolled"
    assert record["enrolled_via"] == "credential"
    assert record["last_reenrolled_at"] is not None
    assert record["last_reenrolled_at"] >= record["enrolled_at"]
    assert record["current_serial"] == serial_hex(third.serial_number)
    assert [c["serial"] for c in record["certificates"]] == [
        serial_hex(c.serial_number) for c in (first, second, third)
    ]


def test_simplereenroll_refuses_another_device_and_no_certificate(est: Est, tmp_path: Path) -> None:
    device_id = unique("dev")
    secret = credential(est, device_id)
    der, key = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    cert, cert_path = enrolled(
        curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}"), tmp_path
    )
    count = certificate_count(est)
    other = unique("dev")
    der2, _ = openssl_csr(tmp_path, f"/serialNumber={other}")
    curl(est, "simplereenroll", b64(der2), cert=(cert_path, key)).problem(403, other)
    # no client certificate at all, only the device's enrolment credential: 401
    curl(est, "simplereenroll", b64(der), user=f"{device_id}:{secret}").problem(401)
    after = snapshot(est, device_id)
    assert after.certificates == count
    assert after.device_serials == [serial_hex(cert.serial_number)]
    assert snapshot(est, other).device_serials == []


# -- 5. a revoked device --------------------------------------------------------------------


def test_a_revoked_device_is_refused_everywhere(est: Est, tmp_path: Path) -> None:
    device_id = unique("dev")
    secret = credential(est, device_id)
    der, key = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    first, first_path = enrolled(
        curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}"), tmp_path
    )
    second, second_path = enrolled(
        curl(est, "simplereenroll", b64(der), cert=(first_path, key)), tmp_path
    )
    spare = credential(est, device_id)  # made before the revocation, never used

    revoked = hsmca(est.home, "device", "revoke", device_id, "--json")
    assert revoked.returncode == 0, revoked.stderr
    record = json.loads(revoked.stdout)
    assert record["status"] == "revoked" and record["revoked_at"]
    assert {c["status"] for c in record["certificates"]} == {"revoked"}
    count = certificate_count(est)
    events = last_event_id(est)

    for path in (first_path, second_path):
        curl(est, "simplereenroll", b64(der), cert=(path, key)).problem(401, "revoked")
    refused = {e.subject for e in events_since(est, events) if e.outcome == "refused"}
    assert {serial_hex(c.serial_number) for c in (first, second)} <= refused, refused
    curl(est, "simpleenroll", b64(der), user=f"{device_id}:{spare}").problem(401)
    idevid = make_idevid(est.manufacturer, device_id, tmp_path)
    by_idevid = curl(est, "simpleenroll", b64(der), cert=idevid)
    assert by_idevid.status in (401, 403), (by_idevid.status, by_idevid.body)
    by_idevid.problem(by_idevid.status, "revoked")
    assert snapshot(est, device_id).device_serials == [
        serial_hex(c.serial_number) for c in (first, second)
    ]
    assert certificate_count(est) == count

    ocsp = run(
        [
            "openssl", "ocsp", "-issuer", str(est.intermediate),
            "-cert", str(first_path), "-cert", str(second_path),
            "-url", f"{est.service.http_base}/ocsp", "-CAfile", str(est.root),
        ]
    )  # fmt: skip
    assert ocsp.returncode == 0, ocsp.stderr
    done = subprocess.CompletedProcess(ocsp.args, 0, ocsp.stdout.decode(), ocsp.stderr.decode())
    assert "Response verify OK" in done.stderr, done.stderr
    assert status_line(done, first_path) == "revoked", done.stdout
    assert status_line(done, second_path) == "revoked", done.stdout
    assert done.stdout.count("Reason: cessationOfOperation") == 2, done.stdout

    again = hsmca(est.home, "device", "enroll-token", "--device-id", device_id)
    assert again.returncode == 2, (again.returncode, again.stdout, again.stderr)
    assert "revoked" in again.stderr, again.stderr
    assert "hsmcad_" not in again.stdout


# -- 6. IDevID ------------------------------------------------------------------------------


def test_idevid_from_the_manufacturer_ca_enrols(est: Est, tmp_path: Path) -> None:
    device_id = unique("dev")
    idevid = make_idevid(est.manufacturer, device_id, tmp_path)
    der, key = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    before = last_event_id(est)
    cert, path = enrolled(curl(est, "simpleenroll", b64(der), cert=idevid), tmp_path)
    assert_device_certificate(est, cert, path, device_id, key)
    issued = [e for e in events_since(est, before) if e.action == "device.enroll"]
    assert [(e.outcome, e.details.get("via")) for e in issued] == [("ok", "idevid")]
    device = est.core.show_device(device_id, operator("est-tests"))
    assert device.status == "enrolled" and device.enrolled_via == "idevid"
    assert device.current_serial == serial_hex(cert.serial_number)
    # the LDevID it got then re-enrols like any device certificate
    der2, key2 = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    renewed, renewed_path = enrolled(
        curl(est, "simplereenroll", b64(der2), cert=(path, key)), tmp_path
    )
    assert_device_certificate(est, renewed, renewed_path, device_id, key2)


def test_a_client_certificate_from_another_ca_cannot_enrol(est: Est, tmp_path: Path) -> None:
    device_id = unique("dev")
    # same name as the real manufacturer CA, another key
    impostor = make_authority("Acme Devices Manufacturer CA")
    der, _ = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    count = certificate_count(est)
    reply = curl(est, "simpleenroll", b64(der), cert=make_idevid(impostor, device_id, tmp_path))
    assert reply.rc != 0 or reply.status == 401, (reply.rc, reply.status, reply.body[:300])
    if reply.status == 401:
        reply.problem(401)
    # an hsmca device certificate is a TLS identity but not an IDevID: it cannot enrol
    # another device (nor itself) without a credential
    holder = unique("dev")
    secret = credential(est, holder)
    der_h, key_h = openssl_csr(tmp_path, f"/serialNumber={holder}")
    _, holder_path = enrolled(
        curl(est, "simpleenroll", b64(der_h), user=f"{holder}:{secret}"), tmp_path
    )
    count_h = certificate_count(est)
    curl(est, "simpleenroll", b64(der), cert=(holder_path, key_h)).problem(401, "simplereenroll")
    assert snapshot(est, device_id).device_serials == []
    assert certificate_count(est) == count_h == count + 1


def test_an_idevid_csr_naming_another_device_is_403(est: Est, tmp_path: Path) -> None:
    device_id, other = unique("dev"), unique("dev")
    idevid = make_idevid(est.manufacturer, device_id, tmp_path)
    count = certificate_count(est)
    before = last_event_id(est)
    for subject in (f"/serialNumber={other}", f"/CN={other}"):
        der, _ = openssl_csr(tmp_path, subject)
        curl(est, "simpleenroll", b64(der), cert=idevid).problem(403, other, device_id)
    assert certificate_count(est) == count
    assert snapshot(est, device_id).device_serials == snapshot(est, other).device_serials == []
    refused = [
        e
        for e in events_since(est, before)
        if e.action == "device.enroll" and e.outcome == "refused"
    ]
    assert len(refused) == 2 and all(other in e.details["reason"] for e in refused), refused


# -- 7. bad input changes nothing -----------------------------------------------------------


def _flip_last_byte(der: bytes) -> bytes:
    """The DER CSR with the last byte of its signature (the end of ECDSA ``s``) changed."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def _signed_with_another_key(der: bytes) -> bytes:
    """The same CertificationRequestInfo signed by a key other than the one it holds."""
    request = asn1_csr.CertificationRequest.load(der)
    info = request["certification_request_info"]
    other = ec.generate_private_key(ec.SECP256R1())
    return asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": request["signature_algorithm"],
            "signature": other.sign(info.dump(), ec.ECDSA(hashes.SHA256())),
        }
    ).dump()


def _certificate_der(est: Est) -> bytes:
    return x509.load_pem_x509_certificate(est.root.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


BAD_BODIES: dict[str, tuple[int, str]] = {
    "not-base64": (400, "base64"),
    "base64-of-text": (400, "PKCS#10"),
    "base64-of-a-certificate": (400, "PKCS#10"),
    "empty": (400, "empty"),
    "broken-signature": (400, "signature"),
    "signed-with-another-key": (400, "signature"),
    "names-another-device": (403, "names device"),
    "cn-names-another-device": (403, "names device"),
    "extra-dns-san": (403, "evil.example"),
    "extra-uri-san": (403, "urn:dev:serial:"),
    "rsa-1024-key": (400, "RSA"),
    "content-type-form": (415, PKCS10),
    "content-type-text": (415, PKCS10),
}


def _bad_body(est: Est, case: str, device_id: str, tmp_path: Path) -> tuple[bytes, str | None]:
    good, _ = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    other = unique("dev")
    match case:
        case "not-base64":
            return b"this is not base64 at all!\n", PKCS10
        case "base64-of-text":
            return b64(b"hello, I am a device"), PKCS10
        case "base64-of-a-certificate":
            return b64(_certificate_der(est)), PKCS10
        case "empty":
            return b"", PKCS10
        case "broken-signature":
            return b64(_flip_last_byte(good)), PKCS10
        case "signed-with-another-key":
            return b64(_signed_with_another_key(good)), PKCS10
        case "names-another-device":
            return b64(openssl_csr(tmp_path, f"/serialNumber={other}")[0]), PKCS10
        case "cn-names-another-device":
            return b64(openssl_csr(tmp_path, f"/CN={other}")[0]), PKCS10
        case "extra-dns-san":
            sans = (f"urn:dev:serial:{device_id}", "evil.example")
            return build_csr(cn=None, sans=sans, serial_number=device_id)[0], PKCS10
        case "extra-uri-san":
            sans = (f"urn:dev:serial:{device_id}", f"urn:dev:serial:{other}")
            return build_csr(cn=None, sans=sans, serial_number=device_id)[0], PKCS10
        case "rsa-1024-key":
            key = tmp_path / "rsa.key"
            done = run(
                [
                    "openssl", "req", "-new", "-newkey", "rsa:1024", "-nodes", "-keyout",
                    str(key), "-subj", f"/serialNumber={device_id}", "-outform", "DER",
                ]
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            return b64(done.stdout), PKCS10
        case "content-type-form":  # what curl sends with --data-binary and no -H
            return b64(good), "application/x-www-form-urlencoded"
        case "content-type-text":
            return b64(good), "text/plain"
    raise AssertionError(case)


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_a_bad_request_changes_nothing_and_keeps_the_credential(
    est: Est, tmp_path: Path, case: str
) -> None:
    status, mention = BAD_BODIES[case]
    device_id = unique("dev")
    secret = credential(est, device_id)
    body, content_type = _bad_body(est, case, device_id, tmp_path)
    before = snapshot(est, device_id, secret)
    events = last_event_id(est)
    reply = curl(est, "simpleenroll", body, user=f"{device_id}:{secret}", content_type=content_type)
    reply.problem(status, mention)
    after = snapshot(est, device_id, secret)
    assert after == before and after.credential_used is False, (before, after)
    assert not [e for e in events_since(est, events) if e.outcome == "ok"]
    if status == 403:
        refused = [e for e in events_since(est, events) if e.action == "device.enroll"]
        assert [e.outcome for e in refused] == ["refused"], refused
    # the credential still works for a good CSR
    good, key = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    cert, path = enrolled(
        curl(est, "simpleenroll", b64(good), user=f"{device_id}:{secret}"), tmp_path
    )
    assert_device_certificate(est, cert, path, device_id, key)


AUTH_FAILURES: dict[str, tuple[str, str]] = {
    # case: (what the detail says, the audited reason)
    "no-credential": ("enroll-token", "enrolment needs"),
    "basic-for-another-device": ("not for device", "not for device"),
    "basic-not-base64": ("malformed", "malformed"),
    "basic-without-device-id": ("DEVICE_ID:SECRET", "DEVICE_ID:SECRET"),
    "unknown-secret": ("unknown enrolment credential", "unknown enrolment credential"),
    "unknown-bearer": ("unknown enrolment credential", "unknown enrolment credential"),
    "digest-scheme": ("unsupported Authorization scheme", "unsupported Authorization scheme"),
}


@pytest.mark.parametrize("case", sorted(AUTH_FAILURES))
def test_a_refused_credential_changes_nothing(est: Est, tmp_path: Path, case: str) -> None:
    detail, audited = AUTH_FAILURES[case]
    device_id = unique("dev")
    secret = credential(est, device_id)
    der, key = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    other = unique("dev")
    auth: dict[str, str] = {
        "no-credential": {},
        "basic-for-another-device": {"user": f"{other}:{secret}"},
        "basic-not-base64": {"authorization": "Basic %%%not-base64%%%"},
        "basic-without-device-id": {
            "authorization": "Basic " + base64.b64encode(secret.encode()).decode()
        },
        "unknown-secret": {"user": f"{device_id}:hsmcad_{uuid.uuid4().hex}"},
        "unknown-bearer": {"authorization": f"Bearer hsmcad_{uuid.uuid4().hex}"},
        "digest-scheme": {"authorization": f'Digest username="{device_id}"'},
    }[case]  # type: ignore[assignment]
    before = snapshot(est, device_id, secret)
    events = last_event_id(est)
    curl(est, "simpleenroll", b64(der), **auth).problem(401, detail)  # type: ignore[arg-type]
    after = snapshot(est, device_id, secret)
    assert after == before and after.credential_used is False, (before, after)
    assert snapshot(est, other).device_serials == []
    new_events = events_since(est, events)
    assert not [e for e in new_events if e.outcome == "ok"], new_events
    refused = [e for e in new_events if e.action == "device.enroll" and e.outcome == "refused"]
    assert len(refused) == 1 and audited in refused[0].details["reason"], new_events
    assert secret not in json.dumps(refused[0].details)
    # the device's credential is untouched and still works
    cert, _ = enrolled(curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}"), tmp_path)
    assert spki(cert) == spki(key_file(key))
    assert snapshot(est, device_id, secret).device_serials == [serial_hex(cert.serial_number)]


def test_an_expired_credential_is_refused(est: Est, tmp_path: Path) -> None:
    device_id = unique("dev")
    made = hsmca(
        est.home, "device", "enroll-token", "--device-id", device_id, "--ttl", "1m", "--json"
    )
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["device_id"] == device_id
    expires = dt.datetime.fromisoformat(created["expires_at"].replace("Z", "+00:00"))
    assert dt.timedelta(0) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=1)
    secret = created["secret"]
    # test setup: the minute is over (directly in the database, as time would do)
    with sqlite3.connect(est.home / "hsmca.db") as db:
        changed = db.execute(
            "UPDATE device_credentials SET expires_at = ? WHERE secret_sha256 = ?",
            ("2020-01-01 00:00:00.000000", token_digest(secret)),
        ).rowcount
    assert changed == 1
    der, _ = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    count = certificate_count(est)
    events = last_event_id(est)
    curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}").problem(401, "expired")
    after = snapshot(est, device_id, secret)
    assert after.certificates == count and after.device_serials == []
    assert after.credential_used is False
    refused = [e for e in events_since(est, events) if e.action == "device.enroll"]
    assert [(e.outcome, e.details["reason"]) for e in refused] == [
        ("refused", "the enrolment credential has expired")
    ]


# -- 8. channel binding (tls-unique) --------------------------------------------------------


def _tls12(est: Est) -> http.client.HTTPSConnection:
    """A TLS 1.2 connection to the service (tls-unique is defined up to TLS 1.2)."""
    context = ssl.create_default_context(cafile=str(est.root))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection(
        "127.0.0.1", est.service.https_port, context=context, timeout=TIMEOUT
    )
    conn.connect()
    return conn


def _bound_csr(device_id: str, password: bytes) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id)]))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, password)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER), key


def _post(
    conn: http.client.HTTPSConnection, der: bytes, authorization: str
) -> tuple[int, dict[str, str], bytes]:
    conn.request(
        "POST",
        f"{EST}/simpleenroll",
        body=b64(der),
        headers={"Authorization": authorization, "Content-Type": PKCS10},
    )
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_a_csr_bound_to_the_tls_connection_enrols(est: Est) -> None:
    device_id = unique("dev")
    secret = credential(est, device_id)
    before = last_event_id(est)
    conn = _tls12(est)
    try:
        assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.version() == "TLSv1.2"
        binding = conn.sock.get_channel_binding("tls-unique")
        assert binding
        der, key = _bound_csr(device_id, base64.b64encode(binding))
        status, headers, body = _post(conn, der, basic(device_id, secret))
    finally:
        conn.close()
    assert status == 200, body[:500]
    assert headers["content-type"] == CERTS_ONLY
    (cert,) = pkcs7_certificates(body)
    assert spki(cert) == spki(key)
    issued = [e for e in events_since(est, before) if e.action == "device.enroll"]
    assert [(e.outcome, e.subject) for e in issued] == [("ok", serial_hex(cert.serial_number))]
    assert issued[0].details["channel_bound"] is True


def test_a_csr_bound_to_another_connection_is_400(est: Est) -> None:
    device_id = unique("dev")
    secret = credential(est, device_id)
    count = certificate_count(est)
    before = last_event_id(est)
    # a CSR made for one connection, replayed on another one
    elsewhere = _tls12(est)
    try:
        assert isinstance(elsewhere.sock, ssl.SSLSocket)
        stale = elsewhere.sock.get_channel_binding("tls-unique")
    finally:
        elsewhere.close()
    assert stale
    der, _ = _bound_csr(device_id, base64.b64encode(stale))
    conn = _tls12(est)
    try:
        status, headers, body = _post(conn, der, basic(device_id, secret))
        assert status == 400, body[:500]
        assert headers["content-type"] == PROBLEM
        problem = json.loads(body)
        assert problem["status"] == 400 and "challengePassword" in problem["detail"], problem
        # a made-up password on the same connection is refused too
        status2, _, body2 = _post(
            conn, _bound_csr(device_id, b"not-the-binding")[0], basic(device_id, secret)
        )
        assert status2 == 400, body2[:500]
    finally:
        conn.close()
    after = snapshot(est, device_id, secret)
    assert after.certificates == count and after.device_serials == []
    assert after.credential_used is False
    refused = [e for e in events_since(est, before) if e.action == "device.enroll"]
    assert [e.outcome for e in refused] == ["refused", "refused"], refused
    # the credential still works, for a CSR without a challengePassword
    plain = build_csr(cn=None, sans=(), serial_number=device_id)[0]
    reply = curl(est, "simpleenroll", plain, user=f"{device_id}:{secret}")
    assert reply.status == 200, reply.body[:500]
    assert snapshot(est, device_id, secret).credential_used is True


# -- 9. body size ---------------------------------------------------------------------------


def test_a_body_over_max_body_bytes_is_413(est: Est, tmp_path: Path) -> None:
    device_id = unique("dev")
    secret = credential(est, device_id)
    limit = est.core.settings.server.max_body_bytes
    der, key = openssl_csr(tmp_path, f"/serialNumber={device_id}")
    # a valid base64 CSR padded with line breaks (allowed in EST bodies) past the limit
    padded = b64(der) + b"\n" * (limit + 1 - len(b64(der)) + 1024)
    assert len(padded) > limit
    before = snapshot(est, device_id, secret)
    events = last_event_id(est)
    curl(est, "simpleenroll", padded, user=f"{device_id}:{secret}").problem(413, str(limit))
    # the same without a Content-Length (chunked), which the server can only count
    chunked = curl(
        est,
        "simpleenroll",
        padded,
        user=f"{device_id}:{secret}",
        headers=("Transfer-Encoding: chunked",),
    )
    chunked.problem(413, str(limit))
    after = snapshot(est, device_id, secret)
    assert after == before and after.credential_used is False
    assert not [e for e in events_since(est, events) if e.outcome == "ok"]
    cert, path = enrolled(
        curl(est, "simpleenroll", b64(der), user=f"{device_id}:{secret}"), tmp_path
    )
    assert_device_certificate(est, cert, path, device_id, key)
