"""Nothing read back from the cache is trusted: evicted, damaged and lying cache entries of every preview stage are
recomputed, and the rerun delivers a correct, fully decodable MP4 whose sidecar checksum matches."""

from __future__ import annotations

import pandas as pd
import pytest
from cache_faults import artifact_of, assert_deliverable, damage, vouch_for

from flows.render_manifest import render_manifest
from tasks.config import PipelineConfig, RetryConfig

CACHED = ("prepare_portrait", "prepare_audio", "motion", "render", "mux")
DOWNSTREAM = {"prepare_portrait": ("render", "mux"), "prepare_audio": ("motion", "render", "mux"),
              "motion": ("render", "mux"), "render": ("mux",)}


@pytest.fixture()
def first_run(tmp_path, inputs, write_manifest):
    """One item rendered once into a cache shared with the reruns; later runs write to fresh output folders."""
    cfg = PipelineConfig(cache_uri=str(tmp_path / "cache"), retry=RetryConfig(retries=2, base_delay_seconds=0.05))
    manifest = write_manifest(tmp_path / "m.parquet", [("line", str(inputs / "face.png"), str(inputs / "hello.wav"))])
    render_manifest(manifest, str(tmp_path / "first"), config=cfg)
    sha256 = pd.read_parquet(tmp_path / "first" / "results.parquet").iloc[0]["sha256"]
    return cfg, manifest, tmp_path / "cache", sha256


@pytest.mark.parametrize("fault", ["evicted", "damaged"])
def test_evicted_or_damaged_artifacts_of_every_stage_are_computed_again(tmp_path, first_run, fault):
    cfg, manifest, cache, sha256 = first_run
    for stage in CACHED:
        artifact = artifact_of(cache, stage)
        artifact.unlink() if fault == "evicted" else damage(artifact)

    render_manifest(manifest, str(tmp_path / "again"), config=cfg)
    row = assert_deliverable(tmp_path / "again", sha256)
    assert not any(row[f"cached_{stage}"] for stage in CACHED), "a stage reused an artifact it could not trust"


def test_rerun_after_repair_is_all_cache_hits(tmp_path, first_run):
    cfg, manifest, cache, sha256 = first_run
    damage(artifact_of(cache, "motion"))
    render_manifest(manifest, str(tmp_path / "repaired"), config=cfg)
    render_manifest(manifest, str(tmp_path / "third"), config=cfg)
    row = assert_deliverable(tmp_path / "third", sha256)
    assert all(row[f"cached_{stage}"] for stage in CACHED)


@pytest.mark.parametrize("stage", list(DOWNSTREAM))
def test_a_record_that_vouches_for_a_damaged_artifact_is_caught_when_read_and_repaired_in_the_run(
        tmp_path, first_run, stage):
    """The record's checksum is rewritten to match the damaged bytes, so only decoding can tell (the silent
    video: only mux's full decode, since its stream is copied). Its readers are evicted so that they read it."""
    cfg, manifest, cache, sha256 = first_run
    artifact = artifact_of(cache, stage)
    damage(artifact)
    vouch_for(cache, artifact)
    for reader in DOWNSTREAM[stage]:
        artifact_of(cache, reader).unlink()

    render_manifest(manifest, str(tmp_path / "again"), config=cfg)
    row = assert_deliverable(tmp_path / "again", sha256)
    assert not row[f"cached_{stage}"], "the damaged artifact was made again"
