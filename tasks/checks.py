"""Run-level checks: what would fail every row is refused before any work, with one line saying what to do."""

from __future__ import annotations

from common import storage
from common.errors import ConfigurationError

from .config import PipelineConfig
from .graph import DIFFUSION_BACKENDS
from .models import cuda_available, resolve_diffusion


def check_weights(cfg: PipelineConfig) -> None:
    """The real model's checkpoints must all be there and fit the model (`avatar-batch weights check`)."""
    from avatar_model.hunyuan.weights_check import check_weights as check

    report = check(cfg.diffusion.weights_dir, fp8=cfg.diffusion.fp8, preset=cfg.backend)
    if not report.ok:
        raise ConfigurationError(
            f"the {cfg.backend} weights under {report.root} are not usable ({len(report.problems)} problem(s); "
            f"first: {report.problems[0]}); see weights/README.md, or run `avatar-batch weights check` for all"
        )


def check_locations(cfg: PipelineConfig, output_uri: str) -> None:
    """The output and cache locations must exist and take writes (a missing bucket is never created)."""
    for location in {output_uri, cfg.cache_uri} - {None}:
        storage.check_output_location(location)


def prepare_run(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` checked as a whole and with every ``auto`` resolved to what this machine will use."""
    if cfg.backend not in DIFFUSION_BACKENDS:
        return cfg
    if cfg.video.fps != 25:
        raise ConfigurationError(f"the {cfg.backend} backend renders 25 fps (its audio features are 25 per second); "
                                 f"set video.fps to 25, not {cfg.video.fps}")
    if cfg.dask_address and cfg.diffusion.memory == "stage-major":
        raise ConfigurationError("diffusion.memory='stage-major' releases models in the flow's own process; on a dask "
                                 "cluster the models live in its workers: use memory='resident'")
    if cfg.backend == "hunyuan-avatar":
        check_weights(cfg)
    return cfg.model_copy(update={"diffusion": resolve_diffusion(cfg.diffusion, cuda_available())})
