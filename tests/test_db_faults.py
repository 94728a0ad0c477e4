"""Database faults (issue #8): SQLite locked by another program, PostgreSQL stopped in the
middle of a run. Requests get a clear 503 problem+json (ACME: its own problem, OCSP:
tryLater), no certificate is signed without its row (a row left pending by an outage
mid-issuance is reconciled into revoked), and service recovers by itself when the
database is back."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from pki.bootstrap import initialise
from pki.config import write_default_config
from tests.acme_helpers import AcmeClient
from tests.api_helpers import assert_problem, poll
from tests.conftest import RunningService, build_csr
from tests.figures import record
from tests.helpers import db_path, hsmca, sqlite_query

pytestmark = pytest.mark.slow


def _issue(s: requests.Session, base: str, name: str) -> requests.Response:
    csr = build_csr(cn=name, sans=(name,))[0].decode()
    return s.post(f"{base}/api/v1/certificates", json={"csr": csr, "profile": "mtls"}, timeout=60)


def _issued(s: requests.Session, base: str, name: str) -> requests.Response | None:
    resp = _issue(s, base, name)
    return resp if resp.status_code == 201 else None


def _ocsp_status(svc: RunningService, cert: x509.Certificate) -> ocsp.OCSPResponseStatus:
    issuer = x509.load_pem_x509_certificate((svc.home / "ca" / "intermediate.pem").read_bytes())
    # a nonce: never a pre-signed answer, so the responder needs the database and the HSM
    req = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, issuer, hashes.SHA256())
        .add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
        .build()
    )
    resp = requests.post(
        f"{svc.http_base}/ocsp",
        data=req.public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return ocsp.load_der_ocsp_response(resp.content).response_status


def _home(root: Path, **database: object) -> Path:
    home = root / "home"
    home.mkdir()
    write_default_config(home, {"database": database, "ca": {"pending_grace_seconds": 1}})
    initialise(home, "DB Fault Org")
    return home


# -- SQLite locked -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    root = tmp_path_factory.mktemp("db-locked")
    home = _home(root, url=f"sqlite:///{root / 'home' / 'hsmca.db'}", busy_timeout_seconds=1.0)
    svc = RunningService(home, workers=1)
    yield svc
    assert svc.stop() == 0, svc.log.read_text()[-2000:]


def test_sqlite_locked_by_another_program_gives_503_then_recovers(
    sqlite_service: RunningService,
) -> None:
    svc, home = sqlite_service, sqlite_service.home
    s = svc.session(svc.admin_token)
    assert _issue(s, svc.base, "before.locked.test").status_code == 201
    rows = sqlite_query(home, "SELECT count(*) FROM certificates")[0][0]
    events = sqlite_query(home, "SELECT count(*) FROM audit_events")[0][0]
    holder = sqlite3.connect(db_path(home), isolation_level=None, timeout=5)
    holder.execute("BEGIN EXCLUSIVE")  # a backup tool, an operator's sqlite3 shell...
    waits = []
    try:
        for i in range(3):
            started = time.monotonic()
            resp = _issue(s, svc.base, f"during-{i}.locked.test")
            waits.append(time.monotonic() - started)
            body = assert_problem(resp, 503)
            assert body["type"] == "urn:hsmca:problem:database-unavailable", body
            assert "locked" in body["detail"] and int(resp.headers["Retry-After"]) > 0
        # reads go on in WAL mode: the certificate list still answers
        assert s.get(f"{svc.base}/api/v1/certificates?limit=1", timeout=30).status_code == 200
    finally:
        holder.rollback()
        holder.close()
    assert sqlite_query(home, "SELECT count(*) FROM certificates")[0][0] == rows
    assert sqlite_query(home, "SELECT count(*) FROM audit_events")[0][0] == events
    resp = poll(lambda: _issued(s, svc.base, "after.locked.test"), 30, "issuance after the lock")
    assert resp.json()["serial"]
    assert max(waits) < 10, waits  # busy_timeout_seconds = 1: no request hangs
    record("db-locked", refused_503=len(waits), longest_wait_s=round(max(waits), 2))


# -- PostgreSQL stopped mid-run ----------------------------------------------------------


@pytest.fixture(scope="module")
def pg_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, str]]:
    from tests.pg import PostgresUnavailable, running_postgres

    root = tmp_path_factory.mktemp("pg-down")
    try:
        with running_postgres(root / "pg") as url:
            svc = RunningService(_home(root, url=url), workers=1)
            yield svc, url
            assert svc.stop() == 0, svc.log.read_text()[-2000:]
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")


class _Load:
    """Client threads issuing until stopped; every answer's status is counted."""

    def __init__(self, svc: RunningService, threads: int = 3, limit: int = 400) -> None:
        self.svc, self.limit = svc, limit
        self.statuses: list[int] = []
        self.received: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, worker: int) -> None:
        s = self.svc.session(self.svc.admin_token)
        for i in range(self.limit):
            if self.stop.is_set():
                return
            try:
                resp = _issue(s, self.svc.base, f"l{worker}-{i}.pg.test")
                status = resp.status_code
            except requests.RequestException:
                status = 0
            with self._lock:
                self.statuses.append(status)
                if status == 201:
                    self.received.append(resp.json()["serial"])

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)


def test_postgres_stopped_mid_run_gives_503_and_recovers(
    pg_service: tuple[RunningService, str],
) -> None:
    from sqlalchemy import create_engine, text

    from tests.pg import start_postgres, stop_postgres

    svc, url = pg_service
    s = svc.session(svc.admin_token)
    first = _issue(s, svc.base, "before.pg.test")
    assert first.status_code == 201, first.text
    cert = x509.load_pem_x509_certificate(first.json()["certificate"].encode())
    account = AcmeClient(svc)
    assert account.register().status_code == 201
    with _Load(svc) as load:
        poll(lambda: len(load.received) >= 5 or None, 60, "load to issue")
        stop_postgres(url)
        down_at = time.monotonic()
        try:
            resp = _issue(s, svc.base, "down.pg.test")
            body = assert_problem(resp, 503)
            assert body["type"] == "urn:hsmca:problem:database-unavailable", body
            assert "postgresql" not in body["detail"].lower()  # no URL, no driver text
            health = s.get(f"{svc.base}/healthz", timeout=30)
            assert health.status_code == 503 and health.json()["database"].startswith("error")
            order = account.new_order("down.pg.test")
            assert order.status_code == 503, order.text
            assert order.json()["type"] == "urn:ietf:params:acme:error:serverInternal"
            assert int(order.headers["Retry-After"]) > 0
            assert _ocsp_status(svc, cert) == ocsp.OCSPResponseStatus.TRY_LATER
            poll(lambda: 503 in load.statuses[-3:] or None, 60, "the load to see 503s")
        finally:
            start_postgres(url)
        up_at = time.monotonic()
        mark = len(load.statuses)
        poll(lambda: 201 in load.statuses[mark:] or None, 60, "issuance to resume under load")
        recovered = time.monotonic() - up_at
    assert set(load.statuses) <= {201, 503}, sorted(set(load.statuses))
    assert _ocsp_status(svc, cert) == ocsp.OCSPResponseStatus.SUCCESSFUL
    # an issuance cut off after its signature left a pending row: reconciled, never lost
    reconciled = hsmca(svc.home, "jobs", "run", "reconcile-pending")
    assert reconciled.returncode == 0, reconciled.stderr
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            status = dict(conn.execute(text("SELECT serial, status FROM certificates")).all())
    finally:
        engine.dispose()
    assert "pending" not in status.values()
    lost = [
        (serial, status.get(serial)) for serial in load.received if status.get(serial) != "good"
    ]
    assert lost == [], lost
    verified = hsmca(svc.home, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    record(
        "db-postgres-stopped",
        requests=len(load.statuses),
        issued=load.statuses.count(201),
        refused_503=load.statuses.count(503),
        outage_s=round(up_at - down_at, 2),
        recovery_s=round(recovered, 2),
        lost=len(lost),
    )


# -- which errors are outages --------------------------------------------------------------


def test_only_outages_become_503_and_bugs_stay_500(tmp_path: Path) -> None:
    """A lock or a vanished server is an outage (503, retried); a syntax error or a
    missing column (a forgotten migration) is a bug: a 500 with its traceback logged."""
    import psycopg
    from sqlalchemy import create_engine, exc, text

    from pki.store.faults import unavailable

    engine = create_engine(f"sqlite:///{tmp_path / 'f.db'}")
    bugs = [
        "selec 1",
        "CREATE TABLE t (a INT); INSERT INTO t (b) VALUES (1)",
        "SELECT 1 UNION SELECT 1, 2",
    ]
    try:
        for sql in bugs:
            with pytest.raises(exc.OperationalError) as raised, engine.begin() as conn:
                for statement in sql.split("; "):
                    conn.execute(text(statement))
            assert unavailable(raised.value) is None, sql
    finally:
        engine.dispose()
    locked = exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    assert "locked" in str(unavailable(locked))
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(host="127.0.0.1", port=1, connect_timeout=2)
    assert unavailable(refused.value) is not None
    assert unavailable(ValueError("not a database error")) is None
