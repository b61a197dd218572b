"""Where a run's stage tasks execute: threads of the flow's own process (the default), or an existing dask cluster.

On dask (``config.dask_address``), each worker process keeps its models resident across tasks, and gpu stages ask
for one ``GPU`` resource, so a worker started with ``--resources GPU=1`` runs one at a time. Two differences from
threads, both from how prefect-dask hands futures to dask: a stage after a failed one ends ``NotReady`` in the UI
(not ``Skipped``; its row still records the failure), and an input's digest is computed once per task, not once
per run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.config import PipelineConfig


def task_runner(cfg: PipelineConfig) -> TaskRunner:
    if cfg.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=cfg.dask_address)
    return ThreadPoolTaskRunner(max_workers=cfg.max_workers)


@contextlib.contextmanager
def placed(cfg: PipelineConfig, resource: str) -> Iterator[None]:
    """Submissions inside ask the cluster for what a stage of ``resource`` needs (dask: one GPU per gpu stage)."""
    if cfg.dask_address and resource == "gpu":
        import dask

        with dask.annotate(resources={"GPU": 1}):
            yield
    else:
        yield


def _nothing(*_: Any) -> None:
    return None


class InThisProcess:
    """A callback that means something only in the process that made it (a terminal's progress bar). A run's
    parameters travel with every task sent to a dask worker, so there it arrives as one that does nothing.
    (Not a dataclass: the run's context dumps dataclasses to dicts, which would send the callback itself.)"""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __reduce__(self):
        return (InThisProcess, (_nothing,))
