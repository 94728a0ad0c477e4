"""EST wire formats, IDevID trust and the device use-cases in process (real SoftHSM2 token
and SQLite; the HTTP side is in test_est.py and test_devices.py)."""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from pki.actors import operator
from pki.config import DeviceSettings, load_settings
from pki.errors import ConfigError, Forbidden, InvalidInput, PolicyError, Unauthorised
from pki.est import (
    CsrAttrs,
    certs_only,
    challenge_password,
    csr_attributes,
    decode_pkcs10,
    encode_base64,
    tls_unique_password,
)
from pki.manufacturer import ManufacturerTrust
from pki.service import IssueRequest, Pki
from tests.api_helpers import unique
from tests.conftest import build_csr
from tests.test_est import Authority, make_authority

NOW = dt.datetime.now(dt.UTC)


def _der_csr(serial_number: str = "dev-1", password: str | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number)])
    )
    if password is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, password.encode())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# -- wire formats ---------------------------------------------------------------------------


def test_decode_accepts_base64_with_line_breaks_and_pem() -> None:
    der = _der_csr()
    assert decode_pkcs10(encode_base64(der)) == der
    assert decode_pkcs10(base64.b64encode(der) + b"\r\n") == der
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert decode_pkcs10(pem) == der


@pytest.mark.parametrize(
    ("body", "mention"),
    [
        (b"", "empty"),
        (b"not base64 at all!", "not base64"),
        (base64.b64encode(b"\x04\x03abc"), "not a PKCS#10"),
    ],
)
def test_decode_refuses_what_is_not_a_base64_csr(body: bytes, mention: str) -> None:
    with pytest.raises(InvalidInput, match=mention):
        decode_pkcs10(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_decode_of_any_bytes_is_der_or_a_clear_refusal(body: bytes) -> None:
    try:
        der = decode_pkcs10(body)
    except InvalidInput as exc:
        assert str(exc)
    else:
        assert der.startswith(b"\x30")


def test_certs_only_holds_exactly_the_certificates(pki: Pki) -> None:
    ders = [i.der for i in pki.issuers().values()]
    body = certs_only(ders)
    assert all(len(line) <= 64 for line in body.splitlines())
    info = cms.ContentInfo.load(base64.b64decode(body))
    assert info["content_type"].native == "signed_data"
    signed = info["content"]
    assert len(signed["signer_infos"]) == 0
    assert sorted(c.dump() for c in signed["certificates"]) == sorted(ders)


def test_csr_attributes_name_what_a_device_csr_should_carry() -> None:
    parsed = CsrAttrs.load(base64.b64decode(csr_attributes()))
    items = [(a.name, a.chosen.native) for a in parsed]
    oids = [v for n, v in items if n == "oid"]
    # challengePassword, ecdsa-with-SHA256, serialNumber
    assert oids == ["1.2.840.113549.1.9.7", "1.2.840.10045.4.3.2", "2.5.4.5"]
    attribute = [dict(v) for n, v in items if n == "attribute"]
    assert attribute == [{"type": "1.2.840.10045.2.1", "values": ["1.2.840.10045.3.1.7"]}]


def test_challenge_password_is_read_from_the_csr() -> None:
    assert challenge_password(x509.load_der_x509_csr(_der_csr())) is None
    csr = x509.load_der_x509_csr(_der_csr(password="abc="))
    assert challenge_password(csr) == "abc="
    assert tls_unique_password(b"\x01\x02") == "AQI="


# -- configuration ------------------------------------------------------------------------


def test_device_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"devices\.profile"):
        DeviceSettings(profile="mtls")
    with pytest.raises(ConfigError, match="credential_ttl"):
        DeviceSettings(credential_ttl="soon")
    settings = load_settings(
        Path("/nonexistent-home"), {"HSMCA_DEVICES__MANUFACTURER_CA_FILE": "m.pem"}
    )
    assert settings.manufacturer_ca_path == Path("/nonexistent-home/m.pem")


# -- IDevID trust ---------------------------------------------------------------------------


def _idevid(
    ca: Authority,
    attrs: list[x509.NameAttribute],
    not_after: dt.datetime | None = None,
) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(not_after or NOW + dt.timedelta(days=3650))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_manufacturer_trust_names_the_device_of_its_own_idevids(tmp_path: Path) -> None:
    maker, other = make_authority("Maker CA"), make_authority("Other CA")
    bundle = tmp_path / "makers.pem"
    bundle.write_bytes(maker.cert.public_bytes(serialization.Encoding.PEM))
    trust = ManufacturerTrust(bundle)
    serial = x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-1")
    cn = x509.NameAttribute(NameOID.COMMON_NAME, "gw-7")
    assert trust.device_id_of(_idevid(maker, [cn, serial]), NOW) == "SN-1"
    assert trust.device_id_of(_idevid(maker, [cn]), NOW) == "gw-7"
    with pytest.raises(Unauthorised, match="manufacturer"):
        trust.device_id_of(_idevid(other, [serial]), NOW)
    with pytest.raises(Unauthorised, match="not valid"):
        trust.device_id_of(_idevid(maker, [serial], NOW - dt.timedelta(hours=1)), NOW)
    with pytest.raises(Unauthorised, match="names no device"):
        trust.device_id_of(
            _idevid(maker, [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]), NOW
        )
    with pytest.raises(Unauthorised, match="parsed"):
        trust.device_id_of(b"\x30\x03junk", NOW)
    with pytest.raises(Unauthorised, match="CA certificate"):  # the CA itself
        trust.device_id_of(maker.cert.public_bytes(serialization.Encoding.DER), NOW)
    # the bundle is re-read when it changes
    bundle.write_bytes(other.cert.public_bytes(serialization.Encoding.PEM))
    os.utime(bundle, (1, 1))
    assert trust.device_id_of(_idevid(other, [serial]), NOW) == "SN-1"


def test_a_missing_or_broken_bundle_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="manufacturer_ca_file"):
        ManufacturerTrust(tmp_path / "absent.pem").certificates()
    broken = tmp_path / "broken.pem"
    broken.write_text("not pem")
    with pytest.raises(ConfigError, match="not a PEM"):
        ManufacturerTrust(broken).certificates()
    assert ManufacturerTrust(None).certificates() == []


# -- use-cases in process ------------------------------------------------------------------


def test_credential_lifecycle_in_process(pki: Pki) -> None:
    device = unique("dev")
    created = pki.create_enrollment_credential(device, dt.timedelta(hours=1), operator())
    assert created.secret.startswith("hsmcad_")
    with pytest.raises(Unauthorised, match="not for device"):
        pki.authenticate_device_secret(created.secret, "someone-else")
    auth = pki.authenticate_device_secret(created.secret, device)
    record = pki.enroll_device(_der_csr(device), auth)
    assert record.sans == [f"uri:urn:dev:serial:{device}"]
    assert pki.store.certificate(record.serial).device_id == device
    with pytest.raises(Unauthorised, match="already used"):
        pki.authenticate_device_secret(created.secret, device)
    with pytest.raises(Unauthorised, match="already used or has expired"):
        pki.enroll_device(_der_csr(device), auth)  # a stale auth cannot spend it twice
    shown = pki.show_device(device, operator())
    assert (shown.status, shown.enrolled_via, shown.current_serial) == (
        "enrolled",
        "credential",
        record.serial,
    )


@pytest.mark.parametrize(
    ("csr_kwargs", "error", "mention"),
    [
        ({"cn": None, "sans": (), "serial_number": "another"}, Forbidden, "names device"),
        ({"cn": "DEV", "sans": ("evil.example",)}, Forbidden, "only its device"),
    ],
)
def test_bad_csrs_leave_the_credential_usable(
    pki: Pki, csr_kwargs: dict[str, object], error: type[Exception], mention: str
) -> None:
    device = unique("dev")
    secret = pki.create_enrollment_credential(device, None, operator()).secret
    auth = pki.authenticate_device_secret(secret, device)
    kwargs = {k: (device if v == "DEV" else v) for k, v in csr_kwargs.items()}
    pem, _ = build_csr(**kwargs)  # type: ignore[arg-type]
    before = pki.store.count_certificates()
    with pytest.raises(error, match=mention):
        pki.enroll_device(pem, auth)
    assert pki.store.count_certificates() == before
    assert pki.enroll_device(_der_csr(device), auth).serial


def test_channel_binding_must_match_when_present(pki: Pki) -> None:
    device = unique("dev")
    secret = pki.create_enrollment_credential(device, None, operator()).secret
    auth = pki.authenticate_device_secret(secret, device)
    binding = b"\x11" * 12
    with pytest.raises(PolicyError, match="tls-unique"):
        pki.enroll_device(_der_csr(device, password="wrong"), auth, binding)
    with pytest.raises(PolicyError, match="tls-unique"):
        pki.enroll_device(_der_csr(device, password=tls_unique_password(binding)), auth, None)
    record = pki.enroll_device(
        _der_csr(device, password=tls_unique_password(binding)), auth, binding
    )
    events = [e for e in pki.store.audit_events() if e.subject == record.serial]
    assert events[-1].details["channel_bound"] is True


def test_provisioning_checks_everything_before_storing(pki: Pki) -> None:
    good = unique("dev")
    for ids, mention in [
        ([good, "bad id"], "device 2"),
        ([good, good], "repeated"),
        ([], "no device ids"),
    ]:
        with pytest.raises(InvalidInput, match=mention):
            pki.provision_devices(ids, None, operator())
    with pytest.raises(InvalidInput, match="between"):
        pki.provision_devices([good], dt.timedelta(seconds=5), operator())
    assert pki.store.devices.status(good) is None


def test_a_device_revoked_while_its_certificate_is_signed_loses_it(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = unique("dev")
    pki.create_enrollment_credential(device, None, operator())
    pki.store.devices.mark_revoked(device, _audit(device))  # its credentials die with it
    # an issuance through the API (no credential to spend) that passed the device check
    # just before the revocation landed
    monkeypatch.setattr(pki.store.devices, "status", lambda _device_id: "provisioned")
    before = pki.store.count_certificates()
    with pytest.raises(Forbidden, match="revoked"):
        pki.issue(IssueRequest(_der_csr(device), "device", device_id=device), operator())
    rows = pki.store.devices.certificates(device)
    assert pki.store.count_certificates() == before + 1
    assert [(r.status, r.revocation_reason) for r in rows] == [("revoked", "cessationOfOperation")]
    monkeypatch.undo()
    with pytest.raises(InvalidInput, match="revoked"):
        pki.create_enrollment_credential(device, None, operator())


def _audit(device: str) -> object:
    from pki.audit import AuditRecord

    return AuditRecord(action="device.revoke", actor="test", subject=device)


def test_purge_deletes_only_spent_or_expired_credentials(fresh_home: Path) -> None:
    core = Pki.open(fresh_home)
    try:
        used = core.create_enrollment_credential("dev-used", dt.timedelta(hours=1), operator())
        fresh = core.create_enrollment_credential("dev-fresh", dt.timedelta(hours=1), operator())
        auth = core.authenticate_device_secret(used.secret, "dev-used")
        core.enroll_device(_der_csr("dev-used"), auth)
        earlier = core.clock.now() - dt.timedelta(minutes=1)
        assert core.store.devices.purge_credentials(earlier) == 0
        later = core.clock.now() + dt.timedelta(minutes=30)
        assert core.store.devices.purge_credentials(later) == 1  # the spent one
        assert core.authenticate_device_secret(fresh.secret, "dev-fresh").device_id == "dev-fresh"
        assert core.store.devices.purge_credentials(later + dt.timedelta(hours=1)) == 1
        with pytest.raises(Unauthorised, match="unknown"):
            core.authenticate_device_secret(fresh.secret, "dev-fresh")
        assert core.show_device("dev-used", operator()).status == "enrolled"  # inventory stays
    finally:
        core.close()


def test_a_malformed_device_id_is_refused_and_never_audited_as_given(pki: Pki) -> None:
    """A device that sends SECRET:ID instead of ID:SECRET: the 'id' is a secret."""
    device = unique("dev")
    secret = pki.create_enrollment_credential(device, None, operator()).secret
    mark = max(e.id for e in pki.store.audit_events())
    with pytest.raises(Unauthorised, match="malformed device id"):
        pki.authenticate_device_secret(device, secret)
    new = [e for e in pki.store.audit_events() if e.id > mark]
    assert secret not in " ".join(f"{e.actor} {e.subject} {e.details}" for e in new)
    mine = [e for e in new if e.details.get("reason") == "malformed device id"]
    assert mine and mine[0].outcome == "refused" and mine[0].subject is None
    assert pki.authenticate_device_secret(secret, device).device_id == device  # unspent


def test_idevids_can_be_limited_to_devices_in_the_inventory(pki: Pki, tmp_path: Path) -> None:
    import dataclasses

    maker = make_authority("Maker CA")
    bundle = tmp_path / "makers.pem"
    bundle.write_bytes(maker.cert.public_bytes(serialization.Encoding.PEM))
    devices = dataclasses.replace(
        pki.settings.devices, manufacturer_ca_file=str(bundle), idevid_known_devices_only=True
    )
    strict = Pki(dataclasses.replace(pki.settings, devices=devices), pki.store, pki.hsm, pki.clock)
    known, unknown = unique("known"), unique("stranger")
    pki.create_enrollment_credential(known, None, operator())  # puts it in the inventory
    idevid = _idevid(maker, [x509.NameAttribute(NameOID.SERIAL_NUMBER, known)])
    assert strict.authenticate_idevid(idevid).device_id == known
    stranger = _idevid(maker, [x509.NameAttribute(NameOID.SERIAL_NUMBER, unknown)])
    with pytest.raises(Unauthorised, match="not in the inventory"):
        strict.authenticate_idevid(stranger)
    lenient = Pki(
        dataclasses.replace(
            pki.settings,
            devices=dataclasses.replace(devices, idevid_known_devices_only=False),
        ),
        pki.store,
        pki.hsm,
        pki.clock,
    )
    assert lenient.authenticate_idevid(stranger).device_id == unknown
