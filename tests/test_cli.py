"""The `hsmca` console script, run as a real subprocess against real homes."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki.actors import operator
from pki.bootstrap import initialise
from pki.durations import parse_duration
from pki.serials import serial_hex
from pki.service import IssueRequest, Pki
from tests.conftest import build_csr
from tests.helpers import (
    all_sqlite_values,
    clean_env,
    hsmca,
    hsmca_bytes,
    hsmca_json,
    split_pem,
    sqlite_query,
)


def mode(path: Path) -> int:
    """Permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(home: Path) -> dict[str, str]:
    """SHA-256 of every file of the home, SQLite WAL side files excluded."""
    return {
        str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(home.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


def db_state(home: Path) -> dict[str, object]:
    """What the database holds, read behind the store's back."""
    return {
        "certificates": sqlite_query(home, "SELECT serial, status FROM certificates ORDER BY id"),
        "issuers": sqlite_query(home, "SELECT id, der FROM issuers ORDER BY id"),
        "audit": sqlite_query(home, "SELECT id, hash FROM audit_events ORDER BY id"),
        "tokens": sqlite_query(home, "SELECT name FROM api_tokens ORDER BY id"),
    }


def server_serial(home: Path) -> str:
    """The serial of the server's TLS certificate that `init` issued."""
    cert = x509.load_pem_x509_certificates((home / "tls" / "server.pem").read_bytes())[0]
    return serial_hex(cert.serial_number)


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the openssl command line tool."""
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=60, check=False
    )


def assert_usage_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, click's usage banner, the helpful message, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Usage: hsmca" in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# -- init ------------------------------------------------------------------------------------


def test_init_is_idempotent_and_keeps_secrets_private(tmp_path: Path) -> None:
    """A second `init` (home from HSMCA_HOME) says nothing changed and changes no byte."""
    home = tmp_path / "home"
    first = hsmca(home, "init", "--org", "CLI Org", "--hostname", "ca.svc.test")
    assert first.returncode == 0, first.stderr
    assert f"Initialised {home}" in first.stdout
    assert "root CA certificate CN=CLI Org Root CA" in first.stdout
    files, state = snapshot(home), db_state(home)
    assert {"ca/root.pem", "ca/chain.pem", "tls/server.pem", "secrets/hsm.pin"} <= set(files)
    assert any(name.startswith("tokens/") for name in files)
    assert len(state["issuers"]) == 2  # type: ignore[arg-type]

    again = hsmca(None, "init", env=clean_env(HSMCA_HOME=str(home)), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"{home} is already initialised; nothing changed." in again.stdout
    assert snapshot(home) == files
    assert db_state(home) == state

    assert mode(home / "secrets") == 0o700
    assert mode(home / "secrets" / "hsm.pin") == 0o600
    assert mode(home / "secrets" / "hsm-so.pin") == 0o600
    assert mode(home / "tls" / "server.key") == 0o600
    assert mode(home / "tokens") & 0o077 == 0


# -- CA certificates -------------------------------------------------------------------------


def test_ca_export_root_intermediate_and_chain(ca_home: Path) -> None:
    """--root and --intermediate print one certificate, --chain issuing CA then root."""
    root_proc = hsmca(ca_home, "ca", "export", "--root")
    assert root_proc.returncode == 0, root_proc.stderr
    assert root_proc.stdout == (ca_home / "ca" / "root.pem").read_text()
    root = x509.load_pem_x509_certificate(root_proc.stdout.encode())
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)

    der = hsmca_bytes(ca_home, "ca", "export", "--intermediate", "--der")
    assert der.returncode == 0, der.stderr
    intermediate = x509.load_der_x509_certificate(der.stdout)
    intermediate.verify_directly_issued_by(root)
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    chain = hsmca(ca_home, "ca", "export", "--chain")
    assert chain.returncode == 0, chain.stderr
    certs = [x509.load_pem_x509_certificate(p.encode()) for p in split_pem(chain.stdout)]
    assert certs == [intermediate, root]

    both_der = hsmca(ca_home, "ca", "export", "--chain", "--der")
    assert_usage_error(both_der, "--der prints one certificate")


# -- tokens ----------------------------------------------------------------------------------


def test_token_create_prints_the_secret_once_and_stores_only_its_hash(ca_home: Path) -> None:
    """--json prints token/name/role/expires_at; the DB holds sha256(token), never the token."""
    created = hsmca_json(ca_home, "token", "create", "--role", "admin", "--ttl", "1d")
    assert set(created) == {"token", "name", "role", "expires_at"}
    assert created["role"] == "admin" and created["name"].startswith("admin-")
    expires = dt.datetime.fromisoformat(created["expires_at"].replace("Z", "+00:00"))
    assert abs(expires - (dt.datetime.now(dt.UTC) + dt.timedelta(days=1))) < dt.timedelta(minutes=5)
    secret = created["token"]
    assert len(secret) > 40
    stored = sqlite_query(
        ca_home, "SELECT token_sha256 FROM api_tokens WHERE name = ?", (created["name"],)
    )
    assert stored == [(hashlib.sha256(secret.encode()).hexdigest(),)]
    leaks = [
        (table, column)
        for table, column, value in all_sqlite_values(ca_home)
        if (isinstance(value, str) and secret in value)
        or (isinstance(value, bytes) and secret.encode() in value)
    ]
    assert leaks == []
    core = Pki.open(ca_home)
    try:
        actor = core.authenticate_token(secret)
        assert (actor.name, actor.role) == (f"token:{created['name']}", "admin")
    finally:
        core.close()


# -- issuance, revocation, listing, CRL ------------------------------------------------------


def test_issue_show_revoke_list_and_crl(ca_home: Path, tmp_path: Path) -> None:
    """--cn/--key-out issuance verifies with openssl; revocation shows up in list and CRL."""
    key_file, cert_file = tmp_path / "k.pem", tmp_path / "c.pem"
    proc = hsmca(
        ca_home, "issue", "--cn", "a.svc.test", "--san", "b.svc.test", "--key-out",
        str(key_file), "--profile", "mtls-server", "--cert-out", str(cert_file),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"issued ([0-9a-f]+), written to", proc.stdout)
    assert found, proc.stdout
    serial = found.group(1)

    assert mode(key_file) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    leaf_pem, *chain_pems = split_pem(cert_file.read_text())
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    assert leaf.public_key() == key.public_key()
    assert format(leaf.serial_number, "x") == serial.lstrip("0")
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"a.svc.test", "b.svc.test"}
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    (tmp_path / "chain.pem").write_text("".join(chain_pems))
    verified = openssl(
        "verify", "-purpose", "sslserver", "-CAfile", str(ca_home / "ca" / "root.pem"),
        "-untrusted", str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem"),
    )  # fmt: skip
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified

    shown = hsmca_json(ca_home, "show", serial)
    assert (shown["serial"], shown["status"], shown["profile"]) == (serial, "good", "mtls-server")
    assert shown["sans"] == ["dns:a.svc.test", "dns:b.svc.test"]
    assert shown["certificate"] == leaf_pem

    revoked = hsmca(ca_home, "revoke", serial, "--reason", "keyCompromise")
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {serial} (keyCompromise)" in revoked.stdout
    twice = hsmca(ca_home, "revoke", serial, "--reason", "keyCompromise")
    assert twice.returncode == 1
    assert "already revoked" in twice.stderr and "Traceback" not in twice.stderr

    listed = hsmca_json(ca_home, "list", "--status", "revoked")
    assert {r["status"] for r in listed} == {"revoked"}
    mine = [r for r in listed if r["serial"] == serial]
    assert len(mine) == 1 and mine[0]["revocation_reason"] == "keyCompromise"

    crl_file = tmp_path / "x.crl"
    made = hsmca(ca_home, "crl", "--out", str(crl_file))
    assert made.returncode == 0, made.stderr
    text = openssl("crl", "-inform", "DER", "-in", str(crl_file), "-noout", "-text")
    assert text.returncode == 0, text.stderr
    entry = (
        rf"Serial Number: 0*{serial.lstrip('0').upper()}\s+Revocation Date[^\n]*\n"
        r"\s+CRL entry extensions:\s+X509v3 CRL Reason Code:\s+Key Compromise"
    )
    assert re.search(entry, text.stdout), text.stdout


def test_issue_from_csr_prints_json(ca_home: Path, tmp_path: Path) -> None:
    """--csr FILE --json: the record with the certificate for the CSR's key and the chain."""
    csr_pem, key = build_csr(cn="csr.svc.test", sans=("csr.svc.test", "10.1.2.3"))
    (tmp_path / "req.pem").write_bytes(csr_pem)
    record = hsmca_json(
        ca_home, "issue", "--csr", str(tmp_path / "req.pem"), "--profile", "mtls-client"
    )
    assert (record["status"], record["profile"]) == ("good", "mtls-client")
    assert record["sans"] == ["dns:csr.svc.test", "ip:10.1.2.3"]
    cert = x509.load_pem_x509_certificate(record["certificate"].encode())
    assert cert.public_key() == key.public_key()  # type: ignore[attr-defined]
    assert format(cert.serial_number, "x") == record["serial"].lstrip("0")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert record["chain"] == (ca_home / "ca" / "intermediate.pem").read_text()
    lifetime = dt.datetime.fromisoformat(record["not_after"].replace("Z", "+00:00"))
    assert lifetime - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=24)


def test_list_expiring_within(fresh_home: Path) -> None:
    """`list --expiring-within 2d` shows the 24h certificate, not the 20-day one or init's."""
    core = Pki.open(fresh_home)
    try:
        short = core.issue(IssueRequest(build_csr()[0], "mtls-client"), operator()).serial
        long = core.issue(
            IssueRequest(build_csr()[0], "mtls", parse_duration("20d")), operator()
        ).serial
    finally:
        core.close()
    proc = hsmca(fresh_home, "list", "--expiring-within", "2d")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert listed == [short]
    assert long not in proc.stdout and server_serial(fresh_home) not in proc.stdout


# -- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home the bad-input tests try (and fail) to change."""
    home = tmp_path_factory.mktemp("bad-input") / "home"
    initialise(home, "Bad Input Org")
    yield home


KEYGEN = ["issue", "--cn", "a.svc.test", "--key-out", "{key}", "--cert-out", "{cert}"]
BAD_INPUT = {
    "neither-csr-nor-cn": (
        ["issue", "--profile", "mtls-server"],
        r"give either --csr FILE or --cn NAME",
    ),
    "unknown-profile": (
        [*KEYGEN, "--profile", "nope"],
        r"unknown profile 'nope'; known: device, mtls, mtls-client, mtls-server",
    ),
    "bad-ttl": (
        [*KEYGEN, "--profile", "mtls-server", "--ttl", "10x"],
        r"not a duration: '10x' \(write it like 90s, 15m, 24h or 7d\)",
    ),
    "ttl-above-max": (
        [*KEYGEN, "--profile", "mtls-server", "--ttl", "31d"],
        r"ttl 31d exceeds the maximum of 30d for profile mtls-server",
    ),
    "key-out-in-missing-directory": (
        ["issue", "--cn", "a.svc.test", "--key-out", "{missing}/k.pem", "--profile", "mtls"],
        r"--key-out: directory .*/missing does not exist",
    ),
    "cert-out-in-missing-directory": (
        [*KEYGEN[:5], "--cert-out", "{missing}/c.pem", "--profile", "mtls"],
        r"--cert-out: directory .*/missing does not exist",
    ),
    "non-hex-serial": (["revoke", "not-a-serial"], r"not a serial number: 'not-a-serial'"),
    "unknown-reason": (
        ["revoke", "{server}", "--reason", "bogus"],
        r"unknown revocation reason 'bogus'; one of: unspecified, keyCompromise",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_usage_error_and_changes_nothing(
    bad_home: Path, tmp_path: Path, case: str
) -> None:
    """Exit 2 with a helpful message; no certificate, key or file appears or changes."""
    template, message = BAD_INPUT[case]
    key_file, cert_file = tmp_path / "k.pem", tmp_path / "c.pem"
    subs = {
        "key": str(key_file),
        "cert": str(cert_file),
        "server": server_serial(bad_home),
        "missing": str(tmp_path / "missing"),
    }
    args = [a.format(**subs) for a in template]
    before_files, before = snapshot(bad_home), db_state(bad_home)

    assert_usage_error(hsmca(bad_home, *args), message)

    after = db_state(bad_home)
    assert after["certificates"] == before["certificates"]
    assert after["issuers"] == before["issuers"] and after["tokens"] == before["tokens"]
    assert not key_file.exists() and not cert_file.exists()
    new_events = sqlite_query(
        bad_home,
        "SELECT action, outcome FROM audit_events WHERE id > ?",
        (len(before["audit"]),),  # type: ignore[arg-type]
    )
    assert set(new_events) <= {("certificate.issue", "refused")}  # refusals are audited
    after_files = snapshot(bad_home)
    changed = {
        k for k in after_files.keys() | before_files if after_files.get(k) != before_files.get(k)
    }
    assert changed <= {"hsmca.db"}


def test_environment_overrides_the_profile_maximum(fresh_home: Path, tmp_path: Path) -> None:
    """HSMCA_PROFILES__MTLS_SERVER__MAX_TTL=1h makes a 2h request fail that works without it."""
    key_file = tmp_path / "k.pem"
    args = ("issue", "--cn", "o.svc.test", "--key-out", str(key_file), "--profile",
            "mtls-server", "--ttl", "2h")  # fmt: skip
    lowered = clean_env(
        HSMCA_PROFILES__MTLS_SERVER__MAX_TTL="1h", HSMCA_PROFILES__MTLS_SERVER__DEFAULT_TTL="30m"
    )
    assert_usage_error(
        hsmca(fresh_home, *args, env=lowered),
        r"ttl 2h exceeds the maximum of 1h for profile mtls-server",
    )
    assert not key_file.exists()

    max_only = hsmca(fresh_home, *args, env=clean_env(HSMCA_PROFILES__MTLS_SERVER__MAX_TTL="1h"))
    assert_usage_error(max_only, r"profiles\.mtls-server: default_ttl exceeds max_ttl")
    assert not key_file.exists()

    record = hsmca_json(fresh_home, *args)  # the same request without the override
    span = dt.datetime.fromisoformat(record["not_after"].replace("Z", "+00:00"))
    span -= dt.datetime.fromisoformat(record["not_before"].replace("Z", "+00:00"))
    assert dt.timedelta(hours=2) <= span <= dt.timedelta(hours=2, minutes=2)
    assert mode(key_file) == 0o600


def test_wrong_hsm_pin_is_a_clear_error(fresh_home: Path, tmp_path: Path) -> None:
    """HSMCA_HSM__PIN with a wrong PIN: exit 1, a plain message, PIN not echoed, no row."""
    wrong = "wrong-pin-31415926"
    before = db_state(fresh_home)
    key_file = tmp_path / "k.pem"
    proc = hsmca(
        fresh_home, "issue", "--cn", "w.svc.test", "--key-out", str(key_file),
        "--profile", "mtls-server", env=clean_env(HSMCA_HSM__PIN=wrong),
    )  # fmt: skip
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.strip() == (
        "Error: wrong PIN for token 'hsmca' (check hsm.pin_file or HSMCA_HSM__PIN)"
    )
    assert wrong not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert db_state(fresh_home)["certificates"] == before["certificates"]
    assert not key_file.exists()


def test_unwritable_output_file_is_a_clean_error(bad_home: Path, tmp_path: Path) -> None:
    """An --out the command cannot write is a usage error before anything is published."""
    proc = hsmca(bad_home, "crl", "--out", str(tmp_path / "missing" / "x.crl"))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"--out: directory {tmp_path / 'missing'} does not exist" in proc.stderr
    assert "published" not in proc.stderr
    assert "Traceback" not in proc.stderr
