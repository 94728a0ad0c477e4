"""The HSM under concurrency, against real SoftHSM2 tokens: threads share one session
under the process-wide lock, forked children re-initialise the module, and two homes
(two SoftHSM2 configurations) can be used alternately in one process.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import pki.hsm as hsm_module
from pki.actors import operator
from pki.bootstrap import initialise
from pki.hsm_keys import HsmEcPrivateKey, hsm_private_key
from pki.service import IssueRequest, Pki

ECDSA_256 = ec.ECDSA(hashes.SHA256())
JOIN_TIMEOUT = 60.0


def ec_key(core: Pki, label: str = "issuing-1") -> HsmEcPrivateKey:
    key = hsm_private_key(core.hsm, label)
    assert isinstance(key, HsmEcPrivateKey)
    return key


def ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


class _Gauge:
    """Counts PKCS#11 signatures in flight and the most ever seen at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.calls = 0

    def __enter__(self) -> None:
        with self.lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.active -= 1


class _TrackedKey:
    """A python-pkcs11 private key whose ``sign`` reports to a gauge."""

    def __init__(self, key: Any, gauge: _Gauge) -> None:
        self._key = key
        self._gauge = gauge

    def sign(self, *args: Any, **kwargs: Any) -> bytes:
        with self._gauge:
            return self._key.sign(*args, **kwargs)


# -- 6. threads ------------------------------------------------------------------------------


def test_threads_share_the_hsm_and_never_overlap(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 threads x 300 signatures through one Hsm: all verify, PKCS#11 calls serialised."""
    threads_n, per_thread = 4, 300
    hsm = pki.hsm
    key = ec_key(pki)
    key.sign(b"warm", ECDSA_256)
    session = hsm._session

    gauge = _Gauge()
    real_private = hsm._private_locked
    monkeypatch.setattr(
        hsm, "_private_locked", lambda s, label: _TrackedKey(real_private(s, label), gauge)
    )

    barrier = threading.Barrier(threads_n)
    results: dict[int, list[tuple[bytes, bytes]]] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            out = []
            for i in range(per_thread):
                data = b"thread %d message %d" % (n, i)
                out.append((data, key.sign(data, ECDSA_256)))
            results[n] = out
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "signing threads did not finish"
    assert errors == []
    assert sorted(results) == list(range(threads_n))

    public = key.public_key()
    for out in results.values():
        assert len(out) == per_thread
        for data, signature in out:
            public.verify(signature, data, ECDSA_256)
    assert gauge.calls == threads_n * per_thread
    assert gauge.peak == 1, "two PKCS#11 signatures ran at the same time"
    assert hsm._session is session


# -- 7. fork ---------------------------------------------------------------------------------


def _sign_in_child(key: HsmEcPrivateKey, count: int, conn: Connection) -> None:
    """Child body: sign ``count`` messages, verify them, send them back with module facts."""
    try:
        out = []
        for i in range(count):
            data = b"child %d message %d" % (os.getpid(), i)
            signature = key.sign(data, ECDSA_256)
            key.public_key().verify(signature, data, ECDSA_256)
            out.append((data, signature))
        state = hsm_module._modules[key.hsm.module]
        conn.send(("ok", os.getpid(), state.pid, state.generation, out))
    except BaseException as exc:
        conn.send(("error", os.getpid(), repr(exc)))
        raise
    finally:
        conn.close()


def _run_children(key: HsmEcPrivateKey, n: int, count: int) -> list[tuple[Any, ...]]:
    """Fork ``n`` children signing concurrently; return their reports (asserts exit 0)."""
    ctx = multiprocessing.get_context("fork")
    started = []
    for _ in range(n):
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_sign_in_child, args=(key, count, sender), daemon=True)
        child.start()
        sender.close()
        started.append((child, receiver))
    reports = []
    try:
        for child, receiver in started:
            # read before join: a child blocked writing to a full pipe never exits.
            # poll() also returns at EOF, when the child died without reporting.
            assert receiver.poll(JOIN_TIMEOUT), f"child {child.pid} hung (deadlock?)"
            try:
                report = receiver.recv()
            except EOFError:
                report = ("no report",)
            child.join(timeout=JOIN_TIMEOUT)
            assert report[0] == "ok", (report, child.exitcode)
            assert child.exitcode == 0
            reports.append(report)
    finally:
        for child, receiver in started:
            if child.is_alive():
                child.kill()
                child.join(timeout=JOIN_TIMEOUT)
            receiver.close()
    return reports


def test_forked_children_sign_with_the_parents_pki(
    pki: Pki, make_csr: Callable[..., bytes]
) -> None:
    """Two children forked after the parent logged in sign 50 times each, concurrently."""
    key = pki.signer(pki.issuing_issuer().id).key
    assert isinstance(key, HsmEcPrivateKey)
    key.sign(b"parent before fork", ECDSA_256)
    parent_state = hsm_module._modules[pki.hsm.module]
    parent_session = pki.hsm._session

    reports = _run_children(key, n=2, count=50)

    public = key.public_key()
    assert len({r[1] for r in reports}) == 2
    for _, child_pid, module_pid, generation, out in reports:
        # the child initialised the module for itself
        assert module_pid == child_pid != os.getpid()
        assert generation != parent_state.generation
        assert len(out) == 50
        for data, signature in out:  # verified again here, independently of the child
            public.verify(signature, data, ECDSA_256)
    with pytest.raises(InvalidSignature):
        public.verify(out[0][1], b"tampered", ECDSA_256)

    # the parent's module and session are untouched and still sign
    assert hsm_module._modules[pki.hsm.module] is parent_state
    signature = key.sign(b"parent after fork", ECDSA_256)
    public.verify(signature, b"parent after fork", ECDSA_256)
    assert pki.hsm._session is parent_session
    issued = pki.issue(IssueRequest(make_csr(), "mtls-server"), operator())
    assert issued.status == "good"


def test_fork_while_another_thread_signs(pki: Pki) -> None:
    """Forking while a thread is inside a PKCS#11 call must not hand the child a held
    lock (it deadlocked at its first signature)."""
    key = ec_key(pki)
    stop = threading.Event()
    running = threading.Event()
    signed: list[int] = []

    def spin() -> None:
        for _ in range(100_000):  # bounded; stopped by the event long before
            key.sign(b"background", ECDSA_256)
            signed.append(1)
            running.set()
            if stop.is_set():
                break

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        assert running.wait(timeout=JOIN_TIMEOUT)
        for _ in range(3):
            reports = _run_children(key, n=2, count=10)
            assert all(len(r[4]) == 10 for r in reports)
    finally:
        stop.set()
        thread.join(timeout=JOIN_TIMEOUT)
    assert not thread.is_alive() and signed


# -- 8. two homes in one process -------------------------------------------------------------


def test_two_homes_used_alternately(
    fresh_home: Path,
    tmp_path: Path,
    make_csr: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pki objects on two homes (two SoftHSM2 confs) keep working when interleaved."""
    other_home = tmp_path / "other"
    initialise(other_home, "Other Org")
    cores = [Pki.open(fresh_home), Pki.open(other_home)]
    try:
        confs = [c.settings.hsm.softhsm2_conf for c in cores]
        assert confs[0] != confs[1]
        issuing = [x509.load_der_x509_certificate(c.issuing_issuer().der) for c in cores]
        publics = [ec_public(cert) for cert in issuing]
        assert publics[0] != publics[1]
        keys = [ec_key(c) for c in cores]
        generations = set()
        for round_ in range(3):
            for i, core in enumerate(cores):
                data = b"home %d round %d" % (i, round_)
                signature = keys[i].sign(data, ECDSA_256)
                publics[i].verify(signature, data, ECDSA_256)
                with pytest.raises(InvalidSignature):
                    publics[1 - i].verify(signature, data, ECDSA_256)
                state = hsm_module._modules[core.hsm.module]
                assert state.softhsm2_conf == confs[i]
                generations.add(state.generation)

                record = core.issue(IssueRequest(make_csr(), "mtls-server"), operator())
                assert record.certificate_pem is not None
                cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
                cert.verify_directly_issued_by(issuing[i])
                with pytest.raises(InvalidSignature):
                    publics[1 - i].verify(cert.signature, cert.tbs_certificate_bytes, ECDSA_256)
        # each switch of home re-initialised the module
        assert len(generations) == 6

        # closing the first (its session ended with its module generation) must not close
        # the second's live session, which may carry the same handle number
        session = cores[1].hsm._session
        logins: list[int] = []
        real_login = cores[1].hsm._login
        monkeypatch.setattr(
            cores[1].hsm, "_login", lambda token: logins.append(1) or real_login(token)
        )
        cores[0].close()
        data = b"after the other home closed"
        publics[1].verify(keys[1].sign(data, ECDSA_256), data, ECDSA_256)
        assert cores[1].hsm._session is session
        assert logins == []
    finally:
        for core in cores:
            core.close()
