"""Issuance through the real core: a SoftHSM2 token, SQLite, openssl and a real mTLS
handshake. Nothing is mocked; each test asserts what the contract's "Certificate
profiles" section promises."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
)

from pki.actors import Actor, operator
from pki.bootstrap import initialise
from pki.config import write_default_config
from pki.errors import BadCsr, PolicyError, UnknownProfile
from pki.lint import RFC3986_URI
from pki.service import IssueRequest, Pki
from tests.conftest import build_csr
from tests.issuance_helpers import (
    PROFILES,
    REQUESTS,
    Issued,
    ca_certificate,
    issue,
    openssl_verify,
    write_key,
    write_pem,
)

HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
BACKDATE = dt.timedelta(seconds=60)

#: profile -> (EKUs in order, default TTL, max TTL), as the contract's table says
EXPECTED: dict[str, tuple[list[x509.ObjectIdentifier], dt.timedelta, dt.timedelta]] = {
    "mtls-server": ([ExtendedKeyUsageOID.SERVER_AUTH], 24 * HOUR, 30 * DAY),
    "mtls-client": ([ExtendedKeyUsageOID.CLIENT_AUTH], 24 * HOUR, 30 * DAY),
    "mtls": (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        24 * HOUR,
        30 * DAY,
    ),
    "device": ([ExtendedKeyUsageOID.CLIENT_AUTH], 7 * DAY, 90 * DAY),
}


@pytest.fixture(scope="module")
def issued(ca_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One certificate of each profile from the worker's CA home, with its PEM file."""
    out = tmp_path_factory.mktemp("issued")
    core = Pki.open(ca_home)
    try:
        result: dict[str, Any] = {}
        for profile in PROFILES:
            got = issue(core, profile, **REQUESTS[profile])
            result[profile] = (got, write_pem(out / f"{profile}.pem", got.cert))
        yield result
    finally:
        core.close()


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[Any]:
    """The extension of type ``kind`` (ExtensionNotFound fails the test)."""
    return cert.extensions.get_extension_for_class(kind)


# -- 1. chains verify with openssl ----------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_openssl_verifies_every_profile(
    ca_home: Path, issued: dict[str, Any], profile: str
) -> None:
    """``openssl verify`` accepts each profile's certificate up to the exported root."""
    _, path = issued[profile]
    done = openssl_verify(ca_home, path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{path}: OK"


def test_openssl_verify_needs_the_intermediate(ca_home: Path, issued: dict[str, Any]) -> None:
    """Negative control: without the issuing CA the same leaf does not verify."""
    _, path = issued["mtls-server"]
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_home / "ca" / "root.pem"), str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "unable to get local issuer certificate" in done.stdout + done.stderr


def test_openssl_verifies_the_init_server_certificate(ca_home: Path, tmp_path: Path) -> None:
    """The server TLS certificate ``init`` wrote (leaf + chain) verifies as well."""
    certs = x509.load_pem_x509_certificates((ca_home / "tls" / "server.pem").read_bytes())
    assert len(certs) == 2, "server.pem holds the leaf and the issuing CA"
    assert certs[1] == ca_certificate(ca_home, "intermediate")
    done = openssl_verify(ca_home, write_pem(tmp_path / "server-leaf.pem", certs[0]))
    assert done.returncode == 0, done.stdout + done.stderr
    san = ext(certs[0], x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)


# -- 2. what every end-entity certificate carries -------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_end_entity_extensions(pki: Pki, issued: dict[str, Any], profile: str) -> None:
    """SAN, KU (critical), EKU, AKI = issuer SKI, SKI, CA:false, CDP and AIA URLs."""
    got: Issued = issued[profile][0]
    cert = got.cert
    issuer_id = pki.issuing_issuer().id
    issuer_cert = x509.load_der_x509_certificate(pki.issuing_issuer().der)
    base = pki.settings.server.public_http_url.rstrip("/")
    assert got.record.issuer_id == issuer_id
    assert cert.issuer == issuer_cert.subject
    assert cert.version == x509.Version.v3

    san = ext(cert, x509.SubjectAlternativeName)
    assert san.critical is (len(cert.subject) == 0)
    request = REQUESTS[profile]
    if profile == "device":
        assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
            "urn:dev:serial:dev-0001"
        ]
    else:
        dns = [n for n in request["sans"] if not n[0].isdigit()]
        ips = [ipaddress.ip_address(n) for n in request["sans"] if n[0].isdigit()]
        assert san.value.get_values_for_type(x509.DNSName) == dns
        assert san.value.get_values_for_type(x509.IPAddress) == ips

    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert not ku.value.key_encipherment, "EC subject keys do not encipher"

    eku = ext(cert, x509.ExtendedKeyUsage)
    assert list(eku.value) == EXPECTED[profile][0]

    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None

    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(issuer_cert, x509.SubjectKeyIdentifier).value.digest

    cdp = ext(cert, x509.CRLDistributionPoints).value
    assert [[n.value for n in dp.full_name] for dp in cdp] == [[f"{base}/crl/{issuer_id}.crl"]]
    assert (pki.settings.home / "crl" / f"{issuer_id}.crl").is_file()

    aia = ext(cert, x509.AuthorityInformationAccess).value
    locations = {(d.access_method, d.access_location.value) for d in aia}
    assert locations == {
        (AuthorityInformationAccessOID.OCSP, f"{base}/ocsp"),
        (AuthorityInformationAccessOID.CA_ISSUERS, f"{base}/ca/{issuer_id}.der"),
    }


@pytest.mark.parametrize("profile", PROFILES)
def test_serial_number(issued: dict[str, Any], profile: str) -> None:
    """Positive, more than 64 bits, at most 20 octets in DER; the record names it."""
    got: Issued = issued[profile][0]
    serial = got.cert.serial_number
    assert serial > 0
    assert serial.bit_length() > 64
    der = got.cert.public_bytes(serialization.Encoding.DER)
    octets = asn1_x509.Certificate.load(der)["tbs_certificate"]["serial_number"].contents
    assert 9 <= len(octets) <= 20
    assert octets[0] < 0x80, "the DER INTEGER must be positive"
    assert int(got.record.serial, 16) == serial
    assert got.record.serial == got.record.serial.lower() and len(got.record.serial) % 2 == 0


def test_serials_differ(issued: dict[str, Any]) -> None:
    """Serials are random: four certificates, four serials."""
    assert len({issued[p][0].cert.serial_number for p in PROFILES}) == len(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_default_ttl_and_backdating(issued: dict[str, Any], profile: str) -> None:
    """notBefore is ~60 s before the request; lifetime is the profile default."""
    got: Issued = issued[profile][0]
    nb, na = got.cert.not_valid_before_utc, got.cert.not_valid_after_utc
    slack = dt.timedelta(seconds=1)
    assert got.asked_at - BACKDATE - slack <= nb <= got.answered_at - BACKDATE
    default = EXPECTED[profile][1]
    assert abs((na - nb) - (default + BACKDATE)) <= slack
    assert got.asked_at + default - slack <= na <= got.answered_at + default
    assert got.record.not_before == nb and got.record.not_after == na


@pytest.mark.parametrize(
    ("profile", "ttl"),
    [("mtls-client", 2 * HOUR), ("mtls-server", 30 * DAY), ("device", 90 * DAY)],
)
def test_requested_ttl_is_honoured(pki: Pki, profile: str, ttl: dt.timedelta) -> None:
    """A ttl within the profile maximum (the maximum included) is what is issued."""
    got = issue(pki, profile, **REQUESTS[profile], ttl=ttl)
    lifetime = got.cert.not_valid_after_utc - got.cert.not_valid_before_utc
    assert abs(lifetime - (ttl + BACKDATE)) <= dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("profile", "ttl", "maximum"),
    [
        ("mtls-server", 31 * DAY, "30d"),
        ("mtls-client", 30 * DAY + dt.timedelta(seconds=1), "30d"),
        ("mtls", 31 * DAY, "30d"),
        ("device", 91 * DAY, "90d"),
    ],
)
def test_ttl_above_profile_maximum_is_refused(
    pki: Pki, profile: str, ttl: dt.timedelta, maximum: str
) -> None:
    """PolicyError naming the maximum and the profile; no certificate row is added."""
    before = pki.store.count_certificates()
    csr, _ = build_csr(**REQUESTS[profile])
    with pytest.raises(PolicyError) as caught:
        pki.issue(IssueRequest(csr, profile, ttl), operator("test"))
    assert type(caught.value) is PolicyError
    assert f"maximum of {maximum}" in str(caught.value)
    assert profile in str(caught.value)
    assert pki.store.count_certificates() == before


def test_actor_ttl_cap_is_applied(pki: Pki) -> None:
    """A caller's own max_ttl caps the profile's: 2h asked, 1h allowed, refused."""
    actor = Actor(name="token:capped", role="issuer", allowed_names=("*.svc.test",), max_ttl=HOUR)
    csr, _ = build_csr()
    with pytest.raises(PolicyError, match=r"maximum of 1h"):
        pki.issue(IssueRequest(csr, "mtls-server", 2 * HOUR), actor)
    got = issue(pki, "mtls-server", actor=actor)
    lifetime = got.cert.not_valid_after_utc - got.cert.not_valid_before_utc
    assert lifetime <= HOUR + BACKDATE


@pytest.fixture
def short_home(tmp_path: Path) -> Path:
    """A home whose issuing CA lives only 2 days (configured BEFORE initialise)."""
    home = tmp_path / "short"
    home.mkdir()
    write_default_config(home, {"ca": {"issuing_ttl": "2d"}})
    initialise(home)
    return home


def test_validity_never_exceeds_the_issuer(short_home: Path, tmp_path: Path) -> None:
    """90d (and the 7d default) asked under a 2-day issuing CA end with the issuer."""
    issuer_cert = ca_certificate(short_home, "intermediate")
    issuer_life = issuer_cert.not_valid_after_utc - issuer_cert.not_valid_before_utc
    assert issuer_life <= 2 * DAY + dt.timedelta(minutes=6), "issuing_ttl = 2d was applied"
    core = Pki.open(short_home)
    try:
        for ttl in (90 * DAY, None):
            got = issue(core, "device", **REQUESTS["device"], ttl=ttl)
            assert got.cert.not_valid_after_utc <= issuer_cert.not_valid_after_utc
            assert got.cert.not_valid_after_utc == issuer_cert.not_valid_after_utc
            assert got.cert.not_valid_before_utc >= issuer_cert.not_valid_before_utc
            assert got.record.not_after == got.cert.not_valid_after_utc
            done = openssl_verify(short_home, write_pem(tmp_path / "dev.pem", got.cert))
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        core.close()


# -- the device profile ------------------------------------------------------------------------


def _device_identity(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    uris = ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    serials = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    return uris, serials


@pytest.mark.parametrize(
    ("kwargs", "device_id"),
    [
        ({"cn": None, "sans": (), "serial_number": "dev-0002"}, "dev-0002"),
        ({"cn": "dev-0003", "sans": ()}, "dev-0003"),
        ({"cn": "dev-0004", "sans": (), "serial_number": "SN0004"}, "SN0004"),
        ({"cn": "sensor.svc.test", "sans": ("sensor.svc.test",), "device_id": "dev-05"}, "dev-05"),
    ],
    ids=["subject-serialNumber", "subject-CN", "serialNumber-over-CN", "explicit-device_id"],
)
def test_device_identity(
    pki: Pki, ca_home: Path, tmp_path: Path, kwargs: dict[str, Any], device_id: str
) -> None:
    """The device id becomes URI SAN ``urn:dev:serial:<id>`` and subject serialNumber."""
    got = issue(pki, "device", **kwargs)
    uris, serials = _device_identity(got.cert)
    assert uris == [f"urn:dev:serial:{device_id}"]
    assert serials == [device_id]
    assert f"uri:urn:dev:serial:{device_id}" in got.record.sans
    assert list(ext(got.cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    done = openssl_verify(ca_home, write_pem(tmp_path / "device.pem", got.cert))
    assert done.returncode == 0, done.stdout + done.stderr


def test_device_without_id_is_refused(pki: Pki) -> None:
    """No serialNumber, no CN, no device_id: PolicyError naming the device id; no row."""
    before = pki.store.count_certificates()
    csr, _ = build_csr(cn=None, sans=("x.svc.test",))
    with pytest.raises(PolicyError, match="device id"):
        pki.issue(IssueRequest(csr, "device"), operator("test"))
    assert pki.store.count_certificates() == before


def _utf8_serial_csr(serial: str) -> bytes:
    """A CSR whose subject serialNumber is a UTF8String (as some clients write it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    attr = x509.NameAttribute(NameOID.SERIAL_NUMBER, serial, _type=_ASN1Type.UTF8String)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([attr]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("route", ["csr-serialNumber", "device_id"])
def test_device_id_outside_printable_string_is_refused_without_row(pki: Pki, route: str) -> None:
    """serialNumber is a PrintableString: ``SN_0042`` cannot be encoded. It used to fail
    inside the signer with a raw ValueError after the row was reserved (a pending row
    left behind); now a PolicyError before any row is written."""
    before = pki.store.count_certificates()
    if route == "device_id":
        request = IssueRequest(build_csr()[0], "device", device_id="SN_0042")
    else:
        request = IssueRequest(_utf8_serial_csr("SN_0042"), "device")
    with pytest.raises(PolicyError, match=r"device id 'SN_0042'.*serialNumber") as caught:
        pki.issue(request, operator("test"))
    assert type(caught.value) is PolicyError
    assert pki.store.count_certificates() == before


def test_device_id_with_space_never_yields_an_invalid_uri(pki: Pki) -> None:
    """Either refused, or the URI SAN is a syntactically valid RFC 3986 URI."""
    csr, _ = build_csr(cn=None, sans=(), serial_number="SN 42")
    try:
        record = pki.issue(IssueRequest(csr, "device"), operator("test"))
    except PolicyError:
        return
    assert record.certificate_pem is not None
    cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
    for uri in _device_identity(cert)[0]:
        assert RFC3986_URI.fullmatch(uri), uri


# -- subject key types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(65537, 2048),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["rsa-2048", "ec-p384", "ed25519"],
)
def test_allowed_subject_key_types(
    pki: Pki, ca_home: Path, tmp_path: Path, make_key: Callable[[], Any]
) -> None:
    """Every allowed key type issues and verifies; only RSA gets keyEncipherment."""
    key = make_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keys.svc.test")])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("keys.svc.test")]), False)
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    record = pki.issue(
        IssueRequest(csr.public_bytes(serialization.Encoding.DER), "mtls-server"),
        operator("test"),
    )
    assert record.certificate_pem is not None
    cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
    assert cert.public_key() == key.public_key()
    ku = ext(cert, x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_encipherment is isinstance(key, rsa.RSAPrivateKey)
    done = openssl_verify(ca_home, write_pem(tmp_path / "leaf.pem", cert))
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_hundred_names_are_allowed(pki: Pki) -> None:
    """policy.max_names = 100 is inclusive."""
    names = tuple(f"n{i}.svc.test" for i in range(100))
    got = issue(pki, "mtls-server", cn=None, sans=names)
    dns = ext(got.cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert dns == list(names)


# -- the CA hierarchy ---------------------------------------------------------------------------


def test_root_certificate(pki: Pki, ca_home: Path) -> None:
    """Root: self-signed P-384 (SHA-384), CA pathLen 1, keyCertSign + cRLSign, critical."""
    root = ca_certificate(ca_home, "root")
    assert root.public_bytes(serialization.Encoding.DER) == pki.root_issuer().der
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    assert isinstance(root.signature_hash_algorithm, hashes.SHA384)
    bc = ext(root, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = ext(root, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ext(root, x509.SubjectKeyIdentifier)


def test_issuing_ca_certificate(pki: Pki, ca_home: Path) -> None:
    """Issuing CA: P-256 under the root, CA pathLen 0, keyCertSign + cRLSign, AKI = root SKI,
    validity inside the root's."""
    root = ca_certificate(ca_home, "root")
    inter = ca_certificate(ca_home, "intermediate")
    assert inter.public_bytes(serialization.Encoding.DER) == pki.issuing_issuer().der
    key = inter.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    inter.verify_directly_issued_by(root)
    bc = ext(inter, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(inter, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    aki = ext(inter, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(root, x509.SubjectKeyIdentifier).value.digest
    assert root.not_valid_before_utc <= inter.not_valid_before_utc
    assert inter.not_valid_after_utc <= root.not_valid_after_utc
    chain = x509.load_pem_x509_certificates((ca_home / "ca" / "chain.pem").read_bytes())
    assert chain == [inter, root], "chain.pem is leaf-to-root: issuing CA first, root last"


def test_ocsp_responder_certificate(pki: Pki, ca_home: Path, tmp_path: Path) -> None:
    """The delegated OCSP responder: EKU OCSPSigning only, id-pkix-ocsp-nocheck, CA:false."""
    issuer = pki.issuing_issuer()
    assert issuer.ocsp_serial, "init issued an OCSP responder certificate"
    record = pki.show(issuer.ocsp_serial)
    assert record.certificate_pem is not None
    cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
    cert.verify_directly_issued_by(ca_certificate(ca_home, "intermediate"))
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    ext(cert, x509.OCSPNoCheck)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    done = openssl_verify(ca_home, write_pem(tmp_path / "ocsp.pem", cert))
    assert done.returncode == 0, done.stdout + done.stderr


# -- 5. bad requests leave nothing behind -------------------------------------------------------


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def _broken_base64() -> bytes:
    lines = build_csr()[0].decode().splitlines()
    lines[2] = "!!!!" + lines[2][4:]
    return "\n".join(lines).encode()


def _tampered_signature() -> bytes:
    der = _der(build_csr()[0])
    return der[:-1] + bytes([der[-1] ^ 0x01])  # last byte of the ECDSA s value


def _key_csr(key: object) -> bytes:
    return build_csr(key=key)[0]


#: (id, CSR bytes factory, profile, expected exact error class, message pattern)
BAD_REQUESTS: list[tuple[str, Callable[[], bytes | str], str, type[Exception], str]] = [
    ("garbage", lambda: b"\x00\x01 this is not a CSR \xff" * 4, "mtls-server", BadCsr, "PKCS#10"),
    ("empty", lambda: b"", "mtls-server", BadCsr, "PKCS#10"),
    ("broken-base64", _broken_base64, "mtls-server", BadCsr, "PKCS#10"),
    (
        "truncated-der",
        lambda: _der(build_csr()[0])[:-20],
        "mtls-server",
        BadCsr,
        "PKCS#10",
    ),
    ("bad-signature", _tampered_signature, "mtls-server", BadCsr, "signature does not verify"),
    (
        "rsa-1024",
        lambda: _key_csr(rsa.generate_private_key(65537, 1024)),
        "mtls-server",
        BadCsr,
        r"RSA key of 1024 bits is too weak.*2048",
    ),
    (
        "rsa-exponent-3",
        lambda: _key_csr(rsa.generate_private_key(3, 2048)),
        "mtls-server",
        BadCsr,
        "exponent must be 65537",
    ),
    (
        "ec-p521",
        lambda: _key_csr(ec.generate_private_key(ec.SECP521R1())),
        "mtls-server",
        BadCsr,
        r"key type ec-p521 is not allowed",
    ),
    (
        "ec-p192",
        lambda: _key_csr(ec.generate_private_key(ec.SECP192R1())),
        "mtls-server",
        BadCsr,
        r"key type ec-secp192r1 is not allowed",
    ),
    ("ca-true", lambda: build_csr(ca=True)[0], "mtls-server", BadCsr, "CA:true"),
    (
        "101-names",
        lambda: build_csr(cn=None, sans=tuple(f"n{i}.svc.test" for i in range(101)))[0],
        "mtls-server",
        BadCsr,
        r"too many names: 101 \(at most 100\)",
    ),
    (
        "empty-label",
        lambda: build_csr(sans=("bad..name",))[0],
        "mtls-server",
        BadCsr,
        "invalid DNS name 'bad..name'",
    ),
    (
        "leading-hyphen",
        lambda: build_csr(sans=("-x.test",))[0],
        "mtls-server",
        BadCsr,
        "invalid DNS name '-x.test'",
    ),
    (
        "trailing-double-dot",
        lambda: build_csr(sans=("a.svc.test..",))[0],
        "mtls-server",
        BadCsr,
        r"invalid DNS name 'a\.svc\.test\.\.'",
    ),
    (
        "newline-in-label",
        lambda: build_csr(sans=("a\n.svc.test",))[0],
        "mtls-server",
        BadCsr,
        "invalid DNS name",
    ),
    (
        "64-char-label",
        lambda: build_csr(sans=("a" * 64 + ".svc.test",))[0],
        "mtls-server",
        BadCsr,
        "invalid DNS name",
    ),
    (
        "bad-cn-only",
        lambda: build_csr(cn="bad..name", sans=())[0],
        "mtls-client",
        BadCsr,
        "invalid DNS name 'bad..name'",
    ),
    (
        "no-names",
        lambda: build_csr(cn=None, sans=())[0],
        "mtls-server",
        PolicyError,
        "names no DNS name",
    ),
    ("unknown-profile", lambda: build_csr()[0], "nope", UnknownProfile, "unknown profile 'nope'"),
]


@pytest.mark.parametrize(
    ("make", "profile", "error", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_request_is_refused_without_row(
    pki: Pki,
    make: Callable[[], bytes | str],
    profile: str,
    error: type[Exception],
    message: str,
) -> None:
    """The exact error class, a message naming the problem, no certificate row."""
    csr = make()
    before = pki.store.count_certificates()
    with pytest.raises(error, match=message) as caught:
        pki.issue(IssueRequest(csr, profile), operator("test"))
    assert type(caught.value) is error
    assert pki.store.count_certificates() == before


def test_pem_csr_given_as_text_is_accepted(pki: Pki) -> None:
    """Control for the refusals above: the same CSR as ``str`` issues."""
    record = pki.issue(IssueRequest(build_csr()[0].decode(), "mtls-server"), operator("test"))
    assert record.status == "good"


@pytest.mark.parametrize(
    ("csr", "profile", "why"),
    [
        pytest.param(lambda: b"garbage", "mtls-server", "PKCS#10", id="bad-csr"),
        pytest.param(
            lambda: build_csr(sans=("bad..name",))[0], "mtls-server", "bad..name", id="bad-name"
        ),
        pytest.param(lambda: build_csr()[0], "nope", "nope", id="unknown-profile"),
        pytest.param(
            lambda: _utf8_serial_csr("SN_0042"),
            "device",
            "SN_0042",
            id="unprintable-device-id",
        ),
    ],
)
def test_refusal_is_audited(pki: Pki, csr: Callable[[], bytes], profile: str, why: str) -> None:
    """Every refused issuance appends a 'refused' audit event giving the reason."""
    before = len(list(pki.store.audit_events()))
    with pytest.raises(PolicyError):
        pki.issue(IssueRequest(csr(), profile), operator("auditme"))
    new = list(pki.store.audit_events())[before:]
    assert any(
        e.outcome == "refused"
        and e.action == "certificate.issue"
        and e.actor == "operator:auditme"
        and why in e.details.get("reason", "")
        for e in new
    ), new


# -- 4. a real mutual-TLS handshake ------------------------------------------------------------


@dataclass
class ServerSide:
    """What the one-shot TLS server saw."""

    peer: dict[str, Any] | None = None
    received: bytes = b""
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _serve_once(listener: socket.socket, ctx: ssl.SSLContext, side: ServerSide) -> None:
    """Accept one connection, handshake (client certificate required), echo once."""
    try:
        conn, _ = listener.accept()
        with conn:  # closed even when the handshake fails
            conn.settimeout(10)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                side.peer = tls.getpeercert()
                side.received = tls.recv(64)
                tls.sendall(b"pong:" + side.received)
    except (OSError, ssl.SSLError) as exc:
        side.error = exc
    finally:
        side.done.set()


def _server_context(home: Path, chain: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=home / "ca" / "root.pem")
    return ctx


def _client_context(home: Path, chain: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=home / "ca" / "root.pem")
    if chain is not None:
        ctx.load_cert_chain(chain, key)
    return ctx


def _write_identity(directory: Path, name: str, got: Issued) -> tuple[Path, Path]:
    """Leaf + chain (as the API returns them) and the key, as files for ssl."""
    chain = directory / f"{name}.pem"
    assert got.record.certificate_pem is not None
    chain.write_text(got.record.certificate_pem + got.record.chain_pem)
    return chain, write_key(directory / f"{name}.key", got.key)


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[ServerSide, bytes, BaseException | None]:
    """Run one exchange on 127.0.0.1 (free port); return server side, reply, client error."""
    side = ServerSide()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(15)
        port = listener.getsockname()[1]
        thread = threading.Thread(target=_serve_once, args=(listener, server_ctx, side))
        thread.start()
        reply, client_error = b"", None
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                tls.sendall(b"ping")
                while len(reply) < len(b"pong:ping"):
                    chunk = tls.recv(64)
                    if not chunk:
                        break
                    reply += chunk
        except (OSError, ssl.SSLError) as exc:
            client_error = exc
        assert side.done.wait(15), "the server thread did not finish"
        thread.join(5)
    return side, reply, client_error


@pytest.fixture
def mtls_server(pki: Pki, tmp_path: Path, ca_home: Path) -> ssl.SSLContext:
    """A server context with an mtls-server certificate for app.svc.test and 127.0.0.1."""
    got = issue(pki, "mtls-server", cn="app.svc.test", sans=("app.svc.test", "127.0.0.1"))
    chain, key = _write_identity(tmp_path, "server", got)
    return _server_context(ca_home, chain, key)


@pytest.mark.parametrize("server_hostname", ["app.svc.test", "127.0.0.1"])
def test_mutual_tls_handshake(
    pki: Pki, ca_home: Path, tmp_path: Path, mtls_server: ssl.SSLContext, server_hostname: str
) -> None:
    """Both sides verify each other to the root; the server sees the client's CN."""
    client = issue(pki, "mtls-client", cn="client.svc.test", sans=("client.svc.test",))
    chain, key = _write_identity(tmp_path, "client", client)
    side, reply, client_error = _handshake(
        mtls_server, _client_context(ca_home, chain, key), server_hostname
    )
    assert side.error is None, side.error
    assert client_error is None, client_error
    assert side.received == b"ping"
    assert reply == b"pong:ping"
    assert side.peer is not None
    subject = dict(rdn[0] for rdn in side.peer["subject"])
    assert subject["commonName"] == "client.svc.test"
    assert int(side.peer["serialNumber"], 16) == client.cert.serial_number


def _refused_by_server(side: ServerSide, reply: bytes, expected_reason: str) -> None:
    assert reply == b"", "no application data may flow"
    assert side.peer is None and side.received == b""
    assert isinstance(side.error, ssl.SSLError), side.error
    assert side.error.reason == expected_reason, side.error


def test_client_certificate_from_another_ca_is_rejected(
    ca_home: Path, fresh_home: Path, tmp_path: Path, mtls_server: ssl.SSLContext
) -> None:
    """A client certificate chaining to a different root fails the server's verification."""
    other = Pki.open(fresh_home)
    try:
        stranger = issue(other, "mtls-client", cn="client.svc.test", sans=("client.svc.test",))
    finally:
        other.close()
    chain, key = _write_identity(tmp_path, "stranger", stranger)
    side, reply, _ = _handshake(mtls_server, _client_context(ca_home, chain, key), "app.svc.test")
    _refused_by_server(side, reply, "CERTIFICATE_VERIFY_FAILED")
    assert "unable to get local issuer certificate" in str(side.error)


def test_client_without_certificate_is_rejected(ca_home: Path, mtls_server: ssl.SSLContext) -> None:
    """CERT_REQUIRED: a client presenting nothing is refused."""
    side, reply, _ = _handshake(mtls_server, _client_context(ca_home, None, None), "app.svc.test")
    _refused_by_server(side, reply, "PEER_DID_NOT_RETURN_A_CERTIFICATE")


def test_server_only_certificate_is_rejected_as_client(
    pki: Pki, ca_home: Path, tmp_path: Path, mtls_server: ssl.SSLContext
) -> None:
    """EKU matters: an mtls-server certificate (serverAuth only) cannot authenticate a
    client, although it chains to the same root."""
    wrong = issue(pki, "mtls-server", cn="client.svc.test", sans=("client.svc.test",))
    chain, key = _write_identity(tmp_path, "wrong", wrong)
    side, reply, _ = _handshake(mtls_server, _client_context(ca_home, chain, key), "app.svc.test")
    _refused_by_server(side, reply, "CERTIFICATE_VERIFY_FAILED")
    assert "unsuitable certificate purpose" in str(side.error)
