"""Helpers for the revocation tests: a real ``hsmca serve`` whose certificates point at
its own plain-HTTP port, and thin wrappers around the real ``openssl`` and ``curl``.

Certificates carry CDP/AIA URLs from ``server.public_http_url``; the tests that follow
those URLs therefore run their own service on a home whose public URL names the port the
service really listens on (:func:`start_pinned_service`).
"""

from __future__ import annotations

import socket
import subprocess
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from pki.bootstrap import initialise
from pki.config import write_default_config
from tests.api_helpers import opened, poll
from tests.conftest import RunningService, build_csr, free_port

TIMEOUT = 20
OCSP_REQUEST = "application/ocsp-request"
OCSP_RESPONSE = "application/ocsp-response"

T = TypeVar("T")


class PinnedService(RunningService):
    """:class:`RunningService` on ports chosen before ``init`` (so that the home's
    ``public_http_url`` and the certificates it issues name the real listener)."""

    def __init__(self, home: Path, https_port: int, http_port: int, workers: int = 1) -> None:
        super().__init__(home, workers, https_port=https_port, http_port=http_port)
        with opened(home) as core:
            self.issuer_id = core.issuing_issuer().id
            self.root_id = core.root_issuer().id
        self.intermediate = home / "ca" / "intermediate.pem"
        self.chain = home / "ca" / "chain.pem"

    def admin(self) -> requests.Session:
        """A requests.Session with the admin token (no proxies, our root trusted)."""
        return self.session(self.admin_token)  # type: ignore[return-value]

    @property
    def ocsp_url(self) -> str:
        return f"{self.http_base}/ocsp"


def pinned_home(directory: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Initialise a home in ``directory`` whose public HTTP URL is a free local port."""
    home = directory / "home"
    home.mkdir(parents=True)
    http_port, https_port = free_port(), free_port()
    server = {
        "public_http_url": f"http://127.0.0.1:{http_port}",
        "http_port": http_port,
        "https_port": https_port,
    }
    write_default_config(home, {"server": server, **(overrides or {})})
    initialise(home, "Revocation Org")
    return home


def start_pinned_service(directory: Path) -> PinnedService:
    """A fresh home in ``directory`` and a real service on the ports its URLs name."""
    home = pinned_home(directory)
    with opened(home) as core:
        server = core.settings.server
    return PinnedService(home, server.https_port, server.http_port)


# -- certificates through the REST API -----------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A certificate issued through the REST API and written to ``path`` (PEM, leaf only)."""

    serial: str
    cert: x509.Certificate
    path: Path


def issue_leaf(svc: PinnedService, directory: Path, stem: str) -> Leaf:
    """POST /api/v1/certificates (mtls-server) and write the leaf PEM."""
    cn = f"{stem.lower().replace('_', '-')}.svc.test"
    csr, _key = build_csr(cn=cn, sans=(cn,))
    resp = svc.admin().post(
        f"{svc.base}/api/v1/certificates",
        json={"csr": csr.decode(), "profile": "mtls-server"},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    path = directory / f"{stem}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Leaf(body["serial"], cert, path)


def revoke_api(svc: PinnedService, serial: str, reason: str) -> dict[str, Any]:
    """POST /api/v1/certificates/<serial>/revoke as admin; the record."""
    resp = svc.admin().post(
        f"{svc.base}/api/v1/certificates/{serial}/revoke",
        json={"reason": reason},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "revoked", body
    return body


# -- plain HTTP ------------------------------------------------------------------------------


def plain_session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s


def http_get(url: str) -> requests.Response:
    """GET over plain HTTP (127.0.0.1 only, no proxies)."""
    assert url.startswith("http://127.0.0.1:"), url
    with plain_session() as s:
        return s.get(url, timeout=TIMEOUT)


def ocsp_post(url: str, der: bytes, session: requests.Session | None = None) -> requests.Response:
    s = session or plain_session()
    return s.post(url, data=der, headers={"Content-Type": OCSP_REQUEST}, timeout=TIMEOUT)


def percent_encode(text: str) -> str:
    """URL-encode every reserved character ('/', '+', '=' included)."""
    return urllib.parse.quote(text, safe="")


def load_response(der: bytes) -> ocsp.OCSPResponse:
    return ocsp.load_der_ocsp_response(der)


# -- the openssl and curl command-line tools -----------------------------------------------


def run(cmd: Sequence[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a real command-line tool; text output, never raises on failure."""
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


def openssl_ocsp(svc: PinnedService, *args: str) -> subprocess.CompletedProcess[str]:
    """``openssl ocsp -issuer <intermediate> ARGS -url <our responder> -CAfile <chain>``."""
    return run(
        [
            "openssl", "ocsp", "-issuer", str(svc.intermediate), *args,
            "-url", svc.ocsp_url, "-CAfile", str(svc.chain),
        ]
    )  # fmt: skip


def status_line(done: subprocess.CompletedProcess[str], cert: Path | str) -> str:
    """What ``openssl ocsp`` printed after ``<cert>: `` (good, revoked, unknown)."""
    prefix = f"{cert}: "
    for line in done.stdout.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise AssertionError(f"no status for {cert} in: {done.stdout}\n{done.stderr}")


def der_crl_to_pem(der: bytes, path: Path) -> Path:
    path.write_bytes(x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM))
    return path


def openssl_verify(
    chain: Path, leaf: Path, crls: Sequence[Path], *flags: str
) -> subprocess.CompletedProcess[str]:
    """``openssl verify -crl_check FLAGS -CAfile chain -CRLfile ... leaf``."""
    cmd = ["openssl", "verify", "-crl_check", *flags, "-CAfile", str(chain)]
    for crl in crls:
        cmd += ["-CRLfile", str(crl)]
    return run([*cmd, str(leaf)])


def curl(url: str, out: Path) -> dict[str, str]:
    """``curl`` a plain-HTTP URL into ``out``; the response headers (lower-case names)."""
    assert url.startswith("http://127.0.0.1:"), url
    done = run(
        ["curl", "-sS", "--noproxy", "*", "-D", "-", "-o", str(out), "--max-time", "20", url]
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.replace("\r", "").split("\n")
    assert lines[0].startswith("HTTP/1.1 200"), done.stdout
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers


def cdp_url(cert: x509.Certificate) -> str:
    """The single URI of a certificate's CRL distribution point."""
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert len(points) == 1 and points[0].full_name is not None, points
    (name,) = points[0].full_name
    assert isinstance(name, x509.UniformResourceIdentifier)
    return name.value


def aia_url(cert: x509.Certificate, method: x509.ObjectIdentifier) -> str:
    access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    (url,) = [d.access_location.value for d in access if d.access_method == method]
    return url


def serials_of(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def wait_presigned(home: Path, serial: str, deadline_s: float = 10.0) -> None:
    """Poll the home's database until the publisher has pre-signed ``serial``'s SHA-1
    and SHA-256 responses (it does so for new certificates every second)."""
    from tests.helpers import sqlite_query

    def stored() -> bool:
        rows = sqlite_query(
            home, "SELECT hash_algorithm FROM ocsp_responses WHERE serial = ?", (serial,)
        )
        return {r[0] for r in rows} == {"sha1", "sha256"}

    poll(stored, deadline_s, f"pre-signed OCSP responses for {serial}", every=0.1)


def open_idle_socket(port: int, send: bytes = b"") -> socket.socket:
    """A client that connects and sends ``send`` (maybe nothing), then stalls."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if send:
        sock.sendall(send)
    return sock
