"""PKCS#11 access through python-pkcs11: one logged-in session per process, serialised.

python-pkcs11 calls ``C_Initialize(NULL)``, which tells the module the application is
single-threaded (SoftHSM2 then turns its locks off; concurrent calls crashed it). So:

* every PKCS#11 call in the process goes through one process-wide lock;
* the module is (re)initialised lazily in each process, after fork, never inherited;
* the session is opened and logged in once and reused; key handles are cached;
* a lost session is reopened once, then the error is raised as :class:`HsmSessionLost`;
* several Hsm objects on one token share the process's login (PKCS#11 logins are per
  application): closing one never logs the others out.

Private keys are generated inside the token (CKA_SENSITIVE, not CKA_EXTRACTABLE) and are
used only through :meth:`Hsm.sign`; :mod:`pki.hsm_keys` wraps them as cryptography keys.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import hmac
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, UserType
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from pki.errors import (
    HsmError,
    HsmKeyNotFound,
    HsmModuleNotFound,
    HsmSessionLost,
    HsmTokenNotFound,
    HsmUnavailable,
    HsmWrongPin,
)

T = TypeVar("T")

#: PKCS#11 calls of this process never overlap (see module docstring).
PKCS11_LOCK = threading.RLock()
# Fork only between PKCS#11 calls: a child forked while another thread held the lock
# inherited it locked and deadlocked at its first signature.
os.register_at_fork(
    before=PKCS11_LOCK.acquire,
    after_in_parent=PKCS11_LOCK.release,
    after_in_child=PKCS11_LOCK.release,
)

TOKEN_SCAN_ATTEMPTS = 4
KEY_SPECS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
_CURVES = {"ec-p256": ("secp256r1", ec.SECP256R1()), "ec-p384": ("secp384r1", ec.SECP384R1())}

_LOST = (
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.DeviceError,
    p11e.UserNotLoggedIn,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
)


#: seconds between two attempts to bring a failed module back (per process)
RECOVERY_INTERVAL = 0.5
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191


@dataclass
class _ModuleState:
    """The initialised module of this process: which pid and SoftHSM2 config it is for.
    ``broken``: a re-initialisation failed (say, the token's store vanished) and left the
    module finalised; the next call after ``retry_at`` initialises it again."""

    lib: Any
    pid: int
    softhsm2_conf: str | None
    generation: int
    broken: bool = False
    retry_at: float = 0.0


_modules: dict[str, _ModuleState] = {}
_generation = 0

_HolderKey = tuple[str, str, int]  # module path, token label, module generation
#: Hsm objects of this process holding a session on each token. PKCS#11 logins are per
#: application, so they all share one login and closing a logged-in session (C_Logout)
#: would log the others out; such a session is parked until the last holder closes.
_holders: dict[_HolderKey, weakref.WeakSet[Hsm]] = {}
_parked: dict[_HolderKey, list[Any]] = {}
#: SHA-256 of the PIN that logged in, so a later Hsm joining the login is still checked
_pin_digests: dict[_HolderKey, bytes] = {}


def _reload_module(path: str) -> _ModuleState:
    """Finalize and initialize the module again (new generation; lock held)."""
    state = _modules[path]
    try:
        state.lib.reinitialize()
    except p11e.PKCS11Error:
        _mark_broken(state)
        raise
    return _next_generation(path, state)


def _next_generation(path: str, state: _ModuleState) -> _ModuleState:
    """The module's state after it was initialised again (lock held): the sessions and
    logins of the previous generation are gone."""
    global _generation
    _generation += 1
    for stale in [k for k in (*_holders, *_parked, *_pin_digests) if k[0] == path]:
        _holders.pop(stale, None)
        _parked.pop(stale, None)
        _pin_digests.pop(stale, None)
    state = _ModuleState(
        lib=state.lib, pid=state.pid, softhsm2_conf=state.softhsm2_conf, generation=_generation
    )
    _modules[path] = state
    return state


def _mark_broken(state: _ModuleState) -> None:
    state.broken = True
    state.retry_at = time.monotonic() + RECOVERY_INTERVAL


def _recover(path: str, state: _ModuleState) -> _ModuleState:
    """Initialise a broken module again (lock held): C_Finalize, whatever state it is in,
    then C_Initialize, called on the module itself because python-pkcs11 only offers
    both in one call and stops at the first error. Raises HsmUnavailable until it works."""
    if time.monotonic() < state.retry_at:
        raise HsmUnavailable(f"the HSM ({path}) is unavailable; retrying")
    try:
        module = ctypes.CDLL(path)  # the same loaded library: dlopen returns its handle
        module.C_Finalize(None)  # CKR_CRYPTOKI_NOT_INITIALIZED is fine here
        rv = module.C_Initialize(None)
    except (OSError, AttributeError) as exc:
        _mark_broken(state)
        raise HsmUnavailable(f"the HSM ({path}) is unavailable: {exc}") from None
    if rv not in (0, CKR_CRYPTOKI_ALREADY_INITIALIZED):
        _mark_broken(state)
        raise HsmUnavailable(f"the HSM ({path}) is unavailable: C_Initialize returned {rv:#x}")
    _clear_openssl_errors()
    return _next_generation(path, state)


def _clear_openssl_errors() -> None:
    """Drop what the module left on this thread's OpenSSL error queue. SoftHSM2 asks
    OpenSSL for engines it may not have (``gost``) and leaves the failure queued; the next
    TLS call of this thread (Python's ``ssl`` shares the library) then fails with
    ``[ENGINE: NO_SUCH_ENGINE]``."""
    global _err_clear
    if _err_clear is None:
        name = ctypes.util.find_library("crypto")
        try:
            _err_clear = ctypes.CDLL(name).ERR_clear_error if name else (lambda: None)
        except (OSError, AttributeError):
            _err_clear = lambda: None  # noqa: E731  (no shared OpenSSL: nothing to clear)
    _err_clear()


_err_clear: Any = None


def _load_module(path: str, softhsm2_conf: str | None) -> _ModuleState:
    """Load (or re-initialise after fork / config change) the module; lock held."""
    state = _modules.get(path)
    pid = os.getpid()
    if state and state.pid == pid and state.softhsm2_conf == softhsm2_conf:
        return _recover(path, state) if state.broken else state
    if softhsm2_conf:
        os.environ["SOFTHSM2_CONF"] = softhsm2_conf
    if not os.path.exists(path):
        raise HsmModuleNotFound(f"PKCS#11 module not found: {path} (set hsm.module)")
    try:
        lib = pkcs11.lib(path)
    except p11e.PKCS11Error as exc:
        raise HsmModuleNotFound(f"cannot load PKCS#11 module {path}: {exc}") from None
    fresh = _ModuleState(lib=lib, pid=pid, softhsm2_conf=softhsm2_conf, generation=_generation)
    if state is not None:
        # forked child or another SoftHSM2 config: start the library afresh (a child of a
        # parent whose module was broken finds it finalised: it recovers like the parent)
        try:
            lib.reinitialize()
        except p11e.PKCS11Error:
            fresh.broken = True
            _modules[path] = fresh
            return _recover(path, fresh)
    _clear_openssl_errors()
    return _next_generation(path, fresh)


class Hsm:
    """A logged-in view of one token. Safe to share between threads of one process."""

    def __init__(
        self,
        module: str,
        token_label: str,
        pin: Callable[[], str],
        softhsm2_conf: str | None = None,
        login_attempts: int = 8,
    ) -> None:
        self.module = module
        self.token_label = token_label
        self._pin = pin
        self._softhsm2_conf = softhsm2_conf
        self._login_attempts = login_attempts
        self._session: Any = None
        self._generation = -1
        self._pid = -1
        self._holder: _HolderKey = (module, token_label, -1)
        self._keys: dict[str, Any] = {}
        self._public: dict[str, Any] = {}
        #: observers of each signature's duration in seconds (metrics hook)
        self.sign_observers: list[Callable[[float], None]] = []

    # -- session ---------------------------------------------------------------------------

    def _session_locked(self) -> Any:
        state = _load_module(self.module, self._softhsm2_conf)
        if (
            self._session is not None
            and self._pid == os.getpid()
            and self._generation == state.generation
        ):
            return self._session
        self._forget_locked()
        try:
            token, state = self._find_token(state)
        except p11e.NoSuchToken:
            raise HsmTokenNotFound(
                f"no token labelled {self.token_label!r} in {self.module}"
            ) from None
        except p11e.MultipleTokensReturned:
            raise HsmTokenNotFound(
                f"several tokens labelled {self.token_label!r}; labels must be unique"
            ) from None
        except p11e.PKCS11Error as exc:
            # e.g. GeneralError when the token's files were deleted under the module
            raise HsmUnavailable(
                f"the HSM is unavailable: token {self.token_label!r} in {self.module} "
                f"cannot be reached ({type(exc).__name__})"
            ) from None
        self._holder = (self.module, self.token_label, state.generation)
        self._session = self._login(token)
        _clear_openssl_errors()
        self._pid = os.getpid()
        self._generation = state.generation
        _holders.setdefault(self._holder, weakref.WeakSet()).add(self)
        return self._session

    def _find_token(self, state: _ModuleState) -> tuple[Any, _ModuleState]:
        """The token, looked for again a few times if it is missing from a freshly
        initialised module: SoftHSM2's file store skips a token whose files another
        process holds locked during the scan (seen in a child forked while the parent
        signed), or fails the scan with GeneralError (seen when four workers started at
        once). Lock held; a re-scan re-initialises the module for this process."""
        fresh = not any(
            h for h in _holders.get((self.module, self.token_label, state.generation), ())
        )
        attempts = TOKEN_SCAN_ATTEMPTS if fresh else 1
        for attempt in range(attempts):
            try:
                return state.lib.get_token(token_label=self.token_label), state
            except (p11e.NoSuchToken, p11e.GeneralError):
                if attempt == attempts - 1:
                    if fresh:  # no session of ours lives: start the module again, later
                        _mark_broken(state)
                    raise
                time.sleep(0.02 * (attempt + 1) * (1 + random.random()))
                state = _reload_module(self.module)
        raise AssertionError("unreachable")

    def _forget_locked(self) -> Any:
        """Drop (without closing) this object's session and key handles; return it."""
        session, self._session = self._session, None
        self._keys.clear()
        holders = _holders.get(self._holder)
        if holders is not None:
            holders.discard(self)
        return session

    def _login(self, token: Any) -> Any:
        """Open and log in, retrying the spurious errors of simultaneous first logins."""
        delay = 0.02
        for attempt in range(self._login_attempts):
            pin = self._pin()
            digest = hashlib.sha256(pin.encode()).digest()
            try:
                session = token.open(rw=True, user_pin=pin)
                _pin_digests[self._holder] = digest
                return session
            except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
                raise HsmWrongPin(
                    f"wrong PIN for token {self.token_label!r} "
                    "(check hsm.pin_file or HSMCA_HSM__PIN)"
                ) from None
            except p11e.PinLocked:
                raise HsmWrongPin(f"the PIN of token {self.token_label!r} is locked") from None
            except p11e.UserAlreadyLoggedIn:
                # another Hsm of this process is logged in to the token: PKCS#11 logins are
                # per application, so a new session shares it without logging in again
                # (SoftHSM2 answers so before checking the PIN: check it here)
                known = _pin_digests.get(self._holder)
                if known is not None and not hmac.compare_digest(known, digest):
                    raise HsmWrongPin(
                        f"wrong PIN for token {self.token_label!r} "
                        "(check hsm.pin_file or HSMCA_HSM__PIN)"
                    ) from None
                return token.open(rw=True)
            except (p11e.GeneralError, p11e.DeviceError, p11e.FunctionFailed) as exc:
                if attempt == self._login_attempts - 1:
                    raise HsmError(
                        f"cannot log in to token {self.token_label!r}: {exc!r}"
                    ) from None
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)
            except p11e.PKCS11Error as exc:
                raise HsmError(f"cannot log in to token {self.token_label!r}: {exc!r}") from None
        raise AssertionError("unreachable")

    def _call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(session)`` under the lock; reopen a lost session once."""
        with PKCS11_LOCK:
            session = self._session_locked()
            try:
                return fn(session)
            except _LOST:
                self._forget_locked()
            session = self._session_locked()
            try:
                return fn(session)
            except _LOST as exc:
                self._forget_locked()
                raise HsmSessionLost(
                    f"PKCS#11 session to {self.token_label!r} lost twice: {exc!r}"
                ) from None

    def open(self) -> None:
        """Log in now (instead of at the first signature); raises the clear HSM errors."""
        self._call(lambda s: None)

    def close(self) -> None:
        """Close this object's session (the module stays initialised)."""
        with PKCS11_LOCK:
            session = self._forget_locked()
            state = _modules.get(self.module)
            if (
                session is None
                or self._pid != os.getpid()
                or state is None
                or state.generation != self._generation
            ):
                # none, the parent's, or ended by a re-initialisation (its handle number
                # may now belong to another live session: closing it would close that one)
                return
            if _holders.get(self._holder):
                if session.user_type == UserType.USER:
                    _parked.setdefault(self._holder, []).append(session)
                    return
                closing = [session]
            else:
                closing = [session, *_parked.pop(self._holder, [])]
                _pin_digests.pop(self._holder, None)
            for each in closing:
                with contextlib.suppress(p11e.PKCS11Error):
                    each.close()

    # -- keys ------------------------------------------------------------------------------

    def generate_key(self, label: str, spec: str) -> Any:
        """Generate a token key pair labelled ``label``; return its cryptography public key.

        The private key is CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not CKA_EXTRACTABLE, and
        can only sign (no decrypt, derive or unwrap).
        """
        if spec not in KEY_SPECS:
            raise HsmError(f"unknown key type {spec!r}; one of {', '.join(KEY_SPECS)}")
        key_id = hashlib.sha256(label.encode()).digest()[:16]
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.DERIVE: False,
            Attribute.UNWRAP: False,
        }
        public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True}

        def generate(session: Any) -> Any:
            if self._find(session, ObjectClass.PRIVATE_KEY, label) is not None:
                raise HsmError(f"a key labelled {label!r} already exists in the token")
            if spec.startswith("ec-"):
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[spec][0])},
                    local=True,
                )
                pub, _ = params.generate_keypair(
                    store=True,
                    label=label,
                    id=key_id,
                    public_template=public_template,
                    private_template=private_template,
                )
            else:
                pub, _ = session.generate_keypair(
                    KeyType.RSA,
                    int(spec.split("-")[1]),
                    store=True,
                    label=label,
                    id=key_id,
                    public_template=public_template,
                    private_template=private_template,
                )
            return _to_cryptography(pub)

        return self._call(generate)

    @staticmethod
    def _find(session: Any, cls: ObjectClass, label: str) -> Any:
        found = list(session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label}))
        if len(found) > 1:
            raise HsmError(f"several objects labelled {label!r}; labels must be unique")
        return found[0] if found else None

    def has_key(self, label: str) -> bool:
        """True if the token holds a private key labelled ``label``."""
        return self._call(lambda s: self._find(s, ObjectClass.PRIVATE_KEY, label) is not None)

    def public_key(self, label: str) -> Any:
        """The cryptography public key of the pair ``label`` (cached)."""
        if label not in self._public:

            def read(session: Any) -> Any:
                pub = self._find(session, ObjectClass.PUBLIC_KEY, label)
                if pub is None:
                    raise HsmKeyNotFound(f"no public key labelled {label!r} in the token")
                return _to_cryptography(pub)

            self._public[label] = self._call(read)
        return self._public[label]

    def private_key_attributes(self, label: str) -> dict[str, bool]:
        """CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_TOKEN of the private key (for checks)."""

        def read(session: Any) -> dict[str, bool]:
            key = self._private_locked(session, label)
            return {
                "sensitive": bool(key[Attribute.SENSITIVE]),
                "extractable": bool(key[Attribute.EXTRACTABLE]),
                "token": bool(key[Attribute.TOKEN]),
                "never_extractable": bool(key[Attribute.NEVER_EXTRACTABLE]),
            }

        return self._call(read)

    def read_private_value(self, label: str) -> bytes:
        """Try to read CKA_VALUE of the private key. Must fail: proves non-extractability."""
        return self._call(lambda s: self._private_locked(s, label)[Attribute.VALUE])

    def _private_locked(self, session: Any, label: str) -> Any:
        key = self._keys.get(label)
        if key is None:
            key = self._find(session, ObjectClass.PRIVATE_KEY, label)
            if key is None:
                raise HsmKeyNotFound(f"no private key labelled {label!r} in the token")
            self._keys[label] = key
        return key

    def sign(
        self, label: str, data: bytes, mechanism: Mechanism, mechanism_param: Any = None
    ) -> bytes:
        """Sign ``data`` with the private key ``label`` using ``mechanism``."""
        started = time.perf_counter()

        def do(session: Any) -> bytes:
            key = self._private_locked(session, label)
            return key.sign(data, mechanism=mechanism, mechanism_param=mechanism_param)

        try:
            signature = self._call(do)
        except p11e.PKCS11Error as exc:  # GeneralError, DeviceMemory...: a clear HSM error
            raise HsmError(
                f"the HSM failed to sign ({type(exc).__name__}) on token {self.token_label!r}"
            ) from None
        elapsed = time.perf_counter() - started
        for observe in self.sign_observers:
            observe(elapsed)
        return signature


def _to_cryptography(pub: Any) -> Any:
    if pub.key_type == KeyType.EC:
        return serialization.load_der_public_key(encode_ec_public_key(pub))
    if pub.key_type == KeyType.RSA:
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(pub[Attribute.MODULUS], "big"),
        )
        return numbers.public_key()
    raise HsmError(f"unsupported key type in token: {pub.key_type!r}")
