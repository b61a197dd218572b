"""Typed references: what a stage returns (and Prefect persists as its cached result).

A reference names the stage's artifact in the cache prefix and carries its sha256 and the few numbers the next
stages need; it never holds frames or tensors. ``seconds`` and ``attempts`` describe the run that made it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from avatar_model.face.detector import FaceBox


class Ref(BaseModel):
    """An artifact in the cache prefix, addressed by its stage key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    uri: str
    sha256: str
    seconds: float = 0.0
    attempts: int = 1


class PortraitRef(Ref):
    """The bucketed portrait (PNG) and the face box found in it."""

    width: int
    height: int
    face: dict[str, int | float]

    @property
    def face_box(self) -> FaceBox:
        return FaceBox.from_dict(self.face)


class AudioRef(Ref):
    """Mono PCM (WAV) at the delivery rate; ``n_frames`` video frames cover it."""

    duration_s: float
    sample_rate: int
    n_frames: int


class MotionRef(Ref):
    """Preview motion track (NPZ) for ``n_frames`` frames."""

    n_frames: int


class SilentVideoRef(Ref):
    """H.264 frames without audio (MP4)."""

    n_frames: int
    width: int
    height: int
    memory_mode: str | None = None


class TensorsRef(Ref):
    """Model conditioning saved as safetensors (Whisper states, text states, reference posterior)."""

    memory_mode: str | None = None


class AudioFeaturesRef(TensorsRef):
    """Whisper hidden states of the speech resampled to 16 kHz, for ``n_frames`` video frames."""

    n_frames: int


class LatentsRef(TensorsRef):
    """Denoised latents that decode to ``n_frames`` frames of ``width`` × ``height``."""

    n_frames: int
    width: int
    height: int


class MuxedRef(Ref):
    """The finished MP4 in the cache: verified streams, frame count and sync."""

    n_frames: int
    video_seconds: float
    audio_seconds: float


class PublishedRef(BaseModel):
    """Where the deliverable and its sidecar are; ``skipped`` when they were already in place."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output_uri: str
    sidecar_uri: str
    sha256: str
    skipped: bool
    seconds: float = 0.0
    attempts: int = 1


class Resolved(BaseModel):
    """An item's input hashes, every stage key (the render key last), and its sidecar if already published."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    portrait_sha256: str
    audio_sha256: str
    stage_keys: dict[str, str]
    render_key: str
    published: dict | None
    seconds: float = 0.0
    attempts: int = 1
