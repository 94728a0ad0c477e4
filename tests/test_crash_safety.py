"""Crash safety under load (issue #8, item 1).

A real ``hsmca serve`` (SQLite, SoftHSM2, two workers) issues certificates to REST and
ACME clients and revokes some of them, and is SIGKILLed as a whole process group at
random moments, then restarted on the same ports, several times. Afterwards the database,
the audit chain, the CRL and OCSP must agree with what every client was told: nothing a
client received is lost or has the wrong status, no serial exists twice, no row is left
``pending``, and every interrupted issuance was reconciled into a revoked row.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from pki.bootstrap import initialise
from tests.acme_helpers import (
    AcmeClient,
    AcmeService,
    Http01Responder,
    b64u,
    configure_acme,
    csr_der,
    poll,
    running_challtestsrv,
)
from tests.conftest import free_port
from tests.crash_helpers import (
    FINALIZE_CRASH_EXIT,
    CrashableService,
    Ledger,
    Load,
    wait_for,
)
from tests.figures import record
from tests.helpers import ROOT, clean_env, hsmca, sqlite_query
from tests.revocation_helpers import http_get, load_response, ocsp_post, serials_of

SEED = 8_2024
KILLS = 3
#: pending rows older than this are reconciled when the service starts
GRACE_SECONDS = 1
#: OCSP answers checked per kind (good, revoked by a client, reconciled)
OCSP_SAMPLE = 6


@pytest.mark.slow
def test_sigkill_under_load_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL of the whole service at random moments under REST and ACME issuance and
    revocation loses no certificate a client received, duplicates no serial, leaves no
    row pending, keeps the audit chain intact and CRL and OCSP in line with the database."""
    began = time.monotonic()
    rng = random.Random(SEED)
    home = tmp_path / "home"
    initialise(home, "Crash Org")
    # the service's private socket directory outlives a SIGKILL: keep it where we clean up
    scratch = Path(tempfile.mkdtemp(prefix="hc-"))
    env = clean_env(HSMCA_CA__PENDING_GRACE_SECONDS=str(GRACE_SECONDS), TMPDIR=str(scratch))
    with running_challtestsrv() as dns:
        http01_port = free_port()
        configure_acme(home, http01_port=http01_port, dns_resolver=dns.dns)
        service = CrashableService(home, env)
        try:
            load = Load(service, http01_port, seed=SEED)
            try:
                restarts = crash_repeatedly(service, load, rng)
            finally:
                load.stop()
            loaded = time.monotonic()
            figures = check_everything(service, load.ledger, rng)
            figures["check_seconds"] = round(time.monotonic() - loaded, 1)
        finally:
            code = service.close()
            shutil.rmtree(scratch, ignore_errors=True)
    assert code == 0, service.log.read_text()[-3000:]
    record(
        "crash-safety",
        kills=KILLS,
        restart_seconds_max=round(max(restarts), 1),
        **figures,
        seconds=round(time.monotonic() - began, 1),
    )
    assert figures["lost"] == 0, "certificates lost or with the wrong status (see above)"


def check_everything(service: CrashableService, ledger: Ledger, rng: random.Random) -> dict:
    """Compare the database, the audit chain, CRLs and OCSP with what the clients were
    told; return the figures (failing first on anything but lost certificates, which the
    caller fails on after printing the figures)."""
    home = service.home
    assert not ledger.crashes, ledger.crashes
    assert not ledger.clashes, f"a serial came with two different certificates: {ledger.clashes}"
    assert ledger.ok["rest"] and ledger.ok["acme"] and ledger.ok["revoke"], ledger.summary()
    rows = certificate_rows(home)
    twice = sqlite_query(home, "SELECT serial FROM certificates GROUP BY serial HAVING COUNT(*)>1")
    assert twice == [], f"serials stored twice: {twice}"
    wait_for(
        lambda: sqlite_query(home, "SELECT 1 FROM certificates WHERE status='pending'") == [],
        10,
        lambda: "no pending row after reconciliation",
    )
    lost = lost_certificates(ledger, rows)
    reconciled = [
        s
        for (s,) in sqlite_query(
            home, "SELECT subject FROM audit_events WHERE action=?", ("certificate.reconcile",)
        )
    ]
    for serial in reconciled:
        assert serial not in ledger.received, f"reconciled {serial}, which a client received"
        assert rows[serial].status == "revoked", (serial, rows[serial])
    # signed and stored, but the answer was lost in a crash (the service's own certificates
    # are not counted): the client may fetch it again (ACME) or ask anew
    unclaimed = [
        s for s, r in rows.items() if r.der and r.requester != "system" and s not in ledger.received
    ]
    stuck_orders = sqlite_query(home, "SELECT id FROM acme_orders WHERE status='processing'")

    with ThreadPoolExecutor(1) as pool:  # the CLI's start-up overlaps the HTTP checks
        verifying = pool.submit(hsmca, home, "audit", "verify")
        crl_entries = check_crls(service, rows)
        checked = check_ocsp(service, rows, ledger, reconciled, rng)
        verify = verifying.result()
    assert verify.returncode == 0, verify.stdout + verify.stderr

    if lost:
        print(f"[reliability] crash-safety LOST: {lost}")
    return {
        "requests_ok": sum(ledger.ok.values()),
        "requests_failed": sum(ledger.failed.values()),
        "rest_certificates": ledger.ok["rest"],
        "acme_certificates": ledger.ok["acme"],
        "certificates_received": len(ledger.received),
        "revocations_confirmed": len(ledger.revoked),
        "revocations_uncertain": len(ledger.revoke_unknown),
        "db_rows": len(rows),
        "rows_reconciled": len(reconciled),
        "signed_never_received": len(unclaimed),
        "acme_orders_stuck_processing": len(stuck_orders),
        "crl_entries": crl_entries,
        "ocsp_checked": checked,
        "lost": len(lost),
    }


def test_order_interrupted_in_finalize_does_not_stay_processing(
    acme_service: AcmeService,
) -> None:
    """RFC 8555 7.1.6: a ``processing`` order becomes ``valid`` or ``invalid``. A process
    that dies inside finalize leaves the order ``processing`` and its certificate row
    ``pending``; once reconciliation has revoked that row, the order must not stay
    ``processing`` (its client would poll it forever)."""
    home = acme_service.home
    client = AcmeClient(acme_service)
    assert client.register().status_code == 201
    name = f"{uuid.uuid4().hex[:10]}.finalize-crash.test"
    order = client.new_order(name)
    assert order.status_code == 201, order.text
    order_url = order.headers["Location"]
    authz_url = order.json()["authorizations"][0]
    chall = next(c for c in client.post(authz_url).json()["challenges"] if c["type"] == "http-01")
    responder = Http01Responder(acme_service.http01_port)
    try:
        responder.tokens[chall["token"]] = client.key_authorization(chall["token"])
        assert client.post(chall["url"], {}).status_code == 200
        poll(lambda: client.post(order_url).json(), lambda o: o["status"] == "ready", 15)
    finally:
        responder.stop()
    died = subprocess.run(
        [
            *(sys.executable, "-m", "tests.crash_helpers", str(home), client.key.thumbprint()),
            *(order_url.rsplit("/", 1)[-1], b64u(csr_der([name]))),
        ],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert died.returncode == FINALIZE_CRASH_EXIT, died.stderr[-2000:]
    assert client.post(order_url).json()["status"] == "processing"
    (serial,) = sqlite_query(
        home,
        "SELECT serial FROM certificates WHERE status='pending' AND sans LIKE ?",
        (f"%{name}%",),
    )[0]
    job = hsmca(
        home, "jobs", "run", "reconcile-pending", env=clean_env(HSMCA_CA__PENDING_GRACE_SECONDS="0")
    )
    assert job.returncode == 0, job.stdout + job.stderr
    assert sqlite_query(home, "SELECT status FROM certificates WHERE serial=?", (serial,)) == [
        ("revoked",)
    ]
    state = poll(lambda: client.post(order_url).json(), lambda o: o["status"] != "processing", 2)
    assert state["status"] == "invalid", state


def crash_repeatedly(service: CrashableService, load: Load, rng: random.Random) -> list[float]:
    """Run the load, SIGKILL the service :data:`KILLS` times at random moments (each once
    a certificate was issued since the last start), restart it each time, and return the
    restart durations. Load continues after the last restart until three more
    certificates were received."""
    load.start()
    restarts = []
    for kill in range(KILLS):
        since = load.ledger.count()
        wait_for(
            lambda n=since: load.ledger.count() > n,
            30,
            lambda: f"a certificate since the start ({load.ledger.summary()})",
        )
        time.sleep(rng.uniform(0.3, 1.5))  # the random moment of the crash
        load.up.clear()
        service.crash()
        killed = time.monotonic()
        if kill == KILLS - 1:  # the last start must see this crash's pending rows as stale
            time.sleep(max(0.0, GRACE_SECONDS + 0.5 - (time.monotonic() - killed)))
        restarts.append(service.start())
        load.up.set()
    since = load.ledger.count()
    wait_for(
        lambda: load.ledger.count() >= since + 3,
        30,
        lambda: f"certificates after the last restart ({load.ledger.summary()})",
    )
    return restarts


class Row(NamedTuple):
    status: str
    der: bytes | None
    issuer: str
    requester: str


def certificate_rows(home: Path) -> dict[str, Row]:
    """Every certificate row by serial, read straight from the SQLite file."""
    found = sqlite_query(home, "SELECT serial, status, der, issuer_id, requester FROM certificates")
    return {serial: Row(*rest) for serial, *rest in found}


def lost_certificates(ledger: Ledger, rows: dict[str, Row]) -> list[str]:
    """Received certificates missing from the database, stored with another DER, or
    with a status other than what their client was told (revoked, or good)."""
    lost = []
    for serial, der in ledger.received.items():
        row = rows.get(serial)
        if row is None or row.der != der:
            lost.append(f"{serial}: missing or different DER")
            continue
        if serial in ledger.revoked:
            expected: tuple[str, ...] = ("revoked",)
        elif serial in ledger.revoke_unknown:
            expected = ("good", "revoked")
        else:
            expected = ("good",)
        if row.status not in expected:
            lost.append(f"{serial}: {row.status}, expected {expected}")
    return lost


def issuer_certificate(service: CrashableService, issuer_id: str) -> x509.Certificate:
    resp = http_get(f"{service.http_base}/ca/{issuer_id}.der")
    assert resp.status_code == 200, resp.text
    return x509.load_der_x509_certificate(resp.content)


def check_crls(service: CrashableService, rows: dict[str, Row]) -> int:
    """Each issuer's CRL is validly signed and lists exactly its revoked rows; returns
    the number of entries."""
    total = 0
    for issuer_id in {row.issuer for row in rows.values()}:
        issuer = issuer_certificate(service, issuer_id)
        revoked = {
            int(s, 16) for s, r in rows.items() if r.issuer == issuer_id and r.status == "revoked"
        }
        resp = http_get(f"{service.http_base}/crl/{issuer_id}.crl")
        assert resp.status_code == 200, resp.text
        crl = x509.load_der_x509_crl(resp.content)
        assert crl.is_signature_valid(issuer.public_key()), issuer_id  # type: ignore[arg-type]
        assert serials_of(crl) == revoked, (
            f"CRL of {issuer_id}: missing {len(revoked - serials_of(crl))}, "
            f"extra {len(serials_of(crl) - revoked)}"
        )
        total += len(revoked)
    return total


def check_ocsp(
    service: CrashableService,
    rows: dict[str, Row],
    ledger: Ledger,
    reconciled: list[str],
    rng: random.Random,
) -> int:
    """OCSP answers (signature checked) agree with the database for a sample of good,
    client-revoked and reconciled serials; returns how many were checked."""
    good = sorted(s for s in ledger.received if rows[s].status == "good")
    revoked = sorted(ledger.revoked)
    sample = [
        *rng.sample(good, min(OCSP_SAMPLE, len(good))),
        *rng.sample(revoked, min(OCSP_SAMPLE, len(revoked))),
        *rng.sample(sorted(reconciled), min(OCSP_SAMPLE, len(reconciled))),
    ]
    issuers = {i: issuer_certificate(service, i) for i in {rows[s].issuer for s in sample}}
    for serial in sample:
        status = rows[serial].status
        answer = ocsp_status(service, issuers[rows[serial].issuer], serial)
        expected = ocsp.OCSPCertStatus.GOOD if status == "good" else ocsp.OCSPCertStatus.REVOKED
        assert answer == expected, f"OCSP says {answer} for {serial}, the database {status}"
    return len(sample)


def ocsp_status(
    service: CrashableService, issuer: x509.Certificate, serial: str
) -> ocsp.OCSPCertStatus:
    """Ask the service's OCSP responder (POST) about ``serial`` by issuer hashes (works
    for reconciled rows, which have no certificate) and check the answer's signature."""
    name_hash = hashlib.sha1(issuer.subject.public_bytes()).digest()
    key_hash = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest  # type: ignore[arg-type]
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(name_hash, key_hash, int(serial, 16), hashes.SHA1())
        .build()
    )
    resp = ocsp_post(f"{service.http_base}/ocsp", request.public_bytes(Encoding.DER))
    assert resp.status_code == 200, resp.text
    answer = load_response(resp.content)
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL, serial
    assert answer.serial_number == int(serial, 16)
    signer = (answer.certificates[0] if answer.certificates else issuer).public_key()
    digest = answer.signature_hash_algorithm
    if isinstance(signer, ec.EllipticCurvePublicKey):
        signer.verify(answer.signature, answer.tbs_response_bytes, ec.ECDSA(digest))  # type: ignore[arg-type]
    else:
        signer.verify(answer.signature, answer.tbs_response_bytes, PKCS1v15(), digest)  # type: ignore[union-attr,call-arg]
    return answer.certificate_status
