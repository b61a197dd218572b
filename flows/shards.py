"""One manifest over many machines: shards of rows, each a flow run of the render-shard deployment on a work pool.

The parent plans the shards (rows that share a portrait and prompt stay together, so their encodes are cached on
one worker), keeps at most ``max_in_flight`` of them queued or running, and merges each finished shard's results
into its own, so ``results.parquet``, the summary and the UI are the same as for a run in one process. A shard
whose run crashed (an automation of `avatar-batch setup` marks Crashed a run whose worker vanished: its heartbeats
stopped, or it never left Pending) or whose results cannot be read is dispatched again; its finished items are
found published by their render keys and not rendered twice. After ``attempts`` dispatches its rows fail with the
shard's last state.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, StateType, WorkerStatus
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from common import storage
from common.errors import ConfigurationError
from manifests import ManifestRow, failed, read_results
from tasks.config import PipelineConfig, ShardConfig
from tasks.graph import ALL_STAGES

from .backfill import connect
from .dag import ROWS_FAILED, RunResults
from .report import shown


@dataclass(frozen=True)
class Shard:
    index: int
    rows: tuple[int, ...]  # manifest row numbers, ascending


def plan_shards(rows: Sequence[ManifestRow], rows_per_shard: int) -> list[Shard]:
    """At most ``rows_per_shard`` rows per shard; the rows of one portrait and prompt share a shard when they fit.

    Groups larger than a shard are cut into shard-sized chunks first (one character's thousand lines still spread
    over the pool); the chunks are packed first-fit, largest first, and the shards numbered by their first row.
    """
    groups: dict[tuple[str, str | None], list[int]] = {}
    for row in rows:
        groups.setdefault((row.portrait_uri, row.prompt), []).append(row.row)
    chunks = [group[start:start + rows_per_shard] for group in groups.values()
              for start in range(0, len(group), rows_per_shard)]
    bins: list[list[int]] = []
    for chunk in sorted(chunks, key=len, reverse=True):  # stable: equal sizes keep manifest order
        target = next((b for b in bins if len(b) + len(chunk) <= rows_per_shard), None)
        if target is None:
            target = []
            bins.append(target)
        target.extend(chunk)
    ordered = sorted((sorted(b) for b in bins), key=lambda b: b[0])
    return [Shard(index, tuple(b)) for index, b in enumerate(ordered)]


def sharded(shards: ShardConfig, valid_rows: int) -> bool:
    """Whether a manifest with this many valid rows is spread over the pool (else it renders in one run)."""
    return shards.deployment is not None and valid_rows >= shards.min_rows


def check_pool(deployment: str) -> str | None:
    """Shards need the server the workers poll and the deployment they run: say so in one line if either is
    missing. Returns a warning when no worker of its pool is online (the shards wait until one starts)."""
    with get_client(sync_client=True) as client:
        connect(client, PREFECT_API_URL.value())  # the server its workers poll, answering
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound as exc:
            raise ConfigurationError(f"deployment {deployment!r} not found: register it with `avatar-batch setup` "
                                     "(or `prefect deploy --all`)") from exc
        if found.work_pool_name and not any(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(
                found.work_pool_name)):
            return f"no worker of pool {found.work_pool_name} is online: the shards wait until one starts"
    return None


@dataclass
class ShardRun:
    shard: Shard
    results_uri: str
    attempt: int = 0
    flow_run: FlowRun | None = None
    state: str = "Waiting"
    succeeded: int = 0
    failed: int = 0


class ShardedRender:
    """The valid rows of one manifest as shards on the pool; every item's result reaches ``results``."""

    def __init__(self, cfg: PipelineConfig, manifest_uri: str, output_uri: str, results: RunResults,
                 parent_run_id: str, prefix: str):
        self.cfg, self.manifest_uri, self.output_uri, self.results = cfg, manifest_uri, output_uri, results
        self.parent_run_id, self.prefix = parent_run_id, prefix
        cache_uri = cfg.cache_uri or storage.join(output_uri, ".cache")
        self.work_uri = storage.join(cache_uri, "shards", parent_run_id)  # the shards' results tables
        # a shard renders in its own run on its own machine, with this run's settings and its own resolution of
        # every ``auto`` (its GPU, not the parent's)
        self.shard_cfg = cfg.model_copy(update={"shards": ShardConfig()})
        self.rows: dict[int, ManifestRow] = {}
        self.runs: list[ShardRun] = []

    def render(self, rows: list[ManifestRow]) -> None:
        settings, logger = self.cfg.shards, get_run_logger()
        self.rows = {row.row: row for row in rows}
        self.runs = [ShardRun(s, storage.join(self.work_uri, f"shard-{s.index:04d}.parquet"))
                     for s in plan_shards(rows, settings.rows_per_shard)]
        logger.info("%d rows in %d shards on %s", len(rows), len(self.runs), settings.deployment)
        waiting, active = deque(self.runs), []
        with get_client(sync_client=True) as client:
            while waiting or active:
                changed = bool(waiting) and len(active) < settings.max_in_flight
                while waiting and len(active) < settings.max_in_flight:
                    run = waiting.popleft()
                    self.dispatch(run)
                    active.append(run)
                if changed:
                    self.table()
                time.sleep(settings.poll_seconds)
                changed = False
                for run, flow_run in zip(list(active), self.read(client, active), strict=True):
                    if flow_run.state is None or flow_run.state.name == run.state:
                        continue
                    changed, run.flow_run, run.state = True, flow_run, flow_run.state.name
                    if flow_run.state.is_final() and self.settled(run):
                        active.remove(run)
                if changed:
                    self.table()
        storage.remove_folder(self.work_uri)  # the shards' tables, merged into this run's results

    def dispatch(self, run: ShardRun) -> None:
        run.attempt += 1
        shard, total = run.shard, len(self.runs)
        run.flow_run = run_deployment(
            self.cfg.shards.deployment, timeout=0, as_subflow=True,
            idempotency_key=f"{self.parent_run_id}-shard-{shard.index}-{run.attempt}",
            parameters={"manifest_uri": self.manifest_uri, "output_uri": self.output_uri, "rows": list(shard.rows),
                        "results_uri": run.results_uri, "shard": shard.index + 1, "shards": total,
                        "config": self.shard_cfg.model_dump(mode="json")})
        run.state = run.flow_run.state.name if run.flow_run.state else "Scheduled"

    @staticmethod
    def read(client: SyncPrefectClient, active: list[ShardRun]) -> list[FlowRun]:
        ids = [run.flow_run.id for run in active]
        found = {r.id: r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                                        limit=len(ids))}
        return [found.get(run.flow_run.id, run.flow_run) for run in active]

    def settled(self, run: ShardRun) -> bool:
        """A shard run reached a final state: merge its results, or dispatch it again; True when it is done."""
        state, logger = run.flow_run.state, get_run_logger()
        label = f"shard {run.shard.index + 1}/{len(self.runs)} ({run.flow_run.name})"
        # a shard run that ended with failed rows wrote its results too
        finished = state.type == StateType.COMPLETED or (state.type == StateType.FAILED
                                                         and state.name == ROWS_FAILED)
        if finished:
            try:
                items = read_results(run.results_uri, ALL_STAGES)
            except Exception as exc:  # noqa: BLE001 - a missing or damaged table is rendered again, never trusted
                items, cause = [], f"its results could not be read back ({type(exc).__name__}: {exc})"
            else:
                cause = f"its results hold rows {sorted(i.row for i in items)}, not {list(run.shard.rows)}"
            if sorted(item.row for item in items) == list(run.shard.rows):
                for item in items:
                    self.results.finish(item)
                run.succeeded = sum(item.status == "succeeded" for item in items)
                run.failed = len(items) - run.succeeded
                return True
        elif state.type == StateType.CANCELLED:
            return self.give_up(run, "ShardCancelled", f"{label} was cancelled")
        else:
            cause = f"it ended {state.name}" + (f": {state.message}" if state.message else "")
        if run.attempt >= self.cfg.shards.attempts:
            return self.give_up(run, "ShardLost", f"{label} did not finish after {run.attempt} dispatch(es): {cause}")
        logger.warning("%s: %s; dispatching it again (attempt %d of %d)", label, cause, run.attempt + 1,
                       self.cfg.shards.attempts)
        self.dispatch(run)
        return False

    def give_up(self, run: ShardRun, error_class: str, message: str) -> bool:
        get_run_logger().warning("%s; its %d rows count as failed", message, len(run.shard.rows))
        for index in run.shard.rows:
            self.results.finish(failed(self.results.base(self.rows[index]), "shard", error_class, message,
                                       run.attempt))
        run.failed = len(run.shard.rows)
        return True

    def table(self) -> None:
        """One row per shard: its rows, state, dispatches and outcome, linked to its run."""
        ui = PREFECT_UI_URL.value()
        rows = [{"shard": f"{r.shard.index + 1}/{len(self.runs)}", "rows": len(r.shard.rows),
                 "first row": r.shard.rows[0], "state": r.state, "dispatches": r.attempt,
                 "succeeded": r.succeeded, "failed": r.failed,
                 "run": f"{ui}/runs/flow-run/{r.flow_run.id}" if ui and r.flow_run else ""} for r in self.runs]
        done = sum(r.succeeded + r.failed for r in self.runs)
        shown(create_table_artifact, key=f"{self.prefix}-shards", table=rows,
               description=f"{done} of {sum(len(r.shard.rows) for r in self.runs)} rows of {len(self.runs)} shards "
                           "merged")
