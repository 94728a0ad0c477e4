"""Which database errors mean "unavailable for now" (a 503, retried later) rather than a
bug: the server is down or restarting, the connection broke, or SQLite stayed locked by
someone outside hsmca for longer than ``database.busy_timeout_seconds``."""

from __future__ import annotations

import sqlite3

from sqlalchemy import exc as sa_exc

from pki.errors import DatabaseUnavailable

try:  # psycopg is installed with hsmca, but SQLite-only use must not depend on it
    import psycopg

    _DRIVER_ERRORS: tuple[type[BaseException], ...] = (
        sqlite3.OperationalError,
        psycopg.OperationalError,
        psycopg.InterfaceError,
    )
except ImportError:  # pragma: no cover
    _DRIVER_ERRORS = (sqlite3.OperationalError,)

_SA_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def unavailable(exc: BaseException) -> DatabaseUnavailable | None:
    """The :class:`DatabaseUnavailable` that ``exc`` amounts to, or None if it is not a
    database availability fault. The message names the fault, never a URL or password."""
    if isinstance(exc, DatabaseUnavailable):
        return exc
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return DatabaseUnavailable("the database connection was lost; retry shortly")
    if isinstance(exc, _SA_ERRORS + _DRIVER_ERRORS):
        original = getattr(exc, "orig", None) or exc
        text = str(original).lower()
        if "locked" in text or "busy" in text:
            return DatabaseUnavailable("the database is locked; retry shortly")
        if isinstance(original, sqlite3.OperationalError) and "no such" in text:
            return None  # a missing table or column is a bug, not an outage
        return DatabaseUnavailable("the database is unavailable; retry shortly")
    return None
