"""Orders, authorizations, challenges, finalization, download and revocation
(RFC 8555 7.4-7.6): the RA decisions of the ACME server.

Validation runs on a thread pool of this process, never on the request thread; a
challenge response waits a short, bounded time for it so that a prompt target is
answered ``valid`` at once (clients then need no polling round), while a slow one is
answered ``processing`` with Retry-After.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import secrets
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pki.acme.identifiers import Identifier, check_allowed, check_csr_names, parse_identifiers
from pki.acme.jws import b64u_decode
from pki.acme.problems import AcmeProblem, problem_json
from pki.acme.renewal import certificate_for_id
from pki.actors import Actor
from pki.errors import Forbidden, HsmError, InvalidInput, NotFound, PolicyError
from pki.policy import parse_csr
from pki.revocation import REASON_CODES
from pki.serials import serial_hex
from pki.signer import spki_der
from pki.store.acme_models import AcmeAccount, AcmeAuthorization, AcmeChallenge, AcmeOrder
from pki.store.faults import unavailable
from pki.validation import ValidationFailure, key_authorization

if TYPE_CHECKING:
    from pki.acme.service import Authenticated
    from pki.clock import Clock
    from pki.config import AcmeSettings
    from pki.service import Pki
    from pki.store.acme_store import AcmeStore

log = logging.getLogger("hsmca.acme")
ORDER_LIFETIME = dt.timedelta(hours=24)
#: a ``processing`` challenge whose validator has been silent this long is started again
STALE_VALIDATION = dt.timedelta(seconds=60)
RATE_WINDOW = dt.timedelta(hours=1)
_CODE_TO_REASON = {code: name for name, code in REASON_CODES.items()}
#: reasons a subscriber may give (as Let's Encrypt): not the CA-compromise codes, and not
#: certificateHold, which could never be released
SUBSCRIBER_REASONS = frozenset({0, 1, 3, 4, 5, 9})


def _new_id() -> str:
    return secrets.token_urlsafe(12)


@dataclass(frozen=True)
class OrderState:
    """An order and the ids of its authorizations, as rendered to the client."""

    order: AcmeOrder
    authorization_ids: list[str]


def account_actor(account: AcmeAccount) -> Actor:
    """The actor an ACME account issues and revokes as (its certificates' requester),
    with the name patterns and profiles its EAB key gave it (none: no limit)."""
    return Actor(
        name=f"acme-account:{account.id}",
        role="issuer",
        allowed_names=tuple(account.allowed_names or ("*",)),
        profiles=tuple(account.profiles or ()),
    )


class OrdersMixin:
    """Order use-cases of :class:`pki.acme.service.Acme`."""

    pki: Pki
    store: AcmeStore
    settings: AcmeSettings
    clock: Clock

    _waiters: threading.BoundedSemaphore

    def _submit_validation(self, challenge_id: str) -> Future[None]:
        raise NotImplementedError

    def _refuse(self, auth: Authenticated, action: str, subject: str, why: str) -> AcmeProblem:
        """Audit a refused access (invariant 3) and return the problem to raise."""
        who = f"acme-account:{auth.account.id}" if auth.account else "acme:certificate-key"
        self.pki.audit_refusal(action, subject, why, actor=who)
        return AcmeProblem("unauthorized", why)

    def profiles(self) -> dict[str, str]:
        """The certificate profiles an ACME client may ask for, with a description."""
        found = {}
        for name in self.pki.profiles.names():
            profile = self.pki.profiles.get(name)
            if profile.device:
                continue
            ekus = ", ".join(e._name for e in profile.extended_key_usages)
            found[name] = (
                f"{ekus}; lifetime {_duration(profile.default_ttl)} "
                f"(at most {_duration(profile.max_ttl)})"
            )
        return found

    # -- newOrder --------------------------------------------------------------------------

    def new_order(self, auth: Authenticated, payload: dict[str, Any]) -> OrderState:
        """Create an order with one authorization per identifier (RFC 8555 7.4)."""
        account = auth.require_account()
        for field in ("notBefore", "notAfter"):
            if payload.get(field) is not None:
                raise AcmeProblem(
                    "malformed", f"{field} is not supported: ask for a profile instead"
                )
        identifiers = parse_identifiers(
            payload.get("identifiers"), self.pki.settings.policy.max_names
        )
        check_allowed(identifiers, self.settings.allowed_domains)
        profile = payload.get("profile") or self._default_profile(account)
        if not isinstance(profile, str):
            raise AcmeProblem("malformed", "profile must be a string")
        offered = self.profiles()
        if profile not in offered:
            raise AcmeProblem(
                "invalidProfile",
                f"unknown profile {profile!r}; this CA offers {', '.join(sorted(offered))}",
            )
        self._check_account_limits(account, identifiers, profile)
        replaces = payload.get("replaces")
        if replaces is not None:
            self._check_replaces(account, replaces)
        now = self.clock.now()
        self._check_rate(account, now)
        order = AcmeOrder(
            id=_new_id(),
            account_id=account.id,
            status="pending",
            identifiers=[i.to_json() for i in identifiers],
            profile=profile,
            expires=now + ORDER_LIFETIME,
            error=None,
            certificate_serial=None,
            replaces=replaces,
            created_at=now,
        )
        authzs, challs = [], []
        for ident in identifiers:
            authz = AcmeAuthorization(
                id=_new_id(),
                order_id=order.id,
                account_id=account.id,
                identifier_type=ident.type,
                identifier_value=ident.base,
                wildcard=ident.wildcard,
                status="pending",
                expires=order.expires,
            )
            authzs.append(authz)
            for kind in _challenge_types(ident):
                challs.append(
                    AcmeChallenge(
                        id=_new_id(),
                        authorization_id=authz.id,
                        type=kind,
                        token=secrets.token_urlsafe(32),
                        status="pending",
                    )
                )
        self.store.create_order(order, authzs, challs)
        return OrderState(order, sorted(a.id for a in authzs))

    def _default_profile(self, account: AcmeAccount) -> str:
        """``acme.default_profile``, or the account's first profile if it may not use it."""
        default = self.settings.default_profile
        if account.profiles and default not in account.profiles:
            return account.profiles[0]
        return default

    def _check_account_limits(
        self, account: AcmeAccount, identifiers: list[Identifier], profile: str
    ) -> None:
        """rejectedIdentifier or invalidProfile (audited) beyond what the account's EAB
        key allows; an account without limits passes."""
        who = f"acme-account:{account.id}"
        if account.allowed_names:
            try:
                check_allowed(identifiers, account.allowed_names, "this account's binding")
            except AcmeProblem as exc:
                self.pki.audit_refusal("acme.order", None, exc.detail, actor=who)
                raise
        if account.profiles and profile not in account.profiles:
            why = (
                f"profile {profile!r} is not allowed for this account "
                f"(allowed: {', '.join(account.profiles)})"
            )
            self.pki.audit_refusal("acme.order", None, why, actor=who)
            raise AcmeProblem("invalidProfile", why)

    def _check_rate(self, account: AcmeAccount, now: dt.datetime) -> None:
        limit = self.settings.orders_per_hour
        count, oldest = self.store.orders_since(account.id, now - RATE_WINDOW)
        if count >= limit and oldest is not None:
            wait = max(1, int((oldest + RATE_WINDOW - now).total_seconds()) + 1)
            raise AcmeProblem(
                "rateLimited",
                f"too many new orders: {count} in the last hour (limit {limit}); "
                f"retry after {wait} s",
                headers={"Retry-After": str(wait)},
            )

    def _check_replaces(self, account: AcmeAccount, cert_id: Any) -> None:
        try:
            serial = certificate_for_id(self.pki.store, cert_id).serial
        except AcmeProblem as exc:
            if exc.kind != "notFound":
                raise
            raise AcmeProblem("malformed", "replaces names no certificate of this CA") from None
        previous = self.store.order_for_certificate(serial)
        if previous is None or previous.account_id != account.id:
            raise AcmeProblem("malformed", "replaces names no certificate this account holds")
        if self.store.order_replacing(cert_id, self.clock.now()) is not None:
            raise AcmeProblem("alreadyReplaced", "that certificate has already been replaced")

    # -- reading ---------------------------------------------------------------------------

    def order(self, auth: Authenticated, order_id: str) -> OrderState:
        """The account's order, marked invalid first if it expired unfinished."""
        account = auth.require_account()
        found = self.store.order_view(order_id)
        if found is None:
            raise AcmeProblem("notFound", f"no order {order_id}")
        if found[0].account_id != account.id:
            raise self._refuse(auth, "acme.order", order_id, "the order belongs to another account")
        order = found[0]
        if order.status in ("pending", "ready") and order.expires <= self.clock.now():
            self.store.expire(self.clock.now(), order_id)
            found = self.store.order_view(order_id) or found
        elif order.status == "processing" and self.fail_interrupted_orders(order_id):
            found = self.store.order_view(order_id) or found
        return OrderState(*found)

    def fail_interrupted_orders(self, order_id: str | None = None) -> int:
        """Orders ``processing`` for longer than ``ca.pending_grace_seconds`` lost their
        finalize to a crash or an outage (a finalize issues in milliseconds): they become
        ``invalid`` so their clients stop polling and order again (RFC 8555 7.1.6). Their
        pending certificate rows are revoked by the ``reconcile-pending`` job."""
        grace = dt.timedelta(seconds=self.pki.settings.ca.pending_grace_seconds)
        error = problem_json("serverInternal", "issuance was interrupted; place a new order", 500)
        return self.store.fail_interrupted_orders(self.clock.now() - grace, error, order_id)

    def authorization(
        self, auth: Authenticated, authz_id: str
    ) -> tuple[AcmeAuthorization, list[AcmeChallenge]]:
        account = auth.require_account()
        authz = self.store.authorization(authz_id)
        if authz is None:
            raise AcmeProblem("notFound", f"no authorization {authz_id}")
        if authz.account_id != account.id:
            raise self._refuse(
                auth, "acme.authorization", authz_id, "it belongs to another account"
            )
        if authz.status == "pending" and authz.expires <= self.clock.now():
            self.store.expire(self.clock.now(), authz.order_id)
            authz = self.store.authorization(authz_id) or authz
        challenges = self.store.challenges(authz_id)
        if authz.wildcard:
            challenges = [c for c in challenges if c.type == "dns-01"]
        now = self.clock.now()
        stale = now - STALE_VALIDATION
        for chall in challenges:  # a validator that died (worker gone) is started again
            abandoned = chall.status == "processing" and (chall.started_at or now) < stale
            if abandoned and self.store.start_challenge(chall.id, now, stale):
                self._submit_validation(chall.id)
        return authz, challenges

    def deactivate_authorization(
        self, auth: Authenticated, authz_id: str
    ) -> tuple[AcmeAuthorization, list[AcmeChallenge]]:
        self.authorization(auth, authz_id)
        if not self.store.deactivate_authorization(authz_id):
            raise AcmeProblem(
                "malformed", "only a pending or valid authorization can be deactivated"
            )
        return self.authorization(auth, authz_id)

    # -- challenges ------------------------------------------------------------------------

    def challenge(
        self, auth: Authenticated, challenge_id: str
    ) -> tuple[AcmeChallenge, AcmeAuthorization]:
        """The account's challenge as it stands (POST-as-GET: starts nothing)."""
        account = auth.require_account()
        found = self.store.challenge_view(challenge_id)
        if found is None:
            raise AcmeProblem("notFound", f"no challenge {challenge_id}")
        chall, authz, owner = found
        if owner.id != account.id:
            raise self._refuse(
                auth, "acme.challenge", challenge_id, "it belongs to another account"
            )
        return chall, authz

    def respond_challenge(
        self, auth: Authenticated, challenge_id: str
    ) -> tuple[AcmeChallenge, AcmeAuthorization]:
        """The client is ready: start validation off the request thread and wait up to
        ``acme.validation_wait_seconds`` for its result."""
        chall, authz = self.challenge(auth, challenge_id)
        now = self.clock.now()
        if authz.wildcard and chall.type != "dns-01":
            raise AcmeProblem("malformed", "a wildcard name can only be validated with dns-01")
        if authz.status == "pending" and authz.expires <= now:
            self.store.expire(now, authz.order_id)
        elif self.store.start_challenge(challenge_id, now, now - STALE_VALIDATION):
            future = self._submit_validation(challenge_id)
            if self._waiters.acquire(blocking=False):
                try:
                    with contextlib.suppress(TimeoutError):  # still running: the client polls
                        future.result(timeout=self.settings.validation_wait_seconds)
                finally:
                    self._waiters.release()
        return self.challenge(auth, challenge_id)

    def run_validation(self, challenge_id: str) -> None:
        """Validate one claimed challenge and record the outcome (on a worker thread);
        whatever fails is logged, and the challenge is never left ``processing`` by it."""
        try:
            self._validate(challenge_id)
        except Exception:
            log.exception("validation of challenge %s failed", challenge_id)
            error = problem_json("serverInternal", "validation could not be completed", 500)
            with contextlib.suppress(Exception):
                self.store.finish_challenge(challenge_id, self.clock.now(), error)

    def _validate(self, challenge_id: str) -> None:
        found = self.store.challenge_view(challenge_id)
        if found is None or found[0].status != "processing":
            return
        chall, authz, account = found
        error = None
        try:
            self.validator.validate(
                chall.type,
                authz.identifier_type,
                authz.identifier_value,
                chall.token,
                key_authorization(chall.token, account.key_thumbprint),
            )
        except ValidationFailure as failure:
            error = problem_json(failure.acme_type, failure.detail)
        except Exception as exc:  # the VA promises not to raise; never leave it processing
            error = problem_json("serverInternal", f"validation failed: {type(exc).__name__}")
        self.store.finish_challenge(challenge_id, self.clock.now(), error)

    # -- finalize and download -------------------------------------------------------------

    def finalize(self, auth: Authenticated, order_id: str, payload: dict[str, Any]) -> OrderState:
        """Issue the order's certificate from a CSR naming exactly its identifiers."""
        state = self.order(auth, order_id)
        account = auth.require_account()
        order = state.order
        if order.status != "ready":
            raise AcmeProblem(
                "orderNotReady",
                f"the order is {order.status}, not ready"
                + (": complete its authorizations first" if order.status == "pending" else ""),
            )
        csr_text = payload.get("csr")
        if not isinstance(csr_text, str):
            raise AcmeProblem("malformed", "finalize needs a csr (base64url DER)")
        der = b64u_decode(csr_text, "csr")
        try:
            parsed = parse_csr(der, self.pki.settings.policy)
        except PolicyError as exc:
            raise AcmeProblem("badCSR", str(exc)) from None
        identifiers = [Identifier(i["type"], i["value"]) for i in order.identifiers]
        check_csr_names(identifiers, parsed.names, parsed.common_name)
        if spki_der(parsed.public_key) == auth.key.spki_der():
            raise AcmeProblem("badCSR", "the certificate key must not be the account key")
        if not self.store.set_order(
            order_id, ("ready",), status="processing", processing_since=self.clock.now()
        ):
            raise AcmeProblem("orderNotReady", "the order is already being finalized")
        try:
            record = self.pki.issue_for_key(
                parsed.public_key,
                parsed.names,
                parsed.common_name,
                order.profile,
                None,
                # the account's limits, checked again by the core (defence in depth)
                account_actor(account),
                details={"acme_order": order_id},
            )
        except (PolicyError, Forbidden) as exc:
            self.store.set_order(
                order_id, ("processing",), status="invalid", error=problem_json("badCSR", str(exc))
            )
            raise AcmeProblem("badCSR", str(exc)) from None
        except Exception as exc:
            if isinstance(exc, HsmError) or unavailable(exc) is not None:
                # an outage (answered 503, Retry-After): nothing was issued, and the
                # client may finalize again once it is over (if the database is the one
                # down, the order stays processing and is failed after the grace period)
                with contextlib.suppress(Exception):
                    self.store.set_order(
                        order_id, ("processing",), status="ready", processing_since=None
                    )
                raise
            error = problem_json("serverInternal", "the certificate could not be issued", 500)
            self.store.set_order(order_id, ("processing",), status="invalid", error=error)
            raise
        self.store.set_order(
            order_id, ("processing",), status="valid", certificate_serial=record.serial
        )
        order.status, order.certificate_serial = "valid", record.serial
        return state

    def certificate_chain(self, auth: Authenticated, serial: str) -> str:
        """PEM chain (leaf first) of a certificate this account ordered."""
        account = auth.require_account()
        order = self.store.order_for_certificate(serial)
        if order is None or order.account_id != account.id:
            raise self._refuse(
                auth, "acme.certificate", serial, "no certificate of this account has that URL"
            )
        record = self.pki.show(serial)
        return (record.certificate_pem or "") + record.chain_pem

    # -- revocation ------------------------------------------------------------------------

    def revoke(self, auth: Authenticated, payload: dict[str, Any]) -> None:
        """revokeCert: by the account that ordered it or by the certificate's own key."""
        der = b64u_decode(payload.get("certificate"), "certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise AcmeProblem("malformed", "certificate is not a DER X.509 certificate") from None
        reason_code = payload.get("reason", 0)
        if type(reason_code) is not int or reason_code not in SUBSCRIBER_REASONS:
            raise AcmeProblem(
                "badRevocationReason",
                f"reason {reason_code!r} is not allowed; use one of {sorted(SUBSCRIBER_REASONS)}",
            )
        serial = serial_hex(cert.serial_number)
        try:
            row = self.pki.store.certificate(serial)
        except NotFound:
            row = None
        if row is None or row.der != der:
            raise AcmeProblem("malformed", "this CA did not issue that certificate")
        if row.status == "revoked":
            raise AcmeProblem("alreadyRevoked", "the certificate is already revoked")
        if auth.by_kid and auth.account is not None:
            order = self.store.order_for_certificate(serial)
            if order is None or order.account_id != auth.account.id:
                raise self._refuse(
                    auth, "certificate.revoke", serial, "this account did not order it"
                )
            actor = account_actor(auth.account)
        else:
            spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            if auth.key.spki_der() != spki:
                raise self._refuse(
                    auth, "certificate.revoke", serial, "not signed by the certificate's key"
                )
            actor = Actor(name="acme:certificate-key", role="admin")
        try:
            self.pki.revoke(serial, _CODE_TO_REASON[reason_code], actor)
        except (InvalidInput, Forbidden) as exc:
            raise AcmeProblem("unauthorized", str(exc)) from None


def _challenge_types(ident: Identifier) -> tuple[str, ...]:
    if ident.wildcard:
        return ("dns-01",)
    if ident.type == "ip":
        return ("http-01", "tls-alpn-01")
    return ("dns-01", "http-01", "tls-alpn-01")


def _duration(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
