"""``hsmca jobs list|run``: the scheduler's jobs, their last runs, and running one now."""

from __future__ import annotations

import click

from cli.main import Ctx, emit, fail_cleanly, main, pass_home
from pki.records import iso


@main.group()
def jobs() -> None:
    """Scheduled jobs (run by one `hsmca serve` of all sharing the database)."""


@jobs.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def jobs_list(obj: Ctx, as_json: bool) -> None:
    """Every job with its interval and its last run."""
    from pki.scheduler import JOBS

    last: dict[str, object] = {}
    for run in obj.pki.store.jobs.recent_runs(limit=500):
        last.setdefault(run.job, run)
    rows = []
    for spec in JOBS.values():
        run = last.get(spec.name)
        rows.append(
            {
                "name": spec.name,
                "interval_seconds": int(spec.interval.total_seconds()),
                "description": spec.description,
                "last_started_at": iso(run.started_at) if run else None,  # type: ignore[attr-defined]
                "last_outcome": run.outcome if run else None,  # type: ignore[attr-defined]
                "last_error": run.error if run else None,  # type: ignore[attr-defined]
                "last_instance": run.instance if run else None,  # type: ignore[attr-defined]
            }
        )
    text = "\n".join(
        f"{r['name']:<28} every {r['interval_seconds']:>6}s  "
        f"last: {r['last_outcome'] or 'never'} {r['last_started_at'] or ''}"
        for r in rows
    )
    emit(rows, as_json, text)


@jobs.command("run")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_home
@fail_cleanly
def jobs_run(obj: Ctx, name: str, as_json: bool) -> None:
    """Run the job NAME now, here (recorded like a scheduled run); exit 1 if it fails."""
    from pki.scheduler import JOBS, instance_name, run_job

    if name not in JOBS:
        raise click.UsageError(f"unknown job {name!r}; one of: {', '.join(JOBS)}")
    outcome, summary, error = run_job(obj.pki, name, instance_name("cli:"))
    emit(
        {"job": name, "outcome": outcome, "summary": summary, "error": error},
        as_json,
        f"{name}: {outcome} {summary if outcome == 'ok' else error}",
    )
    if outcome != "ok":
        raise SystemExit(1)
