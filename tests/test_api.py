"""The REST API over real HTTPS against a running ``hsmca serve``.

Tokens are created through the core on the service's home (as ``hsmca token create``
would) and every request goes over TLS to 127.0.0.1, trusting only the hsmca root.
Nothing assumes an empty database: tests count before/after or follow their own serials.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from cryptography import x509

from pki.bootstrap import initialise
from tests.api_helpers import (
    SECRETS,
    TIMEOUT,
    assert_problem,
    certificate_count,
    events_since,
    issue,
    issued,
    last_event_id,
    leaf,
    new_token,
    opened,
    poll,
    unique,
)
from tests.conftest import RunningService, build_csr, free_port
from tests.helpers import HSMCA, clean_env, split_pem

API = "/api/v1"


def _list_all(session: requests.Session, url: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a listing, following ``next_cursor`` (bounded)."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(200):
        query = dict(params, **({"cursor": cursor} if cursor else {}))
        resp = session.get(url, params=query, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("listing did not end after 200 pages")


def _refusals(events: list[Any], action: str, actor: str) -> list[Any]:
    return [e for e in events if e.action == action and e.actor == actor and e.outcome == "refused"]


# -- 1. issue, read, list, revoke ------------------------------------------------------------


def test_issue_get_list_and_revoke(service: RunningService) -> None:
    """Issue, read back, find it expiring within 2d, revoke with a reason, see it revoked."""
    admin = service.session(service.admin_token)
    base = service.base
    resp, _ = issue(admin, base, "mtls-server", ttl="1h")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert resp.headers["Location"].endswith(f"{API}/certificates/{body['serial']}")
    assert set(body) >= {"serial", "certificate", "chain", "not_before", "not_after", "profile"}
    assert body["profile"] == "mtls-server"
    cert = leaf(body)
    assert cert.serial_number == int(body["serial"], 16)
    assert re.fullmatch(r"[0-9a-f]+", body["serial"])
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(minutes=59) <= lifetime <= dt.timedelta(hours=1, minutes=2), lifetime
    # the chain is the issuing CA only, never the root
    root_pem = service.root.read_text()
    chain = split_pem(body["chain"])
    assert len(chain) == 1 and chain[0].strip() != root_pem.strip()
    assert x509.load_pem_x509_certificate(chain[0].encode()).subject == cert.issuer

    got = admin.get(f"{base}{API}/certificates/{body['serial']}", timeout=TIMEOUT)
    assert got.status_code == 200, got.text
    record = got.json()
    assert record["status"] == "good" and record["revocation_reason"] is None
    assert record["certificate"] == body["certificate"]

    long_lived, _ = issued(admin, base, "mtls-server", ttl="7d")
    expiring = _list_all(admin, f"{base}{API}/certificates", expiring_within="2d", limit=1000)
    serials = {item["serial"] for item in expiring}
    assert body["serial"] in serials
    assert long_lived["serial"] not in serials

    revoked = admin.post(
        f"{base}{API}/certificates/{body['serial']}/revoke",
        json={"reason": "keyCompromise"},
        timeout=TIMEOUT,
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"

    again = admin.get(f"{base}{API}/certificates/{body['serial']}", timeout=TIMEOUT).json()
    assert again["status"] == "revoked"
    assert again["revocation_reason"] == "keyCompromise"
    assert again["revoked_at"]
    # a revoked certificate is no longer "expiring"
    expiring = _list_all(admin, f"{base}{API}/certificates", expiring_within="2d", limit=1000)
    assert body["serial"] not in {item["serial"] for item in expiring}
    # revoking twice is a conflict, an unknown reason a bad request
    twice = admin.post(
        f"{base}{API}/certificates/{body['serial']}/revoke", json={}, timeout=TIMEOUT
    )
    assert_problem(twice, 409)
    bad_reason = admin.post(
        f"{base}{API}/certificates/{long_lived['serial']}/revoke",
        json={"reason": "boredom"},
        timeout=TIMEOUT,
    )
    assert_problem(bad_reason, 400, "boredom")
    assert (
        admin.get(f"{base}{API}/certificates/{long_lived['serial']}", timeout=TIMEOUT).json()[
            "status"
        ]
        == "good"
    )


def test_cursor_paging_and_status_filter(service: RunningService) -> None:
    """limit=2 pages over 5 certificates return each exactly once; status filters."""
    secret, name = new_token(service.home, "issuer")
    issuer = service.session(secret)
    mine = [issued(issuer, service.base)[0]["serial"] for _ in range(5)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        resp = issuer.get(f"{service.base}{API}/certificates", params=params, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert len(page["items"]) <= 2
        assert all(item["requester"] == f"token:{name}" for item in page["items"])
        seen.extend(item["serial"] for item in page["items"])
        cursor = page["next_cursor"]
        pages += 1
        assert pages <= 10, "paging does not end"
        if cursor is None:
            break
    assert seen == mine  # every one exactly once, in issuance order
    assert pages == 3

    revoke = issuer.post(
        f"{service.base}{API}/certificates/{mine[2]}/revoke",
        json={"reason": "superseded"},
        timeout=TIMEOUT,
    )
    assert revoke.status_code == 200, revoke.text
    url = f"{service.base}{API}/certificates"
    assert [i["serial"] for i in _list_all(issuer, url, status="revoked")] == [mine[2]]
    assert [i["serial"] for i in _list_all(issuer, url, status="good")] == [
        s for s in mine if s != mine[2]
    ]
    admin = service.session(service.admin_token)
    revoked_all = _list_all(admin, url, status="revoked", limit=1000)
    assert mine[2] in {i["serial"] for i in revoked_all}
    assert {i["status"] for i in revoked_all} == {"revoked"}
    # the profile filter, and an unknown status is a problem
    assert _list_all(issuer, url, profile="mtls-client") == []
    assert_problem(issuer.get(url, params={"status": "sleepy"}, timeout=TIMEOUT), 400, "sleepy")
    assert_problem(issuer.get(url, params={"cursor": "!!"}, timeout=TIMEOUT), 400)
    assert_problem(issuer.get(url, params={"limit": "many"}, timeout=TIMEOUT), 400, "limit")
    assert_problem(issuer.get(url, params={"colour": "red"}, timeout=TIMEOUT), 400, "colour")
    for bad in ({"limit": "0"}, {"limit": "1001"}, {"limit": "-1"}, {"expiring_within": "soon"}):
        assert_problem(issuer.get(url, params=bad, timeout=TIMEOUT), 400)


# -- 2. authentication ----------------------------------------------------------------------


def test_missing_and_wrong_tokens_are_401(service: RunningService) -> None:
    url = f"{service.base}{API}/certificates"
    before = last_event_id(service.home)
    anonymous = service.session()
    for resp in (
        anonymous.get(url, timeout=TIMEOUT),
        anonymous.post(url, json={"csr": "x"}, timeout=TIMEOUT),
        service.session("hsmca_not-a-real-token").get(url, timeout=TIMEOUT),
        anonymous.get(url, headers={"Authorization": "Basic dXNlcjpwdw=="}, timeout=TIMEOUT),
        anonymous.get(url, headers={"Authorization": "Bearer "}, timeout=TIMEOUT),
    ):
        assert_problem(resp, 401)
        assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer"), resp.headers
    refused = [e for e in events_since(service.home, before) if e.action == "auth.token"]
    assert refused and all(e.outcome == "refused" for e in refused)


def test_revoked_token_is_401(service: RunningService) -> None:
    secret, name = new_token(service.home, "auditor")
    s = service.session(secret)
    url = f"{service.base}{API}/certificates"
    assert s.get(url, params={"limit": 1}, timeout=TIMEOUT).status_code == 200
    with opened(service.home) as core:
        from pki.actors import operator

        core.revoke_token(name, operator("api-tests"))
    resp = s.get(url, params={"limit": 1}, timeout=TIMEOUT)
    assert_problem(resp, 401)
    assert "WWW-Authenticate" in resp.headers


def test_expired_token_is_401(service: RunningService) -> None:
    created = time.monotonic()
    secret, _ = new_token(service.home, "auditor", ttl=dt.timedelta(seconds=2))
    s = service.session(secret)
    url = f"{service.base}{API}/certificates"
    first = s.get(url, params={"limit": 1}, timeout=TIMEOUT)
    if time.monotonic() - created < 1.5:  # only meaningful while the token is surely valid
        assert first.status_code == 200, first.text

    def refused() -> requests.Response | None:
        resp = s.get(url, params={"limit": 1}, timeout=TIMEOUT)
        return resp if resp.status_code == 401 else None

    resp = poll(refused, 15, "the expired token to be refused", every=0.25)
    assert time.monotonic() - created >= 1.5  # not refused early
    assert_problem(resp, 401)
    assert "WWW-Authenticate" in resp.headers


# -- 3. authorisation -----------------------------------------------------------------------


def test_issuer_name_profile_and_ttl_limits(service: RunningService) -> None:
    """An issuer token issues only its names, its profiles and within its max TTL."""
    base = service.base
    before_count = certificate_count(service.home)
    secret, name = new_token(service.home, "issuer", allowed_names=("*.svc.test",))
    s = service.session(secret)
    before = last_event_id(service.home)
    ok, _ = issue(s, base, cn="a.svc.test")
    assert ok.status_code == 201, ok.text
    evil, _ = issue(s, base, cn="evil.test")
    assert_problem(evil, 403, "evil.test")
    ip, _ = issue(s, base, cn="b.svc.test", sans=("b.svc.test", "10.0.0.1"))
    assert_problem(ip, 403, "10.0.0.1")
    refused = _refusals(events_since(service.home, before), "certificate.issue", f"token:{name}")
    assert len(refused) == 2, refused

    secret, name = new_token(
        service.home, "issuer", allowed_names=("*.svc.test",), profiles=("mtls-client",)
    )
    s = service.session(secret)
    before = last_event_id(service.home)
    assert issue(s, base, "mtls-client")[0].status_code == 201
    assert_problem(issue(s, base, "mtls-server")[0], 403, "mtls-server")
    refused = _refusals(events_since(service.home, before), "certificate.issue", f"token:{name}")
    assert len(refused) == 1, refused

    secret, name = new_token(
        service.home, "issuer", allowed_names=("*.svc.test",), max_ttl=dt.timedelta(hours=1)
    )
    s = service.session(secret)
    before = last_event_id(service.home)
    assert_problem(issue(s, base, ttl="2h")[0], 400, "ttl")
    within, _ = issue(s, base, ttl="30m")
    assert within.status_code == 201, within.text
    # no ttl: the profile default (24h) is capped at the token's maximum
    capped = leaf(issue(s, base)[0].json())
    assert capped.not_valid_after_utc - capped.not_valid_before_utc <= dt.timedelta(
        hours=1, minutes=1
    )
    refused = _refusals(events_since(service.home, before), "certificate.issue", f"token:{name}")
    assert len(refused) == 1, refused
    assert certificate_count(service.home) == before_count + 4


def test_auditor_reads_but_may_not_write(service: RunningService) -> None:
    admin = service.session(service.admin_token)
    body, _ = issued(admin, service.base)
    secret, name = new_token(service.home, "auditor")
    auditor = service.session(secret)
    url = f"{service.base}{API}/certificates"
    assert auditor.get(f"{url}/{body['serial']}", timeout=TIMEOUT).json()["status"] == "good"
    assert auditor.get(url, params={"limit": 5}, timeout=TIMEOUT).status_code == 200
    count = certificate_count(service.home)
    before = last_event_id(service.home)
    assert_problem(issue(auditor, service.base)[0], 403)
    assert_problem(auditor.post(f"{url}/{body['serial']}/revoke", json={}, timeout=TIMEOUT), 403)
    events = events_since(service.home, before)
    assert _refusals(events, "certificate.issue", f"token:{name}")
    assert _refusals(events, "certificate.revoke", f"token:{name}")
    assert certificate_count(service.home) == count
    assert admin.get(f"{url}/{body['serial']}", timeout=TIMEOUT).json()["status"] == "good"


def test_issuer_revokes_only_its_own(service: RunningService) -> None:
    url = f"{service.base}{API}/certificates"
    secret_a, _ = new_token(service.home, "issuer")
    secret_b, _ = new_token(service.home, "issuer")
    a, b = service.session(secret_a), service.session(secret_b)
    mine, _ = issued(a, service.base)
    theirs, _ = issued(b, service.base)
    before = last_event_id(service.home)
    assert_problem(a.post(f"{url}/{theirs['serial']}/revoke", json={}, timeout=TIMEOUT), 403)
    assert_problem(b.get(f"{url}/{mine['serial']}", timeout=TIMEOUT), 403)
    assert b.get(f"{url}/{theirs['serial']}", timeout=TIMEOUT).status_code == 200
    listed = {i["serial"] for i in _list_all(b, url)}
    assert theirs["serial"] in listed and mine["serial"] not in listed
    ok = a.post(f"{url}/{mine['serial']}/revoke", json={"reason": "superseded"}, timeout=TIMEOUT)
    assert ok.status_code == 200 and ok.json()["revocation_reason"] == "superseded", ok.text
    events = events_since(service.home, before)
    refused = [e for e in events if e.action == "certificate.revoke" and e.outcome == "refused"]
    assert [e.subject for e in refused] == [theirs["serial"]]
    admin = service.session(service.admin_token)
    # the other issuer's certificate stayed good
    assert admin.get(f"{url}/{theirs['serial']}", timeout=TIMEOUT).json()["status"] == "good"


# -- 4. bad input changes nothing -----------------------------------------------------------


def test_bad_input_is_a_problem_and_changes_nothing(service: RunningService, make_csr: Any) -> None:
    admin = service.session(service.admin_token)
    url = f"{service.base}{API}/certificates"
    csr = make_csr(cn="bad-input.svc.test", sans=("bad-input.svc.test",)).decode()
    count = certificate_count(service.home)

    garbage = admin.post(
        url, json={"csr": "-----BEGIN CERTIFICATE REQUEST-----\nnope"}, timeout=TIMEOUT
    )
    assert_problem(garbage, 400, "PKCS#10")
    assert_problem(admin.post(url, json={"csr": "", "profile": "mtls"}, timeout=TIMEOUT), 400)
    # its own connection: see test_connection_stays_usable_after_413
    huge = service.session(service.admin_token).post(
        url,
        data=b'{"csr": "' + b"A" * (70 * 1024) + b'"}',
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert_problem(huge, 413)
    unknown = admin.post(url, json={"csr": csr, "colour": "blue"}, timeout=TIMEOUT)
    assert_problem(unknown, 400, "colour")
    wrong_type = admin.post(url, json={"csr": csr, "ttl": 5}, timeout=TIMEOUT)
    assert_problem(wrong_type, 400, "ttl")
    missing = admin.post(url, json={"profile": "mtls"}, timeout=TIMEOUT)
    assert_problem(missing, 400, "csr")
    not_json = admin.post(
        url, data=b"csr=abc", headers={"Content-Type": "application/json"}, timeout=TIMEOUT
    )
    assert_problem(not_json, 400)
    no_type = admin.post(url, data=b"{not json", timeout=TIMEOUT)
    assert_problem(no_type, 400)
    array = admin.post(url, json=[csr], timeout=TIMEOUT)
    assert_problem(array, 400)
    form = admin.post(url, data={"csr": csr}, timeout=TIMEOUT)
    assert form.status_code in (400, 415)
    assert_problem(form, form.status_code)
    profile = admin.post(url, json={"csr": csr, "profile": "nonesuch"}, timeout=TIMEOUT)
    assert_problem(profile, 400, "nonesuch")
    ttl = admin.post(url, json={"csr": csr, "ttl": "10x"}, timeout=TIMEOUT)
    assert_problem(ttl, 400, "10x")
    too_long = admin.post(url, json={"csr": csr, "ttl": "31d"}, timeout=TIMEOUT)
    assert_problem(too_long, 400, "ttl")
    ca_csr, _ = build_csr(cn="ca.svc.test", sans=("ca.svc.test",), ca=True)
    assert_problem(admin.post(url, json={"csr": ca_csr.decode()}, timeout=TIMEOUT), 400)

    assert certificate_count(service.home) == count


def _chunked(payload: bytes, size: int = 4096) -> Iterator[bytes]:
    """``payload`` as a generator: requests sends it chunked, without Content-Length."""
    for i in range(0, len(payload), size):
        yield payload[i : i + size]


def test_small_chunked_body_is_accepted(service: RunningService, make_csr: Any) -> None:
    """Chunked transfer encoding works for bodies within the limit."""
    payload = json.dumps({"csr": make_csr().decode(), "profile": "mtls-server"}).encode()
    resp = service.session(service.admin_token).post(
        f"{service.base}{API}/certificates",
        data=_chunked(payload, 100),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 201, resp.text


def test_chunked_body_over_the_limit_is_413(service: RunningService, make_csr: Any) -> None:
    """A body without Content-Length is limited too: valid JSON followed by 200 KiB of
    whitespace must be refused with 413, not cut at 64 KiB and issued."""
    payload = json.dumps({"csr": make_csr().decode(), "profile": "mtls-server"}).encode()
    payload += b" " * (200 * 1024)
    count = certificate_count(service.home)
    resp = service.session(service.admin_token).post(
        f"{service.base}{API}/certificates",
        data=_chunked(payload),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert certificate_count(service.home) == count, "an oversized body was issued"
    assert_problem(resp, 413)


def test_connection_stays_usable_after_413(service: RunningService) -> None:
    """A client that keeps its connection (as the server says it may) can go on after 413."""
    s = service.session(service.admin_token)
    oversized = b'{"csr": "' + b"A" * (300 * 1024) + b'"}'
    for _ in range(8):  # the drop depends on timing; eight rounds make it certain
        resp = s.post(
            f"{service.base}{API}/certificates",
            data=oversized,
            headers={"Content-Type": "application/json"},
            timeout=TIMEOUT,
        )
        assert_problem(resp, 413)
        assert s.get(f"{service.base}/healthz", timeout=TIMEOUT).status_code == 200


def test_not_found_and_method_not_allowed_are_problems(service: RunningService) -> None:
    admin = service.session(service.admin_token)
    base = service.base
    assert_problem(admin.get(f"{base}/no/such/path", timeout=TIMEOUT), 404)
    assert_problem(admin.get(f"{base}{API}/nothing", timeout=TIMEOUT), 404)
    assert_problem(service.session().get(f"{service.http_base}/nope", timeout=TIMEOUT), 404)
    # the http listener has no REST API
    assert_problem(
        service.session(service.admin_token).get(
            f"{service.http_base}{API}/certificates", timeout=TIMEOUT
        ),
        404,
    )
    unknown = admin.get(f"{base}{API}/certificates/{'ab' * 16}", timeout=TIMEOUT)
    assert_problem(unknown, 404, "ab" * 16)
    assert_problem(
        admin.post(f"{base}{API}/certificates/{'cd' * 16}/revoke", json={}, timeout=TIMEOUT), 404
    )
    assert_problem(admin.get(f"{base}{API}/certificates/not-hex", timeout=TIMEOUT), 400)
    put = admin.put(f"{base}{API}/certificates", json={}, timeout=TIMEOUT)
    assert_problem(put, 405)
    assert "POST" in put.headers.get("Allow", ""), put.headers
    assert_problem(admin.delete(f"{base}{API}/certificates/{'ab' * 16}", timeout=TIMEOUT), 405)
    assert_problem(admin.get(f"{base}{API}/certificates/{'ab' * 16}/revoke", timeout=TIMEOUT), 405)
    assert_problem(admin.post(f"{base}/healthz", timeout=TIMEOUT), 405)


def test_single_use_token_works_once(service: RunningService) -> None:
    secret, _ = new_token(service.home, "issuer", allowed_names=("*.svc.test",), single_use=True)
    s = service.session(secret)
    first, _ = issue(s, service.base)
    assert first.status_code == 201, first.text
    second, _ = issue(s, service.base)
    assert_problem(second, 401)
    assert "WWW-Authenticate" in second.headers
    assert_problem(s.get(f"{service.base}{API}/certificates", timeout=TIMEOUT), 401)


def test_single_use_token_races_issue_once(service: RunningService) -> None:
    """Four simultaneous issuances with one single-use token: exactly one succeeds."""
    secret, name = new_token(service.home, "issuer", allowed_names=("*.svc.test",), single_use=True)
    count = certificate_count(service.home)
    barrier = threading.Barrier(4)
    results: list[int] = []

    def attempt() -> None:
        s = service.session(secret)
        csr, _ = build_csr(cn=f"{unique('race')}.svc.test", sans=())
        barrier.wait(timeout=10)
        resp = s.post(
            f"{service.base}{API}/certificates",
            json={"csr": csr.decode(), "profile": "mtls-server"},
            timeout=TIMEOUT,
        )
        results.append(resp.status_code)

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [201, 401, 401, 401], results
    assert certificate_count(service.home) == count + 1
    with opened(service.home) as core:
        token = next(t for t in core.list_tokens() if t.name == name)
    assert token.used_at is not None


# -- 7. CA documents, health, metrics, CRL, request ids -------------------------------------


def test_ca_document_matches_ca_export(service: RunningService) -> None:
    resp = service.session().get(f"{service.base}{API}/ca", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    # one CLI run (each costs ~2 s of imports): --chain is the intermediate, then the root
    proc = subprocess.run(
        [str(HSMCA), "--home", str(service.home), "ca", "export", "--chain"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert doc["chain"] == proc.stdout
    assert split_pem(proc.stdout) == [doc["intermediate"], doc["root"]]
    assert split_pem(doc["chain"]) == [doc["intermediate"], doc["root"]]
    assert doc["root"].strip() == service.root.read_text().strip()
    assert doc["ocsp_url"].startswith("http")


def test_issuer_certificate_over_http(service: RunningService) -> None:
    doc = service.session().get(f"{service.base}{API}/ca", timeout=TIMEOUT).json()
    intermediate = x509.load_pem_x509_certificate(doc["intermediate"].encode())
    body, _ = issued(service.session(service.admin_token), service.base)
    issuer_id = (
        service.session(service.admin_token)
        .get(f"{service.base}{API}/certificates/{body['serial']}", timeout=TIMEOUT)
        .json()["issuer_id"]
    )
    resp = service.session().get(f"{service.http_base}/ca/{issuer_id}.der", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/pkix-cert")
    assert x509.load_der_x509_certificate(resp.content) == intermediate
    # the AIA caIssuers URL of the leaf points at the same document
    aia = leaf(body).extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    ca_issuers = [
        d.access_location.value
        for d in aia
        if d.access_method == x509.AuthorityInformationAccessOID.CA_ISSUERS
    ]
    assert ca_issuers and ca_issuers[0].endswith(f"/ca/{issuer_id}.der")
    assert_problem(
        service.session().get(f"{service.http_base}/ca/no-such-issuer.der", timeout=TIMEOUT), 404
    )


def _openssl_verifies_crl(der: bytes, chain: Path) -> None:
    """``openssl crl -inform DER -CAfile chain -noout`` checks the CRL's signature."""
    crl_file = chain.parent / f"{uuid.uuid4().hex}.crl"
    crl_file.write_bytes(der)
    proc = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(crl_file), "-CAfile", str(chain), "-noout"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verify OK" in proc.stdout + proc.stderr


def test_crl_lists_a_revoked_serial(service: RunningService, tmp_path: Path) -> None:
    """The CRL at /crl/<issuer-id>.crl, and the one the certificate's CDP names, list a
    revoked serial (polled: a CRL may be cached), with its reason, and verify with openssl."""
    admin = service.session(service.admin_token)
    body, _ = issued(admin, service.base)
    revoked = admin.post(
        f"{service.base}{API}/certificates/{body['serial']}/revoke",
        json={"reason": "keyCompromise"},
        timeout=TIMEOUT,
    )
    assert revoked.status_code == 200, revoked.text
    issuer_id = revoked.json()["issuer_id"]
    chain = tmp_path / "chain.pem"
    chain.write_text(admin.get(f"{service.base}{API}/ca", timeout=TIMEOUT).json()["chain"])
    plain = service.session()
    serial = int(body["serial"], 16)
    # the CDP names the configured public URL; fetch its path from this service
    cdp = leaf(body).extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    cdp_path = urlsplit(cdp[0].full_name[0].value).path
    assert re.fullmatch(rf"/crl/{issuer_id}[A-Za-z0-9_-]*\.crl", cdp_path), cdp_path

    for path in dict.fromkeys((f"/crl/{issuer_id}.crl", cdp_path)):

        def listed(path: str = path) -> bytes | None:
            resp = plain.get(f"{service.http_base}{path}", timeout=TIMEOUT)
            assert resp.status_code == 200, (path, resp.text)
            assert resp.headers["Content-Type"].startswith("application/pkix-crl")
            crl = x509.load_der_x509_crl(resp.content)
            return resp.content if crl.get_revoked_certificate_by_serial_number(serial) else None

        der = poll(listed, 45, f"the revoked serial to appear in {path}", every=0.5)
        entry = x509.load_der_x509_crl(der).get_revoked_certificate_by_serial_number(serial)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason == x509.ReasonFlags.key_compromise
        _openssl_verifies_crl(der, chain)
    assert_problem(plain.get(f"{service.http_base}/crl/no-such-issuer.crl", timeout=TIMEOUT), 404)


def test_healthz_on_both_listeners(service: RunningService) -> None:
    for base in (service.base, service.http_base):
        resp = service.session().get(f"{base}/healthz", timeout=TIMEOUT)
        assert resp.status_code == 200, (base, resp.text)
        body = resp.json()
        assert body["database"] == "ok" and body["hsm"] == "ok", body
        assert body["status"] == "ok"


def _metric(text: str, name: str, labels: str = "") -> float:
    """The value of the first sample ``name`` (with or without labels) containing ``labels``."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if (sample == name or sample.startswith(f"{name}{{")) and labels in sample:
            return float(value)
    return 0.0


def test_metrics_count_issuance_requests_and_hsm_signing(service: RunningService) -> None:
    plain = service.session()
    before = plain.get(f"{service.base}/metrics", timeout=TIMEOUT).text
    issued(service.session(service.admin_token), service.base, "mtls-client")
    resp = plain.get(f"{service.base}/metrics", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = resp.text
    for name in (
        "hsmca_certificates_issued_total",
        "hsmca_http_requests_total",
        "hsmca_hsm_sign_seconds",
    ):
        assert name in text, name
    label = 'profile="mtls-client"'
    issued_before = _metric(before, "hsmca_certificates_issued_total", label)
    assert _metric(text, "hsmca_certificates_issued_total", label) == issued_before + 1
    sign_before = _metric(before, "hsmca_hsm_sign_seconds_count")
    assert _metric(text, "hsmca_hsm_sign_seconds_count") >= sign_before + 1
    assert _metric(text, "hsmca_http_requests_total", 'route="/api/v1/certificates"') >= 1
    # unmatched paths are one label value, not one per path (bounded cardinality)
    stray = unique("stray")
    assert plain.get(f"{service.base}/{stray}", timeout=TIMEOUT).status_code == 404
    after = plain.get(f"{service.base}/metrics", timeout=TIMEOUT).text
    assert stray not in after
    assert _metric(after, "hsmca_http_requests_total", 'route="unmatched"') >= 1


def test_every_response_has_a_request_id(service: RunningService) -> None:
    plain = service.session()
    urls = [
        f"{service.base}/healthz",
        f"{service.base}{API}/certificates",  # 401
        f"{service.base}/no-such-thing",  # 404
        f"{service.http_base}/healthz",
        f"{service.http_base}/nope",
    ]
    ids = set()
    for url in urls:
        resp = plain.get(url, timeout=TIMEOUT)
        rid = resp.headers.get("X-Request-Id", "")
        assert re.fullmatch(r"[A-Za-z0-9._-]{8,64}", rid), (url, resp.headers)
        ids.add(rid)
    assert len(ids) == len(urls)  # fresh per request
    assert plain.put(f"{service.base}/healthz", timeout=TIMEOUT).headers.get("X-Request-Id")
    for base in (service.base, service.http_base):
        mine = unique("trace.id_X")
        echoed = plain.get(f"{base}/healthz", headers={"X-Request-Id": mine}, timeout=TIMEOUT)
        assert echoed.headers["X-Request-Id"] == mine
    for insane in ("x" * 200, "a b", "<script>", "id\u00e9"):
        resp = plain.get(
            f"{service.base}/healthz",
            headers={"X-Request-Id": insane.encode("utf-8")},  # type: ignore[dict-item]
            timeout=TIMEOUT,
        )
        rid = resp.headers.get("X-Request-Id", "")
        assert rid and rid != insane and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", rid), rid
    problem = plain.get(
        f"{service.base}{API}/certificates", headers={"X-Request-Id": "rid-42"}, timeout=TIMEOUT
    )
    assert problem.headers["X-Request-Id"] == "rid-42"
    assert problem.json().get("request_id") == "rid-42"


# -- 8. the serve command ------------------------------------------------------------------


def test_serve_stops_cleanly_on_sigterm_and_sigint(tmp_path: Path) -> None:
    """Two services on their own homes: one gets SIGTERM, the other SIGINT (at the same
    time, to save time); both exit 0 and both of their listeners are gone."""
    signals = {"term": signal.SIGTERM, "int": signal.SIGINT}
    homes = {}
    for name in signals:
        homes[name] = tmp_path / name
        initialise(homes[name], f"Stop {name}")
    # started one after the other (RunningService migrates the database with alembic,
    # which is not thread-safe), stopped at the same time
    services: dict[str, RunningService] = {}
    codes: dict[str, int] = {}
    try:
        for name, home in homes.items():
            services[name] = RunningService(home)
        for running in services.values():
            resp = running.session(running.admin_token).get(
                f"{running.base}{API}/certificates", timeout=TIMEOUT
            )
            assert resp.status_code == 200
        for name, running in services.items():
            running.process.send_signal(signals[name])
        for name, running in services.items():
            codes[name] = running.process.wait(timeout=40)
    finally:
        finals = {name: running.stop() for name, running in services.items()}
    for name, running in services.items():
        log = running.log.read_text()
        assert codes[name] == 0, (name, log[-2000:])
        assert finals[name] == 0
        assert "hsmca stopped" in log, name
        assert "Traceback" not in log, log[-3000:]
        probe = running.session()
        for port in (running.https_port, running.http_port):
            with pytest.raises(requests.ConnectionError):
                probe.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_second_serve_on_the_same_port_fails_clearly(
    service: RunningService, fresh_home: Path
) -> None:
    """``serve`` on a port in use (HTTPS, then plain HTTP) exits non-zero naming it."""
    procs = {}
    for listener, taken in (("https", service.https_port), ("http", service.http_port)):
        ports = {"https": free_port(), "http": free_port()}
        ports[listener] = taken
        procs[taken] = subprocess.Popen(
            [
                str(HSMCA),
                "--home",
                str(fresh_home),
                "serve",
                "--https-port",
                str(ports["https"]),
                "--http-port",
                str(ports["http"]),
            ],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for taken, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"serve on taken port {taken} kept running: {out}{err}") from None
        assert proc.returncode != 0, out + err
        assert str(taken) in err, out + err
        assert "in use" in err.lower() or "cannot listen" in err.lower(), err
        assert "Traceback" not in out + err, (out + err)[-3000:]
    # the running service is unharmed
    assert service.session().get(f"{service.base}/healthz", timeout=TIMEOUT).status_code == 200


# -- 9. no secrets in the log ---------------------------------------------------------------


def test_log_contains_no_secrets(service: RunningService) -> None:
    """Runs last in this module: after everything above, the log holds no token or PIN."""
    secret, _ = new_token(service.home, "issuer", allowed_names=("*.svc.test",))
    s = service.session(secret)
    issued(s, service.base)
    wrong = "hsmca_" + unique("wrongsecret")
    SECRETS.append(wrong)
    marker = unique("leakcheck")
    service.session(wrong).get(
        f"{service.base}{API}/certificates", headers={"X-Request-Id": marker}, timeout=TIMEOUT
    )
    poll(lambda: marker in service.log.read_text(), 10, "the access log line of the last request")
    log = service.log.read_text()
    assert '"status": 401' in log  # the log really records requests
    pin = (service.home / "secrets" / "hsm.pin").read_text().strip()
    so_pin_file = service.home / "secrets" / "hsm-so.pin"
    secrets = [service.admin_token, *SECRETS, pin]
    if so_pin_file.exists():
        secrets.append(so_pin_file.read_text().strip())
    assert len(pin) >= 8
    for value in secrets:
        assert value not in log, "a secret appears in the service log"
        # nor the part after the prefix
        assert value.removeprefix("hsmca_") not in log, "a secret appears in the service log"
    # at DEBUG (as the suite runs) the request headers are logged, credentials masked
    assert "Bearer hsmca_" not in log and "Bearer " not in log
    assert '"Authorization": "[redacted]"' in log
