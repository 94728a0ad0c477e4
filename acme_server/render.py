"""ACME resources as JSON, built with certbot's ``acme.messages`` (RFC 8555 7.1)."""

from __future__ import annotations

from typing import Any

from acme import challenges, messages

from pki.acme.jws import b64u_decode
from pki.acme.urls import AcmeUrls
from pki.store.acme_models import AcmeAccount, AcmeAuthorization, AcmeChallenge, AcmeOrder


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """tls-alpn-01 (RFC 8737), which certbot's library no longer defines."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """tls-alpn-01 (RFC 8737): only its JSON form is needed on the server side."""

    typ = "tls-alpn-01"
    response_cls = TLSALPN01Response

    def validation(self, account_key: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the server validates tls-alpn-01 in pki.validation")


_CHALLENGES: dict[str, type[challenges.KeyAuthorizationChallenge]] = {
    "http-01": challenges.HTTP01,
    "dns-01": challenges.DNS01,
    "tls-alpn-01": TLSALPN01,
}


def _identifier(type_: str, value: str) -> messages.Identifier:
    return messages.Identifier(typ=messages.IdentifierType(type_), value=value)


def _error(doc: dict[str, Any] | None) -> messages.Error | None:
    if not doc:
        return None
    return messages.Error(typ=doc["type"], detail=doc.get("detail"))


def account(row: AcmeAccount, urls: AcmeUrls) -> dict[str, Any]:
    body = messages.Registration(
        contact=tuple(row.contact),
        status=messages.Status(row.status),
        terms_of_service_agreed=row.tos_agreed,
    ).to_json()
    body["orders"] = urls.account_orders(row.id)
    return body


def order(row: AcmeOrder, authz_ids: list[str], urls: AcmeUrls) -> dict[str, Any]:
    body = messages.Order(
        identifiers=tuple(_identifier(i["type"], i["value"]) for i in row.identifiers),
        status=messages.Status(row.status),
        authorizations=tuple(urls.authorization(a) for a in authz_ids),
        finalize=urls.finalize(row.id),
        expires=row.expires,
        error=_error(row.error),
        certificate=urls.certificate(row.certificate_serial) if row.certificate_serial else None,
        profile=row.profile,
    ).to_json()
    if row.replaces:
        body["replaces"] = row.replaces
    return body


def challenge(row: AcmeChallenge, urls: AcmeUrls) -> dict[str, Any]:
    return _challenge_body(row, urls).to_json()


def _challenge_body(row: AcmeChallenge, urls: AcmeUrls) -> messages.ChallengeBody:
    return messages.ChallengeBody(
        chall=_CHALLENGES[row.type](token=b64u_decode(row.token, "token")),
        uri=urls.challenge(row.id),
        status=messages.Status(row.status),
        validated=row.validated_at,
        error=_error(row.error),
    )


def authorization(
    row: AcmeAuthorization, rows: list[AcmeChallenge], urls: AcmeUrls
) -> dict[str, Any]:
    return messages.Authorization(
        identifier=_identifier(row.identifier_type, row.identifier_value),
        challenges=tuple(_challenge_body(c, urls) for c in rows),
        status=messages.Status(row.status),
        expires=row.expires,
        wildcard=True if row.wildcard else None,
    ).to_json()
