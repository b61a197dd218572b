"""Clean-room HunyuanVideo-Avatar: DiT, checkpoint loading, conditioning encoders and the sampler.

Exports resolve lazily (PEP 562), so importing a light submodule such as ``avatar_model.hunyuan.prompts`` does not
pull in torch, diffusers and transformers.
"""

from importlib import import_module

_EXPORTS = {
    # sampler
    "AvatarPipeline": "pipeline",
    "AvatarPipelineConfig": "pipeline",
    "AvatarOutput": "pipeline",
    "PrecomputedConditioning": "pipeline",
    "ReferencePosterior": "vae",
    "load_pipeline": "presets",
    "load_component": "presets",
    "COMPONENTS": "presets",
    "PipelinePreset": "presets",
    "PRESETS": "presets",
    # resident models of a process
    "LoadSettings": "resident",
    "ResidentModels": "resident",
    # schedule
    "WindowPlan": "scheduling",
    "flow_sigmas": "scheduling",
    "flow_match_scheduler": "scheduling",
    "guidance_scale": "scheduling",
    "cached_steps": "scheduling",
    # model
    "AvatarTransformerConfig": "config",
    "AvatarTransformer3DModel": "transformer",
    "load_transformer": "checkpoint",
    "load_official_state_dict": "checkpoint",
    "CheckpointError": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
