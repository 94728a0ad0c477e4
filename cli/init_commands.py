"""``hsmca init``."""

from __future__ import annotations

import click

from cli.main import Ctx, emit, fail_cleanly, main, pass_home


@main.command()
@click.option("--org", "organisation", help="Organisation name in the CA certificates.")
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    help="Extra name for the server's TLS certificate (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_home
@fail_cleanly
def init(obj: Ctx, organisation: str | None, hostnames: tuple[str, ...], as_json: bool) -> None:
    """Create the home, HSM token, CA hierarchy and server certificate (idempotent)."""
    from pki.bootstrap import initialise

    report = initialise(obj.home, organisation, hostnames)
    home = obj.home
    data = {
        "home": str(home),
        "changed": report.changed,
        "created": report.created,
        "notes": report.notes,
        "root_certificate": str(home / "ca" / "root.pem"),
        "chain": str(home / "ca" / "chain.pem"),
        "server_certificate": str(home / "tls" / "server.pem"),
    }
    if as_json:
        emit(data, True)
        return
    if report.changed:
        click.echo(f"Initialised {home}:")
        for line in report.created:
            click.echo(f"  + {line}")
    else:
        click.echo(f"{home} is already initialised; nothing changed.")
    for note in report.notes:
        click.echo(f"  note: {note}")
    click.echo(f"Root certificate: {data['root_certificate']}")
    click.echo(f"Create an admin token: hsmca --home {home} token create --role admin")
