"""Device enrolment credentials, bulk provisioning and the device inventory (issue #7).

The ``hsmca device`` commands run in-process through the console script's click group
(one real subprocess checks the installed script), the ``/api/v1/devices`` routes over
real HTTPS against the ``service`` fixture, and the device store on PostgreSQL. The shared
``ca_home`` is never assumed empty: every test uses its own device ids and counts rows
before and after.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import stat
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import text

from cli.main import main
from pki.access import token_digest
from pki.actors import operator
from pki.errors import Forbidden, InvalidInput, Unauthorised
from pki.service import IssueRequest
from tests.api_helpers import (
    TIMEOUT,
    assert_problem,
    certificate_count,
    events_since,
    last_event_id,
    new_token,
    opened,
    unique,
    write_identity,
)
from tests.conftest import RunningService, build_csr
from tests.helpers import hsmca, sqlite_query

API = "/api/v1"
ENROL = f"{API}/devices/enroll"
DEVICES = f"{API}/devices"
PREFIX = "hsmcad_"
OUT_HEADER = ["device_id", "secret", "expires_at"]


# -- helpers ---------------------------------------------------------------------------------


def sess(service: RunningService, token: str | None = None) -> requests.Session:
    """A requests session trusting only the service's root (with a bearer token)."""
    return service.session(token)  # type: ignore[return-value]


def cli(home: Path, *args: str) -> Result:
    """``hsmca --home HOME device ARGS`` in-process (the console script's click group)."""
    return CliRunner().invoke(main, ["--home", str(home), "device", *args], catch_exceptions=False)


def cli_json(home: Path, *args: str) -> Any:
    """A ``--json`` device command that must succeed; its parsed stdout."""
    result = cli(home, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_usage_error(result: Result, *mentions: str) -> str:
    """Exit 2 with click's usage banner and a message naming each of ``mentions``."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr
    assert "Usage:" in err and "Error:" in err, err
    for word in mentions:
        assert word in err, (word, err)
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout
    return err


def parse_iso(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def new_credential(home: Path, device_id: str) -> str:
    """A one-time enrolment secret for ``device_id`` made through the core."""
    with opened(home) as core:
        return core.create_enrollment_credential(device_id, None, operator("device-tests")).secret


def device_csr(device_id: str | None) -> tuple[bytes, Any]:
    """A CSR naming ``device_id`` in its subject serialNumber (no CN, no SAN) and its key."""
    return build_csr(cn=None, sans=(), serial_number=device_id)


def enrol(
    service: RunningService,
    secret: str,
    csr: bytes,
    *,
    device_id: str | None = None,
    basic: str | None = None,
    extra: dict[str, Any] | None = None,
    session: requests.Session | None = None,
) -> requests.Response:
    """POST /api/v1/devices/enroll with ``Bearer SECRET`` (or Basic ``BASIC:SECRET``)."""
    session = session or sess(service)
    body: dict[str, Any] = {"csr": csr.decode(), **(extra or {})}
    if device_id is not None:
        body["device_id"] = device_id
    if basic is None:
        headers, auth = {"Authorization": f"Bearer {secret}"}, None
    else:
        headers, auth = {}, (basic, secret)
    return session.post(
        f"{service.base}{ENROL}", json=body, headers=headers, auth=auth, timeout=TIMEOUT
    )


def enrolled(service: RunningService, device_id: str) -> tuple[dict[str, Any], Any]:
    """Enrol ``device_id`` over REST with a fresh credential; (certificate record, key)."""
    secret = new_credential(service.home, device_id)
    csr, key = device_csr(device_id)
    resp = enrol(service, secret, csr)
    assert resp.status_code == 201, resp.text
    return resp.json(), key


def credential_total(home: Path) -> int:
    return int(sqlite_query(home, "SELECT count(*) FROM device_credentials")[0][0])


def credentials_of(home: Path, device_id: str) -> list[tuple[Any, ...]]:
    """(secret_sha256, used_at) of the device's credentials, oldest first."""
    return sqlite_query(
        home,
        "SELECT secret_sha256, used_at FROM device_credentials WHERE device_id = ? ORDER BY id",
        (device_id,),
    )


def devices_like(home: Path, prefix: str) -> int:
    return int(
        sqlite_query(home, "SELECT count(*) FROM devices WHERE id LIKE ?", (prefix + "%",))[0][0]
    )


def assert_secrets_absent(home: Path, secrets: Sequence[str]) -> None:
    """No enrolment secret is in the SQLite files or the audit log: not the ``hsmcad_``
    prefix every secret starts with, nor the random part of any of ``secrets``."""
    raw = b"".join(p.read_bytes() for p in sorted(home.glob("hsmca.db*")))
    assert raw, "no SQLite file found"
    assert PREFIX.encode() not in raw
    for secret in secrets:
        assert secret[len(PREFIX) :].encode() not in raw
    with opened(home) as core:
        audit = json.dumps(
            [[e.actor, e.action, e.subject, e.details] for e in core.store.audit_events()]
        )
    assert PREFIX not in audit
    for secret in secrets:
        assert secret[len(PREFIX) :] not in audit


def read_credentials(out: Path) -> list[dict[str, str]]:
    """The rows of a ``provision --out`` file, checking its header."""
    with out.open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == OUT_HEADER
        return [dict(zip(OUT_HEADER, row, strict=True)) for row in reader]


def provision(home: Path, tmp_path: Path, content: str, *args: str) -> tuple[Result, Path]:
    """Write ``content`` as the --csv file and run ``device provision`` to a new --out."""
    source = tmp_path / f"{unique('ids')}.csv"
    source.write_text(content)
    out = tmp_path / f"{unique('credentials')}.csv"
    return cli(home, "provision", "--csv", str(source), "--out", str(out), *args), out


def check_provisioned(
    home: Path, out: Path, ids: list[str], expires_at: str
) -> list[dict[str, str]]:
    """The --out file holds one row per id (in order, distinct secrets, mode 0600) and the
    database exactly the digests of those secrets."""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rows = read_credentials(out)
    assert [r["device_id"] for r in rows] == ids
    secrets = [r["secret"] for r in rows]
    assert all(s.startswith(PREFIX) and len(s) >= len(PREFIX) + 43 for s in secrets)
    assert len(set(secrets)) == len(ids)
    assert {r["expires_at"] for r in rows} == {expires_at}
    stored = dict(
        sqlite_query(
            home,
            "SELECT device_id, secret_sha256 FROM device_credentials WHERE device_id IN "
            "(SELECT value FROM json_each(?))",
            (json.dumps(ids),),
        )
    )
    assert stored == {r["device_id"]: token_digest(r["secret"]) for r in rows}
    statuses = sqlite_query(
        home,
        "SELECT status, count(*) FROM devices WHERE id IN (SELECT value FROM json_each(?)) "
        "GROUP BY status",
        (json.dumps(ids),),
    )
    assert statuses == [("provisioned", len(ids))]
    return rows


# -- 1. enroll-token -------------------------------------------------------------------------


def test_enroll_token_secret_enrols_once_and_only_its_digest_is_stored(
    service: RunningService,
) -> None:
    """Text and --json output; each secret enrols once (Bearer, then Basic); the database
    holds token_digest(secret) and neither it nor the audit log holds the secret."""
    home = service.home
    device_id = unique("tok")
    mark = last_event_id(home)

    proc = hsmca(home, "device", "enroll-token", "--device-id", device_id)  # the real script
    assert proc.returncode == 0, proc.stderr
    text_secret = proc.stdout.strip()
    assert proc.stdout == text_secret + "\n"  # the secret alone
    assert text_secret.startswith(PREFIX) and len(text_secret) >= len(PREFIX) + 43

    before = dt.datetime.now(dt.UTC)
    created = cli_json(home, "enroll-token", "--device-id", device_id, "--ttl", "2h")
    assert set(created) == {"device_id", "secret", "expires_at"}
    assert created["device_id"] == device_id
    json_secret = created["secret"]
    assert json_secret.startswith(PREFIX) and json_secret != text_secret
    expires = parse_iso(created["expires_at"])
    assert abs(expires - (before + dt.timedelta(hours=2))) < dt.timedelta(minutes=1)

    assert credentials_of(home, device_id) == [
        (token_digest(text_secret), None),
        (token_digest(json_secret), None),
    ]
    made = [
        e
        for e in events_since(home, mark)
        if e.action == "device.credential.create" and e.subject == device_id
    ]
    assert len(made) == 2
    assert all(e.details["count"] == 1 and e.details["devices"] == [device_id] for e in made)
    assert made[1].details["expires_at"] == created["expires_at"]

    # a lifetime out of bounds stores nothing
    total = credential_total(home)
    assert_usage_error(cli(home, "enroll-token", "--device-id", device_id, "--ttl", "400d"), "366d")
    assert credential_total(home) == total

    first = enrol(service, text_secret, device_csr(device_id)[0])
    assert first.status_code == 201, first.text
    assert_problem(enrol(service, text_secret, device_csr(device_id)[0]), 401, "already used")
    # enrolling with one credential retired the device's other one
    spare = enrol(service, json_secret, device_csr(device_id)[0], basic=device_id)
    assert_problem(spare, 401, "expired")
    assert [used is not None for _, used in credentials_of(home, device_id)] == [True, False]
    # a credential made after the enrolment works once (a device that lost its key)
    later = cli_json(home, "enroll-token", "--device-id", device_id)["secret"]
    second = enrol(service, later, device_csr(device_id)[0], basic=device_id)
    assert second.status_code == 201, second.text
    again = enrol(service, later, device_csr(device_id)[0], basic=device_id)
    assert_problem(again, 401, "already used")
    assert_secrets_absent(home, [text_secret, json_secret, later])


# -- 2. provision ----------------------------------------------------------------------------


def test_provision_2000_devices_from_a_csv_with_a_header(fresh_home: Path, tmp_path: Path) -> None:
    """A CSV whose device_id column is not the first, with a comment and blank lines:
    2000 credentials in one file, one audited batch, only digests stored."""
    tag = uuid.uuid4().hex[:8]
    ids = [f"hdr-{tag}-{i:05d}" for i in range(2000)]
    lines = ["model,device_id,batch", "# batch 7 from the factory", ""]
    lines += [f"m{i % 3},{d},7" + ("\n" if i % 500 == 0 else "") for i, d in enumerate(ids)]
    mark = last_event_id(fresh_home)

    result, out = provision(fresh_home, tmp_path, "\n".join(lines) + "\n", "--ttl", "7d")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        rf"2000 credentials written to {re.escape(str(out))} in [0-9.]+ s \(mode 0600\)\n",
        result.stdout,
    ), result.stdout
    assert "provisioning" in result.stderr  # the progress bar is on stderr
    rows = read_credentials(out)
    check_provisioned(fresh_home, out, ids, rows[0]["expires_at"])
    expires = parse_iso(rows[0]["expires_at"])
    assert abs(expires - (dt.datetime.now(dt.UTC) + dt.timedelta(days=7))) < dt.timedelta(minutes=1)
    assert credential_total(fresh_home) == 2000

    batches = [e for e in events_since(fresh_home, mark) if e.action == "device.credential.create"]
    assert len(batches) == 1
    assert batches[0].details == {
        "count": 2000,
        "devices": ids,
        "expires_at": rows[0]["expires_at"],
    }
    assert batches[0].subject is None
    sample = [rows[i]["secret"] for i in (0, 999, 1999)]
    assert_secrets_absent(fresh_home, sample)


def test_provision_2000_devices_from_one_id_per_line_and_enrol_some(
    service: RunningService, tmp_path: Path
) -> None:
    """A plain file (comments, blank lines, surrounding spaces): --json summary, the file,
    the digests, and credentials taken from the file enrol over REST exactly once."""
    home = service.home
    tag = uuid.uuid4().hex[:8]
    ids = [f"pl-{tag}-{i:05d}" for i in range(2000)]
    content = "# one id per line\n\n" + "".join(
        f"  {d}  \n" if i % 7 == 0 else f"{d}\n" + ("\n# ---\n" if i % 400 == 0 else "")
        for i, d in enumerate(ids)
    )
    total = credential_total(home)

    result, out = provision(home, tmp_path, content, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary) == {"count", "out", "expires_at", "seconds"}
    assert summary["count"] == 2000 and summary["out"] == str(out)
    assert isinstance(summary["seconds"], float | int) and 0 <= summary["seconds"] < 60
    rows = check_provisioned(home, out, ids, summary["expires_at"])
    assert abs(
        parse_iso(summary["expires_at"]) - dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)
    ) < (dt.timedelta(minutes=1))  # devices.credential_ttl
    assert credential_total(home) == total + 2000

    picked = [rows[0], rows[1000], rows[1999]]
    first = enrol(service, picked[0]["secret"], device_csr(picked[0]["device_id"])[0])
    second = enrol(
        service,
        picked[1]["secret"],
        device_csr(picked[1]["device_id"])[0],
        basic=picked[1]["device_id"],
    )
    third = enrol(
        service,
        picked[2]["secret"],
        device_csr(picked[2]["device_id"])[0],
        device_id=picked[2]["device_id"],
    )
    for row, resp in zip(picked, (first, second, third), strict=True):
        assert resp.status_code == 201, resp.text
        assert resp.json()["device_id"] == row["device_id"]
        assert f"uri:urn:dev:serial:{row['device_id']}" in resp.json()["sans"]
    reuse = enrol(service, picked[0]["secret"], device_csr(picked[0]["device_id"])[0])
    assert_problem(reuse, 401, "already used")
    # a secret from the file is bound to its own device
    wrong = enrol(service, rows[5]["secret"], device_csr(rows[6]["device_id"])[0])
    assert_problem(wrong, 403, rows[6]["device_id"])
    assert_secrets_absent(home, [r["secret"] for r in picked])


def _bad_input(p: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Input file content and the words the error must name, by case."""
    return {
        "repeated-id": (f"{p}-a\n{p}-b\n{p}-a\n", ("device 3", f"'{p}-a'", "repeated")),
        "id-with-space": (f"device_id\n{p}-a\n{p} b\n", ("device 2", f"'{p} b'", "invalid")),
        "id-with-slash": (f"{p}-a\n{p}/b\n", ("device 2", f"'{p}/b'", "invalid")),
        "id-too-long": (f"{p}-{'x' * 64}\n", ("device 1", "1-64 characters")),
        "empty-file": ("", ("no device ids",)),
        "only-comments": ("# nothing yet\n\n", ("no device ids",)),
        "header-only": ("device_id\n", ("no device ids below the header",)),
        "no-device-id-column": (f"serial,model\n{p}-a,x\n", ("several columns", "device_id")),
    }


@pytest.mark.parametrize("case", sorted(_bad_input("p")))
def test_provision_bad_input_is_a_usage_error_and_stores_nothing(
    ca_home: Path, tmp_path: Path, case: str
) -> None:
    p = unique("bad")
    content, mentions = _bad_input(p)[case]
    total = credential_total(ca_home)
    result, out = provision(ca_home, tmp_path, content)
    assert_usage_error(result, *mentions)
    assert credential_total(ca_home) == total
    assert devices_like(ca_home, p) == 0
    assert not out.exists()


def test_provision_refuses_an_existing_out_file_and_a_revoked_device(
    ca_home: Path, tmp_path: Path
) -> None:
    p = unique("refuse")
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"{p}-a\n{p}-b\n")
    out = tmp_path / "existing.csv"
    out.write_text("device_id,secret,expires_at\nold,hsmcad_keep,never\n")
    out.chmod(0o600)
    total = credential_total(ca_home)
    result = cli(ca_home, "provision", "--csv", str(ids_file), "--out", str(out))
    assert_usage_error(result, "--out", str(out), "exists")
    assert out.read_text() == "device_id,secret,expires_at\nold,hsmcad_keep,never\n"
    assert credential_total(ca_home) == total and devices_like(ca_home, p) == 0

    revoked = f"{p}-gone"
    with opened(ca_home) as core:
        core.create_enrollment_credential(revoked, None, operator("device-tests"))
        core.revoke_device(revoked, None, operator("device-tests"))
    total = credential_total(ca_home)
    result, fresh_out = provision(ca_home, tmp_path, f"{p}-a\n{revoked}\n{p}-b\n")
    assert_usage_error(result, "revoked", revoked)
    assert credential_total(ca_home) == total
    assert devices_like(ca_home, p) == 1  # only the revoked one, from the setup
    assert not fresh_out.exists()


def test_provision_names_the_file_line_of_a_row_without_device_id(
    ca_home: Path, tmp_path: Path
) -> None:
    # the message names the line of the file (comments and blank lines count)
    p = unique("line")
    content = f"# batch 9\ndevice_id,model\n\n{p}-a,m1\n,m2\n"
    total = credential_total(ca_home)
    result, out = provision(ca_home, tmp_path, content)
    err = assert_usage_error(result, "has no device_id")
    assert "row 5" in err or "line 5" in err, err
    assert credential_total(ca_home) == total and not out.exists()


# -- 3. list / show / revoke on the command line -----------------------------------------------


def _listed(home: Path, device_id: str, status: str) -> bool:
    listing = cli_json(home, "list", "--status", status)
    assert all(d["status"] == status for d in listing)
    return device_id in {d["device_id"] for d in listing}


def test_cli_list_show_revoke_follow_a_device_through_its_life(service: RunningService) -> None:
    """provisioned → enrolled (credential, then an API re-enrolment) → revoked, with every
    certificate revoked; a revoked device gets no new credential."""
    home = service.home
    admin = sess(service, service.admin_token)
    device_id = unique("life")
    secret = cli_json(home, "enroll-token", "--device-id", device_id)["secret"]

    shown = cli_json(home, "show", device_id)
    assert shown["status"] == "provisioned" and "certificates" not in shown
    assert shown["enrolled_at"] is None and shown["current_serial"] is None
    assert shown["revoked_at"] is None and shown["enrolled_via"] is None
    assert _listed(home, device_id, "provisioned")
    assert not _listed(home, device_id, "enrolled")
    text_show = cli(home, "show", device_id)
    assert text_show.exit_code == 0, text_show.output
    assert f"device_id: {device_id}\nstatus: provisioned\n" in text_show.stdout
    assert "enrolled_at: -" in text_show.stdout

    first = enrol(service, secret, device_csr(device_id)[0])
    assert first.status_code == 201, first.text
    csr, _ = device_csr(device_id)
    resp = admin.post(
        f"{service.base}{API}/certificates",
        json={"csr": csr.decode(), "profile": "device", "device_id": device_id},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 201, resp.text
    serials = [first.json()["serial"], resp.json()["serial"]]

    shown = cli_json(home, "show", device_id)
    assert shown["status"] == "enrolled" and shown["enrolled_via"] == "credential"
    assert shown["current_serial"] == serials[1]
    assert shown["enrolled_at"] is not None and shown["last_reenrolled_at"] is not None
    assert parse_iso(shown["last_reenrolled_at"]) >= parse_iso(shown["enrolled_at"])
    assert [(c["serial"], c["status"]) for c in shown["certificates"]] == [
        (s, "good") for s in serials
    ]
    assert _listed(home, device_id, "enrolled")
    assert not _listed(home, device_id, "provisioned")
    text_list = cli(home, "list", "--status", "enrolled")
    assert text_list.exit_code == 0, text_list.output
    line = next(x for x in text_list.stdout.splitlines() if x.split()[0] == device_id)
    assert "enrolled" in line.split() and line.endswith(serials[1])

    mark = last_event_id(home)
    revoked = cli(home, "revoke", device_id)
    assert revoked.exit_code == 0, revoked.output
    assert "status: revoked" in revoked.stdout
    for serial in serials:
        assert f"  {serial} revoked " in revoked.stdout

    shown = cli_json(home, "show", device_id)
    assert shown["status"] == "revoked" and shown["revoked_at"] is not None
    assert {c["status"] for c in shown["certificates"]} == {"revoked"}
    assert {c["revocation_reason"] for c in shown["certificates"]} == {"cessationOfOperation"}
    for serial in serials:
        record = admin.get(f"{service.base}{API}/certificates/{serial}", timeout=TIMEOUT)
        assert record.json()["status"] == "revoked", record.text
    events = events_since(home, mark)
    assert [
        (e.action, e.subject, e.details["reason"]) for e in events if e.action == "device.revoke"
    ] == [("device.revoke", device_id, "cessationOfOperation")]
    revocations = [e.subject for e in events if e.action == "certificate.revoke"]
    assert sorted(s for s in revocations if s in serials) == sorted(serials)
    assert _listed(home, device_id, "revoked")
    assert not _listed(home, device_id, "enrolled")

    total = credential_total(home)
    assert_usage_error(cli(home, "enroll-token", "--device-id", device_id), "revoked", device_id)
    assert credential_total(home) == total


def test_revoking_a_revoked_device_again_changes_nothing(ca_home: Path) -> None:
    # a second revoke is harmless and keeps the time of the first
    device_id = unique("twice")
    with opened(ca_home) as core:
        made = core.create_enrollment_credential(device_id, None, operator("device-tests"))
        auth = core.authenticate_device_secret(made.secret, device_id)
        core.enroll_device(device_csr(device_id)[0], auth)
    first = cli_json(ca_home, "revoke", device_id)
    assert first["status"] == "revoked"
    assert [c["status"] for c in first["certificates"]] == ["revoked"]
    mark = last_event_id(ca_home)

    again = cli(ca_home, "revoke", device_id, "--json")
    assert again.exit_code == 0, again.output  # harmless: accepted ...
    after = cli_json(ca_home, "show", device_id)
    assert after["certificates"] == first["certificates"]  # ... no certificate touched
    serials = {c["serial"] for c in first["certificates"]}
    assert not [
        e
        for e in events_since(ca_home, mark)
        if e.action == "certificate.revoke" and e.subject in serials
    ]
    assert after["revoked_at"] == first["revoked_at"], (first["revoked_at"], after["revoked_at"])
    assert after == first


def test_enroll_token_refuses_a_device_id_with_a_trailing_newline(fresh_home: Path) -> None:
    # `$` would also match before a final newline: such an id could never enrol
    device_id = unique("nl") + "\n"
    result = cli(fresh_home, "enroll-token", "--device-id", device_id)
    assert_usage_error(result, "invalid device id")
    assert credential_total(fresh_home) == 0
    assert devices_like(fresh_home, device_id.strip()) == 0


# -- 4. REST enrolment and the inventory routes ------------------------------------------------


def test_rest_enrolment_returns_the_record_and_mtls_renewal_is_a_reenrolment(
    service: RunningService, tmp_path: Path
) -> None:
    home = service.home
    admin = sess(service, service.admin_token)
    device_id = unique("rest")
    secret = new_credential(home, device_id)
    csr, key = device_csr(device_id)
    mark = last_event_id(home)

    resp = enrol(service, secret, csr, device_id=device_id)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert resp.headers["Location"] == f"{API}/certificates/{body['serial']}"
    assert body["device_id"] == device_id and body["profile"] == "device"
    assert body["status"] == "good" and body["requester"] == f"device:{device_id}"
    assert body["sans"] == [f"uri:urn:dev:serial:{device_id}"]
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == device_id
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:dev:serial:{device_id}"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    issuing = x509.load_pem_x509_certificates(body["chain"].encode())[0]
    cert.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(x509.load_pem_x509_certificate(service.root.read_bytes()))
    assert cert.public_key() == key.public_key()

    located = admin.get(f"{service.base}{resp.headers['Location']}", timeout=TIMEOUT)
    assert located.status_code == 200 and located.json()["serial"] == body["serial"]
    ok = [e for e in events_since(home, mark) if e.action == "device.enroll" and e.outcome == "ok"]
    assert [(e.subject, e.actor, e.details["via"]) for e in ok] == [
        (body["serial"], f"device:{device_id}", "credential")
    ]

    shown = admin.get(f"{service.base}{DEVICES}/{device_id}", timeout=TIMEOUT).json()
    assert shown["status"] == "enrolled" and shown["enrolled_via"] == "credential"
    assert shown["current_serial"] == body["serial"] and shown["last_reenrolled_at"] is None
    assert [c["serial"] for c in shown["certificates"]] == [body["serial"]]
    assert "certificate" not in shown["certificates"][0]

    identity = write_identity(tmp_path, body, key, "device")
    renewed = sess(service).post(
        f"{service.base}{API}/certificates/renew", cert=identity, timeout=TIMEOUT
    )
    assert renewed.status_code == 201, renewed.text
    assert renewed.json()["profile"] == "device" and renewed.json()["sans"] == body["sans"]
    after = admin.get(f"{service.base}{DEVICES}/{device_id}", timeout=TIMEOUT).json()
    assert after["status"] == "enrolled" and after["enrolled_via"] == "credential"
    assert after["enrolled_at"] == shown["enrolled_at"]
    assert after["last_reenrolled_at"] is not None
    assert parse_iso(after["last_reenrolled_at"]) >= parse_iso(after["enrolled_at"])
    assert after["current_serial"] == renewed.json()["serial"]
    assert [c["serial"] for c in after["certificates"]] == [
        body["serial"],
        renewed.json()["serial"],
    ]


def test_rest_enrolment_refusals_issue_nothing_and_keep_the_credential(
    service: RunningService,
) -> None:
    """401 without a good credential, 403 for another device, 400 for bad bodies; none of
    them issues or uses the credential, which then enrols once (Basic, id with colons)."""
    home = service.home
    device_id = f"mac:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:8]}"
    other = unique("other")
    secret = new_credential(home, device_id)
    csr, _ = device_csr(device_id)
    count, mark = certificate_count(home), last_event_id(home)
    url = f"{service.base}{ENROL}"

    assert_problem(
        sess(service).post(url, json={"csr": csr.decode()}, timeout=TIMEOUT),
        401,
        "enroll-token",
    )
    assert_problem(enrol(service, PREFIX + "x" * 43, csr), 401, "unknown enrolment credential")
    assert_problem(enrol(service, secret, csr, basic=other), 401, f"not for device '{other}'")
    assert_problem(
        sess(service).post(
            url, json={"csr": csr.decode()}, headers={"Authorization": f"Token {secret}"}
        ),
        401,
        "unsupported Authorization scheme",
    )
    assert_problem(enrol(service, secret, csr, device_id=other), 403, other)
    unknown = assert_problem(enrol(service, secret, csr, extra={"profile": "mtls"}), 400, "profile")
    assert unknown["type"].endswith("unknown-field")
    assert_problem(enrol(service, secret, device_csr(other)[0]), 403, other)
    assert_problem(enrol(service, secret, build_csr(cn=other, sans=())[0]), 403, other)
    extra_name = build_csr(cn=None, sans=("evil.svc.test",), serial_number=device_id)[0]
    assert_problem(enrol(service, secret, extra_name), 403, "evil.svc.test")
    assert_problem(enrol(service, secret, b"not a CSR"), 400)

    assert certificate_count(home) == count
    assert credentials_of(home, device_id) == [(token_digest(secret), None)]
    refused = [
        e
        for e in events_since(home, mark)
        if e.action == "device.enroll" and e.outcome == "refused"
    ]
    assert len(refused) >= 8, refused
    assert other in {e.subject for e in refused}

    ok = enrol(service, secret, csr, basic=device_id, device_id=device_id)
    assert ok.status_code == 201, ok.text
    assert ok.json()["device_id"] == device_id
    assert certificate_count(home) == count + 1
    assert_problem(enrol(service, secret, device_csr(device_id)[0]), 401, "already used")
    assert certificate_count(home) == count + 1


def test_inventory_routes_role_matrix_show_and_revoke(
    service: RunningService, tmp_path: Path
) -> None:
    home = service.home
    base = service.base
    auditor, _ = new_token(home, "auditor")
    issuer, _ = new_token(home, "issuer")
    admin = sess(service, service.admin_token)
    sessions = {
        "admin": admin,
        "auditor": sess(service, auditor),
        "issuer": sess(service, issuer),
        "anonymous": sess(service),
    }
    device_id = unique("roles")
    record, key = enrolled(service, device_id)
    identity = write_identity(tmp_path, record, key, "roles")

    expected = {"admin": 200, "auditor": 200, "issuer": 403, "anonymous": 401}
    for who, status in expected.items():
        listing = sessions[who].get(f"{base}{DEVICES}", params={"limit": "3"}, timeout=TIMEOUT)
        shown = sessions[who].get(f"{base}{DEVICES}/{device_id}", timeout=TIMEOUT)
        if status == 200:
            assert listing.status_code == 200, (who, listing.text)
            assert set(listing.json()) == {"items", "next_cursor"}
            assert len(listing.json()["items"]) <= 3
            assert shown.status_code == 200, (who, shown.text)
            assert shown.json()["device_id"] == device_id
            assert [c["serial"] for c in shown.json()["certificates"]] == [record["serial"]]
        else:
            assert_problem(listing, status)
            assert_problem(shown, status)
    assert_problem(
        admin.get(f"{base}{DEVICES}/{unique('nobody')}", timeout=TIMEOUT), 404, "no device"
    )

    revoke_url = f"{base}{DEVICES}/{device_id}/revoke"
    for who, status in (("auditor", 403), ("issuer", 403), ("anonymous", 401)):
        assert_problem(sessions[who].post(revoke_url, json={}, timeout=TIMEOUT), status)
    assert_problem(admin.post(revoke_url, json={"why": "x"}, timeout=TIMEOUT), 400, "why")
    assert_problem(admin.post(revoke_url, json={"reason": "tired"}, timeout=TIMEOUT), 400, "tired")
    missing = f"{base}{DEVICES}/{unique('nobody')}/revoke"
    assert_problem(admin.post(missing, timeout=TIMEOUT), 404)
    still = admin.get(f"{base}{DEVICES}/{device_id}", timeout=TIMEOUT).json()
    assert still["status"] == "enrolled" and still["certificates"][0]["status"] == "good"

    # a credential made before the revocation dies with it
    leftover = new_credential(home, device_id)
    done = admin.post(revoke_url, json={"reason": "keyCompromise"}, timeout=TIMEOUT)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "revoked" and done.json()["revoked_at"] is not None
    assert [(c["status"], c["revocation_reason"]) for c in done.json()["certificates"]] == [
        ("revoked", "keyCompromise")
    ]
    cert = admin.get(f"{base}{API}/certificates/{record['serial']}", timeout=TIMEOUT).json()
    assert (cert["status"], cert["revocation_reason"]) == ("revoked", "keyCompromise")
    count = certificate_count(home)
    assert_problem(enrol(service, leftover, device_csr(device_id)[0]), 401, "expired")
    renewal = sess(service).post(f"{base}{API}/certificates/renew", cert=identity, timeout=TIMEOUT)
    assert_problem(renewal, 401, "revoked")
    with opened(home) as core, pytest.raises(InvalidInput, match="revoked"):
        core.create_enrollment_credential(device_id, None, operator("device-tests"))
    assert certificate_count(home) == count


def test_inventory_pagination_status_filter_and_query_checks(service: RunningService) -> None:
    """limit=2 pages joined with next_cursor are the listing in id order; the status
    filter; unknown parameters and bad values are 400 problems."""
    admin = sess(service, service.admin_token)
    url = f"{service.base}{DEVICES}"
    tag = uuid.uuid4().hex[:8]
    ids = [f"0pg{tag}-{i}" for i in range(5)]  # digits first: they sort before other tests'
    with opened(service.home) as core:
        actor = operator("device-tests")
        creds = [c for chunk in core.provision_devices(ids, None, actor) for c in chunk]
        for cred in creds[:2]:
            auth = core.authenticate_device_secret(cred.secret, cred.device_id)
            core.enroll_device(device_csr(cred.device_id)[0], auth)
        core.revoke_device(ids[0], None, actor)
    expected = dict.fromkeys(ids, "provisioned") | {ids[0]: "revoked", ids[1]: "enrolled"}

    seen: list[str] = []
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    for _ in range(500):
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        resp = admin.get(url, params=params, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert 1 <= len(page["items"]) <= 2, page
        pages.append(page["items"])
        seen += [d["device_id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if len(page["items"]) < 2:
            assert cursor is None
        if cursor is None or set(ids) <= set(seen):
            break
    assert set(ids) <= set(seen), seen
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert len(pages) >= 3
    whole = admin.get(url, params={"limit": str(len(seen))}, timeout=TIMEOUT).json()["items"]
    assert whole == [d for page in pages for d in page]
    by_id = {d["device_id"]: d for d in whole}
    assert {i: by_id[i]["status"] for i in ids} == expected
    assert by_id[ids[1]]["enrolled_via"] == "credential" and by_id[ids[1]]["current_serial"]
    assert by_id[ids[0]]["revoked_at"] is not None and by_id[ids[2]]["enrolled_at"] is None
    assert "certificates" not in by_id[ids[1]]

    for status in ("provisioned", "enrolled", "revoked"):
        resp = admin.get(url, params={"status": status, "limit": "1000"}, timeout=TIMEOUT)
        items = resp.json()["items"]
        assert {d["status"] for d in items} == {status}
        assert {d["device_id"] for d in items} & set(ids) == {
            i for i, s in expected.items() if s == status
        }
    limited = admin.get(url, params={"status": "provisioned", "limit": "1"}, timeout=TIMEOUT)
    assert len(limited.json()["items"]) == 1 and limited.json()["next_cursor"]

    for params, mention in (
        ({"bogus": "1"}, "bogus"),
        ({"status": "lost"}, "lost"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "two"}, "limit"),
        ({"cursor": "zz"}, "cursor"),
    ):
        assert_problem(admin.get(url, params=params, timeout=TIMEOUT), 400, mention)


# -- 5. /api/v1/certificates with the device profile -------------------------------------------


def test_api_issued_device_certificates_join_the_inventory_until_revoked(
    service: RunningService,
) -> None:
    home = service.home
    admin = sess(service, service.admin_token)
    issue_url = f"{service.base}{API}/certificates"
    device_id = unique("api")

    def issue(device_field: str | None, serial_number: str | None = None) -> requests.Response:
        csr, _ = build_csr(cn=None, sans=(), serial_number=serial_number)
        body = {"csr": csr.decode(), "profile": "device"}
        if device_field is not None:
            body["device_id"] = device_field
        return admin.post(issue_url, json=body, timeout=TIMEOUT)

    first = issue(device_id)
    assert first.status_code == 201, first.text
    assert f"uri:urn:dev:serial:{device_id}" in first.json()["sans"]
    shown = admin.get(f"{service.base}{DEVICES}/{device_id}", timeout=TIMEOUT).json()
    assert shown["status"] == "enrolled" and shown["enrolled_via"] == "api"
    assert shown["current_serial"] == first.json()["serial"]
    assert shown["enrolled_at"] is not None and shown["last_reenrolled_at"] is None
    assert credentials_of(home, device_id) == []  # no credential was involved

    second = issue(None, serial_number=device_id)  # the id from the CSR's serialNumber
    assert second.status_code == 201, second.text
    shown = admin.get(f"{service.base}{DEVICES}/{device_id}", timeout=TIMEOUT).json()
    assert shown["enrolled_via"] == "api" and shown["last_reenrolled_at"] is not None
    assert shown["current_serial"] == second.json()["serial"]
    assert len(shown["certificates"]) == 2

    revoked = admin.post(f"{service.base}{DEVICES}/{device_id}/revoke", timeout=TIMEOUT)
    assert revoked.status_code == 200, revoked.text
    assert {c["status"] for c in revoked.json()["certificates"]} == {"revoked"}
    count, mark = certificate_count(home), last_event_id(home)
    assert_problem(issue(device_id), 403, "revoked")
    assert_problem(issue(None, serial_number=device_id), 403, "revoked")
    assert certificate_count(home) == count
    refused = [
        e
        for e in events_since(home, mark)
        if e.action == "certificate.issue" and e.outcome == "refused" and e.subject == device_id
    ]
    assert len(refused) == 2
    after = admin.get(f"{service.base}{DEVICES}/{device_id}", timeout=TIMEOUT).json()
    assert after == revoked.json()


# -- 6. the device store on PostgreSQL ---------------------------------------------------------


@pytest.mark.postgres
def test_device_store_on_postgresql(pg_home: Path) -> None:
    actor = operator("pg-tests")
    with opened(pg_home) as core:
        assert core.store.engine.dialect.name == "postgresql"

        def credential_rows() -> int:
            with core.store.engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM device_credentials")).scalar())

        ids = sorted(unique("pg") for _ in range(3))
        chunks = list(core.provision_devices(ids, dt.timedelta(hours=1), actor))
        creds = [c for chunk in chunks for c in chunk]
        assert [c.device_id for c in creds] == ids and credential_rows() == 3
        for cred in creds:
            stored = core.store.devices.credential(token_digest(cred.secret))
            assert stored is not None and stored.device_id == cred.device_id
            assert stored.used_at is None and stored.secret_sha256 == token_digest(cred.secret)
        with core.store.engine.connect() as conn:
            values = conn.execute(text("SELECT * FROM device_credentials")).fetchall()
        assert PREFIX not in repr(values)

        with pytest.raises(Unauthorised, match="not for device"):
            core.authenticate_device_secret(creds[1].secret, ids[2])
        auth = core.authenticate_device_secret(creds[0].secret, ids[0])
        assert (auth.device_id, auth.method) == (ids[0], "credential")
        record = core.enroll_device(device_csr(ids[0])[0], auth)
        assert record.profile == "device" and f"uri:urn:dev:serial:{ids[0]}" in record.sans
        count = core.store.count_certificates()
        with pytest.raises(Unauthorised, match="already used"):
            core.authenticate_device_secret(creds[0].secret, ids[0])
        with pytest.raises(Unauthorised, match="already used"):  # nor replayed once checked
            core.enroll_device(device_csr(ids[0])[0], auth)
        assert core.store.count_certificates() == count

        first, cursor = core.list_devices(actor, None, 2, None)
        assert [d.device_id for d in first] == ids[:2] and cursor is not None
        rest, end = core.list_devices(actor, None, 2, cursor)
        assert [d.device_id for d in rest] == ids[2:] and end is None
        enrolled_only, _ = core.list_devices(actor, "enrolled", 10, None)
        assert [d.device_id for d in enrolled_only] == [ids[0]]
        shown = core.show_device(ids[0], actor)
        assert shown.status == "enrolled" and shown.enrolled_via == "credential"
        assert [c.serial for c in shown.certificates] == [record.serial]

        gone = core.revoke_device(ids[0], None, actor)
        assert gone.status == "revoked" and gone.revoked_at is not None
        assert [(c.status, c.revocation_reason) for c in gone.certificates] == [
            ("revoked", "cessationOfOperation")
        ]
        core.revoke_device(ids[1], "keyCompromise", actor)  # provisioned: its credential dies
        with pytest.raises(Unauthorised, match="expired"):
            core.authenticate_device_secret(creds[1].secret, ids[1])
        with pytest.raises(InvalidInput, match="revoked"):
            list(core.provision_devices([ids[2], ids[0]], None, actor))
        assert credential_rows() == 3
        with pytest.raises(Forbidden, match="revoked"):
            core.issue(IssueRequest(device_csr(ids[0])[0], "device", None, ids[0]), actor)
        assert core.store.count_certificates() == count
        assert [d.status for d in core.list_devices(actor, None, 10, None)[0]] == [
            "revoked",
            "revoked",
            "provisioned",
        ]


# -- 7. one credential, eight concurrent requests ----------------------------------------------


def test_one_credential_used_by_eight_concurrent_requests_enrols_once(
    service: RunningService,
) -> None:
    device_id = unique("race")
    secret = new_credential(service.home, device_id)
    csrs = [device_csr(device_id)[0] for _ in range(8)]
    barrier = threading.Barrier(len(csrs))

    def attempt(csr: bytes) -> requests.Response:
        session = sess(service)
        # open the TLS connection first so that the POSTs leave together
        assert session.get(f"{service.base}/healthz", timeout=TIMEOUT).status_code == 200
        barrier.wait(timeout=30)
        return enrol(service, secret, csr, session=session)

    with ThreadPoolExecutor(max_workers=len(csrs)) as pool:
        responses = list(pool.map(attempt, csrs, timeout=120))

    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [401] * 7, [(r.status_code, r.text[:200]) for r in responses]
    for resp in responses:
        if resp.status_code == 401:
            assert_problem(resp, 401)
    winner = next(r.json() for r in responses if r.status_code == 201)
    rows = sqlite_query(
        service.home, "SELECT serial, status FROM certificates WHERE device_id = ?", (device_id,)
    )
    assert rows == [(winner["serial"], "good")]
    assert [used is not None for _, used in credentials_of(service.home, device_id)] == [True]
    with opened(service.home) as core:
        shown = core.show_device(device_id, operator("device-tests"))
    assert shown.current_serial == winner["serial"] and shown.last_reenrolled_at is None
