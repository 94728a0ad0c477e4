"""``hsmca agent``: the renewal agent for mTLS services (logic in :mod:`cli.agent`)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import click

from cli.agent import TOKEN_ENV, Agent, AgentConfig
from cli.agent_material import KEY_TYPES, AgentError, normalise_names
from cli.main import Ctx, check_output_path, fail_cleanly, main, pass_home
from pki.durations import parse_duration
from pki.errors import PolicyError


def _setup_logging() -> None:
    """One line per action on stderr, UTC timestamps."""
    logger = logging.getLogger("hsmca.agent")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        formatter = logging.Formatter(
            "%(asctime)s hsmca-agent %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _token(token: str | None, token_file: str | None) -> str | None:
    if token and token_file:
        raise click.UsageError(f"give the token once: --token ({TOKEN_ENV}) or --token-file")
    if token_file:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as exc:
            raise click.UsageError(f"--token-file {token_file}: {exc.strerror}") from None
        if not text:
            raise click.UsageError(f"--token-file {token_file} is empty")
        return text
    return token.strip() if token else None


@main.command("agent")
@click.option(
    "--ca-url", required=True, help="Base URL of the CA's HTTPS API, e.g. https://ca:8443."
)
@click.option(
    "--root",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The CA's root certificate (PEM): the only trust anchor for the CA's TLS.",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    show_envvar=True,
    help="Bearer token for the first enrolment (hsmca token create --role issuer "
    "--single-use ...). Prefer the environment variable or --token-file.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help="Read the enrolment token from this file (e.g. a systemd credential).",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    help="DNS name or IP address of this service (repeatable; the first is also the CN).",
)
@click.option("--cert", "cert", required=True, help="Certificate file: leaf, then chain.")
@click.option("--key", "key", required=True, help="Private key file (written with mode 0600).")
@click.option(
    "--exec",
    "reload_command",
    help="Shell command run after each new certificate, e.g. 'systemctl reload nginx'.",
)
@click.option("--once", is_flag=True, help="Do what is due now and exit (for timers).")
@click.option(
    "--profile",
    default="mtls",
    show_default=True,
    help="Certificate profile for the enrolment; it must allow clientAuth.",
)
@click.option("--ttl", help="Certificate lifetime to request at enrolment, e.g. 24h.")
@click.option(
    "--key-type",
    type=click.Choice(KEY_TYPES),
    default="ec-p256",
    show_default=True,
    help="Type of each new key.",
)
@pass_home
@fail_cleanly
def agent(
    obj: Ctx,
    ca_url: str,
    root: str,
    token: str | None,
    token_file: str | None,
    names: tuple[str, ...],
    cert: str,
    key: str,
    reload_command: str | None,
    once: bool,
    profile: str,
    ttl: str | None,
    key_type: str,
) -> None:
    """Keep an mTLS certificate alive: enrol once with a token, then renew over mTLS with a
    new key at about 2/3 of the lifetime, running --exec after each change."""
    del obj  # the agent is a client of the CA: it has no home of its own
    if not ca_url.startswith("https://"):
        raise click.UsageError(
            f"--ca-url must be an https:// URL (e.g. https://ca:8443), not {ca_url!r}"
        )
    if profile == "mtls-server":
        raise click.UsageError(
            "--profile mtls-server has no clientAuth, so the certificate could not renew "
            "itself over mTLS: use mtls (the default) or mtls-client"
        )
    if ttl:
        parse_duration(ttl)  # a usage error with a hint when malformed
    check_output_path("--cert", cert)
    check_output_path("--key", key)
    if Path(cert).absolute() == Path(key).absolute():
        raise click.UsageError("--cert and --key must be different files")
    try:
        normalise_names(names)
    except (PolicyError, AgentError) as exc:
        raise click.UsageError(f"--name: {exc}") from None
    config = AgentConfig(
        ca_url=ca_url,
        root=Path(root),
        names=names,
        cert_path=Path(cert).absolute(),
        key_path=Path(key).absolute(),
        token=_token(token, token_file),
        profile=profile,
        ttl=ttl,
        reload_command=reload_command,
        key_type=key_type,
    )
    _setup_logging()
    worker = Agent(config)
    if once:
        worker.run_once()
        return
    stop = threading.Event()
    received: list[int] = []

    def _stop(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        logging.getLogger("hsmca.agent").info("stopped (%s)", signal.Signals(received[0]).name)
