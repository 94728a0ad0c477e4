"""The ACME use-cases: :class:`Acme` authenticates each JWS request and runs the account
and order operations of :mod:`pki.acme.accounts` and :mod:`pki.acme.orders` on top of
the :class:`~pki.service.Pki` core (whose policy, signer and store do the CA work)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pki.acme import jws
from pki.acme.accounts import AccountsMixin
from pki.acme.nonces import Nonces
from pki.acme.orders import OrdersMixin
from pki.acme.problems import AcmeProblem
from pki.acme.renewal import RenewalWindow, certificate_for_id, suggested_window
from pki.acme.urls import AcmeUrls
from pki.policy import NamePolicy
from pki.service import Pki
from pki.store.acme_models import AcmeAccount
from pki.validation import Validator

#: validations running at once in one process (each mostly waits on the network)
VALIDATION_THREADS = 16
#: request threads of one process that may wait for a validation result at once
MAX_WAITING_REQUESTS = 2
#: a P-256 public key (RFC 7515 A.3) parsed once by :meth:`Acme.warm`
_WARM_JWK = {
    "kty": "EC",
    "crv": "P-256",
    "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
    "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
}


@dataclass(frozen=True)
class Authenticated:
    """A request whose signature, url and nonce checked out: the key that signed it and
    its account (None for a newAccount or revokeCert signed with a ``jwk``)."""

    key: jws.AccountKey
    account: AcmeAccount | None
    payload: bytes
    #: signed with the account's ``kid`` (not a bare ``jwk``)
    by_kid: bool = False

    def require_account(self) -> AcmeAccount:
        if self.account is None:
            raise AcmeProblem("accountDoesNotExist", "sign this request with an account (kid)")
        return self.account


class Acme(AccountsMixin, OrdersMixin):
    """The ACME server's core for one process."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.store = pki.store.acme
        self.settings = pki.settings.acme
        self.clock = pki.clock
        self.validator = Validator(
            self.settings.http01_port,
            self.settings.tlsalpn01_port,
            self.settings.dns_resolver,
            self.settings.validation_timeout_seconds,
            redirect_allowed=NamePolicy(self.settings.allowed_domains).allows_dns,
        )
        #: request threads that may wait for a validation at once (the others answer
        #: ``processing`` at once, so slow targets cannot occupy every request thread)
        self._waiters = threading.BoundedSemaphore(MAX_WAITING_REQUESTS)
        self._nonces: Nonces | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0
        self._lock = threading.Lock()

    @property
    def nonces(self) -> Nonces:
        if self._nonces is None:
            self._nonces = Nonces(self.store.secret("nonce-key"), self.store, self.clock)
        return self._nonces

    def _submit_validation(self, challenge_id: str) -> Future[None]:
        with self._lock:
            if self._executor is None or self._executor_pid != os.getpid():
                self._executor = ThreadPoolExecutor(VALIDATION_THREADS, "acme-va")
                self._executor_pid = os.getpid()
            return self._executor.submit(self.run_validation, challenge_id)

    def warm(self) -> None:
        """Do once, before the first request, what a first request would otherwise pay for:
        load the nonce key, compile the queries, parse a key, log in to the HSM. Changes
        nothing."""
        self.nonces.mint()
        self.store.warm(self.clock.now())
        jws.account_key(_WARM_JWK)
        self.validator.warm()
        self._submit_validation("").result()
        self.pki.health()

    def close(self) -> None:
        """Stop the validation threads (running validations finish first)."""
        if self._executor is not None and self._executor_pid == os.getpid():
            self._executor.shutdown(wait=True)
        self._executor = None

    # -- directory -------------------------------------------------------------------------

    def directory(self, urls: AcmeUrls) -> dict[str, Any]:
        """The directory object (RFC 8555 7.1.1) with meta, ARI and profiles."""
        return {
            "newNonce": urls.new_nonce,
            "newAccount": urls.new_account,
            "newOrder": urls.new_order,
            "revokeCert": urls.revoke_cert,
            "keyChange": urls.key_change,
            "renewalInfo": urls.renewal_info,
            "meta": {
                "termsOfService": self.settings.terms_of_service_url or urls.terms,
                "externalAccountRequired": self.settings.require_eab,
                "profiles": self.profiles(),
            },
        }

    # -- authentication --------------------------------------------------------------------

    def authenticate(
        self,
        body: bytes,
        url: str,
        urls: AcmeUrls,
        *,
        jwk_allowed: bool = False,
        jwk_required: bool = False,
    ) -> Authenticated:
        """Check a JWS request (RFC 8555 6.2-6.5): key (``jwk`` only where allowed, else an
        existing valid account's ``kid``), signature, ``url``, then the nonce (consumed last,
        so a forged request cannot burn one)."""
        request = jws.parse(body)
        account = None
        if request.jwk is not None:
            if not jwk_allowed:
                raise AcmeProblem("malformed", "this request must be signed with a kid, not a jwk")
            key = jws.account_key(request.jwk)
            account = self.store.account_by_thumbprint(key.thumbprint)
        elif jwk_required:
            raise AcmeProblem("malformed", "newAccount must be signed with a jwk, not a kid")
        else:
            account_id = urls.account_id(request.kid or "")
            account = self.store.account(account_id) if account_id is not None else None
            if account is None:
                raise AcmeProblem("accountDoesNotExist", f"no account {request.kid!r}")
            key = jws.account_key(account.jwk)
        jws.verify(request, key)
        if request.url != url:
            raise AcmeProblem(
                "unauthorized", f"the JWS url {request.url!r} is not the request URL {url!r}"
            )
        assert request.nonce is not None
        self.nonces.redeem(request.nonce)
        if account is not None and account.status != "valid" and request.jwk is None:
            raise AcmeProblem("unauthorized", f"the account is {account.status}")
        return Authenticated(key, account, request.payload, by_kid=request.jwk is None)

    # -- renewal information ---------------------------------------------------------------

    def renewal_info(self, cert_id: str) -> RenewalWindow:
        """The suggested renewal window of a certificate this CA issued (RFC 9773)."""
        row = certificate_for_id(self.pki.store, cert_id)
        revoked = row.revoked_at if row.status == "revoked" else None
        return suggested_window(row.not_before, row.not_after, revoked, self.clock.now())
