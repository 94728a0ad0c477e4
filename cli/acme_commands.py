"""``hsmca acme eab create``: External Account Binding keys for ACME clients."""

from __future__ import annotations

import click

from cli.main import Ctx, emit, fail_cleanly, main, pass_home
from pki.actors import operator


@main.group()
def acme() -> None:
    """The ACME server."""


@acme.group()
def eab() -> None:
    """External Account Binding keys (RFC 8555 7.3.4)."""


@eab.command("create")
@click.option("--name", help="A label for whoever receives the key (default: the key id).")
@click.option(
    "--allowed-names",
    "allowed_names",
    multiple=True,
    help="Name pattern the account may order, e.g. '*.svc.internal' (repeatable; "
    "default: any name acme.allowed_domains allows).",
)
@click.option(
    "--profiles", "profiles", multiple=True, help="Profile the account may use (repeatable)."
)
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def eab_create(
    obj: Ctx,
    name: str | None,
    allowed_names: tuple[str, ...],
    profiles: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create a single-use EAB key and print its key id and HMAC key (shown once); the
    account it creates inherits its name patterns and profiles."""
    from pki.acme.service import Acme

    if name is not None and not 0 < len(name) <= 200:
        raise click.UsageError("--name must be 1 to 200 characters")
    names = tuple(p for value in allowed_names for p in value.replace(",", " ").split())
    profs = tuple(p for value in profiles for p in value.replace(",", " ").split())
    created = Acme(obj.pki).create_eab_key(name, operator(), names, profs)
    limits = ""
    if created.allowed_names:
        limits += f"names:    {', '.join(created.allowed_names)}\n"
    if created.profiles:
        limits += f"profiles: {', '.join(created.profiles)}\n"
    text = (
        f"key id:   {created.kid}\n"
        f"hmac key: {created.hmac_key}\n"
        f"{limits}"
        f"e.g. certbot --eab-kid {created.kid} --eab-hmac-key <hmac key>"
    )
    data = {
        "kid": created.kid,
        "hmac_key": created.hmac_key,
        "name": created.name,
        "allowed_names": list(created.allowed_names),
        "profiles": list(created.profiles),
    }
    emit(data, as_json, text)
