"""Helpers for the authorisation matrix (issue #8, item 5): the table of every HTTPS route
x role with its expected status, the world the table's requests refer to, and the
request each cell sends.

Roles: ``anonymous`` (nothing), ``mtls`` (a client certificate issued by the CA, no
token), ``auditor``, ``issuer`` (limited to ``*.allowed.test``) and ``admin`` bearer
tokens. The table covers exactly the rules of the HTTPS app's ``url_map``; a new route
must be added here before the matrix test passes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import urllib.parse
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from tests.acme_helpers import AccountKey, b64u
from tests.api_helpers import TIMEOUT

#: the order the cells of one route are sent in (admin last: its revocations succeed)
ROLES = ("anonymous", "mtls", "auditor", "issuer", "admin")
ALLOWED = "*.allowed.test"
METHODS_IGNORED = frozenset({"HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Route:
    """One (method, rule) of the table: the concrete path (``{placeholders}`` filled from
    :class:`World`), the expected status per role (in :data:`ROLES` order), the body to
    send, and how a refusal must look (``problem``: RFC 9457, ``acme``: RFC 8555 problem,
    ``html``: the dashboard's HTML page)."""

    path: str
    expect: tuple[int, int, int, int, int]
    body: str = "none"
    refusal: str = "problem"


def _all(status: int) -> tuple[int, int, int, int, int]:
    return (status,) * 5


#: anonymous, mtls, auditor, issuer, admin
BEARER_READ = (401, 401, 200, 403, 200)


def _acme_post(path: str) -> Route:
    return Route(path, _all(400), "jose", "acme")


MATRIX: dict[tuple[str, str], Route] = {
    # operator dashboard: admin and auditor only; anyone else sees the login page
    ("GET", "/"): Route("/", (200, 200, 200, 403, 200), refusal="html"),
    ("GET", "/login"): Route("/login", _all(200)),
    ("POST", "/login"): Route("/login", (400, 400, 303, 403, 303), "login", "html"),
    ("POST", "/logout"): Route("/logout", _all(303)),
    # EST: device credentials, IDevIDs or the certificate being renewed; never a token
    ("GET", "/.well-known/est/cacerts"): Route("/.well-known/est/cacerts", _all(200)),
    ("GET", "/.well-known/est/csrattrs"): Route("/.well-known/est/csrattrs", _all(200)),
    ("POST", "/.well-known/est/simpleenroll"): Route(
        "/.well-known/est/simpleenroll", _all(401), "est_device"
    ),
    ("POST", "/.well-known/est/simplereenroll"): Route(
        "/.well-known/est/simplereenroll", (401, 200, 401, 401, 401), "est_reenroll"
    ),
    # ACME: anonymous by design (JWS is its authentication); a bare body is malformed
    ("POST", "/acme/acct/<int:account_id>"): _acme_post("/acme/acct/1"),
    ("POST", "/acme/acct/<int:account_id>/orders"): _acme_post("/acme/acct/1/orders"),
    ("POST", "/acme/authz/<authz_id>"): _acme_post("/acme/authz/x"),
    ("POST", "/acme/cert/<serial>"): _acme_post("/acme/cert/{target}"),
    ("POST", "/acme/chall/<challenge_id>"): _acme_post("/acme/chall/x"),
    ("POST", "/acme/key-change"): _acme_post("/acme/key-change"),
    ("POST", "/acme/new-account"): _acme_post("/acme/new-account"),
    ("POST", "/acme/new-order"): _acme_post("/acme/new-order"),
    ("POST", "/acme/order/<order_id>"): _acme_post("/acme/order/x"),
    ("POST", "/acme/order/<order_id>/finalize"): _acme_post("/acme/order/x/finalize"),
    ("POST", "/acme/revoke-cert"): _acme_post("/acme/revoke-cert"),
    ("GET", "/acme/directory"): Route("/acme/directory", _all(200)),
    ("GET", "/acme/new-nonce"): Route("/acme/new-nonce", _all(204)),
    ("GET", "/acme/terms"): Route("/acme/terms", _all(200)),
    ("GET", "/acme/renewal-info/<path:cert_id>"): Route(
        "/acme/renewal-info/bm90.aGVyZQ", _all(404), refusal="acme"
    ),
    # REST API: bearer tokens; renewal by the client certificate alone
    ("GET", "/api/v1/ca"): Route("/api/v1/ca", _all(200)),
    ("GET", "/api/v1/openapi.json"): Route("/api/v1/openapi.json", _all(200)),
    ("POST", "/api/v1/certificates"): Route(
        "/api/v1/certificates", (401, 401, 403, 201, 201), "issue"
    ),
    ("GET", "/api/v1/certificates"): Route("/api/v1/certificates", (401, 401, 200, 200, 200)),
    ("GET", "/api/v1/certificates/<serial>"): Route("/api/v1/certificates/{target}", BEARER_READ),
    ("POST", "/api/v1/certificates/<serial>/revoke"): Route(
        "/api/v1/certificates/{victim}/revoke", (401, 401, 403, 403, 200), "revoke"
    ),
    ("POST", "/api/v1/certificates/renew"): Route(
        "/api/v1/certificates/renew", (401, 201, 401, 401, 401), "empty_json"
    ),
    ("GET", "/api/v1/devices"): Route("/api/v1/devices", BEARER_READ),
    ("GET", "/api/v1/devices/<device_id>"): Route("/api/v1/devices/{device}", BEARER_READ),
    ("POST", "/api/v1/devices/<device_id>/revoke"): Route(
        "/api/v1/devices/{device}/revoke", (401, 401, 403, 403, 200), "revoke"
    ),
    ("POST", "/api/v1/devices/enroll"): Route("/api/v1/devices/enroll", _all(401), "device_json"),
    # public documents (also on the plain-HTTP listener)
    ("GET", "/ca/<issuer_id>.der"): Route("{ca_issuers_path}", _all(200)),
    ("GET", "/crl/<name>.crl"): Route("{crl_path}", _all(200)),
    ("GET", "/healthz"): Route("/healthz", _all(200)),
    ("GET", "/metrics"): Route("/metrics", _all(200)),
    ("POST", "/ocsp"): Route("/ocsp", _all(200), "ocsp"),
    ("POST", "/ocsp/"): Route("/ocsp/", _all(200), "ocsp"),
    ("GET", "/ocsp/<path:encoded>"): Route("/ocsp/{ocsp_get}", _all(200)),
    ("GET", "/static/<path:filename>"): Route("/static/none.css", _all(404)),
}


def app_routes(home: Path) -> set[tuple[str, str]]:
    """(method, rule) of every route of the HTTPS app (HEAD and OPTIONS aside)."""
    from ca_service import create_app

    app = create_app(home, "https")
    return {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or ()) - METHODS_IGNORED
    }


# -- the world the table refers to -----------------------------------------------------------


@dataclass
class World:
    """A running service and what the table's cells need: a session per role, an
    admin-issued certificate to read (``target``) and one to revoke (``victim``), a
    device, the client certificate of ``mtls``, an OCSP request and public paths."""

    base: str
    sessions: dict[str, requests.Session]
    tokens: dict[str, str]
    target: str
    victim: str
    device: str
    mtls_names: tuple[str, ...]
    ocsp_der: bytes
    paths: dict[str, str] = field(default_factory=dict)

    def path(self, route: Route) -> str:
        values = {"target": self.target, "victim": self.victim, "device": self.device}
        values["ocsp_get"] = urllib.parse.quote(base64.b64encode(self.ocsp_der).decode(), "")
        return route.path.format(**values, **self.paths)

    def send(self, method: str, route: Route, role: str) -> requests.Response:
        """The cell's request, sent as ``role``; redirects are not followed."""
        kwargs = self._body(route.body, role)
        return self.sessions[role].request(
            method, self.base + self.path(route), allow_redirects=False, timeout=TIMEOUT, **kwargs
        )

    def _body(self, kind: str, role: str) -> dict[str, Any]:
        if kind == "issue":
            csr, _ = csr_pem(f"m-{_rand()}.allowed.test")
            return {"json": {"csr": csr.decode(), "profile": "mtls-server"}}
        if kind == "revoke":
            return {"json": {"reason": "keyCompromise"}}
        if kind == "empty_json":
            return {"json": {}}
        if kind == "device_json":
            return {"json": {"csr": device_csr(self.device).decode()}}
        if kind == "est_device":
            return est_body(device_csr(self.device, der=True))
        if kind == "est_reenroll":
            return est_body(csr_pem(*self.mtls_names, der=True)[0])
        if kind == "login":
            token = self.tokens.get(role)
            return {"data": {"token": token} if token else {}}
        if kind == "jose":
            return {"data": "{}", "headers": {"Content-Type": "application/jose+json"}}
        if kind == "ocsp":
            return {"data": self.ocsp_der, "headers": {"Content-Type": "application/ocsp-request"}}
        assert kind == "none", kind
        return {}


def role_session(
    root: Path, token: str | None = None, cert: tuple[str, str] | None = None
) -> requests.Session:
    """A session trusting the CA's root (not the machine's bundle), with a bearer token or
    a client certificate."""
    s = requests.Session()
    s.trust_env = False
    s.verify = str(root)
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    if cert:
        s.cert = cert
    return s


def _rand() -> str:
    return uuid.uuid4().hex[:10]


def csr_pem(*names: str, der: bool = False, cn: str | None = None) -> tuple[bytes, object]:
    """A CSR (PEM, or DER if ``der``) with ``names`` as DNS SANs; CN ``cn`` or the first."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or names[0])])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    sans = [x509.DNSName(n) for n in names]
    builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    return csr.public_bytes(encoding), key


def device_csr(device_id: str, *dns: str, der: bool = False) -> bytes:
    """A device CSR (subject serialNumber = ``device_id``), with ``dns`` SANs if given."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if dns:
        sans = [x509.DNSName(n) for n in dns]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def est_body(der: bytes) -> dict[str, Any]:
    """Request arguments of an EST enrol: base64 PKCS#10 (RFC 8951)."""
    return {"data": base64.b64encode(der), "headers": {"Content-Type": "application/pkcs10"}}


def ocsp_request(cert_pem: str, issuer_pem: str) -> bytes:
    """A DER OCSP request for a certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    issuer = x509.load_pem_x509_certificate(issuer_pem.encode())
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


# -- what a refusal must leave unchanged -------------------------------------------------------

STATE_QUERIES = {
    "certificates": "SELECT status, count(*) FROM certificates GROUP BY status ORDER BY 1",
    "tokens": "SELECT count(*), count(revoked_at) FROM api_tokens",
    "accounts": "SELECT count(*) FROM acme_accounts",
    "orders": "SELECT status, count(*) FROM acme_orders GROUP BY status ORDER BY 1",
    "devices": "SELECT status, count(*) FROM devices GROUP BY status ORDER BY 1",
    "credentials": "SELECT count(*), count(used_at) FROM device_credentials",
    "eab_keys": "SELECT count(*), count(used_at) FROM acme_eab_keys",
}


def state(home: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Counts of every kind of row a request could create or change (SQLite, read-only)."""
    uri = f"file:{home / 'hsmca.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as con:
        return {k: con.execute(q).fetchall() for k, q in STATE_QUERIES.items()}


def refused_events(home: Path, after_id: int) -> list[tuple[str, str, str]]:
    """(action, actor, details) of refused audit events after event ``after_id``."""
    uri = f"file:{home / 'hsmca.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as con:
        sql = "SELECT * FROM audit_events WHERE id > ? ORDER BY id"
        cur = con.execute(sql, (after_id,))
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur]
    return [
        (r["action"], r["actor"], str(r.get("details")))
        for r in rows
        if r.get("outcome") == "refused"
    ]


# -- External Account Binding ------------------------------------------------------------------


def eab_binding(key: AccountKey, kid: str, hmac_key: str, url: str) -> dict[str, str]:
    """The externalAccountBinding JWS of RFC 8555 7.3.4: the account key signed (HS256)
    with the operator's HMAC key (base64url, as ``hsmca acme eab create`` prints it)."""
    protected = b64u(json.dumps({"alg": "HS256", "kid": kid, "url": url}).encode())
    payload = b64u(json.dumps(key.jwk()).encode())
    secret = base64.urlsafe_b64decode(hmac_key + "=" * (-len(hmac_key) % 4))
    mac = hmac.new(secret, f"{protected}.{payload}".encode(), hashlib.sha256).digest()
    return {"protected": protected, "payload": payload, "signature": b64u(mac)}
