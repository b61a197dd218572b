"""The results bookkeeping: stage outcomes → one results row (pure, no Prefect)."""

import pandas as pd

from manifests import ItemResult, StageOutcome, already_published, failed, fold_item, results_frame

STAGES = ("prepare_portrait", "prepare_audio", "motion", "render", "mux", "publish")
MUXED = {"sha256": "ab" * 32, "n_frames": 81, "video_seconds": 3.24, "audio_seconds": 3.24}
PUBLISHED = {"output_uri": "out/videos/a.mp4", "sidecar_uri": "out/videos/a.json", "skipped": False}


def base() -> ItemResult:
    return ItemResult(row=3, item_id="a", status="succeeded", backend="preview", attempts=1,
                      stage_seconds={"resolve": 0.01}, extra={"status": "take-2", "character": "alice"})


def completed(seconds=1.0, attempts=1, ref=None) -> StageOutcome:
    return StageOutcome("completed", ref or {}, seconds, attempts)


def test_a_rendered_item_records_every_stage_and_its_deliverable():
    outcomes = {s: completed(seconds=i + 1.0) for i, s in enumerate(STAGES)}
    outcomes["mux"], outcomes["publish"] = completed(5.0, ref=MUXED), completed(6.0, attempts=2, ref=PUBLISHED)
    item = fold_item(base(), outcomes)
    assert item.status == "succeeded" and item.error_class is None
    assert item.cache_hits == 0 and item.attempts == 2
    assert item.stage_seconds == {"resolve": 0.01, **{s: i + 1.0 for i, s in enumerate(STAGES)}}
    assert (item.output_uri, item.sidecar_uri, item.sha256) == (PUBLISHED["output_uri"], PUBLISHED["sidecar_uri"],
                                                                MUXED["sha256"])
    assert (item.frame_count, item.video_seconds, item.audio_seconds) == (81, 3.24, 3.24)


def test_cached_stages_count_as_hits_with_zero_seconds_and_a_skipped_publish_too():
    outcomes = {s: StageOutcome("cached", {}, seconds=9.0) for s in STAGES[:4]}
    outcomes["mux"] = StageOutcome("cached", MUXED, seconds=9.0)
    outcomes["publish"] = completed(0.2, ref={**PUBLISHED, "skipped": True})
    item = fold_item(base(), outcomes)
    assert item.cache_hits == 6
    assert all(item.stage_seconds[s] == 0.0 for s in STAGES[:5]) and item.stage_seconds["publish"] == 0.2
    assert all(item.stage_cached[s] for s in STAGES)


def test_the_first_failed_stage_names_the_error_and_later_stages_did_not_run():
    outcomes = {"prepare_portrait": StageOutcome("cached", {}), "prepare_audio": completed(),
                "motion": StageOutcome("failed", error_class="TransientError", error_message="disk hiccup",
                                       attempts=4),
                "render": StageOutcome("not_run"), "mux": StageOutcome("not_run"), "publish": StageOutcome("not_run")}
    item = fold_item(base(), outcomes)
    assert (item.status, item.failed_stage, item.error_class) == ("failed", "motion", "TransientError")
    assert item.error_message == "disk hiccup" and item.attempts == 4 and item.cache_hits == 1
    assert "render" not in item.stage_seconds and item.output_uri is None


def test_an_item_already_published_hits_every_stage():
    sidecar = {"video_uri": "out/videos/a.mp4", "sha256": "cd" * 32, "frame_count": 10, "video_seconds": 0.4,
               "audio_seconds": 0.4}
    item = already_published(base(), sidecar, "out/videos/a.json", STAGES)
    assert item.cache_hits == len(STAGES) and item.stage_seconds["render"] == 0.0
    assert (item.sha256, item.frame_count, item.sidecar_uri) == ("cd" * 32, 10, "out/videos/a.json")


def test_results_columns_come_from_the_stage_names_and_extras_never_overwrite_them():
    frame = results_frame([fold_item(base(), {s: completed(ref={**MUXED, **PUBLISHED}) for s in STAGES})], STAGES)
    for stage in STAGES:
        assert f"seconds_{stage}" in frame.columns and f"cached_{stage}" in frame.columns
    assert frame.loc[0, "seconds_resolve"] == 0.01
    assert frame.loc[0, "status"] == "succeeded" and frame.loc[0, "manifest_status"] == "take-2"
    assert frame.loc[0, "character"] == "alice"
    assert list(results_frame([], STAGES).columns) == list(frame.columns)[:-2]  # the same, less the extras


def test_results_read_back_from_a_table_are_the_items_written(tmp_path):
    """A shard's results, merged by its parent run, are the items the shard recorded: missing values, counts,
    per-stage seconds and flags, and the manifest's own columns (one named like a results column) survive."""
    from manifests import read_results, write_results

    outcomes = {s: completed(seconds=i + 1.0) for i, s in enumerate(STAGES)}
    outcomes["mux"], outcomes["publish"] = completed(5.0, ref=MUXED), completed(6.0, attempts=2, ref=PUBLISHED)
    done = fold_item(base(), outcomes)
    bad = failed(ItemResult(row=0, item_id="b", status="succeeded", backend="preview", extra={"character": "bob"}),
                 "prepare_audio", "UndecodableAudio", "b.wav: not audio")
    uri = str(tmp_path / "shard.parquet")
    write_results([done, bad], uri, STAGES)
    back = read_results(uri, STAGES)
    assert [item.item_id for item in back] == ["b", "a"]
    assert back[0].error_class == "UndecodableAudio" and back[0].frame_count is None and back[0].output_uri is None
    assert back[1].stage_seconds == done.stage_seconds and back[1].stage_cached == done.stage_cached
    assert (back[1].frame_count, back[1].attempts, back[1].sha256) == (81, 2, MUXED["sha256"])
    # a manifest column named like a results column is stored as manifest_<name>, and read back under that name
    assert back[1].extra == {"manifest_status": "take-2", "character": "alice"}
    write_results(back, str(tmp_path / "merged.parquet"), STAGES)
    assert pd.read_parquet(tmp_path / "merged.parquet").equals(pd.read_parquet(uri))
