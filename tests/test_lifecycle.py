"""Lifecycle jobs on a real core (SoftHSM2, SQLite) with an injected clock: issuing-CA
rotation with its overlap, service-certificate renewal, purges, and job-run records."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from pki.actors import operator
from pki.bootstrap import initialise
from pki.clock import FrozenClock
from pki.config import write_default_config
from pki.scheduler import run_job
from pki.serials import serial_hex
from pki.service import IssueRequest, Pki
from tests.conftest import build_csr

START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


class MovableClock(FrozenClock):
    def move_to(self, at: dt.datetime) -> None:
        self._at = at


@pytest.fixture
def short_lived_ca(tmp_path: Path) -> tuple[Path, MovableClock]:
    """A home whose issuing CA lives 10 days (rotation at 7.5 days)."""
    home = tmp_path / "home"
    home.mkdir()
    write_default_config(home, {"ca": {"issuing_ttl": "10d", "server_ttl": "3d"}})
    clock = MovableClock(START)
    initialise(home, "Rotation Org", clock=clock)
    return home, clock


def _issue(core: Pki, name: str) -> tuple[str, x509.Certificate]:
    record = core.issue(
        IssueRequest(
            csr=build_csr(name, (name,))[0], profile="mtls-server", ttl=dt.timedelta(days=1)
        ),
        operator(),
    )
    assert record.certificate_pem is not None
    return record.chain_pem, x509.load_pem_x509_certificate(record.certificate_pem.encode())


def _verifies(tmp_path: Path, leaf: x509.Certificate, chain_pem: str, root: Path) -> bool:
    leaf_file, chain_file = tmp_path / "leaf.pem", tmp_path / "chain.pem"
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    chain_file.write_text(chain_pem)
    at = str(int(leaf.not_valid_before_utc.timestamp()) + 120)  # the test clock's "now"
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            at,
            "-CAfile",
            str(root),
            "-untrusted",
            str(chain_file),
            str(leaf_file),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode == 0


def _ocsp_status(core: Pki, leaf: x509.Certificate, issuer: x509.Certificate) -> object:
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    result = core.ocsp_respond(request.public_bytes(serialization.Encoding.DER))
    return ocsp.load_der_ocsp_response(result.der).certificate_status


def test_issuing_ca_rotation_keeps_the_old_ca_serving_during_the_overlap(
    short_lived_ca: tuple[Path, MovableClock], tmp_path: Path
) -> None:
    home, clock = short_lived_ca
    core = Pki.open(home, clock=clock)
    try:
        assert run_job(core, "rotate-issuing-ca", "test")[1] == {"rotated": 0}
        old = core.issuing_issuer()
        clock.move_to(START + dt.timedelta(days=7, hours=12))  # exactly 75 %
        old_chain, old_leaf = _issue(core, "old.rotation.test")
        outcome, summary, _ = run_job(core, "rotate-issuing-ca", "test")
        assert (outcome, summary) == ("ok", {"rotated": 1})
        new = core.issuing_issuer()
        assert new.id != old.id and new.active
        assert not core.issuers(refresh=True)[old.id].active
        assert run_job(core, "rotate-issuing-ca", "test")[1] == {"rotated": 0}  # once

        new_chain, new_leaf = _issue(core, "new.rotation.test")
        assert new_leaf.issuer != old_leaf.issuer
        root = home / "ca" / "root.pem"
        assert _verifies(tmp_path, old_leaf, old_chain, root)
        assert _verifies(tmp_path, new_leaf, new_chain, root)
        trust = (home / "ca" / "trust.pem").read_text()
        assert trust.count("BEGIN CERTIFICATE") == 3  # both issuing CAs and the root
        exported = x509.load_pem_x509_certificate((home / "ca" / "intermediate.pem").read_bytes())
        assert exported.public_bytes(serialization.Encoding.DER) == new.der

        old_ca = x509.load_der_x509_certificate(old.der)
        new_ca = x509.load_der_x509_certificate(new.der)
        assert _ocsp_status(core, old_leaf, old_ca) == ocsp.OCSPCertStatus.GOOD
        assert _ocsp_status(core, new_leaf, new_ca) == ocsp.OCSPCertStatus.GOOD
        core.revoke(serial_hex(old_leaf.serial_number), "superseded", operator())
        assert _ocsp_status(core, old_leaf, old_ca) == ocsp.OCSPCertStatus.REVOKED
        clock.move_to(clock.now() + dt.timedelta(minutes=1))
        core.publish_due()
        crl = x509.load_der_x509_crl(core.build_crl(old.id))
        assert crl.issuer == old_ca.subject
        assert crl.get_revoked_certificate_by_serial_number(old_leaf.serial_number) is not None
    finally:
        core.close()


def test_server_certificate_renewed_past_two_thirds(
    short_lived_ca: tuple[Path, MovableClock],
) -> None:
    home, clock = short_lived_ca
    core = Pki.open(home, clock=clock)
    try:
        path = home / "tls" / "server.pem"
        before = x509.load_pem_x509_certificates(path.read_bytes())[0]
        assert run_job(core, "renew-service-certificates", "test")[1] == {"server_tls": 0}
        clock.move_to(START + dt.timedelta(days=2, hours=1))  # 3-day certificate, > 2/3
        assert run_job(core, "renew-service-certificates", "test")[1] == {"server_tls": 1}
        after = x509.load_pem_x509_certificates(path.read_bytes())[0]
        assert after.serial_number != before.serial_number
        assert after.not_valid_after_utc > before.not_valid_after_utc
        assert (home / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    finally:
        core.close()


def test_job_runs_are_recorded_with_their_outcome(
    short_lived_ca: tuple[Path, MovableClock],
) -> None:
    home, clock = short_lived_ca
    core = Pki.open(home, clock=clock)
    try:
        (home / "tls" / "server.pem").write_text("not a certificate")
        outcome, _, error = run_job(core, "renew-service-certificates", "test")
        assert outcome == "error" and error
        run_job(core, "purge", "test")
        runs = core.store.jobs.recent_runs(limit=5)
        assert [(r.job, r.outcome) for r in runs[:2]] == [
            ("purge", "ok"),
            ("renew-service-certificates", "error"),
        ]
        assert runs[1].error == error and runs[1].finished_at is not None
        assert "purge" in core.store.jobs.last_success()
    finally:
        core.close()


def test_ca_state_gauges(short_lived_ca: tuple[Path, MovableClock]) -> None:
    from pki.monitoring import ca_state

    home, clock = short_lived_ca
    core = Pki.open(home, clock=clock)
    try:
        _issue(core, "gauge.rotation.test")
        run_job(core, "refresh-revocation", "test")
        run_job(core, "purge", "test")
        state = ca_state(core)
        assert state.expiring[("mtls-server", "24h")] == 1
        assert state.expiring[("mtls-server", "1h")] == 0
        assert state.expiring[("mtls-server", "7d")] >= 1  # the server TLS certificate too
        assert 9 * 86400 < state.ca_seconds_left <= 10 * 86400  # the 10-day issuing CA
        assert state.newest_crl_age_seconds is not None and state.newest_crl_age_seconds >= 0
        assert state.job_last_success["purge"] == clock.now().timestamp()
        clock.move_to(START + dt.timedelta(hours=2))
        assert ca_state(core).stale_ocsp_responses >= 1  # 1h responses, nobody refreshed
    finally:
        core.close()


def test_renewal_of_a_certificate_cut_short_by_its_ca_gets_the_full_lifetime(
    short_lived_ca: tuple[Path, MovableClock],
) -> None:
    home, clock = short_lived_ca
    core = Pki.open(home, clock=clock)
    try:
        clock.move_to(START + dt.timedelta(days=9, hours=18))  # the CA has 6 h left
        _, clamped = _issue(core, "clamped.rotation.test")
        old_ca = core.issuing_issuer()
        assert clamped.not_valid_after_utc == old_ca.not_after  # 1d asked, 6h given
        assert run_job(core, "rotate-issuing-ca", "test")[1]["rotated"] == 1
        renewed = core.renew(clamped.public_bytes(serialization.Encoding.DER))
        lifetime = renewed.not_after - renewed.not_before
        assert lifetime >= dt.timedelta(hours=24)  # the profile's, not the 6 h inherited
        assert renewed.issuer_id == core.issuing_issuer().id != old_ca.id
    finally:
        core.close()
