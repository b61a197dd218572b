"""The models of one process: each component is loaded on first use and kept while the settings that shape it hold.

A batch worker runs thousands of items through a few stages, and loading the released model takes minutes. Each
stage asks for the components it runs (`ResidentModels.pipeline`) and gets the resident copies back unless a
setting that changes *that* component's loading changed (a steps change, for one, reloads nothing). A relevant
change replaces the old copy, so there is at most one copy of each component.

Under ``group_offload`` the DiT is streamed to the device a block at a time, and the encoders and the VAE rest in
CPU memory and are moved onto the device only while they run (`AvatarPipeline(offload=True)`). Where a component
rests is not part of its key: a pipeline moves what it runs onto its device, so a copy loaded for one placement
serves the other.
"""

from __future__ import annotations

import collections
import gc
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

import torch

from avatar_model.hunyuan.pipeline import AvatarPipeline, AvatarPipelineConfig
from avatar_model.hunyuan.presets import COMPONENTS, PRESETS, load_component

DTYPES = ("float32", "bfloat16")

# The LoadSettings fields each component's loading reads; a change in any other field keeps the resident copy.
RELEVANT_SETTINGS = MappingProxyType(
    {
        "face_locator": ("preset", "weights_dir"),  # always on the CPU
        "whisper": ("preset", "weights_dir", "device"),  # fp32 whatever the DiT dtype
        "text_encoder": ("preset", "weights_dir", "device", "dtype"),
        "transformer": ("preset", "weights_dir", "device", "dtype", "fp8", "group_offload"),
        "vae": ("preset", "weights_dir", "device", "dtype"),
    }
)


@dataclass(frozen=True)
class LoadSettings:
    """Everything that changes how a component is loaded (resolved values only, never 'auto')."""

    preset: str  # "tiny-random" | "hunyuan-avatar"
    weights_dir: str = "weights"
    device: str = "cpu"  # e.g. "cpu", "cuda", "cuda:0"
    dtype: str = "float32"  # DiT compute dtype; the encoders and the VAE follow the official fp16 rule when not fp32
    fp8: bool = False
    group_offload: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights_dir", str(self.weights_dir))  # a Path and its string are one key
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; available: {', '.join(PRESETS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (resolved, not 'auto'), got {self.dtype!r}")
        if self.device == "auto":
            raise ValueError("device must be resolved (e.g. 'cpu', 'cuda'), not 'auto'")
        torch.device(self.device)  # rejects what torch cannot parse

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class ResidentModels:
    """Loaded components of one process, each loaded on first use and keyed on only the settings that change *its*
    loading. Thread-safe: stages may share one pool across threads (loading holds a lock)."""

    def __init__(self) -> None:
        self.loads: collections.Counter[str] = collections.Counter()  # component -> times loaded
        self._resident: dict[str, tuple[tuple, object]] = {}  # component -> (its relevant settings, the component)
        self._lock = threading.Lock()

    def get(self, component: str, settings: LoadSettings):
        """The component for ``settings``: the resident copy when its relevant settings match; otherwise the copy for
        other settings is released and the component loaded now."""
        key = _key(component, settings)
        with self._lock:
            resident = self._resident.get(component)
            if resident is not None and resident[0] == key:
                return resident[1]
            if resident is not None:
                self._release([component])
            value = load_component(
                component,
                settings.preset,
                settings.weights_dir,
                settings.device,
                settings.torch_dtype,
                fp8=settings.fp8,
                group_offload=settings.group_offload,
            )
            self._resident[component] = (key, value)
            self.loads[component] += 1
            return value

    def pipeline(
        self, settings: LoadSettings, config: AvatarPipelineConfig, components: Iterable[str]
    ) -> AvatarPipeline:
        """A light pipeline over just ``components`` (the others None), running on ``settings.device``."""
        if config.dtype != settings.torch_dtype:
            raise ValueError(f"config.dtype {config.dtype} must be the dtype the DiT is loaded in, {settings.dtype}")
        loaded = {name: self.get(name, settings) for name in components}
        return AvatarPipeline(**loaded, config=config, device=settings.device, offload=settings.group_offload)

    def release(self, *components: str) -> None:
        """Drop the named components (none named: all) and return their memory, CUDA's cache included; the next `get`
        loads again. A pipeline that still holds a component keeps it alive until the pipeline is dropped."""
        for name in components:
            _check_component(name)
        with self._lock:
            self._release(components or tuple(self._resident))

    def loaded(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._resident)

    def _release(self, components: Iterable[str]) -> None:
        for name in components:
            self._resident.pop(name, None)
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _check_component(component: str) -> None:
    if component not in RELEVANT_SETTINGS:
        raise ValueError(f"unknown component {component!r}; available: {', '.join(COMPONENTS)}")


def _key(component: str, settings: LoadSettings) -> tuple:
    _check_component(component)
    return tuple(getattr(settings, name) for name in RELEVANT_SETTINGS[component])
