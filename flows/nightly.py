"""nightly_render: the scheduled entry point; a date picks the manifest and the output prefix.

A scheduled run uses its own scheduled date; a backfill passes ``day`` explicitly (see `avatar-batch backfill`).
"""

from __future__ import annotations

import io
import json
import os
from datetime import date

import pandas as pd
from prefect import flow
from prefect.runtime import flow_run
from prefect.states import State

from common import storage
from flows.engines import task_runner
from flows.render_manifest import render_manifest, run_config
from flows.report import RunReport, artifact_prefix
from manifests import ManifestError, load_manifest
from tasks.config import PipelineConfig


def run_day(day: date | str | None) -> date:
    """The logical date of this run: ``day`` when given, else the scheduled start date, else today."""
    if day is not None:
        return day if isinstance(day, date) else date.fromisoformat(str(day))
    scheduled = flow_run.scheduled_start_time
    return scheduled.date() if scheduled else date.today()


def nightly_run_name() -> str:
    """``nightly-<day>``: the UI and the backfill table show which day a run renders."""
    return f"nightly-{run_day(flow_run.parameters.get('day')).isoformat()}"


def located(template: str, day: str) -> str:
    """The day's URI; a relative path is taken from the working directory (the worker's: AVATAR_BATCH_HOME)."""
    uri = template.format(date=day)
    return uri if "://" in uri else os.path.abspath(uri)


@flow(name="nightly-render", flow_run_name=nightly_run_name)
def nightly_render(manifest_template: str, output_template: str, day: date | None = None,
                   backend: str | None = None, config: PipelineConfig | None = None) -> dict | State:
    """Render ``manifest_template.format(date=…)`` into ``output_template.format(date=…)`` as a subflow.

    This run carries the render's artifacts too: its progress follows the subflow's items live, and its results
    table, summary and contact sheet are made from what the subflow wrote.
    """
    logical = run_day(day).isoformat()
    manifest_uri, output_uri = located(manifest_template, logical), located(output_template, logical)
    cfg = run_config(config, backend)
    try:
        rows = load_manifest(manifest_uri)
    except ManifestError:
        rows = []  # the subflow refuses the run with the same error, in its own state
    report = RunReport(artifact_prefix(manifest_uri), len(rows), {r.item_id: (r.portrait_uri, r.audio_uri)
                                                                  for r in rows}, live_table=False)
    if rows:
        report.start()
    render = render_manifest.with_options(task_runner=task_runner(cfg))
    state = render(manifest_uri=manifest_uri, output_uri=output_uri, config=cfg, on_item=report.item,
                   return_state=True)
    summary_uri = storage.join(output_uri, "summary.json")
    if rows and storage.exists(summary_uri):
        summary = json.loads(storage.read_bytes(summary_uri))
        report.final(pd.read_parquet(io.BytesIO(storage.read_bytes(summary["results_uri"]))), summary, output_uri)
    return state if state.is_failed() else state.result()  # RowsFailed, or a refusal, ends this run the same way
