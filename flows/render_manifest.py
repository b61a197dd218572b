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
from prefect.task_runners import ThreadPoolTaskRunner

from avatar_model import storage
from avatar_model.backends import renderer_version
from manifests import ItemResult, ManifestRow, load_manifest, write_results
from tasks import render
from tasks.config import PipelineConfig
from tasks.storage import result_storage_for

# Set by the CLI to drive its progress bar. The flow body runs in the caller's thread, so it sees the value.
ITEM_DONE: ContextVar[Callable[[ItemResult], None] | None] = ContextVar("avatar_item_done", default=None)

# Stage futures of one item, in pipeline order, and the results column each one's seconds add to.
STAGE_COLUMNS = {"fingerprint_portrait": "fingerprint", "fingerprint_audio": "fingerprint",
                 "prepare_portrait": "prepare_portrait", "prepare_audio": "prepare_audio", "generate": "generate",
                 "decode": "decode", "mux": "mux", "publish": "publish"}


class ItemsFailed(RuntimeError):
    """Raised after the results are written, so that the flow run ends Failed when any row failed."""


def _configured_tasks(cfg: PipelineConfig, cache_uri: str) -> dict[str, Any]:
    retry = {"retries": cfg.retry.retries, "retry_delay_seconds": cfg.retry.delays(),
             "retry_jitter_factor": cfg.retry.jitter_factor}
    cached = {**retry, "result_storage": result_storage_for(storage.join(cache_uri, "records"))}
    return {
        "fingerprint": render.fingerprint.with_options(**retry),
        "prepare_portrait": render.prepare_portrait.with_options(**cached),
        "prepare_audio": render.prepare_audio.with_options(**cached),
        "generate": render.generate.with_options(**cached),
        "decode": render.decode.with_options(**cached),
        "mux": render.mux.with_options(**cached),
        "publish": render.publish.with_options(**retry),
    }


def _submit_item(t: dict[str, Any], row: ManifestRow, cfg: PipelineConfig, cache_uri: str,
                 output_uri: str) -> dict[str, PrefectFuture]:
    """Fan one row out into its stage chain; Prefect resolves each future argument before a stage runs."""
    overrides = {"short_side": row.short_side, "crf": row.crf}
    video = cfg.video.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    f: dict[str, PrefectFuture] = {}
    f["fingerprint_portrait"] = t["fingerprint"].submit(row.portrait_uri)
    f["fingerprint_audio"] = t["fingerprint"].submit(row.audio_uri)
    f["prepare_portrait"] = t["prepare_portrait"].submit(
        row.portrait_uri, f["fingerprint_portrait"], video.short_side, cache_uri, row.item_id)
    f["prepare_audio"] = t["prepare_audio"].submit(
        row.audio_uri, f["fingerprint_audio"], cfg.audio, video.audio_sample_rate, cache_uri, row.item_id)
    f["generate"] = t["generate"].submit(
        f["prepare_portrait"], f["prepare_audio"], row.seed, cfg.backend, cfg.preview, video, cache_uri)
    f["decode"] = t["decode"].submit(f["prepare_portrait"], f["generate"], cfg.backend, cfg.preview, video, cache_uri)
    f["mux"] = t["mux"].submit(f["decode"], f["prepare_audio"], video, cache_uri)
    provenance = {
        "row": row.row,
        "inputs": {"portrait_uri": row.portrait_uri, "audio_uri": row.audio_uri,
                   "portrait": f["fingerprint_portrait"], "audio": f["fingerprint_audio"]},
        "parameters": {"backend": cfg.backend, "backend_version": renderer_version(cfg.backend), "seed": row.seed,
                       "prompt": row.prompt, "video": video.model_dump(), "preview": cfg.preview.model_dump()},
        "stages": {"portrait": f["prepare_portrait"], "audio": f["prepare_audio"], "mux": f["mux"]},
    }
    f["publish"] = t["publish"].submit(row.item_id, f["mux"], provenance, output_uri)
    return f


def _outcome(row: ManifestRow, futures: dict[str, PrefectFuture], backend: str) -> ItemResult:
    """Fold one item's stage states into its results row: first failed stage wins."""
    result = ItemResult(row=row.row, item_id=row.item_id, status="succeeded", backend=backend, extra=row.extra)
    for stage, column in STAGE_COLUMNS.items():
        state = futures[stage].state
        if state.is_failed():
            exc = state.result(raise_on_failure=False)
            result.status, result.failed_stage = "failed", stage
            result.error_class = type(exc).__name__ if isinstance(exc, BaseException) else "Failed"
            result.error_message = str(exc) if isinstance(exc, BaseException) else state.message
            result.attempts = max(result.attempts, getattr(exc, "attempts", 1))
            return result
        if not state.is_completed():
            continue
        ref = state.result()
        cached = state.name == "Cached"
        result.cache_hits += int(cached or ref.get("skipped", False))
        seconds = 0.0 if cached else ref["seconds"]
        result.stage_seconds[column] = result.stage_seconds.get(column, 0.0) + seconds
        result.attempts = max(result.attempts, 1 if cached else ref["attempts"])
    publish = futures["publish"].state.result()
    mux = futures["mux"].state.result()
    result.output_uri, result.sidecar_uri, result.sha256 = publish["output_uri"], publish["sidecar_uri"], publish["sha256"]
    result.frame_count, result.video_seconds, result.audio_seconds = mux["n_frames"], mux["video_seconds"], mux["audio_seconds"]
    return result


def _invalid(row: ManifestRow, backend: str) -> ItemResult:
    return ItemResult(row=row.row, item_id=row.item_id, status="failed", backend=backend, extra=row.extra,
                      error_class=type(row.error).__name__, error_message=str(row.error), failed_stage="validate")


@flow(name="render-manifest", task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=True)
def render_manifest(manifest_uri: str, output_uri: str, backend: str = "preview",
                    config: PipelineConfig | None = None) -> dict:
    """Render every row of the manifest at ``manifest_uri`` into ``output_uri``.

    Bad rows fail alone and are recorded in ``results.parquet``; the run ends Failed if any row failed.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    cfg = (config or PipelineConfig()).model_copy(update={"backend": backend})
    cache_uri = cfg.cache_uri or storage.join(output_uri, ".cache")
    rows = load_manifest(manifest_uri)
    logger.info("manifest %s: %d rows (%d invalid)", manifest_uri, len(rows), sum(r.error is not None for r in rows))

    tasks = _configured_tasks(cfg, cache_uri)
    results = [_invalid(r, cfg.backend) for r in rows if r.error is not None]
    submitted = {id(f["publish"]): (r, f) for r in rows if r.error is None
                 for f in [_submit_item(tasks, r, cfg, cache_uri, output_uri)]}
    notify = ITEM_DONE.get()
    for r in results:
        if notify:
            notify(r)
    for done in as_completed([f["publish"] for _, f in submitted.values()]):
        row, futures = submitted[id(done)]
        for fut in futures.values():
            fut.wait()
        item = _outcome(row, futures, cfg.backend)
        results.append(item)
        logger.info("%s: %s%s", item.item_id, item.status, f" ({item.error_class}: {item.error_message})" if item.error_class else "")
        if notify:
            notify(item)

    results_uri = storage.join(output_uri, "results.parquet")
    frame = write_results(results, results_uri)
    failed = frame[frame["status"] == "failed"]
    summary = {
        "manifest_uri": manifest_uri, "output_uri": output_uri, "results_uri": results_uri,
        "backend": cfg.backend, "items": len(frame), "succeeded": int(len(frame) - len(failed)),
        "failed": int(len(failed)), "cache_hits": int(frame["cache_hits"].sum()) if len(frame) else 0,
        "wall_seconds": round(time.perf_counter() - started, 3), "flow_run_id": str(flow_run.id),
    }
    storage.publish_bytes(json.dumps(summary, indent=2).encode(), storage.join(output_uri, "summary.json"))
    create_table_artifact(
        key="render-manifest-results",
        table=frame[["item_id", "status", "error_class", "error_message", "output_uri", "frame_count", "cache_hits"]]
        .astype(object).where(frame.notna(), None).to_dict("records"),
        description=f"{summary['succeeded']} succeeded, {summary['failed']} failed — {results_uri}",
    )
    if len(failed):
        raise ItemsFailed(f"{len(failed)} of {len(frame)} items failed; see {results_uri}")
    return summary
