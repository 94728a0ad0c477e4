"""Per-process state of the web layer: the core, opened lazily in each worker.

gunicorn forks workers; each opens its own database pool and PKCS#11 session on first
use (never inherited from the arbiter). Views reach the core through :func:`core`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from flask import current_app, g, request

from pki.actors import Actor
from pki.errors import Unauthorised
from pki.service import Pki

_lock = threading.Lock()
_cores: dict[tuple[int, str], Pki] = {}


def core() -> Pki:
    """The Pki of this process for the app's home."""
    injected = current_app.config.get("HSMCA_PKI")
    if injected is not None:
        return injected
    home = str(current_app.config["HSMCA_HOME"])
    key = (os.getpid(), home)
    found = _cores.get(key)
    if found is None:
        with _lock:
            found = _cores.get(key)
            if found is None:
                found = Pki.open(Path(home), upgrade=False)
                from ca_service.metrics import HSM_SIGN_SECONDS

                found.hsm.sign_observers.append(HSM_SIGN_SECONDS.observe)
                _cores[key] = found
    return found


def peer_certificate() -> bytes | None:
    """The verified client certificate (DER) of this TLS connection, if one was sent."""
    sock = request.environ.get("gunicorn.socket")
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        return getpeercert(binary_form=True)
    except (ValueError, OSError):
        return None


def tls_unique() -> bytes | None:
    """The tls-unique channel binding of this TLS connection (RFC 5929), if there is one."""
    sock = request.environ.get("gunicorn.socket")
    binding = getattr(sock, "get_channel_binding", None)
    if binding is None:
        return None
    try:
        value = binding("tls-unique")
    except (ValueError, OSError):
        return None
    return value or None


def bearer_actor(required: bool = True) -> Actor | None:
    """The actor behind ``Authorization: Bearer``; Unauthorised if missing or invalid."""
    if "actor" in g:
        return g.actor
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        if not required:
            return None
        raise Unauthorised("missing bearer token (Authorization: Bearer <token>)")
    try:
        actor = core().authenticate_token(token.strip())
    except Unauthorised as exc:
        core().audit_refusal("auth.token", None, str(exc))
        raise
    g.actor = actor
    return actor
