"""Real ACME clients (certbot, lego) against a live ``hsmca serve``.

Every test uses names of its own (``<random>.acme.test``); the service's VA resolves them
to 127.0.0.1 through pebble-challtestsrv and connects to the ports the clients listen on.
Each client runs as a subprocess with an explicit environment (the machine exports CA
bundle variables that must not leak into it) and a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from acme.client import ClientNetwork, ClientV2
from acme.errors import ARIError
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.serials import serial_hex
from tests.acme_helpers import ERR, AcmeClient, AcmeService, ChallTestSrv
from tests.conftest import build_csr, initialise

TIMEOUT_S = 120
BIN = Path(sys.executable).parent
CERTBOT = str(BIN / "certbot")
HSMCA = str(BIN / "hsmca")
LEGO = "/usr/bin/lego"


# -- helpers -----------------------------------------------------------------------------------


def unique_name() -> str:
    """A DNS name no other test uses."""
    return f"{uuid4().hex[:8]}.acme.test"


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: PATH, a private HOME and ``extra`` (no inherited CA bundles,
    proxies or ``HSMCA_*`` settings)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    return env | extra


def run(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command with the timeout, capturing its output."""
    return subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def output(proc: subprocess.CompletedProcess[str], log: Path | None = None) -> str:
    """Everything a failed run said (and the tail of its log file, if any)."""
    text = f"$ {' '.join(proc.args)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}"
    text += f"\n--- stderr\n{proc.stderr}"
    if log is not None and log.exists():
        text += f"\n--- {log}\n{log.read_text(errors='replace')[-6000:]}"
    return text


def assert_ok(proc: subprocess.CompletedProcess[str], log: Path | None = None) -> None:
    assert proc.returncode == 0, output(proc, log)


class Certbot:
    """certbot with its own config/work/logs directories, talking to one service."""

    def __init__(self, service: AcmeService, base: Path) -> None:
        self.service = service
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.config_dir = base / "c"
        self.log = base / "l" / "letsencrypt.log"

    def __call__(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [CERTBOT, command, "--non-interactive", "--server", self.service.directory_url]
        argv += ["--config-dir", str(self.config_dir), "--work-dir", str(self.base / "w")]
        argv += ["--logs-dir", str(self.base / "l"), *args]
        env = child_env(self.base, REQUESTS_CA_BUNDLE=str(self.service.root))
        return run(argv, env, cwd=self.base)

    def standalone(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        """A command that answers http-01 with certbot's standalone server."""
        port = str(self.service.http01_port)
        return self(
            command, "--standalone", "--http-01-port", port, "--http-01-address", "127.0.0.1",
            *args,
        )  # fmt: skip

    def certonly(
        self, *names: str, extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``certonly --standalone`` for ``names``, registering an account if needed."""
        domains = [arg for name in names for arg in ("-d", name)]
        return self.standalone(
            "certonly", "--agree-tos", "--register-unsafely-without-email", *extra, *domains
        )

    def live(self, name: str) -> Path:
        return self.config_dir / "live" / name


class Lego:
    """lego with its own ``--path``, talking to one service."""

    def __init__(self, service: AcmeService, path: Path) -> None:
        self.service = service
        self.path = path

    def __call__(
        self, domain: str, solver: list[str], command: list[str], **env: str
    ) -> subprocess.CompletedProcess[str]:
        argv = [LEGO, "--path", str(self.path), "--accept-tos", "--email", "t@example.com"]
        argv += ["--server", self.service.directory_url, "--key-type", "ec256"]
        argv += ["--domains", domain, *solver, *command]
        home = self.path.parent
        return run(argv, child_env(home, LEGO_CA_CERTIFICATES=str(self.service.root), **env))

    def files(self, domain: str) -> tuple[Path, Path]:
        """(certificate bundle, issuer chain) as lego stores them (``*`` becomes ``_``)."""
        stem = self.path / "certificates" / domain.replace("*", "_")
        return stem.with_name(stem.name + ".crt"), stem.with_name(stem.name + ".issuer.crt")


def leaf(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def dns_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def openssl_verify(root: Path, cert: Path, untrusted: Path) -> None:
    """``openssl verify`` of the first certificate of ``cert`` up to ``root`` only, as a
    TLS server certificate."""
    proc = run(
        [
            "openssl", "verify", "-no-CApath", "-no-CAstore", "-CAfile", str(root),
            "-untrusted", str(untrusted), "-purpose", "sslserver", str(cert),
        ],
        child_env(cert.parent),
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": OK"), output(proc)


def api_record(service: AcmeService, cert: x509.Certificate) -> dict[str, Any]:
    """The REST API's record of a certificate (read with the admin token)."""
    session: Any = service.session(service.admin_token)
    url = f"{service.base}/api/v1/certificates/{serial_hex(cert.serial_number)}"
    resp = session.get(url, timeout=10)
    assert resp.status_code == 200, (url, resp.status_code, resp.text)
    return resp.json()


def ocsp_text(service: AcmeService, cert: Path, issuer: Path) -> str:
    """``openssl ocsp`` against the service's responder, the response verified on the root."""
    proc = run(
        [
            "openssl", "ocsp", "-issuer", str(issuer), "-cert", str(cert), "-url",
            f"{service.http_base}/ocsp", "-CAfile", str(service.root), "-no-CApath",
            "-no-CAstore",
        ],
        child_env(cert.parent),
    )  # fmt: skip
    assert proc.returncode == 0 and "Response verify OK" in proc.stderr, output(proc)
    return proc.stdout


def assert_certbot_lineage(
    service: AcmeService, certbot: Certbot, names: list[str]
) -> x509.Certificate:
    """certbot's live files for ``names[0]``: the leaf names exactly ``names`` and verifies."""
    live = certbot.live(names[0])
    cert = leaf(live / "fullchain.pem")
    assert sorted(dns_sans(cert)) == sorted(names)
    assert leaf(live / "cert.pem") == cert
    openssl_verify(service.root, live / "cert.pem", live / "chain.pem")
    return cert


# -- certbot -----------------------------------------------------------------------------------


def test_certbot_certonly_one_name_then_two_names(
    acme_service: AcmeService, tmp_path: Path
) -> None:
    """certbot standalone obtains a one-name certificate, then (same account) a two-SAN one."""
    certbot = Certbot(acme_service, tmp_path)
    single = unique_name()
    assert_ok(certbot.certonly(single), certbot.log)
    assert_certbot_lineage(acme_service, certbot, [single])

    pair = [unique_name(), unique_name()]
    assert_ok(certbot.certonly(*pair), certbot.log)
    assert_certbot_lineage(acme_service, certbot, pair)
    accounts = list((certbot.config_dir / "accounts").rglob("regr.json"))
    assert len(accounts) == 1, accounts


def test_certbot_renew_gets_a_new_certificate(acme_service: AcmeService, tmp_path: Path) -> None:
    """``certbot renew --force-renewal`` replaces the certificate with a new serial."""
    certbot = Certbot(acme_service, tmp_path)
    name = unique_name()
    assert_ok(certbot.certonly(name), certbot.log)
    first = assert_certbot_lineage(acme_service, certbot, [name])

    renewed = certbot.standalone("renew", "--force-renewal", "--no-random-sleep-on-renew")
    assert_ok(renewed, certbot.log)
    second = assert_certbot_lineage(acme_service, certbot, [name])
    assert second.serial_number != first.serial_number
    assert (certbot.config_dir / "archive" / name / "cert2.pem").exists()


def test_certbot_revoke(acme_service: AcmeService, tmp_path: Path) -> None:
    """``certbot revoke`` (account key) revokes: the REST API and OCSP both say so."""
    certbot = Certbot(acme_service, tmp_path)
    name = unique_name()
    assert_ok(certbot.certonly(name), certbot.log)
    cert = assert_certbot_lineage(acme_service, certbot, [name])
    live = certbot.live(name)
    text = ocsp_text(acme_service, live / "cert.pem", live / "chain.pem")
    assert f"{live / 'cert.pem'}: good" in text, text

    revoked = certbot(
        "revoke", "--cert-path", str(live / "cert.pem"), "--reason", "keycompromise",
        "--no-delete-after-revoke",
    )  # fmt: skip
    assert_ok(revoked, certbot.log)
    record = api_record(acme_service, cert)
    assert record["status"] == "revoked", record
    assert record["revocation_reason"] == "keyCompromise", record
    text = ocsp_text(acme_service, live / "cert.pem", live / "chain.pem")
    assert f"{live / 'cert.pem'}: revoked" in text, text
    assert "keyCompromise" in text, text


def test_certbot_ari_check_works_for_every_serial(acme_service: AcmeService) -> None:
    """The ARI request ``certbot renew`` makes (acme's ``ClientV2.renewal_time``) gets a
    suggested window for any certificate, also one whose serial has an odd number of hex
    digits (about one in eight). Serials cannot be chosen, so certificates are issued
    through the REST API until there is one of each kind."""
    session: Any = acme_service.session(acme_service.admin_token)
    found: dict[bool, x509.Certificate] = {}
    for _ in range(200):  # P(no odd-length serial in 200) = (7/8) ** 200, about 2e-12
        name = unique_name()
        csr = build_csr(cn=name, sans=(name,))[0].decode()
        resp = session.post(
            f"{acme_service.base}/api/v1/certificates", json={"csr": csr}, timeout=10
        )
        assert resp.status_code == 201, resp.text
        cert = x509.load_pem_x509_certificate(resp.json()["certificate"].encode())
        found.setdefault(len(format(cert.serial_number, "x")) % 2 == 1, cert)
        if len(found) == 2:
            break
    assert len(found) == 2, found

    net = ClientNetwork(verify_ssl=str(acme_service.root))  # type: ignore[arg-type]
    net.session.trust_env = False
    client = ClientV2(ClientV2.get_directory(acme_service.directory_url, net), net)
    for odd in (False, True):
        cert = found[odd]
        serial = format(cert.serial_number, "x")
        try:
            when, _ = client.renewal_time(cert.public_bytes(Encoding.PEM))
        except ARIError as exc:
            pytest.fail(f"ARI for serial {serial} ({len(serial)} hex digits): {exc.__cause__}")
        assert when is not None, serial
        assert cert.not_valid_before_utc < when < cert.not_valid_after_utc, (serial, when)


# -- External Account Binding ------------------------------------------------------------------


@pytest.fixture(scope="module")
def eab_service(
    tmp_path_factory: pytest.TempPathFactory, challtestsrv: ChallTestSrv
) -> Iterator[AcmeService]:
    """A second service that requires External Account Binding."""
    home = tmp_path_factory.mktemp("eab-home")
    initialise(home, "EAB Org")
    running = AcmeService(home, challtestsrv, require_eab=True)
    yield running
    assert running.stop() == 0, running.log.read_text()[-2000:]


def create_eab_key(service: AcmeService) -> dict[str, str]:
    """``hsmca acme eab create --json``: {"kid", "hmac_key", "name"}."""
    proc = subprocess.run(
        [HSMCA, "--home", str(service.home), "acme", "eab", "create", "--json"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, output(proc)
    created = json.loads(proc.stdout)
    assert set(created) == {"kid", "hmac_key", "name", "allowed_names", "profiles"}, created
    assert created["allowed_names"] == [] and created["profiles"] == []  # no limits
    return created


def eab_args(key: dict[str, str]) -> tuple[str, ...]:
    return ("--eab-kid", key["kid"], "--eab-hmac-key", key["hmac_key"])


def test_eab_required(eab_service: AcmeService, tmp_path: Path) -> None:
    """Without EAB, certbot is refused (it reads ``externalAccountRequired``) and so is a
    client that sends newAccount anyway."""
    certbot = Certbot(eab_service, tmp_path)
    refused = certbot.certonly(unique_name())
    said = output(refused, certbot.log)
    assert refused.returncode != 0, said
    assert "externalAccountRequired" in said, said
    assert "requires external account binding" in said, said
    assert not list((certbot.config_dir / "accounts").rglob("regr.json"))
    assert not (certbot.config_dir / "live").exists()

    raw = AcmeClient(eab_service)
    assert raw.directory["meta"]["externalAccountRequired"] is True
    resp = raw.register()
    assert resp.status_code == 400, resp.text
    assert resp.json()["type"] == ERR + "externalAccountRequired", resp.text


def test_certbot_with_eab_key_once(eab_service: AcmeService, tmp_path: Path) -> None:
    """certbot with an EAB key obtains a certificate; the same key is refused for a second
    account key (a fresh config directory)."""
    key = create_eab_key(eab_service)
    first = Certbot(eab_service, tmp_path / "first")
    name = unique_name()
    assert_ok(first.certonly(name, extra=eab_args(key)), first.log)
    assert_certbot_lineage(eab_service, first, [name])
    assert len(list((first.config_dir / "accounts").rglob("regr.json"))) == 1

    second = Certbot(eab_service, tmp_path / "second")
    refused = second.certonly(unique_name(), extra=eab_args(key))
    said = output(refused, second.log)
    assert refused.returncode != 0, said
    assert "already used" in said, said
    assert not list((second.config_dir / "accounts").rglob("regr.json"))
    assert not (second.config_dir / "live").exists()


# -- lego --------------------------------------------------------------------------------------


def assert_lego_certificate(service: AcmeService, lego: Lego, domain: str) -> x509.Certificate:
    """lego's certificate for ``domain`` names exactly it and verifies up to the root."""
    bundle, issuer = lego.files(domain)
    cert = leaf(bundle)
    assert dns_sans(cert) == [domain]
    openssl_verify(service.root, bundle, issuer)
    return cert


def test_lego_http01_run_renew_revoke(acme_service: AcmeService, tmp_path: Path) -> None:
    """lego http-01: run, renew (new serial), revoke (the REST API says revoked)."""
    lego = Lego(acme_service, tmp_path / "lego")
    name = unique_name()
    http = ["--http", "--http.port", f"127.0.0.1:{acme_service.http01_port}"]
    assert_ok(lego(name, http, ["run"]))
    first = assert_lego_certificate(acme_service, lego, name)

    assert_ok(lego(name, http, ["renew", "--days", "36500", "--no-random-sleep"]))
    second = assert_lego_certificate(acme_service, lego, name)
    assert second.serial_number != first.serial_number

    assert_ok(lego(name, http, ["revoke"]))
    assert api_record(acme_service, second)["status"] == "revoked"
    assert api_record(acme_service, first)["status"] == "good"


def test_lego_tls_alpn01(acme_service: AcmeService, tmp_path: Path) -> None:
    """lego tls-alpn-01 obtains a certificate."""
    lego = Lego(acme_service, tmp_path / "lego")
    name = unique_name()
    tls = ["--tls", "--tls.port", f"127.0.0.1:{acme_service.tlsalpn01_port}"]
    assert_ok(lego(name, tls, ["run"]))
    assert_lego_certificate(acme_service, lego, name)


EXEC_SCRIPT = """#!/bin/sh
# lego exec provider: $1 = present|cleanup, $2 = FQDN, $3 = TXT value
set -eu
case "$1" in
  present) curl -sf --noproxy '*' -X POST -d "{{\\"host\\": \\"$2\\", \\"value\\": \\"$3\\"}}" \\
             http://127.0.0.1:{port}/set-txt ;;
  cleanup) curl -sf --noproxy '*' -X POST -d "{{\\"host\\": \\"$2\\"}}" \\
             http://127.0.0.1:{port}/clear-txt ;;
  *) exit 0 ;;
esac
"""


def test_lego_dns01_wildcard(
    acme_service: AcmeService, challtestsrv: ChallTestSrv, tmp_path: Path
) -> None:
    """lego dns-01 through an exec provider that sets TXT records in challtestsrv: a
    wildcard certificate whose only SAN is the wildcard; renewed too."""
    script = tmp_path / "dns-exec.sh"
    script.write_text(EXEC_SCRIPT.format(port=challtestsrv.management_port))
    script.chmod(0o755)
    lego = Lego(acme_service, tmp_path / "lego")
    wildcard = f"*.{unique_name()}"
    dns = ["--dns", "exec", "--dns.resolvers", challtestsrv.dns, "--dns.disable-cp"]
    # lego sleeps one polling interval (default 2 s) before its first look at the record
    env = {"EXEC_PATH": str(script), "EXEC_POLLING_INTERVAL": "1"}
    assert_ok(lego(wildcard, dns, ["run"], **env))
    first = assert_lego_certificate(acme_service, lego, wildcard)

    renew = ["renew", "--days", "36500", "--no-random-sleep"]
    assert_ok(lego(wildcard, dns, renew, **env))
    second = assert_lego_certificate(acme_service, lego, wildcard)
    assert second.serial_number != first.serial_number
