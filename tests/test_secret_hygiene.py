"""Secret hygiene (issue #8): at DEBUG, no PIN, token, device secret, EAB HMAC key or
private key appears in logs, problem documents or audit events; the files holding
secrets are private (0600, directories 0700); ``serve`` refuses to start when one of them
is open to other users. (The whole suite also runs its servers at DEBUG and searches
every server log for the secrets it handed out: see ``RunningService.stop``.)"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pki.config import load_settings
from pki.secret_files import secret_paths
from tests.acme_helpers import AcmeClient, free_port
from tests.api_helpers import new_token
from tests.authz_helpers import eab_binding
from tests.conftest import RunningService, build_csr
from tests.figures import record
from tests.helpers import clean_env, hsmca_json, sqlite_query
from tests.secret_scan import home_secrets, leaks, remember


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_writes_every_secret_private(fresh_home: Path) -> None:
    settings = load_settings(fresh_home)
    paths = {p.relative_to(fresh_home).as_posix(): _mode(p) for p in secret_paths(settings)}
    assert paths == {
        "secrets": 0o700,
        "secrets/hsm.pin": 0o600,
        "secrets/hsm-so.pin": 0o600,
        "tls/server.key": 0o600,
        "hsmca.db": 0o600,
        **({"hsmca.db-wal": 0o600} if "hsmca.db-wal" in paths else {}),
        **({"hsmca.db-shm": 0o600} if "hsmca.db-shm" in paths else {}),
        "tokens": 0o700,
    }


@pytest.mark.parametrize(
    ("relative", "mode"),
    [
        ("secrets/hsm.pin", 0o644),
        ("tls/server.key", 0o604),
        ("hsmca.db", 0o644),
        ("secrets", 0o755),
        ("secrets/hsm-so.pin", 0o620),
    ],
)
def test_serve_refuses_a_secret_open_to_others(fresh_home: Path, relative: str, mode: int) -> None:
    target = fresh_home / relative
    os.chmod(target, mode)
    port = free_port()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "hsmca"), "--home", str(fresh_home), "serve",
         "--https-port", str(port), "--http-port", str(free_port())],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(target) in done.stderr and f"chmod {'700' if target.is_dir() else '600'}" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert "hsmca is serving" not in done.stdout  # nothing was started
    os.chmod(target, 0o700 if target.is_dir() else 0o600)


def _problems(responses: list[requests.Response]) -> str:
    return "\n".join(r.text for r in responses if r.status_code >= 400)


def test_debug_logs_problems_and_audit_never_show_a_secret(fresh_home: Path) -> None:
    home = fresh_home
    svc = RunningService(home)  # the suite's servers log at DEBUG (conftest)
    answers: list[requests.Response] = []
    try:
        issuer, _ = new_token(home, "issuer", allowed_names=("*.svc.test",))
        s = svc.session(issuer)
        csr = build_csr()[0].decode()
        answers.append(
            s.post(f"{svc.base}/api/v1/certificates", json={"csr": csr, "profile": "mtls"})
        )
        assert answers[-1].status_code == 201
        # credentials where they do not belong: a wrong token, one in a query string
        wrong = "hsmca_" + base64.urlsafe_b64encode(os.urandom(24)).decode()
        remember(wrong)
        answers.append(svc.session(wrong).get(f"{svc.base}/api/v1/certificates"))
        answers.append(svc.session().get(f"{svc.base}/api/v1/certificates?token={issuer}"))
        # a private key sent instead of a CSR
        key_pem = (
            ec.generate_private_key(ec.SECP256R1())
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            .decode()
        )
        key_body = "".join(key_pem.splitlines()[1:-1])
        remember(key_body)
        answers.append(
            s.post(f"{svc.base}/api/v1/certificates", json={"csr": key_pem, "profile": "mtls"})
        )
        assert answers[-1].status_code == 400
        # a device credential, used twice, and sent as the Basic user id
        device = hsmca_json(home, "device", "enroll-token", "--device-id", "leak-1", "--json")
        remember(device["secret"])
        est = svc.session()
        for _ in range(2):
            answers.append(
                est.post(
                    f"{svc.base}/.well-known/est/simpleenroll",
                    data=build_csr(cn=None, sans=(), serial_number="leak-1")[0],
                    auth=("leak-1", device["secret"]),
                )
            )
        answers.append(
            est.post(
                f"{svc.base}/.well-known/est/simpleenroll", data=b"x", auth=(device["secret"], "x")
            )
        )
        assert [a.status_code for a in answers[-3:]] == [200, 401, 401]
        # an EAB key: one good binding, one made with a wrong HMAC key
        eab = hsmca_json(home, "acme", "eab", "create", "--json")
        remember(eab["hmac_key"])
        client = AcmeClient(svc)
        bad = eab_binding(client.key, eab["kid"], "A" * 43, client.directory["newAccount"])
        answers.append(client.register(externalAccountBinding=bad))
        good = eab_binding(client.key, eab["kid"], eab["hmac_key"], client.directory["newAccount"])
        answers.append(client.register(externalAccountBinding=good))
        refused, accepted = answers[-2:]
        assert 400 <= refused.status_code < 500, refused.text
        assert refused.json()["type"].startswith("urn:ietf:params:acme:error:")
        assert accepted.status_code == 201, accepted.text
    finally:
        assert svc.stop() == 0
    log = svc.log.read_text(errors="replace")
    events = sqlite_query(home, "SELECT actor, action, subject, details FROM audit_events")
    audit = json.dumps(events)
    secrets = [svc.admin_token, issuer, *home_secrets(home)]
    assert '"level": "debug"' in log  # DEBUG really was on
    assert '"Authorization": "[redacted]"' in log  # and saw the credentials' headers
    assert leaks(log, secrets) == []
    assert leaks(_problems(answers), secrets) == []
    assert leaks(audit, secrets) == []
    record(
        "secret-hygiene",
        log_lines=log.count("\n"),
        debug_lines=log.count('"level": "debug"'),
        problems=sum(a.status_code >= 400 for a in answers),
        audit_events=len(events),
        secrets_checked=len(secrets) + 5,
    )


def test_a_config_holding_the_pin_is_a_secret_too(fresh_home: Path) -> None:
    """``hsmca.toml`` is an ordinary file until it holds ``hsm.pin``: then serve refuses
    it readable by others, like the PIN file."""
    config = fresh_home / "hsmca.toml"
    os.chmod(config, 0o644)
    settings = load_settings(fresh_home)
    assert config not in set(secret_paths(settings))
    pin = (fresh_home / "secrets" / "hsm.pin").read_text().strip()
    text = config.read_text().replace("[hsm]\n", f'[hsm]\npin = "{pin}"\n', 1)
    config.write_text(text)
    assert config in set(secret_paths(load_settings(fresh_home)))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "hsmca"), "--home", str(fresh_home), "serve",
         "--https-port", str(free_port()), "--http-port", str(free_port())],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and f"chmod 600 {config}" in done.stderr, done.stderr
    assert pin not in done.stdout + done.stderr
