"""``hsmca`` — the operator's command line. Each command parses options, calls one
:mod:`pki` use-case and prints the result (``--json`` for scripts)."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pki import errors
from pki.config import resolve_home

USAGE_ERRORS = (
    errors.InvalidInput,
    errors.PolicyError,
    errors.ConfigError,
)


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn core errors into click errors: usage errors (exit 2) for bad input, others 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USAGE_ERRORS as exc:
            raise click.UsageError(str(exc)) from None
        except errors.HsmcaError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a file we were told to read or write: no traceback
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None

    return wrapper


def check_output_path(option: str, path: str | None) -> None:
    """Usage error unless ``path`` can be created (its directory exists and is writable)."""
    if not path:
        return
    directory = Path(path).absolute().parent
    if not directory.is_dir():
        raise click.UsageError(f"{option}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise click.UsageError(f"{option}: directory {directory} is not writable")


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text if text is not None else data)


class Ctx:
    """The home chosen with ``--home``; opens the core lazily."""

    def __init__(self, home: str | None) -> None:
        self.home = resolve_home(home)
        self._pki: Any = None

    @property
    def pki(self) -> Any:
        if self._pki is None:
            from pki.service import Pki

            self._pki = Pki.open(self.home)
        return self._pki

    def close(self) -> None:
        if self._pki is not None:
            self._pki.close()


home_option = click.option(
    "--home",
    "home",
    envvar="HSMCA_HOME",
    type=click.Path(file_okay=False),
    help="hsmca home directory [env HSMCA_HOME; default ./.hsmca]",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@home_option
@click.version_option(package_name="hsmca")
@click.pass_context
def main(ctx: click.Context, home: str | None) -> None:
    """hsmca: an internal CA whose keys never leave the HSM."""
    ctx.obj = Ctx(home)
    ctx.call_on_close(ctx.obj.close)


def pass_home(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Accept ``--home`` after the sub-command too (``hsmca init --home DIR``)."""

    @home_option
    @click.pass_obj
    @functools.wraps(fn)
    def wrapper(obj: Ctx, *args: Any, home: str | None = None, **kwargs: Any) -> Any:
        if home:
            obj.home = resolve_home(home)
        return fn(obj, *args, **kwargs)

    return wrapper


# The sub-command modules register themselves on ``main``.
from cli import (  # noqa: E402,F401
    acme_commands,
    agent_commands,
    ca_commands,
    cert_commands,
    device_commands,
    init_commands,
    jobs_commands,
    serve_commands,
    token_commands,
)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
