"""``hsmca serve``."""

from __future__ import annotations

import sys

import click

from cli.main import Ctx, fail_cleanly, main, pass_home


@main.command()
@click.option("--host", help="Address to listen on [server.host, default 127.0.0.1].")
@click.option("--https-port", type=click.IntRange(1, 65535), help="[server.https_port: 8443]")
@click.option("--http-port", type=click.IntRange(1, 65535), help="[server.http_port: 8080]")
@click.option("--workers", type=click.IntRange(1, 64), help="HTTPS worker processes.")
@pass_home
@fail_cleanly
def serve(
    obj: Ctx,
    host: str | None,
    https_port: int | None,
    http_port: int | None,
    workers: int | None,
) -> None:
    """Run the HTTPS API (REST, ACME, EST) and the plain-HTTP listener (OCSP, CRL)."""
    from ca_service.server import ServeOptions
    from ca_service.server import serve as run
    from pki.config import load_settings

    if not (obj.home / "hsmca.toml").exists():
        raise click.UsageError(f"{obj.home} is not initialised: run `hsmca init --home {obj.home}`")
    settings = load_settings(obj.home)
    opts = ServeOptions(
        home=obj.home,
        host=host or settings.server.host,
        https_port=https_port or settings.server.https_port,
        http_port=http_port or settings.server.http_port,
        workers=workers or settings.server.workers,
    )
    sys.exit(run(opts, announce=lambda text: click.echo(text, err=False)))
