"""Nothing read back from the cache is trusted: evicted, damaged and lying cache entries of every preview stage are
recomputed, and the rerun delivers a correct, fully decodable MP4 whose sidecar checksum matches."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from avatar_model.media.audio import ffmpeg_executable
from flows.render_manifest import render_manifest
from tasks.config import PipelineConfig, RetryConfig

CACHED = ("prepare_portrait", "prepare_audio", "motion", "render", "mux")
DOWNSTREAM = {"prepare_portrait": ("render", "mux"), "prepare_audio": ("motion", "render", "mux"),
              "motion": ("render", "mux"), "render": ("mux",)}


def _artifact(cache: Path, stage: str) -> Path:
    (found,) = [p for p in (cache / stage).rglob("*") if p.is_file()]
    return found


def _damage(path: Path) -> None:
    """Bytes flipped where the format cannot survive it: 4 KiB mid-stream for video (a copied stream still muxes,
    only a decode tells), the header for everything else."""
    data = bytearray(path.read_bytes())
    at, size = (len(data) // 2, 4096) if path.suffix == ".mp4" else (0, 64)
    data[at:at + size] = bytes(b ^ 0xFF for b in data[at:at + size])
    path.write_bytes(bytes(data))


def _assert_deliverable(out: Path, expected_sha256: str) -> pd.Series:
    row = pd.read_parquet(out / "results.parquet").iloc[0]
    assert row["status"] == "succeeded", row["error_message"]
    video = Path(row["output_uri"])
    decode = subprocess.run([ffmpeg_executable(), "-v", "error", "-i", str(video), "-f", "null", "-"],
                            capture_output=True, text=True, check=True)
    assert decode.stdout == decode.stderr == "", "the published MP4 does not decode cleanly"
    sha256 = hashlib.sha256(video.read_bytes()).hexdigest()
    assert sha256 == json.loads(Path(row["sidecar_uri"]).read_text())["sha256"] == expected_sha256
    return row


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
        artifact = _artifact(cache, stage)
        artifact.unlink() if fault == "evicted" else _damage(artifact)

    render_manifest(manifest, str(tmp_path / "again"), config=cfg)
    row = _assert_deliverable(tmp_path / "again", sha256)
    assert not any(row[f"cached_{stage}"] for stage in CACHED), "a stage reused an artifact it could not trust"


def test_rerun_after_repair_is_all_cache_hits(tmp_path, first_run):
    cfg, manifest, cache, sha256 = first_run
    _damage(_artifact(cache, "motion"))
    render_manifest(manifest, str(tmp_path / "repaired"), config=cfg)
    render_manifest(manifest, str(tmp_path / "third"), config=cfg)
    row = _assert_deliverable(tmp_path / "third", sha256)
    assert all(row[f"cached_{stage}"] for stage in CACHED)


@pytest.mark.parametrize("stage", list(DOWNSTREAM))
def test_a_record_that_vouches_for_a_damaged_artifact_is_caught_when_read_and_repaired_in_the_run(
        tmp_path, first_run, stage):
    """The record's checksum is rewritten to match the damaged bytes, so only decoding can tell (the silent
    video: only mux's full decode, since its stream is copied). Its readers are evicted so that they read it."""
    cfg, manifest, cache, sha256 = first_run
    artifact = _artifact(cache, stage)
    _damage(artifact)
    records = ResultStore(result_storage=LocalFileSystem(basepath=str(cache / "records")))
    key = artifact.stem
    ref = records.read(key).result
    records.write(ref.model_copy(update={"sha256": hashlib.sha256(artifact.read_bytes()).hexdigest()}), key=key)
    for reader in DOWNSTREAM[stage]:
        _artifact(cache, reader).unlink()

    render_manifest(manifest, str(tmp_path / "again"), config=cfg)
    row = _assert_deliverable(tmp_path / "again", sha256)
    assert not row[f"cached_{stage}"], "the damaged artifact was made again"
