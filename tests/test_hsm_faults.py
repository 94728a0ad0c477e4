"""HSM faults (issue #8): the token vanishes while ``hsmca serve`` runs. Requests that need
a signature get a clear 503 problem+json, ``/healthz`` says the HSM is down, no row is
left half-written, OCSP keeps answering from pre-signed responses (and says tryLater,
never a stale "good", where it would have to sign), and service resumes by itself when
the token is back. A wrong PIN or a missing module at start gives one clear error line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from pki.bootstrap import initialise
from tests.acme_helpers import (
    AcmeClient,
    Http01Responder,
    b64u,
    configure_acme,
    csr_der,
    free_port,
)
from tests.acme_helpers import poll as acme_poll
from tests.api_helpers import assert_problem, poll
from tests.conftest import RunningService, build_csr
from tests.figures import record
from tests.helpers import clean_env, sqlite_query

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    home = tmp_path_factory.mktemp("hsm-faults")
    initialise(home, "HSM Fault Org")
    configure_acme(home, http01_port=free_port(), tlsalpn01_port=free_port())
    svc = RunningService(home, workers=1)
    yield svc
    assert svc.stop() == 0, svc.log.read_text()[-2000:]


def _ready_order(svc: RunningService, name: str) -> tuple[AcmeClient, str]:
    """An ACME account and an order for ``name`` made ready through real http-01 (an IP
    identifier, RFC 8738: the validation connects to 127.0.0.1 without DNS)."""
    client = AcmeClient(svc)
    assert client.register().status_code == 201
    order = client.new_order(name)
    assert order.status_code == 201, order.text
    url = order.headers["Location"]
    authz = client.post(order.json()["authorizations"][0]).json()
    chall = next(c for c in authz["challenges"] if c["type"] == "http-01")
    port = tomllib.loads((svc.home / "hsmca.toml").read_text())["acme"]["http01_port"]
    responder = Http01Responder(port)
    try:
        responder.tokens[chall["token"]] = client.key_authorization(chall["token"])
        assert client.post(chall["url"], {}).status_code == 200
        acme_poll(lambda: client.post(url).json(), lambda o: o["status"] == "ready", 20)
    finally:
        responder.stop()
    return client, url


def _issue(s: requests.Session, base: str, name: str) -> requests.Response:
    csr = build_csr(cn=name, sans=(name,))[0].decode()
    return s.post(f"{base}/api/v1/certificates", json={"csr": csr, "profile": "mtls"}, timeout=30)


def _ocsp(svc: RunningService, cert: x509.Certificate) -> ocsp.OCSPResponse:
    issuer = x509.load_pem_x509_certificate((svc.home / "ca" / "intermediate.pem").read_bytes())
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    resp = requests.post(
        f"{svc.http_base}/ocsp",
        data=req.public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
        timeout=10,
    )
    assert resp.status_code == 200
    return ocsp.load_der_ocsp_response(resp.content)


def _presigned(home: Path, serial: str) -> bool:
    return bool(sqlite_query(home, "SELECT 1 FROM ocsp_responses WHERE serial = ?", (serial,)))


def test_token_outage_gives_503_leaves_nothing_behind_and_recovers(
    running: RunningService,
) -> None:
    svc, home = running, running.home
    s = svc.session(svc.admin_token)
    good = _issue(s, svc.base, "before.hsm.test")
    assert good.status_code == 201, good.text
    cert = x509.load_pem_x509_certificate(good.json()["certificate"].encode())
    poll(lambda: _presigned(home, good.json()["serial"]) or None, 20, "a pre-signed response")
    acme, order_url = _ready_order(svc, "127.0.0.1")
    finalize = acme.post(order_url).json()["finalize"]
    rows_before = sqlite_query(home, "SELECT count(*) FROM certificates")[0][0]

    tokens, away = home / "tokens", home / "tokens.away"
    os.rename(tokens, away)
    refused = 0
    try:
        for i in range(6):
            resp = _issue(s, svc.base, f"during-{i}.hsm.test")
            body = assert_problem(resp, 503)
            assert body["type"] == "urn:hsmca:problem:hsm-unavailable", body
            assert "HSM" in body["detail"] and "Traceback" not in resp.text
            assert int(resp.headers["Retry-After"]) > 0
            refused += 1
        # ACME: a 503 to retry, and the order stays ready for that retry
        refused_finalize = acme.post(finalize, {"csr": b64u(csr_der(["127.0.0.1"]))})
        assert refused_finalize.status_code == 503, refused_finalize.text
        assert refused_finalize.json()["type"] == "urn:ietf:params:acme:error:serverInternal"
        assert int(refused_finalize.headers["Retry-After"]) > 0
        assert acme.post(order_url).json()["status"] == "ready"
        health = s.get(f"{svc.base}/healthz", timeout=10)
        assert health.status_code == 503
        assert health.json()["hsm"].startswith("error"), health.json()
        assert health.json()["database"] == "ok"
        # revocation status is still served: the pre-signed response needs no HSM
        assert _ocsp(svc, cert).certificate_status == ocsp.OCSPCertStatus.GOOD
        # nothing half-written: no pending row, no new certificate row, the failures audited
        assert sqlite_query(home, "SELECT count(*) FROM certificates")[0][0] == rows_before
        assert sqlite_query(home, "SELECT serial FROM certificates WHERE status='pending'") == []
        failed = sqlite_query(home, "SELECT count(*) FROM audit_events WHERE outcome = 'failed'")[
            0
        ][0]
        assert failed >= 1
        # a revocation is durable without the HSM, and OCSP never answers it "good"
        revoked = s.post(
            f"{svc.base}/api/v1/certificates/{good.json()['serial']}/revoke",
            json={"reason": "keyCompromise"},
            timeout=30,
        )
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked"
        answer = _ocsp(svc, cert)
        assert answer.response_status == ocsp.OCSPResponseStatus.TRY_LATER
    finally:
        os.rename(away, tokens)
    back_at = time.monotonic()
    poll(
        lambda: s.get(f"{svc.base}/healthz", timeout=10).status_code == 200 or None,
        30,
        "/healthz to report the HSM back",
    )

    def issued_again() -> requests.Response | None:
        resp = _issue(s, svc.base, "after.hsm.test")
        return resp if resp.status_code == 201 else None

    def signed_again() -> ocsp.OCSPResponse | None:
        answer = _ocsp(svc, cert)
        return answer if answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL else None

    assert poll(issued_again, 30, "issuance to resume").json()["serial"]
    recovered = time.monotonic() - back_at
    again = acme.post(finalize, {"csr": b64u(csr_der(["127.0.0.1"]))})
    assert again.status_code == 200 and again.json()["status"] == "valid", again.text
    status = poll(signed_again, 30, "OCSP to sign again")
    assert status.certificate_status == ocsp.OCSPCertStatus.REVOKED
    verify = subprocess.run(
        [str(Path(sys.executable).parent / "hsmca"), "--home", str(home), "audit", "verify"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    record("hsm-faults", refused_503=refused, recovery_seconds=round(recovered, 2))


def _serve_once(home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "hsmca"), "--home", str(home), "serve",
         "--https-port", str(free_port()), "--http-port", str(free_port())],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=120,
        check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HSMCA_HSM__PIN": "not-the-pin-1234"}, "wrong PIN for token 'hsmca'"),
        ({"HSMCA_HSM__MODULE": "/nonexistent/libpkcs11.so"}, "PKCS#11 module not found"),
        ({"HSMCA_HSM__TOKEN_LABEL": "no-such-token"}, "no token labelled 'no-such-token'"),
    ],
    ids=["wrong-pin", "missing-module", "unknown-token"],
)
def test_hsm_misconfigured_at_start_gives_one_clear_line(
    fresh_home: Path, env: dict[str, str], expected: str
) -> None:
    done = _serve_once(fresh_home, **env)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert expected in errors[0] and "Traceback" not in done.stderr
    assert "not-the-pin-1234" not in done.stdout + done.stderr
