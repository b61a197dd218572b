import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import DuplicateItemId, InvalidItemId, InvalidParameter
from manifests import ItemResult, ManifestError, load_manifest, write_results
from manifests.folder import manifest_for_folder


def _write(tmp_path: Path, table: pa.Table | pd.DataFrame) -> str:
    path = tmp_path / "m.parquet"
    if isinstance(table, pd.DataFrame):
        table.to_parquet(path, index=False)
    else:
        pq.write_table(table, path)
    return str(path)


def test_rows_resolve_relative_uris_and_carry_extra_columns(tmp_path):
    uri = _write(tmp_path, pd.DataFrame({
        "item_id": ["a", "b"], "portrait_uri": ["p.png", "/abs/p.png"], "audio_uri": ["x/a.wav", "s3://b/a.wav"],
        "seed": [7, 8], "language": ["de", "fr"],
    }))
    rows = load_manifest(uri)
    assert [r.error for r in rows] == [None, None]
    assert rows[0].portrait_uri == str(tmp_path / "p.png")
    assert rows[0].audio_uri == str(tmp_path / "x" / "a.wav")
    assert rows[1].portrait_uri == "/abs/p.png" and rows[1].audio_uri == "s3://b/a.wav"
    assert rows[0].seed == 7 and rows[0].extra == {"language": "de"}


def test_not_parquet_is_a_schema_error(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_text("item_id,portrait_uri\n")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        load_manifest(str(path))


def test_missing_manifest_is_a_schema_error(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(str(tmp_path / "absent.parquet"))


def test_missing_required_column_names_it(tmp_path):
    uri = _write(tmp_path, pd.DataFrame({"item_id": ["a"], "portrait_uri": ["p.png"]}))
    with pytest.raises(ManifestError, match="audio_uri"):
        load_manifest(uri)


def test_wrong_column_type_names_it(tmp_path):
    uri = _write(tmp_path, pd.DataFrame({"item_id": [1], "portrait_uri": ["p"], "audio_uri": ["a"]}))
    with pytest.raises(ManifestError, match="'item_id' must be string"):
        load_manifest(uri)
    uri = _write(tmp_path, pd.DataFrame({"item_id": ["a"], "portrait_uri": ["p"], "audio_uri": ["a"], "seed": ["x"]}))
    with pytest.raises(ManifestError, match="'seed' must be integer"):
        load_manifest(uri)


def test_row_level_problems_fail_only_their_row(tmp_path):
    uri = _write(tmp_path, pd.DataFrame({
        "item_id": ["ok", "../escape", "ok", "", "x" * 129, "blank", "crf"],
        "portrait_uri": ["p", "p", "p", "p", "p", " ", "p"],
        "audio_uri": ["a"] * 7,
        "crf": [None, None, None, None, None, None, 99],
    }))
    rows = load_manifest(uri)
    kinds = [type(r.error) if r.error else None for r in rows]
    assert kinds == [None, InvalidItemId, DuplicateItemId, InvalidItemId, InvalidItemId, InvalidParameter,
                     InvalidParameter]
    assert "repeats row 0" in str(rows[2].error)
    assert "'../escape'" in str(rows[1].error)


def test_results_are_written_whole_with_extra_columns(tmp_path):
    out = tmp_path / "out" / "results.parquet"
    results = [
        ItemResult(row=1, item_id="b", status="failed", backend="preview", error_class="FaceNotFound",
                   error_message="b: no face", extra={"status": "clash", "language": "de"}),
        ItemResult(row=0, item_id="a", status="succeeded", backend="preview", frame_count=10,
                   stage_seconds={"decode": 1.5}, extra={"language": "fr"}),
    ]
    frame = write_results(results, str(out), ("decode", "mux"))
    back = pd.read_parquet(out)
    assert list(back["item_id"]) == ["a", "b"]  # manifest order
    assert back.loc[0, "seconds_decode"] == 1.5 and back.loc[1, "manifest_status"] == "clash"
    assert list(back["language"]) == ["fr", "de"]
    assert list(frame.columns) == list(back.columns)
    assert [p.name for p in out.parent.iterdir()] == ["results.parquet"]


def test_folder_manifest_pairs_audio_with_longest_prefix_portrait(tmp_path):
    for name in ["alice.png", "alice_b.jpg", "bob.png", "alice_b_01.wav", "alice_02.mp3", "bob 3.wav"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    frame, skipped = manifest_for_folder(tmp_path, tmp_path / "out" / "m.parquet")
    frame = frame.set_index("item_id")
    assert frame.loc["alice_b_01", "portrait_uri"] == "../alice_b.jpg", "relative to the manifest's folder"
    assert frame.loc["alice_02", "portrait_uri"] == "../alice.png"
    assert (frame.loc["bob_3", "portrait_uri"], frame.loc["bob_3", "audio_uri"]) == ("../bob.png", "../bob 3.wav")
    assert skipped == [tmp_path / "notes.txt"]
    (tmp_path / "carol.wav").write_bytes(b"x")
    with pytest.raises(ManifestError, match="carol.wav: no portrait whose name prefixes it"):
        manifest_for_folder(tmp_path, tmp_path / "m.parquet")


def test_folder_manifest_without_portraits_or_audio_is_one_clear_error(tmp_path):
    (tmp_path / "line.wav").write_bytes(b"x")
    with pytest.raises(ManifestError, match="no portrait images"):
        manifest_for_folder(tmp_path, tmp_path / "m.parquet")
    (tmp_path / "line.wav").unlink()
    (tmp_path / "alice.png").write_bytes(b"x")
    with pytest.raises(ManifestError, match="no audio files"):
        manifest_for_folder(tmp_path, tmp_path / "m.parquet")


def test_a_folder_manifest_travels_with_its_inputs(tmp_path):
    """Written next to the inputs, read back through the schema, its relative URIs land on the files."""
    (tmp_path / "alice.png").write_bytes(b"x")
    (tmp_path / "alice_01.wav").write_bytes(b"x")
    frame, _ = manifest_for_folder(tmp_path, tmp_path / "m.parquet")
    frame.to_parquet(tmp_path / "m.parquet", index=False)
    (row,) = load_manifest(str(tmp_path / "m.parquet"))
    assert (row.portrait_uri, row.audio_uri) == (str(tmp_path / "alice.png"), str(tmp_path / "alice_01.wav"))



def _manifest_with(tmp_path, **columns) -> str:
    base = {"item_id": ["a"], "portrait_uri": ["p.png"], "audio_uri": ["a.wav"]}
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({**base, **columns}), path)
    return str(path)


def test_numeric_options_are_finite_integers_in_range_and_seeds_use_all_of_int64(tmp_path):
    for value in (math.inf, -math.inf, 1.5):
        (row,) = load_manifest(_manifest_with(tmp_path, seed=pa.array([value])))
        assert isinstance(row.error, InvalidParameter) and "not an integer" in str(row.error)
    (row,) = load_manifest(_manifest_with(tmp_path, seed=pa.array([2**53 + 1], pa.int64())))
    assert row.error is None and row.seed == 2**53 + 1
    (row,) = load_manifest(_manifest_with(tmp_path, seed=pa.array([2**63 - 1], pa.int64())))
    assert row.seed == 2**63 - 1


def test_a_repeated_column_name_is_one_plain_message(tmp_path):
    path = tmp_path / "dup.parquet"
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["p.png"]), pa.array(["a.wav"]), pa.array(["x"])],
                                 names=["item_id", "portrait_uri", "audio_uri", "item_id"])
    pq.write_table(table, path)
    with pytest.raises(ManifestError, match=r"column name\(s\) \['item_id'\] appear more than once"):
        load_manifest(str(path))


def test_extra_columns_of_any_type_reach_the_results_and_never_overwrite_each_other(tmp_path):
    notes = pa.array([[("take", "2")]], pa.map_(pa.string(), pa.string()))
    (row,) = load_manifest(_manifest_with(tmp_path, notes=notes, status=pa.array(["draft"]),
                                          manifest_status=pa.array(["kept"])))
    result = ItemResult(row=0, item_id="a", status="succeeded", backend="preview", extra=row.extra)
    write_results([result], str(tmp_path / "results.parquet"), ("mux",))
    back = pd.read_parquet(tmp_path / "results.parquet")
    assert back.loc[0, "status"] == "succeeded"
    assert back.loc[0, "manifest_status"] == "draft" and back.loc[0, "manifest_manifest_status"] == "kept"
    assert "take" in back.loc[0, "notes"]


def test_folder_manifest_gives_names_that_sanitise_alike_distinct_ids(tmp_path):
    for name in ["alice.png", "alice line.wav", "alice_line.wav", "alice?line.wav"]:
        (tmp_path / name).write_bytes(b"x")
    ids = manifest_for_folder(tmp_path, tmp_path / "m.parquet")[0]["item_id"].tolist()
    assert len(set(ids)) == 3 and "alice_line" in ids


def test_relative_uris_of_an_object_store_manifest_resolve_with_url_semantics():
    from manifests.schema import _resolve

    assert _resolve("s3://studio/manifests/2026", "../portraits/alice.png") == "s3://studio/manifests/portraits/alice.png"
    assert _resolve("s3://studio/m", "./a/./b.wav") == "s3://studio/m/a/b.wav"
    assert _resolve("s3://studio/m", "../../../../x.wav") == "s3://studio/x.wav", "never above the bucket"
    assert _resolve("s3://studio/m", "s3://other/y.wav") == "s3://other/y.wav"
