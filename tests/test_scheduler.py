"""Two real `hsmca serve` instances on one database: each job runs once, by the one
instance holding the leader lock, and the other takes over when the leader stops."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from pki.scheduler import JOBS
from tests.conftest import RunningService, initialise
from tests.helpers import hsmca_json


def _runs(home: Path) -> list[tuple[str, str]]:
    uri = f"file:{home / 'hsmca.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as con:
        return con.execute("SELECT job, instance FROM job_runs ORDER BY id").fetchall()


def _wait_for(home: Path, done: object, deadline_s: float = 60.0) -> list[tuple[str, str]]:
    deadline = time.monotonic() + deadline_s
    while True:
        runs = _runs(home)
        if done(runs):  # type: ignore[operator]
            return runs
        assert time.monotonic() < deadline, f"not done before the deadline: {runs}"
        time.sleep(0.2)  # polling interval, bounded by the deadline


def test_two_instances_run_each_job_once_and_fail_over(tmp_path: Path) -> None:
    home = tmp_path / "home"
    initialise(home, "Scheduler Org")
    first = RunningService(home)
    second = RunningService(home)
    try:
        runs = _wait_for(home, lambda r: {job for job, _ in r} == set(JOBS))
        by_instance = {instance for _, instance in runs}
        assert len(by_instance) == 1, runs
        leader_pid = int(next(iter(by_instance)).rsplit(":", 1)[1])
        leader = first if first.process.pid == leader_pid else second
        standby = second if leader is first else first
        assert leader.process.pid == leader_pid
        # both instances were serving before the first run: a second scheduler would have
        # run every job at its start too
        assert Counter(job for job, _ in _runs(home)) == Counter(set(JOBS)), _runs(home)

        metrics = first.session().get(f"{first.base}/metrics", timeout=15).text  # type: ignore[attr-defined]
        assert 'hsmca_job_last_success_timestamp_seconds{job="purge"}' in metrics
        assert "hsmca_ca_certificate_seconds_to_expiry" in metrics

        listed = {row["name"]: row for row in hsmca_json(home, "jobs", "list", "--json")}
        assert set(listed) == set(JOBS)
        assert listed["purge"]["last_instance"].endswith(f":{leader_pid}")

        assert leader.stop() == 0
        runs = _wait_for(
            home,
            lambda r: sum(1 for _, i in r if i.endswith(f":{standby.process.pid}")) >= len(JOBS),
        )
        taken_over = Counter(job for job, i in runs if i.endswith(f":{standby.process.pid}"))
        assert taken_over == Counter(set(JOBS))
    finally:
        for service in (first, second):
            if service.process.poll() is None:
                assert service.stop() == 0


def test_sqlite_leader_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    from pki.store import Store

    url = f"sqlite:///{tmp_path / 'lock.db'}"
    first, second = Store(url), Store(url)
    a, b = first.leader_lock(), second.leader_lock()
    try:
        assert a.try_acquire() and a.still_held()
        assert not b.try_acquire()
        a.release()
        assert not a.still_held()
        assert b.try_acquire()
    finally:
        a.release()
        b.release()
        first.dispose()
        second.dispose()


@pytest.mark.postgres
def test_postgres_leader_lock_is_lost_with_its_session(pg_home: Path) -> None:
    """A leader whose database session dropped learns it has lost the lock, and a
    standby can take it (no two schedulers at once)."""
    from sqlalchemy import text

    from pki.service import Pki

    first, second = Pki.open(pg_home), Pki.open(pg_home)
    a, b = first.store.leader_lock(), second.store.leader_lock()
    try:
        assert a.try_acquire() and not b.try_acquire()
        pid = a._conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with second.store.engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            conn.commit()
        assert not a.still_held()
        assert b.try_acquire()
    finally:
        a.release()
        b.release()
        first.close()
        second.close()
