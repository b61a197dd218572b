"""The stage graph: one table per backend of every stage an item goes through. This table is the architecture.

Each `Stage` has a name, a code version, the upstream stages its key and function depend on, the parameters that
change its output, a pure function (``StageCall -> reference``), the type of reference it returns, a resource tag
(``gpu`` stages hold a GPU slot) and the resident models it uses. Everything else follows from the table:
`item_keys` derives every key of an item from its input hashes before anything runs (the last one is the render
key), the flow walks the graph, the Prefect task and UI names, the results columns ``seconds_<stage>`` /
``cached_<stage>`` and the cache layout ``<cache>/<stage>/`` all come from the stage names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from avatar_model.hunyuan.prompts import NEGATIVE_PROMPT

from .refs import (
    AudioFeaturesRef,
    AudioRef,
    LatentsRef,
    MotionRef,
    MuxedRef,
    PortraitRef,
    PublishedRef,
    Resolved,
    SilentVideoRef,
    TensorsRef,
)
from .stages import delivery, diffusion, inputs, preview

if TYPE_CHECKING:
    from .config import PipelineConfig

R = TypeVar("R", bound=BaseModel)


class Item(BaseModel):
    """One manifest row as the stages see it (the row's output overrides are already in its config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: str
    row: int
    portrait_uri: str
    audio_uri: str
    prompt: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class StageCall:
    """Everything one stage run reads: its key, the item, the run config, and its upstream references."""

    stage: str
    key: str
    item: Item
    cfg: PipelineConfig
    resolved: Resolved
    inputs: Mapping[str, BaseModel]
    cache_uri: str
    output_uri: str
    models: Any = None  # the process's ResidentModels (diffusion stages only)

    def input(self, kind: type[R]) -> R:
        """The one upstream reference of type ``kind``."""
        (found,) = (ref for ref in self.inputs.values() if isinstance(ref, kind))
        return found


Params = Callable[["PipelineConfig", Item], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    inputs: tuple[str, ...]  # upstream stages: their keys enter this key, their references are this stage's inputs
    params: Params  # what else changes the output (resolved values only)
    run: Callable[[StageCall], BaseModel]
    ref: type[BaseModel]
    resource: Literal["cpu", "gpu"] = "cpu"
    models: tuple[str, ...] = ()  # resident model components the stage uses
    sources: tuple[str, ...] = ()  # input content hashes in the key: "portrait", "audio"
    cached: bool = True  # publish is not: it must look at the output location every run


@dataclass(frozen=True)
class Graph:
    """A backend's stages in execution order (every stage after the stages it reads)."""

    stages: tuple[Stage, ...]

    def __iter__(self):
        return iter(self.stages)

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def models_after(self, name: str) -> frozenset[str]:
        """Model components some stage after ``name`` still uses (the others may be released after it)."""
        later = self.stages[self.names.index(name) + 1 :]
        return frozenset(model for stage in later for model in stage.models)


# --- parameters: everything besides upstream keys that changes a stage's output -------------------------------


def _picture(cfg: PipelineConfig) -> dict[str, Any]:
    """Frames depend on fps, size and x264 settings; not on chunking, timeouts or audio options."""
    return cfg.video.model_dump(exclude={"audio_sample_rate", "audio_bitrate", "chunk_frames", "ffmpeg_timeout_s"})


def _model(cfg: PipelineConfig) -> dict[str, Any]:
    """Which weights, on which kind of device, in which dtype (resolved: never 'auto')."""
    d = cfg.diffusion
    return {"preset": cfg.backend, "model": d.model_version if cfg.backend == "hunyuan-avatar" else "random",
            "device": d.device.split(":")[0], "dtype": d.dtype}


def _vae(cfg: PipelineConfig) -> dict[str, Any]:
    return {**_model(cfg), "vae_tiling": cfg.diffusion.vae_tiling, "vae_tile_px": cfg.diffusion.vae_tile_px}


def _portrait(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    # the tiny preset finds faces with the same Haar detector as preview, so their portraits share entries
    locator = f"detface-{cfg.diffusion.model_version}" if cfg.backend == "hunyuan-avatar" else "haar"
    return {"short_side": cfg.video.short_side, "locator": locator}


def _audio(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    # how long we wait for a decode does not change the result
    return {"rules": cfg.audio.model_dump(exclude={"decode_timeout_s"}), "sample_rate": cfg.video.audio_sample_rate,
            "fps": cfg.video.fps}


def _motion(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    return {"seed": item.seed, "preview": cfg.preview.model_dump(), "renderer": preview.RENDERER_VERSION}


def _render(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    return {"preview": cfg.preview.model_dump(), "renderer": preview.RENDERER_VERSION, "video": _picture(cfg)}


def _mux(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    v = cfg.video
    return {"rate": v.audio_sample_rate, "bitrate": v.audio_bitrate, "fps": v.fps}


def _nothing(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    return {}


def _encode_audio(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    return {**_model(cfg), "dtype": "float32", "sample_rate": diffusion.WHISPER_RATE}  # Whisper always runs fp32


def _encode_prompt(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    return {**_model(cfg), "prompt": item.prompt or "", "negative_prompt": NEGATIVE_PROMPT}


def _encode_reference(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    return _vae(cfg)


def _denoise(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    d = cfg.diffusion
    return {**_model(cfg), "seed": item.seed, "steps": d.steps, "guidance_scale": d.guidance_scale, "fp8": d.fp8,
            "step_cache": d.step_cache, "attention_backend": d.attention_backend}


def _decode(cfg: PipelineConfig, item: Item) -> dict[str, Any]:
    return {**_vae(cfg), "video": _picture(cfg)}


# --- the graphs -------------------------------------------------------------------------------------------------

_PREPARE_AUDIO = Stage("prepare_audio", 1, (), _audio, inputs.prepare_audio, AudioRef, sources=("audio",))
_PREVIEW_STAGES = (
    Stage("prepare_portrait", 1, (), _portrait, inputs.prepare_portrait, PortraitRef, sources=("portrait",)),
    _PREPARE_AUDIO,
    Stage("motion", 1, ("prepare_audio",), _motion, preview.motion, MotionRef),
    Stage("render", 1, ("prepare_portrait", "motion"), _render, preview.render, SilentVideoRef),
    Stage("mux", 1, ("render", "prepare_audio"), _mux, delivery.mux, MuxedRef),
)
_DIFFUSION_STAGES = (
    Stage("prepare_portrait", 1, (), _portrait, diffusion.prepare_portrait, PortraitRef, sources=("portrait",),
          models=("face_locator",)),
    _PREPARE_AUDIO,
    Stage("encode_audio", 1, ("prepare_audio",), _encode_audio, diffusion.encode_audio, AudioFeaturesRef, "gpu",
          ("whisper",)),
    Stage("encode_prompt", 1, ("prepare_portrait",), _encode_prompt, diffusion.encode_prompt, TensorsRef, "gpu",
          ("text_encoder",)),
    Stage("encode_reference", 1, ("prepare_portrait",), _encode_reference, diffusion.encode_reference, TensorsRef,
          "gpu", ("vae",)),
    Stage("denoise", 1, ("prepare_portrait", "encode_audio", "encode_prompt", "encode_reference"), _denoise,
          diffusion.denoise, LatentsRef, "gpu", ("transformer",)),
    Stage("decode", 1, ("denoise",), _decode, diffusion.decode, SilentVideoRef, "gpu", ("vae",)),
    Stage("mux", 1, ("decode", "prepare_audio"), _mux, delivery.mux, MuxedRef),
)


def _with_publish(stages: tuple[Stage, ...]) -> Graph:
    """Publish reads every other stage (its sidecar records how each was made); its key is the render key."""
    names = tuple(stage.name for stage in stages)
    return Graph((*stages, Stage("publish", 1, names, _nothing, delivery.publish, PublishedRef, cached=False)))


GRAPHS: Mapping[str, Graph] = MappingProxyType({
    "preview": _with_publish(_PREVIEW_STAGES),
    "tiny-random": _with_publish(_DIFFUSION_STAGES),
    "hunyuan-avatar": _with_publish(_DIFFUSION_STAGES),
})
BACKENDS = tuple(GRAPHS)
DIFFUSION_BACKENDS = ("tiny-random", "hunyuan-avatar")
# every stage name of every graph, delivery last: the results table has a column pair for each
ALL_STAGES = tuple(sorted(dict.fromkeys(name for graph in GRAPHS.values() for name in graph.names),
                          key=lambda name: name in ("mux", "publish")))


def stage_key(stage: Stage, cfg: PipelineConfig, item: Item, hashes: Mapping[str, str],
              keys: Mapping[str, str]) -> str:
    """Content key of one stage run: stage, code version, input content keys and output parameters.

    URIs and item ids play no part: the same portrait under two names is one entry, and a changed file under the
    same name is a new one.
    """
    payload = {"stage": stage.name, "version": stage.version, "sources": {s: hashes[s] for s in stage.sources},
               "inputs": {name: keys[name] for name in stage.inputs}, "params": stage.params(cfg, item)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def item_keys(graph: Graph, cfg: PipelineConfig, item: Item, portrait_sha256: str, audio_sha256: str
              ) -> dict[str, str]:
    """Every stage key of one item, in graph order; the last one is the item's render key."""
    hashes = {"portrait": portrait_sha256, "audio": audio_sha256}
    keys: dict[str, str] = {}
    for stage in graph:
        keys[stage.name] = stage_key(stage, cfg, item, hashes, keys)
    return keys


def stage_parameters(graph: Graph, cfg: PipelineConfig, item: Item) -> dict[str, dict[str, Any]]:
    """Each stage's version and output parameters, as the sidecar records them."""
    return {stage.name: {"version": stage.version, **stage.params(cfg, item)} for stage in graph}
