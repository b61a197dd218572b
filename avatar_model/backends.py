"""The renderer protocol both backends implement, and the registry the orchestration layer picks from.

A renderer turns a prepared portrait (bucketed RGB image + face box) and prepared audio into frames in two
steps, so the expensive step's output can be cached and retried on its own:
``generate`` → a motion/latent artifact saved to a file; ``render`` → an iterator of frame chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from .config import PreviewConfig, VideoConfig
from .face.detector import FaceBox
from .preview.motion import MotionTrack
from .preview.renderer import PreviewRenderer


class Renderer(Protocol):
    name: str
    version: str  # part of every cache key: bump it when output changes
    artifact_suffix: str

    def generate(
        self,
        portrait: np.ndarray,
        face: FaceBox,
        audio: np.ndarray,
        sample_rate: int,
        n_frames: int,
        seed: int,
        out_path: Path,
    ) -> None:
        """Compute the motion/latents for ``n_frames`` frames and save them to ``out_path``."""

    def render(self, portrait: np.ndarray, face: FaceBox, artifact_path: Path) -> Iterator[np.ndarray]:
        """Yield uint8 RGB frame chunks (n, H, W, 3) from a saved artifact; never the whole video at once."""


class PreviewBackend:
    """Adapter from `PreviewRenderer` (envelope-driven warping, CPU only) to the `Renderer` protocol."""

    name = "preview"
    version = f"preview-{PreviewRenderer.version}"
    artifact_suffix = ".npz"

    def __init__(self, preview: PreviewConfig, video: VideoConfig):
        self._renderer = PreviewRenderer(preview, video)

    def generate(self, portrait, face, audio, sample_rate, n_frames, seed, out_path: Path) -> None:
        track = self._renderer.generate(audio, sample_rate, n_frames, seed)
        track.save(out_path)

    def render(self, portrait, face, artifact_path: Path) -> Iterator[np.ndarray]:
        return self._renderer.render(portrait, face, MotionTrack.load(artifact_path))


def _renderer_class(name: str) -> type:
    if name == "preview":
        return PreviewBackend
    raise ValueError(f"unknown backend {name!r}; available: preview")


def renderer_version(name: str) -> str:
    """The version string of backend ``name`` (part of cache keys), without building the renderer."""
    return _renderer_class(name).version


def make_renderer(name: str, preview: PreviewConfig, video: VideoConfig) -> Renderer:
    """The renderer called ``name``; raises ValueError naming the available ones."""
    return _renderer_class(name)(preview, video)
