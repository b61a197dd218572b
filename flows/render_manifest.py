"""render_manifest: one Parquet manifest in; talking-portrait MP4s, results.parquet and summary.json out."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from avatar_model import storage
from manifests import ItemResult, ManifestRow, load_manifest, write_results
from tasks import render, stages
from tasks.config import PipelineConfig
from tasks.storage import result_storage_for

# Set by the CLI to drive its progress bar. The flow body runs in the caller's thread, so it sees the value.
ITEM_DONE: ContextVar[Callable[[ItemResult], None] | None] = ContextVar("avatar_item_done", default=None)

RENDER_STAGES = ("prepare_portrait", "prepare_audio", "generate", "decode", "mux", "publish")


class ItemsFailed(RuntimeError):
    """Raised after the results are written, so that the flow run ends Failed when any row failed."""


def _configured_tasks(cfg: PipelineConfig, cache_uri: str) -> dict[str, Any]:
    retry = {"retries": cfg.retry.retries, "retry_delay_seconds": cfg.retry.delays(),
             "retry_jitter_factor": cfg.retry.jitter_factor}
    cached = {**retry, "result_storage": result_storage_for(storage.join(cache_uri, "records"))}
    return {
        "resolve": render.resolve_item.with_options(**retry),
        "prepare_portrait": render.prepare_portrait.with_options(**cached),
        "prepare_audio": render.prepare_audio.with_options(**cached),
        "generate": render.generate.with_options(**cached),
        "decode": render.decode.with_options(**cached),
        "mux": render.mux.with_options(**cached),
        "publish": render.publish.with_options(**retry),
    }


def _row_config(cfg: PipelineConfig, row: ManifestRow) -> PipelineConfig:
    """The run's config with the row's own output options applied."""
    overrides = {"short_side": row.short_side, "crf": row.crf}
    video = cfg.video.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    return cfg.model_copy(update={"video": video})


def _submit_render(t: dict[str, Any], row: ManifestRow, resolved: dict, cfg: PipelineConfig, cache_uri: str,
                   output_uri: str) -> dict[str, PrefectFuture]:
    """Fan one resolved row out into its stage chain; Prefect resolves each future argument before a stage runs."""
    cfg = _row_config(cfg, row)
    video = cfg.video
    f: dict[str, PrefectFuture] = {}
    f["prepare_portrait"] = t["prepare_portrait"].submit(
        row.portrait_uri, resolved["portrait_sha256"], video.short_side, cache_uri, row.item_id)
    f["prepare_audio"] = t["prepare_audio"].submit(
        row.audio_uri, resolved["audio_sha256"], cfg.audio, video.audio_sample_rate, cache_uri, row.item_id)
    f["generate"] = t["generate"].submit(f["prepare_portrait"], f["prepare_audio"], row.seed, row.prompt, cfg,
                                         cache_uri, row.item_id)
    f["decode"] = t["decode"].submit(f["prepare_portrait"], f["generate"], row.prompt, cfg, cache_uri, row.item_id)
    f["mux"] = t["mux"].submit(f["decode"], f["prepare_audio"], video, cache_uri, row.item_id)
    provenance = {
        "row": row.row,
        "inputs": {"portrait_uri": row.portrait_uri, "portrait_sha256": resolved["portrait_sha256"],
                   "audio_uri": row.audio_uri, "audio_sha256": resolved["audio_sha256"]},
        "parameters": {"backend": cfg.backend, "seed": row.seed, "prompt": row.prompt, "video": video.model_dump(),
                       "renderer": stages.renderer_for(cfg).output_params(row.prompt)},
    }
    f["publish"] = t["publish"].submit(row.item_id, f["mux"], provenance, output_uri)
    return f


def _base(row: ManifestRow, backend: str) -> ItemResult:
    return ItemResult(row=row.row, item_id=row.item_id, status="succeeded", backend=backend, extra=row.extra)


def _fail(result: ItemResult, stage: str, state: State) -> ItemResult:
    exc = state.result(raise_on_failure=False)
    known = isinstance(exc, BaseException)
    result.status, result.failed_stage = "failed", stage
    result.error_class = type(exc).__name__ if known else state.name
    result.error_message = str(exc) if known else state.message
    result.attempts = max(result.attempts, getattr(exc, "attempts", 1))
    return result


def _account(result: ItemResult, stage: str, state: State) -> dict:
    """Add one finished stage's seconds, attempts and cache hit to the item's result; return its reference."""
    ref = state.result()
    cached = state.name == "Cached" or ref.get("skipped", False)
    result.cache_hits += int(cached)
    result.stage_seconds[stage] = 0.0 if state.name == "Cached" else ref["seconds"]
    result.attempts = max(result.attempts, 1 if state.name == "Cached" else ref["attempts"])
    return ref


def _rendered(result: ItemResult, futures: dict[str, PrefectFuture]) -> ItemResult:
    """Fold a rendered item's stage states into its results row: the first failed stage names the error."""
    refs: dict[str, dict] = {}
    for stage in RENDER_STAGES:
        state = futures[stage].state
        if state.is_failed():
            return _fail(result, stage, state)
        if state.is_completed():
            refs[stage] = _account(result, stage, state)
    mux, publish = refs["mux"], refs["publish"]
    result.output_uri, result.sidecar_uri, result.sha256 = publish["output_uri"], publish["sidecar_uri"], mux["sha256"]
    result.frame_count, result.video_seconds, result.audio_seconds = (
        mux["n_frames"], mux["video_seconds"], mux["audio_seconds"])
    return result


def _already_published(result: ItemResult, sidecar: dict, output_uri: str) -> ItemResult:
    """An item whose output already carries its render key: every render stage is a cache hit."""
    result.cache_hits += len(RENDER_STAGES)
    result.stage_seconds.update(dict.fromkeys(RENDER_STAGES, 0.0))
    result.output_uri, result.sha256 = sidecar["video_uri"], sidecar["sha256"]
    result.sidecar_uri = stages.output_uris(output_uri, result.item_id)[1]
    result.frame_count, result.video_seconds, result.audio_seconds = (
        sidecar["frame_count"], sidecar["video_seconds"], sidecar["audio_seconds"])
    return result


@flow(name="render-manifest", task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=True)
def render_manifest(manifest_uri: str, output_uri: str, backend: str = "preview",
                    config: PipelineConfig | None = None) -> dict:
    """Render every row of the manifest at ``manifest_uri`` into ``output_uri``.

    Bad rows fail alone and are recorded in ``results.parquet``; the run ends Failed if any row failed.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    cfg = PipelineConfig.model_validate({**(config or PipelineConfig()).model_dump(), "backend": backend})
    cache_uri = cfg.cache_uri or storage.join(output_uri, ".cache")
    rows = load_manifest(manifest_uri)
    logger.info("manifest %s: %d rows (%d invalid)", manifest_uri, len(rows), sum(r.error is not None for r in rows))
    t = _configured_tasks(cfg, cache_uri)
    notify = ITEM_DONE.get() or (lambda item: None)
    results: list[ItemResult] = []

    def finish(item: ItemResult) -> None:
        results.append(item)
        logger.info("%s: %s%s", item.item_id, item.status,
                    f" ({item.error_class}: {item.error_message})" if item.error_class else "")
        notify(item)

    for row in (r for r in rows if r.error is not None):
        item = _base(row, cfg.backend)
        item.status, item.failed_stage = "failed", "validate"
        item.error_class, item.error_message = type(row.error).__name__, str(row.error)
        finish(item)

    # 1. resolve every row (hash inputs, find finished outputs); 2. render the rest as each resolves
    resolving = {t["resolve"].submit(row.item_id, row.portrait_uri, row.audio_uri, row.seed, row.prompt,
                                     _row_config(cfg, row), output_uri): row
                 for row in rows if row.error is None}
    rendering: dict[PrefectFuture, tuple[ItemResult, dict[str, PrefectFuture]]] = {}
    for future in as_completed(list(resolving)):
        future.wait()  # settles the future's final state
        row, state = resolving[future], future.state
        item = _base(row, cfg.backend)
        if state.is_failed():
            finish(_fail(item, "resolve", state))
            continue
        resolved = _account(item, "resolve", state)
        if resolved["published"] is not None:
            finish(_already_published(item, resolved["published"], output_uri))
            continue
        chain = _submit_render(t, row, resolved, cfg, cache_uri, output_uri)
        rendering[chain["publish"]] = (item, chain)
    for future in as_completed(list(rendering)):
        item, chain = rendering[future]
        for stage_future in chain.values():
            stage_future.wait()
        finish(_rendered(item, chain))

    results_uri = storage.join(output_uri, "results.parquet")
    frame = write_results(results, results_uri)
    failed = int((frame["status"] == "failed").sum())
    summary = {
        "manifest_uri": manifest_uri, "output_uri": output_uri, "results_uri": results_uri,
        "backend": cfg.backend, "items": len(frame), "succeeded": len(frame) - failed, "failed": failed,
        "cache_hits": int(frame["cache_hits"].sum()), "wall_seconds": round(time.perf_counter() - started, 3),
        "flow_run_id": str(flow_run.id),
    }
    storage.publish_bytes(json.dumps(summary, indent=2).encode(), storage.join(output_uri, "summary.json"))
    table = frame[["item_id", "status", "error_class", "error_message", "output_uri", "frame_count", "cache_hits"]]
    create_table_artifact(key="render-manifest-results", table=table.astype(object).where(table.notna(), None)
                          .to_dict("records"), description=f"{summary['succeeded']} succeeded, {failed} failed: "
                          f"{results_uri}")
    if failed:
        raise ItemsFailed(f"{failed} of {len(frame)} items failed; see {results_uri}")
    return summary
