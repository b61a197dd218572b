"""Typed configuration for the media and preview layers.

Every knob of `avatar_model` lives here and is passed down explicitly; nothing below reads the environment.
The orchestration layer nests these models inside its own `PipelineConfig`.
"""

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VideoConfig(_Frozen):
    """How frames become an MP4."""

    fps: int = Field(25, ge=1, le=60)
    short_side: int = Field(512, ge=64, le=2048, description="portrait bucket short side in pixels")
    crf: int = Field(18, ge=0, le=51, description="x264 constant rate factor")
    preset: str = Field("veryfast", description="x264 preset")
    chunk_frames: int = Field(32, ge=1, description="frames handed to the encoder per write")
    audio_sample_rate: int = Field(48000, description="sample rate of the delivered (muxed) audio")
    audio_bitrate: str = "128k"


class AudioConfig(_Frozen):
    """Audio acceptance rules."""

    max_seconds: float = Field(600.0, gt=0, description="longer audio is rejected, never truncated")
    silence_dbfs: float = Field(-50.0, description="peak level below which audio counts as silent")


class PreviewConfig(_Frozen):
    """Knobs of the CPU `preview` renderer (audio envelope → mouth/blink/head motion → warped frames)."""

    band_hz: tuple[float, float] = (300.0, 3400.0)
    attack_ms: float = 15.0
    release_ms: float = 90.0
    jaw_drop: float = Field(0.11, description="maximum jaw drop as a fraction of face height")
    mouth_darken: float = Field(0.65, ge=0, le=1, description="darkening of the open mouth interior")
    blink_per_minute: float = 17.0
    blink_frames: int = 5
    head_rotate_deg: float = 1.6
    head_shift_px: float = 0.012
    head_period_s: float = 3.5
