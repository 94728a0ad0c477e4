"""RFC 8555 (and RFC 9773) protocol behaviour of the ACME server, over real HTTPS.

Every request is a signed JWS sent to a real ``hsmca serve`` (``acme_service``, one per
xdist worker); http-01 targets are served by an :class:`Http01Responder` on the VA's
port (one at a time per worker, so each test starts and stops its own), DNS answers come
from pebble-challtestsrv. Refusals are checked for status, problem type, a fresh
Replay-Nonce and the ``index`` link, and for changing nothing: the ACME tables and the
certificates table are read (read-only) before and after.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki.validation import dns01_txt_value
from tests.acme_helpers import (
    ERR,
    JOSE,
    AccountKey,
    AcmeClient,
    AcmeService,
    ChallTestSrv,
    Http01Responder,
    b64u,
    csr_der,
    jws,
    poll,
)
from tests.conftest import initialise

PROBLEM = "application/problem+json"
PEM_CHAIN = "application/pem-certificate-chain"
TIMEOUT = 30
FAR = "2099-01-01T00:00:00Z"
#: the tables whose rows a refused request must leave as they were
STATE_TABLES = (
    "acme_accounts",
    "acme_orders",
    "acme_authorizations",
    "acme_challenges",
    "certificates",
)


# -- helpers ----------------------------------------------------------------------------------


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid4().hex[:8]}.acme.test"


def db_rows(service: AcmeService, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Rows of a query on the service's SQLite database, opened read-only."""
    uri = f"file:{service.home / 'hsmca.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as con:
        return con.execute(sql, params).fetchall()


def snapshot(service: AcmeService) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a refusal must not change."""
    return {t: db_rows(service, f"SELECT * FROM {t} ORDER BY 1") for t in STATE_TABLES}


@contextmanager
def unchanged(service: AcmeService) -> Iterator[None]:
    """Assert that the block changes no account, order, authorization, challenge or cert."""
    before = snapshot(service)
    yield
    after = snapshot(service)
    changed = [t for t in STATE_TABLES if before[t] != after[t]]
    assert not changed, f"a refused request changed {changed}"


@contextmanager
def http01(service: AcmeService) -> Iterator[Http01Responder]:
    """An http-01 responder on the VA's port for the duration of the block."""
    responder = Http01Responder(service.http01_port)
    try:
        yield responder
    finally:
        responder.stop()


def check_headers(resp: requests.Response, client: AcmeClient) -> None:
    """Replay-Nonce and the directory ``index`` link are on every ACME response."""
    assert resp.headers.get("Replay-Nonce"), resp.headers
    index = f"{client.service.base}/acme/directory"
    assert resp.links.get("index", {}).get("url") == index, resp.headers.get("Link")


def problem(
    resp: requests.Response,
    client: AcmeClient,
    status: int,
    kind: str,
    sent_nonce: str | None = None,
) -> dict[str, Any]:
    """Assert ``resp`` is an RFC 7807 problem of ``kind`` with a fresh nonce; its body."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers.get("Content-Type", "").split(";")[0].strip() == PROBLEM, resp.headers
    body = resp.json()
    assert body.get("type") == ERR + kind, body
    assert body.get("status", status) == status, body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    check_headers(resp, client)
    if sent_nonce is not None:
        assert resp.headers["Replay-Nonce"] != sent_nonce
    return body


def send(
    client: AcmeClient, url: str, body: dict[str, str] | str, content_type: str = JOSE
) -> requests.Response:
    """POST a prepared body as is; the response's nonce becomes the client's next one."""
    data = body if isinstance(body, str) else json.dumps(body)
    resp = client.http.post(url, data=data, headers={"Content-Type": content_type}, timeout=30)
    client._nonce = resp.headers.get("Replay-Nonce")
    return resp


def registered(service: AcmeService, alg: str = "ES256", **fields: Any) -> AcmeClient:
    client = AcmeClient(service, AccountKey(alg))
    resp = client.register(**fields)
    assert resp.status_code == 201, resp.text
    return client


def still_works(client: AcmeClient) -> None:
    """A normal request (with the nonce of the last response) still succeeds."""
    assert client.kid is not None
    resp = client.post(client.kid)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "valid"


def order_count(service: AcmeService, client: AcmeClient) -> int:
    assert client.kid is not None
    account_id = int(client.kid.rsplit("/", 1)[-1])
    rows = db_rows(service, "SELECT count(*) FROM acme_orders WHERE account_id = ?", account_id)
    return int(rows[0][0])


def cert_row(service: AcmeService, cert: x509.Certificate) -> tuple[str, str | None]:
    """(status, revocation reason) of a certificate in the CA's database."""
    serial = format(cert.serial_number, "x")
    serial = serial if len(serial) % 2 == 0 else "0" + serial
    rows = db_rows(
        service, "SELECT status, revocation_reason FROM certificates WHERE serial = ?", serial
    )
    assert len(rows) == 1, (serial, rows)
    return rows[0][0], rows[0][1]


def ari_cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 4.1: base64url(AKI keyIdentifier) "." base64url(DER serial content)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    serial = cert.serial_number
    return f"{b64u(aki.key_identifier)}.{b64u(serial.to_bytes((serial.bit_length() + 8) // 8))}"


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def authorize(client: AcmeClient, order: dict[str, Any], responder: Http01Responder) -> None:
    """Complete every authorization of ``order`` with http-01."""
    for url in order["authorizations"]:
        authz = client.post(url).json()
        chall = next(c for c in authz["challenges"] if c["type"] == "http-01")
        responder.tokens[chall["token"]] = client.key_authorization(chall["token"])
        resp = client.post(chall["url"], {})
        assert resp.status_code == 200, resp.text
        done = poll(lambda u=url: client.post(u).json(), lambda a: a["status"] != "pending")
        assert done["status"] == "valid", done


@dataclass
class Issued:
    order_url: str
    order: dict[str, Any]
    chain_pem: bytes
    leaf: x509.Certificate
    key: AccountKey


def ready_order(
    client: AcmeClient, names: list[str], responder: Http01Responder, **fields: Any
) -> tuple[str, dict[str, Any]]:
    created = client.new_order(*names, **fields)
    assert created.status_code == 201, created.text
    authorize(client, created.json(), responder)
    url = created.headers["Location"]
    order = client.post(url).json()
    assert order["status"] == "ready", order
    return url, order


def csr_b64(names: list[str], key: Any = None, common_name: str | None = None) -> str:
    return b64u(csr_der(names, key=key, common_name=common_name))


def issue(
    client: AcmeClient,
    names: list[str],
    responder: Http01Responder | None = None,
    **fields: Any,
) -> Issued:
    """Order, validate (http-01), finalize and download a certificate for ``names``."""
    if responder is None:
        with http01(client.service) as own:  # type: ignore[arg-type]
            return issue(client, names, own, **fields)
    url, order = ready_order(client, names, responder, **fields)
    cert_key = AccountKey("ES256")
    final = client.post(order["finalize"], {"csr": csr_b64(names, cert_key.key)})
    assert final.status_code == 200, final.text
    order = poll(lambda: client.post(url).json(), lambda o: o["status"] not in ("processing",))
    assert order["status"] == "valid", order
    pem = client.post(order["certificate"])
    assert pem.status_code == 200, pem.text
    chain = x509.load_pem_x509_certificates(pem.content)
    return Issued(url, order, pem.content, chain[0], cert_key)


def issue_until(client: AcmeClient, wanted: Any, what: str, attempts: int = 60) -> Issued:
    """Issue certificates until one satisfies ``wanted(leaf)`` (random serials)."""
    with http01(client.service) as responder:  # type: ignore[arg-type]
        for _ in range(attempts):
            got = issue(client, [unique_name("ari")], responder)
            if wanted(got.leaf):
                return got
    raise AssertionError(f"no certificate with {what} in {attempts} issuances")


def odd_hex_serial(cert: x509.Certificate) -> bool:
    return len(format(cert.serial_number, "x")) % 2 == 1


# -- the restricted second service ------------------------------------------------------------


@pytest.fixture(scope="module")
def restricted_service(
    tmp_path_factory: pytest.TempPathFactory, challtestsrv: ChallTestSrv
) -> Iterator[AcmeService]:
    """A service that only allows ``*.allowed.test`` and three orders per account-hour."""
    home = tmp_path_factory.mktemp("acme-restricted")
    initialise(home, "Org")
    running = AcmeService(home, challtestsrv, allowed_domains=["*.allowed.test"], orders_per_hour=3)
    yield running
    assert running.stop() == 0, running.log.read_text()[-2000:]


# -- directory and nonces ---------------------------------------------------------------------


def test_directory_lists_resources_and_meta(acme_service: AcmeService) -> None:
    client = AcmeClient(acme_service)
    resp = client.http.get(f"{acme_service.base}/acme/directory", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    check_headers(resp, client)
    directory = resp.json()
    base = f"{acme_service.base}/acme/"
    for resource in ("newNonce", "newAccount", "newOrder", "revokeCert", "keyChange"):
        assert directory[resource].startswith(base), (resource, directory)
    assert directory["renewalInfo"].startswith(base)
    assert len({directory[r] for r in directory if r != "meta"}) == 6
    meta = directory["meta"]
    assert meta["externalAccountRequired"] is False
    assert "mtls-server" in meta["profiles"]
    terms = client.http.get(meta["termsOfService"], timeout=TIMEOUT)
    assert terms.status_code == 200 and terms.text.strip()

    for method, status in (("HEAD", 200), ("GET", 204)):
        nonce = client.http.request(method, directory["newNonce"], timeout=TIMEOUT)
        assert nonce.status_code == status, method
        assert nonce.headers.get("Replay-Nonce"), method
        assert "no-store" in nonce.headers.get("Cache-Control", ""), method
        check_headers(nonce, client)


def test_every_response_carries_a_distinct_nonce(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    seen = set()
    for _ in range(5):
        resp = client.post(client.kid or "")
        assert resp.status_code == 200
        check_headers(resp, client)
        seen.add(resp.headers["Replay-Nonce"])
    assert len(seen) == 5


@pytest.mark.parametrize("case", ["reused", "made-up", "missing"])
def test_bad_nonce_is_refused_and_its_replacement_works(
    acme_service: AcmeService, case: str
) -> None:
    client = registered(acme_service)
    url = client.directory["newOrder"]
    payload = {"identifiers": [{"type": "dns", "value": unique_name()}]}
    if case == "reused":
        used = client.nonce()
        assert client.post(client.kid or "", nonce=used).status_code == 200
        nonce: str | None = used
    elif case == "made-up":
        nonce = b64u(os.urandom(32))
    else:
        nonce = None
    body = jws(client.key, url, payload, nonce=nonce, kid=client.kid)
    with unchanged(acme_service):
        resp = send(client, url, body)
        problem(resp, client, 400, "badNonce", nonce)
    fresh = resp.headers["Replay-Nonce"]
    again = client.post(url, payload, nonce=fresh)
    assert again.status_code == 201, again.text


def _other_encodings(nonce: str) -> list[str]:
    """Strings that decode (leniently) to the same bytes as ``nonce`` but differ from it."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare_bits = (len(nonce) * 6) % 8  # low bits of the last character that carry no data
    variants = []
    if spare_bits:
        last = alphabet.index(nonce[-1])
        variants.append(nonce[:-1] + alphabet[last ^ ((1 << spare_bits) - 1)])
    variants.append(nonce + "!!!!")  # non-alphabet characters a lenient decoder skips
    return variants


def test_replayed_nonce_in_another_encoding_is_refused(acme_service: AcmeService) -> None:
    """RFC 8555 6.5: a nonce that was used is invalid. Re-encoding it must not revive it."""
    client = registered(acme_service)
    used = client.nonce()
    assert client.post(client.kid or "", nonce=used).status_code == 200
    url = client.directory["newOrder"]
    outcomes = {}
    for variant in _other_encodings(used):
        payload = {"identifiers": [{"type": "dns", "value": unique_name("replay")}]}
        before = snapshot(acme_service)
        resp = send(client, url, jws(client.key, url, payload, nonce=variant, kid=client.kid))
        outcomes[variant] = (resp.status_code, resp.json().get("type"))
        assert snapshot(acme_service) == before or resp.status_code != 400
    assert all(o == (400, ERR + "badNonce") for o in outcomes.values()), (used, outcomes)
    still_works(client)


# -- JWS checks -------------------------------------------------------------------------------


def test_wrong_url_in_protected_header_is_unauthorized(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    payload = {"identifiers": [{"type": "dns", "value": unique_name()}]}
    with unchanged(acme_service):
        resp = client.post(
            client.directory["newOrder"], payload, signed_url=client.directory["newAccount"]
        )
        problem(resp, client, 403, "unauthorized")
    still_works(client)


def test_bad_signature_is_malformed(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    url = client.directory["newOrder"]
    payload = {"identifiers": [{"type": "dns", "value": unique_name()}]}
    body = jws(client.key, url, payload, nonce=client.nonce(), kid=client.kid)
    signature = bytearray(base64.urlsafe_b64decode(body["signature"] + "=="))
    signature[len(signature) // 2] ^= 0x01
    body["signature"] = b64u(bytes(signature))
    with unchanged(acme_service):
        problem(send(client, url, body), client, 400, "malformed")
    still_works(client)


@pytest.mark.parametrize("alg", ["HS256", "none", "RS512"])
def test_unsupported_algorithm_is_refused(acme_service: AcmeService, alg: str) -> None:
    client = registered(acme_service)
    payload = {"identifiers": [{"type": "dns", "value": unique_name()}]}
    with unchanged(acme_service):
        resp = client.post(client.directory["newOrder"], payload, alg=alg)
        body = problem(resp, client, 400, "badSignatureAlgorithm")
    assert isinstance(body.get("algorithms"), list)
    assert {"ES256", "RS256"} <= set(body["algorithms"]), body
    assert alg not in body["algorithms"]
    still_works(client)


def test_signature_with_an_algorithm_the_key_does_not_have_is_refused(
    acme_service: AcmeService,
) -> None:
    client = registered(acme_service)  # an ES256 key
    with unchanged(acme_service):
        resp = client.post(
            client.directory["newOrder"],
            {"identifiers": [{"type": "dns", "value": unique_name()}]},
            alg="ES384",
        )
        problem(resp, client, 400, "malformed")
    still_works(client)


def test_kid_of_unknown_account_is_account_does_not_exist(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    with unchanged(acme_service):
        client.kid = f"{acme_service.base}/acme/acct/987654321"
        resp = client.post(
            client.directory["newOrder"],
            {"identifiers": [{"type": "dns", "value": unique_name()}]},
        )
        problem(resp, client, 400, "accountDoesNotExist")


def test_jwk_where_kid_is_required_is_malformed(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    payload = {"identifiers": [{"type": "dns", "value": unique_name()}]}
    with unchanged(acme_service):
        resp = client.post(client.directory["newOrder"], payload, use_jwk=True)
        problem(resp, client, 400, "malformed")
    still_works(client)


def test_jwk_and_kid_together_is_malformed(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    payload = {"identifiers": [{"type": "dns", "value": unique_name()}]}
    with unchanged(acme_service):
        resp = client.post(
            client.directory["newOrder"], payload, extra_header={"jwk": client.key.jwk()}
        )
        problem(resp, client, 400, "malformed")
    still_works(client)


def test_content_type_must_be_jose_json(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    url = client.directory["newOrder"]
    payload = {"identifiers": [{"type": "dns", "value": unique_name()}]}
    body = jws(client.key, url, payload, nonce=client.nonce(), kid=client.kid)
    with unchanged(acme_service):
        resp = send(client, url, body, content_type="application/json")
        problem(resp, client, 415, "malformed")
    still_works(client)


@pytest.mark.parametrize(
    "jwk",
    [{"kty": "EC", "crv": "P-256"}, {"kty": "RSA"}, {"kty": "RSA", "n": 5, "e": "AQAB"}],
    ids=["ec-without-x-y", "rsa-without-n-e", "rsa-n-not-a-string"],
)
def test_incomplete_jwk_is_a_client_error(acme_service: AcmeService, jwk: dict[str, Any]) -> None:
    """A jwk missing members is the client's fault (badPublicKey or malformed), not a 500."""
    client = AcmeClient(acme_service)
    url = client.directory["newAccount"]
    body = jws(
        client.key,
        url,
        {"termsOfServiceAgreed": True},
        nonce=client.nonce(),
        extra_header={"jwk": jwk},
    )
    with unchanged(acme_service):
        resp = send(client, url, body)
        assert resp.status_code == 400, (resp.status_code, resp.text)
        assert resp.json()["type"] in (ERR + "badPublicKey", ERR + "malformed"), resp.text
        check_headers(resp, client)
    assert client.register().status_code == 201


# -- accounts ---------------------------------------------------------------------------------


def test_new_account_then_same_key_returns_it(acme_service: AcmeService) -> None:
    client = AcmeClient(acme_service)
    created = client.register(contact=["mailto:ops@example.com"])
    assert created.status_code == 201, created.text
    check_headers(created, client)
    location = created.headers["Location"]
    assert location.startswith(f"{acme_service.base}/acme/acct/")
    body = created.json()
    assert body["status"] == "valid"
    assert body["contact"] == ["mailto:ops@example.com"]
    assert body["orders"].startswith(location)
    with unchanged(acme_service):
        again = client.register()
        assert again.status_code == 200, again.text
        assert again.headers["Location"] == location
        existing = client.post(
            client.directory["newAccount"], {"onlyReturnExisting": True}, use_jwk=True
        )
        assert existing.status_code == 200, existing.text
        assert existing.headers["Location"] == location


def test_only_return_existing_with_unknown_key(acme_service: AcmeService) -> None:
    client = AcmeClient(acme_service)
    with unchanged(acme_service):
        resp = client.post(
            client.directory["newAccount"], {"onlyReturnExisting": True}, use_jwk=True
        )
        problem(resp, client, 400, "accountDoesNotExist")
    assert client.register().status_code == 201


def test_non_mailto_contact_is_unsupported(acme_service: AcmeService) -> None:
    client = AcmeClient(acme_service)
    with unchanged(acme_service):
        resp = client.register(contact=["tel:+15555550100"])
        problem(resp, client, 400, "unsupportedContact")
    assert client.register(contact=["mailto:a@example.com"]).status_code == 201
    with unchanged(acme_service):
        resp = client.post(client.kid or "", {"contact": ["https://example.com/"]})
        problem(resp, client, 400, "unsupportedContact")
    still_works(client)


def test_contact_update(acme_service: AcmeService) -> None:
    client = registered(acme_service, contact=["mailto:old@example.com"])
    resp = client.post(client.kid or "", {"contact": ["mailto:new@example.com"]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["contact"] == ["mailto:new@example.com"]
    read = client.post(client.kid or "")
    assert read.json()["contact"] == ["mailto:new@example.com"]


def test_deactivated_account_is_refused(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    resp = client.post(client.kid or "", {"status": "deactivated"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "deactivated"
    with unchanged(acme_service):
        refused = client.new_order(unique_name())
        problem(refused, client, 403, "unauthorized")
        problem(client.post(client.kid or ""), client, 403, "unauthorized")
        problem(client.register(), client, 403, "unauthorized")
    assert registered(acme_service).new_order(unique_name()).status_code == 201


def test_deactivated_account_cannot_revoke_by_signing_with_its_jwk(
    acme_service: AcmeService,
) -> None:
    """RFC 8555 7.3.6: no request authorised by a deactivated account's key is accepted,
    including revokeCert sent with the account key as ``jwk`` instead of ``kid``."""
    client = registered(acme_service)
    issued = issue(client, [unique_name()])
    der = issued.leaf.public_bytes(serialization.Encoding.DER)
    assert client.post(client.kid or "", {"status": "deactivated"}).status_code == 200
    with unchanged(acme_service):
        resp = client.post(client.directory["revokeCert"], {"certificate": b64u(der)}, use_jwk=True)
        problem(resp, client, 403, "unauthorized")
    assert cert_row(acme_service, issued.leaf) == ("good", None)


@pytest.mark.parametrize("alg", ["EdDSA", "ES384", "RS256"])
def test_account_key_types_work_end_to_end(acme_service: AcmeService, alg: str) -> None:
    client = registered(acme_service, alg)
    name = unique_name(alg.lower())
    with http01(acme_service) as responder:
        url, order = ready_order(client, [name], responder)  # the key authorization uses
    # the server's thumbprint of this key: validation passing shows both sides agree
    final = client.post(order["finalize"], {"csr": csr_b64([name])})
    assert final.status_code == 200, final.text
    assert client.post(url).json()["status"] == "valid"


def test_key_change_rolls_the_account_over(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    old, new = client.key, AccountKey("EdDSA")
    url = client.directory["keyChange"]
    inner = jws(new, url, {"account": client.kid, "oldKey": old.jwk()}, nonce=None)
    resp = client.post(url, inner)
    assert resp.status_code == 200, resp.text
    check_headers(resp, client)

    client.key = new
    assert client.post(client.kid or "").status_code == 200
    order = client.new_order(unique_name())
    assert order.status_code == 201, order.text
    with unchanged(acme_service):
        problem(client.post(client.kid or "", key=old), client, 400, "malformed")
        gone = client.post(
            client.directory["newAccount"], {"onlyReturnExisting": True}, use_jwk=True, key=old
        )
        problem(gone, client, 400, "accountDoesNotExist")
    found = client.post(client.directory["newAccount"], {"onlyReturnExisting": True}, use_jwk=True)
    assert found.status_code == 200 and found.headers["Location"] == client.kid


def test_key_change_to_a_key_with_an_account_is_a_conflict(acme_service: AcmeService) -> None:
    first, second = registered(acme_service), registered(acme_service)
    url = first.directory["keyChange"]
    inner = jws(second.key, url, {"account": first.kid, "oldKey": first.key.jwk()}, nonce=None)
    with unchanged(acme_service):
        resp = first.post(url, inner)
        assert resp.status_code == 409, resp.text
        assert resp.headers["Content-Type"].startswith(PROBLEM)
        assert resp.headers["Location"] == second.kid
        check_headers(resp, first)
    still_works(first)
    still_works(second)


def test_key_change_with_a_non_string_inner_alg_is_a_client_error(
    acme_service: AcmeService,
) -> None:
    client = registered(acme_service)
    url = client.directory["keyChange"]
    new = AccountKey()
    inner = jws(
        new,
        url,
        {"account": client.kid, "oldKey": client.key.jwk()},
        nonce=None,
        extra_header={"alg": 5},
    )
    with unchanged(acme_service):
        resp = client.post(url, inner)
        assert resp.status_code == 400, (resp.status_code, resp.text)
        assert resp.json()["type"] in (ERR + "malformed", ERR + "badSignatureAlgorithm")
    still_works(client)


# -- orders -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"identifiers": []}, "malformed"),
        ({}, "malformed"),
        ({"identifiers": [{"type": "email", "value": "a@example.com"}]}, "unsupportedIdentifier"),
        ({"identifiers": [{"type": "dns", "value": "bad name.acme.test"}]}, "rejectedIdentifier"),
        ({"identifiers": [{"type": "dns"}]}, "malformed"),
        ({"identifiers": [{"type": "dns", "value": "x.acme.test"}], "notAfter": FAR}, "malformed"),
    ],
    ids=["empty", "absent", "email", "space", "no-value", "notAfter"],
)
def test_malformed_new_order_is_refused(
    acme_service: AcmeService, payload: dict[str, Any], kind: str
) -> None:
    client = registered(acme_service)
    with unchanged(acme_service):
        body = problem(client.post(client.directory["newOrder"], payload), client, 400, kind)
    if kind == "unsupportedIdentifier":
        assert [s["identifier"]["type"] for s in body["subproblems"]] == ["email"]
        assert body["subproblems"][0]["type"] == ERR + "unsupportedIdentifier"
    still_works(client)


def test_wildcard_order_offers_only_dns01_and_issues(
    acme_service: AcmeService, challtestsrv: ChallTestSrv
) -> None:
    client = registered(acme_service)
    base = unique_name("wild")
    created = client.new_order(f"*.{base}")
    assert created.status_code == 201, created.text
    order = created.json()
    assert order["identifiers"] == [{"type": "dns", "value": f"*.{base}"}]
    authz_url = order["authorizations"][0]
    authz = client.post(authz_url).json()
    assert authz["identifier"] == {"type": "dns", "value": base}
    assert authz.get("wildcard") is True
    assert [c["type"] for c in authz["challenges"]] == ["dns-01"]
    chall = authz["challenges"][0]
    record = f"_acme-challenge.{base}"
    challtestsrv.set_txt(record, dns01_txt_value(client.key_authorization(chall["token"])))
    try:
        assert client.post(chall["url"], {}).status_code == 200
        done = poll(lambda: client.post(authz_url).json(), lambda a: a["status"] != "pending")
    finally:
        challtestsrv.clear_txt(record)
    assert done["status"] == "valid", done
    final = client.post(order["finalize"], {"csr": csr_b64([f"*.{base}"])})
    assert final.status_code == 200, final.text
    state = client.post(created.headers["Location"]).json()
    assert state["status"] == "valid", state
    leaf = x509.load_pem_x509_certificates(client.post(state["certificate"]).content)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [f"*.{base}"]


def test_ip_order_offers_http01_and_tlsalpn01_only(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    created = client.new_order("127.0.0.1")
    assert created.status_code == 201, created.text
    order = created.json()
    assert order["identifiers"] == [{"type": "ip", "value": "127.0.0.1"}]
    authz = client.post(order["authorizations"][0]).json()
    assert authz["identifier"] == {"type": "ip", "value": "127.0.0.1"}
    assert sorted(c["type"] for c in authz["challenges"]) == ["http-01", "tls-alpn-01"]
    with http01(acme_service) as responder:
        authorize(client, order, responder)
    final = client.post(order["finalize"], {"csr": csr_b64(["127.0.0.1"])})
    assert final.status_code == 200, final.text
    assert final.json()["status"] == "valid"


def test_unknown_profile_is_invalid_profile(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    with unchanged(acme_service):
        resp = client.new_order(unique_name(), profile="no-such-profile")
        problem(resp, client, 400, "invalidProfile")
        # the device profile is not offered to ACME clients either
        problem(client.new_order(unique_name(), profile="device"), client, 400, "invalidProfile")
    still_works(client)


def test_non_string_profile_is_a_client_error(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    with unchanged(acme_service):
        resp = client.new_order(unique_name(), profile=["mtls-server"])
        assert resp.status_code == 400, (resp.status_code, resp.text)
        assert resp.json()["type"] in (ERR + "malformed", ERR + "invalidProfile"), resp.text
    still_works(client)


def test_profile_mtls_client_is_accepted_and_echoed(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    issued = issue(client, [unique_name("client")], profile="mtls-client")
    assert issued.order["profile"] == "mtls-client"
    eku = issued.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    default = client.new_order(unique_name())
    assert default.json()["profile"] == "mtls-server"


def test_authorization_deactivation_invalidates_the_order(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    created = client.new_order(unique_name("a"), unique_name("b"))
    assert created.status_code == 201
    first, second = created.json()["authorizations"]
    resp = client.post(first, {"status": "deactivated"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "deactivated"
    assert client.post(second).json()["status"] == "pending"
    order = client.post(created.headers["Location"]).json()
    assert order["status"] == "invalid", order
    with unchanged(acme_service):
        problem(client.post(first, {"status": "valid"}), client, 400, "malformed")


# -- the restricted service: policy and rate limit --------------------------------------------


def test_identifier_outside_policy_is_rejected(restricted_service: AcmeService) -> None:
    client = registered(restricted_service)
    good = f"ok-{uuid4().hex[:8]}.allowed.test"
    bad = f"bad-{uuid4().hex[:8]}.example.test"
    with unchanged(restricted_service):
        resp = client.new_order(good, bad, "127.0.0.1")
        body = problem(resp, client, 400, "rejectedIdentifier")
    subs = body["subproblems"]
    assert {s["identifier"]["value"] for s in subs} == {bad, "127.0.0.1"}, subs
    assert all(s["type"] == ERR + "rejectedIdentifier" for s in subs)
    assert client.new_order(good).status_code == 201


def test_orders_per_hour_limit(restricted_service: AcmeService) -> None:
    client = registered(restricted_service)
    for i in range(3):
        resp = client.new_order(f"n{i}-{uuid4().hex[:8]}.allowed.test")
        assert resp.status_code == 201, resp.text
    with unchanged(restricted_service):
        resp = client.new_order(f"n3-{uuid4().hex[:8]}.allowed.test")
        problem(resp, client, 429, "rateLimited")
    assert 0 < int(resp.headers["Retry-After"]) <= 3601
    assert order_count(restricted_service, client) == 3
    still_works(client)
    assert registered(restricted_service).new_order(f"o-{uuid4().hex[:8]}.allowed.test").ok


# -- challenges -------------------------------------------------------------------------------


def _http01(client: AcmeClient, name: str) -> tuple[str, str, dict[str, Any]]:
    """(order URL, authz URL, http-01 challenge) of a new order for ``name``."""
    created = client.new_order(name)
    assert created.status_code == 201, created.text
    authz_url = created.json()["authorizations"][0]
    authz = client.post(authz_url).json()
    chall = next(c for c in authz["challenges"] if c["type"] == "http-01")
    return created.headers["Location"], authz_url, chall


def _settled_challenge(client: AcmeClient, authz_url: str, chall_url: str) -> dict[str, Any]:
    poll(lambda: client.post(authz_url).json(), lambda a: a["status"] != "pending")
    authz = client.post(authz_url).json()
    return next(c for c in authz["challenges"] if c["url"] == chall_url)


def test_http01_with_nothing_listening_fails(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    name = unique_name("down")
    order_url, authz_url, chall = _http01(client, name)
    resp = client.post(chall["url"], {})
    assert resp.status_code == 200, resp.text
    assert resp.links.get("up", {}).get("url") == authz_url
    settled = _settled_challenge(client, authz_url, chall["url"])
    assert settled["status"] == "invalid", settled
    assert settled["error"]["type"] == ERR + "connection", settled
    detail = settled["error"]["detail"]
    assert name in detail and str(acme_service.http01_port) in detail, detail
    assert client.post(authz_url).json()["status"] == "invalid"
    order = client.post(order_url).json()
    assert order["status"] == "invalid", order
    assert order["error"]["type"].startswith(ERR), order


def test_http01_with_wrong_body_fails(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    name = unique_name("wrong")
    order_url, authz_url, chall = _http01(client, name)
    with http01(acme_service) as responder:
        responder.tokens[chall["token"]] = "not-the-key-authorization"
        assert client.post(chall["url"], {}).status_code == 200
        settled = _settled_challenge(client, authz_url, chall["url"])
        assert responder.requests_seen == [f"/.well-known/acme-challenge/{chall['token']}"]
    assert settled["status"] == "invalid", settled
    assert settled["error"]["type"] in (ERR + "unauthorized", ERR + "incorrectResponse")
    detail = settled["error"]["detail"]
    assert chall["token"] in detail and "not-the-key-authorization" in detail, detail
    assert client.post(authz_url).json()["status"] == "invalid"
    assert client.post(order_url).json()["status"] == "invalid"


def test_challenge_of_another_account_is_unauthorized(acme_service: AcmeService) -> None:
    owner, other = registered(acme_service), registered(acme_service)
    _, authz_url, chall = _http01(owner, unique_name())
    with unchanged(acme_service):
        problem(other.post(chall["url"], {}), other, 403, "unauthorized")
        problem(other.post(authz_url), other, 403, "unauthorized")
    assert owner.post(authz_url).json()["status"] == "pending"
    still_works(other)


def test_post_as_get_on_a_challenge_does_not_start_validation(
    acme_service: AcmeService,
) -> None:
    """RFC 8555 7.5.1: only a POST of ``{}`` says the client is ready; POST-as-GET reads."""
    client = registered(acme_service)
    _, authz_url, chall = _http01(client, unique_name("read"))
    with unchanged(acme_service):  # nothing listens yet: a validation would fail
        read = client.post(chall["url"])
        assert read.status_code == 200, read.text
        assert read.json()["status"] == "pending", read.json()
    with http01(acme_service) as responder:
        responder.tokens[chall["token"]] = client.key_authorization(chall["token"])
        assert client.post(chall["url"], {}).status_code == 200
        settled = _settled_challenge(client, authz_url, chall["url"])
    assert settled["status"] == "valid", settled


# -- finalize and download --------------------------------------------------------------------


def test_finalize_before_ready_is_order_not_ready(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    name = unique_name()
    created = client.new_order(name)
    with unchanged(acme_service):
        resp = client.post(created.json()["finalize"], {"csr": csr_b64([name])})
        problem(resp, client, 403, "orderNotReady")
    assert client.post(created.headers["Location"]).json()["status"] == "pending"


def test_finalize_checks_the_csr_then_issues_a_verifiable_chain(
    acme_service: AcmeService, tmp_path: Path
) -> None:
    client = registered(acme_service)
    a, b = unique_name("a"), unique_name("b")
    with http01(acme_service) as responder:
        url, order = ready_order(client, [a, b], responder)
    bad_csrs = {
        "extra name": (csr_b64([a, b, unique_name("c")]), "badCSR"),
        "missing name": (csr_b64([a]), "badCSR"),
        "common name outside the order": (csr_b64([a, b], common_name=unique_name()), "badCSR"),
        "garbage DER": (b64u(b"\x30\x03\x02\x01\x00"), "badCSR"),
    }
    for why, (csr, kind) in bad_csrs.items():
        with unchanged(acme_service):
            resp = client.post(order["finalize"], {"csr": csr})
            problem(resp, client, 400, kind)
        assert client.post(url).json()["status"] == "ready", why
    with unchanged(acme_service):
        problem(client.post(order["finalize"], {"csr": "not base64!"}), client, 400, "malformed")
        problem(client.post(order["finalize"], {}), client, 400, "malformed")

    final = client.post(order["finalize"], {"csr": csr_b64([b, a])})
    assert final.status_code == 200, final.text
    done = final.json()
    assert done["status"] == "valid" and done["certificate"].startswith(acme_service.base)
    pem = client.post(done["certificate"])
    assert pem.status_code == 200
    assert pem.headers["Content-Type"].split(";")[0] == PEM_CHAIN
    chain = x509.load_pem_x509_certificates(pem.content)
    assert len(chain) >= 2
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted([a, b])
    (tmp_path / "leaf.pem").write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    (tmp_path / "rest.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:])
    )
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(acme_service.root), "-untrusted",
         str(tmp_path / "rest.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and verify.stdout.strip().endswith("OK"), verify

    with unchanged(acme_service):
        again = client.post(order["finalize"], {"csr": csr_b64([a, b])})
        problem(again, client, 403, "orderNotReady")
    other = registered(acme_service)
    problem(other.post(done["certificate"]), other, 403, "unauthorized")


# -- revocation -------------------------------------------------------------------------------


def _revoke(client: AcmeClient, cert: x509.Certificate, **kwargs: Any) -> requests.Response:
    payload: dict[str, Any] = {"certificate": b64u(cert.public_bytes(serialization.Encoding.DER))}
    if "reason" in kwargs:
        payload["reason"] = kwargs.pop("reason")
    return client.post(client.directory["revokeCert"], payload, **kwargs)


def test_revoke_by_the_ordering_account(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    issued = issue(client, [unique_name()])
    with unchanged(acme_service):
        problem(_revoke(client, issued.leaf, reason=7), client, 400, "badRevocationReason")
    other = registered(acme_service)
    with unchanged(acme_service):
        problem(_revoke(other, issued.leaf), other, 403, "unauthorized")
    assert cert_row(acme_service, issued.leaf) == ("good", None)
    resp = _revoke(client, issued.leaf, reason=4)
    assert resp.status_code == 200, resp.text
    check_headers(resp, client)
    assert cert_row(acme_service, issued.leaf) == ("revoked", "superseded")
    with unchanged(acme_service):
        problem(_revoke(client, issued.leaf), client, 400, "alreadyRevoked")
    still_works(client)


def test_revoke_by_the_certificate_key(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    issued = issue(client, [unique_name()])
    stranger = AccountKey("ES256")
    with unchanged(acme_service):
        resp = _revoke(client, issued.leaf, use_jwk=True, key=stranger)
        problem(resp, client, 403, "unauthorized")
    resp = _revoke(client, issued.leaf, reason=1, use_jwk=True, key=issued.key)
    assert resp.status_code == 200, resp.text
    assert cert_row(acme_service, issued.leaf) == ("revoked", "keyCompromise")
    with unchanged(acme_service):
        again = _revoke(client, issued.leaf, use_jwk=True, key=issued.key)
        problem(again, client, 400, "alreadyRevoked")


# -- renewal information (RFC 9773) -----------------------------------------------------------


def test_renewal_info_window_and_replaces(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    leaf = issue(client, [unique_name()]).leaf
    cert_id = ari_cert_id(leaf)
    ari_url = f"{client.directory['renewalInfo']}/{cert_id}"
    resp = client.http.get(ari_url, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    check_headers(resp, client)
    assert int(resp.headers["Retry-After"]) > 0
    window = resp.json()["suggestedWindow"]
    start, end = parse_time(window["start"]), parse_time(window["end"])
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    lifetime = not_after - not_before
    assert not_before <= start < end <= not_after, (window, not_before, not_after)
    assert 0.55 <= (start - not_before) / lifetime <= 0.8, window

    aki_part, serial_part = cert_id.split(".")
    unknown_serial = b"\x01" + os.urandom(15)
    unknown = f"{aki_part}.{b64u(unknown_serial)}"
    with unchanged(acme_service):
        gone = client.http.get(f"{client.directory['renewalInfo']}/{unknown}", timeout=TIMEOUT)
        problem(gone, client, 404, "malformed")
        other_aki = f"{b64u(os.urandom(20))}.{serial_part}"
        gone = client.http.get(f"{client.directory['renewalInfo']}/{other_aki}", timeout=TIMEOUT)
        assert gone.status_code == 404, gone.text
        for bad in ("not-a-cert-id", "a.b.c", f"{aki_part}.", f"{aki_part}.gA"):
            resp = client.http.get(f"{client.directory['renewalInfo']}/{bad}", timeout=TIMEOUT)
            problem(resp, client, 400, "malformed")

    replacing = client.new_order(unique_name("renew"), replaces=cert_id)
    assert replacing.status_code == 201, replacing.text
    assert replacing.json()["replaces"] == cert_id
    with unchanged(acme_service):
        twice = client.new_order(unique_name("renew"), replaces=cert_id)
        problem(twice, client, 409, "alreadyReplaced")
    other = registered(acme_service)
    with unchanged(acme_service):
        problem(other.new_order(unique_name(), replaces=cert_id), other, 400, "malformed")

    assert _revoke(client, leaf).status_code == 200
    revoked = client.http.get(ari_url, timeout=TIMEOUT)
    assert revoked.status_code == 200
    window = revoked.json()["suggestedWindow"]
    assert parse_time(window["start"]) <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    assert parse_time(window["start"]) < parse_time(window["end"])


def test_renewal_info_and_replaces_for_an_odd_length_hex_serial(
    acme_service: AcmeService,
) -> None:
    """About one certificate in eight has a serial whose hex form has an odd number of
    digits (a leading zero nibble); ARI must work for those too."""
    client = registered(acme_service)
    issued = issue_until(client, odd_hex_serial, "an odd-length hex serial")
    cert_id = ari_cert_id(issued.leaf)
    ari = client.http.get(f"{client.directory['renewalInfo']}/{cert_id}", timeout=TIMEOUT)
    replacing = client.new_order(unique_name("renew"), replaces=cert_id)
    assert (ari.status_code, replacing.status_code) == (200, 201), (
        f"serial {issued.leaf.serial_number:x}, certID {cert_id}: "
        f"renewalInfo {ari.status_code} {ari.text}; newOrder {replacing.status_code} "
        f"{replacing.text}"
    )


def test_replaces_must_name_the_certificate_exactly(acme_service: AcmeService) -> None:
    """``replaces`` identifies a certificate by AKI and serial (RFC 9773 4.1, 5): another
    AKI, or a non-DER (zero-padded) serial, names no certificate of this account, and
    cannot be used to replace a certificate a second time."""
    client = registered(acme_service)
    cert_id = ari_cert_id(issue(client, [unique_name()]).leaf)
    aki_part, serial_part = cert_id.split(".")
    serial_der = base64.urlsafe_b64decode(serial_part + "==")
    padded_der = b"\x00" + serial_der
    variants = {
        "another AKI": f"{b64u(os.urandom(20))}.{serial_part}",
        "zero-padded serial": f"{aki_part}.{b64u(padded_der)}",
    }
    assert client.new_order(unique_name("renew"), replaces=cert_id).status_code == 201
    outcomes = {}
    for label, variant in variants.items():
        before = snapshot(acme_service)
        resp = client.new_order(unique_name("renew"), replaces=variant)
        outcomes[label] = (variant, resp.status_code, snapshot(acme_service) == before)
        if resp.status_code in (400, 409):
            problem(resp, client, resp.status_code, resp.json()["type"].removeprefix(ERR))
    assert all(status in (400, 409) and same for _, status, same in outcomes.values()), (
        cert_id,
        outcomes,
    )
    still_works(client)


# -- regressions from review -------------------------------------------------------------------


def test_deeply_nested_json_is_malformed_not_a_500(acme_service: AcmeService) -> None:
    client = AcmeClient(acme_service)
    with unchanged(acme_service):
        resp = send(client, client.directory["newAccount"], "[" * 50000)
        problem(resp, client, 400, "malformed")
    assert "unhandled error" not in acme_service.log.read_text()


def test_new_account_signed_with_a_kid_is_malformed(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    with unchanged(acme_service):
        resp = client.post(client.directory["newAccount"], {"termsOfServiceAgreed": True})
        problem(resp, client, 400, "malformed")
    still_works(client)


def test_crit_header_and_nonce_in_a_nested_jws_are_refused(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    url = client.directory["keyChange"]
    new = AccountKey()
    payload = {"account": client.kid, "oldKey": client.key.jwk()}
    with unchanged(acme_service):
        inner = jws(new, url, payload, nonce=client.nonce())
        problem(client.post(url, inner), client, 400, "malformed")
        crit = client.post(client.kid or "", extra_header={"crit": ["b64"], "b64": False})
        problem(crit, client, 400, "malformed")
    still_works(client)


def test_the_account_key_cannot_be_the_certificate_key(acme_service: AcmeService) -> None:
    client = registered(acme_service)
    name = unique_name()
    with http01(acme_service) as responder:
        url, order = ready_order(client, [name], responder)
    resp = client.post(order["finalize"], {"csr": csr_b64([name], client.key.key)})
    problem(resp, client, 400, "badCSR")
    assert client.post(url).json()["status"] == "ready"


@pytest.mark.parametrize("reason", [True, 6, 2, 10, "1"])
def test_subscriber_may_not_give_ca_or_hold_reasons(acme_service: AcmeService, reason: Any) -> None:
    client = registered(acme_service)
    issued = issue(client, [unique_name()])
    with unchanged(acme_service):
        problem(_revoke(client, issued.leaf, reason=reason), client, 400, "badRevocationReason")
    assert cert_row(acme_service, issued.leaf) == ("good", None)


def test_access_to_another_accounts_order_is_refused_and_audited(
    acme_service: AcmeService,
) -> None:
    owner, other = registered(acme_service), registered(acme_service)
    created = owner.new_order(unique_name())
    order_url = created.headers["Location"]
    order_id = order_url.rsplit("/", 1)[-1]
    with unchanged(acme_service):
        problem(other.post(order_url), other, 403, "unauthorized")
    refused = db_rows(
        acme_service,
        "SELECT actor, action FROM audit_events WHERE subject = ? AND outcome = 'refused'",
        order_id,
    )
    assert refused == [(f"acme-account:{other.kid.rsplit('/', 1)[-1]}", "acme.order")]
