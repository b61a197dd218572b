"""The render_manifest flow end to end on the preview backend, under a real (temporary) Prefect API."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from avatar_model.config import AudioConfig
from avatar_model.media.video import probe
from flows.render_manifest import ItemsFailed, render_manifest
from tasks.config import InputLimits, PipelineConfig, RetryConfig
from tasks.graph import GRAPHS

FAST = PipelineConfig(retry=RetryConfig(retries=2, base_delay_seconds=0.05))


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_demo_manifest_renders_in_spec_and_rerun_is_all_cache_hits(tmp_path, demo_dir):
    out = tmp_path / "out"
    summary = render_manifest(str(demo_dir.parent / "demo.parquet"), str(out), config=FAST)
    results = pd.read_parquet(out / "results.parquet")
    assert summary["succeeded"] == len(results) == 3 and summary["failed"] == 0
    for row in results.itertuples():
        info = probe(row.output_uri)
        assert (info.video_streams, info.audio_streams) == (1, 1)
        assert (info.video_codec, info.audio_codec) == ("h264", "aac")
        assert info.video_frames == row.frame_count == round(row.audio_seconds * 25)
        assert abs(info.audio_duration_s - info.video_frames / 25) <= 0.040
        sidecar = json.loads(Path(row.sidecar_uri).read_text())
        assert sidecar["sha256"] == row.sha256 and sidecar["item_id"] == row.item_id
    before = _tree(out)

    again = render_manifest(str(demo_dir.parent / "demo.parquet"), str(out), config=FAST)
    rerun = pd.read_parquet(out / "results.parquet")
    assert again["failed"] == 0
    assert (rerun["cache_hits"] == 6).all()  # the 6 stages of the preview graph, all skipped
    stage_columns = [f"seconds_{name}" for name in GRAPHS["preview"].names]
    assert (rerun[stage_columns] == 0).all().all()
    assert list(rerun["sha256"]) == list(results["sha256"])
    after = _tree(out)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"results.parquet", "summary.json", "contact_sheet.jpg"}, changed  # no video or cache rewritten


def test_bad_rows_fail_alone_with_clear_errors_and_nothing_leaks(tmp_path, inputs, write_manifest):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "mixed.parquet", [
        ("good-1", str(inputs / "face.png"), str(inputs / "hello.wav")),
        ("missing-file", str(inputs / "nope.png"), str(inputs / "hello.wav")),
        ("corrupt-audio", str(inputs / "face.png"), str(inputs / "corrupt.wav")),
        ("empty-audio", str(inputs / "face.png"), str(inputs / "empty.wav")),
        ("no-face", str(inputs / "no_face.png"), str(inputs / "hello.wav")),
        ("good-1", str(inputs / "face.png"), str(inputs / "fox.wav")),
        ("../escape", str(inputs / "face.png"), str(inputs / "fox.wav")),
        ("good-2", str(inputs / "same_face_other_name.png"), str(inputs / "fox.wav")),
    ])
    outside_before = _tree(tmp_path)
    state = render_manifest(manifest, str(out), config=FAST, return_state=True)
    assert state.name == "RowsFailed" and state.message.startswith("6 of 8 items failed")

    results = pd.read_parquet(out / "results.parquet").set_index("row")
    expected = {1: "ObjectNotFound", 2: "UndecodableAudio", 3: "EmptyAudio", 4: "FaceNotFound",
                5: "DuplicateItemId", 6: "InvalidItemId"}
    assert results.loc[[0, 7], "status"].tolist() == ["succeeded", "succeeded"]
    for row, error_class in expected.items():
        assert results.loc[row, "status"] == "failed"
        assert results.loc[row, "error_class"] == error_class
        assert results.loc[row, "error_message"]
        assert results.loc[row, "attempts"] <= 1, "permanent errors are never retried"
    assert "nope.png" in results.loc[1, "error_message"]
    assert "no face" in results.loc[4, "error_message"]
    # the same portrait bytes under another name is one cache entry
    assert results.loc[7, "seconds_prepare_portrait"] == 0.0 or results.loc[0, "seconds_prepare_portrait"] == 0.0

    videos = sorted(p.name for p in (out / "videos").iterdir())
    assert videos == ["good-1.json", "good-1.mp4", "good-2.json", "good-2.mp4"]
    outside_after = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("out/")}
    assert outside_after == outside_before

    # stages after a failed one end Skipped (a terminal state), named after their item; none is left Pending
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30  # the API records the last state changes shortly after the flow returns
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            if all(run.state.is_final() for run in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert runs and all(run.state.is_final() for run in runs), sorted({run.state.name for run in runs})
    skipped = {run.name for run in runs if run.state.name == "Skipped"}
    assert {"render-no-face", "mux-no-face", "publish-no-face", "motion-corrupt-audio"} <= skipped


def test_new_seed_reuses_prepared_inputs_but_renders_again(tmp_path, inputs, write_manifest):
    out = tmp_path / "out"
    rows = [("a", str(inputs / "face.png"), str(inputs / "hello.wav"))]
    render_manifest(write_manifest(tmp_path / "m1.parquet", rows, seed=[1]), str(out), config=FAST)
    first = pd.read_parquet(out / "results.parquet").iloc[0]
    render_manifest(write_manifest(tmp_path / "m2.parquet", rows, seed=[2]), str(out), config=FAST)
    second = pd.read_parquet(out / "results.parquet").iloc[0]
    assert second["cache_hits"] == 2  # both prepare stages (motion depends on the seed)
    assert second["seconds_motion"] > 0 and second["seconds_render"] > 0
    assert second["sha256"] != first["sha256"]


def test_manifest_schema_error_stops_the_run_before_any_work(tmp_path):
    manifest = tmp_path / "bad.parquet"
    pd.DataFrame({"item_id": ["a"], "portrait": ["p.png"]}).to_parquet(manifest)
    state = render_manifest(str(manifest), str(tmp_path / "out"), config=FAST, return_state=True)
    assert state.is_failed()
    assert "missing required column" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "out").exists()


def test_unknown_backend_fails_the_run_before_any_work(tmp_path, demo_dir):
    state = render_manifest(str(demo_dir.parent / "demo.parquet"), str(tmp_path / "out"), backend="sora",
                            return_state=True)
    assert state.is_failed()
    assert "unknown backend 'sora'" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "out").exists()


def test_a_damaged_deliverable_is_published_again_on_the_next_run(tmp_path, inputs, write_manifest):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.parquet", [("a", str(inputs / "face.png"), str(inputs / "hello.wav"))])
    render_manifest(manifest, str(out), config=FAST)
    video, sidecar = out / "videos" / "a.mp4", json.loads((out / "videos" / "a.json").read_text())
    good = video.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64)  # flipped bytes mid-stream
    video.write_bytes(bytes(damaged))

    render_manifest(manifest, str(out), config=FAST)
    row = pd.read_parquet(out / "results.parquet").iloc[0]
    assert row["status"] == "succeeded" and not row["cached_publish"], "the item was not taken as done"
    assert video.read_bytes() == good and row["sha256"] == sidecar["sha256"]
    assert row["cached_mux"], "republished from the verified cache, not rendered again"


def test_devices_fifos_folders_and_oversized_inputs_are_refused_before_reading(tmp_path, inputs, write_manifest):
    fifo = tmp_path / "portrait.fifo"
    os.mkfifo(fifo)  # reading it would block forever
    big = tmp_path / "big.png"
    big.write_bytes((inputs / "face.png").read_bytes() + bytes(4096))
    huge = tmp_path / "huge.png"
    Image.new("1", (13000, 13000)).save(huge)  # 20 KB on disk, 507 MB decoded
    long_clip = tmp_path / "long.wav"
    sf.write(long_clip, 0.3 * np.sin(np.arange(16000 * 30) / 3), 16000, subtype="PCM_16")
    manifest = write_manifest(tmp_path / "m.parquet", [
        ("fifo", str(fifo), str(inputs / "hello.wav")),
        ("device", str(inputs / "face.png"), "/dev/zero"),
        ("folder", str(inputs), str(inputs / "hello.wav")),
        ("too-big", str(big), str(inputs / "hello.wav")),
        ("too-many-pixels", str(huge), str(inputs / "hello.wav")),
        ("too-long", str(inputs / "face.png"), str(long_clip)),
        ("fine", str(inputs / "face.png"), str(inputs / "hello.wav")),
    ])
    limits = FAST.model_copy(update={"limits": InputLimits(portrait_bytes=(inputs / "face.png").stat().st_size),
                                     "audio": AudioConfig(max_seconds=20.0)})
    with pytest.raises(ItemsFailed, match="6 of 7"):
        render_manifest(manifest, str(tmp_path / "out"), config=limits)
    results = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("item_id")
    assert results.loc["too-many-pixels", "error_class"] == "InputTooLarge"
    assert "13000x13000" in results.loc["too-many-pixels", "error_message"]
    too_long = results.loc["too-long"]
    assert (too_long["error_class"], too_long["failed_stage"]) == ("InvalidParameter", "prepare_audio")
    assert "30.0 s long (by its header, before decoding)" in too_long["error_message"]
    assert results.loc[["fifo", "device", "folder"], "error_class"].tolist() == ["NotARegularFile"] * 3
    assert results.loc["too-big", "error_class"] == "InputTooLarge" and "limit" in results.loc["too-big",
                                                                                               "error_message"]
    assert (results.loc[["fifo", "device", "folder", "too-big"], "attempts"] == 1).all()
    assert results.loc["fine", "status"] == "succeeded"


def test_http_inputs_are_read_only_from_allowed_hosts(tmp_path, inputs, write_manifest):
    import functools
    import http.server
    import threading

    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # the server's access log, kept for the assertions
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(inputs)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/face.png"
        manifest = write_manifest(tmp_path / "m.parquet", [("web", url, str(inputs / "hello.wav"))])
        with pytest.raises(ItemsFailed):
            render_manifest(manifest, str(tmp_path / "out"), config=FAST)
        row = pd.read_parquet(tmp_path / "out" / "results.parquet").iloc[0]
        assert (row["error_class"], row["attempts"]) == ("InputNotAllowed", 1) and requests == []

        allowed = FAST.model_copy(update={"limits": InputLimits(http_hosts=("127.0.0.1",))})
        render_manifest(manifest, str(tmp_path / "out"), config=allowed)
        assert pd.read_parquet(tmp_path / "out" / "results.parquet").iloc[0]["status"] == "succeeded"
        assert any(path == "/face.png" for path in requests)
    finally:
        server.shutdown()


def test_a_symlinked_videos_folder_is_refused_and_nothing_lands_outside(tmp_path, inputs, write_manifest):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "videos").symlink_to(outside, target_is_directory=True)
    manifest = write_manifest(tmp_path / "m.parquet", [("a", str(inputs / "face.png"), str(inputs / "hello.wav"))])
    with pytest.raises(ItemsFailed):
        render_manifest(manifest, str(out), config=FAST)
    row = pd.read_parquet(out / "results.parquet").iloc[0]
    assert (row["failed_stage"], row["error_class"], row["attempts"]) == ("publish", "UnsafeOutputPath", 1)
    assert list(outside.iterdir()) == []
