"""Prefect tasks: one per stage of a graph, all made from the table, each a thin wrapper around its pure function.

A stage task receives its key (computed once by `resolve`), its upstream references (futures, which Prefect
resolves first) and the item's job. Cached stages persist their reference as a Prefect cache record under
``<cache>/records/<key>``; before a record is reused, its artifact is read back and checked against the
reference's sha256, and a missing or damaged one drops the record so the stage runs again. gpu stages carry the
machine's GPU slot tag (see `tasks.gpu`). Task and UI names are the stage names, runs are named after the item.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run
from prefect.states import Failed, State
from pydantic import BaseModel

from common import storage
from common.errors import StaleArtifact, is_permanent

from .config import PipelineConfig
from .graph import GRAPHS, Graph, Item, StageCall
from .models import process_models
from .refs import Resolved
from .stages import artifacts, delivery
from .storage import result_storage_for


@dataclass(frozen=True)
class Job:
    """One item of one run, as every stage task of the item receives it."""

    item: Item
    cfg: PipelineConfig
    resolved: Resolved
    cache_uri: str
    output_uri: str


class StageFailed(Exception):
    """How a stage task fails: the original error's class and message, the attempt that raised it, and whether a
    retry could help. Typed, so the results table needs no side channel to learn the attempt count."""

    def __init__(self, error_class: str, message: str, attempt: int, permanent: bool):
        super().__init__(error_class, message, attempt, permanent)  # args rebuild it when unpickled
        self.error_class, self.message, self.attempt, self.permanent = error_class, message, attempt, permanent

    def __str__(self) -> str:
        return f"{self.error_class}: {self.message}"


def _is_retryable(task_obj: Any, run: Any, state: Any) -> bool:
    """Retry transient faults only; bad input (permanent errors) fails the item at once."""
    exc = state.result(raise_on_failure=False)
    # a stale input artifact stays stale however often this stage retries: the flow recomputes its maker instead
    return isinstance(exc, StageFailed) and not exc.permanent and exc.error_class != StaleArtifact.__name__


def _guarded(fn: Callable[..., BaseModel], *args: Any) -> BaseModel:
    """Run a stage: its reference gains the run's seconds and attempt; its failure becomes a `StageFailed`."""
    started = time.perf_counter()
    try:
        ref = fn(*args)
    except Exception as exc:
        raise StageFailed(type(exc).__name__, str(exc), task_run.run_count, is_permanent(exc)) from exc
    return ref.model_copy(update={"seconds": time.perf_counter() - started, "attempts": task_run.run_count})


# the terminal state of a stage whose input stage did not complete: of type Failed, so that the stages after it
# receive it through `allow_failure` too (a Cancelled one would leave them Pending), and never cached or retried
SKIPPED = "Skipped"


def run_stage(stage: str, item_id: str, key: str, inputs: dict[str, Any], job: Job) -> BaseModel | State:
    """The body of every stage task: the stage's pure function, timed.

    Inputs arrive even when their stage failed (the flow passes them with `allow_failure`), so that a stage after a
    failed one ends in a terminal `Skipped` state naming the cause instead of staying Pending forever.
    """
    missing = [name for name, ref in inputs.items() if not isinstance(ref, BaseModel)]
    if missing:
        return Failed(name=SKIPPED, message=f"not run: {', '.join(missing)} did not complete")
    spec = GRAPHS[job.cfg.backend].stage(stage)
    call = StageCall(stage=stage, key=key, item=job.item, cfg=job.cfg, resolved=job.resolved, inputs=inputs,
                     cache_uri=job.cache_uri, output_uri=job.output_uri,
                     models=process_models() if spec.models else None)
    return _guarded(spec.run, call)


def resolve_item(item_id: str, item: Item, cfg: PipelineConfig, output_uri: str,
                 digests: storage.InputDigests) -> Resolved:
    """Hash the inputs and derive every key. Not cached across runs: a changed input under the same name must be
    seen; within a run ``digests`` reads each input once."""
    return _guarded(delivery.resolve, item, cfg, GRAPHS[cfg.backend], output_uri, digests)


def verified_cache_key(cache_uri: str):
    """The stage's own key, after making sure a record stored under it still points at an intact artifact."""

    def cache_key(context: Any, parameters: dict[str, Any]) -> str:
        key, store = parameters["key"], context.result_store
        if store.exists(key):
            ref = store.read(key).result
            if not artifacts.intact(ref):
                artifacts.forget(cache_uri, ref)
        return key

    return cache_key


def _retry_options(cfg: PipelineConfig) -> dict[str, Any]:
    retry = cfg.retry
    return {"retries": retry.retries, "retry_delay_seconds": retry.delays(), "retry_jitter_factor": retry.jitter_factor,
            "retry_condition_fn": _is_retryable}


def resolve_task(cfg: PipelineConfig) -> Task:
    return task(resolve_item, name="resolve", task_run_name="resolve-{item_id}", cache_policy=NO_CACHE,
                **_retry_options(cfg))


def stage_tasks(graph: Graph, cfg: PipelineConfig, cache_uri: str, gpu_slot: str | None) -> dict[str, Task]:
    """One Prefect task per stage of ``graph``, configured for this run."""
    records = result_storage_for(storage.join(cache_uri, artifacts.RECORDS))
    tasks = {}
    for stage in graph:
        name = stage.name.replace("_", "-")
        options: dict[str, Any] = {"name": name, "task_run_name": f"{name}-{{item_id}}", **_retry_options(cfg)}
        if stage.resource == "gpu" and gpu_slot:
            options["tags"] = [gpu_slot]
        if stage.cached:
            options.update(persist_result=True, result_storage=records, cache_key_fn=verified_cache_key(cache_uri))
        tasks[stage.name] = task(run_stage, **options)
    return tasks
