"""Prefect tasks: caching, retries and logging around the plain stage functions in `tasks.stages`.

Each task returns a small reference dict, never frames or tensors. Cache keys come from the same content-key
functions the stages use, and cache records persist in result storage under the run's cache prefix, so a
stage whose entry exists is skipped across flow runs (Prefect's default policy only caches inside one run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.runtime import task_run

from avatar_model.backends import renderer_version
from avatar_model.errors import is_permanent

from . import stages


def _is_retryable(task_obj: Any, run: Any, state: Any) -> bool:
    """Retry transient faults only; bad input (permanent errors) fails the item at once."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and not is_permanent(exc)


def _timed(fn: Callable[..., dict], *args: Any, **kwargs: Any) -> dict:
    """Run a stage, adding its wall seconds and attempt number to the reference; tag failures likewise."""
    started = time.perf_counter()
    try:
        ref = fn(*args, **kwargs)
    except Exception as exc:
        exc.attempts = task_run.run_count  # type: ignore[attr-defined]
        raise
    return {**ref, "seconds": time.perf_counter() - started, "attempts": task_run.run_count}


_COMMON: dict[str, Any] = {"retry_condition_fn": _is_retryable, "persist_result": True}


@task(name="fingerprint", retry_condition_fn=_is_retryable)
def fingerprint(uri: str) -> dict:
    """Content hash of one input (its bytes, not its URI): every later cache key derives from it."""
    return _timed(lambda: {"sha256": stages.fingerprint(uri)})


@task(name="prepare-portrait", cache_key_fn=lambda ctx, p: stages.portrait_key(p["portrait_fp"]["sha256"],
                                                                               p["short_side"]), **_COMMON)
def prepare_portrait(portrait_uri: str, portrait_fp: dict, short_side: int, cache_uri: str, name: str) -> dict:
    return _timed(stages.prepare_portrait, portrait_uri, portrait_fp["sha256"], short_side, cache_uri, name)


@task(name="prepare-audio",
      cache_key_fn=lambda ctx, p: stages.audio_key(p["audio_fp"]["sha256"], p["audio"], p["sample_rate"]), **_COMMON)
def prepare_audio(audio_uri: str, audio_fp: dict, audio: Any, sample_rate: int, cache_uri: str, name: str) -> dict:
    return _timed(stages.prepare_audio, audio_uri, audio_fp["sha256"], audio, sample_rate, cache_uri, name)


def _generate_key(ctx: Any, p: dict) -> str:
    version = renderer_version(p["backend"])
    return stages.generate_key(p["portrait"], p["audio"], p["seed"], version, p["preview"], p["video"].fps)


@task(name="generate", cache_key_fn=_generate_key, **_COMMON)
def generate(portrait: dict, audio: dict, seed: int, backend: str, preview: Any, video: Any, cache_uri: str) -> dict:
    return _timed(stages.generate, portrait, audio, seed, backend, preview, video, cache_uri)


def _decode_key(ctx: Any, p: dict) -> str:
    return stages.decode_key(p["portrait"], p["motion"], renderer_version(p["backend"]), p["video"])


@task(name="decode", cache_key_fn=_decode_key, **_COMMON)
def decode(portrait: dict, motion: dict, backend: str, preview: Any, video: Any, cache_uri: str) -> dict:
    return _timed(stages.decode, portrait, motion, backend, preview, video, cache_uri)


@task(name="mux", cache_key_fn=lambda ctx, p: stages.mux_key(p["video_ref"], p["audio"], p["video"]), **_COMMON)
def mux(video_ref: dict, audio: dict, video: Any, cache_uri: str) -> dict:
    return _timed(stages.mux, video_ref, audio, video, cache_uri)


@task(name="publish", retry_condition_fn=_is_retryable)
def publish(item_id: str, muxed: dict, provenance: dict, output_uri: str) -> dict:
    """Not cached: it must look at the output location every run (it is idempotent instead)."""
    return _timed(stages.publish, item_id, muxed, provenance, output_uri)
