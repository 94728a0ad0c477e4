"""The HSM layer against real SoftHSM2 tokens: keys stay inside, every spec signs, errors
are clear, a lost session comes back, and one session serves the whole process.

Concurrency (threads, fork, two homes) is in ``test_hsm_concurrency.py``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, Mechanism

from pki.actors import operator
from pki.config import Settings, load_settings, write_default_config
from pki.errors import (
    HsmError,
    HsmKeyNotFound,
    HsmModuleNotFound,
    HsmTokenNotFound,
    HsmWrongPin,
)
from pki.hsm import KEY_SPECS, Hsm
from pki.hsm_keys import HsmEcPrivateKey, HsmRsaPrivateKey, hsm_private_key
from pki.service import IssueRequest, Pki
from pki.softhsm import ensure_token

ECDSA_256 = ec.ECDSA(hashes.SHA256())
SPEC_CLASSES: dict[str, tuple[type, int]] = {
    "ec-p256": (ec.EllipticCurvePublicKey, 256),
    "ec-p384": (ec.EllipticCurvePublicKey, 384),
    "rsa-2048": (rsa.RSAPublicKey, 2048),
    "rsa-3072": (rsa.RSAPublicKey, 3072),
    "rsa-4096": (rsa.RSAPublicKey, 4096),
}


# -- helpers ---------------------------------------------------------------------------------


def blank_token(home: Path) -> Settings:
    """A home with a configuration and an empty SoftHSM2 token (no keys, no database)."""
    home.mkdir(parents=True)
    write_default_config(home, {})
    settings = load_settings(home)
    assert ensure_token(settings)
    return settings


def hsm_for(settings: Settings, pin: Callable[[], str] | None = None) -> Hsm:
    """An Hsm on the home's token, as :meth:`Pki.from_settings` builds it."""
    return Hsm(
        settings.hsm.module,
        settings.hsm.token_label,
        pin or settings.hsm_pin,
        settings.hsm.softhsm2_conf,
    )


def count_logins(hsm: Hsm, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ``hsm._login`` (the only place a session is opened); return the call log."""
    calls: list[int] = []
    real = hsm._login

    def counting(token: Any) -> Any:
        calls.append(1)
        return real(token)

    monkeypatch.setattr(hsm, "_login", counting)
    return calls


def self_signed(key: Any, **sign_kwargs: Any) -> x509.Certificate:
    """A minimal self-signed certificate built by cryptography, signed by ``key``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hsm test")])
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    return builder.sign(key, **sign_kwargs)


def assert_signs(hsm: Hsm, label: str, data: bytes = b"probe") -> None:
    """``hsm`` signs ``data`` with the EC key ``label`` and the signature verifies."""
    signature = hsm_private_key(hsm, label).sign(data, ECDSA_256)
    hsm.public_key(label).verify(signature, data, ECDSA_256)


@pytest.fixture
def blank(tmp_path: Path) -> Settings:
    return blank_token(tmp_path / "blank")


@pytest.fixture
def blank_hsm(blank: Settings) -> Iterator[Hsm]:
    """A logged-in Hsm on an empty token holding one P-256 key labelled ``k``."""
    hsm = hsm_for(blank)
    hsm.generate_key("k", "ec-p256")
    yield hsm
    hsm.close()


# -- 1. CA keys never leave the token --------------------------------------------------------


def _init_labels(pki: Pki) -> dict[str, str]:
    issuing = pki.issuing_issuer()
    assert issuing.ocsp_key_label == f"ocsp-{issuing.id}-1"
    return {"root": "root-1", "issuing": "issuing-1", "ocsp": issuing.ocsp_key_label}


@pytest.mark.parametrize("role", ["root", "issuing", "ocsp"])
def test_init_keys_are_sensitive_and_never_extractable(pki: Pki, role: str) -> None:
    """init's keys: sensitive, never extractable, on the token, sign-only."""
    label = _init_labels(pki)[role]
    attrs = pki.hsm.private_key_attributes(label)
    assert attrs == {
        "sensitive": True,
        "extractable": False,
        "token": True,
        "never_extractable": True,
    }
    with pytest.raises(pkcs11.PKCS11Error):
        pki.hsm.read_private_value(label)
    # sign-only: no ECDH derivation or key unwrapping with a CA key
    usage = pki.hsm._call(
        lambda s: {
            a: bool(pki.hsm._private_locked(s, label)[a])
            for a in (Attribute.SIGN, Attribute.DERIVE, Attribute.DECRYPT, Attribute.UNWRAP)
        }
    )
    assert usage == {
        Attribute.SIGN: True,
        Attribute.DERIVE: False,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
    }
    # and the key is really there and usable
    key = hsm_private_key(pki.hsm, label)
    key.public_key().verify(key.sign(b"probe", ECDSA_256), b"probe", ECDSA_256)


def test_pkcs11_tool_cannot_read_private_key(ca_home: Path) -> None:
    """An outside PKCS#11 client logged in with the PIN gets no private key bytes."""
    tool = shutil.which("pkcs11-tool")
    if tool is None:  # pragma: no cover - `make softhsm` installs opensc
        pytest.skip("pkcs11-tool (opensc) not installed")
    settings = load_settings(ca_home)
    env = dict(os.environ, SOFTHSM2_CONF=str(ca_home / "softhsm2.conf"))
    pin = (ca_home / "secrets" / "hsm.pin").read_text().strip()
    base = [tool, "--module", settings.hsm.module, "--login", "--pin", pin]
    base += ["--token-label", "hsmca"]

    listing = subprocess.run(
        [*base, "--list-objects", "--type", "privkey"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # control: the same login sees the key, so a failure below is not a bad PIN or conf
    assert listing.returncode == 0, listing.stderr
    assert "label:      root-1" in listing.stdout
    assert "never extractable" in listing.stdout

    read = subprocess.run(
        [*base, "--read-object", "--type", "privkey", "--label", "root-1"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert read.returncode != 0 or read.stdout == b"", read.stdout[:64]


def test_hsm_private_key_objects_refuse_export(pki: Pki) -> None:
    """The cryptography wrapper of a CA key raises on every export path (RSA: below)."""
    key = hsm_private_key(pki.hsm, "root-1")
    assert isinstance(key, HsmEcPrivateKey)
    assert_no_export(key)
    with pytest.raises(HsmError):
        key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP384R1()).public_key())


def assert_no_export(key: HsmEcPrivateKey | HsmRsaPrivateKey) -> None:
    with pytest.raises(HsmError, match="not extractable"):
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(HsmError, match="not extractable"):
        key.private_bytes(Encoding.DER, PrivateFormat.TraditionalOpenSSL, NoEncryption())
    with pytest.raises(HsmError, match="not extractable"):
        key.private_numbers()


# -- 2. every key spec generates and signs ---------------------------------------------------


def check_rsa(key: HsmRsaPrivateKey) -> None:
    """PKCS#1 v1.5 and PSS (digest-length and maximum salts) verify; bad PSS is refused."""
    public = key.public_key()
    for algorithm in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        data = f"rsa-{key.key_size} {algorithm.name}".encode()
        signature = key.sign(data, padding.PKCS1v15(), algorithm)
        assert len(signature) == key.key_size // 8
        public.verify(signature, data, padding.PKCS1v15(), algorithm)
        with pytest.raises(InvalidSignature):
            public.verify(signature, data + b"!", padding.PKCS1v15(), algorithm)

        mgf = padding.MGF1(algorithm)
        max_salt = (key.key_size + 7) // 8 - algorithm.digest_size - 2
        for salt, expected in (
            (padding.PSS.DIGEST_LENGTH, algorithm.digest_size),
            (padding.PSS.MAX_LENGTH, max_salt),
        ):
            signature = key.sign(data, padding.PSS(mgf, salt), algorithm)
            # the exact salt length the signature must carry, then AUTO
            public.verify(signature, data, padding.PSS(mgf, expected), algorithm)
            public.verify(signature, data, padding.PSS(mgf, padding.PSS.AUTO), algorithm)
            with pytest.raises(InvalidSignature):
                public.verify(signature, data + b"!", padding.PSS(mgf, expected), algorithm)

    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    cert = self_signed(key, algorithm=hashes.SHA256(), rsa_padding=pss)
    cert.verify_directly_issued_by(cert)

    # MGF1-SHA1 with SHA-256 is beyond the token's hashed PSS mechanisms: refused, not
    # signed into a signature that cannot verify
    foreign = padding.PSS(padding.MGF1(hashes.SHA1()), padding.PSS.DIGEST_LENGTH)
    with pytest.raises(HsmError, match="MGF1"):
        key.sign(b"data", foreign, hashes.SHA256())
    with pytest.raises(HsmError, match="pre-hashed"):
        key.sign(hashlib.sha256(b"x").digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    with pytest.raises(HsmError):
        key.decrypt(b"\x00" * (key.key_size // 8), padding.PKCS1v15())
    assert_no_export(key)


CURVE_ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


def check_ec(key: HsmEcPrivateKey) -> None:
    """ECDSA signatures come out DER-encoded and verify, also from a pre-hashed digest."""
    n = CURVE_ORDERS[key.curve.name]
    for algorithm in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        data = f"{key.curve.name} {algorithm.name}".encode()
        signature = key.sign(data, ec.ECDSA(algorithm))
        r, s = decode_dss_signature(signature)
        assert 0 < r < n and 0 < s < n
        key.public_key().verify(signature, data, ec.ECDSA(algorithm))
        with pytest.raises(InvalidSignature):
            key.public_key().verify(signature, data + b"!", ec.ECDSA(algorithm))
    digest = hashlib.sha256(b"prehashed").digest()
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    key.public_key().verify(signature, b"prehashed", ECDSA_256)


@pytest.mark.parametrize("spec", KEY_SPECS)
def test_key_spec_generates_and_signs(blank: Settings, spec: str) -> None:
    """Each spec, in a fresh token: a non-extractable key whose signatures verify.

    One test per spec, so each key (rsa-4096 included) is generated exactly once.
    """
    hsm = hsm_for(blank)
    try:
        public = hsm.generate_key(spec, spec)
        cls, size = SPEC_CLASSES[spec]
        assert isinstance(public, cls) and public.key_size == size
        assert hsm.has_key(spec)
        assert hsm.public_key(spec) == public
        assert hsm.private_key_attributes(spec) == {
            "sensitive": True,
            "extractable": False,
            "token": True,
            "never_extractable": True,
        }
        with pytest.raises(pkcs11.PKCS11Error):
            hsm.read_private_value(spec)

        key = hsm_private_key(hsm, spec)
        assert key.public_key() == public
        for algorithm in (hashes.SHA256(), hashes.SHA384()):
            cert = self_signed(key, algorithm=algorithm)
            cert.verify_directly_issued_by(cert)
            assert cert.public_key() == public
            assert cert.signature_hash_algorithm is not None
            assert cert.signature_hash_algorithm.name == algorithm.name

        if isinstance(key, HsmRsaPrivateKey):
            check_rsa(key)
        else:
            check_ec(key)
    finally:
        hsm.close()


def test_unknown_key_spec_is_refused(blank_hsm: Hsm) -> None:
    with pytest.raises(HsmError, match="unknown key type"):
        blank_hsm.generate_key("new", "ec-p521")
    assert not blank_hsm.has_key("new")


# -- 3. clear errors -------------------------------------------------------------------------


def test_module_not_found_names_the_path(blank: Settings, tmp_path: Path) -> None:
    missing = tmp_path / "no-such" / "libpkcs11.so"
    hsm = Hsm(str(missing), "hsmca", blank.hsm_pin, blank.hsm.softhsm2_conf)
    with pytest.raises(HsmModuleNotFound) as info:
        hsm.open()
    assert str(missing) in str(info.value)


def test_module_that_is_not_a_library(blank: Settings, tmp_path: Path) -> None:
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"not an ELF file")
    hsm = Hsm(str(bogus), "hsmca", blank.hsm_pin, blank.hsm.softhsm2_conf)
    with pytest.raises(HsmModuleNotFound) as info:
        hsm.open()
    assert str(bogus) in str(info.value)


def test_token_not_found(blank: Settings) -> None:
    hsm = Hsm(blank.hsm.module, "no-such-token", blank.hsm_pin, blank.hsm.softhsm2_conf)
    with pytest.raises(HsmTokenNotFound, match="no-such-token"):
        hsm.sign("k", b"\x00" * 32, Mechanism.ECDSA)


def test_wrong_pin_is_clear_and_does_not_leak_the_pin(blank: Settings) -> None:
    wrong = "wrong-pin-7c1f9e"
    hsm = hsm_for(blank, pin=lambda: wrong)
    with pytest.raises(HsmWrongPin) as info:
        hsm.open()
    assert wrong not in str(info.value)
    assert blank.hsm_pin() not in str(info.value)
    assert blank.hsm.token_label in str(info.value)
    # a failed login leaves the token usable with the right PIN
    good = hsm_for(blank)
    try:
        good.generate_key("after-wrong-pin", "ec-p256")
        assert good.has_key("after-wrong-pin")
    finally:
        good.close()


def test_key_not_found(blank_hsm: Hsm) -> None:
    with pytest.raises(HsmKeyNotFound, match="missing"):
        blank_hsm.sign("missing", b"\x00" * 32, Mechanism.ECDSA)
    with pytest.raises(HsmKeyNotFound, match="missing"):
        blank_hsm.public_key("missing")
    with pytest.raises(HsmKeyNotFound, match="missing"):
        blank_hsm.private_key_attributes("missing")
    with pytest.raises(HsmKeyNotFound):
        hsm_private_key(blank_hsm, "missing")
    assert not blank_hsm.has_key("missing")
    # the session survived the misses
    assert_signs(blank_hsm, "k")


def test_duplicate_label_is_refused_and_keeps_the_first_key(blank_hsm: Hsm) -> None:
    before = blank_hsm.public_key("k")
    with pytest.raises(HsmError, match="already exists"):
        blank_hsm.generate_key("k", "ec-p384")
    with pytest.raises(HsmError, match="already exists"):
        blank_hsm.generate_key("k", "ec-p256")
    count = blank_hsm._call(
        lambda s: len(list(s.get_objects({Attribute.LABEL: "k"})))  # private + public
    )
    assert count == 2
    assert hsm_private_key(blank_hsm, "k").public_key() == before
    assert_signs(blank_hsm, "k")


# -- 4. a lost session comes back once -------------------------------------------------------


def test_lost_session_reconnects_once(blank_hsm: Hsm, monkeypatch: pytest.MonkeyPatch) -> None:
    key = hsm_private_key(blank_hsm, "k")
    key.sign(b"warm", ECDSA_256)
    logins = count_logins(blank_hsm, monkeypatch)
    old = blank_hsm._session
    old.close()  # behind the Hsm's back

    signature = key.sign(b"after loss", ECDSA_256)
    key.public_key().verify(signature, b"after loss", ECDSA_256)
    assert len(logins) == 1
    assert blank_hsm._session is not None and blank_hsm._session is not old
    # and the new session is kept
    key.sign(b"again", ECDSA_256)
    assert len(logins) == 1


# python-pkcs11 0.10.1 marks a search active before C_FindObjectsInit; when that fails on
# the dead session, the object's __del__ reports the error as "Exception ignored".
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. 'pkcs11._pkcs11.OperationContext.__del__'"
    ":pytest.PytestUnraisableExceptionWarning"
)
def test_failed_reconnect_with_wrong_pin_is_a_clear_error(blank: Settings) -> None:
    good = blank.hsm_pin()
    wrong = "not-the-pin-31337"
    pins = iter([good])
    hsm = hsm_for(blank, pin=lambda: next(pins, wrong))
    try:
        hsm.generate_key("k", "ec-p256")
        hsm._session.close()
        with pytest.raises(HsmWrongPin) as info:
            hsm.sign("k", b"\x00" * 32, Mechanism.ECDSA)
        assert not isinstance(info.value, pkcs11.PKCS11Error)
        assert wrong not in str(info.value) and good not in str(info.value)
    finally:
        hsm.close()


def test_deleted_token_is_a_clear_error(blank: Settings) -> None:
    hsm = hsm_for(blank)
    try:
        hsm.generate_key("k", "ec-p256")
        hsm.sign("k", b"\x00" * 32, Mechanism.ECDSA)
        deleted = subprocess.run(
            ["softhsm2-util", "--delete-token", "--token", blank.hsm.token_label],
            env=dict(os.environ, SOFTHSM2_CONF=blank.hsm.softhsm2_conf),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert deleted.returncode == 0, deleted.stderr
        assert not any((blank.home / "tokens").iterdir())
        with pytest.raises(HsmError) as info:
            hsm.sign("k", b"\x00" * 32, Mechanism.ECDSA)
        assert not isinstance(info.value, pkcs11.PKCS11Error)
        assert blank.hsm.token_label in str(info.value)
    finally:
        hsm.close()


# -- 5. one session per process --------------------------------------------------------------


def test_two_hundred_signatures_use_one_session(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    key = hsm_private_key(pki.hsm, "issuing-1")
    key.sign(b"warm", ECDSA_256)
    session = pki.hsm._session
    logins = count_logins(pki.hsm, monkeypatch)
    for i in range(200):
        data = b"message %d" % i
        key.public_key().verify(key.sign(data, ECDSA_256), data, ECDSA_256)
    assert logins == []
    assert pki.hsm._session is session


# -- two Hsm objects on one token in one process ---------------------------------------------


def test_two_hsm_objects_share_a_token(blank: Settings) -> None:
    """PKCS#11 logins are per process: a second Hsm must not fail with
    UserAlreadyLoggedIn, and closing one must not log the other out."""
    first, second = hsm_for(blank), hsm_for(blank)
    first.generate_key("k", "ec-p256")
    first.open()
    second.open()
    assert_signs(first, "k")
    assert_signs(second, "k")
    # joining the login still checks the PIN (SoftHSM2 says "already logged in" first)
    with pytest.raises(HsmWrongPin):
        hsm_for(blank, pin=lambda: "1234-wrong").open()

    first.close()
    assert second.has_key("k")
    assert_signs(second, "k", b"after first closed")

    # the first comes back while the second holds the login, then the second leaves
    assert_signs(first, "k", b"first again")
    second.close()
    assert first.has_key("k")
    assert_signs(first, "k", b"after second closed")
    first.close()

    # all closed: the login is gone, so a wrong PIN is checked again (not bypassed)
    with pytest.raises(HsmWrongPin):
        hsm_for(blank, pin=lambda: "0000-wrong").open()


def test_two_pki_objects_on_one_home(fresh_home: Path, make_csr: Callable[..., bytes]) -> None:
    """Closing one Pki leaves the other on the same home signing."""
    first, second = Pki.open(fresh_home), Pki.open(fresh_home)
    try:
        issuing = x509.load_der_x509_certificate(first.issuing_issuer().der)
        records = [
            core.issue(IssueRequest(make_csr(), "mtls-server"), operator())
            for core in (first, second)
        ]
        first.close()
        records.append(second.issue(IssueRequest(make_csr(), "mtls-server"), operator()))
    finally:
        first.close()
        second.close()
    for record in records:
        assert record.certificate_pem is not None
        cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
        cert.verify_directly_issued_by(issuing)


def test_opening_the_hsm_leaves_no_openssl_error_for_the_next_tls_call(ca_home: Path) -> None:
    """SoftHSM2 queues a failed engine load on the thread's OpenSSL error queue; left there,
    the thread's next TLS call failed with ``[ENGINE: NO_SUCH_ENGINE]``."""
    import ctypes
    import ctypes.util
    import multiprocessing

    def child(queue: Any) -> None:  # a fresh process: the module is loaded here first
        libcrypto = ctypes.CDLL(ctypes.util.find_library("crypto"))
        libcrypto.ERR_peek_error.restype = ctypes.c_ulong
        core = Pki.open(ca_home)
        try:
            core.signer(core.issuing_issuer().id).key.sign(b"x", ec.ECDSA(hashes.SHA256()))
            queue.put(int(libcrypto.ERR_peek_error()))
        finally:
            core.close()

    queue: Any = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=child, args=(queue,))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert queue.get(timeout=5) == 0
