"""Faults planted in a stage cache, shared by the read-back tests of both backends."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pandas as pd
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from avatar_model.media.audio import ffmpeg_executable


def artifact_of(cache: Path, stage: str) -> Path:
    """The one artifact a stage left in the cache."""
    (found,) = [p for p in (cache / stage).rglob("*") if p.is_file()]
    return found


def damage(path: Path) -> None:
    """Bytes flipped where the format cannot survive it: 4 KiB mid-stream for video (a copied stream still muxes,
    only a decode tells), the header for everything else."""
    data = bytearray(path.read_bytes())
    at, size = (len(data) // 2, 4096) if path.suffix == ".mp4" else (0, 64)
    data[at:at + size] = bytes(b ^ 0xFF for b in data[at:at + size])
    path.write_bytes(bytes(data))


def assert_deliverable(out: Path, expected_sha256: str) -> pd.Series:
    row = pd.read_parquet(out / "results.parquet").iloc[0]
    assert row["status"] == "succeeded", row["error_message"]
    video = Path(row["output_uri"])
    decode = subprocess.run([ffmpeg_executable(), "-v", "error", "-i", str(video), "-f", "null", "-"],
                            capture_output=True, text=True, check=True)
    assert decode.stdout == decode.stderr == "", "the published MP4 does not decode cleanly"
    sha256 = hashlib.sha256(video.read_bytes()).hexdigest()
    assert sha256 == json.loads(Path(row["sidecar_uri"]).read_text())["sha256"] == expected_sha256
    return row


def vouch_for(cache: Path, artifact: Path) -> None:
    """Rewrite the artifact's cache record so that its checksum matches the (damaged) bytes: only reading it back
    can tell."""
    records = ResultStore(result_storage=LocalFileSystem(basepath=str(cache / "records")))
    ref = records.read(artifact.stem).result
    records.write(ref.model_copy(update={"sha256": hashlib.sha256(artifact.read_bytes()).hexdigest()}),
                  key=artifact.stem)
