"""Helpers for the crash-safety test: a ``hsmca serve`` that can be SIGKILLed as a whole,
client threads that issue (REST and ACME) and revoke through it, and a ledger of what the
clients were told.

The service runs in its own process group, so ``crash()`` kills the supervisor, both
gunicorn arbiters, their workers and the OCSP front end with one ``killpg(SIGKILL)``:
nobody gets to clean up (killing only the supervisor would send its children SIGTERM
through PR_SET_PDEATHSIG, a graceful stop). ``start()`` restarts it on the same ports.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.actors import operator
from pki.serials import serial_hex
from tests.acme_helpers import AcmeClient, Http01Responder, csr_der
from tests.api_helpers import issue, opened
from tests.conftest import RunningService, free_port
from tests.helpers import HSMCA, ROOT
from tests.secret_scan import remember

#: the longest a client waits for one order step, or for the service to come back
STEP_DEADLINE = 8.0
#: pause after a failed request (the service is down): a pace, not a synchronisation
RETRY_PAUSE = 0.05


class CrashableService(RunningService):
    """``hsmca serve --workers N`` in its own session (process group) on fixed ports, with
    ``env`` as its whole environment; started by the constructor, SIGKILLed by
    :meth:`crash`, restarted by :meth:`start`, stopped gracefully by :meth:`stop`."""

    def __init__(self, home: Path, env: dict[str, str], workers: int = 2) -> None:
        self.home = home
        self.env = env
        self.workers = workers
        self.root = home / "ca" / "root.pem"
        self.https_port, self.http_port = free_port(), free_port()
        self.base = f"https://127.0.0.1:{self.https_port}"
        self.http_base = f"http://127.0.0.1:{self.http_port}"
        self.log = home / "serve-crash.log"
        self.starts = 0
        with opened(home) as core:
            self.admin_token = core.create_token("admin", None, operator("crash-tests")).secret
        remember(self.admin_token)
        self.start()

    def start(self, ready_deadline_s: float = 45.0) -> float:
        """Start the service and wait until both listeners answer /healthz; return the
        seconds it took."""
        started = time.monotonic()
        self._log_file = self.log.open("ab")
        self.process = subprocess.Popen(
            [
                str(HSMCA),
                *("--home", str(self.home), "serve"),
                *("--https-port", str(self.https_port), "--http-port", str(self.http_port)),
                *("--workers", str(self.workers)),
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=self.env,
            start_new_session=True,
        )
        self.starts += 1
        try:
            self.wait_ready(ready_deadline_s)
        except BaseException:
            self.crash()
            raise
        return time.monotonic() - started

    def crash(self, deadline_s: float = 15.0) -> None:
        """SIGKILL the whole process group and wait until none of its processes is left."""
        pgid = self.process.pid
        os.killpg(pgid, signal.SIGKILL)
        self.process.wait(timeout=deadline_s)
        self._log_file.close()
        deadline = time.monotonic() + deadline_s
        while group_members(pgid):
            assert time.monotonic() < deadline, f"process group {pgid} survived SIGKILL"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(RETRY_PAUSE)  # polling interval, bounded by the deadline

    def close(self) -> int:
        """Stop gracefully if running (exit code), then kill any leftover of the group."""
        code = self.stop() if self.process.poll() is None else 0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return code


def group_members(pgid: int) -> list[int]:
    """Pids of live (not zombie) processes in process group ``pgid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


# -- what the clients were told ---------------------------------------------------------------


@dataclass
class Ledger:
    """Every certificate a client received (serial -> DER), every revocation a client saw
    succeed, every revocation whose outcome the client cannot know, and request counts."""

    received: dict[str, bytes] = field(default_factory=dict)
    via: dict[str, str] = field(default_factory=dict)
    #: a serial received twice with different certificates (must stay empty)
    clashes: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    revoke_unknown: set[str] = field(default_factory=set)
    #: exceptions that ended a client thread (must stay empty)
    crashes: list[str] = field(default_factory=list)
    ok: Counter[str] = field(default_factory=Counter)
    last_failure: dict[str, str] = field(default_factory=dict)
    failed: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def got(self, der: bytes, how: str) -> None:
        serial = serial_hex(x509.load_der_x509_certificate(der).serial_number)
        with self.lock:
            if serial in self.received and self.received[serial] != der:
                self.clashes.append(serial)
            self.received[serial] = der
            self.via[serial] = how
            self.ok[how] += 1

    def fail(self, what: str, why: str) -> None:
        with self.lock:
            self.failed[what] += 1
            self.last_failure[what] = why[:300]

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def summary(self) -> str:
        with self.lock:
            return (
                f"ok {dict(self.ok)}, failed {dict(self.failed)}, crashes {self.crashes}, "
                f"last failures {self.last_failure}"
            )

    def revocable(self, rng: random.Random) -> str | None:
        with self.lock:
            done = self.revoked | self.revoke_unknown
            left = sorted(s for s in self.received if s not in done)
        return rng.choice(left) if left else None


# -- the clients --------------------------------------------------------------------------------


class Load:
    """Client threads against ``service`` until :meth:`stop` or their request budget:
    ``rest`` REST issuers, ``acme`` ACME orderers (http-01 through one shared responder),
    one revoker. Failed requests are counted and the client carries on."""

    def __init__(
        self,
        service: CrashableService,
        http01_port: int,
        rest: int = 3,
        acme: int = 2,
        budget: int = 400,
        seed: int = 8,
    ) -> None:
        self.service = service
        self.ledger = Ledger()
        self.stopping = threading.Event()
        #: cleared while the service is down: clients wait instead of failing in a loop
        self.up = threading.Event()
        self.up.set()
        self.budget = budget
        self.responder = Http01Responder(http01_port)
        rng = random.Random(seed)
        jobs = [*([self._rest] * rest), *([self._acme] * acme), lambda: self._revoker(rng)]
        self.threads = [
            threading.Thread(target=self._guarded, args=(job,), name=f"client-{i}")
            for i, job in enumerate(jobs)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, deadline_s: float = 30.0) -> None:
        """Ask every client to stop after its current request and wait for them."""
        self.stopping.set()
        deadline = time.monotonic() + deadline_s
        for thread in self.threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self.responder.stop()
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"client threads did not stop: {alive}"

    def _guarded(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:  # recorded: the test fails on any client crash
            self.ledger.crashes.append(f"{type(exc).__name__}: {exc}")

    def _running(self, attempts: int) -> bool:
        return not self.stopping.is_set() and attempts < self.budget

    def _rest(self) -> None:
        session = self.service.session(self.service.admin_token)
        attempts = 0
        while self._running(attempts):
            if not self.up.wait(timeout=1.0):
                continue
            attempts += 1
            try:
                resp, _key = issue(session, self.service.base)  # type: ignore[arg-type]
            except requests.RequestException as exc:
                self._failed("rest", repr(exc))
                continue
            if resp.status_code != 201:
                self._failed("rest", f"{resp.status_code} {resp.text}")
                continue
            body = resp.json()
            cert = x509.load_pem_x509_certificate(body["certificate"].encode())
            if serial_hex(cert.serial_number) != body["serial"]:
                self.ledger.clashes.append(body["serial"])
            self.ledger.got(cert.public_bytes(Encoding.DER), "rest")

    def _failed(self, what: str, why: str) -> None:
        self.ledger.fail(what, why)
        self.stopping.wait(RETRY_PAUSE)

    def _revoker(self, rng: random.Random) -> None:
        session = self.service.session(self.service.admin_token)
        attempts = 0
        while self._running(attempts):
            serial = self.ledger.revocable(rng)
            if serial is None or self.ledger.count() < 3 * (len(self.ledger.revoked) + 1):
                self.stopping.wait(0.1)  # pace: about one revocation per three certificates
                continue
            if not self.up.wait(timeout=1.0):
                continue
            attempts += 1
            url = f"{self.service.base}/api/v1/certificates/{serial}/revoke"
            try:
                resp = session.post(url, json={"reason": "keyCompromise"}, timeout=15)  # type: ignore[attr-defined]
                told = resp.status_code == 200 and resp.json()["status"] == "revoked"
                why = f"{resp.status_code} {resp.text}"
            except requests.RequestException as exc:
                told, why = False, repr(exc)
            if told:
                with self.ledger.lock:
                    self.ledger.revoked.add(serial)
                    self.ledger.ok["revoke"] += 1
            else:  # lost on the way: the revocation may or may not have been committed
                with self.ledger.lock:
                    self.ledger.revoke_unknown.add(serial)
                self._failed("revoke", why)

    def _acme(self) -> None:
        attempts = 0
        while self._running(attempts):
            if not self.up.wait(timeout=1.0):
                continue
            attempts += 1
            try:
                der = self._one_order()
            except (requests.RequestException, ValueError, KeyError) as exc:
                self._failed("acme", repr(exc))
                continue
            if isinstance(der, bytes):
                self.ledger.got(der, "acme")
            else:
                self._failed("acme", der)

    def _one_order(self) -> bytes | str:
        """One whole order (new account, http-01, finalize, download): the leaf's DER, or
        why not (a step was refused or did not finish within :data:`STEP_DEADLINE`)."""
        client = AcmeClient(self.service)
        try:
            return self._order_steps(client)
        finally:
            client.http.close()

    def _order_steps(self, client: AcmeClient) -> bytes | str:
        name = f"{uuid.uuid4().hex[:10]}.crash.test"
        if (resp := client.register()).status_code != 201:
            return f"new-account {resp.status_code} {resp.text}"
        if (order := client.new_order(name)).status_code != 201:
            return f"new-order {order.status_code} {order.text}"
        authz_url = order.json()["authorizations"][0]
        authz = client.post(authz_url).json()
        chall = next(c for c in authz["challenges"] if c["type"] == "http-01")
        self.responder.tokens[chall["token"]] = client.key_authorization(chall["token"])
        if (resp := client.post(chall["url"], {})).status_code != 200:
            return f"challenge {resp.status_code} {resp.text}"
        if not self._until(lambda: client.post(authz_url).json()["status"], "valid"):
            return "authorization not valid in time"
        csr = base64.urlsafe_b64encode(csr_der([name])).rstrip(b"=").decode()
        if (resp := client.post(order.json()["finalize"], {"csr": csr})).status_code != 200:
            return f"finalize {resp.status_code} {resp.text}"
        order_url = order.headers["Location"]
        if not self._until(lambda: client.post(order_url).json()["status"], "valid"):
            return "order not valid in time"
        if (pem := client.post(client.post(order_url).json()["certificate"])).status_code != 200:
            return f"certificate {pem.status_code} {pem.text}"
        return x509.load_pem_x509_certificates(pem.content)[0].public_bytes(Encoding.DER)

    def _until(self, status: Callable[[], object], wanted: str) -> bool:
        """Poll ``status()`` until it says ``wanted`` (True), a final other state, the
        deadline or a stop request (False)."""
        deadline = time.monotonic() + STEP_DEADLINE
        while time.monotonic() < deadline and not self.stopping.is_set():
            now = status()
            if now == wanted:
                return True
            if now in ("invalid", "deactivated", "revoked", "expired"):
                return False
            self.stopping.wait(0.1)  # polling interval, bounded by the deadline
        return False


def wait_for(condition: Callable[[], bool], deadline_s: float, what: Callable[[], str]) -> None:
    """Poll ``condition()`` until true; fail after ``deadline_s`` saying ``what()``."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {deadline_s}s waiting for {what()}"
        time.sleep(RETRY_PAUSE)  # polling interval, bounded by the deadline


# -- a process that dies inside an ACME finalize ----------------------------------------------

#: exit code of :func:`die_in_finalize` when it died where it was meant to
FINALIZE_CRASH_EXIT = 87


def die_in_finalize(home: Path, thumbprint: str, order_id: str, csr_b64u: str) -> None:
    """Finalize an order through the real ACME core and die (``os._exit``) where the
    signed certificate would be stored: the process is gone with the order ``processing``
    and its certificate row ``pending``, as after a SIGKILL at that moment."""
    from pki.acme import jws
    from pki.acme.service import Acme, Authenticated
    from pki.service import Pki

    core = Pki.open(home)
    acme = Acme(core)
    account = acme.store.account_by_thumbprint(thumbprint)
    assert account is not None, thumbprint
    auth = Authenticated(jws.account_key(account.jwk), account, b"", by_kid=True)

    def die(*_args: object, **_kwargs: object) -> None:
        os._exit(FINALIZE_CRASH_EXIT)

    core.store.complete_issuance = die  # type: ignore[method-assign]
    acme.finalize(auth, order_id, {"csr": csr_b64u})
    raise SystemExit("finalize completed: the crash point was never reached")


if __name__ == "__main__":
    import sys

    die_in_finalize(Path(sys.argv[1]), *sys.argv[2:5])
