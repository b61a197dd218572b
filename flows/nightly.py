"""nightly_render: the scheduled entry point; a date picks the manifest and the output prefix.

A scheduled run uses its own scheduled date; a backfill passes ``day`` explicitly (see `avatar-batch backfill`).
"""

from __future__ import annotations

import os
from datetime import date

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.render_manifest import render_manifest, run_config
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
                   backend: str | None = None, config: PipelineConfig | None = None) -> dict:
    """Render ``manifest_template.format(date=…)`` into ``output_template.format(date=…)`` as a subflow."""
    logical = run_day(day).isoformat()
    cfg = run_config(config, backend)
    render = render_manifest.with_options(task_runner=ThreadPoolTaskRunner(max_workers=cfg.max_workers))
    return render(manifest_uri=located(manifest_template, logical), output_uri=located(output_template, logical),
                  config=cfg)
