"""ACME endpoints. Each view checks the JWS through :meth:`Acme.authenticate`, calls one
use-case and renders the resource; every response carries a fresh Replay-Nonce, the
directory's ``index`` link and ``Cache-Control: no-store``.

URLs are built under ``server.public_https_url`` when the client connected to that host
(so a path prefix added by a reverse proxy is kept), and under the host the client used
otherwise (``https://HOST:PORT/acme``): the ``url`` a client signs is always a URL it can
reach.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, json, request
from werkzeug.exceptions import HTTPException

from acme_server import render
from ca_service.context import core
from ca_service.problems import RETRY_AFTER_SECONDS, ApiError, drain_body
from ca_service.validation import raw_body
from pki.acme.jws import payload_object
from pki.acme.orders import OrderState
from pki.acme.problems import AcmeProblem
from pki.acme.service import Acme, Authenticated
from pki.acme.urls import AcmeUrls
from pki.errors import DatabaseUnavailable, HsmcaError, HsmError
from pki.store.faults import unavailable

acme = Blueprint("acme", __name__, url_prefix="/acme")
log = logging.getLogger("hsmca.acme")

JOSE = "application/jose+json"
PEM_CHAIN = "application/pem-certificate-chain"
#: seconds a client should wait before polling a resource that is still changing
POLL_SECONDS = 1
_cores: dict[tuple[int, int], Acme] = {}
_lock = threading.Lock()


def acme_core() -> Acme:
    """The Acme of this process (one per Pki, made after fork)."""
    pki = core()
    key = (os.getpid(), id(pki))
    found = _cores.get(key)
    if found is None:
        with _lock:
            found = _cores.setdefault(key, Acme(pki))
    return found


def _urls() -> AcmeUrls:
    public = urlsplit(core().settings.server.public_https_url)
    if public.netloc and public.netloc.lower() == request.host.lower():
        return AcmeUrls(f"https://{public.netloc}{public.path.rstrip('/')}/acme")
    return AcmeUrls(request.host_url.rstrip("/") + "/acme")


def _request_url(urls: AcmeUrls) -> str:
    """The URL of this request as the client addressed it (what its JWS must sign)."""
    return urls.base + request.path.removeprefix(acme.url_prefix or "")


def _json(body: Any, status: int = 200, **headers: str) -> Response:
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    for name, value in headers.items():
        resp.headers[name.replace("_", "-")] = value
    return resp


def _authenticate(jwk_allowed: bool = False, jwk_required: bool = False) -> Authenticated:
    mimetype = request.mimetype
    if mimetype != JOSE:
        raise AcmeProblem("malformed", f"Content-Type must be {JOSE}", status=415)
    urls = _urls()
    try:  # a chunked body over the limit is refused, not cut at the limit
        body = raw_body(request)
    except ApiError as exc:
        raise AcmeProblem("malformed", str(exc), status=exc.status) from None
    return acme_core().authenticate(
        body,
        _request_url(urls),
        urls,
        jwk_allowed=jwk_allowed or jwk_required,
        jwk_required=jwk_required,
    )


def _payload(auth: Authenticated) -> dict[str, Any]:
    """The JSON object payload (POST-as-GET is refused where a payload is required)."""
    return payload_object(auth.payload)


def _post_as_get(auth: Authenticated) -> None:
    if auth.payload != b"":
        raise AcmeProblem("malformed", "use POST-as-GET (an empty payload) for this resource")


@acme.after_request
def _protocol_headers(resp: Response) -> Response:
    urls = _urls()
    try:
        resp.headers["Replay-Nonce"] = acme_core().nonces.mint()
    except Exception as exc:  # the store is down (no nonce key yet): the response says so
        if not isinstance(exc, HsmcaError) and unavailable(exc) is None:
            raise
    resp.headers.add("Link", f'<{urls.directory}>;rel="index"')
    resp.headers["Cache-Control"] = "no-store"
    return resp


@acme.errorhandler(AcmeProblem)
def _problem(exc: AcmeProblem) -> Response:
    resp = Response(
        json.dumps(exc.document()), status=exc.status, mimetype="application/problem+json"
    )
    for name, value in exc.headers.items():
        resp.headers[name] = value
    return resp


@acme.errorhandler(HsmcaError)
def _core_error(exc: HsmcaError) -> Response:
    if isinstance(exc, HsmError | DatabaseUnavailable):  # an outage: try again shortly
        return _problem(
            AcmeProblem(
                "serverInternal",
                f"the CA is temporarily unavailable: {exc}",
                status=503,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        )
    return _problem(AcmeProblem("serverInternal", f"the CA could not do this: {exc}"))


@acme.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    if exc.code == 413:  # read what was sent, or the client gets a reset, not the 413
        drain_body()
    return _problem(AcmeProblem("malformed", exc.description or exc.name, status=exc.code))


@acme.errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    fault = unavailable(exc)
    if fault is not None:
        return _core_error(fault)
    log.error("unhandled error in ACME", exc_info=exc)
    return _problem(AcmeProblem("serverInternal", "an unexpected error occurred"))


# -- directory, nonces, terms ----------------------------------------------------------------


@acme.get("/directory")
def directory() -> Response:
    return _json(acme_core().directory(_urls()))


@acme.route("/new-nonce", methods=["HEAD", "GET"])
def new_nonce() -> Response:
    return Response(status=200 if request.method == "HEAD" else 204)


@acme.get("/terms")
def terms() -> Response:
    text = (
        "This is an internal certificate authority. Certificates are issued for names "
        "its policy allows, may be revoked at any time, and are for internal use only.\n"
    )
    return Response(text, mimetype="text/plain")


# -- accounts ---------------------------------------------------------------------------------


@acme.post("/new-account")
def new_account() -> Response:
    auth = _authenticate(jwk_required=True)
    urls = _urls()
    account, created = acme_core().new_account(auth, _payload(auth), urls)
    return _json(
        render.account(account, urls),
        201 if created else 200,
        Location=urls.account(account.id),
    )


@acme.post("/acct/<int:account_id>")
def account(account_id: int) -> Response:
    auth = _authenticate()
    payload = None if auth.payload == b"" else _payload(auth)
    urls = _urls()
    row = acme_core().update_account(auth, account_id, payload)
    return _json(render.account(row, urls), Location=urls.account(row.id))


@acme.post("/acct/<int:account_id>/orders")
def account_orders(account_id: int) -> Response:
    auth = _authenticate()
    _post_as_get(auth)
    core_ = acme_core()
    row = core_.update_account(auth, account_id, None)
    urls = _urls()
    return _json({"orders": [urls.order(o) for o in core_.store.order_ids(row.id)]})


@acme.post("/key-change")
def key_change() -> Response:
    auth = _authenticate()
    urls = _urls()
    row = acme_core().change_key(auth, _payload(auth), urls)
    return _json(render.account(row, urls), Location=urls.account(row.id))


# -- orders, authorizations, challenges -------------------------------------------------------


def _order_response(state: OrderState, status: int = 200) -> Response:
    urls = _urls()
    row = state.order
    headers = {"Location": urls.order(row.id)}
    if row.status in ("pending", "processing"):
        headers["Retry-After"] = str(POLL_SECONDS)
    return _json(render.order(row, state.authorization_ids, urls), status, **headers)


@acme.post("/new-order")
def new_order() -> Response:
    auth = _authenticate()
    return _order_response(acme_core().new_order(auth, _payload(auth)), 201)


@acme.post("/order/<order_id>")
def order(order_id: str) -> Response:
    auth = _authenticate()
    _post_as_get(auth)
    return _order_response(acme_core().order(auth, order_id))


@acme.post("/order/<order_id>/finalize")
def finalize(order_id: str) -> Response:
    auth = _authenticate()
    return _order_response(acme_core().finalize(auth, order_id, _payload(auth)))


@acme.post("/authz/<authz_id>")
def authorization(authz_id: str) -> Response:
    auth = _authenticate()
    core_ = acme_core()
    if auth.payload == b"":
        row, challenges = core_.authorization(auth, authz_id)
    else:
        if _payload(auth).get("status") != "deactivated":
            raise AcmeProblem(
                "malformed", 'an authorization update must be {"status": "deactivated"}'
            )
        row, challenges = core_.deactivate_authorization(auth, authz_id)
    urls = _urls()
    headers = {}
    if row.status == "pending":
        headers["Retry-After"] = str(POLL_SECONDS)
    return _json(render.authorization(row, challenges, urls), **headers)


@acme.post("/chall/<challenge_id>")
def challenge(challenge_id: str) -> Response:
    auth = _authenticate()
    urls = _urls()
    if auth.payload == b"":  # POST-as-GET reads the challenge; only {} starts validation
        chall, authz = acme_core().challenge(auth, challenge_id)
    else:
        _payload(auth)  # an object ({} by RFC 8555 7.5.1); its members are ignored
        chall, authz = acme_core().respond_challenge(auth, challenge_id)
    resp = _json(render.challenge(chall, urls))
    resp.headers.add("Link", f'<{urls.authorization(authz.id)}>;rel="up"')
    if chall.status in ("pending", "processing"):
        resp.headers["Retry-After"] = str(POLL_SECONDS)
    return resp


# -- certificates -----------------------------------------------------------------------------


@acme.post("/cert/<serial>")
def certificate(serial: str) -> Response:
    auth = _authenticate()
    _post_as_get(auth)
    pem = acme_core().certificate_chain(auth, serial)
    return Response(pem, mimetype=PEM_CHAIN)


@acme.post("/revoke-cert")
def revoke_cert() -> Response:
    auth = _authenticate(jwk_allowed=True)
    acme_core().revoke(auth, _payload(auth))
    return Response(status=200)


@acme.get("/renewal-info/<path:cert_id>")
def renewal_info(cert_id: str) -> Response:
    window = acme_core().renewal_info(cert_id)
    return _json(window.to_json(), Retry_After=str(window.retry_after))
