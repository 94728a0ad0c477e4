"""Hostile input over real HTTP (issue #8 item 4): a bounded fuzzing run against a real
``hsmca serve`` (one worker) and its body limits.

Every network-facing endpoint gets hostile bodies (the JSON and byte mutants of
:mod:`tests.fuzz_helpers`), validly signed ACME requests with hostile payloads, hostile
OCSP requests and GET paths, and hostile query strings. Each answer must come within a
per-request timeout (no hang), be below 500, and be a problem document when it is an
error (``urn:ietf:params:acme:error:*`` for ACME); the server must answer a normal request
afterwards and its memory (the whole process tree) must stay bounded. Bodies over the
limit are refused with 413 before they are parsed, and a huge one without being read.
"""

from __future__ import annotations

import base64
import json
import random
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.actors import operator
from pki.bootstrap import initialise
from tests.acme_helpers import (
    JOSE,
    AcmeClient,
    Http01Responder,
    b64u,
    configure_acme,
    csr_der,
)
from tests.acme_helpers import poll as acme_poll
from tests.api_helpers import PROBLEM, opened
from tests.conftest import RunningService, build_csr, free_port
from tests.figures import record
from tests.fuzz_helpers import (
    b64,
    hostile_json,
    ocsp_request,
    random_mutant,
    raw_exchange,
    status_of,
    stream_until_answer,
    tree_rss_kib,
)

LIMIT = 65536  # server.max_body_bytes (the default)
#: requests per endpoint, and seconds per endpoint, whichever ends first
CASES_PER_ENDPOINT = 200
SECONDS_PER_ENDPOINT = 1.2
TIMEOUT = (5, 10)
#: the whole process tree may grow this much: the run sends ~50 MB in total, so a
#: server that kept bodies (or parsed objects) would grow far beyond, while caches
#: (SQLAlchemy statements, the OCSP memo, Python's allocator arenas) stay well below
MAX_RSS_GROWTH_KIB = 64 * 1024
ACME_ERROR = "urn:ietf:params:acme:error:"


@dataclass
class Target:
    """The running service and everything the fuzzer signs or authenticates with."""

    svc: RunningService
    acme: AcmeClient
    finalize_url: str
    challenge_url: str
    device_secret: str
    reenrol_identity: tuple[str, str]
    issued_der: bytes
    issuer: x509.Certificate


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    home = tmp_path_factory.mktemp("hostile-http")
    initialise(home, "Hostile Org")
    http01 = free_port()
    configure_acme(home, http01_port=http01, tlsalpn01_port=free_port())
    responder = Http01Responder(http01)
    svc = RunningService(home, workers=1)
    try:
        yield _prepare(svc, responder, tmp_path_factory.mktemp("hostile-files"))
    finally:
        responder.stop()
        assert svc.stop() == 0, svc.log.read_text()[-2000:]


def _prepare(svc: RunningService, responder: Http01Responder, files: Path) -> Target:
    """An ACME account with a ready order (http-01 for 127.0.0.1), a device credential,
    an enrolled device's identity (for simplereenroll) and an issued certificate."""
    acme = AcmeClient(svc)
    assert acme.register().status_code == 201
    order = acme.new_order("127.0.0.1")
    assert order.status_code == 201, order.text
    authz = acme.post(order.json()["authorizations"][0]).json()
    chall = next(c for c in authz["challenges"] if c["type"] == "http-01")
    responder.tokens[chall["token"]] = acme.key_authorization(chall["token"])
    assert acme.post(chall["url"], {}).status_code == 200
    order_url = order.headers["Location"]
    acme_poll(lambda: acme.post(order_url).json(), lambda o: o["status"] == "ready")
    with opened(svc.home) as core:
        secret = core.create_enrollment_credential("fuzz-dev", None, operator("fuzz")).secret
        renewing = core.create_enrollment_credential("fuzz-re", None, operator("fuzz")).secret
    csr, key = build_csr(cn=None, sans=(), serial_number="fuzz-re")
    http = svc.session()
    resp = http.post(
        f"{svc.base}/api/v1/devices/enroll",
        json={"csr": csr.decode()},
        headers={"Authorization": f"Bearer {renewing}"},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 201, resp.text
    cert_path, key_path = files / "dev.pem", files / "dev.key"
    cert_path.write_text(resp.json()["certificate"])
    key_path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    leaf = x509.load_pem_x509_certificate(resp.json()["certificate"].encode())
    issuer = x509.load_pem_x509_certificate(resp.json()["chain"].encode())
    return Target(
        svc,
        acme,
        order.json()["finalize"],
        chall["url"],
        secret,
        (str(cert_path), str(key_path)),
        leaf.public_bytes(serialization.Encoding.DER),
        issuer,
    )


def signed(acme: AcmeClient, url: str, payload: bytes) -> requests.Response:
    """POST a JWS signed with the account's kid carrying ``payload`` as is."""
    protected = {"alg": acme.key.alg, "url": url, "nonce": acme.nonce(), "kid": acme.kid}
    p64, body64 = b64u(json.dumps(protected).encode()), b64u(payload)
    signature = b64u(acme.key.sign(f"{p64}.{body64}".encode()))
    body = json.dumps({"protected": p64, "payload": body64, "signature": signature})
    resp = acme.http.post(url, data=body, headers={"Content-Type": JOSE}, timeout=TIMEOUT)
    acme._nonce = resp.headers.get("Replay-Nonce")
    return resp


@dataclass
class Run:
    """Counts and latencies of the fuzzing run."""

    requests: int = 0
    max_latency: float = 0.0
    per_endpoint: dict[str, int] | None = None

    def check(self, resp: requests.Response, acme: bool = False, ocsp: bool = False) -> None:
        """Below 500; an error is a problem document (an ACME one under /acme)."""
        self.requests += 1
        self.max_latency = max(self.max_latency, resp.elapsed.total_seconds())
        what = (resp.request.method, resp.request.url[:120], resp.status_code, resp.text[:300])
        assert resp.status_code < 500, what
        mimetype = resp.headers.get("Content-Type", "").split(";")[0]
        if ocsp and resp.status_code == 200:
            assert mimetype == "application/ocsp-response", what
        elif resp.status_code >= 400:
            assert mimetype == PROBLEM, what
            if acme:
                assert resp.json()["type"].startswith(ACME_ERROR), what

    def fuzz(self, name: str, bodies: list[bytes], send: Callable[[bytes], None]) -> None:
        """``send`` each body in turn, within the per-endpoint count and time bounds."""
        deadline = time.monotonic() + SECONDS_PER_ENDPOINT
        sent = 0
        for body in bodies[:CASES_PER_ENDPOINT]:
            if time.monotonic() > deadline and sent >= 20:
                break
            send(body)
            sent += 1
        self.per_endpoint = {**(self.per_endpoint or {}), name: sent}


def corpus(rng: random.Random, valid: bytes, hostile: Sequence[bytes] = ()) -> list[bytes]:
    """The hostile bodies first, then random mutants of ``valid``."""
    return [*hostile, *(random_mutant(rng, valid) for _ in range(CASES_PER_ENDPOINT))]


@pytest.mark.slow
def test_fuzzing_every_endpoint_gets_no_5xx_no_hang_and_bounded_memory(target: Target) -> None:
    svc, acme, rng, run = target.svc, target.acme, random.Random(8), Run()
    admin = svc.session(svc.admin_token)
    plain = requests.Session()
    plain.trust_env = False
    rss_before = tree_rss_kib(svc.process.pid)
    started = time.monotonic()
    csr_pem = build_csr(cn="fuzz.svc.test", sans=("fuzz.svc.test",))[0].decode()
    issue = json.dumps({"csr": csr_pem, "profile": "mtls-server", "ttl": "1h"}).encode()
    json_h = {"Content-Type": "application/json"}

    def post(session: requests.Session, url: str, **kw: object) -> Callable[[bytes], None]:
        headers = kw.pop("headers", json_h)
        return lambda body: run.check(
            session.post(url, data=body, headers=headers, timeout=TIMEOUT, **kw),
            acme="/acme/" in url,
        )

    hostile = hostile_json(LIMIT)
    run.fuzz(
        "api-issue", corpus(rng, issue, hostile), post(admin, f"{svc.base}/api/v1/certificates")
    )
    serial = format(x509.load_der_x509_certificate(target.issued_der).serial_number, "x")
    revoke = f"{svc.base}/api/v1/certificates/{serial}/revoke"
    run.fuzz("api-revoke", corpus(rng, b'{"reason": "superseded"}', hostile), post(admin, revoke))

    device = svc.session(target.device_secret)
    other = build_csr(cn=None, sans=(), serial_number="not-fuzz-dev")[0].decode()
    enrol = json.dumps({"csr": other, "device_id": "fuzz-dev"}).encode()
    run.fuzz(
        "devices-enroll",
        corpus(rng, enrol, hostile),
        post(device, f"{svc.base}/api/v1/devices/enroll"),
    )

    est_h = {"Content-Type": "application/pkcs10"}
    est_body = b64(csr_der(["x.svc.test"]))
    est = svc.session()
    est.auth = ("fuzz-dev", target.device_secret)
    run.fuzz(
        "est-simpleenroll",
        corpus(rng, est_body, hostile[:6]),
        post(est, f"{svc.base}/.well-known/est/simpleenroll", headers=est_h),
    )
    reenrol = svc.session()
    reenrol.cert = target.reenrol_identity
    re_body = b64(build_csr(cn=None, sans=(), serial_number="fuzz-re")[0])
    run.fuzz(
        "est-simplereenroll",
        corpus(rng, re_body, hostile[:6]),
        post(reenrol, f"{svc.base}/.well-known/est/simplereenroll", headers=est_h),
    )

    directory = acme.directory
    jose_h = {"Content-Type": JOSE}
    stale = json.dumps({"protected": b64u(b'{"alg":"ES256"}'), "payload": "", "signature": ""})
    run.fuzz(
        "acme-new-account-unsigned",
        corpus(rng, stale.encode(), hostile),
        post(acme.http, directory["newAccount"], headers=jose_h),
    )
    payloads = {
        "acme-new-order": (
            directory["newOrder"],
            b'{"identifiers": [{"type": "dns", "value": "a.svc.test"}]}',
        ),
        "acme-finalize": (
            target.finalize_url,
            json.dumps({"csr": b64u(csr_der(["127.0.0.1"]))}).encode(),
        ),
        "acme-challenge": (target.challenge_url, b"{}"),
        "acme-revoke": (
            directory["revokeCert"],
            json.dumps({"certificate": b64u(target.issued_der), "reason": 4}).encode(),
        ),
        "acme-account": (acme.kid, b'{"contact": ["mailto:a@b.test"]}'),
    }
    for name, (url, valid) in payloads.items():
        run.fuzz(
            name,
            corpus(rng, valid, hostile[2:]),
            lambda body, url=url: run.check(signed(acme, url, body), acme=True),
        )

    ocsp_der = ocsp_request(target.issuer, 0x1234567890ABCDEF)
    run.fuzz(
        "ocsp-post",
        corpus(rng, ocsp_der, [b"", b"\x30" * 9000]),
        lambda body: run.check(
            plain.post(
                f"{svc.http_base}/ocsp",
                data=body,
                headers={"Content-Type": "application/ocsp-request"},
                timeout=TIMEOUT,
            ),
            ocsp=True,
        ),
    )
    paths = [b64(m).decode() for m in corpus(rng, ocsp_der)] + [
        "%",
        "%zz",
        "%00",
        "..%2f..%2fetc",
        "A" * 20000,
        "\u2603",
    ]
    run.fuzz(
        "ocsp-get",
        [p.encode() for p in paths],
        lambda p: run.check(
            plain.get(f"{svc.http_base}/ocsp/{p.decode()}", timeout=TIMEOUT), ocsp=True
        ),
    )

    queries = [f"limit={v}" for v in ("-1", "0", "10" * 20, "1e3", "\u0661", "%00")]
    queries += [
        "cursor=" + "A" * 2000,
        "cursor=%ff%fe",
        "status=%00",
        "expiring_within=99999999999d",
        "x=1",
        "profile=" + "p" * 5000,
    ]
    for name, path in (("api-list", "/api/v1/certificates"), ("devices-list", "/api/v1/devices")):
        run.fuzz(
            name,
            [q.encode() for q in queries],
            lambda q, path=path: run.check(
                admin.get(f"{svc.base}{path}?{q.decode()}", timeout=TIMEOUT)
            ),
        )

    # the service still works, and its memory stayed bounded
    ok = admin.post(f"{svc.base}/api/v1/certificates", data=issue, headers=json_h, timeout=TIMEOUT)
    assert ok.status_code == 201, ok.text
    assert plain.get(f"{svc.http_base}/healthz", timeout=TIMEOUT).status_code == 200
    rss_after = tree_rss_kib(svc.process.pid)
    record(
        "hostile-input/http-fuzz",
        requests=run.requests,
        endpoints=len(run.per_endpoint or {}),
        per_endpoint=run.per_endpoint,
        max_latency_ms=round(run.max_latency * 1000),
        seconds=round(time.monotonic() - started, 1),
        rss_before_mib=round(rss_before / 1024, 1),
        rss_after_mib=round(rss_after / 1024, 1),
    )
    for session in (admin, plain, device, est, reenrol, acme.http):
        session.close()
    assert rss_after - rss_before < MAX_RSS_GROWTH_KIB, (rss_before, rss_after)


def _limited_endpoints(t: Target) -> dict[str, tuple[str, dict[str, str], bytes]]:
    """Path, headers (authenticated, right media type) and a garbage byte for each
    endpoint with a body: garbage that, within the limit, is parsed and refused (400)."""
    basic = base64.b64encode(f"fuzz-dev:{t.device_secret}".encode()).decode()
    admin = {"Authorization": f"Bearer {t.svc.admin_token}", "Content-Type": "application/json"}
    return {
        "api-issue": ("/api/v1/certificates", admin, b"{"),
        "api-revoke": ("/api/v1/certificates/00/revoke", admin, b"{"),
        "devices-enroll": (
            "/api/v1/devices/enroll",
            {"Authorization": f"Bearer {t.device_secret}", "Content-Type": "application/json"},
            b"{",
        ),
        "est-simpleenroll": (
            "/.well-known/est/simpleenroll",
            {"Authorization": f"Basic {basic}", "Content-Type": "application/pkcs10"},
            b"!",
        ),
        "acme-new-account": ("/acme/new-account", {"Content-Type": JOSE}, b"{"),
    }


def _head(path: str, headers: dict[str, str], length: int | None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", *(f"{k}: {v}" for k, v in headers.items())]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_bodies_over_the_limit_are_refused_with_413_before_parsing(target: Target) -> None:
    """Garbage of exactly the limit is parsed and refused (400); one byte more is 413,
    so the limit is applied before any parsing. Chunked bodies (no Content-Length) too."""
    svc, tls = target.svc, ssl.create_default_context(cafile=str(target.svc.root))
    statuses: dict[str, tuple[int, int, int]] = {}
    for name, (path, headers, byte) in _limited_endpoints(target).items():
        at_limit = raw_exchange(svc.https_port, _head(path, headers, LIMIT), byte * LIMIT, tls=tls)
        over = raw_exchange(
            svc.https_port, _head(path, headers, LIMIT + 1), byte * (LIMIT + 1), tls=tls
        )
        body = byte * (LIMIT + 4096)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:40000], body[40000:]))
        chunked = raw_exchange(
            svc.https_port, _head(path, headers, None), chunks + b"0\r\n\r\n", tls=tls
        )
        statuses[name] = (status_of(at_limit), status_of(over), status_of(chunked))
        assert b"application/problem+json" in over and b"application/problem+json" in chunked
    record("hostile-input/body-limit", limit=LIMIT, statuses=statuses)
    for name, (at, over, chunked) in statuses.items():
        assert at == 400 and over == 413 and chunked == 413, (name, at, over, chunked)
    # the plain-HTTP front end: an OCSP request over its limit is malformedRequest, any
    # other body over the app's limit 413, a chunked body 501, all without forwarding
    front = {
        "ocsp": raw_exchange(svc.http_port, _head("/ocsp", {}, 8193), b"\x30" * 8193),
        "other": raw_exchange(
            svc.http_port, _head("/crl/x.crl", {}, LIMIT + 1), b"x" * (LIMIT + 1)
        ),
        "chunked": raw_exchange(svc.http_port, _head("/ocsp", {}, None), b"1\r\n0\r\n0\r\n\r\n"),
    }
    assert status_of(front["ocsp"]) == 200 and front["ocsp"].endswith(b"0\x03\n\x01\x01")
    assert status_of(front["other"]) == 413 and status_of(front["chunked"]) == 501


HUGE = 64 * 1024 * 1024


def test_a_huge_declared_body_is_refused_quickly_without_being_read(target: Target) -> None:
    """64 MiB announced and streamed: the 413 (malformedRequest for OCSP) comes while
    the client is still sending, long before the body is through, and memory stays put."""
    svc = target.svc
    tls = ssl.create_default_context(cafile=str(svc.root))
    endpoints = _limited_endpoints(target)
    rss_before = tree_rss_kib(svc.process.pid)
    figures = {}
    cases = {
        "api-issue": (svc.https_port, tls, _head(*endpoints["api-issue"][:2], HUGE), 413),
        "acme-new-account": (
            svc.https_port,
            tls,
            _head(*endpoints["acme-new-account"][:2], HUGE),
            413,
        ),
        "ocsp-post": (svc.http_port, None, _head("/ocsp", {}, HUGE), 200),
        "front-other": (svc.http_port, None, _head("/crl/x.crl", {}, HUGE), 413),
    }
    for name, (port, context, head, expected) in cases.items():
        answer, sent, seconds = stream_until_answer(port, head, HUGE, context)
        figures[name] = {
            "status": status_of(answer),
            "sent_mib": round(sent / 2**20, 1),
            "s": round(seconds, 2),
        }
        # gunicorn reads (drains) at most 1 MiB after a 413 and then closes: a client
        # still sending may see the reset instead of the answer, never a read to the end
        assert status_of(answer) in (expected, 0), (name, answer[:300])
        assert sent < HUGE // 4 and seconds < 8, (name, sent, seconds)
    rss_after = tree_rss_kib(svc.process.pid)
    record(
        "hostile-input/huge-body",
        declared_mib=HUGE >> 20,
        rss_growth_mib=round((rss_after - rss_before) / 1024, 1),
        **figures,
    )
    assert rss_after - rss_before < 32 * 1024


def test_requests_gunicorn_refuses_itself_get_problem_documents(target: Target) -> None:
    """A request line over 8190 bytes or more than 100 header fields never reaches the
    app: gunicorn answers it, and our workers make that answer problem+json, not HTML."""
    svc, tls = target.svc, ssl.create_default_context(cafile=str(target.svc.root))
    long_line = f"GET /api/v1/certificates?q={'a' * 9000} HTTP/1.1\r\nHost: localhost\r\n\r\n"
    many = "".join(f"X-H{i}: v\r\n" for i in range(120))
    cases = {
        414: long_line.encode(),
        431: f"GET /healthz HTTP/1.1\r\nHost: localhost\r\n{many}\r\n".encode(),
    }
    for status, request in cases.items():
        answer = raw_exchange(svc.https_port, request, b"", tls=tls)
        assert status_of(answer) == status, answer[:300]
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"application/problem+json" in head and b"<html" not in answer
        assert json.loads(body)["status"] == status
