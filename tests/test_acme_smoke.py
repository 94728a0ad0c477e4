"""The ACME happy path with the raw JWS client (account, order, http-01, finalize,
download), on SQLite and on PostgreSQL, and two workers sharing one database."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest
from cryptography import x509

from tests.acme_helpers import AcmeClient, AcmeService, ChallTestSrv, Http01Responder, csr_der, poll
from tests.conftest import RunningService


def obtain_certificate(service: AcmeService, name: str) -> x509.Certificate:
    """Run one whole order with http-01 and return the leaf certificate."""
    client = AcmeClient(service)
    assert client.register().status_code == 201
    order = client.new_order(name)
    assert order.status_code == 201, order.text
    authz = client.post(order.json()["authorizations"][0]).json()
    chall = next(c for c in authz["challenges"] if c["type"] == "http-01")
    responder = Http01Responder(service.http01_port)
    try:
        responder.tokens[chall["token"]] = client.key_authorization(chall["token"])
        done = client.post(chall["url"], {})
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "valid", done.text
    finally:
        responder.stop()
    csr = base64.urlsafe_b64encode(csr_der([name])).rstrip(b"=").decode()
    final = client.post(order.json()["finalize"], {"csr": csr})
    assert final.status_code == 200, final.text
    state = poll(
        lambda: client.post(order.headers["Location"]).json(), lambda o: o["status"] == "valid"
    )
    pem = client.post(state["certificate"])
    assert pem.headers["Content-Type"].startswith("application/pem-certificate-chain")
    leaf = x509.load_pem_x509_certificates(pem.content)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [name]
    return leaf


def test_raw_client_obtains_a_certificate(acme_service: AcmeService) -> None:
    obtain_certificate(acme_service, f"{uuid.uuid4().hex[:8]}.acme.test")


@pytest.mark.postgres
def test_acme_on_postgresql(pg_home: Path, challtestsrv: ChallTestSrv) -> None:
    service = AcmeService(pg_home, challtestsrv)
    try:
        obtain_certificate(service, f"{uuid.uuid4().hex[:8]}.pg.acme.test")
    finally:
        assert service.stop() == 0, service.log.read_text()[-2000:]


def test_nonces_and_orders_work_across_workers(acme_service: RunningService) -> None:
    """A nonce minted by one worker is accepted by another, once (two workers, one database)."""
    client = AcmeClient(acme_service)
    assert client.register().status_code == 201
    nonces = {
        client.http.head(client.directory["newNonce"]).headers["Replay-Nonce"] for _ in range(8)
    }
    for nonce in nonces:
        ok = client.post(
            client.directory["newOrder"],
            {"identifiers": [{"type": "dns", "value": f"{uuid.uuid4().hex[:8]}.acme.test"}]},
            nonce=nonce,
        )
        assert ok.status_code == 201, ok.text
        again = client.post(
            client.directory["newOrder"],
            {"identifiers": [{"type": "dns", "value": "x.acme.test"}]},
            nonce=nonce,
        )
        assert again.status_code == 400
        assert again.json()["type"] == "urn:ietf:params:acme:error:badNonce"
