"""Helpers for the scale-out tests: two real ``hsmca serve`` instances on one home (one
PostgreSQL database, one SoftHSM2 token directory) behind two round-robin proxies
(:mod:`tests.proxy`), one for HTTPS and one for plain HTTP.

The home's ``server.public_https_url`` and ``public_http_url`` name the proxies, so ACME
URLs, AIA and CDP point at them. :class:`Router` sends a requests session's calls for the
proxy's address straight to one chosen instance instead (with the proxy's ``Host``), so a
test can pick the instance of each step while every URL it sees names the proxy.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import requests
from cryptography import x509
from requests.adapters import HTTPAdapter
from sqlalchemy.engine import make_url

from pki.bootstrap import initialise
from pki.config import write_default_config
from pki.store.jobs_models import JobRun
from pki.store.jobs_store import _PG_LEADER_KEY
from tests.acme_helpers import AcmeClient, ChallTestSrv, Http01Responder, csr_der, poll
from tests.api_helpers import opened
from tests.conftest import RunningService, free_port
from tests.pg import create_database
from tests.proxy import RoundRobinProxy

#: the ACME order rate limit of the cluster's accounts (low, so a test can reach it)
ORDERS_PER_HOUR = 10


@dataclass(frozen=True)
class Endpoint:
    """What :class:`tests.acme_helpers.AcmeClient` needs of a service: its base URL and
    the root it trusts."""

    base: str
    root: Path


class Router(HTTPAdapter):
    """A transport adapter for ``public`` (``host:port``): each request goes to
    :attr:`target` (another ``host:port``) when set, keeping ``Host: public``; otherwise to
    ``public`` itself. :attr:`sent` counts requests per target."""

    def __init__(self, public: str) -> None:
        super().__init__()
        self.public = public
        self.target: str | None = None
        self.sent: dict[str, int] = {}

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        parts = urlsplit(request.url or "")
        target = self.target or parts.netloc
        if self.target and parts.netloc == self.public:
            request.headers["Host"] = self.public
            request.url = urlunsplit(parts._replace(netloc=self.target))
        self.sent[target] = self.sent.get(target, 0) + 1
        return super().send(request, **kwargs)


def route(session: requests.Session, public: str) -> Router:
    """Mount a :class:`Router` for ``https://public`` on ``session``; return it."""
    router = Router(public)
    session.mount(f"https://{public}", router)
    return router


def new_connections(session: requests.Session) -> requests.Session:
    """Ask the server to close after each response, so every request opens a connection
    (and a round-robin proxy sends consecutive requests to different instances)."""
    session.headers["Connection"] = "close"
    return session


class Instance(RunningService):
    """A :class:`RunningService` (one worker) that does not wait for readiness when it
    starts: call :meth:`wait_ready` (so several can start at once)."""

    def __init__(self, home: Path, https_port: int, http_port: int) -> None:
        self._starting = True
        try:
            super().__init__(home, 1, https_port, http_port)
        except BaseException:
            if hasattr(self, "process"):  # started, then failed: do not leave it running
                self.stop()
            raise
        self._starting = False

    def wait_ready(self, deadline_s: float = 60.0) -> None:
        if not self._starting:
            super().wait_ready(deadline_s)


class Cluster:
    """Two ``hsmca serve`` instances (``a`` and ``b``) on one home behind two proxies."""

    def __init__(
        self,
        home: Path,
        ports: list[tuple[int, int]],
        proxies: tuple[RoundRobinProxy, RoundRobinProxy],
        http01_port: int,
        db_url: str,
    ) -> None:
        https, http = proxies
        self.home = home
        self.https = https
        self.http = http
        self.http01_port = http01_port
        self.db_url = db_url
        self._ports = ports
        # both start at once, as a deployment would: migrations, reconciliation and the
        # CA files of two instances run against one home concurrently
        self.instances: list[RunningService] = []
        try:
            for pair in ports:
                self.instances.append(Instance(home, *pair))
            for instance in self.instances:
                instance.wait_ready()
        except BaseException:
            for started in self.instances:
                started.stop()
            raise
        self.root = home / "ca" / "root.pem"
        self.public_https = f"https://{https.address}"
        self.public_http = f"http://{http.address}"
        self.admin_token = self.a.admin_token
        with opened(home) as core:
            self.issuer_id = core.issuing_issuer().id

    @property
    def a(self) -> RunningService:
        return self.instances[0]

    @property
    def b(self) -> RunningService:
        return self.instances[1]

    def netloc(self, service: RunningService) -> str:
        return f"127.0.0.1:{service.https_port}"

    def instance_name(self, service: RunningService) -> str:
        """The scheduler's name for ``service`` (``host:pid`` of its supervisor)."""
        return f"{socket.gethostname()}:{service.process.pid}"

    def restart(self, index: int) -> RunningService:
        """Start instance ``index`` again on its ports (after it was stopped)."""
        https_port, http_port = self._ports[index]
        self.instances[index] = restarted = Instance(self.home, https_port, http_port)
        restarted.wait_ready()
        return restarted

    def session(self) -> requests.Session:
        """An admin session trusting our root, opening a connection per request."""
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.root)
        s.headers["Authorization"] = f"Bearer {self.admin_token}"
        return new_connections(s)

    def acme_client(self) -> tuple[AcmeClient, Router]:
        """An ACME client on the public (proxy) directory, opening a connection per
        request, with a :class:`Router` to pin its requests to one instance."""
        client = AcmeClient(Endpoint(self.public_https, self.root))  # type: ignore[arg-type]
        new_connections(client.http)
        return client, route(client.http, self.https.address)

    def stop(self) -> None:
        """Stop both instances (at once) and the proxies; both must exit cleanly."""
        with ThreadPoolExecutor(len(self.instances)) as pool:
            codes = list(pool.map(RunningService.stop, self.instances))
        self.https.close()
        self.http.close()
        assert codes == [0, 0], [svc.log.read_text()[-2000:] for svc in self.instances]


def start_cluster(directory: Path, pg_url: str, dns: ChallTestSrv) -> Cluster:
    """A PostgreSQL home whose public URLs name two proxies, and two instances behind them."""
    ports = [(free_port(), free_port()) for _ in range(2)]
    https = RoundRobinProxy([("127.0.0.1", p[0]) for p in ports])
    http = RoundRobinProxy([("127.0.0.1", p[1]) for p in ports])
    db_url = create_database(pg_url, f"scale_{directory.name.lower().replace('-', '_')[-40:]}")
    home = directory / "home"
    home.mkdir()
    http01_port = free_port()
    write_default_config(
        home,
        {
            "database": {"url": db_url},
            "server": {
                "public_https_url": f"https://{https.address}",
                "public_http_url": f"http://{http.address}",
            },
            "acme": {
                "http01_port": http01_port,
                "dns_resolver": dns.dns,
                "orders_per_hour": ORDERS_PER_HOUR,
            },
        },
    )
    initialise(home, "Scale-out Org")
    try:
        return Cluster(home, ports, (https, http), http01_port, db_url)
    except BaseException:
        https.close()
        http.close()
        raise


# -- ACME ------------------------------------------------------------------------------------


def acme_flow(
    client: AcmeClient, name: str, http01_port: int, at: Callable[[str], None]
) -> tuple[x509.Certificate, str]:
    """Account, order, http-01, finalize, download for ``name``; ``at(step)`` is called
    before each step ("account", "order", "authorize", "finalize", "download") to choose
    where it goes. Returns the leaf and the order URL."""
    at("account")
    assert client.register().status_code == 201
    at("order")
    order = client.new_order(name)
    assert order.status_code == 201, order.text
    at("authorize")
    authz_url = order.json()["authorizations"][0]
    authz = client.post(authz_url).json()
    chall = next(c for c in authz["challenges"] if c["type"] == "http-01")
    responder = Http01Responder(http01_port)
    try:
        responder.tokens[chall["token"]] = client.key_authorization(chall["token"])
        answer = client.post(chall["url"], {})
        assert answer.status_code == 200, answer.text
        poll(lambda: client.post(authz_url).json(), lambda a: a["status"] == "valid")
    finally:
        responder.stop()
    at("finalize")
    csr = base64.urlsafe_b64encode(csr_der([name])).rstrip(b"=").decode()
    final = client.post(order.json()["finalize"], {"csr": csr})
    assert final.status_code == 200, final.text
    state = poll(
        lambda: client.post(order.headers["Location"]).json(), lambda o: o["status"] == "valid"
    )
    at("download")
    pem = client.post(state["certificate"])
    assert pem.status_code == 200, pem.text
    assert pem.headers["Content-Type"].startswith("application/pem-certificate-chain")
    return x509.load_pem_x509_certificates(pem.content)[0], order.headers["Location"]


# -- the scheduler ---------------------------------------------------------------------------


def job_runs(home: Path) -> list[JobRun]:
    """Every recorded job run, oldest first."""
    with opened(home) as core:
        return sorted(core.store.jobs.recent_runs(limit=1000), key=lambda r: r.id)


def leader_locks(db_url: str) -> int:
    """How many sessions hold the scheduler's advisory lock in ``db_url``'s database."""
    url = make_url(db_url)
    high, low = _PG_LEADER_KEY >> 32, _PG_LEADER_KEY & 0xFFFFFFFF
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
    ) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 1"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (high, low),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _by_job(runs: list[JobRun]) -> dict[str, list[JobRun]]:
    by_job: dict[str, list[JobRun]] = {}
    for run in sorted(runs, key=lambda r: r.started_at):
        by_job.setdefault(run.job, []).append(run)
    return by_job


def overlapping_runs(runs: list[JobRun]) -> list[tuple[int, int]]:
    """Pairs of run ids of the same job whose [start, end] intervals overlap."""
    return [
        (earlier.id, later.id)
        for same in _by_job(runs).values()
        for earlier, later in pairwise(same)
        if earlier.finished_at is None or earlier.finished_at > later.started_at
    ]


def early_runs(runs: list[JobRun]) -> list[tuple[int, int]]:
    """Pairs of run ids of the same job by the same instance that started less than its
    interval apart (APScheduler's ``coalesce`` allows one run per due time; 10% slack)."""
    from pki.scheduler import JOBS

    return [
        (earlier.id, later.id)
        for job, same in _by_job(runs).items()
        for earlier, later in pairwise(same)
        if earlier.instance == later.instance
        and later.started_at - earlier.started_at < JOBS[job].interval * 0.9
    ]
