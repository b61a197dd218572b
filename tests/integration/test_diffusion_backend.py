"""The same DAG with the HunyuanVideo-Avatar sampler (`tiny-random` preset: real code, tiny random weights)."""

from __future__ import annotations

import pandas as pd

from avatar_model.config import DiffusionConfig, VideoConfig
from avatar_model.media.video import probe
from flows.render_manifest import render_manifest
from tasks.config import PipelineConfig

TINY = PipelineConfig(backend="tiny-random", video=VideoConfig(short_side=64),
                      diffusion=DiffusionConfig(steps=2, device="cpu"))


def test_tiny_random_backend_renders_and_caches_latents(tmp_path, inputs, write_manifest):
    manifest = write_manifest(tmp_path / "m.parquet", [("a", str(inputs / "face.png"), str(inputs / "hello.wav"))],
                              prompt=["A woman speaks to the camera."])
    out = tmp_path / "out"
    summary = render_manifest(manifest, str(out), backend="tiny-random", config=TINY)
    row = pd.read_parquet(out / "results.parquet").iloc[0]
    assert summary["succeeded"] == 1
    info = probe(row.output_uri)
    assert (info.width, info.height) == (64, 64)
    assert info.video_frames == row.frame_count == round(row.audio_seconds * 25)
    assert abs(info.audio_duration_s - info.video_frames / 25) <= 0.040
    assert list((out / ".cache" / "generate").rglob("*.pt")), "latents are the cached generate artifact"

    # a new prompt changes the diffusion output: prepare stages hit, generate runs again
    manifest = write_manifest(tmp_path / "m2.parquet", [("a", str(inputs / "face.png"), str(inputs / "hello.wav"))],
                              prompt=["A woman laughs."])
    render_manifest(manifest, str(out), backend="tiny-random", config=TINY)
    again = pd.read_parquet(out / "results.parquet").iloc[0]
    assert again["cache_hits"] == 2 and again["seconds_generate"] > 0
