"""Revocation in the core, where a frozen clock or a special configuration is needed:
expired certificates leave the CRLs, and partitioned (sharded) CRLs.

CRLs are built by the real core (SoftHSM2 signs) and checked with ``openssl verify`` and
pkilint; nothing here needs the HTTP listener, whose CRL route is ``Pki.crl_document``.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from pki.actors import operator
from pki.bootstrap import initialise
from pki.clock import FrozenClock
from pki.config import write_default_config
from pki.service import Pki
from tests.issuance_helpers import Issued, errors_of, issue, pkilint, write_pem
from tests.revocation_helpers import der_crl_to_pem, openssl_verify, serials_of

SHARDS = 4
ACTOR = operator("revocation-tests")


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


# -- expired certificates leave the CRL ------------------------------------------------------


def test_expired_certificates_leave_the_crl(fresh_home: Path) -> None:
    """Issued at T for 1 h and revoked: listed at T+30 min, gone at T+2 h (built both by
    ``build_crl`` and by ``publish_base_crls``); a 24 h certificate stays listed."""
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    clock = FrozenClock(start)
    core = Pki.open(fresh_home, clock=clock)
    try:
        issuer_id = core.issuing_issuer().id
        short = issue(core, "mtls-server", ttl=dt.timedelta(hours=1))
        long = issue(core, "mtls-server", ttl=dt.timedelta(hours=24))
        assert short.cert.not_valid_after_utc <= start + dt.timedelta(hours=1)
        for got in (short, long):
            core.revoke(got.record.serial, "superseded", ACTOR)
        both = {short.cert.serial_number, long.cert.serial_number}

        clock.advance(dt.timedelta(minutes=30))
        assert both <= serials_of(x509.load_der_x509_crl(core.build_crl(issuer_id)))

        clock.advance(dt.timedelta(minutes=90))  # T + 2 h: the short one has expired
        for der in (core.build_crl(issuer_id), core.publish_base_crls(issuer_id)[0].der):
            listed = serials_of(x509.load_der_x509_crl(der))
            assert short.cert.serial_number not in listed
            assert long.cert.serial_number in listed
    finally:
        core.close()


def test_crls_and_ocsp_responses_are_rebuilt_before_they_go_stale(fresh_home: Path) -> None:
    """``publish_due`` with a frozen clock: the first run publishes a base per issuer and a
    delta per issuing CA (a root's CRL is complete and has none); past half the delta
    validity (1 h) only the deltas are rebuilt; past half the
    base validity (24 h) the bases too, with a later nextUpdate; OCSP responses past half
    their validity are re-signed. A published CRL never reaches its nextUpdate."""
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    clock = FrozenClock(start)
    core = Pki.open(fresh_home, clock=clock)
    try:
        issuer_id = core.issuing_issuer().id
        issue(core, "mtls-server", ttl=dt.timedelta(days=3))
        issuers = len(core.issuers())
        issuing = sum(1 for i in core.issuers().values() if i.kind != "root")
        first = core.publish_due()
        assert first["base_crls"] == issuers and first["delta_crls"] == issuing, first
        assert first["ocsp"] >= 2, first  # SHA-1 and SHA-256 of the new certificate
        old_base = core.store.latest_crl(issuer_id, 0, ("base",))
        assert old_base is not None

        clock.advance(dt.timedelta(minutes=31))
        later = core.publish_due()
        assert later["base_crls"] == 0 and later["delta_crls"] == issuing, later
        assert later["ocsp"] >= 2, later

        clock.advance(dt.timedelta(hours=12))  # start + 12 h 31 min: bases past half
        due = core.publish_due()
        assert due["base_crls"] == issuers, due
        new_base = core.store.latest_crl(issuer_id, 0, ("base",))
        assert new_base is not None and new_base.number > old_base.number
        assert new_base.next_update > old_base.next_update
        for kind in ("base", "delta"):
            crl = core.store.latest_crl(issuer_id, 0, (kind,))
            assert crl is not None and crl.next_update > clock.now(), kind
    finally:
        core.close()


# -- pre-signed OCSP responses and revocations -----------------------------------------------


def test_a_concurrent_presigning_batch_does_not_undo_revocations(fresh_home: Path) -> None:
    """The publisher (its own core, pre-signing new certificates) and the API (another
    core, revoking them) at the same time, as in ``hsmca serve``: afterwards every revoked
    certificate must be answered revoked by the nonce-less (pre-signed) OCSP path."""
    publisher, api = Pki.open(fresh_home), Pki.open(fresh_home)
    try:
        issuer_id = api.issuing_issuer().id
        issuer = x509.load_der_x509_certificate(api.issuer_der(issuer_id))
        certs = [issue(api, "mtls-server") for _ in range(30)]
        batch = threading.Thread(target=publisher.presign_ocsp, args=(issuer_id,))
        batch.start()
        try:
            for got in certs:
                api.revoke(got.record.serial, "keyCompromise", ACTOR)
        finally:
            batch.join(timeout=120)
        assert not batch.is_alive()
        says_good = []
        for got in certs:
            request = (
                ocsp.OCSPRequestBuilder()
                .add_certificate(got.cert, issuer, hashes.SHA1())
                .build()
                .public_bytes(Encoding.DER)
            )
            answer = ocsp.load_der_ocsp_response(api.ocsp_respond(request).der)
            if answer.certificate_status != ocsp.OCSPCertStatus.REVOKED:
                says_good.append(got.record.serial)
        assert says_good == [], f"{len(says_good)}/{len(certs)} revoked but answered good"
    finally:
        publisher.close()
        api.close()


# -- partitioned CRLs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sharded:
    """A home with ``[crl] shards = 4``: certificates by shard, which are revoked."""

    home: Path
    issuer_id: str
    base_url: str
    by_shard: dict[int, list[Issued]]
    revoked: dict[int, Issued]  # one revoked certificate per shard
    directory: Path

    def url(self, name: str) -> str:
        return f"{self.base_url}/crl/{name}.crl"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sharded]:
    """Issue until every shard has at least two certificates (bounded); revoke the first
    of each shard plus one more in shard 0."""
    directory = tmp_path_factory.mktemp("sharded")
    home = directory / "home"
    home.mkdir()
    write_default_config(home, {"crl": {"shards": SHARDS}})
    initialise(home, "Sharded Org")
    core = Pki.open(home)
    try:
        by_shard: dict[int, list[Issued]] = {k: [] for k in range(SHARDS)}
        for _ in range(80):
            if all(len(v) >= 2 for v in by_shard.values()):
                break
            got = issue(core, "mtls-server")
            by_shard[got.cert.serial_number % SHARDS].append(got)
        assert all(len(v) >= 2 for v in by_shard.values()), {k: len(v) for k, v in by_shard.items()}
        if len(by_shard[0]) < 3:
            by_shard[0].append(_issue_in_shard(core, 0))
        revoked = {k: v[0] for k, v in by_shard.items()}
        for got in [*revoked.values(), by_shard[0][2]]:
            core.revoke(got.record.serial, "keyCompromise", ACTOR)
        yield Sharded(
            home,
            core.issuing_issuer().id,
            core.settings.server.public_http_url.rstrip("/"),
            by_shard,
            revoked,
            directory,
        )
    finally:
        core.close()


def _issue_in_shard(core: Pki, shard: int) -> Issued:
    for _ in range(80):
        got = issue(core, "mtls-server")
        if got.cert.serial_number % SHARDS == shard:
            return got
    raise AssertionError(f"no certificate landed in shard {shard}")


def _revoked_in(sharded: Sharded, shard: int) -> set[int]:
    """The revoked serials of one shard (the first of each, the third of shard 0)."""
    serials = {sharded.revoked[shard].cert.serial_number}
    if shard == 0:
        serials.add(sharded.by_shard[0][2].cert.serial_number)
    return serials


def _crl(sharded: Sharded, name: str) -> bytes:
    core = Pki.open(sharded.home)
    try:
        return core.crl_document(name)
    finally:
        core.close()


def test_each_certificate_points_at_its_shard(sharded: Sharded) -> None:
    """The CDP of every certificate is ``/crl/<issuer-id>-<serial % 4>.crl``."""
    for shard, certs in sharded.by_shard.items():
        for got in certs:
            points = got.cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
            (point,) = points.value
            assert point.full_name == [
                x509.UniformResourceIdentifier(sharded.url(f"{sharded.issuer_id}-{shard}"))
            ]


@pytest.mark.parametrize("shard", range(SHARDS))
def test_each_shard_crl_lists_exactly_its_revocations(sharded: Sharded, shard: int) -> None:
    """Shard k's CRL lists exactly the revoked serials with serial % 4 == k, names its own
    URL in a critical IDP and points its Freshest CRL at its own delta; that delta (same
    IDP) is a valid delta of it."""
    name = f"{sharded.issuer_id}-{shard}"
    crl = x509.load_der_x509_crl(_crl(sharded, name))
    assert serials_of(crl) == _revoked_in(sharded, shard)
    idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical
    assert idp.value.full_name == [x509.UniformResourceIdentifier(sharded.url(name))]
    (fresh,) = crl.extensions.get_extension_for_class(x509.FreshestCRL).value
    assert fresh.full_name == [x509.UniformResourceIdentifier(sharded.url(f"{name}-delta"))]

    delta = x509.load_der_x509_crl(_crl(sharded, f"{name}-delta"))
    assert serials_of(delta) <= _revoked_in(sharded, shard)
    assert delta.extensions.get_extension_for_class(x509.IssuingDistributionPoint) == idp
    indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value
    assert indicator.crl_number <= _crl_number(crl) < _crl_number(delta)


@pytest.mark.parametrize("shard", range(SHARDS))
def test_openssl_verify_with_the_shard_crl(sharded: Sharded, shard: int, tmp_path: Path) -> None:
    """With its own shard's CRL, ``openssl verify -crl_check`` fails ("certificate
    revoked") for the revoked certificate and passes for a good one; another shard's CRL
    is out of scope for it (the IDP is enforced)."""
    chain = sharded.home / "ca" / "chain.pem"
    own = der_crl_to_pem(_crl(sharded, f"{sharded.issuer_id}-{shard}"), tmp_path / "own.crl.pem")
    other = (shard + 1) % SHARDS
    foreign = der_crl_to_pem(
        _crl(sharded, f"{sharded.issuer_id}-{other}"), tmp_path / "other.crl.pem"
    )
    bad = write_pem(tmp_path / "revoked.pem", sharded.revoked[shard].cert)
    good = write_pem(tmp_path / "good.pem", sharded.by_shard[shard][1].cert)

    failed = openssl_verify(chain, bad, [own])
    assert failed.returncode != 0
    assert "certificate revoked" in failed.stdout + failed.stderr, failed.stdout + failed.stderr
    passed = openssl_verify(chain, good, [own])
    assert passed.returncode == 0, passed.stdout + passed.stderr
    out_of_scope = openssl_verify(chain, good, [foreign])
    assert out_of_scope.returncode != 0
    assert "different CRL scope" in out_of_scope.stdout + out_of_scope.stderr


def test_the_complete_crl_lists_every_shard(sharded: Sharded, tmp_path: Path) -> None:
    """``/crl/<issuer-id>.crl`` is complete: every revoked serial of every shard, no IDP
    (so it covers every certificate), and ``openssl verify`` rejects each revoked one."""
    der = _crl(sharded, sharded.issuer_id)
    crl = x509.load_der_x509_crl(der)
    every = set().union(*(_revoked_in(sharded, k) for k in range(SHARDS)))
    assert serials_of(crl) == every
    with pytest.raises(x509.ExtensionNotFound):
        crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    chain = sharded.home / "ca" / "chain.pem"
    pem = der_crl_to_pem(der, tmp_path / "complete.crl.pem")
    for shard, got in sharded.revoked.items():
        done = openssl_verify(chain, write_pem(tmp_path / f"r{shard}.pem", got.cert), [pem])
        assert "certificate revoked" in done.stdout + done.stderr, (shard, done.stdout)


def test_shard_crls_lint_clean(sharded: Sharded, tmp_path: Path) -> None:
    """pkilint ``lint_crl -t CRL -p PKIX``: no ERROR/FATAL on a shard CRL, its delta and
    the complete CRL."""
    names = [f"{sharded.issuer_id}-0", f"{sharded.issuer_id}-0-delta", sharded.issuer_id]
    for name in names:
        path = tmp_path / f"{name}.crl"
        path.write_bytes(_crl(sharded, name))
        findings = pkilint("lint_crl", "-t", "CRL", "-p", "PKIX", "-s", "WARNING", str(path))
        assert errors_of(findings) == [], f"{name}: {errors_of(findings)}"


def test_the_crl_linter_can_fail(tmp_path: Path) -> None:
    """Control for the lint tests: a v2 CRL without AKI or CRL number gets errors."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Bad CA")])
    bad = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "bad.crl"
    path.write_bytes(bad.public_bytes(Encoding.DER))
    findings = pkilint("lint_crl", "-t", "CRL", "-p", "PKIX", "-s", "WARNING", str(path))
    assert errors_of(findings), findings
