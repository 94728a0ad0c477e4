"""Lint before sign (issue #8): every end-entity certificate is signed first with a
throwaway in-memory key and checked by pkilint's RFC 5280 validators and our profile
checks; an ERROR refuses the issuance with a clear error and an audit event, and the HSM
signs nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki.actors import operator
from pki.errors import PolicyError
from pki.lint import Expectations, LintFailed, lint_before_sign, refusing
from pki.policy import RequestedNames
from pki.serials import new_serial
from pki.service import IssueRequest, Pki
from pki.signer import EndEntityRequest, end_entity_builder, signature_hash
from tests.api_helpers import assert_problem
from tests.conftest import RunningService, build_csr
from tests.helpers import sqlite_query
from tests.issuance_helpers import errors_of, issue, pkilint, write_pem

#: a device URI template an operator got wrong: spaces are not allowed in a URI
BAD_URI_TEMPLATE = "dev serial {device_id}"


@pytest.fixture
def signatures(pki: Pki) -> Iterator[list[float]]:
    """Every HSM signature made through ``pki`` while the test runs."""
    seen: list[float] = []
    pki.hsm.sign_observers.append(seen.append)
    yield seen
    pki.hsm.sign_observers.remove(seen.append)


def _request(pki: Pki, **changes: object) -> tuple[EndEntityRequest, Expectations]:
    profile = pki.profiles.get("mtls-server")
    key = build_csr()[1]
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    request = EndEntityRequest(
        serial=new_serial(),
        subject=x509.Name([]),
        names=RequestedNames(("app.svc.test",), (), ()),
        public_key=key.public_key(),  # type: ignore[attr-defined]
        not_before=now,
        not_after=now + dt.timedelta(hours=1),
        profile=profile,
    )
    request = dataclasses.replace(request, **changes)  # type: ignore[arg-type]
    issuer = pki.signer(pki.issuing_issuer().id)
    expected = Expectations(
        issuer.certificate, profile, RequestedNames(("app.svc.test",), (), ()), None,
        profile.max_ttl,
    )  # fmt: skip
    return request, expected


def _lint(pki: Pki, request: EndEntityRequest, expected: Expectations) -> list[str]:
    issuer = pki.signer(pki.issuing_issuer().id)
    tbs = end_entity_builder(issuer, request, pki.urls)
    found = lint_before_sign(tbs, issuer.key, signature_hash(issuer.key), expected)
    return sorted(f.code for f in refusing(found))


def test_a_correct_certificate_lints_clean_without_touching_the_hsm(
    pki: Pki, signatures: list[float]
) -> None:
    request, expected = _request(pki)
    assert _lint(pki, request, expected) == []
    assert signatures == []  # the throwaway key signed; the HSM did not


@pytest.mark.parametrize(
    ("changes", "codes"),
    [
        ({"names": RequestedNames(("a..b.svc.test",), (), ())},
         ["hsmca.subject_alt_name", "pkix.invalid_domain_name_syntax"]),
        ({"names": RequestedNames((), (), ("dev serial 1",))},
         ["hsmca.subject_alt_name", "pkix.invalid_uri_syntax"]),
        # a quote must not make the tolerated-URN check read only the part before it
        ({"names": RequestedNames((), (), ('urn:a"b<c>{}',))},
         ["hsmca.subject_alt_name", "pkix.invalid_uri_syntax"]),
        ({"not_after": dt.datetime.now(dt.UTC) + dt.timedelta(days=400)},
         ["hsmca.validity_too_long"]),
        ({"serial": 12345}, ["hsmca.serial_entropy"]),
    ],
    ids=["bad-dns-name", "bad-uri", "quote-in-uri", "too-long", "short-serial"],
)  # fmt: skip
def test_each_finding_refuses(
    pki: Pki, signatures: list[float], changes: dict[str, object], codes: list[str]
) -> None:
    request, expected = _request(pki, **changes)
    assert _lint(pki, request, expected) == codes
    assert signatures == []


def test_profile_checks_catch_a_wrong_extended_key_usage(pki: Pki) -> None:
    request, expected = _request(pki)
    client = dataclasses.replace(
        request.profile, extended_key_usages=(ExtendedKeyUsageOID.CLIENT_AUTH,)
    )
    assert _lint(pki, dataclasses.replace(request, profile=client), expected) == [
        "hsmca.extended_key_usage"
    ]


@pytest.fixture
def bad_template_pki(fresh_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pki]:
    monkeypatch.setenv("HSMCA_CA__DEVICE_URI_TEMPLATE", BAD_URI_TEMPLATE)
    core = Pki.open(fresh_home)
    yield core
    core.close()


def test_a_misconfigured_profile_is_refused_audited_and_never_signed(
    bad_template_pki: Pki, tmp_path: Path
) -> None:
    core = bad_template_pki
    signed: list[float] = []
    core.hsm.sign_observers.append(signed.append)
    rows = core.store.count_certificates()
    csr = build_csr(cn=None, sans=(), serial_number="sensor-7")[0]
    with pytest.raises(LintFailed) as refused:
        core.issue(IssueRequest(csr, "device"), operator("lint-test"))
    assert isinstance(refused.value, PolicyError)
    assert "pkix.invalid_uri_syntax" in str(refused.value)
    assert "dev serial sensor-7" in str(refused.value)
    assert signed == [] and core.store.count_certificates() == rows
    event = list(core.store.audit_events())[-1]
    assert (event.action, event.outcome) == ("certificate.issue", "refused")
    assert event.details["lint"] == ["pkix.invalid_uri_syntax"]
    # the linter is what stopped it: switched off, the same request is signed, and the
    # certificate has exactly the error pkilint reports
    core.settings = dataclasses.replace(
        core.settings, ca=dataclasses.replace(core.settings.ca, lint_before_sign=False)
    )
    record = core.issue(IssueRequest(csr, "device"), operator("lint-test"))
    assert signed and record.certificate_pem
    path = tmp_path / "unlinted.pem"
    write_pem(path, x509.load_pem_x509_certificate(record.certificate_pem.encode()))
    assert [f.code for f in errors_of(pkilint("lint_pkix_cert", str(path)))] == [
        "pkix.invalid_uri_syntax"
    ]


def test_every_profile_passes_the_linter_it_is_issued_through(pki: Pki) -> None:
    """Lint before sign is on by default: the built-in profiles issue as usual."""
    assert pki.settings.ca.lint_before_sign is True
    for profile, names in (
        ("mtls-server", ("web.svc.test", "127.0.0.1")),
        ("mtls", ("localhost",)),
    ):
        cert = issue(pki, profile, names[0], names).cert
        assert cert.public_bytes(Encoding.DER)


def test_rest_api_answers_a_lint_refusal_with_a_problem(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from pki.bootstrap import initialise
    from pki.config import write_default_config

    home = tmp_path_factory.mktemp("lint-rest") / "home"
    home.mkdir()
    write_default_config(home, {"ca": {"device_uri_template": BAD_URI_TEMPLATE}})
    initialise(home, "Lint Org")
    svc = RunningService(home)
    try:
        s = svc.session(svc.admin_token)
        csr = build_csr(cn=None, sans=(), serial_number="sensor-9")[0].decode()
        resp = s.post(
            f"{svc.base}/api/v1/certificates", json={"csr": csr, "profile": "device"}, timeout=30
        )
        body = assert_problem(resp, 400, "pkix.invalid_uri_syntax")
        assert body["type"] == "urn:hsmca:problem:lint-failed"
        assert sqlite_query(home, "SELECT count(*) FROM certificates WHERE profile='device'") == [
            (0,)
        ]
    finally:
        assert svc.stop() == 0


@pytest.mark.parametrize(
    "names",
    [("localhost",), ("*.w.svc.test",), ("redis", "*.svc.test")],
    ids=["single-label", "wildcard", "both"],
)
def test_names_rfc5280_allows_but_pkilint_flags_are_tolerated(
    pki: Pki, names: tuple[str, ...]
) -> None:
    """pkilint's dNSName check wants a dot and no wildcard; RFC 5280 (RFC 1034 preferred
    name syntax) and RFC 6125 allow both, and an internal CA issues them on purpose."""
    requested = RequestedNames(names, (), ())
    request, expected = _request(pki, names=requested)
    assert _lint(pki, request, dataclasses.replace(expected, names=requested)) == []
