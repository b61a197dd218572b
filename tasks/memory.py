"""Out of GPU memory: retry the stage once per lower-memory mode of a fixed ladder, then fail naming the modes.

The ladder is data. Modes are cumulative (each keeps the ones before it) and only those that can help the stage
and apply to the run are tried. The mode that succeeded is recorded in the stage's reference and the sidecar;
the stage key stays the one requested, so the sidecar is where a lower-memory result is told apart.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from common.errors import ResourceExhausted

if TYPE_CHECKING:
    from .config import PipelineConfig
    from .graph import StageCall

R = TypeVar("R")
GPU_STAGES = frozenset({"encode_audio", "encode_prompt", "encode_reference", "denoise", "decode"})


def _always(cfg: PipelineConfig) -> bool:
    return True


def _on_gpu(cfg: PipelineConfig) -> bool:
    return cfg.diffusion.device.startswith("cuda")


def _fp8_files_present(cfg: PipelineConfig) -> bool:
    from avatar_model.hunyuan.presets import PRESETS

    if cfg.backend != "hunyuan-avatar":
        return False  # random weights have no fp8 checkpoint
    root = Path(cfg.diffusion.weights_dir) / "ckpts"
    return all((root / name).is_file() for name in PRESETS[cfg.backend].required_files(fp8=True))


@dataclass(frozen=True)
class MemoryMode:
    name: str
    stages: frozenset[str]  # the stages this mode can help
    update: Mapping[str, Any] = field(default_factory=dict)  # DiffusionConfig changes it adds
    applies: Callable[[PipelineConfig], bool] = _always
    release_others: bool = False  # free every resident model the stage does not use


LADDER = (
    MemoryMode("release-others", GPU_STAGES, release_others=True),
    MemoryMode("group-offload", frozenset({"denoise"}), MappingProxyType({"group_offload": True}), _on_gpu),
    MemoryMode("fp8", frozenset({"denoise"}), MappingProxyType({"fp8": True}), _fp8_files_present),
    MemoryMode("small-vae-tiles", frozenset({"encode_reference", "decode"}),
               MappingProxyType({"vae_tiling": True, "vae_tile_px": 128})),
    MemoryMode("no-step-cache", frozenset({"denoise"}), MappingProxyType({"step_cache": False})),
)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def modes_for(stage: str, cfg: PipelineConfig) -> list[tuple[str, PipelineConfig, bool]]:
    """(name, config, release others) for the stage's first try and each applicable mode below it."""
    tries, update, release = [("default", cfg, False)], {}, False
    for mode in LADDER:
        if stage in mode.stages and mode.applies(cfg):
            update, release = {**update, **mode.update}, release or mode.release_others
            diffusion = cfg.diffusion.model_copy(update=update)
            tries.append((mode.name, cfg.model_copy(update={"diffusion": diffusion}), release))
    return tries


def with_memory_ladder(call: StageCall, models: tuple[str, ...], attempt: Callable[[PipelineConfig, str], R]) -> R:
    """``attempt(cfg, mode)`` in the default mode, then once per lower-memory mode while it runs out of memory."""
    tried: list[str] = []
    for name, cfg, release_others in modes_for(call.stage, call.cfg):
        others = set(call.models.loaded()) - set(models) if release_others else set()
        if others:
            call.models.release(*others)
        try:
            return attempt(cfg, name)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            tried.append(name)
            del exc
            _free_cached_memory()
    raise ResourceExhausted(
        f"{call.item.item_id}: {call.stage} ran out of device memory in every mode tried ({', '.join(tried)}); "
        "use a larger GPU, shorter audio or a smaller short_side"
    )


def _free_cached_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
