"""render_manifest: one Parquet manifest in; talking-portrait MP4s, results.parquet and summary.json out."""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from common.errors import ConfigurationError
from manifests import ItemResult, load_manifest
from tasks.checks import check_locations, prepare_run
from tasks.config import PipelineConfig

from .dag import ROWS_FAILED, ItemsFailed, ManifestRender, RunResults
from .report import RunReport, artifact_prefix, manifest_stem
from .shards import ShardedRender, check_pool, sharded

__all__ = ["ROWS_FAILED", "ItemsFailed", "render_manifest", "run_config"]


def run_config(config: PipelineConfig | None, backend: str | None) -> PipelineConfig:
    """The run's config: ``backend`` may name the backend only when the config does not say otherwise."""
    cfg = config or PipelineConfig()
    if backend is not None and config is not None and backend != config.backend:
        raise ConfigurationError(f"backend={backend!r} disagrees with config.backend={config.backend!r}; "
                                 "set the backend in one place")
    return cfg if backend is None else PipelineConfig.model_validate({**cfg.model_dump(), "backend": backend})


def render_run_name() -> str:
    """Runs are named after what they render: ``render-<manifest stem>``."""
    return "render-" + manifest_stem(str(flow_run.parameters.get("manifest_uri", "manifest")))


@flow(name="render-manifest", flow_run_name=render_run_name, task_runner=ThreadPoolTaskRunner(max_workers=4),
      validate_parameters=True)
def render_manifest(manifest_uri: str, output_uri: str, config: PipelineConfig | None = None,
                    backend: str | None = None, on_item: Callable[[ItemResult], None] | None = None) -> dict | State:
    """Render every row of the manifest at ``manifest_uri`` into ``output_uri``.

    Run-level problems (unknown backend, a wrong fps, missing weights, an unreadable manifest) stop the run
    before any work. Bad rows fail alone and are recorded in ``results.parquet``; the run then ends Failed.
    With ``config.shards.deployment`` set, a manifest of at least ``min_rows`` valid rows is rendered as shards
    on that deployment's work pool (`flows.shards`), else here.
    ``on_item`` is called with each item's result as it finishes (the CLI's progress bar).
    """
    logger = get_run_logger()
    started = time.perf_counter()
    requested = run_config(config, backend)
    rows = load_manifest(manifest_uri)
    spread = sharded(requested.shards, sum(r.error is None for r in rows))
    # a parent of shards neither loads models nor needs weights: each shard checks and resolves on its machine
    cfg = requested if spread else prepare_run(requested)
    check_locations(cfg, output_uri)
    if spread and (warning := check_pool(cfg.shards.deployment)):
        logger.warning(warning)
    logger.info("manifest %s: %d rows (%d invalid)", manifest_uri, len(rows), sum(r.error is not None for r in rows))

    def log(item: ItemResult) -> None:
        logger.info("%s: %s%s", item.item_id, item.status,
                    f" ({item.error_class}: {item.error_message})" if item.error_class else "")

    prefix = artifact_prefix(manifest_uri)
    report = RunReport(prefix, len(rows), {r.item_id: (r.portrait_uri, r.audio_uri) for r in rows})
    report.start()
    results = RunResults(cfg, output_uri, [log, report.item] + ([on_item] if on_item else []))
    valid = results.valid(rows)
    if spread:
        ShardedRender(cfg, manifest_uri, output_uri, results, str(flow_run.id), prefix).render(valid)
    else:
        ManifestRender(cfg, output_uri, results).render(valid)
    try:
        return results.publish(manifest_uri, time.perf_counter() - started, str(flow_run.id), report)
    except ItemsFailed as exc:
        return Failed(name=ROWS_FAILED, message=str(exc), data=exc)
