"""The one typed configuration of a pipeline run (a Prefect flow parameter, so the UI renders it as a form)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from avatar_model.config import AudioConfig, DiffusionConfig, PreviewConfig, VideoConfig


class RetryConfig(BaseModel):
    """Transient failures (storage, network, timeouts) are retried with exponential backoff and jitter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retries: int = Field(3, ge=0, le=10)
    base_delay_seconds: float = Field(2.0, ge=0, description="delay before the first retry; doubles each time")
    jitter_factor: float = Field(0.5, ge=0)

    def delays(self) -> list[float]:
        return [self.base_delay_seconds * 2**i for i in range(max(self.retries, 1))]


class InputLimits(BaseModel):
    """Inputs larger than these are refused before they are read (generous: far above any real portrait or line)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    portrait_bytes: int = Field(64 * 2**20, ge=1)
    portrait_pixels: int = Field(64_000_000, ge=1, description="checked from the image header, before decoding")
    audio_bytes: int = Field(1 * 2**30, ge=1)
    http_hosts: tuple[str, ...] = Field((), description="hosts http(s) inputs may come from; none by default")


class ShardConfig(BaseModel):
    """Spreading one manifest over a work pool: shards of rows, each a flow run of the render-shard deployment.

    None of this changes an output (a row renders the same on any worker), so none of it is in a cache key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment: str | None = Field(None, description="the render-shard deployment ('render-shard/shard') that "
                                   "shards run on; none renders the manifest in this flow run")
    rows_per_shard: int = Field(100, ge=1, description="rows of one shard (rows sharing a portrait and prompt stay "
                                "together when they fit)")
    min_rows: int = Field(200, ge=1, description="a manifest with fewer valid rows renders in this flow run")
    max_in_flight: int = Field(16, ge=1, le=4096, description="shards queued or running at once")
    attempts: int = Field(3, ge=1, le=10, description="dispatches of a shard whose run crashed or was lost, "
                          "before its rows count as failed")
    poll_seconds: float = Field(2.0, gt=0, le=60)


class PipelineConfig(BaseModel):
    """Every knob of a run. Storage credentials are not here: s3fs reads the standard AWS_* variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str = Field("preview", description="renderer: preview | tiny-random | hunyuan-avatar")
    cache_uri: str | None = Field(None, description="where stage artifacts are cached; default <output>/.cache")
    max_workers: int = Field(4, ge=1, le=64, description="concurrent stage tasks in one flow run")
    dask_address: str | None = Field(None, pattern=r"^(tcp|tls)://[^\s/]+:\d+$", description="run the stage tasks "
                                     "on this dask cluster (tcp://host:8786; the `dask` extra) instead of threads of "
                                     "the flow's process; gpu stages ask for one GPU resource")
    window: int = Field(32, ge=1, le=4096, description="items in flight at once (resolving or rendering): a "
                        "manifest of any length starts at once and memory stays flat")
    gpu_slot: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
                                 description="concurrency tag of this worker's GPU; default gpu-<host>-<device>")
    video: VideoConfig = VideoConfig()
    audio: AudioConfig = AudioConfig()
    preview: PreviewConfig = PreviewConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    retry: RetryConfig = RetryConfig()
    shards: ShardConfig = ShardConfig()
    limits: InputLimits = InputLimits()

    def model_post_init(self, __context: object) -> None:
        from .graph import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; available: {', '.join(BACKENDS)}")
        if self.dask_address and self.shards.deployment:
            raise ValueError("dask_address and shards.deployment are two ways to spread a run: choose one")
