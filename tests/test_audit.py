"""The hash-chained audit log: one event per state change, `hsmca audit verify`, tampering
detected at the first bad event, and no secrets in any event."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pki.actors import Actor, operator
from pki.audit import AuditRecord, StoredEvent, canonical_body, chain_hash
from pki.errors import Forbidden, PolicyError
from pki.service import IssueRequest, Pki
from pki.store import Store
from tests.conftest import build_csr
from tests.helpers import all_sqlite_values, hsmca, hsmca_json


def events(core: Pki) -> list[StoredEvent]:
    return list(core.store.audit_events())


def summary(evs: list[StoredEvent]) -> list[tuple[str, str, str | None, str]]:
    return [(e.action, e.outcome, e.subject, e.actor) for e in evs]


def test_every_state_change_and_refusal_is_one_chained_event(fresh_home: Path) -> None:
    """CA creation, issue, revoke, token creation and refused requests each append one event."""
    core = Pki.open(fresh_home)
    try:
        at_init = events(core)
        creations = [e for e in at_init if e.action == "ca.create"]
        assert [e.details["kind"] for e in creations] == ["root", "intermediate"]
        assert {e.subject for e in creations} == set(core.issuers())

        admin = operator("audit-test")
        serial = core.issue(IssueRequest(build_csr()[0], "mtls-server"), admin).serial
        core.revoke(serial, "keyCompromise", admin)
        token = core.create_token("issuer", "ci-bot", admin, allowed_names=("*.svc.test",))
        with pytest.raises(PolicyError, match="exceeds the maximum"):
            core.issue(IssueRequest(build_csr()[0], "mtls-server", dt.timedelta(days=365)), admin)
        with pytest.raises(PolicyError):
            core.issue(IssueRequest(b"not a CSR", "mtls-server"), admin)
        auditor = Actor(name="token:watcher", role="auditor")
        with pytest.raises(Forbidden):
            core.issue(IssueRequest(build_csr()[0], "mtls-server"), auditor)

        new = events(core)[len(at_init) :]
        assert summary(new) == [
            ("certificate.issue", "ok", serial, "operator:audit-test"),
            ("certificate.revoke", "ok", serial, "operator:audit-test"),
            ("token.create", "ok", token.token.name, "operator:audit-test"),
            ("certificate.issue", "refused", None, "operator:audit-test"),
            ("certificate.issue", "refused", None, "operator:audit-test"),
            ("certificate.issue", "refused", None, "token:watcher"),
        ]
        assert new[1].details == {"reason": "keyCompromise"}
        assert "exceeds the maximum" in new[3].details["reason"]
        assert "PKCS#10" in new[4].details["reason"]
        assert "auditor" in new[5].details["reason"]
        assert all(e.at.tzinfo is not None for e in new)

        chain = events(core)
        assert [e.id for e in chain] == list(range(1, len(chain) + 1))
        assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(chain))
        result = core.verify_audit()
        assert (result.ok, result.events, result.first_bad_id) == (True, len(chain), None)
    finally:
        core.close()


def test_unknown_profile_refusal_is_audited(pki: Pki) -> None:
    """A CSR request naming an unknown profile leaves a refused event like other refusals."""
    before = len(events(pki))
    with pytest.raises(PolicyError, match="unknown profile"):
        pki.issue(IssueRequest(build_csr()[0], "no-such-profile"), operator("refusal"))
    new = events(pki)[before:]
    assert [(e.action, e.outcome, e.actor) for e in new] == [
        ("certificate.issue", "refused", "operator:refusal")
    ]
    assert "no-such-profile" in new[0].details["reason"]


def test_audit_verify_command_accepts_an_intact_log(fresh_home: Path) -> None:
    """`hsmca audit verify` exits 0 and counts the events of an untouched log."""
    core = Pki.open(fresh_home)
    try:
        core.issue(IssueRequest(build_csr()[0], "mtls-client"), operator())
        count = len(events(core))
    finally:
        core.close()
    proc = hsmca(fresh_home, "audit", "verify")
    assert proc.returncode == 0, proc.stderr
    assert f"audit log OK: {count} events, chain intact" in proc.stdout


def _change(store: Store, evs: list[StoredEvent]) -> tuple[int, str]:
    store.tamper_audit_event(5, details={**evs[4].details, "profile": "device"})
    return 5, "event content does not match its hash"


def _remove(store: Store, evs: list[StoredEvent]) -> tuple[int, str]:
    store.tamper_audit_event(5, delete=True)
    return 6, "expected event 5, found 6"


def _reorder(store: Store, evs: list[StoredEvent]) -> tuple[int, str]:
    first, second = evs[4], evs[6]  # two certificate issues: swap who/what/about whom
    for target, source in ((first, second), (second, first)):
        store.tamper_audit_event(
            target.id,
            actor=source.actor,
            action=source.action,
            subject=source.subject,
            details=source.details,
        )
    return 5, "event content does not match its hash"


def _rehash(store: Store, evs: list[StoredEvent]) -> tuple[int, str]:
    """Change event 5 and recompute its own hash: the next event no longer links."""
    e = evs[4]
    details = {**e.details, "names": ["evil.example"]}
    forged = StoredEvent(**{**e.__dict__, "details": details})
    digest = chain_hash(e.prev_hash, canonical_body(e.id, e.at, forged))
    store.tamper_audit_event(5, details=details, hash=digest)
    return 6, "prev_hash does not match the previous event"


TAMPERING: dict[str, Callable[[Store, list[StoredEvent]], tuple[int, str]]] = {
    "changed": _change,
    "removed": _remove,
    "reordered": _reorder,
    "rehashed": _rehash,
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampering_is_detected_at_the_first_bad_event(fresh_home: Path, how: str) -> None:
    """Each kind of tampering on its own home: verify exits 1 and names the first bad event."""
    core = Pki.open(fresh_home)
    try:
        for i in range(3):
            csr, _key = build_csr(cn=f"t{i}.svc.test", sans=(f"t{i}.svc.test",))
            core.issue(IssueRequest(csr, "mtls-server"), operator())
        evs = events(core)
        assert len(evs) == 7 and evs[4].action == evs[6].action == "certificate.issue"
        assert evs[4].details != evs[6].details
        assert core.verify_audit().ok
        bad_id, problem = TAMPERING[how](core.store, evs)
        result = core.verify_audit()
        assert (result.ok, result.first_bad_id, result.problem) == (False, bad_id, problem)
    finally:
        core.close()
    as_json = how == "rehashed"  # one case checks the machine-readable report
    proc = hsmca(fresh_home, "audit", "verify", *(["--json"] if as_json else []))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    if as_json:
        report = json.loads(proc.stdout)
        assert (report["ok"], report["first_bad_event"], report["problem"]) == (
            False,
            bad_id,
            problem,
        )
        assert report["events"] == bad_id
    else:
        assert f"audit log BROKEN at event {bad_id}: {problem}" in proc.stdout


def test_no_secret_reaches_the_audit_log(fresh_home: Path) -> None:
    """Neither a new token's secret nor the HSM PINs appear in any event or anywhere in the DB."""
    created = hsmca_json(fresh_home, "token", "create", "--role", "admin", "--name", "ops")
    secret = created["token"]
    pins = [(fresh_home / "secrets" / n).read_text().strip() for n in ("hsm.pin", "hsm-so.pin")]
    assert secret.startswith("hsmca_") and all(len(p) >= 16 for p in pins)

    core = Pki.open(fresh_home)
    try:
        core.issue(IssueRequest(build_csr()[0], "mtls-server"), core.authenticate_token(secret))
        evs = events(core)
    finally:
        core.close()
    assert ("token.create", "ops") in {(e.action, e.subject) for e in evs}
    assert any(e.actor == "token:ops" for e in evs)
    dumped = [json.dumps(e.__dict__, default=str) for e in evs]
    for needle in (secret, *pins):
        assert not [d for d in dumped if needle in d]
    audit_columns = [v for t, _c, v in all_sqlite_values(fresh_home) if t == "audit_events"]
    assert len(audit_columns) == 9 * len(evs)
    for needle in (secret, *pins):
        assert not [v for v in audit_columns if needle in str(v)]
    raw = b"".join(p.read_bytes() for p in fresh_home.glob("hsmca.db*"))
    for needle in (secret, *pins):
        assert needle.encode() not in raw


@pytest.mark.parametrize(
    "details",
    [
        {"pin": "1234"},
        {"token": "hsmca_x"},
        {"request": {"secret": "s3"}},
        {"items": [{"private_key": "k"}]},
    ],
)
def test_audit_records_refuse_secret_fields(details: dict[str, object]) -> None:
    """A use-case cannot put a secret-named field into an event, not even nested."""
    with pytest.raises(ValueError, match="must not carry secrets"):
        AuditRecord(action="x.test", actor="system", details=details)
