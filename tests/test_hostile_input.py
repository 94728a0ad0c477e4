"""Hostile input, in process (issue #8 item 4): every parser that faces the network,
driven by reproducible hypothesis properties on raw bytes and on structure-aware
mutants of valid inputs (flipped, truncated, spliced, nested, with inflated DER lengths).

The contract of each parser: it returns a parsed value or raises one of the project's
own refusals (an :class:`~pki.errors.HsmcaError`, an ACME problem with a 4xx status,
:class:`~pki.ocsp.MalformedRequest`, :class:`~ca_service.http1.BadRequest`) — never any
other exception, which the service would answer with a 500 or not at all — and it does
so quickly. The number of cases each parser ran is printed and recorded as figures.
The same inputs over real HTTP against ``hsmca serve`` are in test_hostile_http.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from flask import Flask, request
from hypothesis import strategies as st
from werkzeug.exceptions import RequestEntityTooLarge

from ca_service import create_app
from ca_service.api import ISSUE_FIELDS, REVOKE_FIELDS
from ca_service.devices_api import ENROLL_FIELDS
from ca_service.http1 import BadRequest, parse_head
from ca_service.validation import json_body, query_args
from pki.acme import jws
from pki.acme.accounts import _contacts
from pki.acme.identifiers import Identifier, check_csr_names, parse_identifiers
from pki.acme.problems import AcmeProblem
from pki.acme.renewal import parse_cert_id
from pki.config import PolicySettings, write_default_config
from pki.durations import parse_duration
from pki.errors import HsmcaError
from pki.est import challenge_password, decode_pkcs10
from pki.ocsp import MalformedRequest, decode_get_path, parse_request
from pki.ocsp_presigned import _parse as presigned_parse
from pki.policy import parse_csr
from tests.acme_helpers import AccountKey, b64u, csr_der
from tests.acme_helpers import jws as signed_jws
from tests.conftest import build_csr
from tests.figures import record
from tests.fuzz_helpers import (
    JSON_VALUES,
    Tally,
    b64,
    hostile_json,
    json_bytes,
    mutants,
    ocsp_request,
    run_property,
    self_signed_issuer,
)

POLICY = PolicySettings()
#: no single parse may take longer than this (a hang or a quadratic blow-up otherwise)
MAX_CALL_SECONDS = 2.0
URL = "https://127.0.0.1:8443/acme/new-order"
TOTALS: dict[str, int] = {}


def finish(part: str, tally: Tally, ran: int) -> None:
    """Check and record one parser's figures."""
    assert tally.total >= ran > 0
    assert tally.max_seconds < MAX_CALL_SECONDS, tally.max_seconds
    TOTALS[part] = ran
    record(
        f"hostile-input/{part}",
        cases=ran,
        max_ms=round(tally.max_seconds * 1000, 1),
        outcomes=dict(sorted(tally.outcomes.items())),
    )


@pytest.fixture(scope="module", autouse=True)
def _total() -> Iterator[None]:
    started = time.monotonic()
    yield
    record(
        "hostile-input/in-process",
        parsers=len(TOTALS),
        cases=sum(TOTALS.values()),
        seconds=round(time.monotonic() - started, 1),
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """The HTTPS app (settings only: the JSON validators need its body limit)."""
    home = tmp_path_factory.mktemp("hostile-app")
    write_default_config(home, {})
    return create_app(home)


CSR_PEM, _ = build_csr(cn="app.svc.test", sans=("app.svc.test", "10.0.0.1", "urn:x:y"))
CSR_DER = csr_der(["fuzz.svc.test", "127.0.0.1"])


def test_csr_parser_refuses_hostile_pem_and_der_with_bad_csr() -> None:
    """parse_csr (REST, ACME finalize, EST): PEM, DER and text in, BadCsr out."""
    tally = Tally()

    def check(data: bytes | str) -> None:
        tally.run(lambda: parse_csr(data, POLICY), (HsmcaError,))

    strategy = (
        mutants(CSR_PEM, CSR_DER, max_steps=3)
        | st.binary(max_size=2048)
        | st.text(st.characters(codec=None, exclude_categories=()), max_size=200)
        | mutants(CSR_PEM).map(lambda b: b.decode("latin-1"))
    )
    # a JSON string may hold a lone surrogate, which str.encode() refuses (was a 500)
    regressions = ["\ud800", "-----BEGIN CERTIFICATE REQUEST-----\udfff"]
    finish("csr", tally, run_property(check, strategy, 600, regressions))


def test_est_body_decoding_refuses_hostile_bodies_with_invalid_input() -> None:
    """decode_pkcs10 then parse_csr and the challengePassword, as simpleenroll does."""
    tally = Tally()
    base64_body = b64(CSR_DER)
    lines = b"\n".join(base64_body[i : i + 64] for i in range(0, len(base64_body), 64))

    def enrol(body: bytes) -> None:
        parsed = parse_csr(decode_pkcs10(body), POLICY, names_from_cn=False)
        challenge_password(parsed.csr)

    def check(body: bytes) -> None:
        tally.run(lambda: enrol(body), (HsmcaError,))

    strategy = mutants(lines, base64_body, CSR_PEM) | st.binary(max_size=1024)
    finish("est-body", tally, run_property(check, strategy, 500, [b"MA==", b"=" * 8]))


# -- ACME -----------------------------------------------------------------------------------

KEYS = {alg: AccountKey(alg) for alg in ("ES256", "EdDSA")}
HEADER_MEMBERS = ("alg", "nonce", "url", "jwk", "kid", "crit", "b64")
ALG_NAMES = ("ES256", "ES384", "RS256", "EdDSA", "HS256", "none", "PS256", "", "es256")
JWK_MEMBERS = ("kty", "crv", "x", "y", "n", "e", "d")


@st.composite
def jws_bodies(draw: st.DrawFn) -> bytes:
    """A flattened JWS whose protected header, key, payload or signature is hostile."""
    key = KEYS[draw(st.sampled_from(sorted(KEYS)))]
    header: dict[str, object] = {"alg": key.alg, "nonce": "bm9uY2U", "url": URL}
    header["jwk"] = jwk = dict(key.jwk())
    for name in draw(st.lists(st.sampled_from(HEADER_MEMBERS), max_size=3)):
        value = draw(st.sampled_from(ALG_NAMES) | JSON_VALUES | st.just(None))
        if value is None:
            header.pop(name, None)
        else:
            header[name] = value
    for name in draw(st.lists(st.sampled_from(JWK_MEMBERS), max_size=2)):
        big = b64u(draw(st.binary(min_size=1, max_size=300)))
        jwk[name] = draw(st.just(big) | JSON_VALUES | st.sampled_from(("RSA", "EC", "OKP")))
    payload = draw(st.just(b"") | JSON_VALUES.map(json_bytes) | st.binary(max_size=64))
    p64, body64 = b64u(json.dumps(header).encode()), b64u(payload)
    signature = key.sign(f"{p64}.{body64}".encode())
    outer: dict[str, object] = {"protected": p64, "payload": body64, "signature": b64u(signature)}
    for name in draw(st.lists(st.sampled_from(("protected", "payload", "signature", "x")))):
        outer[name] = draw(JSON_VALUES | st.text(alphabet="AQ_-=+/.", max_size=9))
    return json.dumps(outer).encode()


def _verify_jws(body: bytes) -> None:
    """What Acme.authenticate does before it needs the database: parse, parse the key,
    verify the signature; then the payload as an object."""
    signed = jws.parse(body)
    if signed.jwk is not None:
        jws.verify(signed, jws.account_key(signed.jwk))
    if signed.payload:
        jws.payload_object(signed.payload)


def test_acme_jws_parsing_refuses_hostile_requests_with_4xx_problems() -> None:
    """jws.parse, account_key, verify and payload_object: malformed, badPublicKey,
    badSignatureAlgorithm ... all 4xx; nothing else escapes."""
    tally = Tally()
    valid = [
        json.dumps(signed_jws(key, URL, {"a": 1}, nonce="bm9uY2U")).encode()
        for key in (KEYS["ES256"], AccountKey("RS256"))
    ]

    def check(body: bytes) -> None:
        try:
            _verify_jws(body)
        except AcmeProblem as exc:
            assert 400 <= exc.status < 500 and exc.document()["type"].startswith("urn:ietf")
            tally.outcomes[exc.kind] = tally.outcomes.get(exc.kind, 0) + 1
            return
        tally.outcomes["ok"] = tally.outcomes.get("ok", 0) + 1

    def timed(body: bytes) -> None:
        started = time.perf_counter()
        check(body)
        tally.max_seconds = max(tally.max_seconds, time.perf_counter() - started)

    strategy = jws_bodies() | mutants(*valid) | st.binary(max_size=512)
    deep = b'{"protected": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    finish("acme-jws", tally, run_property(timed, strategy, 500, [deep, b"\xff"]))


IDENTIFIER = st.fixed_dictionaries(
    {"type": st.sampled_from(("dns", "ip", "DNS", "email")) | JSON_VALUES},
    optional={"value": JSON_VALUES | st.text(max_size=80), "extra": JSON_VALUES},
)


def test_acme_payload_parsers_refuse_hostile_payloads_with_4xx_problems() -> None:
    """newOrder identifiers, account contacts, ARI certificate ids and the finalize CSR
    (base64url DER, parsed and matched against the order)."""
    tally = Tally()
    order = [Identifier("dns", "fuzz.svc.test"), Identifier("ip", "127.0.0.1")]
    finalize_csr = b64u(CSR_DER)

    def finalize(text: object) -> None:
        try:
            parsed = parse_csr(jws.b64u_decode(text, "csr"), POLICY)
        except HsmcaError as exc:  # the view's translation: badCSR
            raise AcmeProblem("badCSR", str(exc)) from None
        check_csr_names(order, parsed.names, parsed.common_name)

    def check(case: tuple[str, object]) -> None:
        what, value = case
        fn = {
            "identifiers": lambda: parse_identifiers(value, 100),
            "contact": lambda: _contacts(value),
            "cert-id": lambda: parse_cert_id(value),
            "finalize": lambda: finalize(value),
        }[what]
        tally.run(fn, (AcmeProblem,))

    strategy = st.one_of(
        st.tuples(st.just("identifiers"), st.lists(IDENTIFIER, max_size=4) | JSON_VALUES),
        st.tuples(
            st.just("contact"),
            st.lists(st.text(max_size=40).map(lambda t: "mailto:" + t), max_size=3) | JSON_VALUES,
        ),
        st.tuples(st.just("cert-id"), st.text(alphabet="AQgw_-.=", max_size=40) | JSON_VALUES),
        st.tuples(
            st.just("finalize"),
            mutants(finalize_csr.encode()).map(lambda b: b.decode("latin-1")) | JSON_VALUES,
        ),
    )
    finish("acme-payloads", tally, run_property(check, strategy, 600))


# -- OCSP and the plain-HTTP front end --------------------------------------------------------

ISSUER = self_signed_issuer()
OCSP_DER = ocsp_request(ISSUER, 0x1234567890ABCDEF)
OCSP_PLAIN = ocsp_request(ISSUER, 7, nonce=False)


def test_ocsp_request_parsers_refuse_hostile_requests_as_malformed() -> None:
    """parse_request (full path) raises MalformedRequest, the front end's pre-signed
    look-up returns None (forward), the GET path decoder raises MalformedRequest."""
    tally = Tally()

    def check(der: bytes) -> None:
        tally.run(lambda: parse_request(der), (MalformedRequest,))
        found = presigned_parse(der)  # never raises: garbage is forwarded
        assert found is None or isinstance(found, tuple)
        text = quote(b64(der[:600]).decode(), safe="") if len(der) % 2 else b64u(der[:600])
        tally.run(lambda: decode_get_path(text), (MalformedRequest,))

    strategy = mutants(OCSP_DER, OCSP_PLAIN) | st.binary(max_size=512)
    finish("ocsp-request", tally, run_property(check, strategy, 500, [b"\x30\x80" * 4000]))

    paths = Tally()
    path_strategy = st.text(max_size=120) | st.text(alphabet="%0aAzZ+/-_= \x00", max_size=60)
    ran = run_property(
        lambda text: paths.run(lambda: decode_get_path(text), (MalformedRequest,)),
        path_strategy,
        300,
    )
    finish("ocsp-get-path", paths, ran)


HEAD = (
    b"POST /ocsp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
    b"Content-Length: 83\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n\r\n"
)


def test_front_end_request_head_parser_refuses_hostile_heads_with_bad_request() -> None:
    """parse_head of the OCSP front end: a head, None (incomplete) or BadRequest."""
    tally = Tally()

    def check(data: bytes) -> None:
        tally.run(lambda: parse_head(bytearray(data)), (BadRequest,))

    strategy = mutants(HEAD, HEAD.replace(b"POST /ocsp", b"GET /ocsp/MA%3D%3D")) | st.binary()
    # a Content-Length of more than 4300 digits made int() raise ValueError: the front
    # end's read callback died and the client waited for the deadline (a hang)
    huge = HEAD.replace(b"83", b"1" * 5000)
    finish("http1-head", tally, run_property(check, strategy, 700, [huge]))


# -- JSON API bodies and query strings ---------------------------------------------------------

ISSUE = json.dumps({"csr": CSR_PEM.decode(), "profile": "mtls-server", "ttl": "24h"}).encode()
FIELD_SETS = {"issue": ISSUE_FIELDS, "revoke": REVOKE_FIELDS, "enroll": ENROLL_FIELDS}


@st.composite
def json_documents(draw: st.DrawFn) -> bytes:
    """The issue body with some fields replaced, dropped or added with hostile values."""
    doc: dict[str, object] = {"csr": CSR_PEM.decode(), "profile": "mtls-server", "ttl": "24h"}
    names = ("csr", "profile", "ttl", "device_id", "reason", "extra")
    for name in draw(st.lists(st.sampled_from(names), max_size=3)):
        doc[name] = draw(JSON_VALUES | st.sampled_from(("", "24h", "0s", "999999999d")))
    if draw(st.booleans()):
        doc.pop(draw(st.sampled_from(names)), None)
    return json_bytes(doc)


def test_json_api_body_validation_refuses_hostile_bodies_with_problems(app: Flask) -> None:
    """json_body (+ parse_duration of a ttl) for the issue, revoke and enrol bodies:
    a validated dict or an ApiError/BadDuration (4xx problem), nothing else."""
    tally = Tally()
    content_types = ("application/json", "application/problem+json", "text/plain", "")

    def validate(body: bytes, fields: str, content_type: str) -> None:
        with app.test_request_context(
            "/api/v1/certificates", method="POST", data=body, content_type=content_type
        ):
            data = json_body(request, FIELD_SETS[fields], optional=fields == "revoke")
            if data.get("ttl"):
                parse_duration(data["ttl"])

    def check(case: tuple[bytes, str, str]) -> None:
        # a body over the limit: werkzeug's 413, which the app answers as a problem
        tally.run(lambda: validate(*case), (HsmcaError, RequestEntityTooLarge))

    bodies = json_documents() | mutants(ISSUE) | st.sampled_from(hostile_json(65536))
    strategy = st.tuples(
        bodies, st.sampled_from(sorted(FIELD_SETS)), st.sampled_from(content_types)
    )
    finish("json-body", tally, run_property(check, strategy, 600))

    queries = Tally()

    def query(text: str) -> None:
        with app.test_request_context("/api/v1/certificates?" + text):
            args, _limit = query_args(request, ("status", "expiring_within", "profile", "cursor"))
            if args.get("expiring_within"):
                parse_duration(args["expiring_within"])

    names = st.sampled_from(("status", "limit", "cursor", "expiring_within", "profile", "x"))
    pair = st.tuples(names, st.text(max_size=30) | st.integers().map(str))
    strategy_q = st.lists(pair, max_size=4).map(
        lambda pairs: "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in pairs)
    )
    ran = run_property(
        lambda text: queries.run(lambda: query(text), (HsmcaError,)), strategy_q, 300
    )
    finish("query-string", queries, ran)


def test_property_runner_counts_and_fails_on_an_escaping_exception() -> None:
    """The harness itself: an exception outside the contract fails the property."""
    calls: list[bytes] = []

    def check(data: bytes) -> None:
        calls.append(data)
        if len(data) > 3:
            raise KeyError("escaped")

    with pytest.raises(KeyError):
        run_property(check, st.binary(max_size=8), 50)
    assert run_property(lambda _: None, st.binary(), 25) == 25
    assert calls
