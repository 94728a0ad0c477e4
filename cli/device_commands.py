"""``hsmca device enroll-token|provision|list|show|revoke``."""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path

import click

from cli.main import Ctx, emit, fail_cleanly, main, pass_home
from pki.actors import operator
from pki.durations import parse_duration
from pki.errors import HsmcaError, InvalidInput
from pki.records import iso


@main.group()
def device() -> None:
    """IoT devices: one-time enrolment credentials and the device inventory."""


@device.command("enroll-token")
@click.option("--device-id", "device_id", required=True, help="The device the credential is for.")
@click.option("--ttl", help="Credential lifetime, e.g. 24h (default: devices.credential_ttl).")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def enroll_token(obj: Ctx, device_id: str, ttl: str | None, as_json: bool) -> None:
    """Print a one-time enrolment secret bound to DEVICE_ID (only its hash is stored).

    EST takes it as HTTP Basic DEVICE_ID:SECRET; POST /api/v1/devices/enroll as
    Authorization: Bearer SECRET."""
    created = obj.pki.create_enrollment_credential(
        device_id, parse_duration(ttl) if ttl else None, operator()
    )
    emit(created.to_dict(), as_json, created.secret)


@device.command("provision")
@click.option(
    "--csv",
    "csv_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Device ids: a CSV with a device_id column, or one id per line.",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write device_id,secret,expires_at (created with mode 0600).",
)
@click.option("--ttl", help="Credential lifetime, e.g. 7d (default: devices.credential_ttl).")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def provision(obj: Ctx, csv_path: str, out_path: str, ttl: str | None, as_json: bool) -> None:
    """Create one-time enrolment credentials for every device in a CSV, in bulk.

    Every id is checked before anything is stored; the secrets are written only to --out."""
    out = Path(out_path)
    if out.exists():
        raise click.UsageError(
            f"--out: {out} exists; secrets are never overwritten, choose a new file"
        )
    if not out.absolute().parent.is_dir():
        raise click.UsageError(f"--out: directory {out.absolute().parent} does not exist")
    ids = read_device_ids(Path(csv_path))
    started = time.perf_counter()
    chunks = obj.pki.provision_devices(ids, parse_duration(ttl) if ttl else None, operator())
    written, expires = 0, None
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["device_id", "secret", "expires_at"])
        with click.progressbar(
            length=len(ids), label="provisioning", file=sys.stderr, show_pos=True
        ) as bar:
            try:
                for chunk in chunks:
                    for c in chunk:
                        writer.writerow([c.device_id, c.secret, iso(c.expires_at)])
                    handle.flush()
                    written += len(chunk)
                    expires = chunk[-1].expires_at
                    bar.update(len(chunk))
            except HsmcaError as exc:
                raise click.ClickException(
                    f"{exc}; the {written} credentials created before the failure are in "
                    f"{out}, the other {len(ids) - written} were not created"
                ) from None
    seconds = time.perf_counter() - started
    summary = {
        "count": written,
        "out": str(out),
        "expires_at": iso(expires),
        "seconds": round(seconds, 2),
    }
    emit(summary, as_json, f"{written} credentials written to {out} in {seconds:.1f} s (mode 0600)")


def read_device_ids(path: Path) -> list[str]:
    """The device ids of a CSV file with a ``device_id`` column, or of one id per line
    (blank lines and ``#`` comments skipped). InvalidInput if there are none."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, list[str]]] = []  # (line in the file, cells)
    try:
        for row in reader:
            if row and not row[0].lstrip().startswith("#") and any(c.strip() for c in row):
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise InvalidInput(f"{path}: line {reader.line_num}: not CSV ({exc})") from None
    if not rows:
        raise InvalidInput(
            f"{path}: no device ids (expected a device_id column or one id per line)"
        )
    header = [cell.strip().lower() for cell in rows[0][1]]
    if "device_id" in header:
        column, body = header.index("device_id"), rows[1:]
    elif len(header) == 1:
        column, body = 0, rows
    else:
        raise InvalidInput(f"{path}: several columns but none is named device_id")
    ids: list[str] = []
    for line, row in body:
        if column >= len(row) or not row[column].strip():
            raise InvalidInput(f"{path}: line {line} has no device_id")
        ids.append(row[column].strip())
    if not ids:
        raise InvalidInput(f"{path}: no device ids below the header")
    return ids


@device.command("list")
@click.option("--status", type=click.Choice(["provisioned", "enrolled", "revoked"]))
@click.option("--limit", type=click.IntRange(1), help="At most this many devices.")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def device_list(obj: Ctx, status: str | None, limit: int | None, as_json: bool) -> None:
    """List devices in id order."""
    records: list[dict[str, object]] = []
    cursor = None
    while limit is None or len(records) < limit:
        page_size = 1000 if limit is None else min(1000, limit - len(records))
        page, cursor = obj.pki.list_devices(operator(), status, page_size, cursor)
        records += [r.to_dict() for r in page]
        if cursor is None:
            break
    if as_json:
        emit(records, True)
        return
    for r in records:
        click.echo(
            f"{r['device_id']:<32} {r['status']:<11} enrolled {r['enrolled_at'] or '-':<20} "
            f"last re-enrolled {r['last_reenrolled_at'] or '-':<20} {r['current_serial'] or '-'}"
        )


@device.command("show")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def device_show(obj: Ctx, device_id: str, as_json: bool) -> None:
    """Show a device and every certificate it was issued."""
    data = obj.pki.show_device(device_id, operator()).to_dict()
    emit(data, as_json, _describe(data))


@device.command("revoke")
@click.argument("device_id")
@click.option("--reason", default="cessationOfOperation", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def device_revoke(obj: Ctx, device_id: str, reason: str, as_json: bool) -> None:
    """Revoke a device: all its certificates are revoked and it can never enrol again."""
    data = obj.pki.revoke_device(device_id, reason, operator()).to_dict()
    emit(data, as_json, _describe(data))


def _describe(data: dict[str, object]) -> str:
    lines = [
        f"{key}: {value if value is not None else '-'}"
        for key, value in data.items()
        if key != "certificates"
    ]
    for cert in data.get("certificates") or []:  # type: ignore[attr-defined]
        lines.append(f"  {cert['serial']} {cert['status']:<8} until {cert['not_after']}")
    return "\n".join(lines)
