"""Which database errors mean "unavailable for now" (a 503, retried later) rather than a
bug: the server is down or restarting, the connection broke, or SQLite stayed locked by
someone outside hsmca for longer than ``database.busy_timeout_seconds``. Anything else
(a syntax error, a missing column after a forgotten migration) stays a 500 with its
traceback in the log."""

from __future__ import annotations

import sqlite3

from sqlalchemy import exc as sa_exc

from pki.errors import DatabaseUnavailable

try:  # psycopg is installed with hsmca, but SQLite-only use must not depend on it
    import psycopg

    _PG_ERRORS: tuple[type[BaseException], ...] = (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # pragma: no cover
    _PG_ERRORS = ()

#: SQLite messages of a file that cannot be used now (the rest are bugs)
_SQLITE_OUTAGES = ("locked", "busy", "unable to open", "disk i/o", "readonly", "disk is full")
#: PostgreSQL SQLSTATE classes of an outage: connection exception, insufficient
#: resources, operator intervention (shutdown, cannot connect now)
_PG_OUTAGE_CLASSES = ("08", "53", "57")


def unavailable(exc: BaseException) -> DatabaseUnavailable | None:
    """The :class:`DatabaseUnavailable` that ``exc`` amounts to, or None if it is not a
    database availability fault. The message names the fault, never a URL or password."""
    if isinstance(exc, DatabaseUnavailable):
        return exc
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return DatabaseUnavailable("the database connection was lost; retry shortly")
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection came free
        return DatabaseUnavailable("the database is busy; retry shortly")
    original = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if isinstance(original, sqlite3.OperationalError):
        text = str(original).lower()
        if "locked" in text or "busy" in text:
            return DatabaseUnavailable("the database is locked; retry shortly")
        if any(outage in text for outage in _SQLITE_OUTAGES):
            return DatabaseUnavailable("the database is unavailable; retry shortly")
        return None
    if _PG_ERRORS and isinstance(original, _PG_ERRORS):
        state = getattr(original, "sqlstate", None)
        # a refused or broken connection has no SQLSTATE at all
        if state is None or state[:2] in _PG_OUTAGE_CLASSES:
            return DatabaseUnavailable("the database is unavailable; retry shortly")
    return None
