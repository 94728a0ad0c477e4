"""Helpers for the store, audit, record-before-sign, CLI and PostgreSQL tests.

Everything here drives real parts: the ``hsmca`` console script of this venv and
``tests/issue_worker.py`` run as separate processes, and the home's SQLite file read with
the ``sqlite3`` module behind the store's back.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HSMCA = Path(sys.executable).with_name("hsmca")
TIMEOUT = 120.0


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without hsmca or SoftHSM2 settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if (not k.startswith("HSMCA_") or k == "HSMCA_SERVER__LOG_LEVEL") and k != "SOFTHSM2_CONF"
    }
    env.update(extra)
    return env


def hsmca(
    home: Path | None,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real console script (``--home HOME`` first unless ``home`` is None)."""
    assert HSMCA.exists(), f"console script not installed at {HSMCA}"
    cmd = [str(HSMCA), *(["--home", str(home)] if home is not None else []), *args]
    return subprocess.run(
        cmd,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def hsmca_bytes(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the console script and keep stdout as bytes (``--der`` output)."""
    return subprocess.run(
        [str(HSMCA), "--home", str(home), *args],
        env=clean_env(),
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )


def hsmca_json(home: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run a ``--json`` command that must succeed and return its parsed output."""
    proc = hsmca(home, *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def start_worker(*args: str) -> subprocess.Popen[str]:
    """Start ``python -m tests.issue_worker ARGS`` (see that module)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.issue_worker", *args],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Wait (bounded) for a worker; return (exit code, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"worker {proc.args} timed out; stderr: {err[-2000:]}") from None
    return proc.returncode, out, err


def run_worker(*args: str) -> tuple[int, str, str]:
    """Run one worker to completion."""
    return finish(start_worker(*args))


def issue_concurrently(home: Path, count: int, tags: Sequence[str], profile: str) -> list[dict]:
    """Issue ``count`` certificates from each of ``len(tags)`` processes at the same time.

    The workers meet at a file barrier after opening the core and again halfway through,
    so their issuance loops overlap; each reports its serials and its loop's time span.
    """
    barrier = home.parent / f"barrier-{'-'.join(tags)}"
    barrier.mkdir()
    procs = [
        start_worker(
            "issue",
            str(home),
            "--count",
            str(count),
            "--tag",
            tag,
            "--profile",
            profile,
            "--barrier",
            str(barrier),
            "--parties",
            str(len(tags)),
        )
        for tag in tags
    ]
    reports = []
    for proc in procs:
        code, out, err = finish(proc)
        assert "database is locked" not in err, err[-3000:]
        assert code == 0, f"worker failed ({code}): {err[-3000:]}"
        reports.append(json.loads(out))
    return reports


def db_path(home: Path) -> Path:
    return home / "hsmca.db"


def sqlite_query(home: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read straight from the home's SQLite file."""
    conn = sqlite3.connect(db_path(home), timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def all_sqlite_values(home: Path) -> list[tuple[str, str, Any]]:
    """(table, column, value) for every value of every row of every table."""
    conn = sqlite3.connect(db_path(home), timeout=30)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        found = []
        for table in tables:
            cur = conn.execute(f'SELECT * FROM "{table}"')
            names = [d[0] for d in cur.description]
            for row in cur:
                found.extend((table, n, v) for n, v in zip(names, row, strict=True))
        return found
    finally:
        conn.close()


def split_pem(text: str) -> list[str]:
    """The PEM blocks of ``text``, each ending in a newline."""
    marker = "-----END CERTIFICATE-----"
    return [part.strip() + "\n" + marker + "\n" for part in text.split(marker) if part.strip()]
