"""The ACME core without HTTP: JWS parsing and verification, identifiers, renewal
information (RFC 9773) and replay nonces on a real store.

JWS bodies are signed with real keys by :func:`tests.acme_helpers.jws`; nonces are
redeemed against the SQLite store of the shared ``ca_home`` (through the ``pki`` fixture)
with a :class:`~pki.clock.FrozenClock`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import josepy as jose
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pki.acme import jws, renewal
from pki.acme.identifiers import Identifier, check_allowed, check_csr_names, parse_identifiers
from pki.acme.nonces import NONCE_LIFETIME, Nonces
from pki.acme.problems import ERROR_PREFIX, AcmeProblem
from pki.clock import FrozenClock
from pki.policy import RequestedNames
from pki.serials import serial_hex
from pki.service import Pki
from tests.acme_helpers import AccountKey, b64u
from tests.acme_helpers import jws as sign_jws

URL = "https://ca.test/acme/new-order"
KID = "https://ca.test/acme/acct/1"
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

#: RFC 7638 section 3.1: this RSA key's thumbprint is NzbLsXh8...
RFC7638_KEY = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc"
    "_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
    "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhA"
    "I4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
#: RFC 8037 appendix A.3: the Ed25519 key of A.2 and its thumbprint
RFC8037_KEY = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"

KEYS = {alg: AccountKey(alg) for alg in ("ES256", "ES384", "RS256", "EdDSA")}


def refused(kind: str, call: Any, *args: Any, **kwargs: Any) -> AcmeProblem:
    """Assert ``call(*args, **kwargs)`` raises the AcmeProblem ``kind``; return it."""
    with pytest.raises(AcmeProblem) as info:
        call(*args, **kwargs)
    assert info.value.kind == kind, (info.value.kind, info.value.detail)
    assert info.value.document()["type"].startswith(ERROR_PREFIX)
    return info.value


def body_with(protected: Any, payload: str = "", signature: str = "c2ln") -> bytes:
    """A flattened JWS whose protected header is ``protected`` (a dict is JSON-encoded)."""
    encoded = protected if isinstance(protected, str) else b64u(json.dumps(protected).encode())
    return json.dumps({"protected": encoded, "payload": payload, "signature": signature}).encode()


GOOD_HEADER = {"alg": "ES256", "url": URL, "nonce": "bm9uY2U", "kid": KID}


# -- jws.parse --------------------------------------------------------------------------------


def test_parse_reads_a_signed_request() -> None:
    key = KEYS["ES256"]
    body = sign_jws(key, URL, {"identifiers": []}, nonce="abc")
    request = jws.parse(json.dumps(body).encode())
    assert (request.alg, request.url, request.nonce, request.kid) == ("ES256", URL, "abc", None)
    assert request.jwk == key.jwk()
    assert request.payload_json() == {"identifiers": []}
    assert not request.is_post_as_get
    assert request.signing_input == f"{body['protected']}.{body['payload']}".encode()
    as_get = jws.parse(json.dumps(sign_jws(key, URL, None, nonce="n", kid=KID)).encode())
    assert as_get.is_post_as_get and as_get.kid == KID and as_get.jwk is None


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"not json", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b"[]", "malformed"),
        (b'"text"', "malformed"),
        (json.dumps({"protected": "e30", "payload": ""}).encode(), "malformed"),
        (json.dumps({"protected": 5, "payload": "", "signature": ""}).encode(), "malformed"),
        (
            json.dumps({"protected": "e30", "payload": "", "signature": "", "header": {}}).encode(),
            "malformed",
        ),
        (body_with("e30="), "malformed"),  # padded base64url
        (body_with("e30 "), "malformed"),
        (body_with(b64u(b"not json")), "malformed"),
        (body_with(b64u(b"[1, 2]")), "malformed"),
        (body_with({k: v for k, v in GOOD_HEADER.items() if k != "url"}), "malformed"),
        (body_with({**GOOD_HEADER, "url": 7}), "malformed"),
        (body_with({k: v for k, v in GOOD_HEADER.items() if k != "nonce"}), "badNonce"),
        (body_with({**GOOD_HEADER, "nonce": 12}), "badNonce"),
        (body_with({k: v for k, v in GOOD_HEADER.items() if k != "alg"}), "badSignatureAlgorithm"),
        (body_with({**GOOD_HEADER, "alg": "none"}), "badSignatureAlgorithm"),
        (body_with({**GOOD_HEADER, "alg": "HS256"}), "badSignatureAlgorithm"),
        (body_with({**GOOD_HEADER, "alg": "RS512"}), "badSignatureAlgorithm"),
        (body_with({**GOOD_HEADER, "alg": "ES512"}), "badSignatureAlgorithm"),
        (body_with({**GOOD_HEADER, "alg": ["ES256"]}), "badSignatureAlgorithm"),
        (body_with({**GOOD_HEADER, "jwk": KEYS["ES256"].jwk()}), "malformed"),
        (body_with({k: v for k, v in GOOD_HEADER.items() if k != "kid"}), "malformed"),
        (body_with({**GOOD_HEADER, "kid": 1}), "malformed"),
        (body_with(GOOD_HEADER, payload="e30="), "malformed"),
        (body_with(GOOD_HEADER, signature="a b"), "malformed"),
    ],
)
def test_parse_refuses_bad_shapes(body: bytes, kind: str) -> None:
    problem = refused(kind, jws.parse, body)
    if kind == "badSignatureAlgorithm":
        assert problem.extra["algorithms"] == ["ES256", "ES384", "RS256", "EdDSA"]
        assert problem.document()["algorithms"] == problem.extra["algorithms"]


def test_parse_inner_needs_no_nonce_and_takes_hmac() -> None:
    header = {"alg": "ES256", "url": URL, "jwk": KEYS["ES256"].jwk()}
    assert jws.parse(body_with(header), inner=True).nonce is None
    eab = jws.parse(body_with({"alg": "HS256", "url": URL, "kid": "eab_1"}), inner=True)
    assert eab.alg == "HS256" and eab.kid == "eab_1"
    refused("badSignatureAlgorithm", jws.parse, body_with({**header, "alg": "HS1"}), inner=True)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
HEADERS = st.dictionaries(
    st.sampled_from(["alg", "url", "nonce", "jwk", "kid", "crit", "b64"]),
    JSON_VALUES | st.sampled_from(["ES256", "HS256", "EdDSA", URL, KID]),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_parse_of_arbitrary_input_only_raises_acme_problems(body: bytes) -> None:
    with contextlib.suppress(AcmeProblem):
        jws.parse(body)


@pytest.mark.parametrize("inner", [False, True], ids=["outer", "inner"])
@settings(max_examples=300, deadline=None)
@given(header=HEADERS)
@example(header={"alg": 5, "url": URL, "jwk": {}})
def test_parse_of_arbitrary_headers_only_raises_acme_problems(
    inner: bool, header: dict[str, Any]
) -> None:
    """Whatever the protected header holds, a refusal is an AcmeProblem (never a 500)."""
    with contextlib.suppress(AcmeProblem):
        jws.parse(body_with(header), inner=inner)


# -- base64url --------------------------------------------------------------------------------


def test_b64u_round_trip() -> None:
    for size in range(0, 40):
        data = os.urandom(size)
        assert jws.b64u_decode(jws.b64u(data), "x") == data


@pytest.mark.parametrize(
    "text",
    ["AB+/", "ABCD!!!!", "ABC", "A"],
    ids=["plus-slash", "junk", "spare-bits", "one-char"],
)
def test_b64u_decode_refuses_non_canonical_base64url(text: str) -> None:
    """RFC 7515 2: base64url without padding, so every value has one encoding; otherwise a
    used nonce (or a certificate id) can be presented again under another spelling."""
    refused("malformed", jws.b64u_decode, text, "x")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=B64_ALPHABET + "+/!.= \n", max_size=24))
def test_b64u_decode_accepts_only_canonical_text(text: str) -> None:
    try:
        decoded = jws.b64u_decode(text, "x")
    except AcmeProblem as problem:
        assert problem.kind == "malformed"
    else:
        assert jws.b64u(decoded) == text


# -- jws.account_key --------------------------------------------------------------------------


def test_thumbprints_match_the_rfc_examples() -> None:
    assert jws.account_key(RFC7638_KEY).thumbprint == RFC7638_THUMBPRINT
    assert jws.account_key(RFC8037_KEY).thumbprint == RFC8037_THUMBPRINT
    # only the public members are kept
    assert jws.account_key(RFC7638_KEY).jwk == {
        "kty": "RSA",
        "n": RFC7638_KEY["n"],
        "e": "AQAB",
    }


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_thumbprint_agrees_with_the_client(alg: str) -> None:
    key = KEYS[alg]
    parsed = jws.account_key(key.jwk())
    assert parsed.thumbprint == key.thumbprint()
    assert parsed.spki_der() == key.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_jwk(key: Any) -> dict[str, Any]:
    return jose.JWK.load(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    ).to_partial_json()


@pytest.mark.parametrize(
    ("jwk", "kind"),
    [
        (_private_jwk(KEYS["RS256"].key), "badPublicKey"),
        (_private_jwk(KEYS["ES256"].key), "badPublicKey"),
        ({**RFC8037_KEY, "d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}, "badPublicKey"),
        (
            jose.JWKRSA(key=rsa.generate_private_key(65537, 1024).public_key()).to_partial_json(),
            "badPublicKey",
        ),
        (
            jose.JWKEC(key=ec.generate_private_key(ec.SECP521R1()).public_key()).to_partial_json(),
            "badPublicKey",
        ),
        ({"kty": "oct", "k": "c2VjcmV0"}, "badPublicKey"),
        ({"kty": "OKP", "crv": "X25519", "x": RFC8037_KEY["x"]}, "badPublicKey"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}, "badPublicKey"),
        ({**RFC7638_KEY, "n": "AQAB"}, "badPublicKey"),
        ("not an object", "malformed"),
        ({"crv": "P-256"}, "malformed"),
    ],
    ids=[
        "rsa-private",
        "ec-private",
        "okp-private",
        "rsa-1024",
        "ec-p521",
        "oct",
        "x25519",
        "ed25519-short",
        "rsa-tiny-modulus",
        "string",
        "no-kty",
    ],
)
def test_account_key_refuses_unacceptable_keys(jwk: Any, kind: str) -> None:
    refused(kind, jws.account_key, jwk)


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "EC"},
        {"kty": "EC", "crv": "P-256"},
        {"kty": "RSA"},
        {"kty": "RSA", "n": RFC7638_KEY["n"]},
        {"kty": "RSA", "n": 5, "e": "AQAB"},
        {"kty": "EC", "crv": "P-256", "x": 5, "y": "AA"},
    ],
    ids=["ec-bare", "ec-no-xy", "rsa-bare", "rsa-no-e", "rsa-n-int", "ec-x-int"],
)
def test_account_key_refuses_incomplete_keys_with_a_problem(jwk: dict[str, Any]) -> None:
    """A jwk with missing or mistyped members is badPublicKey/malformed, not a crash."""
    with pytest.raises(AcmeProblem) as info:
        jws.account_key(jwk)
    assert info.value.kind in ("badPublicKey", "malformed")


@settings(max_examples=300, deadline=None)
@given(
    jwk=st.fixed_dictionaries(
        {"kty": st.sampled_from(["EC", "RSA", "OKP", "oct"])},
        optional={
            "crv": st.sampled_from(["P-256", "P-384", "Ed25519"]) | JSON_VALUES,
            "x": st.sampled_from([RFC8037_KEY["x"], "AA"]) | JSON_VALUES,
            "y": st.sampled_from(["AA"]) | JSON_VALUES,
            "n": st.sampled_from([RFC7638_KEY["n"]]) | JSON_VALUES,
            "e": st.sampled_from(["AQAB"]) | JSON_VALUES,
        },
    )
)
def test_account_key_of_arbitrary_jwks_only_raises_acme_problems(jwk: dict[str, Any]) -> None:
    with contextlib.suppress(AcmeProblem):
        jws.account_key(jwk)


# -- jws.verify -------------------------------------------------------------------------------


def _signed(alg: str, header_alg: str | None = None) -> tuple[jws.SignedRequest, jws.AccountKey]:
    key = KEYS[alg]
    body = sign_jws(key, URL, {"a": 1}, nonce="n", alg=header_alg)
    return jws.parse(json.dumps(body).encode()), jws.account_key(key.jwk())


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_verify_accepts_a_good_signature_and_refuses_a_changed_one(alg: str) -> None:
    request, key = _signed(alg)
    jws.verify(request, key)
    signature = bytearray(request.signature)
    signature[0] ^= 0x01
    flipped = jws.SignedRequest(
        request.protected, request.payload, request.signing_input, bytes(signature)
    )
    refused("malformed", jws.verify, flipped, key)
    other_input = request.signing_input[:-1] + b"A"
    changed = jws.SignedRequest(request.protected, b"", other_input, request.signature)
    refused("malformed", jws.verify, changed, key)
    other_key = jws.account_key(AccountKey(alg).jwk())
    refused("malformed", jws.verify, request, other_key)


@pytest.mark.parametrize(
    ("alg", "header_alg"),
    [("ES256", "ES384"), ("ES384", "ES256"), ("ES256", "RS256"), ("RS256", "ES256"),
     ("EdDSA", "ES256"), ("ES256", "EdDSA")],
)  # fmt: skip
def test_verify_refuses_an_alg_the_key_does_not_have(alg: str, header_alg: str) -> None:
    request, key = _signed(alg, header_alg)
    refused("malformed", jws.verify, request, key)


def test_verify_refuses_a_der_encoded_ecdsa_signature() -> None:
    """JWS ES256 signatures are r||s (RFC 7518 3.4), not the DER form."""
    key = KEYS["ES256"]
    request, public = _signed("ES256")
    der = key.key.sign(request.signing_input, ec.ECDSA(hashes.SHA256()))
    as_der = jws.SignedRequest(request.protected, request.payload, request.signing_input, der)
    refused("malformed", jws.verify, as_der, public)


# -- identifiers ------------------------------------------------------------------------------


def _ids(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"type": t, "value": v} for t, v in pairs]


def test_identifiers_are_normalised_and_deduplicated() -> None:
    found = parse_identifiers(
        _ids(
            ("dns", "App.Example.TEST"),
            ("dns", "app.example.test"),
            ("ip", "2001:0db8:0:0::1"),
            ("ip", "2001:db8::1"),
            ("dns", "*.Wild.example.test"),
        ),
        100,
    )
    assert [i.to_json() for i in found] == _ids(
        ("dns", "app.example.test"), ("ip", "2001:db8::1"), ("dns", "*.wild.example.test")
    )
    wild = found[2]
    assert wild.wildcard and wild.base == "wild.example.test"
    assert not found[0].wildcard and found[0].base == "app.example.test"
    assert not Identifier("ip", "10.0.0.1").wildcard


@pytest.mark.parametrize(
    "value",
    [
        "a.example.test.",
        " a.example.test",
        "a..example.test",
        "10.0.0.1",
        "::1",
        "bad name.test",
        "é.example.test",
        "a.*.example.test",
        "*.test",
        "*",
        "**.example.test",
        "*a.example.test",
        "a.example.123",
        "",
    ],
)
def test_bad_dns_identifiers_are_rejected_with_a_subproblem(value: str) -> None:
    problem = refused("rejectedIdentifier", parse_identifiers, _ids(("dns", value)), 100)
    assert [s["identifier"] for s in problem.extra["subproblems"]] == [
        {"type": "dns", "value": value}
    ]


def test_identifier_types_and_shapes() -> None:
    problem = refused(
        "unsupportedIdentifier",
        parse_identifiers,
        _ids(("email", "a@example.test"), ("dns", "ok.example.test"), ("ip", "300.1.1.1")),
        100,
    )
    subs = problem.extra["subproblems"]
    assert [(s["type"].rsplit(":", 1)[-1], s["identifier"]["type"]) for s in subs] == [
        ("unsupportedIdentifier", "email"),
        ("rejectedIdentifier", "ip"),
    ]
    for raw in (None, [], "dns:a.test", {"type": "dns", "value": "a.test"}):
        refused("malformed", parse_identifiers, raw, 100)
    for item in (["dns", "a.test"], {"type": "dns"}, {"type": "dns", "value": 1},
                 {"type": "dns", "value": "a.test", "extra": 1}):  # fmt: skip
        refused("malformed", parse_identifiers, [item], 100)
    many = _ids(*(("dns", f"n{i}.example.test") for i in range(4)))
    refused("rejectedIdentifier", parse_identifiers, many, 3)
    assert len(parse_identifiers(many, 4)) == 4


def test_allowed_domains() -> None:
    patterns = ["*.allowed.test", "10.0.0.0/8"]
    check_allowed(
        [
            Identifier("dns", "x.allowed.test"),
            Identifier("dns", "a.b.allowed.test"),
            Identifier("dns", "*.x.allowed.test"),
            Identifier("ip", "10.1.2.3"),
        ],
        patterns,
    )
    problem = refused(
        "rejectedIdentifier",
        check_allowed,
        [
            Identifier("dns", "ok.allowed.test"),
            Identifier("dns", "allowed.test"),
            Identifier("dns", "xallowed.test"),
            Identifier("dns", "x.allowed.test.evil.test"),
            Identifier("ip", "11.0.0.1"),
        ],
        patterns,
    )
    assert [s["identifier"]["value"] for s in problem.extra["subproblems"]] == [
        "allowed.test",
        "xallowed.test",
        "x.allowed.test.evil.test",
        "11.0.0.1",
    ]


def test_check_csr_names() -> None:
    order = [Identifier("dns", "a.test.example"), Identifier("ip", "10.0.0.1")]
    names = RequestedNames(dns=("a.test.example",), ips=("10.0.0.1",))
    check_csr_names(order, names, None)
    check_csr_names(order, names, "A.Test.Example")
    check_csr_names(order, names, "10.0.0.1")
    extra = RequestedNames(dns=("a.test.example", "b.test.example"), ips=("10.0.0.1",))
    assert "b.test.example" in refused("badCSR", check_csr_names, order, extra, None).detail
    missing = RequestedNames(dns=("a.test.example",))
    assert "10.0.0.1" in refused("badCSR", check_csr_names, order, missing, None).detail
    refused("badCSR", check_csr_names, order, names, "other.test.example")
    uri = RequestedNames(dns=names.dns, ips=names.ips, uris=("spiffe://x/y",))
    refused("badCSR", check_csr_names, order, uri, None)
    wild = [Identifier("dns", "*.w.test.example")]
    check_csr_names(wild, RequestedNames(dns=("*.w.test.example",)), "*.w.test.example")
    refused("badCSR", check_csr_names, wild, RequestedNames(dns=("x.w.test.example",)), None)


# -- renewal information ----------------------------------------------------------------------

_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_LEAF_KEY = ec.generate_private_key(ec.SECP256R1())
_AKI = x509.AuthorityKeyIdentifier.from_issuer_public_key(_CA_KEY.public_key())
_NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _cert(serial: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ari.test")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_LEAF_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(_NOW)
        .not_valid_after(_NOW + dt.timedelta(days=1))
        .add_extension(_AKI, critical=False)
        .sign(_CA_KEY, hashes.SHA256())
    )


def _der_serial(serial: int) -> bytes:
    return serial.to_bytes((serial.bit_length() + 8) // 8, "big")


@pytest.mark.parametrize(
    "serial",
    [0x80, 0xFF, 0x8000, 0x80FF, 0xFF00_0001, 2**159 - 1, 2**158 + 0x80, 0x7F],
    ids=hex,
)
def test_cert_id_round_trip(serial: int) -> None:
    """Serials whose first octet has the high bit set get a leading zero octet in DER."""
    cert = _cert(serial)
    cid = renewal.cert_id(cert)
    assert cid == f"{b64u(_AKI.key_identifier or b'')}.{b64u(_der_serial(serial))}"
    assert renewal.parse_cert_id(cid) == (_AKI.key_identifier, serial_hex(serial))


@settings(max_examples=200, deadline=None)
@given(serial=st.integers(min_value=1, max_value=2**159 - 1))
@example(serial=0x0ABC)
def test_cert_id_round_trip_gives_the_stored_serial_form(serial: int) -> None:
    """parse_cert_id must give the serial as the store keys it (serial_hex: even length),
    or renewalInfo and ``replaces`` miss about one certificate in eight."""
    _, parsed = renewal.parse_cert_id(renewal.cert_id(_cert(serial)))
    assert parsed == serial_hex(serial)


@pytest.mark.parametrize(
    "text",
    [
        None,
        5,
        "",
        "abc",
        "a.b.c",
        ".AQ",
        "aw.",
        "aw=.AQ",
        "aw.AQ==",
        "aw.gA",  # a negative serial
        "aw." + "A" * 300,
    ],
)
def test_parse_cert_id_refuses_malformed_ids(text: object) -> None:
    refused("malformed", renewal.parse_cert_id, text)


@pytest.mark.parametrize("text", ["aw.AAE", "aw.AACr"], ids=["00-01", "00-00-ab"])
def test_parse_cert_id_refuses_a_non_der_serial(text: str) -> None:
    """RFC 9773 4.1: the serial is the DER INTEGER's content, which has no redundant
    leading zero octet; accepting one gives each certificate many ids."""
    refused("malformed", renewal.parse_cert_id, text)


def test_suggested_window_for_a_day_long_certificate() -> None:
    not_before = _NOW
    not_after = _NOW + dt.timedelta(hours=24)
    window = renewal.suggested_window(not_before, not_after, None, _NOW)
    assert not_before < window.start < window.end < not_after
    assert window.start - not_before == dt.timedelta(hours=16) - dt.timedelta(hours=1.2)
    assert window.end - not_before == dt.timedelta(hours=16) + dt.timedelta(hours=1.2)
    assert window.retry_after == 72 * 60
    doc = window.to_json()["suggestedWindow"]
    assert doc == {"start": "2030-01-01T14:48:00Z", "end": "2030-01-01T17:12:00Z"}


@pytest.mark.parametrize(
    ("lifetime", "retry"),
    [
        (dt.timedelta(minutes=10), 60),
        (dt.timedelta(hours=1), 180),
        (dt.timedelta(days=90), 6 * 3600),
    ],
)
def test_suggested_window_retry_after_is_bounded(lifetime: dt.timedelta, retry: int) -> None:
    window = renewal.suggested_window(_NOW, _NOW + lifetime, None, _NOW)
    assert window.retry_after == retry


def test_suggested_window_after_revocation_is_now() -> None:
    now = _NOW + dt.timedelta(hours=2)
    revoked_at = _NOW + dt.timedelta(hours=1)
    window = renewal.suggested_window(_NOW, _NOW + dt.timedelta(days=30), revoked_at, now)
    assert window.start <= revoked_at < now
    assert window.start < window.end
    assert window.retry_after <= 3600


@settings(max_examples=200, deadline=None)
@given(
    lifetime_s=st.integers(min_value=60, max_value=400 * 86400),
    elapsed=st.floats(min_value=0, max_value=1),
)
def test_suggested_window_lies_inside_the_validity(lifetime_s: int, elapsed: float) -> None:
    lifetime = dt.timedelta(seconds=lifetime_s)
    now = _NOW + lifetime * elapsed
    window = renewal.suggested_window(_NOW, _NOW + lifetime, None, now)
    assert _NOW < window.start < window.end <= _NOW + lifetime
    assert 0.55 <= (window.start - _NOW) / lifetime <= 0.7
    assert 60 <= window.retry_after <= 6 * 3600


# -- nonces -----------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(dt.datetime.now(dt.UTC).replace(microsecond=0))


@pytest.fixture
def nonces(pki: Pki, clock: FrozenClock) -> Nonces:
    return Nonces(os.urandom(32), pki.store.acme, clock)


def test_a_nonce_redeems_once(nonces: Nonces) -> None:
    minted = [nonces.mint() for _ in range(20)]
    assert len(set(minted)) == 20
    for nonce in minted:
        nonces.redeem(nonce)
    for nonce in minted[:3]:
        refused("badNonce", nonces.redeem, nonce)


def test_forged_nonces_are_refused(nonces: Nonces, pki: Pki, clock: FrozenClock) -> None:
    nonce = nonces.mint()
    raw = bytearray(base64.urlsafe_b64decode(nonce + "="))
    for index in (0, 8, len(raw) - 1):  # the time, the random part, the MAC
        forged = bytearray(raw)
        forged[index] ^= 0x01
        refused("badNonce", nonces.redeem, b64u(bytes(forged)))
    other_server = Nonces(os.urandom(32), pki.store.acme, clock)
    refused("badNonce", nonces.redeem, other_server.mint())
    for junk in ("", "abc", b64u(os.urandom(32)), b64u(bytes(raw[:-1])), "é", nonce + "AAAA"):
        refused("badNonce", nonces.redeem, junk)
    nonces.redeem(nonce)  # none of that used it up


def test_expired_and_future_nonces_are_refused(pki: Pki, clock: FrozenClock) -> None:
    key = os.urandom(32)
    nonces = Nonces(key, pki.store.acme, clock)
    old, fresh = nonces.mint(), nonces.mint()
    clock.advance(NONCE_LIFETIME - dt.timedelta(seconds=1))
    nonces.redeem(fresh)
    clock.advance(dt.timedelta(seconds=2))
    refused("badNonce", nonces.redeem, old)
    ahead = FrozenClock(clock.now() + dt.timedelta(minutes=10))
    refused("badNonce", nonces.redeem, Nonces(key, pki.store.acme, ahead).mint())
    slightly_ahead = FrozenClock(clock.now() + dt.timedelta(minutes=1))
    nonces.redeem(Nonces(key, pki.store.acme, slightly_ahead).mint())


def test_a_used_nonce_is_not_accepted_in_another_spelling(nonces: Nonces) -> None:
    """A nonce is one string; re-spelling a used one (other spare bits, skipped junk
    characters) must not make the server accept it a second time (RFC 8555 6.5)."""
    nonce = nonces.mint()
    nonces.redeem(nonce)
    spare = (len(nonce) * 6) % 8
    assert spare, "a nonce with no spare bits cannot be re-spelled this way"
    last = B64_ALPHABET.index(nonce[-1])
    respelled = [nonce[:-1] + B64_ALPHABET[last ^ bit] for bit in range(1, 1 << spare)]
    for variant in [*respelled, nonce + "!!!!", "!!!!" + nonce]:
        assert variant != nonce
        refused("badNonce", nonces.redeem, variant)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60) | st.binary(min_size=32, max_size=32).map(b64u))
def test_arbitrary_nonces_are_bad_nonces(nonces: Nonces, text: str) -> None:
    refused("badNonce", nonces.redeem, text)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("validation_timeout_seconds", 0.0, "validation_timeout_seconds"),
        ("validation_timeout_seconds", 120.0, "validation_timeout_seconds"),
        ("validation_wait_seconds", 60.0, "validation_wait_seconds"),
        ("dns_resolver", "not-an-ip", "dns_resolver"),
        ("http01_port", 0, "http01_port"),
        ("orders_per_hour", 0, "orders_per_hour"),
    ],
)
def test_bad_acme_settings_are_refused_when_the_config_loads(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    """A bad [acme] value stops `load_settings` with a message, not every request with a 500."""
    from pki.config import default_document, dump_toml, load_settings
    from pki.errors import ConfigError

    doc = default_document(tmp_path)
    doc["acme"][field] = value
    (tmp_path / "hsmca.toml").write_text(dump_toml(doc))
    with pytest.raises(ConfigError, match=message):
        load_settings(tmp_path)
