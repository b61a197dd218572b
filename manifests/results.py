"""The results table: one row per manifest row, written atomically next to the videos.

`fold_item` is the whole bookkeeping of one item: it turns the outcome of each stage into the item's row. It is
pure, so it is tested without Prefect; the flow only gathers the outcomes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import pandas as pd

from common import storage


@dataclass(frozen=True)
class StageOutcome:
    """How one stage of one item ended. ``ref`` is its reference (a dict) when it completed or was cached."""

    status: Literal["completed", "cached", "failed", "not_run"]
    ref: Mapping[str, Any] | None = None
    seconds: float = 0.0
    attempts: int = 0
    error_class: str | None = None
    error_message: str | None = None


@dataclass
class ItemResult:
    """What happened to one manifest row in one run."""

    row: int
    item_id: str
    status: str  # "succeeded" | "failed"
    backend: str
    error_class: str | None = None
    error_message: str | None = None
    failed_stage: str | None = None
    output_uri: str | None = None
    sidecar_uri: str | None = None
    sha256: str | None = None
    audio_seconds: float | None = None
    video_seconds: float | None = None
    frame_count: int | None = None
    attempts: int = 0
    cache_hits: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_cached: dict[str, bool] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, stages: Sequence[str]) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("stage_seconds", "stage_cached", "extra")}
        out["seconds_resolve"] = self.stage_seconds.get("resolve")
        for stage in stages:
            out[f"seconds_{stage}"] = self.stage_seconds.get(stage)
        for stage in stages:
            out[f"cached_{stage}"] = self.stage_cached.get(stage)
        for key, value in self.extra.items():
            name = key
            while name in out:  # a manifest column never overwrites a results column or another manifest column
                name = f"manifest_{name}"
            out[name] = _storable(value)
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any], stages: Sequence[str]) -> ItemResult:
        """The item whose `record` this is, as read back from a results table (a shard's, to be merged)."""
        values = {name: _plain(value) for name, value in record.items()}
        seconds = {stage: values.pop(f"seconds_{stage}", None) for stage in ("resolve", *stages)}
        cached = {stage: values.pop(f"cached_{stage}", None) for stage in stages}
        own = {f.name for f in fields(cls)} - {"stage_seconds", "stage_cached", "extra"}
        known = {name: values.pop(name) for name in list(values) if name in own}
        for name in ("row", "attempts", "cache_hits", "frame_count"):
            if known.get(name) is not None:
                known[name] = int(known[name])
        return cls(**known, stage_seconds={k: float(v) for k, v in seconds.items() if v is not None},
                   stage_cached={k: bool(v) for k, v in cached.items() if v is not None}, extra=values)


def _plain(value: Any) -> Any:
    """A value read from a table as Python has it: numpy scalars unwrapped, NaN/NA (a missing value) as None."""
    if hasattr(value, "item") and not isinstance(value, (list, dict)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _storable(value: Any) -> Any:
    """A manifest value as Parquet can hold it in a results column: nested values (lists, maps, structs) as JSON."""
    if isinstance(value, (dict, list, tuple, set)):
        return json.dumps(value, default=str, sort_keys=True)
    return value


def failed(result: ItemResult, stage: str, error_class: str, message: str, attempts: int = 1) -> ItemResult:
    return replace(result, status="failed", failed_stage=stage, error_class=error_class, error_message=message,
                   attempts=max(result.attempts, attempts))


def fold_item(result: ItemResult, outcomes: Mapping[str, StageOutcome]) -> ItemResult:
    """An item's row from its stages' outcomes (in graph order): the first failed stage names the error.

    Cached stages count as hits with zero seconds. The deliverable's columns come from the ``publish`` and
    ``mux`` references.
    """
    seconds, cached = dict(result.stage_seconds), dict(result.stage_cached)
    attempts, hits, refs = result.attempts, result.cache_hits, {}
    for stage, outcome in outcomes.items():
        if outcome.status == "failed":
            return failed(replace(result, stage_seconds=seconds, stage_cached=cached, cache_hits=hits), stage,
                          outcome.error_class or "Failed", outcome.error_message or "", max(attempts, outcome.attempts))
        if outcome.status == "not_run":
            continue
        hit = outcome.status == "cached" or bool(outcome.ref and outcome.ref.get("skipped"))
        seconds[stage], cached[stage] = (0.0 if outcome.status == "cached" else outcome.seconds), hit
        hits += int(hit)
        attempts = max(attempts, outcome.attempts)
        refs[stage] = outcome.ref
    published, muxed = refs.get("publish"), refs.get("mux")
    if published is None or muxed is None:
        return failed(result, "publish", "NotFinished", "the item's stages did not all run", attempts)
    return replace(result, stage_seconds=seconds, stage_cached=cached, cache_hits=hits, attempts=attempts,
                   output_uri=published["output_uri"], sidecar_uri=published["sidecar_uri"], sha256=muxed["sha256"],
                   frame_count=muxed["n_frames"], video_seconds=muxed["video_seconds"],
                   audio_seconds=muxed["audio_seconds"])


def already_published(result: ItemResult, sidecar: Mapping[str, Any], sidecar_uri: str,
                      stages: Sequence[str]) -> ItemResult:
    """An item whose output already carries its render key: every stage is a cache hit."""
    return replace(result, cache_hits=result.cache_hits + len(stages),
                   stage_seconds={**result.stage_seconds, **dict.fromkeys(stages, 0.0)},
                   stage_cached={**result.stage_cached, **dict.fromkeys(stages, True)},
                   output_uri=sidecar["video_uri"], sidecar_uri=sidecar_uri, sha256=sidecar["sha256"],
                   frame_count=sidecar["frame_count"], video_seconds=sidecar["video_seconds"],
                   audio_seconds=sidecar["audio_seconds"])


def results_frame(results: Sequence[ItemResult], stages: Sequence[str]) -> pd.DataFrame:
    """One row per item, ordered by manifest row; ``seconds_<stage>`` and ``cached_<stage>`` for ``stages``
    (``seconds_resolve`` always)."""
    if not results:
        return pd.DataFrame(columns=list(ItemResult(0, "", "", "").record(stages)))
    return pd.DataFrame([r.record(stages) for r in sorted(results, key=lambda r: r.row)])


def write_results(results: Sequence[ItemResult], uri: str, stages: Sequence[str]) -> pd.DataFrame:
    """Write ``results.parquet`` to ``uri`` (whole or not at all) and return the frame."""
    frame = results_frame(results, stages)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.publish_bytes(buffer.getvalue(), uri)
    return frame


def read_results(uri: str, stages: Sequence[str]) -> list[ItemResult]:
    """The items of a results table written by `write_results`."""
    frame = pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))
    return [ItemResult.from_record(record, stages) for record in frame.to_dict("records")]
