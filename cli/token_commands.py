"""``hsmca token create|list|revoke``."""

from __future__ import annotations

import click

from cli.main import Ctx, emit, fail_cleanly, main, pass_home
from pki.actors import ROLES, operator
from pki.durations import parse_duration
from pki.records import iso


@main.group()
def token() -> None:
    """API bearer tokens."""


@token.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", help="Unique name (default: generated).")
@click.option(
    "--allowed-names",
    "allowed_names",
    multiple=True,
    help="Name pattern an issuer may request, e.g. '*.svc.internal' (repeatable).",
)
@click.option("--profiles", "profiles", multiple=True, help="Profile it may use (repeatable).")
@click.option("--ttl", help="Token lifetime, e.g. 30d (default: no expiry).")
@click.option("--max-ttl", help="Longest certificate lifetime this token may request.")
@click.option("--single-use", is_flag=True, help="The token works for one issuance only.")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def token_create(
    obj: Ctx,
    role: str,
    name: str | None,
    allowed_names: tuple[str, ...],
    profiles: tuple[str, ...],
    ttl: str | None,
    max_ttl: str | None,
    single_use: bool,
    as_json: bool,
) -> None:
    """Create a token and print it once (only its hash is stored)."""
    names = tuple(p for value in allowed_names for p in value.replace(",", " ").split())
    profs = tuple(p for value in profiles for p in value.replace(",", " ").split())
    created = obj.pki.create_token(
        role,
        name,
        operator(),
        names,
        profs,
        parse_duration(ttl) if ttl else None,
        single_use,
        parse_duration(max_ttl) if max_ttl else None,
    )
    data = {
        "token": created.secret,
        "name": created.token.name,
        "role": created.token.role,
        "expires_at": iso(created.token.expires_at),
    }
    emit(data, as_json, created.secret)


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def token_list(obj: Ctx, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    rows = [
        {
            "name": t.name,
            "role": t.role,
            "allowed_names": t.allowed_names,
            "profiles": t.profiles,
            "single_use": t.single_use,
            "expires_at": iso(t.expires_at),
            "revoked_at": iso(t.revoked_at),
        }
        for t in obj.pki.list_tokens()
    ]
    text = "\n".join(
        f"{r['name']:<24} {r['role']:<8} {'revoked' if r['revoked_at'] else 'active':<8} "
        f"{','.join(r['allowed_names'])}"
        for r in rows
    )
    emit(rows, as_json, text or "no tokens")


@token.command("revoke")
@click.argument("name")
@pass_home
@fail_cleanly
def token_revoke(obj: Ctx, name: str) -> None:
    """Revoke the token called NAME."""
    obj.pki.revoke_token(name, operator())
    click.echo(f"token {name} revoked")
