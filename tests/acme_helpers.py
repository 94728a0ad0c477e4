"""Helpers for the ACME tests: pebble-challtestsrv (DNS), an ACME-configured ``hsmca
serve``, a raw JWS client for protocol tests, and an http-01 responder.

Everything is real: the service is ``hsmca serve`` on free loopback ports, DNS answers
come from pebble-challtestsrv, and requests are signed JWS sent over TLS.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import josepy as jose
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from pki.config import dump_toml
from tests.conftest import RunningService

JOSE = "application/jose+json"
ERR = "urn:ietf:params:acme:error:"


def free_port(udp_too: bool = False) -> int:
    """A loopback port that is free now (for TCP, and UDP as well if asked)."""
    while True:
        with closing(socket.socket()) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if not udp_too:
                return port
            with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


# -- pebble-challtestsrv: the DNS server -----------------------------------------------------


def listening(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class ChallTestSrv:
    """A running pebble-challtestsrv: every A query answers 127.0.0.1 (AAAA nothing), TXT
    records on demand, and the challenge responders named in ``responders``."""

    def __init__(
        self, dns_port: int | None, management_port: int, responders: dict[str, int]
    ) -> None:
        self.dns = f"127.0.0.1:{dns_port}"
        self.dns_port = dns_port
        self.management_port = management_port
        self.responders = responders

    def post(self, path: str, payload: dict[str, Any]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.management_port, timeout=5)
        try:
            conn.request("POST", path, json.dumps(payload))
            response = conn.getresponse()
            assert response.status == 200, (path, response.status, response.read())
        finally:
            conn.close()

    def set_txt(self, host: str, value: str) -> None:
        self.post("/set-txt", {"host": host.rstrip(".") + ".", "value": value})

    def clear_txt(self, host: str) -> None:
        self.post("/clear-txt", {"host": host.rstrip(".") + "."})

    def ready(self) -> bool:
        import dns.exception
        import dns.message
        import dns.query

        if not all(map(listening, self.responders.values())):
            return False
        conn = http.client.HTTPConnection("127.0.0.1", self.management_port, timeout=0.5)
        try:
            conn.request("GET", "/")  # any answer (404) shows the management API is up
            conn.getresponse().read()
            if self.dns_port is not None:
                query = dns.message.make_query("ready.example.", "A")
                dns.query.udp(query, "127.0.0.1", port=self.dns_port, timeout=0.2)
        except (OSError, http.client.HTTPException, dns.exception.DNSException):
            return False
        finally:
            conn.close()
        return True


@contextmanager
def running_challtestsrv(dns: bool = True, **ports: int) -> Iterator[ChallTestSrv]:
    """Run pebble-challtestsrv on free ports: a DNS server if ``dns``, and the challenge
    responders named in ``ports`` (``http01=``, ``https01=``, ``tlsalpn01=``) only."""
    exe = shutil.which("pebble-challtestsrv")
    if exe is None:
        pytest.fail("pebble-challtestsrv is not installed: run `make test` (it installs it)")
    for _ in range(5):  # a port picked as free may be taken before the server binds it
        srv = ChallTestSrv(free_port(udp_too=True) if dns else None, free_port(), ports)
        args = [exe, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]
        args += ["-dns01", srv.dns if dns else ""]
        args += ["-management", f"127.0.0.1:{srv.management_port}"]
        for flag in ("http01", "https01", "tlsalpn01"):
            args += [f"-{flag}", f"127.0.0.1:{ports[flag]}" if flag in ports else ""]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None and not srv.ready():
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)  # the pause between polls; notices an early exit
            if proc.poll() is None and srv.ready():
                yield srv
                return
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    pytest.fail("pebble-challtestsrv did not start")


# -- an ACME-configured service --------------------------------------------------------------


def configure_acme(home: Path, **acme: Any) -> None:
    """Set keys of the ``[acme]`` section of the home's hsmca.toml."""
    path = home / "hsmca.toml"
    doc = tomllib.loads(path.read_text())
    doc["acme"].update(acme)
    path.write_text(dump_toml(doc))


class AcmeService(RunningService):
    """``hsmca serve`` whose VA looks up names in ``dns`` and connects to the given ports."""

    def __init__(self, home: Path, dns: ChallTestSrv, workers: int | None = 2, **acme: Any) -> None:
        self.http01_port = acme.pop("http01_port", None) or free_port()
        self.tlsalpn01_port = acme.pop("tlsalpn01_port", None) or free_port()
        configure_acme(
            home,
            http01_port=self.http01_port,
            tlsalpn01_port=self.tlsalpn01_port,
            dns_resolver=dns.dns,
            **acme,
        )
        super().__init__(home, workers=workers)
        self.directory_url = f"{self.base}/acme/directory"


# -- a raw JWS client ------------------------------------------------------------------------


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class AccountKey:
    """An account key that signs JWS with ES256, ES384, RS256 or EdDSA."""

    def __init__(self, alg: str = "ES256") -> None:
        self.alg = alg
        if alg == "ES256":
            self.key: Any = ec.generate_private_key(ec.SECP256R1())
        elif alg == "ES384":
            self.key = ec.generate_private_key(ec.SECP384R1())
        elif alg == "RS256":
            self.key = rsa.generate_private_key(65537, 2048)
        elif alg == "EdDSA":
            self.key = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(alg)

    def jwk(self) -> dict[str, str]:
        if self.alg == "EdDSA":
            raw = self.key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            return {"kty": "OKP", "crv": "Ed25519", "x": b64u(raw)}
        return jose.JWK.load(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).to_partial_json()

    def thumbprint(self) -> str:
        if self.alg == "EdDSA":
            jwk = self.jwk()
            canonical = json.dumps(
                {"crv": jwk["crv"], "kty": "OKP", "x": jwk["x"]}, separators=(",", ":")
            )
            return b64u(hashlib.sha256(canonical.encode()).digest())
        return b64u(
            jose.JWK.load(
                self.key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ).thumbprint()
        )

    def sign(self, message: bytes) -> bytes:
        if self.alg == "EdDSA":
            return self.key.sign(message)
        if self.alg == "RS256":
            from cryptography.hazmat.primitives.asymmetric import padding

            return self.key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        digest = hashes.SHA256() if self.alg == "ES256" else hashes.SHA384()
        r, s = decode_dss_signature(self.key.sign(message, ec.ECDSA(digest)))
        size = (self.key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def jws(
    key: AccountKey,
    url: str,
    payload: Any,
    *,
    nonce: str | None,
    kid: str | None = None,
    alg: str | None = None,
    extra_header: dict[str, Any] | None = None,
) -> dict[str, str]:
    """A flattened JWS; ``payload=None`` is POST-as-GET (empty payload)."""
    protected: dict[str, Any] = {"alg": alg or key.alg, "url": url}
    if nonce is not None:
        protected["nonce"] = nonce
    if kid is None:
        protected["jwk"] = key.jwk()
    else:
        protected["kid"] = kid
    protected.update(extra_header or {})
    p64 = b64u(json.dumps(protected).encode())
    body64 = "" if payload is None else b64u(json.dumps(payload).encode())
    signature = key.sign(f"{p64}.{body64}".encode())
    return {"protected": p64, "payload": body64, "signature": b64u(signature)}


class AcmeClient:
    """A minimal ACME client over a requests session that trusts the test root."""

    def __init__(self, service: RunningService, key: AccountKey | None = None) -> None:
        self.service = service
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.verify = str(service.root)
        self.key = key or AccountKey()
        self.directory = self.http.get(f"{service.base}/acme/directory", timeout=10).json()
        self.kid: str | None = None
        self._nonce: str | None = None

    def nonce(self) -> str:
        if self._nonce is not None:
            found, self._nonce = self._nonce, None
            return found
        resp = self.http.head(self.directory["newNonce"], timeout=10)
        return resp.headers["Replay-Nonce"]

    def post(
        self,
        url: str,
        payload: Any = None,
        *,
        use_jwk: bool = False,
        key: AccountKey | None = None,
        nonce: str | None = None,
        signed_url: str | None = None,
        **options: Any,
    ) -> requests.Response:
        """POST a JWS (``payload=None``: POST-as-GET) signed with the account's kid
        (or its jwk when ``use_jwk`` or there is no account yet)."""
        body = jws(
            key or self.key,
            signed_url or url,
            payload,
            nonce=nonce if nonce is not None else self.nonce(),
            kid=None if use_jwk or self.kid is None else self.kid,
            **options,
        )
        resp = self.http.post(
            url, data=json.dumps(body), headers={"Content-Type": JOSE}, timeout=30
        )
        self._nonce = resp.headers.get("Replay-Nonce")
        return resp

    def register(self, **fields: Any) -> requests.Response:
        payload = {"termsOfServiceAgreed": True, **fields}
        resp = self.post(self.directory["newAccount"], payload, use_jwk=True)
        if resp.status_code in (200, 201):
            self.kid = resp.headers["Location"]
        return resp

    def new_order(self, *names: str, **fields: Any) -> requests.Response:
        identifiers = [{"type": "ip" if _is_ip(n) else "dns", "value": n} for n in names]
        return self.post(self.directory["newOrder"], {"identifiers": identifiers, **fields})

    def key_authorization(self, token: str) -> str:
        return f"{token}.{self.key.thumbprint()}"


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def csr_der(names: list[str], key: Any = None, common_name: str | None = None) -> bytes:
    """A DER CSR for ``names`` (DNS or IP SANs)."""
    import ipaddress

    from cryptography import x509

    key = key or ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        if _is_ip(name):
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        else:
            sans.append(x509.DNSName(name))
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or names[0])])
    )
    builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# -- an http-01 responder ---------------------------------------------------------------------


class Http01Responder(ThreadingHTTPServer):
    """Serves ``/.well-known/acme-challenge/<token>`` from :attr:`tokens` on 127.0.0.1."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        self.tokens: dict[str, str] = {}
        self.requests_seen: list[str] = []
        super().__init__(("127.0.0.1", port), _Http01Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class _Http01Handler(BaseHTTPRequestHandler):
    server: Http01Responder

    def do_GET(self) -> None:
        self.server.requests_seen.append(self.path)
        token = self.path.rsplit("/", 1)[-1]
        body = self.server.tokens.get(token)
        if not self.path.startswith("/.well-known/acme-challenge/") or body is None:
            self.send_response(404)
            self.end_headers()
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def poll(fetch: Any, done: Any, deadline_s: float = 20.0) -> Any:
    """Call ``fetch()`` until ``done(result)``; fail after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = fetch()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not done before the deadline: {result!r}")
        time.sleep(0.1)  # polling interval, bounded by the deadline
