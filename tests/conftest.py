"""Shared fixtures: real SoftHSM2 tokens in temporary homes, real databases.

* ``ca_home``   — one initialised home per xdist worker (SQLite), shared by tests that
  only add certificates; never tamper with it.
* ``fresh_home`` — a new initialised home for a test that changes global state.
* ``pki``       — a :class:`pki.service.Pki` opened on ``ca_home``.
* ``pg_url``    — a throwaway PostgreSQL server per worker (skipped loudly if impossible).
* ``make_csr``  — builds CSRs with software keys (requesters' keys are not CA keys).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pki.bootstrap import initialise
from pki.config import write_default_config
from pki.service import Pki

if shutil.which("softhsm2-util") is None:  # pragma: no cover - CI installs it
    pytest.exit("softhsm2-util not found: run `make test` (it installs SoftHSM2)", 2)

# The whole suite runs its servers and in-process apps with DEBUG logging, and every
# ``hsmca serve`` log is searched for secrets when the service stops (issue #8).
os.environ.setdefault("HSMCA_SERVER__LOG_LEVEL", "debug")


@pytest.fixture(scope="session")
def ca_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("ca-home")
    initialise(home, "Test Org", ("svc.test",))
    return home


@pytest.fixture
def fresh_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    initialise(home, "Fresh Org")
    return home


@pytest.fixture
def pki(ca_home: Path) -> Iterator[Pki]:
    core = Pki.open(ca_home)
    yield core
    core.close()


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.pg import PostgresUnavailable, running_postgres

    try:
        with running_postgres(tmp_path_factory.mktemp("pg")) as url:
            yield url
    except PostgresUnavailable as exc:
        msg = f"!!! PostgreSQL UNAVAILABLE — PostgreSQL tests SKIPPED: {exc}"
        print(msg, file=sys.stderr)
        pytest.skip(msg)


@pytest.fixture
def pg_home(tmp_path: Path, pg_url: str) -> Path:
    """An initialised home whose database is a fresh PostgreSQL database."""
    from tests.pg import create_database

    url = create_database(pg_url, f"h{tmp_path.name.lower().replace('-', '_')[-40:]}")
    home = tmp_path / "pg-home"
    home.mkdir()
    write_default_config(home, {"database": {"url": url}})
    initialise(home, "PG Org")
    return home


CsrFactory = Callable[..., bytes]


def build_csr(
    cn: str | None = "app.svc.test",
    sans: tuple[str, ...] = ("app.svc.test",),
    key: object | None = None,
    ca: bool = False,
    serial_number: str | None = None,
) -> tuple[bytes, object]:
    """A PEM CSR and its (software) private key."""
    import ipaddress

    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = []
    if cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if serial_number:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    names: list[x509.GeneralName] = []
    for s in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            names.append(x509.UniformResourceIdentifier(s) if ":" in s else x509.DNSName(s))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    csr = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM), key


@pytest.fixture
def make_csr() -> CsrFactory:
    """``make_csr(cn=..., sans=(...), key=..., ca=False)`` -> PEM bytes."""

    def make(**kwargs: object) -> bytes:
        return build_csr(**kwargs)[0]  # type: ignore[arg-type]

    return make


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningService:
    """A real ``hsmca serve`` on loopback ports, with an admin token (``workers=None``:
    the configured number)."""

    def __init__(
        self,
        home: Path,
        workers: int | None = 1,
        https_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        import subprocess

        self.home = home
        self.root = home / "ca" / "root.pem"
        self.https_port = https_port or free_port()
        self.http_port = http_port or free_port()
        self.base = f"https://127.0.0.1:{self.https_port}"
        self.http_base = f"http://127.0.0.1:{self.http_port}"
        self.log = home / f"serve-{self.https_port}.log"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "hsmca"),
                "--home",
                str(home),
                "serve",
                "--https-port",
                str(self.https_port),
                "--http-port",
                str(self.http_port),
                *(() if workers is None else ("--workers", str(workers))),
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        core = Pki.open(home)
        try:
            from pki.actors import operator
            from tests.secret_scan import remember

            self.admin_token = core.create_token("admin", None, operator("tests")).secret
            remember(self.admin_token)
        finally:
            core.close()
        self.wait_ready()

    def session(self, token: str | None = None) -> object:
        """A requests.Session trusting our root, ignoring the machine's CA bundle vars."""
        import requests

        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.root)
        if token:
            s.headers["Authorization"] = f"Bearer {token}"
        return s

    def wait_ready(self, deadline_s: float = 30.0) -> None:
        import time

        import requests

        s = self.session()
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"hsmca serve exited: {self.log.read_text()[-2000:]}")
            try:
                if (
                    s.get(f"{self.base}/healthz", timeout=2).status_code == 200
                    and s.get(f"{self.http_base}/healthz", timeout=2).status_code == 200
                ):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)  # polling interval, bounded by the deadline
        raise RuntimeError(f"hsmca serve not ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> int:
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log_file.close()
        self.assert_no_secret_in_log()
        return code

    def assert_no_secret_in_log(self) -> None:
        """No PIN, token, credential, EAB key or private key in this service's log."""
        from tests.secret_scan import home_secrets, leaks

        text = self.log.read_text(errors="replace")
        found = leaks(text, [self.admin_token, *home_secrets(self.home)])
        assert found == [], f"secrets in {self.log}: {found}"


@pytest.fixture(scope="session")
def service(ca_home: Path) -> Iterator[RunningService]:
    """The real service on ``ca_home`` (one per xdist worker), stopped cleanly at the end."""
    running = RunningService(ca_home)
    yield running
    assert running.stop() == 0, running.log.read_text()[-2000:]


@pytest.fixture(scope="session")
def challtestsrv() -> Iterator[object]:
    """pebble-challtestsrv answering DNS on a free port (one per xdist worker)."""
    from tests.acme_helpers import running_challtestsrv

    with running_challtestsrv() as srv:
        yield srv


@pytest.fixture(scope="session")
def acme_service(
    tmp_path_factory: pytest.TempPathFactory, challtestsrv: object
) -> Iterator[RunningService]:
    """A real ``hsmca serve`` with its ACME VA pointed at ``challtestsrv`` for DNS."""
    from tests.acme_helpers import AcmeService

    home = tmp_path_factory.mktemp("acme-home")
    initialise(home, "ACME Test Org")
    running = AcmeService(home, challtestsrv)  # type: ignore[arg-type]
    yield running
    assert running.stop() == 0, running.log.read_text()[-2000:]
