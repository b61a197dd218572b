"""Walking a backend's stage graph for the rows of one manifest inside a flow run.

Every row is resolved first (its inputs hashed, every key derived, a finished output found). The rest are
rendered either item by item with every model resident (``memory="resident"``: each item's stages are submitted
as soon as it resolves, Prefect starting a stage when its inputs are done) or stage by stage
(``memory="stage-major"``: all items' first stage, then all items' next one, each model released after the last
stage that uses it, so LLaVA and the DiT never share a GPU). Outcomes are folded into results by
`manifests.fold_item`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.utilities.annotations import allow_failure

from common import storage
from manifests import ItemResult, ManifestRow, StageOutcome, already_published, failed, fold_item, write_results
from tasks.config import PipelineConfig
from tasks.gpu import ensure_slot, slot_for
from tasks.graph import ALL_STAGES, GRAPHS, Item
from tasks.models import process_models
from tasks.render import Job, StageFailed, resolve_task, stage_tasks
from tasks.stages.delivery import output_uris


class ItemsFailed(RuntimeError):
    """Raised after the results are written, so that the flow run ends Failed when any row failed."""


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


@dataclass
class ItemRun:
    row: ManifestRow
    job: Job
    futures: dict[str, PrefectFuture] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)  # stages whose run another item of this manifest owns


class ManifestRender:
    """The rows of one manifest through one backend's graph; results reach ``on_item`` as each item ends."""

    def __init__(self, cfg: PipelineConfig, output_uri: str, on_item: Callable[[ItemResult], None] | None,
                 log: Callable[[ItemResult], None]):
        self.cfg, self.graph, self.output_uri = cfg, GRAPHS[cfg.backend], output_uri
        self.cache_uri = cfg.cache_uri or storage.join(output_uri, ".cache")
        storage.sweep_staging(storage.join(output_uri, "videos"))  # what a killed run left half-copied
        slot = slot_for(cfg)
        if slot:
            ensure_slot(slot)
        self.tasks, self.resolve = stage_tasks(self.graph, cfg, self.cache_uri, slot), resolve_task(cfg)
        self.callbacks = [log] + ([on_item] if on_item else [])
        self.results: list[ItemResult] = []
        self.by_key: dict[str, PrefectFuture] = {}  # one run per stage key: lines of one portrait share its encodes
        self.last_gpu: PrefectFuture | None = None

    def finish(self, item: ItemResult) -> None:
        self.results.append(item)
        for callback in self.callbacks:
            callback(item)

    def base(self, row: ManifestRow) -> ItemResult:
        return ItemResult(row=row.row, item_id=row.item_id, status="succeeded", backend=self.cfg.backend,
                          extra=row.extra)

    def submit(self, run: ItemRun, stage_name: str) -> None:
        """Submit one stage of one item, or reuse the run of an earlier item with the same key (cached stages)."""
        stage, key = self.graph.stage(stage_name), run.job.resolved.stage_keys[stage_name]
        if stage.cached and key in self.by_key:
            run.futures[stage.name] = self.by_key[key]
            run.shared.add(stage.name)
            return
        inputs = {name: run.futures[name] for name in stage.inputs}
        # this run's gpu stages queue here in submission order, so only other runs contend for the GPU slot
        # (a slot wait is a server poll that backs off up to 30 s; a local queue hands the GPU on at once)
        after = [allow_failure(self.last_gpu)] if stage.resource == "gpu" and self.last_gpu else None
        future = self.tasks[stage.name].submit(stage.name, run.row.item_id, key, inputs, run.job, wait_for=after)
        run.futures[stage.name] = future
        if stage.resource == "gpu":
            self.last_gpu = future
        if stage.cached:
            self.by_key[key] = future

    def render(self, rows: list[ManifestRow]) -> None:
        for row in rows:
            if row.error is not None:
                self.finish(failed(self.base(row), "validate", type(row.error).__name__, str(row.error)))
        resolving = {self.resolve.submit(row.item_id, item_of(row), row_config(self.cfg, row), self.output_uri): row
                     for row in rows if row.error is None}
        stage_major = self.cfg.backend != "preview" and self.cfg.diffusion.memory == "stage-major"
        runs: list[ItemRun] = []
        for future in as_completed(list(resolving)):
            future.wait()  # settles the future's final state
            row, resolved = resolving[future], outcome(future)
            item = self.base(row)
            item.stage_seconds["resolve"], item.attempts = resolved.seconds, resolved.attempts
            if resolved.status == "failed":
                self.finish(failed(item, "resolve", resolved.error_class, resolved.error_message, resolved.attempts))
            elif resolved.ref["published"] is not None:
                self.finish(already_published(item, resolved.ref["published"],
                                              output_uris(self.output_uri, row.item_id)[1], self.graph.names))
            else:
                runs.append(ItemRun(row, Job(item_of(row), row_config(self.cfg, row), future.state.result(),
                                             self.cache_uri, self.output_uri)))
                if not stage_major:
                    for name in self.graph.names:
                        self.submit(runs[-1], name)
        if stage_major:
            self.walk_stage_major(runs)
            for run in runs:
                self.finish_run(run)
            return
        last = {run.futures[self.graph.names[-1]]: run for run in runs}
        for future in as_completed(list(last)):
            self.finish_run(last[future])

    def finish_run(self, run: ItemRun) -> None:
        wait(list(run.futures.values()))
        item = self.base(run.row)
        item.stage_seconds["resolve"], item.attempts = run.job.resolved.seconds, run.job.resolved.attempts
        outcomes = {name: outcome(run.futures[name], shared=name in run.shared) if name in run.futures
                    else StageOutcome("not_run") for name in self.graph.names}
        self.finish(fold_item(item, outcomes))

    def walk_stage_major(self, runs: list[ItemRun]) -> None:
        """Each stage for every live item, then the next; a model is released after the last stage using it."""
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

    def publish_results(self, manifest_uri: str, wall_seconds: float, flow_run_id: str) -> dict:
        """results.parquet, summary.json and a table artifact; ItemsFailed if any row failed."""
        results_uri = storage.join(self.output_uri, "results.parquet")
        frame = write_results(self.results, results_uri, ALL_STAGES)
        n_failed = int((frame["status"] == "failed").sum())
        summary = {
            "manifest_uri": manifest_uri, "output_uri": self.output_uri, "results_uri": results_uri,
            "backend": self.cfg.backend, "items": len(frame), "succeeded": len(frame) - n_failed, "failed": n_failed,
            "cache_hits": int(frame["cache_hits"].sum()), "wall_seconds": round(wall_seconds, 3),
            "flow_run_id": flow_run_id,
        }
        storage.publish_bytes(json.dumps(summary, indent=2).encode(), storage.join(self.output_uri, "summary.json"))
        table = frame[["item_id", "status", "error_class", "error_message", "output_uri", "frame_count", "cache_hits"]]
        create_table_artifact(key="render-manifest-results", table=table.astype(object).where(table.notna(), None)
                              .to_dict("records"), description=f"{summary['succeeded']} succeeded, {n_failed} failed: "
                              f"{results_uri}")
        if n_failed:
            raise ItemsFailed(f"{n_failed} of {len(frame)} items failed; see {results_uri}")
        return summary
