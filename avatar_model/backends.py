"""The renderer protocol the backends implement, and the registry the orchestration layer picks from.

A renderer turns a prepared portrait (bucketed RGB image + face box) and prepared audio into frames in two steps,
so the expensive step's output can be cached and retried on its own: ``generate`` → a motion/latent artifact
saved to a file; ``render`` → an iterator of frame chunks. Building a renderer is cheap (models load lazily), so
the orchestration layer may build one just to ask for its cache identity. torch is imported only by the
diffusion backends, so the preview path starts fast.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .config import DiffusionConfig, PreviewConfig, VideoConfig
from .face.detector import FaceBox
from .preview.motion import MotionTrack
from .preview.renderer import PreviewRenderer

BACKENDS = ("preview", "tiny-random", "hunyuan-avatar")


class Renderer(Protocol):
    name: str
    artifact_suffix: str

    def output_params(self, prompt: str | None) -> dict[str, Any]:
        """Everything besides the inputs that changes this renderer's output (part of every cache key)."""

    def generate(self, portrait: np.ndarray, face: FaceBox, audio: np.ndarray, sample_rate: int, n_frames: int,
                 seed: int, prompt: str | None, out_path: Path) -> None:
        """Compute the motion/latents for exactly ``n_frames`` frames and save them to ``out_path``."""

    def render(self, portrait: np.ndarray, face: FaceBox, artifact_path: Path) -> Iterator[np.ndarray]:
        """Yield uint8 RGB frame chunks (n, H, W, 3) from a saved artifact; never the whole video at once."""


class PreviewBackend:
    """`PreviewRenderer` (envelope-driven warping, CPU only, no weights) behind the `Renderer` protocol."""

    name = "preview"
    artifact_suffix = ".npz"

    def __init__(self, preview: PreviewConfig, video: VideoConfig):
        self._renderer = PreviewRenderer(preview, video)
        self._preview = preview

    def output_params(self, prompt: str | None) -> dict[str, Any]:
        return {"renderer": f"preview-{PreviewRenderer.version}", "preview": self._preview.model_dump()}

    def generate(self, portrait, face, audio, sample_rate, n_frames, seed, prompt, out_path) -> None:
        self._renderer.generate(audio, sample_rate, n_frames, seed).save(out_path)

    def render(self, portrait, face, artifact_path) -> Iterator[np.ndarray]:
        return self._renderer.render(portrait, face, MotionTrack.load(artifact_path))


@functools.lru_cache(maxsize=2)
def _resident_pipeline(preset: str, config: DiffusionConfig) -> tuple[Any, threading.Lock]:
    """Load a pipeline once per worker process (the real model takes minutes to load) with a lock that
    serialises its use: one accelerator runs one item at a time."""
    import torch

    from .hunyuan.presets import load_pipeline

    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
    pipeline = load_pipeline(preset, Path(config.weights_dir), device, dtype, fp8=config.fp8,
                             group_offload=config.group_offload)
    return pipeline, threading.Lock()


class DiffusionBackend:
    """HunyuanVideo-Avatar: ``generate`` denoises to latents (saved), ``render`` streams the tiled VAE decode."""

    artifact_suffix = ".pt"
    SAMPLE_RATE = 16000  # Whisper's rate; 640 samples per 25 fps frame

    def __init__(self, preset: str, diffusion: DiffusionConfig, video: VideoConfig):
        if video.fps != 25:
            raise ValueError(f"the {preset} backend renders at 25 fps (the audio features are 25 fps), not {video.fps}")
        self.name, self._diffusion = preset, diffusion

    def output_params(self, prompt: str | None) -> dict[str, Any]:
        d = self._diffusion
        return {"renderer": f"{self.name}-1", "model": d.model_version if self.name == "hunyuan-avatar" else "random",
                "steps": d.steps, "guidance_scale": d.guidance_scale, "fp8": d.fp8, "dtype": d.dtype,
                "step_cache": d.step_cache, "prompt": prompt or ""}

    def _pipeline(self) -> tuple[Any, threading.Lock]:
        return _resident_pipeline(self.name, self._diffusion)

    def generate(self, portrait, face, audio, sample_rate, n_frames, seed, prompt, out_path) -> None:
        import librosa
        import torch

        # exactly n_frames × 640 samples, so the model's frame count (samples // 640) is ours
        speech = librosa.resample(audio, orig_sr=sample_rate, target_sr=self.SAMPLE_RATE).astype(np.float32)
        target = n_frames * self.SAMPLE_RATE // 25
        speech = np.pad(speech, (0, max(0, target - len(speech))))[:target]
        pipeline, lock = self._pipeline()
        with lock:
            latents, frames = pipeline.generate_latents(
                portrait, speech, prompt or "", seed, num_inference_steps=self._diffusion.steps,
                guidance_scale=self._diffusion.guidance_scale)
        torch.save({"latents": latents.cpu(), "num_frames": frames}, out_path)

    def render(self, portrait, face, artifact_path) -> Iterator[np.ndarray]:
        import torch

        saved = torch.load(artifact_path, weights_only=True)
        pipeline, lock = self._pipeline()
        with lock:
            yield from pipeline.decode(saved["latents"], int(saved["num_frames"]))


def make_renderer(name: str, preview: PreviewConfig, video: VideoConfig, diffusion: DiffusionConfig) -> Renderer:
    """The renderer called ``name`` (cheap: models load on first use); ValueError names the available ones."""
    if name == "preview":
        return PreviewBackend(preview, video)
    if name in ("tiny-random", "hunyuan-avatar"):
        return DiffusionBackend(name, diffusion, video)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
