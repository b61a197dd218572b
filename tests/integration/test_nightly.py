from datetime import date

import pandas as pd

from flows.nightly import nightly_render
from tasks.config import PipelineConfig


def test_nightly_renders_the_manifest_of_its_day(tmp_path, inputs, write_manifest):
    write_manifest(tmp_path / "2026-11-02.parquet", [("a", str(inputs / "face.png"), str(inputs / "hello.wav"))])
    summary = nightly_render(manifest_template=str(tmp_path / "{date}.parquet"),
                             output_template=str(tmp_path / "renders" / "{date}"), day=date(2026, 11, 2),
                             config=PipelineConfig())
    assert summary["succeeded"] == 1
    results = pd.read_parquet(tmp_path / "renders" / "2026-11-02" / "results.parquet")
    assert results.loc[0, "output_uri"] == str(tmp_path / "renders" / "2026-11-02" / "videos" / "a.mp4")
