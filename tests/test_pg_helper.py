"""Smoke test for the throwaway-PostgreSQL helper in tests/pg.py."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path

import pytest
import sqlalchemy

from tests.pg import PostgresUnavailable, create_database, running_postgres


def _scalar(url: str, query: str) -> object:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text(query)).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_running_postgres_and_create_database(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        try:
            url = stack.enter_context(running_postgres(tmp_path))
        except PostgresUnavailable as exc:
            reason = f"!!! POSTGRESQL UNAVAILABLE - POSTGRES TESTS DID NOT RUN !!! {exc}"
            print(f"WARNING: {reason}", file=sys.stderr)
            warnings.warn(reason, stacklevel=1)  # also listed in pytest's warnings summary
            pytest.skip(reason)
        print(f"PostgreSQL ready in {time.monotonic() - started:.2f}s: {url}", file=sys.stderr)

        assert url.startswith("postgresql+psycopg://hsmca@127.0.0.1:")
        assert url.endswith("/hsmca_test")
        assert _scalar(url, "SELECT 1") == 1
        assert "PostgreSQL" in str(_scalar(url, "SELECT version()"))
        assert _scalar(url, "SELECT current_database()") == "hsmca_test"

        other_url = create_database(url, "hsmca_other")
        assert other_url.endswith("/hsmca_other")
        assert _scalar(other_url, "SELECT current_database()") == "hsmca_other"
        assert _scalar(other_url, "SELECT 1") == 1
