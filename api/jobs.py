"""Jobs are flow runs of the render deployment: submitting one, reading its state and results back.

Nothing here renders: a job is created with `run_deployment` and everything shown about it comes from Prefect
(the run's state and progress artifact) and from the ``results.parquet`` the run wrote.
"""

from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment

from common import storage
from common.errors import InputError
from manifests import ItemResult, read_results
from tasks.graph import ALL_STAGES

from .settings import ApiSettings

CLIENT_TAG = "api-client-"


class NotAllowed(InputError):
    """A URI outside the prefixes jobs may name."""


def allowed(uri: str, prefixes: tuple[str, ...]) -> str:
    """``uri`` when it lies under one of ``prefixes`` (path components, no ``..``), else `NotAllowed`."""
    normal = uri if "://" in uri else os.path.abspath(uri)
    parts = normal.split("://", 1)[-1].split("/")
    if ".." in parts or "." in parts or not any(
            normal == p.rstrip("/") or normal.startswith(p.rstrip("/") + "/") for p in prefixes):
        raise NotAllowed(f"{uri} is outside the locations jobs may use")
    return normal


def check_manifest(manifest_uri: str, prefixes: tuple[str, ...]) -> None:
    """Every input a manifest names must be under ``prefixes`` too (its rows are the job's inputs)."""
    from manifests import load_manifest

    for row in load_manifest(manifest_uri):
        for uri in (row.portrait_uri, row.audio_uri):
            try:
                allowed(uri, prefixes)
            except NotAllowed as exc:
                raise NotAllowed(f"{manifest_uri} row {row.row} ({row.item_id}): {exc}") from None


def client_tag(client: str) -> str:
    return CLIENT_TAG + client


def submit(settings: ApiSettings, client: str, manifest_uri: str, output_uri: str, backend: str | None) -> FlowRun:
    parameters: dict[str, Any] = {"manifest_uri": manifest_uri, "output_uri": output_uri}
    if backend:
        parameters["backend"] = backend
    return run_deployment(settings.deployment, parameters=parameters, timeout=0, as_subflow=False,
                          tags=["api", client_tag(client)])


def stage_upload(settings: ApiSettings, portrait: Path, portrait_ext: str, audio: Path, audio_ext: str,
                 prompt: str | None) -> tuple[str, str]:
    """Publish the two checked uploads and a one-row manifest naming them under the jobs prefix."""
    base = storage.join(settings.jobs_prefix, uuid.uuid4().hex)
    portrait_uri = storage.join(base, "inputs", f"portrait.{portrait_ext}")
    audio_uri = storage.join(base, "inputs", f"audio.{audio_ext}")
    storage.publish_file(portrait, portrait_uri)
    storage.publish_file(audio, audio_uri)
    row = {"item_id": "line", "portrait_uri": portrait_uri, "audio_uri": audio_uri, "prompt": prompt}
    buffer = io.BytesIO()
    pd.DataFrame([row]).to_parquet(buffer, index=False)
    manifest_uri = storage.join(base, "manifest.parquet")
    storage.publish_bytes(buffer.getvalue(), manifest_uri)
    return manifest_uri, storage.join(base, "out")


@dataclass
class Job:
    run: FlowRun
    progress: float | None
    items: list[ItemResult]


def owned(run: FlowRun, client: str) -> bool:
    return client_tag(client) in (run.tags or [])


def read_job(prefect: SyncPrefectClient, run: FlowRun) -> Job:
    """The run's progress (its progress artifact, in percent) and, once written, its results' items."""
    artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), type=ArtifactFilterType(any_=["progress"])), limit=1)
    progress = float(artifacts[0].data) if artifacts and artifacts[0].data is not None else None
    output = run.parameters.get("output_uri")
    results_uri = storage.join(output, "results.parquet") if output else None
    final = bool(run.state and run.state.is_final())
    items = read_results(results_uri, ALL_STAGES) if final and results_uri and storage.exists(results_uri) else []
    return Job(run, progress, items)


def recent_runs(prefect: SyncPrefectClient, client: str, limit: int) -> list[FlowRun]:
    return prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[client_tag(client)])),
                                  sort=FlowRunSort.START_TIME_DESC, limit=limit)
