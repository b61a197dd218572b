"""GPU slots shared by every flow run, process and worker on a machine.

Each GPU is one Prefect global concurrency limit of 1, named after the host and the physical device
(``gpu-<host>-<index>``, the index read through ``CUDA_VISIBLE_DEVICES``). Models on the CPU take no slot unless
the run's ``gpu_slot`` names one.
gpu-tagged stages carry that name as a tag, and Prefect's task engine holds a slot of ``tag:<name>`` before the
task run enters Running, so two runs never use one GPU at once, and a task run's Running span is its GPU span.
"""

from __future__ import annotations

import os
import re
import socket

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists


def physical_device(device: str, visible_devices: str | None) -> str:
    """The physical GPU behind ``device`` ("cuda:1" is the second entry of CUDA_VISIBLE_DEVICES)."""
    if not device.startswith("cuda"):
        return "cpu"
    index = int(device.partition(":")[2] or 0)
    visible = [v.strip() for v in (visible_devices or "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def slot_name(device: str, visible_devices: str | None, host: str | None = None) -> str:
    host = re.sub(r"[^a-z0-9-]+", "-", (host or socket.gethostname()).lower()).strip("-") or "host"
    device_id = re.sub(r"[^a-z0-9-]+", "-", physical_device(device, visible_devices).lower())
    return f"gpu-{host}-{device_id}"[:63].rstrip("-")


def ensure_slot(name: str) -> None:
    """Create the limit of one GPU (idempotent; an existing limit, even one an operator changed, is kept)."""
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=f"tag:{name}", limit=1))
        except ObjectAlreadyExists:
            pass


def slot_for(cfg) -> str | None:
    """The GPU slot tag of this worker for a run of ``cfg``: None when its graph has no gpu stage, or when its
    models run on the CPU and no ``gpu_slot`` is named (there is no GPU to share; ``device`` is resolved by then)."""
    from .graph import GRAPHS

    if not any(stage.resource == "gpu" for stage in GRAPHS[cfg.backend]):
        return None
    if cfg.gpu_slot:
        return cfg.gpu_slot
    if not cfg.diffusion.device.startswith("cuda"):
        return None
    return slot_name(cfg.diffusion.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
