"""The renewal agent behind ``hsmca agent``: keeps one mTLS identity (key + certificate
files) alive against the hsmca REST API.

It enrols once with a bearer token (normally single-use), then renews itself over mutual
TLS with its own certificate at about two thirds of the lifetime, with a new key each
time. Files are replaced atomically, the reload command runs after each change, and an
unreachable CA is retried with capped exponential back-off that never sleeps past the
point where the certificate would lapse. See docs/agent.md.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cli.agent_material import (
    AgentError,
    allows_client_auth,
    atomic_write,
    build_csr,
    certificate_names,
    fsync_dir,
    new_private_key,
    normalise_names,
    public_key_der,
)
from pki.serials import serial_hex

#: environment variable the token may come from (never passed on to the reload command)
TOKEN_ENV = "HSMCA_AGENT_TOKEN"
ENROL_PATH = "/api/v1/certificates"
RENEW_PATH = "/api/v1/certificates/renew"
#: renew at this fraction of the lifetime (notBefore to notAfter) ...
RENEW_AT = 2 / 3
#: ... plus or minus this fraction of the lifetime, drawn once per certificate
JITTER = 0.05
#: longest single sleep: the schedule is re-read from the wall clock at least this often
MAX_NAP = 60.0
#: (connect, read) timeouts of one request to the CA
HTTP_TIMEOUT = (10.0, 30.0)
#: HTTP statuses worth retrying; any other non-201 answer is a refusal
RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})
#: longest Retry-After the agent honours (still never past the lapse deadline)
MAX_RETRY_AFTER = 300.0
#: fewest seconds between two new certificates in the long-running mode
MIN_CHANGE_GAP = 30.0

log = logging.getLogger("hsmca.agent")


class CaUnavailable(Exception):
    """The CA could not be reached or answered with a transient error: retry later."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs, as given on the command line."""

    ca_url: str
    root: Path
    names: tuple[str, ...]
    cert_path: Path
    key_path: Path
    token: str | None = field(default=None, repr=False)
    profile: str = "mtls"
    ttl: str | None = None
    reload_command: str | None = None
    key_type: str = "ec-p256"
    reload_timeout: float = 300.0
    backoff_initial: float = 1.0
    backoff_cap: float = 60.0


@dataclass(frozen=True)
class Identity:
    """The certificate currently installed at ``--cert`` (usable: key matches, not expired,
    right names, chains to ``--root``)."""

    cert: x509.Certificate
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def point(self, fraction: float) -> dt.datetime:
        """The instant ``fraction`` of the way from notBefore to notAfter."""
        return self.not_before + self.lifetime * fraction


def lapse_margin(lifetime: dt.timedelta) -> dt.timedelta:
    """How long before notAfter the last retry must have happened: 5 % of the lifetime,
    between 1 s and 5 min."""
    return min(max(lifetime * 0.05, dt.timedelta(seconds=1)), dt.timedelta(minutes=5))


def retry_delay(backoff: float, now: dt.datetime, identity: Identity | None) -> float:
    """Seconds to wait before the next attempt: the back-off, but never past the point
    where ``identity`` lapses minus :func:`lapse_margin` (at least 1 s apart)."""
    if identity is None:
        return backoff
    deadline = identity.not_after - lapse_margin(identity.lifetime)
    return max(1.0, min(backoff, (deadline - now).total_seconds()))


class Backoff:
    """Exponential back-off: ``initial`` doubling up to ``cap`` seconds."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial, self.cap = initial, cap
        self._next = initial

    def next(self) -> float:
        value = self._next
        self._next = min(self._next * 2, self.cap)
        return value

    def reset(self) -> None:
        self._next = self.initial


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def _transport_reason(exc: Exception) -> str:
    """A short reason for a failed request (requests' messages run to several lines)."""
    import requests

    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        found = re.search(r"\[SSL: [A-Z0-9_]+\] ([^(')\"]+)", text)
        return f"TLS error: {found.group(1).strip() if found else _one_line(text, 120)}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if found:
        return found.group(1).strip()
    return f"{type(exc).__name__}: {_one_line(text, 120)}"


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Agent:
    """One identity (``config.names``) kept alive in ``config.cert_path``/``key_path``."""

    def __init__(
        self,
        config: AgentConfig,
        now: Callable[[], dt.datetime] = _utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.names = normalise_names(config.names)
        self.now = now
        self.rng = rng or random.Random()
        self._jitter: tuple[str, float] | None = None
        self._announced: str | None = None
        self._roots: list[x509.Certificate] | None = None

    # -- the installed identity ------------------------------------------------------------

    @property
    def staged_key_path(self) -> Path:
        """Where a new key waits while the certificate is being replaced."""
        return self.config.key_path.with_name(self.config.key_path.name + ".new")

    def roots(self) -> list[x509.Certificate]:
        if self._roots is None:
            try:
                self._roots = x509.load_pem_x509_certificates(self.config.root.read_bytes())
            except ValueError:
                raise AgentError(f"--root {self.config.root}: no PEM certificate in it") from None
        return self._roots

    def current(self) -> tuple[Identity | None, str]:
        """The usable installed identity, or None and why there is none."""
        self._recover()
        cert_path, key_path = self.config.cert_path, self.config.key_path
        if not cert_path.exists() or not key_path.exists():
            return None, f"no certificate and key at {cert_path} and {key_path}"
        try:
            certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            return None, f"cannot read {cert_path} or {key_path} ({_one_line(str(exc), 80)})"
        leaf = certs[0]
        if public_key_der(leaf.public_key()) != public_key_der(key.public_key()):
            return None, f"the key at {key_path} does not belong to the certificate"
        identity = Identity(
            leaf,
            serial_hex(leaf.serial_number),
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
        )
        if identity.not_after <= self.now():
            return None, f"certificate {identity.serial} expired at {_iso(identity.not_after)}"
        if certificate_names(leaf) != set(self.names):
            found = ", ".join(sorted(certificate_names(leaf))) or "none"
            return None, f"certificate {identity.serial} is for other names ({found})"
        if not self._chains_to_root(certs):
            return None, f"certificate {identity.serial} does not chain to {self.config.root}"
        return identity, "ok"

    def _chains_to_root(self, certs: list[x509.Certificate]) -> bool:
        for child, parent in itertools.pairwise(certs):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, x509.InvalidSignature):
                return False
        top = certs[-1]
        for root in self.roots():
            if top == root:
                return True
            try:
                top.verify_directly_issued_by(root)
                return True
            except (ValueError, TypeError, x509.InvalidSignature):
                continue
        return False

    def _recover(self) -> None:
        """Finish (or discard) a key replacement a crash interrupted: a staged key that
        matches the installed certificate is moved into place, any other is removed."""
        staged = self.staged_key_path
        if not staged.exists():
            return
        try:
            leaf = x509.load_pem_x509_certificate(self.config.cert_path.read_bytes())
            key = serialization.load_pem_private_key(staged.read_bytes(), password=None)
            matches = public_key_der(leaf.public_key()) == public_key_der(key.public_key())
        except (OSError, ValueError, TypeError):
            matches = False
        if matches:
            os.replace(staged, self.config.key_path)
            fsync_dir(self.config.key_path.parent)
            log.warning("completed an interrupted key replacement at %s", self.config.key_path)
        else:
            staged.unlink(missing_ok=True)

    # -- schedule --------------------------------------------------------------------------

    def renewal_due(self, identity: Identity, jitter: bool = True) -> dt.datetime:
        """When ``identity`` should be renewed: at :data:`RENEW_AT` of its lifetime, moved
        by a random ±:data:`JITTER` of the lifetime drawn once per certificate."""
        if not jitter:
            return identity.point(RENEW_AT)
        if self._jitter is None or self._jitter[0] != identity.serial:
            self._jitter = (identity.serial, self.rng.uniform(-JITTER, JITTER))
        return identity.point(RENEW_AT + self._jitter[1])

    # -- talking to the CA -----------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any], *, token: str | None = None) -> dict[str, Any]:
        """POST ``body``; return the 201 record. Raises CaUnavailable (retry) or AgentError."""
        try:
            import requests
        except ImportError:  # pragma: no cover - a dependency of the agent
            msg = "hsmca agent needs the 'requests' package (pip install requests)"
            raise AgentError(msg) from None

        session = requests.Session()
        session.trust_env = False  # no proxies or CA bundles from the environment
        session.verify = str(self.config.root)
        headers = {}
        if token is None:
            session.cert = (str(self.config.cert_path), str(self.config.key_path))
        else:
            headers["Authorization"] = f"Bearer {token}"
        url = self.config.ca_url.rstrip("/") + path
        try:
            resp = session.post(
                url, json=body, headers=headers, timeout=HTTP_TIMEOUT, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise CaUnavailable(f"CA unreachable: {_transport_reason(exc)}") from None
        finally:
            session.close()
        if resp.status_code == 201:
            try:
                record = resp.json()
                if isinstance(record, dict) and "certificate" in record:
                    return record
            except ValueError:
                pass
            raise CaUnavailable(f"CA answered 201 without a certificate record ({url})")
        detail = self._problem_detail(resp)
        if resp.status_code in RETRYABLE:
            raise CaUnavailable(
                f"CA answered {resp.status_code}: {detail}",
                _retry_after(resp.headers.get("Retry-After")),
            )
        what = "enrolment" if token is not None else "renewal"
        hint = ""
        if resp.status_code == 401 and token is not None:
            hint = f" (check --token or {TOKEN_ENV}; a single-use token works once)"
        elif resp.status_code == 401:
            hint = " (revoked? enrol again with a new token: hsmca token create --single-use)"
        raise AgentError(f"{what} refused by the CA ({resp.status_code}): {detail}{hint}")

    @staticmethod
    def _problem_detail(resp: Any) -> str:
        try:
            body = resp.json()
            if isinstance(body, dict):
                return _one_line(str(body.get("detail") or body.get("title") or body))
        except ValueError:
            pass
        return _one_line(resp.text) or resp.reason or "no detail"

    def _request_certificate(self, identity: Identity | None) -> tuple[Any, dict[str, Any]]:
        """Enrol (``identity`` None, with the token) or renew over mTLS, for a new key."""
        key = new_private_key(self.config.key_type)
        csr = build_csr(self.names, key).decode()
        if identity is None:
            if not self.config.token:
                raise AgentError(
                    f"enrolment needs a token: pass --token, --token-file or set {TOKEN_ENV} "
                    "(hsmca token create --role issuer --single-use ...)"
                )
            body: dict[str, Any] = {"csr": csr, "profile": self.config.profile}
            if self.config.ttl:
                body["ttl"] = self.config.ttl
            record = self._post(ENROL_PATH, body, token=self.config.token)
        else:
            record = self._post(RENEW_PATH, {"csr": csr})
        return key, record

    # -- installing ------------------------------------------------------------------------

    def install(self, key: Any, record: dict[str, Any]) -> Identity:
        """Check the CA's answer and write key and certificate (leaf then chain). The new
        key is staged next to the old one first, so a crash between the two renames is
        repaired by :meth:`_recover` on the next start."""
        try:
            leaf = x509.load_pem_x509_certificate(record["certificate"].encode())
            chain_pem = record.get("chain") or ""
            chain = x509.load_pem_x509_certificates(chain_pem.encode()) if chain_pem else []
        except (ValueError, AttributeError) as exc:
            raise AgentError(f"the CA answered with an unreadable certificate: {exc}") from None
        if public_key_der(leaf.public_key()) != public_key_der(key.public_key()):
            raise AgentError("the CA returned a certificate for another key")
        if certificate_names(leaf) != set(self.names):
            found = ", ".join(sorted(certificate_names(leaf)))
            raise AgentError(f"the CA returned a certificate for other names ({found})")
        pem = serialization.Encoding.PEM
        cert_pem = b"".join(c.public_bytes(pem) for c in [leaf, *chain])
        key_pem = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        cert_path = self.config.cert_path
        cert_mode = cert_path.stat().st_mode & 0o777 if cert_path.exists() else 0o644
        atomic_write(self.staged_key_path, key_pem, 0o600)
        atomic_write(cert_path, cert_pem, cert_mode)
        os.replace(self.staged_key_path, self.config.key_path)
        fsync_dir(self.config.key_path.parent)
        return Identity(
            leaf,
            serial_hex(leaf.serial_number),
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
        )

    def reload(self, event: str, identity: Identity) -> bool:
        """Run the reload command (via the shell) after a change; True if it succeeded.
        It gets HSMCA_AGENT_{EVENT,SERIAL,NOT_AFTER,CERT,KEY}, never the token."""
        command = self.config.reload_command
        if not command:
            return True
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        env.update(
            HSMCA_AGENT_EVENT=event,
            HSMCA_AGENT_SERIAL=identity.serial,
            HSMCA_AGENT_NOT_AFTER=identity.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            HSMCA_AGENT_CERT=str(self.config.cert_path),
            HSMCA_AGENT_KEY=str(self.config.key_path),
        )
        try:
            proc = subprocess.Popen(
                command, shell=True, env=env, stdin=subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:
            log.error("reload command could not start: %s", exc.strerror or exc)
            return False
        try:
            code = proc.wait(timeout=self.config.reload_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.error("reload command killed after %.0f s", self.config.reload_timeout)
            return False
        if code != 0:
            log.error("reload command failed with exit code %d", code)
            return False
        log.info("reload command ran (exit 0)")
        return True

    # -- actions ---------------------------------------------------------------------------

    def enrol(self) -> tuple[Identity, bool]:
        """Enrol with the token; return the new identity and whether the reload worked."""
        key, record = self._request_certificate(None)
        identity = self.install(key, record)
        log.info(
            "enrolled %s: serial %s, not_after %s",
            ",".join(self.names),
            identity.serial,
            _iso(identity.not_after),
        )
        ok = self.reload("enrolled", identity)
        if not allows_client_auth(identity.cert):
            raise AgentError(
                f"certificate {identity.serial} has no clientAuth EKU, so it cannot renew "
                "itself over mTLS: enrol with --profile mtls or mtls-client"
            )
        return identity, ok

    def renew(self, current: Identity) -> tuple[Identity, bool]:
        """Renew ``current`` over mTLS with a new key."""
        if not allows_client_auth(current.cert):
            raise AgentError(
                f"certificate {current.serial} has no clientAuth EKU, so it cannot renew "
                "itself over mTLS: enrol again with --profile mtls or mtls-client"
            )
        key, record = self._request_certificate(current)
        identity = self.install(key, record)
        log.info(
            "renewed %s: serial %s, not_after %s (was %s)",
            ",".join(self.names),
            identity.serial,
            _iso(identity.not_after),
            current.serial,
        )
        return identity, self.reload("renewed", identity)

    def run_once(self) -> str:
        """Do what is due now (enrol if there is no usable certificate, renew if past the
        renewal point, unjittered); return what was done. Raises AgentError on failure."""
        identity, why = self.current()
        try:
            if identity is None:
                log.info("%s: enrolling", why)
                identity, ok = self.enrol()
                action = "enrolled"
            elif self.now() >= self.renewal_due(identity, jitter=False):
                identity, ok = self.renew(identity)
                action = "renewed"
            else:
                log.info(
                    "certificate %s valid until %s; renewal due at %s: nothing to do",
                    identity.serial,
                    _iso(identity.not_after),
                    _iso(self.renewal_due(identity, jitter=False)),
                )
                return "nothing"
        except CaUnavailable as exc:
            still = ""
            if identity is not None:
                still = f"; certificate {identity.serial} valid until {_iso(identity.not_after)}"
            raise AgentError(f"{exc.reason} at {self.config.ca_url}{still}") from None
        if not ok:
            raise AgentError(f"{action} {identity.serial}, but the reload command failed")
        return action

    def run(self, stop: threading.Event) -> None:
        """Keep the identity alive until ``stop`` is set. Raises AgentError when it cannot
        go on (refused by the CA, no token for a needed enrolment)."""
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_cap)
        last_change = -MIN_CHANGE_GAP
        while not stop.is_set():
            identity, why = self.current()
            now = self.now()
            if identity is not None:
                due = self.renewal_due(identity)
                # a certificate that is due at once (clamped by its issuer's expiry, say)
                # must not turn the agent into a busy loop against the CA
                gap = last_change + MIN_CHANGE_GAP - time.monotonic()
                wait = max((due - now).total_seconds(), gap)
                if wait > 0:
                    if self._announced != identity.serial:
                        self._announced = identity.serial
                        log.info(
                            "certificate %s valid until %s; next renewal at %s (in %d s)",
                            identity.serial,
                            _iso(identity.not_after),
                            _iso(max(due, now + dt.timedelta(seconds=gap))),
                            round(wait),
                        )
                    stop.wait(min(wait, MAX_NAP))
                    continue
            elif why and self._announced != why:
                self._announced = why
                log.info("%s: enrolling", why)
            try:
                if identity is None:
                    self.enrol()
                else:
                    self.renew(identity)
                backoff.reset()
                last_change = time.monotonic()
            except CaUnavailable as exc:
                now = self.now()
                delay = retry_delay(backoff.next(), now, identity)
                if exc.retry_after is not None:  # the CA asked for a pause: within limits
                    limit = retry_delay(MAX_RETRY_AFTER, now, identity)
                    delay = max(delay, min(exc.retry_after, limit))
                what = "enrolment" if identity is None else "renewal"
                log.warning("%s failed: %s; retry in %d s", what, exc.reason, round(delay))
                stop.wait(delay)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
