"""Helpers for the HTTPS API tests: tokens made through the core, problem checks, polling.

Everything here talks to the real ``hsmca serve`` started by the ``service`` fixture, or
to the core opened on the same home (to create tokens and read the audit log).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.actors import operator
from pki.audit import StoredEvent
from pki.service import Pki
from tests.conftest import build_csr
from tests.secret_scan import SECRETS, remember  # noqa: F401  (SECRETS: the leak tests)

PROBLEM = "application/problem+json"
TIMEOUT = 15


T = TypeVar("T")


@contextmanager
def opened(home: Path) -> Iterator[Pki]:
    """The core on ``home``, closed afterwards."""
    core = Pki.open(home)
    try:
        yield core
    finally:
        core.close()


def unique(prefix: str) -> str:
    """A name no other test (or xdist worker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def new_token(
    home: Path,
    role: str,
    *,
    allowed_names: tuple[str, ...] = (),
    profiles: tuple[str, ...] = (),
    ttl: dt.timedelta | None = None,
    single_use: bool = False,
    max_ttl: dt.timedelta | None = None,
) -> tuple[str, str]:
    """Create a token through the core; return (secret, token name)."""
    name = unique(role)
    if role == "issuer" and not allowed_names:
        allowed_names = ("*.svc.test",)
    with opened(home) as core:
        created = core.create_token(
            role,
            name,
            operator("api-tests"),
            allowed_names=allowed_names,
            profiles=profiles,
            ttl=ttl,
            single_use=single_use,
            max_ttl=max_ttl,
        )
    remember(created.secret)
    return created.secret, name


def last_event_id(home: Path) -> int:
    with opened(home) as core:
        ids = [e.id for e in core.store.audit_events()]
    return ids[-1] if ids else 0


def events_since(home: Path, after_id: int) -> list[StoredEvent]:
    """Audit events appended after event ``after_id``."""
    with opened(home) as core:
        return [e for e in core.store.audit_events() if e.id > after_id]


def certificate_count(home: Path) -> int:
    with opened(home) as core:
        return core.store.count_certificates()


def assert_problem(resp: requests.Response, status: int, *mentions: str) -> dict[str, Any]:
    """``resp`` is an RFC 9457 problem with ``status`` whose detail names each of
    ``mentions``; never HTML, never a stack trace."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers.get("Content-Type", "").split(";")[0] == PROBLEM, resp.headers
    text = resp.text
    assert "<html" not in text.lower() and "<!doctype" not in text.lower(), text[:500]
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    body = resp.json()
    assert isinstance(body["type"], str) and body["type"], body
    assert isinstance(body["title"], str) and body["title"], body
    assert body["status"] == status, body
    assert isinstance(body["detail"], str) and body["detail"], body
    for word in mentions:
        assert word in body["detail"], (word, body)
    assert resp.headers.get("X-Request-Id"), resp.headers
    return body


def issue(
    session: requests.Session,
    base: str,
    profile: str = "mtls-server",
    cn: str | None = None,
    sans: tuple[str, ...] | None = None,
    ttl: str | None = None,
    key: object | None = None,
) -> tuple[requests.Response, object]:
    """POST /api/v1/certificates for a new (or given) key; return (response, key)."""
    cn = cn or f"{uuid.uuid4().hex[:8]}.svc.test"
    csr, key = build_csr(cn=cn, sans=sans if sans is not None else (cn,), key=key)
    body: dict[str, Any] = {"csr": csr.decode(), "profile": profile}
    if ttl:
        body["ttl"] = ttl
    resp = session.post(f"{base}/api/v1/certificates", json=body, timeout=TIMEOUT)
    return resp, key


def issued(
    session: requests.Session, base: str, profile: str = "mtls-server", **kwargs: Any
) -> tuple[dict[str, Any], object]:
    """Like :func:`issue` but the issuance must succeed; return (body, key)."""
    resp, key = issue(session, base, profile, **kwargs)
    assert resp.status_code == 201, resp.text
    return resp.json(), key


def write_identity(
    directory: Path, body: dict[str, Any], key: object, stem: str
) -> tuple[str, str]:
    """Write leaf+chain PEM and the unencrypted private key; return (cert path, key path)."""
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    cert_path.write_text(body["certificate"] + body["chain"])
    key_path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def leaf(body: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(body["certificate"].encode())


def spki(cert_or_key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a certificate, a private key or a public key."""
    public = cert_or_key.public_key() if hasattr(cert_or_key, "public_key") else cert_or_key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def poll(fn: Callable[[], T | None], deadline_s: float, what: str, every: float = 0.05) -> T:
    """Call ``fn`` until it returns neither None nor False, or the deadline passes (then
    fail). (Not plain truthiness: a 4xx ``requests.Response`` is falsy.)"""
    deadline = time.monotonic() + deadline_s
    while True:
        result = fn()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(every)  # polling interval, bounded by the deadline
