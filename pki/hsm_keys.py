"""cryptography private-key objects whose ``sign()`` goes to the HSM.

cryptography's certificate, CRL and OCSP builders accept any object implementing the
private-key interface, so they sign through PKCS#11 unchanged (the approach pyca's
maintainers point to in pyca/cryptography#11616). The key material never leaves the
token: every export method raises.

SoftHSM2 lacks CKM_ECDSA_SHA256, so ECDSA hashes in Python, signs with CKM_ECDSA and
DER-encodes r||s.
"""

from __future__ import annotations

from typing import Any, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import MGF, Mechanism

from pki.errors import HsmError
from pki.hsm import Hsm

_RSA_PKCS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_RSA_PSS = {
    "sha256": (Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384_RSA_PKCS_PSS, Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512_RSA_PKCS_PSS, Mechanism.SHA512, MGF.SHA512),
}


def _no_export() -> NoReturn:
    raise HsmError("HSM keys are not extractable")


def _digest(data: bytes, algorithm: Any) -> bytes:
    if isinstance(algorithm, Prehashed):
        return data
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


class HsmEcPrivateKey(ec.EllipticCurvePrivateKey):
    """An EC private key in the token, labelled ``label``."""

    def __init__(self, hsm: Hsm, label: str, public_key: ec.EllipticCurvePublicKey) -> None:
        self.hsm = hsm
        self.label = label
        self._public_key = public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise HsmError(f"unsupported EC signature algorithm {signature_algorithm!r}")
        digest = _digest(data, signature_algorithm.algorithm)
        raw = self.hsm.sign(self.label, digest, Mechanism.ECDSA)
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise HsmError("ECDH is not offered by HSM signing keys")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _no_export()

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        _no_export()

    def __copy__(self) -> HsmEcPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> HsmEcPrivateKey:
        return self


class HsmRsaPrivateKey(rsa.RSAPrivateKey):
    """An RSA private key in the token: PKCS#1 v1.5 and PSS signatures."""

    def __init__(self, hsm: Hsm, label: str, public_key: rsa.RSAPublicKey) -> None:
        self.hsm = hsm
        self.label = label
        self._public_key = public_key

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public_key

    def sign(self, data: bytes, padding_: padding.AsymmetricPadding, algorithm: Any) -> bytes:
        if isinstance(algorithm, Prehashed):
            raise HsmError("pre-hashed RSA signing is not supported")
        name = algorithm.name
        if isinstance(padding_, padding.PKCS1v15) and name in _RSA_PKCS:
            return self.hsm.sign(self.label, data, _RSA_PKCS[name])
        if isinstance(padding_, padding.PSS) and name in _RSA_PSS:
            mech, hash_mech, mgf = _RSA_PSS[name]
            mgf_hash = getattr(padding_.mgf, "_algorithm", None)
            if mgf_hash is None or mgf_hash.name != name:
                # the token's hashed PSS mechanisms use MGF1 with the same hash; signing
                # anyway would give a signature that fails verification
                raise HsmError(f"unsupported RSA-PSS: MGF1 must use {name}, like the signature")
            salt = padding_._salt_length
            if salt is padding.PSS.DIGEST_LENGTH or salt is padding.PSS.AUTO:
                salt = algorithm.digest_size
            elif salt is padding.PSS.MAX_LENGTH:
                salt = (self.key_size + 7) // 8 - algorithm.digest_size - 2
            return self.hsm.sign(self.label, data, mech, (hash_mech, mgf, int(salt)))
        raise HsmError(f"unsupported RSA signature {type(padding_).__name__} with {name}")

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise HsmError("decryption is not offered by HSM signing keys")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _no_export()

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        _no_export()

    def __copy__(self) -> HsmRsaPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> HsmRsaPrivateKey:
        return self


HsmPrivateKey = HsmEcPrivateKey | HsmRsaPrivateKey


def hsm_private_key(hsm: Hsm, label: str) -> HsmPrivateKey:
    """A cryptography private key for the token key ``label``."""
    public = hsm.public_key(label)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return HsmEcPrivateKey(hsm, label, public)
    if isinstance(public, rsa.RSAPublicKey):
        return HsmRsaPrivateKey(hsm, label, public)
    raise HsmError(f"unsupported key type for {label!r}")
