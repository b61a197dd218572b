"""Walking a backend's stage graph for the rows of one manifest inside a flow run.

Each row is resolved (its inputs hashed, every key derived, a finished output found), then rendered either with
every model resident (``memory="resident"``: its stages submitted as soon as it resolves) or stage by stage
(``memory="stage-major"``, a window of items at a time). Rows enter through a bounded window of items in flight.
Outcomes are folded into results by `manifests.fold_item`; an item that failed on a stale cached input is
submitted once more, after that input's record was dropped.
"""

from __future__ import annotations

import json
import queue
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from prefect import get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.utilities.annotations import allow_failure

from common import storage
from manifests import ItemResult, ManifestRow, StageOutcome, already_published, failed, fold_item, write_results
from tasks.config import PipelineConfig
from tasks.gpu import ensure_slot, slot_for
from tasks.graph import ALL_STAGES, GRAPHS, Item
from tasks.models import process_models
from tasks.render import SKIPPED, Job, StageFailed, resolve_task, stage_tasks
from tasks.stages.delivery import output_uris

from .engines import placed
from .report import RunReport

SHARED_KEYS_PER_ITEM = 8  # cached stage futures kept for reuse, per item of the window


class ItemsFailed(RuntimeError):
    """Raised after the results are written, so that the flow run ends Failed when any row failed."""


# the state name of a run that finished with failed rows: Failed by type (alerts fire), "RowsFailed" by name, so
# that it differs from a crash (Crashed) and from a refused run (Failed, named Failed)
ROWS_FAILED = "RowsFailed"


def row_config(cfg: PipelineConfig, row: ManifestRow) -> PipelineConfig:
    """The run's config with the row's own output options applied."""
    overrides = {"short_side": row.short_side, "crf": row.crf}
    video = cfg.video.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    return cfg.model_copy(update={"video": video})


def item_of(row: ManifestRow) -> Item:
    return Item(item_id=row.item_id, row=row.row, portrait_uri=row.portrait_uri, audio_uri=row.audio_uri,
                prompt=row.prompt, seed=row.seed)


def outcome(future: PrefectFuture, shared: bool = False) -> StageOutcome:
    """A finished stage future as the results see it; a run shared with an earlier item is a hit for this one."""
    state = future.state
    if state.name == SKIPPED:
        return StageOutcome("not_run")  # an upstream stage failed
    if state.is_completed():
        ref = state.result()
        cached = shared or state.name == "Cached"
        return StageOutcome("cached" if cached else "completed", ref.model_dump(), ref.seconds, ref.attempts)
    if not state.is_final():
        return StageOutcome("not_run")  # an upstream stage failed
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, StageFailed):
        return StageOutcome("failed", error_class=exc.error_class, error_message=exc.message, attempts=exc.attempt)
    return StageOutcome("failed", error_class=state.name, error_message=state.message or str(exc), attempts=1)


# failures whose cause is a cached input that cannot be trusted: that input's record is dropped, and the item is
# submitted once more so the stage that made it runs again
REPAIRABLE = frozenset({"StaleArtifact", "EncoderError"})


@dataclass
class ItemRun:
    row: ManifestRow
    job: Job
    repair: bool = False  # the second submission, after a stale input was dropped
    futures: dict[str, PrefectFuture] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)  # stages whose run another item of this manifest owns


class RunResults:
    """The items of one run as they end: kept for ``results.parquet`` and handed to each callback (log, UI, bar)."""

    def __init__(self, cfg: PipelineConfig, output_uri: str, callbacks: list[Callable[[ItemResult], None]]):
        self.cfg, self.output_uri, self.callbacks = cfg, output_uri, callbacks
        self.items: list[ItemResult] = []

    def base(self, row: ManifestRow) -> ItemResult:
        return ItemResult(row=row.row, item_id=row.item_id, status="succeeded", backend=self.cfg.backend,
                          extra=row.extra)

    def finish(self, item: ItemResult) -> None:
        self.items.append(item)
        for callback in self.callbacks:
            callback(item)

    def valid(self, rows: list[ManifestRow]) -> list[ManifestRow]:
        """The rows that passed validation; the others are recorded as failed at once."""
        for row in rows:
            if row.error is not None:
                self.finish(failed(self.base(row), "validate", type(row.error).__name__, str(row.error)))
        return [row for row in rows if row.error is None]

    def publish(self, manifest_uri: str, wall_seconds: float, flow_run_id: str, report: RunReport) -> dict:
        """results.parquet, summary.json and the run's final artifacts; ItemsFailed if any row failed."""
        results_uri = storage.join(self.output_uri, "results.parquet")
        frame = write_results(self.items, results_uri, ALL_STAGES)
        n_failed = int((frame["status"] == "failed").sum())
        summary = {
            "manifest_uri": manifest_uri, "output_uri": self.output_uri, "results_uri": results_uri,
            "backend": self.cfg.backend, "items": len(frame), "succeeded": len(frame) - n_failed, "failed": n_failed,
            "cache_hits": int(frame["cache_hits"].sum()), "wall_seconds": round(wall_seconds, 3),
            "flow_run_id": flow_run_id,
        }
        storage.publish_bytes(json.dumps(summary, indent=2).encode(), storage.join(self.output_uri, "summary.json"))
        report.final(frame, summary, self.output_uri)
        if n_failed:
            raise ItemsFailed(f"{n_failed} of {len(frame)} items failed; see {results_uri}")
        return summary


class ManifestRender:
    """The valid rows of one manifest through one backend's graph, in this flow run; each item's result goes to
    ``results`` as it ends.

    At most ``cfg.window`` items are in flight (resolving or rendering), so a manifest of any length starts
    rendering at once and holds only a window of futures; each input is hashed once per run (`InputDigests`).
    """

    def __init__(self, cfg: PipelineConfig, output_uri: str, results: RunResults):
        self.cfg, self.graph, self.output_uri, self.results = cfg, GRAPHS[cfg.backend], output_uri, results
        self.cache_uri = cfg.cache_uri or storage.join(output_uri, ".cache")
        storage.sweep_staging(storage.join(output_uri, "videos"))  # what a killed run left half-copied
        slot = slot_for(cfg)
        if slot:
            ensure_slot(slot)
        self.tasks, self.resolve = stage_tasks(self.graph, cfg, self.cache_uri, slot), resolve_task(cfg)
        self.digests = storage.InputDigests()
        # one run per stage key (lines of one portrait share its encodes); the most recently used keys only,
        # an older one is found again through its cache record
        self.by_key: OrderedDict[str, PrefectFuture] = OrderedDict()
        self.last_gpu: PrefectFuture | None = None

    def submit(self, run: ItemRun, stage_name: str) -> None:
        """Submit one stage of one item, or reuse the run of an earlier item with the same key (cached stages)."""
        stage, key = self.graph.stage(stage_name), run.job.resolved.stage_keys[stage_name]
        if stage.cached and key in self.by_key and not run.repair:
            self.by_key.move_to_end(key)
            run.futures[stage.name] = self.by_key[key]
            run.shared.add(stage.name)
            return
        # inputs reach a stage even when their stage failed (see tasks.render.run_stage); dask loses `allow_failure`
        # on the way (flows.engines), so there a stage after a failed one ends NotReady instead
        tolerant = allow_failure if not self.cfg.dask_address else (lambda future: future)
        inputs = {name: tolerant(run.futures[name]) for name in stage.inputs}
        # this run's gpu stages queue here in submission order, so only other runs contend for the GPU slot
        # (a slot wait is a server poll that backs off up to 30 s; a local queue hands the GPU on at once); on dask
        # the workers' GPU resource does the queueing
        chained = stage.resource == "gpu" and self.last_gpu and not self.cfg.dask_address
        after = [allow_failure(self.last_gpu)] if chained else None
        with placed(self.cfg, stage.resource):
            future = self.tasks[stage.name].submit(stage.name, run.row.item_id, key, inputs, run.job, wait_for=after)
        run.futures[stage.name] = future
        if stage.resource == "gpu":
            self.last_gpu = future
        if stage.cached:
            self.by_key[key] = future
            self.by_key.move_to_end(key)
            while len(self.by_key) > SHARED_KEYS_PER_ITEM * self.cfg.window:
                self.by_key.popitem(last=False)

    def render(self, rows: list[ManifestRow]) -> None:
        if self.cfg.backend != "preview" and self.cfg.diffusion.memory == "stage-major":
            for start in range(0, len(rows), self.cfg.window):
                self.render_stage_major(rows[start:start + self.cfg.window])
        else:
            self.render_resident(rows)

    def submit_resolve(self, row: ManifestRow) -> PrefectFuture:
        return self.resolve.submit(row.item_id, item_of(row), row_config(self.cfg, row), self.output_uri, self.digests)

    def resolved(self, row: ManifestRow, future: PrefectFuture) -> ItemRun | None:
        """The item's run when it has work to do; None when it is finished already (failed or published)."""
        future.wait()  # settles the future's final state
        resolved = outcome(future)
        item = self.results.base(row)
        item.stage_seconds["resolve"], item.attempts = resolved.seconds, resolved.attempts
        if resolved.status == "failed":
            self.results.finish(failed(item, "resolve", resolved.error_class, resolved.error_message,
                                       resolved.attempts))
        elif resolved.ref["published"] is not None:
            self.results.finish(already_published(item, resolved.ref["published"],
                                                  output_uris(self.output_uri, row.item_id)[1], self.graph.names))
        else:
            return ItemRun(row, Job(item_of(row), row_config(self.cfg, row), future.state.result(), self.cache_uri,
                                    self.output_uri))
        return None

    def ended(self, run: ItemRun) -> ItemRun | None:
        """Record a run whose stages all ended; return its repair run when a stale input caused its failure."""
        wait(list(run.futures.values()))
        item = self.results.base(run.row)
        item.stage_seconds["resolve"], item.attempts = run.job.resolved.seconds, run.job.resolved.attempts
        outcomes = {name: outcome(run.futures[name], shared=name in run.shared) if name in run.futures
                    else StageOutcome("not_run") for name in self.graph.names}
        item = fold_item(item, outcomes)
        if item.status == "failed" and item.error_class in REPAIRABLE and not run.repair:
            get_run_logger().warning("%s: %s in %s (%s); computing its inputs again", item.item_id, item.error_class,
                                     item.failed_stage, item.error_message)
            return ItemRun(run.row, run.job, repair=True)
        self.results.finish(item)
        return None

    def render_resident(self, rows: list[ManifestRow]) -> None:
        """Each item's stages are submitted as soon as it resolves (Prefect starts a stage when its inputs are
        done); new rows are resolved as items leave the window."""
        events: queue.SimpleQueue[Callable[[], bool]] = queue.SimpleQueue()

        def when_done(future: PrefectFuture, handler: Callable[[], bool]) -> None:
            future.add_done_callback(lambda _: events.put(handler))

        def start(run: ItemRun) -> bool:
            for name in self.graph.names:
                self.submit(run, name)
            when_done(run.futures[self.graph.names[-1]], partial(end, run))
            return False

        def end(run: ItemRun) -> bool:
            repair = self.ended(run)
            return start(repair) if repair else True

        def resolved(row: ManifestRow, future: PrefectFuture) -> bool:
            run = self.resolved(row, future)
            return start(run) if run else True

        pending, in_flight = iter(rows), 0
        while True:
            while in_flight < self.cfg.window and (row := next(pending, None)) is not None:
                future = self.submit_resolve(row)
                when_done(future, partial(resolved, row, future))
                in_flight += 1
            if not in_flight:
                return
            if events.get()():  # an item left the window
                in_flight -= 1

    def render_stage_major(self, rows: list[ManifestRow]) -> None:
        """One window of items stage by stage: every item's first stage, then every item's next one, each model
        released after the last stage that uses it, so LLaVA and the DiT never share a GPU."""
        resolving = [(row, self.submit_resolve(row)) for row in rows]
        runs = [run for row, future in resolving if (run := self.resolved(row, future))]
        while runs:
            self.walk_stage_major(runs)
            runs = [repair for run in runs if (repair := self.ended(run))]

    def walk_stage_major(self, runs: list[ItemRun]) -> None:
        live = runs
        for stage in self.graph:
            for run in live:
                self.submit(run, stage.name)
            wait([run.futures[stage.name] for run in live])
            live = [run for run in live if run.futures[stage.name].state.is_completed()]
            models = process_models()
            unused = set(models.loaded()) - self.graph.models_after(stage.name)
            if unused:
                models.release(*unused)
