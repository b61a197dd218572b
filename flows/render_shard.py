"""render_shard: some rows of a manifest, rendered on one worker with its models resident (see `flows.shards`).

A shard writes its items' results to ``results_uri`` for the parent run to merge; the videos go to the shared
``output_uri`` as they would in one run, published atomically under their render keys.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from manifests import ItemResult, ManifestError, load_manifest, write_results
from tasks.checks import check_locations, prepare_run
from tasks.config import PipelineConfig, ShardConfig
from tasks.graph import ALL_STAGES

from .dag import ROWS_FAILED, ManifestRender, RunResults
from .report import RunReport, artifact_prefix, manifest_stem


def shard_run_name() -> str:
    """``render-<manifest stem>-<shard>of<shards>``."""
    p = flow_run.parameters
    return f"render-{manifest_stem(str(p.get('manifest_uri', 'manifest')))}-{p.get('shard', 1)}of{p.get('shards', 1)}"


@flow(name="render-shard", flow_run_name=shard_run_name, task_runner=ThreadPoolTaskRunner(max_workers=4),
      validate_parameters=True)
def render_shard(manifest_uri: str, output_uri: str, rows: list[int], results_uri: str, shard: int = 1,
                 shards: int = 1, config: PipelineConfig | None = None) -> dict | State:
    """Render the manifest rows numbered ``rows`` into ``output_uri``; their results go to ``results_uri``."""
    logger = get_run_logger()
    started = time.perf_counter()
    # this machine resolves every ``auto`` for itself; a shard never shards again
    cfg = prepare_run((config or PipelineConfig()).model_copy(update={"shards": ShardConfig()}))
    wanted = set(rows)
    selected = [row for row in load_manifest(manifest_uri) if row.row in wanted]
    if len(selected) != len(wanted):
        raise ManifestError(f"{manifest_uri} has no rows {sorted(wanted - {r.row for r in selected})[:10]}: "
                               "did it change while the run was going?")
    check_locations(cfg, output_uri)
    logger.info("shard %d of %d: %d rows of %s", shard, shards, len(selected), manifest_uri)

    def log(item: ItemResult) -> None:
        logger.info("%s: %s%s", item.item_id, item.status,
                    f" ({item.error_class}: {item.error_message})" if item.error_class else "")

    report = RunReport(f"{artifact_prefix(manifest_uri)}-{shard}of{shards}", len(selected),
                       {r.item_id: (r.portrait_uri, r.audio_uri) for r in selected})
    report.start()
    results = RunResults(cfg, output_uri, [log, report.item])
    ManifestRender(cfg, output_uri, results).render(results.valid(selected))
    frame = write_results(results.items, results_uri, ALL_STAGES)
    report.table(f"{report.description()}: merged by the parent run")
    n_failed = int((frame["status"] == "failed").sum())
    summary = {"rows": len(frame), "succeeded": len(frame) - n_failed, "failed": n_failed,
               "wall_seconds": round(time.perf_counter() - started, 3), "results_uri": results_uri}
    if n_failed:
        return Failed(name=ROWS_FAILED, message=f"{n_failed} of {len(frame)} items failed; see {results_uri}",
                      data=summary)
    return summary
