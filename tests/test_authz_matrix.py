"""Authorisation matrix (issue #8, item 5), against one real ``hsmca serve``.

* Every (method, rule) of the HTTPS app x every role (anonymous, mTLS client, auditor,
  issuer limited to ``*.allowed.test``, admin) answers the status of the table in
  :mod:`tests.authz_helpers`; each refusal is a problem document (or the dashboard's
  HTML page) and changes no row. A route missing from the table fails the test.
* An issuer never obtains a name outside its patterns by any route: REST issuance
  (hand-picked tricks and hypothesis-generated names), revocation, mTLS renewal (REST and
  EST), ACME with an EAB key bound to ``*.allowed.test`` (new-order, finalize, profile,
  and the core's second check at finalize), and EST with a device credential.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import requests
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from pki.acme.service import Acme
from pki.actors import operator
from pki.bootstrap import initialise
from tests.acme_helpers import AcmeClient, AcmeService, ChallTestSrv, poll
from tests.api_helpers import (
    PROBLEM,
    assert_problem,
    issued,
    last_event_id,
    new_token,
    opened,
    write_identity,
)
from tests.authz_helpers import (
    ALLOWED,
    MATRIX,
    ROLES,
    World,
    app_routes,
    csr_pem,
    device_csr,
    eab_binding,
    est_body,
    ocsp_request,
    refused_events,
    role_session,
    state,
)
from tests.conftest import build_csr
from tests.figures import record
from tests.helpers import hsmca_json, sqlite_query
from tests.test_acme_protocol import authorize, csr_b64, http01, problem

ERR = "urn:ietf:params:acme:error:"


@dataclass
class Setup:
    """The module's service and the world of the matrix."""

    service: AcmeService
    world: World
    #: ACME clients made by the tests (their connections are closed before the service)
    clients: list[AcmeClient] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.service.home


def _rand() -> str:
    return uuid.uuid4().hex[:10]


def _path_of(url: str) -> str:
    return urlparse(url).path


@pytest.fixture(scope="module")
def authz(tmp_path_factory: pytest.TempPathFactory, challtestsrv: ChallTestSrv) -> Iterator[Setup]:
    """One service (ACME names limited to ``*.test`` by the CA) and the matrix's world."""
    home = tmp_path_factory.mktemp("authz-home")
    initialise(home, "Authz Org")
    service = AcmeService(home, challtestsrv, workers=1, allowed_domains=["*.test"])
    try:
        root = service.root
        tokens = {"admin": service.admin_token}
        tokens["auditor"] = new_token(home, "auditor")[0]
        tokens["issuer"] = new_token(home, "issuer", allowed_names=(ALLOWED,))[0]
        admin = role_session(root, tokens["admin"])
        issuer = role_session(root, tokens["issuer"])
        target, _ = issued(admin, service.base, cn=f"target-{_rand()}.svc.test")
        victim, _ = issued(admin, service.base, cn=f"victim-{_rand()}.svc.test")
        mtls_name = f"mtls-{_rand()}.allowed.test"
        client, key = issued(issuer, service.base, "mtls-client", cn=mtls_name)
        identity = write_identity(home, client, key, "mtls-client")
        device = f"dev-{_rand()}"
        with opened(home) as core:
            core.create_enrollment_credential(device, None, operator("tests"))
        ca = admin.get(f"{service.base}/api/v1/ca", timeout=15).json()
        active = next(i for i in ca["issuers"] if i["kind"] != "root" and i["active"])
        sessions = {role: role_session(root, token) for role, token in tokens.items()}
        sessions["anonymous"] = role_session(root)
        sessions["mtls"] = role_session(root, cert=identity)
        world = World(
            base=service.base,
            sessions=sessions,
            tokens=tokens,
            target=target["serial"],
            victim=victim["serial"],
            device=device,
            mtls_names=(mtls_name,),
            ocsp_der=ocsp_request(target["certificate"], target["chain"]),
            paths={
                "ca_issuers_path": _path_of(active["ca_issuers_url"]),
                "crl_path": _path_of(active["crl_url"]),
            },
        )
        setup = Setup(service, world)
        yield setup
        for session in [*sessions.values(), *(c.http for c in setup.clients)]:
            session.close()  # idle keep-alive connections would delay the graceful stop
    finally:
        assert service.stop() == 0, service.log.read_text()[-2000:]


# -- the matrix ---------------------------------------------------------------------------------


def test_the_table_covers_every_route_of_the_https_app(authz: Setup) -> None:
    routes = app_routes(authz.home)
    missing = sorted(routes - set(MATRIX))
    stale = sorted(set(MATRIX) - routes)
    assert not missing, f"routes with no row in tests/authz_helpers.py MATRIX: {missing}"
    assert not stale, f"MATRIX rows for routes that no longer exist: {stale}"


def _refusal_shape(resp: requests.Response, kind: str) -> None:
    """A refusal is a problem document (or the dashboard's HTML page), never a trace."""
    assert "Traceback" not in resp.text, resp.text[:300]
    if kind == "problem":
        assert_problem(resp, resp.status_code)
    elif kind == "acme":
        assert resp.headers.get("Content-Type", "").split(";")[0] == PROBLEM, resp.headers
        assert resp.json()["type"] in (ERR + "malformed", ERR + "badNonce"), resp.text
    else:
        assert resp.headers.get("Content-Type", "").startswith("text/html"), resp.headers


def test_every_route_answers_each_role_as_the_table_says(authz: Setup) -> None:
    world = authz.world
    started = time.monotonic()
    wrong: list[str] = []
    cells = refusals = 0
    for (method, rule), route in MATRIX.items():
        for role, expected in zip(ROLES, route.expect, strict=True):
            before = state(authz.home)
            resp = world.send(method, route, role)
            cells += 1
            if resp.status_code != expected:
                wrong.append(f"{method} {rule} as {role}: {resp.status_code} != {expected}")
                continue
            if expected >= 400:
                refusals += 1
                try:
                    _refusal_shape(resp, route.refusal)
                except AssertionError as exc:
                    wrong.append(f"{method} {rule} as {role}: bad refusal: {exc}")
                if state(authz.home) != before:
                    wrong.append(f"{method} {rule} as {role}: the refusal changed rows")
    seconds = time.monotonic() - started
    record(
        "authz-matrix",
        routes=len(MATRIX),
        roles=len(ROLES),
        cells=cells,
        refusals=refusals,
        mismatches=len(wrong),
        seconds=round(seconds, 2),
    )
    assert not wrong, "\n".join(wrong)


# -- an issuer never obtains a name outside its patterns ----------------------------------------

#: (label, CN, SANs, status): each names something outside ``*.allowed.test``; 403, or
#: 400 where the name is not even valid
OUTSIDE: list[tuple[str, str | None, tuple[str, ...], int]] = [
    ("san outside", "a.allowed.test", ("a.allowed.test", "x.other.test"), 403),
    ("cn only, outside", "x.other.test", (), 403),
    ("cn and san outside", "x.other.test", ("x.other.test",), 403),
    ("ip", "a.allowed.test", ("a.allowed.test", "10.0.0.1"), 403),
    ("ipv6 loopback", None, ("::1",), 403),
    ("wildcard outside", None, ("*.other.test",), 403),
    ("wildcard above", None, ("*.test",), 400),
    ("apex of the pattern", None, ("allowed.test",), 403),
    ("suffix without dot", None, ("evilallowed.test",), 403),
    ("pattern as a prefix", None, ("a.allowed.test.other.test",), 403),
    ("upper case", None, ("X.OTHER.TEST",), 403),
    ("trailing dot", None, ("x.other.test.",), 403),
    ("punycode IDN", None, ("xn--llowed-bva.test",), 403),
    ("uri", None, ("spiffe://allowed.test/x",), 403),
    ("homoglyph CN (Cyrillic e)", "x.allow\u0435d.test", (), 400),
]


def _issue_raw(
    s: requests.Session, base: str, cn: str | None, sans: tuple[str, ...], **body: Any
) -> requests.Response:
    csr, _ = build_csr(cn=cn, sans=sans)
    payload = {"csr": csr.decode(), "profile": "mtls-server", **body}
    return s.post(f"{base}/api/v1/certificates", json=payload, timeout=15)


def _refused_unchanged(authz: Setup, send: Any, status: int = 403) -> dict[str, Any]:
    before = state(authz.home)
    resp = send()
    body = assert_problem(resp, status)
    assert state(authz.home) == before, "a refusal changed rows"
    return body


def test_issuer_cannot_obtain_an_outside_name_over_rest(authz: Setup) -> None:
    issuer = authz.world.sessions["issuer"]
    base = authz.service.base
    for label, cn, sans, status in OUTSIDE:
        send = lambda c=cn, s=sans: _issue_raw(issuer, base, c, s)  # noqa: E731
        body = _refused_unchanged(authz, send, status)
        assert status == 400 or "not allowed" in body["detail"], (label, body)
    # other profiles: a device certificate (URI SAN) is outside too
    _refused_unchanged(
        authz,
        lambda: _issue_raw(issuer, base, "a.allowed.test", ("a.allowed.test",), profile="device"),
    )
    limited, _ = new_token(
        authz.home, "issuer", allowed_names=(ALLOWED,), profiles=("mtls-server",)
    )
    other = role_session(authz.service.root, limited)
    _refused_unchanged(
        authz, lambda: _issue_raw(other, base, None, ("a.allowed.test",), profile="mtls-client")
    )
    # an outside CN beside an inside SAN: issued, but the CN is dropped for the inside name
    resp = _issue_raw(issuer, base, "x.other.test", ("b.allowed.test",))
    assert resp.status_code == 201, resp.text
    cert = x509.load_pem_x509_certificate(resp.json()["certificate"].encode())
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cns == ["b.allowed.test"] and [str(n.value) for n in sans] == ["b.allowed.test"]
    record("authz-rest-outside-names", tricks=len(OUTSIDE) + 2, issued_outside=0)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_OUTSIDE_NAME = (
    st.lists(_LABEL, min_size=1, max_size=3)
    .map(".".join)
    .flatmap(
        lambda head: st.sampled_from(
            [f"{head}.other.test", f"{head}.allowed.tes", f"{head}allowed.test"]
        )
    )
)


def test_issuer_is_refused_any_generated_outside_name(authz: Setup) -> None:
    issuer = authz.world.sessions["issuer"]
    tried: list[str] = []

    @settings(max_examples=25, deadline=None, database=None)
    @given(name=_OUTSIDE_NAME, as_cn=st.booleans())
    def check(name: str, as_cn: bool) -> None:
        sans = () if as_cn else ("ok.allowed.test", name)
        cn = name if as_cn else "ok.allowed.test"
        _refused_unchanged(authz, lambda: _issue_raw(issuer, authz.service.base, cn, sans))
        tried.append(name)

    check()
    assert len(tried) >= 10, tried
    record("authz-rest-generated-names", examples=len(tried), issued_outside=0)


def test_issuer_cannot_revoke_others_or_widen_a_certificate_by_renewal(authz: Setup) -> None:
    world, base, root = authz.world, authz.service.base, authz.service.root
    # another issuer with the same patterns: its certificate is not this issuer's to revoke
    twin_token, _ = new_token(authz.home, "issuer", allowed_names=(ALLOWED,))
    theirs, _ = issued(role_session(root, twin_token), base, cn=f"twin-{_rand()}.allowed.test")
    revoke = f"{base}/api/v1/certificates/{theirs['serial']}/revoke"
    body = _refused_unchanged(authz, lambda: world.sessions["issuer"].post(revoke, json={}))
    assert theirs["serial"] in body["detail"]
    # renewal over mTLS (REST and EST) keeps exactly the names of the presented certificate
    mtls = world.sessions["mtls"]
    own = world.mtls_names[0]
    renew = f"{base}/api/v1/certificates/renew"
    reenroll = f"{base}/.well-known/est/simplereenroll"
    for extra in ("x.other.test", f"more-{_rand()}.allowed.test"):
        csr, _ = csr_pem(own, extra)
        _refused_unchanged(authz, lambda c=csr: mtls.post(renew, json={"csr": c.decode()}))
        der, _ = csr_pem(own, extra, der=True)
        _refused_unchanged(authz, lambda d=der: mtls.post(reenroll, **est_body(d)))
    # a client certificate gives no right to issue or revoke with the REST API
    csr, _ = csr_pem(own)
    _refused_unchanged(
        authz,
        lambda: mtls.post(f"{base}/api/v1/certificates", json={"csr": csr.decode()}),
        401,
    )
    record("authz-revoke-renew", refusals=6)


# -- ACME: an EAB key bound to names -----------------------------------------------------------


def _eab_key(
    home: Path, allowed_names: tuple[str, ...] = (), profiles: tuple[str, ...] = ()
) -> dict[str, Any]:
    """An EAB key made by the core (the CLI's path, without a process start)."""
    with opened(home) as core:
        created = Acme(core).create_eab_key(None, operator("tests"), allowed_names, profiles)
    return {"kid": created.kid, "hmac_key": created.hmac_key}


def _bound_client(authz: Setup, key: dict[str, Any]) -> AcmeClient:
    client = AcmeClient(authz.service)
    authz.clients.append(client)
    binding = eab_binding(client.key, key["kid"], key["hmac_key"], client.directory["newAccount"])
    resp = client.register(externalAccountBinding=binding)
    assert resp.status_code == 201, resp.text
    return client


def _account_id(client: AcmeClient) -> int:
    assert client.kid is not None
    return int(client.kid.rsplit("/", 1)[-1])


def _refused_acme(
    authz: Setup, client: AcmeClient, send: Any, kind: str, status: int = 400
) -> dict[str, Any]:
    before = state(authz.home)
    body = problem(send(), client, status, kind)
    assert state(authz.home) == before, "a refused ACME request changed rows"
    return body


def test_acme_account_inherits_its_eab_key_limits(authz: Setup) -> None:
    key = hsmca_json(
        authz.home, "acme", "eab", "create", "--allowed-names", ALLOWED, "--profiles", "mtls-server"
    )
    assert key["allowed_names"] == [ALLOWED] and key["profiles"] == ["mtls-server"], key
    client = _bound_client(authz, key)
    account = _account_id(client)
    rows = sqlite_query(
        authz.home, "SELECT allowed_names, profiles FROM acme_accounts WHERE id = ?", (account,)
    )
    assert [json.loads(v) for v in rows[0]] == [[ALLOWED], ["mtls-server"]]
    first = last_event_id(authz.home)
    # new-order: any identifier outside the binding is rejected, and nothing is created
    body = _refused_acme(
        authz, client, lambda: client.new_order("x.other.test"), "rejectedIdentifier"
    )
    assert "x.other.test" in body["detail"]
    body = _refused_acme(
        authz,
        client,
        lambda: client.new_order("a.allowed.test", "allowed.test", "*.other.test"),
        "rejectedIdentifier",
    )
    flagged = sorted(sub["identifier"]["value"] for sub in body["subproblems"])
    assert flagged == ["*.other.test", "allowed.test"], body
    _refused_acme(
        authz,
        client,
        lambda: client.new_order("a.allowed.test", profile="mtls-client"),
        "invalidProfile",
    )
    refusals = [e for e in refused_events(authz.home, first) if e[0] == "acme.order"]
    assert len(refusals) == 3 and all(e[1] == f"acme-account:{account}" for e in refusals)
    # an allowed order cannot be finalized with a CSR naming one more, outside name
    name = f"o-{_rand()}.allowed.test"
    created = client.new_order(name)
    assert created.status_code == 201, created.text
    with http01(authz.service) as responder:
        authorize(client, created.json(), responder)
    finalize = created.json()["finalize"]
    _refused_acme(
        authz,
        client,
        lambda: client.post(finalize, {"csr": csr_b64([name, "x.other.test"], common_name=name)}),
        "badCSR",
    )
    done = client.post(finalize, {"csr": csr_b64([name])})
    assert done.status_code == 200, done.text
    order = poll(
        lambda: client.post(created.headers["Location"]).json(),
        lambda o: o["status"] != "processing",
    )
    assert order["status"] == "valid", order
    pem = client.post(order["certificate"]).content
    leaf = x509.load_pem_x509_certificates(pem)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == [name]
    record("authz-acme-eab", refused_orders=3, refused_finalize=1, issued_outside=0)


def test_acme_finalize_checks_the_binding_again(authz: Setup) -> None:
    """Defence in depth: limits narrowed after the order was authorised still hold."""
    client = _bound_client(authz, _eab_key(authz.home, (ALLOWED,)))
    name = f"d-{_rand()}.allowed.test"
    created = client.new_order(name)
    assert created.status_code == 201, created.text
    with http01(authz.service) as responder:
        authorize(client, created.json(), responder)
    narrow = "UPDATE acme_accounts SET allowed_names = ? WHERE id = ?"
    with closing(sqlite3.connect(authz.home / "hsmca.db", timeout=10)) as con, con:
        con.execute(narrow, (json.dumps(["*.narrow.test"]), _account_id(client)))
    first = last_event_id(authz.home)
    before = state(authz.home)["certificates"]
    body = problem(
        client.post(created.json()["finalize"], {"csr": csr_b64([name])}), client, 400, "badCSR"
    )
    assert name in body["detail"], body
    assert state(authz.home)["certificates"] == before
    refused = [e for e in refused_events(authz.home, first) if e[0] == "certificate.issue"]
    assert refused and refused[0][1] == f"acme-account:{_account_id(client)}", refused


def test_acme_key_without_patterns_and_the_ca_policy(authz: Setup) -> None:
    free = _bound_client(authz, _eab_key(authz.home))
    assert free.new_order(f"f-{_rand()}.other.test").status_code == 201
    # without a "profile", an account limited to other profiles gets its first one
    clients = _bound_client(authz, _eab_key(authz.home, profiles=("mtls-client",)))
    created = clients.new_order(f"c-{_rand()}.other.test")
    assert created.status_code == 201 and created.json()["profile"] == "mtls-client"
    # acme.allowed_domains (``*.test`` here) still applies on top of the binding
    wide = _bound_client(authz, _eab_key(authz.home, ("*.example",)))
    body = _refused_acme(authz, wide, lambda: wide.new_order("a.example"), "rejectedIdentifier")
    assert "this CA's policy" in body["detail"], body


# -- EST: a device credential gets its device identity only -------------------------------------


def test_device_credential_cannot_obtain_a_dns_name(authz: Setup) -> None:
    base = authz.service.base
    anonymous = authz.world.sessions["anonymous"]
    device = f"dev-{_rand()}"
    with opened(authz.home) as core:
        secret = core.create_enrollment_credential(device, None, operator("tests")).secret
    est = f"{base}/.well-known/est/simpleenroll"
    enroll = f"{base}/api/v1/devices/enroll"
    bearer = {"Authorization": f"Bearer {secret}"}
    for names in (("a.allowed.test",), ("x.other.test",), (device.lower(), "a.allowed.test")):
        der = device_csr(device, *names, der=True)
        body = _refused_unchanged(
            authz, lambda d=der: anonymous.post(est, auth=(device, secret), **est_body(d))
        )
        assert "names only its device" in body["detail"], body
        pem = device_csr(device, *names).decode()
        _refused_unchanged(
            authz, lambda p=pem: anonymous.post(enroll, json={"csr": p}, headers=bearer)
        )
    # the refusals did not spend the credential: the device's own request still works
    ok = anonymous.post(est, auth=(device, secret), **est_body(device_csr(device, der=True)))
    assert ok.status_code == 200, ok.text
    record("authz-est-device", refusals=6, issued_dns=0)
