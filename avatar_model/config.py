"""Typed configuration for the media and preview layers.

Every knob of `avatar_model` lives here and is passed down explicitly; nothing below reads the environment.
The orchestration layer nests these models inside its own `PipelineConfig`.
"""

from typing import ClassVar, Literal

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
    ffmpeg_timeout_s: float = Field(600.0, gt=0, description="a hung encode/mux is killed and retried after this")


class AudioConfig(_Frozen):
    """Audio acceptance rules."""

    max_seconds: float = Field(600.0, gt=0, description="longer audio is rejected, never truncated")
    silence_dbfs: float = Field(-50.0, description="peak level below which audio counts as silent")
    decode_timeout_s: float = Field(300.0, gt=0, description="a hung decode is killed and retried after this")


class PreviewConfig(_Frozen):
    """Knobs of the CPU `preview` renderer (audio envelope → mouth/blink/head motion → warped frames)."""

    band_hz: tuple[float, float] = (300.0, 3400.0)
    attack_ms: float = 15.0
    release_ms: float = 90.0
    jaw_drop: float = Field(0.11, description="maximum jaw drop as a fraction of face height")
    mouth_darken: float = Field(0.95, ge=0, le=1, description="opacity of the painted mouth interior")
    blink_per_minute: float = 17.0
    blink_frames: int = 5
    head_rotate_deg: float = 1.6
    head_shift_px: float = 0.012
    head_period_s: float = 3.5


class DiffusionConfig(_Frozen):
    """Knobs of the HunyuanVideo-Avatar backends (`tiny-random`, `hunyuan-avatar`).

    Each field either changes the video (it reaches the pipeline and the cache keys of the stages it feeds, with
    ``auto`` resolved first) or is listed in ``OPERATIONAL`` (how or where the work runs; never in a key).
    ``model_version`` names the checkpoint set on disk: it is in every model stage's key but is not a pipeline input.
    """

    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"weights_dir", "group_offload", "step_cache_device", "memory"})
    IDENTITY: ClassVar[frozenset[str]] = frozenset({"model_version"})

    weights_dir: str = Field("weights", description="folder holding ckpts/ in the official layout")
    model_version: str = Field("official-2025-06", description="name of the checkpoint set; part of cache keys")
    steps: int = Field(50, ge=1, le=200)
    guidance_scale: float = Field(7.5, ge=1.0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="DiT compute dtype: 'auto' (bf16 on GPU, fp32 on CPU)")
    fp8: bool = Field(False, description="use the official fp8 checkpoint (weight-only float8, per-layer scales)")
    group_offload: bool = Field(False, description="stream DiT blocks from CPU memory (low VRAM, slower, same output)")
    step_cache: bool = Field(True, description="official last-block cache on 20 of 50 steps")
    step_cache_device: Literal["auto", "cpu", "device"] = Field(
        "auto", description="where the step cache lives: 'auto' (CPU memory on GPUs), 'cpu', 'device'")
    attention_backend: Literal["sdpa", "flash"] = Field("sdpa", description="torch SDPA, or flash-attn (GPU extra)")
    vae_tiling: bool = Field(True, description="official spatial VAE tiling")
    vae_tile_px: int = Field(256, ge=64, le=1024, multiple_of=32, description="spatial VAE tile (official 256 px)")
    memory: Literal["resident", "stage-major"] = Field(
        "resident", description="'resident' keeps every model loaded; 'stage-major' runs all encodes of the "
                                "manifest, frees the encoders, then all denoises, then all decodes")
