"""What the Prefect UI shows of a render, read back from the API: live progress, the results table, the summary
and the contact sheet, on the render run and on the nightly run that started it."""

from __future__ import annotations

import base64
import io
import json
from datetime import date

from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from flows.nightly import nightly_render
from flows.render_manifest import render_manifest
from tasks.config import PipelineConfig, RetryConfig

FAST = PipelineConfig(retry=RetryConfig(retries=1, base_delay_seconds=0.05))


def _artifacts(flow_run_id=None, key=None) -> list:
    """Every version of the matching artifacts, oldest first (a keyed table gets a new version per update)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None,
            key=ArtifactFilterKey(any_=[key]) if key else None))
    return sorted(found, key=lambda a: a.created)


def test_a_render_shows_live_progress_then_results_summary_and_contact_sheet(tmp_path, inputs, write_manifest):
    manifest = write_manifest(tmp_path / "lines.parquet", [
        ("hello", str(inputs / "face.png"), str(inputs / "hello.wav")),
        ("fox", str(inputs / "face.png"), str(inputs / "fox.wav")),
        ("broken", str(inputs / "face.png"), str(inputs / "corrupt.wav")),
    ])
    seen: list[float] = []

    def read_progress(item) -> None:  # while the run is in flight, as the UI would
        (progress,) = _artifacts(key="render-lines-progress")[:1]
        seen.append(float(progress.data))

    state = render_manifest(manifest, str(tmp_path / "out"), config=FAST, on_item=read_progress, return_state=True)
    assert (state.type.value, state.name) == ("FAILED", "RowsFailed") and state.message.startswith("1 of 3 items")
    assert len(seen) == 3 and seen[0] < seen[-1], seen  # it moved while the run went
    by_key = {a.key: a for a in _artifacts(flow_run_id=state.state_details.flow_run_id)}
    assert {"render-lines-progress", "render-lines-results", "render-lines-summary",
            "render-lines-contact-sheet"} <= set(by_key)
    assert float(by_key["render-lines-progress"].data) == 100.0
    table = json.loads(by_key["render-lines-results"].data)
    assert [row["item"] for row in table][0] == "broken", "failed rows come first"
    broken = table[0]
    assert (broken["status"], broken["failed stage"]) == ("failed", "prepare_audio")
    assert broken["error"].startswith("UndecodableAudio") and broken["audio"].endswith("corrupt.wav")
    assert {row["video"] for row in table[1:]} == {str(tmp_path / "out" / "videos" / f"{i}.mp4") for i in ("hello",
                                                                                                         "fox")}
    summary = by_key["render-lines-summary"].data
    assert "2 of 3 items succeeded, 1 failed" in summary and "| UndecodableAudio | 1 |" in summary
    url = by_key["render-lines-contact-sheet"].data
    assert url.startswith("data:image/jpeg;base64,")
    sheet = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sheet.size == (2 * 160, 176)  # two videos, one row of tiles with their labels
    assert (tmp_path / "out" / "contact_sheet.jpg").read_bytes() == base64.b64decode(url.split(",", 1)[1])


def test_the_nightly_run_carries_the_same_artifacts_as_its_render(tmp_path, inputs, write_manifest):
    write_manifest(tmp_path / "2026-11-05.parquet", [("a", str(inputs / "face.png"), str(inputs / "hello.wav"))])
    state = nightly_render(manifest_template=str(tmp_path / "{date}.parquet"),
                           output_template=str(tmp_path / "renders" / "{date}"), day=date(2026, 11, 5),
                           config=FAST, return_state=True)
    assert state.is_completed()
    keys = {a.key for a in _artifacts(flow_run_id=state.state_details.flow_run_id)}
    assert {"render-2026-11-05-progress", "render-2026-11-05-results", "render-2026-11-05-summary",
            "render-2026-11-05-contact-sheet"} <= keys
