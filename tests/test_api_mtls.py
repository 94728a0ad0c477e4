"""mTLS with certificates issued through the REST API: renewal by client certificate, and a
real handshake between two parties that trust only the hsmca root."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509

from pki.actors import operator
from pki.service import IssueRequest
from tests.api_helpers import (
    TIMEOUT,
    assert_problem,
    certificate_count,
    events_since,
    issued,
    last_event_id,
    leaf,
    opened,
    spki,
    write_identity,
)
from tests.conftest import RunningService, build_csr

RENEW = "/api/v1/certificates/renew"


def _identity(
    service: RunningService,
    directory: Path,
    profile: str = "mtls-client",
    cn: str | None = None,
    sans: tuple[str, ...] | None = None,
    ttl: str | None = None,
) -> tuple[dict[str, Any], object, tuple[str, str]]:
    """Issue through the API as admin; return (response body, key, (cert path, key path))."""
    cn = cn or f"c{uuid.uuid4().hex[:10]}.svc.test"
    body, key = issued(
        service.session(service.admin_token), service.base, profile, cn=cn, sans=sans, ttl=ttl
    )
    return body, key, write_identity(directory, body, key, body["serial"])


def _record(service: RunningService, serial: str) -> dict[str, Any]:
    resp = service.session(service.admin_token).get(
        f"{service.base}/api/v1/certificates/{serial}", timeout=TIMEOUT
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


# -- 5. renewal over mTLS -------------------------------------------------------------------


def test_renew_with_the_same_key(service: RunningService, tmp_path: Path) -> None:
    body, key, identity = _identity(service, tmp_path, ttl="2h")
    before = last_event_id(service.home)
    resp = service.session().post(f"{service.base}{RENEW}", cert=identity, timeout=TIMEOUT)
    assert resp.status_code == 201, resp.text
    new = resp.json()
    assert new["serial"] != body["serial"]
    assert new["profile"] == "mtls-client"
    old_cert, new_cert = leaf(body), leaf(new)
    assert spki(new_cert) == spki(old_cert) == spki(key)
    san = x509.SubjectAlternativeName
    assert (
        new_cert.extensions.get_extension_for_class(san).value
        == old_cert.extensions.get_extension_for_class(san).value
    )
    assert new_cert.subject == old_cert.subject
    assert _record(service, new["serial"])["sans"] == _record(service, body["serial"])["sans"]
    assert new_cert.not_valid_after_utc >= old_cert.not_valid_after_utc
    # the same lifetime as the certificate it renews (2h), not the profile default (24h)
    lifetime = new_cert.not_valid_after_utc - new_cert.not_valid_before_utc
    assert dt.timedelta(hours=2) <= lifetime <= dt.timedelta(hours=2, minutes=2), lifetime
    renewals = [
        e
        for e in events_since(service.home, before)
        if e.action == "certificate.renew" and e.outcome == "ok"
    ]
    assert [e.details.get("renewal_of") for e in renewals] == [body["serial"]]
    # the renewed certificate is itself a working identity
    again = service.session().post(
        f"{service.base}{RENEW}",
        cert=write_identity(tmp_path, new, key, new["serial"]),
        timeout=TIMEOUT,
    )
    assert again.status_code == 201, again.text


def test_renew_with_a_new_key_for_the_same_names(service: RunningService, tmp_path: Path) -> None:
    cn = f"n{uuid.uuid4().hex[:10]}.svc.test"
    body, key, identity = _identity(service, tmp_path, cn=cn)
    csr, new_key = build_csr(cn=cn, sans=(cn,))
    resp = service.session().post(
        f"{service.base}{RENEW}", json={"csr": csr.decode()}, cert=identity, timeout=TIMEOUT
    )
    assert resp.status_code == 201, resp.text
    new = leaf(resp.json())
    assert spki(new) == spki(new_key) != spki(key)
    assert resp.json()["serial"] != body["serial"]
    assert _record(service, resp.json()["serial"])["sans"] == [f"dns:{cn}"]


def test_renew_for_other_names_is_403(service: RunningService, tmp_path: Path) -> None:
    cn = f"o{uuid.uuid4().hex[:10]}.svc.test"
    _, _, identity = _identity(service, tmp_path, cn=cn)
    count = certificate_count(service.home)
    before = last_event_id(service.home)
    for sans in ((cn, "other.svc.test"), ("other.svc.test",)):
        csr, _ = build_csr(cn=sans[0], sans=sans)
        resp = service.session().post(
            f"{service.base}{RENEW}", json={"csr": csr.decode()}, cert=identity, timeout=TIMEOUT
        )
        assert_problem(resp, 403)
    bad = service.session().post(
        f"{service.base}{RENEW}", json={"csr": "garbage"}, cert=identity, timeout=TIMEOUT
    )
    assert_problem(bad, 400)
    extra = service.session().post(
        f"{service.base}{RENEW}", json={"profile": "mtls"}, cert=identity, timeout=TIMEOUT
    )
    assert_problem(extra, 400, "profile")
    assert certificate_count(service.home) == count
    refused = [
        e
        for e in events_since(service.home, before)
        if e.action == "certificate.renew" and e.outcome == "refused"
    ]
    assert len(refused) >= 2


def test_renew_without_a_client_certificate_is_401(service: RunningService) -> None:
    count = certificate_count(service.home)
    anonymous = service.session().post(f"{service.base}{RENEW}", timeout=TIMEOUT)
    assert_problem(anonymous, 401)
    # a bearer token is not a client certificate
    admin = service.session(service.admin_token).post(f"{service.base}{RENEW}", timeout=TIMEOUT)
    assert_problem(admin, 401)
    assert certificate_count(service.home) == count


def test_renew_with_a_certificate_from_another_ca_issues_nothing(
    service: RunningService, fresh_home: Path, tmp_path: Path
) -> None:
    cn = f"f{uuid.uuid4().hex[:10]}.svc.test"
    csr, key = build_csr(cn=cn, sans=(cn,))
    with opened(fresh_home) as other:
        record = other.issue(IssueRequest(csr, "mtls-client"), operator("other-ca"))
    identity = write_identity(
        tmp_path, {"certificate": record.certificate_pem, "chain": record.chain_pem}, key, "f"
    )
    count = certificate_count(service.home)
    try:
        resp = service.session().post(f"{service.base}{RENEW}", cert=identity, timeout=TIMEOUT)
    except (requests.exceptions.SSLError, requests.exceptions.ConnectionError):
        pass  # the handshake refused the foreign certificate: fine
    else:
        assert_problem(resp, 401)
    assert certificate_count(service.home) == count
    assert service.session().get(f"{service.base}/healthz", timeout=TIMEOUT).status_code == 200


def test_renew_with_a_revoked_certificate_is_401(service: RunningService, tmp_path: Path) -> None:
    body, _, identity = _identity(service, tmp_path)
    revoked = service.session(service.admin_token).post(
        f"{service.base}/api/v1/certificates/{body['serial']}/revoke",
        json={"reason": "keyCompromise"},
        timeout=TIMEOUT,
    )
    assert revoked.status_code == 200, revoked.text
    count = certificate_count(service.home)
    resp = service.session().post(f"{service.base}{RENEW}", cert=identity, timeout=TIMEOUT)
    assert_problem(resp, 401)
    assert certificate_count(service.home) == count


# -- 6. a real mTLS handshake between two parties -------------------------------------------


class _TlsServer:
    """A one-thread TLS server on a free loopback port that requires a client certificate
    from the hsmca root; records each client's common name (or the handshake error)."""

    def __init__(self, cert: str, key: str, root: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cafile=str(root))
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.seen: list[str] = []
        self.errors: list[Exception] = []
        self._thread: threading.Thread | None = None

    def accept_one(self) -> None:
        """Serve the next connection in a thread."""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "TLS server thread hung"

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError as exc:
            self.errors.append(exc)
            return
        conn.settimeout(10)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                cn = next(v for rdn in peer["subject"] for k, v in rdn if k == "commonName")
                self.seen.append(cn)
                tls.sendall(f"hello {cn}".encode())
        except (ssl.SSLError, OSError, StopIteration) as exc:
            self.errors.append(exc)
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _client_context(root: Path, identity: tuple[str, str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(root))
    if identity:
        context.load_cert_chain(*identity)
    return context


def _talk(server: _TlsServer, context: ssl.SSLContext, hostname: str) -> bytes:
    server.accept_one()
    try:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            return tls.recv(200)
    finally:
        server.join()


def test_mtls_handshake_with_api_issued_certificates(
    service: RunningService, tmp_path: Path
) -> None:
    server_body, _, server_identity = _identity(
        service, tmp_path, "mtls-server", cn="a.svc.test", sans=("a.svc.test", "127.0.0.1")
    )
    client_cn = f"client-{uuid.uuid4().hex[:8]}.svc.test"
    _, _, client_identity = _identity(service, tmp_path, "mtls-client", cn=client_cn)
    server = _TlsServer(*server_identity, service.root)
    try:
        for hostname in ("a.svc.test", "127.0.0.1"):
            got = _talk(server, _client_context(service.root, client_identity), hostname)
            assert got == f"hello {client_cn}".encode()
        assert server.seen == [client_cn, client_cn]
        assert server.errors == []

        # no client certificate: the server refuses the handshake
        try:
            got = _talk(server, _client_context(service.root, None), "a.svc.test")
        except (ssl.SSLError, OSError):
            got = b""
        assert got == b"", "the server talked to a client without a certificate"
        assert len(server.errors) == 1 and server.seen == [client_cn, client_cn]

        # the wrong name: the client refuses the server
        with pytest.raises(ssl.SSLCertVerificationError):
            _talk(server, _client_context(service.root, client_identity), "b.svc.test")
        assert server.seen == [client_cn, client_cn]
    finally:
        server.close()
    assert "a.svc.test" in leaf(server_body).subject.rfc4514_string()


def test_client_profile_cannot_act_as_a_server(service: RunningService, tmp_path: Path) -> None:
    """EKUs matter: an mtls-client certificate is refused as a TLS server certificate."""
    _, _, wrong_server = _identity(
        service, tmp_path, "mtls-client", cn="a.svc.test", sans=("a.svc.test",)
    )
    _, _, client_identity = _identity(service, tmp_path, "mtls-client")
    server = _TlsServer(*wrong_server, service.root)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            _talk(server, _client_context(service.root, client_identity), "a.svc.test")
        assert server.seen == []
    finally:
        server.close()
