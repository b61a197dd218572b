"""The results table: one row per manifest row, written atomically next to the videos."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from avatar_model import storage

STAGES = ("resolve", "prepare_portrait", "prepare_audio", "generate", "decode", "mux", "publish")


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
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("stage_seconds", "extra")}
        for stage in STAGES:
            out[f"seconds_{stage}"] = self.stage_seconds.get(stage)
        for key, value in self.extra.items():
            out[key if key not in out else f"manifest_{key}"] = value
        return out


RESULT_COLUMNS = tuple(ItemResult(0, "", "", "").record())


def results_frame(results: list[ItemResult]) -> pd.DataFrame:
    if not results:
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    return pd.DataFrame([r.record() for r in sorted(results, key=lambda r: r.row)])


def write_results(results: list[ItemResult], uri: str) -> pd.DataFrame:
    """Write ``results.parquet`` to ``uri`` (whole or not at all) and return the frame."""
    frame = results_frame(results)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.publish_bytes(buffer.getvalue(), uri)
    return frame
