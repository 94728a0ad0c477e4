"""Scale-out (issue #8, item 8): two ``hsmca serve`` instances on one PostgreSQL database
and one SoftHSM2 token directory, behind a round-robin proxy, behave as one server.

ACME orders, nonces, rate limits, revocations, issuance and the scheduled jobs are checked
with real requests: some steps pinned to one instance
(:class:`tests.scale_out_helpers.Router`), others spread by the proxy, whose counters show
that both instances answered. Starting a cluster is the expensive part (two services of
five processes each), so one test runs every ``check_*`` on one cluster.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID

from pki.scheduler import JOBS
from pki.serials import serial_hex
from pki.store.jobs_models import JobRun
from tests.acme_helpers import ERR, ChallTestSrv
from tests.api_helpers import issue, opened, poll
from tests.conftest import free_port
from tests.figures import record
from tests.helpers import hsmca, hsmca_json
from tests.proxy import RoundRobinProxy
from tests.revocation_helpers import (
    OCSP_REQUEST,
    aia_url,
    cdp_url,
    load_response,
    plain_session,
    serials_of,
)
from tests.scale_out_helpers import (
    ORDERS_PER_HOUR,
    Cluster,
    acme_flow,
    early_runs,
    job_runs,
    leader_locks,
    new_connections,
    overlapping_runs,
    start_cluster,
)

#: certificates issued at once through the proxy, by this many client threads
BURST = 24
BURST_THREADS = 6
BURST_SECONDS = 60
#: nonces minted on one instance and redeemed on the other
NONCE_ROUNDS = 4
#: a standby polls the leader lock every 5 s: takeover must happen well within this
TAKEOVER_DEADLINE_S = 30.0


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, challtestsrv: ChallTestSrv) -> Iterator[Cluster]:
    """Two instances on one PostgreSQL home behind two proxies; stopped cleanly after."""
    running = start_cluster(tmp_path, pg_url, challtestsrv)
    yield running
    with opened(running.home) as core:
        certificates = core.store.count_certificates()
    running.stop()
    record(
        "scale-out",
        certificates_in_database=certificates,
        https_connections_per_instance=running.https.served,
        http_connections_per_instance=running.http.served,
        connections_refused_per_instance=[
            a + b for a, b in zip(running.https.refused, running.http.refused, strict=True)
        ],
    )


class _Echo(socketserver.ThreadingTCPServer):
    """A backend that answers ``<index>:`` and everything it read, once the client is done."""

    daemon_threads = True

    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _EchoHandler(socketserver.StreamRequestHandler):
    server: _Echo

    def handle(self) -> None:
        data = self.rfile.read()  # until the client's half-close
        self.wfile.write(f"{self.server.index}:".encode() + data)


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_proxy_alternates_skips_a_dead_backend_and_closes_cleanly() -> None:
    """New connections go to the backends in turn (a refusing one is skipped and counted),
    bytes pass untouched both ways, and close() ends open connections and its threads."""
    backends = [_Echo(0), _Echo(1)]
    dead = free_port()
    try:
        with RoundRobinProxy([*(("127.0.0.1", b.server_address[1]) for b in backends),
                              ("127.0.0.1", dead)]) as proxy:  # fmt: skip
            replies = [_exchange(proxy.port, b"hello") for _ in range(6)]
            assert replies == [b"0:hello", b"1:hello"] * 3
            assert proxy.served == [3, 3, 0] and proxy.refused == [0, 0, 2]
            assert proxy.history == [0, 1, 0, 1, 0, 1]
            big = os.urandom(1 << 20)
            assert _exchange(proxy.port, big) == b"0:" + big
            idle = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            poll(lambda: sum(proxy.served) == 8 or None, 10, "the idle connection relayed")
        with idle:
            assert idle.recv(1) == b""  # closed by close(), which joined every thread
    finally:
        for backend in backends:
            backend.shutdown()
            backend.server_close()


def _name() -> str:
    return f"{uuid.uuid4().hex[:10]}.scale.test"


def _good(home: Path, serial: str) -> bool:
    with opened(home) as core:
        return core.store.certificate(serial).status == "good"


# -- ACME ------------------------------------------------------------------------------------


def check_order_created_on_one_instance_finalises_on_the_other(cluster: Cluster) -> None:
    """Account and order on A, challenge and finalize on B, download from A — every URL
    naming the proxy; then a whole flow through the proxy, spread over both instances."""
    a, b = cluster.netloc(cluster.a), cluster.netloc(cluster.b)
    plan = {"account": a, "order": a, "authorize": b, "finalize": b, "download": a}
    client, router = cluster.acme_client()

    def at(step: str) -> None:
        router.target = plan[step]

    name = _name()
    leaf, order_url = acme_flow(client, name, cluster.http01_port, at)
    assert client.kid is not None and client.kid.startswith(f"{cluster.public_https}/acme/acct/")
    assert order_url.startswith(f"{cluster.public_https}/acme/order/")
    assert router.sent[a] >= 4 and router.sent[b] >= 4, router.sent
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [name]
    assert cdp_url(leaf).startswith(f"{cluster.public_http}/crl/")
    ocsp_url = aia_url(leaf, AuthorityInformationAccessOID.OCSP)
    assert ocsp_url.startswith(cluster.public_http), ocsp_url
    serial = serial_hex(leaf.serial_number)
    assert _good(cluster.home, serial)

    proxied, _ = cluster.acme_client()
    mark = cluster.https.mark()
    other, _ = acme_flow(proxied, _name(), cluster.http01_port, lambda step: None)
    spread = cluster.https.since(mark)
    assert min(spread) >= 4, spread
    assert other.serial_number != leaf.serial_number
    record(
        "scale-out",
        scenario="acme-cross-instance",
        pinned_requests={"a": router.sent[a], "b": router.sent[b]},
        proxied_connections_per_instance=spread,
        certificates=2,
    )


def check_nonce_from_one_instance_is_accepted_once_by_the_other(cluster: Cluster) -> None:
    """A nonce minted by A is redeemed by B, then refused as badNonce by A and by B (and
    the other way round): used nonces are shared through the database."""
    a, b = cluster.netloc(cluster.a), cluster.netloc(cluster.b)
    client, router = cluster.acme_client()
    assert client.register().status_code == 201
    new_order = client.directory["newOrder"]
    refused = 0
    for round_ in range(NONCE_ROUNDS):
        minter, redeemer = (a, b) if round_ % 2 == 0 else (b, a)
        router.target = minter
        head = client.http.head(client.directory["newNonce"], timeout=10)
        assert head.status_code == 200, head.text
        nonce = head.headers["Replay-Nonce"]
        payload = {"identifiers": [{"type": "dns", "value": _name()}]}
        router.target = redeemer
        accepted = client.post(new_order, payload, nonce=nonce)
        assert accepted.status_code == 201, accepted.text
        for replay_at in (a, b):
            router.target = replay_at
            again = client.post(new_order, payload, nonce=nonce)
            assert again.status_code == 400, again.text
            assert again.json()["type"] == f"{ERR}badNonce", again.text
            assert again.headers["Replay-Nonce"] != nonce
            refused += 1
    assert refused == 2 * NONCE_ROUNDS
    record(
        "scale-out",
        scenario="nonces",
        redeemed_cross_instance=NONCE_ROUNDS,
        replays_refused=refused,
        pinned_requests={"a": router.sent[a], "b": router.sent[b]},
    )


def check_order_rate_limit_is_counted_cluster_wide(cluster: Cluster) -> None:
    """An account's orders made through the proxy on both instances add up to one limit,
    which both instances then enforce."""
    client, router = cluster.acme_client()
    assert client.register().status_code == 201
    mark = cluster.https.mark()
    made = [client.new_order(_name()).status_code for _ in range(ORDERS_PER_HOUR)]
    assert made == [201] * ORDERS_PER_HOUR
    spread = cluster.https.since(mark)
    assert min(spread) >= ORDERS_PER_HOUR // 2 - 1, spread
    for instance in (cluster.a, cluster.b):
        router.target = cluster.netloc(instance)
        refused = client.new_order(_name())
        assert refused.status_code == 429, refused.text
        assert refused.json()["type"] == f"{ERR}rateLimited", refused.text
        assert int(refused.headers["Retry-After"]) > 0
    record(
        "scale-out",
        scenario="order-rate-limit",
        orders_accepted=ORDERS_PER_HOUR,
        connections_per_instance=spread,
        refused_by_each_instance=1,
    )


# -- revocation ------------------------------------------------------------------------------


def _ocsp_status(base: str, request_der: bytes) -> ocsp.OCSPCertStatus:
    with new_connections(plain_session()) as s:
        resp = s.post(
            f"{base}/ocsp", data=request_der, headers={"Content-Type": OCSP_REQUEST}, timeout=15
        )
    assert resp.status_code == 200, resp.text
    answer = load_response(resp.content)
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return answer.certificate_status


def _crl_serials(url: str) -> set[int]:
    with new_connections(plain_session()) as s:
        resp = s.get(url, timeout=15)
    assert resp.status_code == 200, resp.text
    return serials_of(x509.load_der_x509_crl(resp.content))


def check_revocation_through_one_instance_is_seen_by_the_other(cluster: Cluster) -> None:
    """Issued through the proxy, revoked through B: OCSP answered by A says revoked (and so
    does every answer through the proxy), and A's CRL lists it after the next publish."""
    with cluster.session() as s:
        resp, _ = issue(s, cluster.public_https)
        assert resp.status_code == 201, resp.text
        serial = resp.json()["serial"]
        leaf = x509.load_pem_x509_certificate(resp.json()["certificate"].encode())
        issuer = x509.load_pem_x509_certificate(
            (cluster.home / "ca" / "intermediate.pem").read_bytes()
        )
        request_der = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(leaf, issuer, hashes.SHA1())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        assert _ocsp_status(cluster.a.http_base, request_der) == ocsp.OCSPCertStatus.GOOD
        crl_at_a = f"{cluster.a.http_base}/crl/{cluster.issuer_id}.crl"
        assert leaf.serial_number not in _crl_serials(crl_at_a)

        revoked_at = time.monotonic()
        done = s.post(
            f"{cluster.b.base}/api/v1/certificates/{serial}/revoke",
            json={"reason": "keyCompromise"},
            timeout=15,
        )
        assert done.status_code == 200, done.text
    revoked = ocsp.OCSPCertStatus.REVOKED
    poll(
        lambda: _ocsp_status(cluster.a.http_base, request_der) == revoked,
        15,
        "OCSP at A to say revoked",
    )
    ocsp_seconds = time.monotonic() - revoked_at
    mark = cluster.http.mark()
    through_proxy = [_ocsp_status(cluster.public_http, request_der) for _ in range(4)]
    assert through_proxy == [revoked] * 4
    assert min(cluster.http.since(mark)) >= 2, cluster.http.since(mark)
    poll(lambda: leaf.serial_number in _crl_serials(crl_at_a), 20, "A's CRL to list it")
    crl_seconds = time.monotonic() - revoked_at
    assert leaf.serial_number in _crl_serials(cdp_url(leaf))  # the CDP names the proxy
    record(
        "scale-out",
        scenario="revocation",
        ocsp_revoked_after_s=round(ocsp_seconds, 2),
        crl_lists_after_s=round(crl_seconds, 2),
    )


# -- issuance --------------------------------------------------------------------------------


def check_burst_through_both_instances_gives_unique_serials_and_one_audit_chain(
    cluster: Cluster,
) -> None:
    """BURST issuances at once through the proxy land on both instances; serials are
    unique, each is stored once as good, and the audit chain (one lock across processes)
    verifies."""

    def one(_: int) -> requests.Response:
        with cluster.session() as s:
            return issue(s, cluster.public_https)[0]

    mark = cluster.https.mark()
    started = time.monotonic()
    with ThreadPoolExecutor(BURST_THREADS) as pool:
        responses = list(pool.map(one, range(BURST), timeout=BURST_SECONDS))
    elapsed = time.monotonic() - started
    spread = cluster.https.since(mark)
    assert [r.status_code for r in responses] == [201] * BURST, [r.text for r in responses]
    serials = [r.json()["serial"] for r in responses]
    assert len(set(serials)) == BURST
    assert min(spread) >= BURST // 3, spread
    with opened(cluster.home) as core:
        assert {core.store.certificate(s).status for s in serials} == {"good"}
        issued = [e.subject for e in core.store.audit_events() if e.action == "certificate.issue"]
    assert sorted(s for s in issued if s in set(serials)) == sorted(serials)
    verify = hsmca(cluster.home, "audit", "verify")
    assert verify.returncode == 0, verify.stderr
    assert "chain intact" in verify.stdout
    record(
        "scale-out",
        scenario="burst",
        certificates=BURST,
        connections_per_instance=spread,
        seconds=round(elapsed, 2),
        certificates_per_s=round(BURST / elapsed, 1),
    )


# -- the scheduler ---------------------------------------------------------------------------


def _runs_by(home: Path, instance: str) -> list[JobRun]:
    return [r for r in job_runs(home) if r.instance == instance and r.outcome != "running"]


def check_jobs_run_once_cluster_wide_and_a_standby_takes_over(cluster: Cluster) -> None:
    """One leader (one advisory lock) runs each job once; SIGTERM to it and the other
    instance takes the lock and runs the jobs; the restarted instance stays a standby."""
    names = {cluster.instance_name(svc): i for i, svc in enumerate(cluster.instances)}

    def every_job_ran() -> list[JobRun] | None:
        found = job_runs(cluster.home)
        return found if {r.job for r in found if r.outcome == "ok"} == set(JOBS) else None

    runs = poll(
        every_job_ran,
        30,
        "the leader's first run of every job",
    )
    leaders = {r.instance for r in runs}
    assert len(leaders) == 1 and leaders <= set(names), (leaders, names)
    (leader,) = leaders
    assert overlapping_runs(runs) == [] and early_runs(runs) == []
    assert leader_locks(cluster.db_url) == 1
    listed = hsmca_json(cluster.home, "jobs", "list")
    assert {row["last_instance"] for row in listed} == {leader}

    index = names[leader]
    old, standby = cluster.instances[index], cluster.instances[1 - index]
    successor = cluster.instance_name(standby)
    stopped_at = dt.datetime.now(dt.UTC)
    old.process.send_signal(signal.SIGTERM)
    taken = poll(
        lambda: (
            {r.job for r in _runs_by(cluster.home, successor)} == set(JOBS)
            and _runs_by(cluster.home, successor)
        ),
        TAKEOVER_DEADLINE_S,
        "the standby to run every job",
        every=0.1,
    )
    takeover_s = (min(r.started_at for r in taken) - stopped_at).total_seconds()
    assert old.stop() == 0, old.log.read_text()[-2000:]
    assert 0 < takeover_s < TAKEOVER_DEADLINE_S
    assert leader_locks(cluster.db_url) == 1
    with cluster.session() as s:  # the proxy skips the stopped instance
        served = [
            s.get(f"{cluster.public_https}/healthz", timeout=10).status_code for _ in range(4)
        ]
    assert served == [200] * 4

    restarted = cluster.restart(index)
    mark = cluster.https.mark()
    with cluster.session() as s:
        served = [
            s.get(f"{cluster.public_https}/healthz", timeout=10).status_code for _ in range(4)
        ]
    assert served == [200] * 4 and min(cluster.https.since(mark)) >= 2
    assert leader_locks(cluster.db_url) == 1
    assert _runs_by(cluster.home, cluster.instance_name(restarted)) == []
    all_runs = job_runs(cluster.home)
    assert overlapping_runs(all_runs) == [] and early_runs(all_runs) == []
    assert {r.instance for r in all_runs} == {leader, successor}
    listed = hsmca_json(cluster.home, "jobs", "list")
    assert {row["last_instance"] for row in listed} == {successor}
    record(
        "scale-out",
        scenario="scheduler-failover",
        leader_locks=1,
        job_runs=len(all_runs),
        takeover_s=round(takeover_s, 2),
    )


@pytest.mark.slow
@pytest.mark.postgres
def test_two_instances_behave_as_one_server(cluster: Cluster) -> None:
    """Every scale-out guarantee on one cluster (one test, so that pytest-xdist never
    starts a second cluster on another worker); each ``check_*`` states its own."""
    check_order_created_on_one_instance_finalises_on_the_other(cluster)
    check_nonce_from_one_instance_is_accepted_once_by_the_other(cluster)
    check_order_rate_limit_is_counted_cluster_wide(cluster)
    check_revocation_through_one_instance_is_seen_by_the_other(cluster)
    check_burst_through_both_instances_gives_unique_serials_and_one_audit_chain(cluster)
    check_jobs_run_once_cluster_wide_and_a_standby_takes_over(cluster)  # last: restarts one
