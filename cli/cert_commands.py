"""``hsmca issue|revoke|show|list``: certificates through the same core as the API."""

from __future__ import annotations

import os
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cli.main import Ctx, check_output_path, emit, fail_cleanly, main, pass_home
from pki.actors import operator
from pki.durations import parse_duration
from pki.policy import classify_names
from pki.records import CertificateRecord
from pki.signer import general_names
from pki.store import CertificateQuery


def _private_key_file(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)


def _csr_for(cn: str, sans: tuple[str, ...], key: ec.EllipticCurvePrivateKey) -> bytes:
    names = classify_names((cn, *sans))
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    builder = builder.add_extension(x509.SubjectAlternativeName(general_names(names)), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _text(record: CertificateRecord) -> str:
    lines = [
        f"serial:     {record.serial}",
        f"status:     {record.status}",
        f"subject:    {record.subject}",
        f"names:      {', '.join(record.sans)}",
        f"profile:    {record.profile}",
        f"issuer:     {record.issuer_id}",
        f"requester:  {record.requester}",
        f"not before: {record.not_before.isoformat()}",
        f"not after:  {record.not_after.isoformat()}",
    ]
    if record.revoked_at:
        lines.append(f"revoked:    {record.revoked_at.isoformat()} ({record.revocation_reason})")
    return "\n".join(lines)


@main.command()
@click.option(
    "--csr",
    "csr_file",
    type=click.Path(exists=True, dir_okay=False),
    help="PKCS#10 request (PEM or DER).",
)
@click.option("--cn", help="Common name, when hsmca should make the key (needs --key-out).")
@click.option("--san", "sans", multiple=True, help="Extra DNS name, IP or URI (repeatable).")
@click.option("--key-out", type=click.Path(dir_okay=False), help="Where to write the new key.")
@click.option("--profile", required=True, help="Certificate profile, e.g. mtls-server.")
@click.option("--ttl", help="Lifetime, e.g. 24h (default: the profile's).")
@click.option("--device-id", help="Device id (device profile; default: from the CSR).")
@click.option(
    "--cert-out",
    type=click.Path(dir_okay=False),
    help="Write certificate and chain here instead of stdout.",
)
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def issue(
    obj: Ctx,
    csr_file: str | None,
    cn: str | None,
    sans: tuple[str, ...],
    key_out: str | None,
    profile: str,
    ttl: str | None,
    device_id: str | None,
    cert_out: str | None,
    as_json: bool,
) -> None:
    """Issue a certificate from --csr, or for a new key (--cn, --san, --key-out)."""
    from pki.service import IssueRequest

    if bool(csr_file) == bool(cn):
        raise click.UsageError("give either --csr FILE or --cn NAME (with --key-out FILE)")
    # before issuing: a certificate whose key cannot be written is issued for nothing
    check_output_path("--key-out", key_out)
    check_output_path("--cert-out", cert_out)
    key = None
    if csr_file:
        if key_out or sans:
            raise click.UsageError("--key-out and --san go with --cn, not with --csr")
        csr = Path(csr_file).read_bytes()
    else:
        if not key_out:
            raise click.UsageError("--cn needs --key-out FILE for the new private key")
        key = ec.generate_private_key(ec.SECP256R1())
        csr = _csr_for(cn or "", sans, key)
    record = obj.pki.issue(
        IssueRequest(csr, profile, parse_duration(ttl) if ttl else None, device_id), operator()
    )
    if key is not None and key_out:
        _private_key_file(Path(key_out), key)
    pem = (record.certificate_pem or "") + record.chain_pem
    if cert_out:
        Path(cert_out).write_text(pem)
    if as_json:
        emit(record.to_dict(), True)
    elif cert_out:
        click.echo(f"issued {record.serial}, written to {cert_out}")
    else:
        click.echo(pem, nl=False)


@main.command()
@click.argument("serial")
@click.option("--reason", help="RFC 5280 reason, e.g. keyCompromise, superseded.")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def revoke(obj: Ctx, serial: str, reason: str | None, as_json: bool) -> None:
    """Revoke the certificate SERIAL (hex)."""
    record = obj.pki.revoke(serial, reason, operator())
    emit(
        record.to_dict(with_pem=False),
        as_json,
        f"revoked {record.serial} ({record.revocation_reason})",
    )


@main.command()
@click.argument("serial")
@click.option("--pem", "with_pem", is_flag=True, help="Also print the certificate.")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def show(obj: Ctx, serial: str, with_pem: bool, as_json: bool) -> None:
    """Show the certificate SERIAL."""
    record = obj.pki.show(serial)
    text = _text(record) + ("\n" + (record.certificate_pem or "") if with_pem else "")
    emit(record.to_dict(), as_json, text)


@main.command("list")
@click.option("--status", type=click.Choice(["pending", "good", "revoked", "expired"]))
@click.option("--expiring-within", help="Only good certificates expiring within, e.g. 7d.")
@click.option("--profile")
@click.option("--limit", type=click.IntRange(1, 1000), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def list_(
    obj: Ctx,
    status: str | None,
    expiring_within: str | None,
    profile: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List certificates, oldest first."""
    query = CertificateQuery(
        status=status,
        expiring_within=parse_duration(expiring_within) if expiring_within else None,
        profile=profile,
        limit=limit,
    )
    records, _ = obj.pki.list_certificates(query)
    rows = [r.to_dict(with_pem=False) for r in records]
    text = "\n".join(
        f"{r.serial}  {r.status:<8} {r.profile:<12} {r.not_after.isoformat()}  {r.subject}"
        for r in records
    )
    emit(rows, as_json, text or "no certificates")
