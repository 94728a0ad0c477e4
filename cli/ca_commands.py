"""``hsmca ca export``, ``hsmca crl``, ``hsmca audit verify``."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from cli.main import Ctx, check_output_path, emit, fail_cleanly, main, pass_home


@main.group()
def ca() -> None:
    """CA certificates."""


@ca.command("export")
@click.option("--root", "which", flag_value="root", help="The root certificate.")
@click.option("--intermediate", "which", flag_value="intermediate", help="The issuing CA.")
@click.option("--chain", "which", flag_value="chain", help="Issuing CA then root.")
@click.option("--der", is_flag=True, help="DER instead of PEM (one certificate only).")
@pass_home
@fail_cleanly
def ca_export(obj: Ctx, which: str | None, der: bool) -> None:
    """Print the root, the issuing CA or the chain (issuing CA first, root last)."""
    if which is None:
        raise click.UsageError("choose one of --root, --intermediate or --chain")
    pki = obj.pki
    root = pki.root_issuer()
    issuing = pki.issuing_issuer()
    if which == "root":
        ders = [root.der]
    elif which == "intermediate":
        ders = [issuing.der]
    else:
        ders = [
            x509.load_pem_x509_certificate(p.encode()).public_bytes(Encoding.DER)
            for p in _split_pem(pki.chain_pem(issuing.id))
        ] + [root.der]
    if der:
        if len(ders) != 1:
            raise click.UsageError("--der prints one certificate; use --root or --intermediate")
        sys.stdout.buffer.write(ders[0])
        return
    for d in ders:
        click.echo(x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM).decode(), nl=False)


def _split_pem(text: str) -> list[str]:
    marker = "-----END CERTIFICATE-----"
    return [part + marker + "\n" for part in text.split(marker) if part.strip()]


@main.command()
@click.option("--out", type=click.Path(dir_okay=False), help="Write the DER CRL to this file.")
@click.option("--issuer", "issuer_id", help="Issuer id (default: the issuing CA).")
@pass_home
@fail_cleanly
def crl(obj: Ctx, out: str | None, issuer_id: str | None) -> None:
    """Publish fresh CRLs now (every partition, base and delta) and print the complete
    CRL of the issuer (PEM to stdout, or DER to --out)."""
    check_output_path("--out", out)
    pki = obj.pki
    issuer = pki.issuing_issuer(issuer_id)
    bases = pki.publish_base_crls(issuer.id)
    deltas = pki.publish_delta_crls(issuer.id)
    der = pki.build_crl(issuer.id)
    target = pki.settings.home / "crl" / f"{issuer.id}.crl"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(der)
    click.echo(
        f"published {len(bases)} base and {len(deltas)} delta CRL(s) of {issuer.subject}",
        err=True,
    )
    if out:
        Path(out).write_bytes(der)
        click.echo(f"complete CRL written to {out}", err=True)
    else:
        pem = x509.load_der_x509_crl(der).public_bytes(Encoding.PEM).decode()
        click.echo(pem, nl=False)


@main.group()
def audit() -> None:
    """The hash-chained audit log."""


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def audit_verify(obj: Ctx, as_json: bool) -> None:
    """Check the audit chain; exit 1 at the first changed, removed or reordered event."""
    result = obj.pki.verify_audit()
    data = {
        "ok": result.ok,
        "events": result.events,
        "first_bad_event": result.first_bad_id,
        "problem": result.problem,
    }
    if result.ok:
        emit(data, as_json, f"audit log OK: {result.events} events, chain intact")
        return
    emit(data, as_json, f"audit log BROKEN at event {result.first_bad_id}: {result.problem}")
    sys.exit(1)
