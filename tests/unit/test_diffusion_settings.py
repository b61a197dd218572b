"""Honest settings: every DiffusionConfig field reaches the pipeline or is declared operational; no key holds 'auto'."""

import pytest

from avatar_model.config import DiffusionConfig
from common.errors import ConfigurationError
from tasks.config import PipelineConfig
from tasks.graph import GRAPHS, Item, item_keys
from tasks.models import pipeline_inputs, resolve_diffusion

ITEM = Item(item_id="a", row=0, portrait_uri="p.png", audio_uri="a.wav", prompt="talks", seed=1)
CPU = resolve_diffusion(DiffusionConfig(), cuda_available=False)
# a different value for every field of DiffusionConfig
ALTERNATIVES = {
    "weights_dir": "/mnt/other-weights", "model_version": "official-2026-01", "steps": 30, "guidance_scale": 5.0,
    "device": "cuda:1", "dtype": "bfloat16", "fp8": True, "group_offload": True, "step_cache": False,
    "step_cache_device": "cpu", "attention_backend": "flash", "vae_tiling": False, "vae_tile_px": 128,
    "memory": "stage-major",
}


def config(**changes) -> PipelineConfig:
    return PipelineConfig(backend="hunyuan-avatar", diffusion=CPU.model_copy(update=changes))


def keys(cfg: PipelineConfig) -> dict[str, str]:
    return item_keys(GRAPHS[cfg.backend], cfg, ITEM, "p" * 64, "a" * 64)


def test_the_alternatives_cover_every_field():
    assert set(ALTERNATIVES) == set(DiffusionConfig.model_fields)
    assert DiffusionConfig.OPERATIONAL | DiffusionConfig.IDENTITY <= set(DiffusionConfig.model_fields)


@pytest.mark.parametrize("field", sorted(DiffusionConfig.model_fields))
def test_each_field_reaches_the_pipeline_or_is_declared_operational(field):
    base, changed = config(), config(**{field: ALTERNATIVES[field]})
    moved = {stage for stage, key in keys(changed).items() if keys(base)[stage] != key}
    if field in DiffusionConfig.OPERATIONAL:
        assert not moved, f"operational field {field} changed the keys of {moved}"
    else:
        assert moved, f"{field} changes the video but no stage key"
    reaches_pipeline = pipeline_inputs(changed) != pipeline_inputs(base)
    if field in DiffusionConfig.IDENTITY or field == "memory":
        assert not reaches_pipeline  # names the weights on disk / picks the walk of the graph, not the model's input
    else:
        assert reaches_pipeline, f"{field} never reaches the pipeline"


def test_auto_is_resolved_before_it_enters_a_key():
    gpu = resolve_diffusion(DiffusionConfig(), cuda_available=True)
    assert (CPU.device, CPU.dtype, CPU.step_cache_device) == ("cpu", "float32", "device")
    assert (gpu.device, gpu.dtype, gpu.step_cache_device) == ("cuda", "bfloat16", "cpu")
    cpu_keys = keys(PipelineConfig(backend="tiny-random", diffusion=CPU))
    gpu_keys = keys(PipelineConfig(backend="tiny-random", diffusion=gpu))
    assert cpu_keys["denoise"] != gpu_keys["denoise"], "fp32 CPU latents and bf16 GPU latents never share a key"
    with pytest.raises(ValueError, match="resolved"):
        pipeline_inputs(PipelineConfig(backend="tiny-random"))


def test_settings_this_machine_cannot_honour_are_refused():
    with pytest.raises(ConfigurationError, match="no CUDA device"):
        resolve_diffusion(DiffusionConfig(device="cuda"), cuda_available=False)
    with pytest.raises(ConfigurationError, match="flash"):
        resolve_diffusion(DiffusionConfig(attention_backend="flash"), cuda_available=False)
