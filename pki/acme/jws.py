"""JWS in the flattened JSON serialization, as ACME uses it (RFC 8555 section 6.2).

RSA and EC keys are parsed, thumbprinted and verified with josepy; Ed25519 (``EdDSA``,
which josepy does not implement) with cryptography directly. Every failure raises
:class:`~pki.acme.problems.AcmeProblem` with the error type RFC 8555 names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

import josepy as jose
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pki.acme.problems import AcmeProblem

#: the signature algorithms accepted for account keys, in the order they are advertised
ALGORITHMS = ("ES256", "ES384", "RS256", "EdDSA")
_EC_ALGORITHMS = {"ES256": "P-256", "ES384": "P-384"}
_B64U = re.compile(r"[A-Za-z0-9_-]*")
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192


def b64u_decode(text: Any, what: str) -> bytes:
    """Decode unpadded base64url in its one canonical spelling (RFC 7515 2: no padding,
    no other characters, unused bits zero); malformed otherwise."""
    if not isinstance(text, str) or not _B64U.fullmatch(text) or len(text) % 4 == 1:
        raise AcmeProblem("malformed", f"{what} is not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise AcmeProblem("malformed", f"{what} is not unpadded base64url") from None
    if b64u(raw) != text:
        raise AcmeProblem("malformed", f"{what} is not canonical base64url (unused bits set)")
    return raw


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class AccountKey:
    """A public account key: its JWK (public members only) and RFC 7638 thumbprint."""

    jwk: dict[str, str]
    thumbprint: str
    public_key: Any

    def verify(self, alg: str, message: bytes, signature: bytes) -> bool:
        """True if ``signature`` over ``message`` is valid for this key with ``alg``."""
        key = self.public_key
        if alg == "EdDSA":
            if not isinstance(key, ed25519.Ed25519PublicKey):
                return False
            try:
                key.verify(signature, message)
            except InvalidSignature:
                return False
            return True
        if alg in _EC_ALGORITHMS:
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != {
                "ES256": "secp256r1",
                "ES384": "secp384r1",
            }.get(alg):
                return False
            return bool(jose.jwa.JWASignature.from_json(alg).verify(key, message, signature))
        if alg == "RS256":
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            return bool(jose.jwa.RS256.verify(key, message, signature))
        return False

    def spki_der(self) -> bytes:
        """The key as a DER SubjectPublicKeyInfo (to compare with a certificate's key)."""
        return self.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def account_key(jwk: Any) -> AccountKey:
    """Parse a public JWK; badPublicKey if it is not an acceptable account key."""
    if not isinstance(jwk, dict) or not isinstance(jwk.get("kty"), str):
        raise AcmeProblem("malformed", "jwk must be a JSON object with a kty member")
    if "d" in jwk:
        raise AcmeProblem("badPublicKey", "the jwk contains a private key")
    kty = jwk["kty"]
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise AcmeProblem("badPublicKey", "OKP keys must use the Ed25519 curve")
        raw = b64u_decode(jwk.get("x"), "jwk.x")
        try:
            key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise AcmeProblem("badPublicKey", "jwk.x is not an Ed25519 public key") from None
        public = {"crv": "Ed25519", "kty": "OKP", "x": jwk["x"]}
        canonical = json.dumps(public, separators=(",", ":"), sort_keys=True).encode()
        return AccountKey(public, b64u(hashlib.sha256(canonical).digest()), key)
    if kty not in ("EC", "RSA"):
        raise AcmeProblem("badPublicKey", f"unsupported key type {kty!r}: use EC, RSA or OKP")
    try:
        parsed = jose.JWK.from_json(jwk)
    except Exception as exc:  # josepy raises KeyError, AttributeError ... on bad members
        raise AcmeProblem("badPublicKey", f"the jwk is not a valid {kty} public key") from exc
    key = parsed.key._wrapped if hasattr(parsed.key, "_wrapped") else parsed.key
    if isinstance(key, rsa.RSAPublicKey) and not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise AcmeProblem(
            "badPublicKey", f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
        )
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in (
        "secp256r1",
        "secp384r1",
    ):
        raise AcmeProblem("badPublicKey", "EC keys must be on P-256 or P-384")
    public = parsed.public_key().to_partial_json()
    public = {k: v for k, v in public.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    return AccountKey(public, b64u(parsed.thumbprint()), key)


@dataclass(frozen=True)
class SignedRequest:
    """A parsed (not yet verified) JWS request body."""

    protected: dict[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return self.protected["alg"]

    @property
    def url(self) -> str:
        return self.protected["url"]

    @property
    def nonce(self) -> str | None:
        return self.protected.get("nonce")

    @property
    def kid(self) -> str | None:
        return self.protected.get("kid")

    @property
    def jwk(self) -> dict[str, Any] | None:
        return self.protected.get("jwk")

    @property
    def is_post_as_get(self) -> bool:
        return self.payload == b""

    def payload_json(self) -> dict[str, Any]:
        """The payload as a JSON object; malformed if it is not one."""
        return payload_object(self.payload)


def payload_object(payload: bytes) -> dict[str, Any]:
    """A JWS payload as a JSON object; malformed if it is empty or not one."""
    if payload == b"":
        raise AcmeProblem("malformed", "this request needs a JSON payload, not POST-as-GET")
    value = load_json(payload, "the JWS payload")
    if not isinstance(value, dict):
        raise AcmeProblem("malformed", "the JWS payload must be a JSON object")
    return value


def parse(body: bytes, *, inner: bool = False) -> SignedRequest:
    """Parse a flattened JWS; checks its shape and protected header, not the signature.

    ``inner`` parses the JWS nested in keyChange or externalAccountBinding, which carries
    no nonce."""
    return parse_object(load_json(body, "the request body"), inner=inner)


def load_json(data: bytes | str, what: str) -> Any:
    """``json.loads``; malformed if ``data`` is not JSON or nests too deeply to parse."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise AcmeProblem("malformed", f"{what} is not JSON") from None


def parse_object(outer: Any, *, inner: bool = False) -> SignedRequest:
    """:func:`parse` for an already decoded JSON value."""
    if not isinstance(outer, dict) or set(outer) - {"protected", "payload", "signature"}:
        raise AcmeProblem(
            "malformed",
            "the body must be a flattened JWS with only protected, payload and signature",
        )
    for member in ("protected", "payload", "signature"):
        if not isinstance(outer.get(member), str):
            raise AcmeProblem("malformed", f"the JWS has no {member} string")
    protected = load_json(b64u_decode(outer["protected"], "protected"), "the protected header")
    if not isinstance(protected, dict):
        raise AcmeProblem("malformed", "the JWS protected header must be a JSON object")
    alg = protected.get("alg")
    if not isinstance(alg, str):
        raise AcmeProblem(
            "badSignatureAlgorithm",
            f"the JWS alg must be one of {', '.join(ALGORITHMS)}",
            algorithms=list(ALGORITHMS),
        )
    allowed = ("HS256", "HS384", "HS512") if inner and alg.startswith("HS") else ALGORITHMS
    if alg not in allowed:
        raise AcmeProblem(
            "badSignatureAlgorithm",
            f"unsupported JWS algorithm {alg!r}; use one of {', '.join(ALGORITHMS)}",
            algorithms=list(ALGORITHMS),
        )
    if not isinstance(protected.get("url"), str):
        raise AcmeProblem("malformed", "the JWS protected header has no url")
    if not inner and not isinstance(protected.get("nonce"), str):
        raise AcmeProblem("badNonce", "the JWS protected header has no nonce")
    if inner and "nonce" in protected:
        raise AcmeProblem("malformed", "a nested JWS must not carry a nonce (RFC 8555 7.3.4-5)")
    if "crit" in protected:
        raise AcmeProblem("malformed", "no JWS header extension (crit) is understood here")
    if ("jwk" in protected) == ("kid" in protected) and not alg.startswith("HS"):
        raise AcmeProblem("malformed", "the JWS protected header needs exactly one of jwk and kid")
    if "kid" in protected and not isinstance(protected["kid"], str):
        raise AcmeProblem("malformed", "the JWS kid must be a string")
    return SignedRequest(
        protected=protected,
        payload=b64u_decode(outer["payload"], "payload"),
        signing_input=f"{outer['protected']}.{outer['payload']}".encode(),
        signature=b64u_decode(outer["signature"], "signature"),
    )


def verify(request: SignedRequest, key: AccountKey) -> None:
    """Raise malformed unless the request's signature is valid for ``key``."""
    if not key.verify(request.alg, request.signing_input, request.signature):
        raise AcmeProblem("malformed", "JWS signature verification failed")


def verify_hmac(request: SignedRequest, mac_key: bytes) -> bool:
    """True if an HS256/384/512 JWS is signed with ``mac_key``."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(
        request.alg
    )
    if digest is None:
        return False
    expected = hmac.new(mac_key, request.signing_input, digest).digest()
    return hmac.compare_digest(expected, request.signature)
