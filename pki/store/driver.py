"""Driver-level plumbing of the store: statements compiled once and run on driver
cursors, the SQLite engine and its writer lock, background WAL checkpoints, and the
WAL-index watch that tells readers whether anything was committed."""

from __future__ import annotations

import fcntl
import mmap
import operator
import os
import sqlite3
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.pool import NullPool


class CompiledStatement:
    """A statement compiled once for a dialect, run on a DB-API cursor.

    SQLAlchemy's per-execution overhead (~0.25 ms here) was most of the cost of an
    issuance, so the hot path uses the SQL SQLAlchemy compiled, with the column types'
    own bind processors, straight on the driver.
    """

    def __init__(self, stmt: Any, dialect: Any, columns: list[str] | None = None) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=columns)
        self.sql = compiled.string
        self.order = list(compiled.positiontup or []) if compiled.positional else None
        # the dialect's own implementation of each type: generic JSON has no processor
        # for psycopg (a dict reached the driver unadapted), generic DateTime none for SQLite
        processors = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for name, bind in compiled.binds.items()
        }
        # only the columns whose type converts anything (datetimes, JSON)
        self.processors = {name: fn for name, fn in processors.items() if fn is not None}
        self.constants = {
            name: bind.value for name, bind in compiled.binds.items() if bind.value is not None
        }
        self.plain = not (self.processors or self.constants)
        # bind values in positional order, picked in C (a generator cost ~10 us per insert)
        self._positional: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None
        if self.order is not None:
            pick = operator.itemgetter(*self.order) if self.order else (lambda _values: ())
            self._positional = (lambda v: (pick(v),)) if len(self.order) == 1 else pick
        # a SELECT's rows come back as named tuples with the column types' conversions
        columns = list(getattr(stmt, "selected_columns", ()))
        self.row_type = (
            namedtuple("Row", [str(c.key) for c in columns], rename=True) if columns else None  # type: ignore[misc]
        )
        self.converters = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]

    def run(self, cursor: Any, params: dict[str, Any] | None = None) -> Any:
        """Execute on ``cursor`` with ``params`` (by bind name); returns the cursor."""
        if self.plain and params is not None:  # nothing to add or convert
            cursor.execute(
                self.sql, params if self._positional is None else self._positional(params)
            )
            return cursor
        values = dict(self.constants, **(params or {}))
        for name, process in self.processors.items():
            if name in values:
                values[name] = process(values[name])
        cursor.execute(self.sql, values if self._positional is None else self._positional(values))
        return cursor

    def fetch_one(self, cursor: Any, params: dict[str, Any] | None = None) -> Any:
        """The first row of a SELECT as a named tuple of converted values, or None."""
        raw = self.run(cursor, params).fetchone()
        if raw is None:
            return None
        return self.row_type(
            *(
                value if convert is None else convert(value)
                for convert, value in zip(self.converters, raw, strict=True)
            )
        )


class WalChanges:
    """Tells whether anything was committed to a WAL-mode SQLite database since a token
    was taken. The WAL-index header at the start of the ``-shm`` file changes with every
    commit (its ``iChange`` counter and ``mxFrame``; sqlite.org/walformat.html): SQLite's
    own readers check it the same way. COMMIT returns only after the header is written,
    so a token taken after a commit returned always differs from one taken before it.

    The watch keeps a connection of its own open: SQLite deletes the ``-shm`` file when
    the last connection closes and the next one creates another, which a mapping of the
    old file would never see; while this connection lives, the file stays."""

    HEADER_BYTES = 48

    def __init__(self, pin: sqlite3.Connection, view: mmap.mmap) -> None:
        self._pin = pin
        self._view = view

    @classmethod
    def open(cls, url: str) -> WalChanges | None:
        """Watch the database at ``url``; None when it has no shared WAL index."""
        path = url.split("///", 1)[-1]
        try:
            pin = sqlite3.connect(path, timeout=30, check_same_thread=False)
            pin.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # maps the index
            fd = os.open(path + "-shm", os.O_RDONLY)
        except (OSError, sqlite3.Error):
            return None  # in memory, or not in WAL mode
        try:
            return cls(pin, mmap.mmap(fd, cls.HEADER_BYTES, prot=mmap.PROT_READ))
        except (OSError, ValueError):
            pin.close()
            return None
        finally:
            os.close(fd)

    def token(self) -> bytes:
        return self._view[: self.HEADER_BYTES]

    def close(self) -> None:
        self._view.close()
        self._pin.close()


class WriterLock:
    """Serialises SQLite writers: threads on a lock, processes on ``flock`` of a file
    beside the database. SQLite's own busy handler sleeps 1, 2, 5 ... 100 ms between
    retries, which made concurrent issuance slow and its p99 long; a blocked ``flock``
    wakes the moment the holder commits. PostgreSQL (no path) needs none of this."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = -1

    def __enter__(self) -> None:
        if self.path is None:
            return
        self._thread_lock.acquire()
        try:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


#: seconds a SQLite write waits for a lock held outside hsmca (``database.busy_timeout_seconds``)
DEFAULT_BUSY_TIMEOUT = 5.0


def sqlite_engine(
    url: str, immediate: bool, pooled: bool = True, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> Engine:
    """An engine for the SQLite file at ``url`` (WAL, our PRAGMAs on every connection);
    ``pooled=False`` opens a fresh connection per check-out and closes it on return."""
    # Every transaction ends in an explicit COMMIT or ROLLBACK, so the pool need not
    # roll back again on each check-in.
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": busy_timeout},
        pool_reset_on_return=None,
        **({} if pooled else {"poolclass": NullPool}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        # no checkpoint inside COMMIT: it ran under the writer lock and stalled every
        # other writer for its whole duration; Checkpointer runs them beside the writers
        cur.execute("PRAGMA wal_autocheckpoint=0")
        # the WAL file is cut back to 64 MB when a checkpoint lets it restart
        cur.execute("PRAGMA journal_size_limit=67108864")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


#: a process checkpoints at least this often (when it commits at all)
CHECKPOINT_SECONDS = 30.0


class Checkpointer:
    """Copies the SQLite WAL back into the database every ``every`` commits of this
    process (or at its first commit after CHECKPOINT_SECONDS), in a background thread
    and in PASSIVE mode: it neither holds nor waits for the writer lock, so no commit
    waits for it (an automatic checkpoint ran inside COMMIT, under the lock: a p99 of
    ~1 s under steady issuance). SQLite itself checkpoints when the last connection
    closes."""

    def __init__(self, path: str, every: int = 1000) -> None:
        self.path = path
        self.every = every
        self._commits = 0
        self._running = threading.Lock()
        self._pid = os.getpid()
        self._last_run = time.monotonic()

    def committed(self) -> None:
        if self._pid != os.getpid():  # forked while a checkpoint ran: its lock is stale
            self._running, self._pid = threading.Lock(), os.getpid()
        self._commits += 1
        due = self._commits >= self.every or (
            time.monotonic() - self._last_run > CHECKPOINT_SECONDS  # a quiet process too
        )
        if due and self._running.acquire(blocking=False):
            self._commits, self._last_run = 0, time.monotonic()
            threading.Thread(target=self._run, name="hsmca-checkpoint", daemon=True).start()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=30)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            pass  # the next round tries again; SQLite checkpoints at the last close too
        finally:
            self._running.release()
