"""Transient storage faults are retried with backoff; permanent ones are not.

The fault comes from a real fsspec filesystem registered under ``flaky://`` that serves local files but
drops the first N opens for reading of each object with ConnectionError, as a flapping network would.
"""

from __future__ import annotations

import threading
from collections import Counter

import fsspec
import pandas as pd
import pytest
from fsspec.implementations.local import LocalFileSystem

from flows.render_manifest import ItemsFailed, render_manifest
from tasks.config import PipelineConfig, RetryConfig


class FlakyFileSystem(LocalFileSystem):
    protocol = "flaky"
    root_marker = "/"
    failures_per_path = 0
    reads: Counter = Counter()
    lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:  # every read (whole or streamed) opens the object first
            with self.lock:
                self.reads[path] += 1
                attempt = self.reads[path]
            if attempt <= self.failures_per_path:
                raise ConnectionError(f"connection reset while reading {path} (simulated fault #{attempt})")
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture()
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.reads = Counter()
    yield FlakyFileSystem


def _config(retries: int) -> PipelineConfig:
    return PipelineConfig(retry=RetryConfig(retries=retries, base_delay_seconds=0.05, jitter_factor=0.5))


def test_transient_read_faults_are_retried_until_success(tmp_path, inputs, write_manifest, flaky):
    flaky.failures_per_path = 1  # the resolve step reads both inputs: two faults in a row, then success
    manifest = write_manifest(tmp_path / "m.parquet",
                              [("a", f"flaky://{inputs / 'face.png'}", f"flaky://{inputs / 'hello.wav'}")])
    summary = render_manifest(manifest, str(tmp_path / "out"), config=_config(retries=3))
    row = pd.read_parquet(tmp_path / "out" / "results.parquet").iloc[0]
    assert summary["succeeded"] == 1 and row["status"] == "succeeded"
    assert row["attempts"] == 3
    assert sum(flaky.reads.values()) >= 4


def test_retries_are_bounded_and_the_item_fails_with_a_transient_class(tmp_path, inputs, write_manifest, flaky):
    flaky.failures_per_path = 100
    manifest = write_manifest(tmp_path / "m.parquet", [
        ("flapping", f"flaky://{inputs / 'face.png'}", str(inputs / "hello.wav")),
        ("fine", str(inputs / "face.png"), str(inputs / "hello.wav")),
    ])
    with pytest.raises(ItemsFailed, match="1 of 2"):
        render_manifest(manifest, str(tmp_path / "out"), config=_config(retries=2))
    results = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("item_id")
    assert results.loc["flapping", "error_class"] == "TransientError"
    assert "connection reset" in results.loc["flapping", "error_message"]
    assert results.loc["flapping", "attempts"] == 3
    assert flaky.reads[str(inputs / "face.png")] == 3
    assert results.loc["fine", "status"] == "succeeded"
