"""The diffusion settings of a run, resolved once, and what the pipeline receives from them.

`resolve_diffusion` turns every ``auto`` into the value actually used (keys and sidecars hold only resolved
values); `pipeline_inputs` is the single translation from `DiffusionConfig` to what the model layer reads, so a
test can prove that each config field reaches the pipeline or is declared operational.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from avatar_model.config import DiffusionConfig
from common.errors import ConfigurationError

if TYPE_CHECKING:
    from avatar_model.hunyuan.pipeline import AvatarPipelineConfig
    from avatar_model.hunyuan.resident import LoadSettings, ResidentModels

    from .config import PipelineConfig


def resolve_diffusion(diffusion: DiffusionConfig, cuda_available: bool) -> DiffusionConfig:
    """Replace ``auto`` by what this machine will use; refuse settings it cannot honour."""
    device = ("cuda" if cuda_available else "cpu") if diffusion.device == "auto" else diffusion.device
    on_gpu = device.startswith("cuda")
    if on_gpu and not cuda_available:
        raise ConfigurationError(f"diffusion.device={diffusion.device!r} but this machine has no CUDA device; "
                                 "use 'auto' or 'cpu'")
    if diffusion.attention_backend == "flash" and not on_gpu:
        raise ConfigurationError("attention_backend='flash' needs a CUDA device (and the gpu extra); use 'sdpa'")
    return diffusion.model_copy(update={
        "device": device,
        "dtype": ("bfloat16" if on_gpu else "float32") if diffusion.dtype == "auto" else diffusion.dtype,
        # on accelerators the step cache (≈26 MB per latent frame at 704 px) lives in CPU memory
        "step_cache_device": ("cpu" if on_gpu else "device") if diffusion.step_cache_device == "auto"
        else diffusion.step_cache_device,
    })


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class PipelineInputs:
    """Everything the model layer receives from a run's config: how to load, how to sample, how long."""

    load: LoadSettings
    config: AvatarPipelineConfig
    steps: int
    guidance_scale: float


def pipeline_inputs(cfg: PipelineConfig) -> PipelineInputs:
    """The pipeline's settings for a resolved config (``resolve_diffusion`` first: no ``auto`` may remain)."""
    import torch

    from avatar_model.hunyuan.pipeline import AvatarPipelineConfig
    from avatar_model.hunyuan.resident import LoadSettings

    d = cfg.diffusion
    if "auto" in (d.device, d.dtype, d.step_cache_device):
        raise ValueError("pipeline_inputs needs a resolved DiffusionConfig (see resolve_diffusion)")
    dtype = getattr(torch, d.dtype)
    config = AvatarPipelineConfig(
        dtype=dtype,
        latent_dtype=torch.float32 if dtype == torch.float32 else torch.float16,  # official: fp16 latents with bf16
        step_cache=d.step_cache,
        cache_device="cpu" if d.step_cache_device == "cpu" else None,
        vae_tiling=d.vae_tiling,
        vae_tile_px=d.vae_tile_px,
        attention_backend=d.attention_backend,
        fps=float(cfg.video.fps),
    )
    load = LoadSettings(preset=cfg.backend, weights_dir=d.weights_dir, device=d.device, dtype=d.dtype, fp8=d.fp8,
                        group_offload=d.group_offload)
    return PipelineInputs(load=load, config=config, steps=d.steps, guidance_scale=d.guidance_scale)


_FIRST_USE = threading.Lock()  # two threads asking first would each build a registry, and load the models twice


def process_models() -> ResidentModels:
    """The models resident in this process, shared by every flow run and thread in it."""
    with _FIRST_USE:
        return _resident_models()


@functools.cache
def _resident_models() -> ResidentModels:
    from avatar_model.hunyuan.resident import ResidentModels

    return ResidentModels()
