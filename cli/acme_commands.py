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
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def eab_create(obj: Ctx, name: str | None, as_json: bool) -> None:
    """Create a single-use EAB key and print its key id and HMAC key (shown once)."""
    from pki.acme.service import Acme

    if name is not None and not 0 < len(name) <= 200:
        raise click.UsageError("--name must be 1 to 200 characters")
    created = Acme(obj.pki).create_eab_key(name, operator())
    text = (
        f"key id:   {created.kid}\n"
        f"hmac key: {created.hmac_key}\n"
        f"e.g. certbot --eab-kid {created.kid} --eab-hmac-key <hmac key>"
    )
    emit({"kid": created.kid, "hmac_key": created.hmac_key, "name": created.name}, as_json, text)
