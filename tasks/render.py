"""Prefect tasks: caching, retries and logging around the plain stage functions in `tasks.stages`.

Every task takes the row's ``item_id`` so that its run is named after the item in the Prefect UI; ids never enter
cache keys (the same content under two ids is one cache entry).

Each task returns a small reference dict, never frames or tensors. Cache keys come from the same content-key
functions the stages use, and cache records persist in result storage under the run's cache prefix, so a
stage whose entry exists is skipped across flow runs (Prefect's default policy only caches inside one run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from prefect import task
from prefect.runtime import task_run

from avatar_model.config import AudioConfig, VideoConfig
from avatar_model.errors import is_permanent

from . import stages
from .config import PipelineConfig


def _is_retryable(task_obj: Any, run: Any, state: Any) -> bool:
    """Retry transient faults only; bad input (permanent errors) fails the item at once."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and not is_permanent(exc)


def _timed(fn: Callable[..., dict], *args: Any) -> dict:
    """Run a stage, adding its wall seconds and attempt number to the reference; tag failures likewise."""
    started = time.perf_counter()
    try:
        ref = fn(*args)
    except Exception as exc:
        exc.attempts = task_run.run_count  # type: ignore[attr-defined]
        raise
    return {**ref, "seconds": time.perf_counter() - started, "attempts": task_run.run_count}


_CACHED = MappingProxyType({"retry_condition_fn": _is_retryable, "persist_result": True})


@task(name="resolve", task_run_name="resolve-{item_id}", retry_condition_fn=_is_retryable)
def resolve_item(item_id: str, portrait_uri: str, audio_uri: str, seed: int, prompt: str | None, cfg: PipelineConfig,
                 output_uri: str) -> dict:
    """Hash the inputs (bytes, not URIs), derive the render key, find an output already published with it.

    Not cached: a changed input under the same name must be seen on every run.
    """
    return _timed(stages.resolve, item_id, portrait_uri, audio_uri, seed, prompt, cfg, output_uri)


@task(name="prepare-portrait", task_run_name="prepare-portrait-{item_id}", **_CACHED,
      cache_key_fn=lambda ctx, p: stages.portrait_key(p["portrait_sha256"], p["short_side"]))
def prepare_portrait(portrait_uri: str, portrait_sha256: str, short_side: int, cache_uri: str, item_id: str) -> dict:
    return _timed(stages.prepare_portrait, portrait_uri, portrait_sha256, short_side, cache_uri, item_id)


@task(name="prepare-audio", task_run_name="prepare-audio-{item_id}", **_CACHED,
      cache_key_fn=lambda ctx, p: stages.audio_key(p["audio_sha256"], p["audio"], p["sample_rate"]))
def prepare_audio(audio_uri: str, audio_sha256: str, audio: AudioConfig, sample_rate: int, cache_uri: str,
                  item_id: str) -> dict:
    return _timed(stages.prepare_audio, audio_uri, audio_sha256, audio, sample_rate, cache_uri, item_id)


def _generate_key(ctx: Any, p: dict) -> str:
    params = stages.renderer_for(p["cfg"]).output_params(p["prompt"])
    return stages.generate_key(p["portrait"]["key"], p["audio"]["key"], p["seed"], p["cfg"].video.fps, params)


@task(name="generate", task_run_name="generate-{item_id}", cache_key_fn=_generate_key, **_CACHED)
def generate(portrait: dict, audio: dict, seed: int, prompt: str | None, cfg: PipelineConfig, cache_uri: str,
             item_id: str) -> dict:
    """Backend-specific motion or latents; on a GPU backend this is the expensive stage."""
    return _timed(stages.generate, portrait, audio, seed, prompt, cfg, cache_uri)


def _decode_key(ctx: Any, p: dict) -> str:
    params = stages.renderer_for(p["cfg"]).output_params(p["prompt"])
    return stages.decode_key(p["portrait"]["key"], p["motion"]["key"], params, p["cfg"].video)


@task(name="decode", task_run_name="decode-{item_id}", cache_key_fn=_decode_key, **_CACHED)
def decode(portrait: dict, motion: dict, prompt: str | None, cfg: PipelineConfig, cache_uri: str, item_id: str) -> dict:
    return _timed(stages.decode, portrait, motion, prompt, cfg, cache_uri)


@task(name="mux", task_run_name="mux-{item_id}", **_CACHED,
      cache_key_fn=lambda ctx, p: stages.mux_key(p["video_ref"]["key"], p["audio"]["key"], p["video"]))
def mux(video_ref: dict, audio: dict, video: VideoConfig, cache_uri: str, item_id: str) -> dict:
    return _timed(stages.mux, video_ref, audio, video, cache_uri)


@task(name="publish", task_run_name="publish-{item_id}", retry_condition_fn=_is_retryable)
def publish(item_id: str, muxed: dict, provenance: dict, output_uri: str) -> dict:
    """Not cached: it must look at the output location every run (it is idempotent instead)."""
    return _timed(stages.publish, item_id, muxed, provenance, output_uri)
