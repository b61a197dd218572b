"""Backfills: one run of a deployment per day, each day's run listed, failed days queued again, followed live.

A day's run is found by its ``day`` parameter among the deployment's runs. A day that has none is queued; with
``rerun_failed`` a day whose latest run failed, crashed or was cancelled is queued again with the deployment's
*current* parameters (Prefect's "Retry" would replay the old ones). Idempotency keys make a repeated command
queue nothing twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, timedelta

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from common.errors import ConfigurationError

RERUN_STATES = frozenset({StateType.FAILED, StateType.CRASHED, StateType.CANCELLED})


@dataclass
class DayRun:
    day: str
    run: FlowRun
    queued: bool  # by this command (else found from before)


def days_between(start: str, end: str) -> list[str]:
    """ISO days from ``start`` to ``end`` inclusive; a malformed or reversed range is a `ConfigurationError`."""
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
    except ValueError as exc:
        raise ConfigurationError(f"dates must be YYYY-MM-DD (e.g. 2026-11-03): got --start {start} --end {end}") \
            from exc
    if last < first:
        raise ConfigurationError(f"--end {end} is before --start {start}")
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


def connect(client: SyncPrefectClient, api_url: str | None) -> None:
    """A backfill needs the server the workers poll: no API URL, or one that does not answer, is refused."""
    if not api_url:
        raise ConfigurationError("no Prefect API to queue runs on: set PREFECT_API_URL (or start one with "
                                 "`avatar-batch server start`)")
    failure = client.api_healthcheck()
    if failure is not None:
        raise ConfigurationError(f"the Prefect API at {api_url} does not answer ({type(failure).__name__}); "
                                 "is the server running?")


def latest_runs(client: SyncPrefectClient, deployment_id) -> dict[str, FlowRun]:
    """The newest run of the deployment for each ``day`` parameter."""
    by_day: dict[str, FlowRun] = {}
    offset = 0
    while True:
        page = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200, offset=offset)
        for run in page:
            day = run.parameters.get("day")
            if day is not None:
                by_day.setdefault(str(day), run)
        if len(page) < 200:
            return by_day
        offset += 200


def backfill(client: SyncPrefectClient, deployment_name: str, days: list[str], rerun_failed: bool) -> list[DayRun]:
    """Queue what each day needs and return every day's run."""
    try:
        deployment = client.read_deployment_by_name(deployment_name)
    except ObjectNotFound as exc:
        raise ConfigurationError(f"deployment {deployment_name!r} not found; register it with `prefect deploy "
                                 "--all`, list them with `prefect deployment ls`") from exc
    existing = latest_runs(client, deployment.id)
    out = []
    for day in days:
        run = existing.get(day)
        if run is not None and not (rerun_failed and run.state_type in RERUN_STATES):
            out.append(DayRun(day, run, queued=False))
            continue
        key = f"backfill:{deployment.id}:{day}" + (f":after:{run.id}" if run is not None else "")
        queued = run_deployment(deployment_name, parameters={"day": day}, timeout=0, tags=["backfill"],
                                idempotency_key=key, flow_run_name=f"{deployment.name}-{day}", as_subflow=False)
        out.append(DayRun(day, queued, queued=True))
    return out


def refresh(client: SyncPrefectClient, runs: list[DayRun]) -> list[DayRun]:
    ids = [r.run.id for r in runs]
    fresh = {run.id: run for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                                          limit=len(ids))}
    return [DayRun(r.day, fresh.get(r.run.id, r.run), r.queued) for r in runs]


def follow(client: SyncPrefectClient, runs: list[DayRun], show, poll_s: float = 2.0) -> list[DayRun]:
    """Refresh until every run is final, calling ``show`` with each refresh."""
    while True:
        runs = refresh(client, runs)
        show(runs)
        if all(r.run.state is not None and r.run.state.is_final() for r in runs):
            return runs
        time.sleep(poll_s)
