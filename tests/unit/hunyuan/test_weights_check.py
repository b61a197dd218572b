"""Pre-flight check of a weights folder (`check_weights`) on fake folders in the official layout.

The fake transformer checkpoint holds every released key at its full shape, but each tensor views a single element of
storage (zero strides), so the file is ~300 KB while its metadata is exactly what the real ~26 GB file describes.
The LLaVA, CLIP and Whisper folders are tiny models written by `save_pretrained` (LLaVA sharded), so the files the
check requires are the ones transformers writes and reads.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    LlavaForConditionalGeneration,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from avatar_model.hunyuan.checkpoint import official_key_rules
from avatar_model.hunyuan.config import AvatarTransformerConfig
from avatar_model.hunyuan.fp8 import FP8_DTYPE
from avatar_model.hunyuan.presets import PRESETS
from avatar_model.hunyuan.text_encoders import build_tiny_text_encoder
from avatar_model.hunyuan.weights_check import check_weights

OFFICIAL_KEYS = Path(__file__).resolve().parents[2] / "fixtures" / "hunyuan_official_transformer_keys.json"
SPEC = PRESETS["hunyuan-avatar"]
FP8_LAYERS = frozenset(r.official for r in official_key_rules(AvatarTransformerConfig.released()) if r.fp8)
LLAVA_SHARD = "llava_llama_image/model-00002-of-00003.safetensors"


def zero_stride(shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` over one element of storage: torch.save writes 1 element, the pickle keeps the shape."""
    return torch.zeros(1, dtype=dtype).as_strided(shape, (0,) * len(shape))


def full_shape_state(fp8: bool) -> dict[str, torch.Tensor]:
    """Every official key at its released shape (fp8: the block linear weights float8), each over one element."""
    keys = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    fp8_weights = {f"{layer}.weight" for layer in FP8_LAYERS} if fp8 else set()
    return {key: zero_stride(shape, FP8_DTYPE if key in fp8_weights else torch.bfloat16) for key, shape in keys.items()}


def save_module(path: Path, module: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": module}, path)


def tiny_whisper() -> WhisperModel:
    return WhisperModel(WhisperConfig(
        vocab_size=16, num_mel_bins=80, d_model=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=8,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=8, max_source_positions=16,
        max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    ))


@pytest.fixture(scope="module")
def complete_ckpts(tmp_path_factory) -> Path:
    """A complete `ckpts/` folder with both the dense and the fp8 transformer; tests copy it."""
    ckpts = tmp_path_factory.mktemp("complete") / "ckpts"
    save_module(ckpts / SPEC.transformer, full_shape_state(fp8=False))
    save_module(ckpts / SPEC.transformer_fp8, full_shape_state(fp8=True))
    save_module(ckpts / SPEC.transformer_fp8_map, {name: torch.tensor(1e-3) for name in FP8_LAYERS})
    (ckpts / SPEC.vae).parent.mkdir(parents=True)
    torch.save({"encoder.conv_in.conv.weight": torch.zeros(2)}, ckpts / SPEC.vae)
    (ckpts / SPEC.face_detector).parent.mkdir(parents=True)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), ckpts / SPEC.face_detector)
    encoder = build_tiny_text_encoder(0)
    encoder.llava.save_pretrained(ckpts / SPEC.llava, max_shard_size="40KB")
    encoder.llava_tokenizer.save_pretrained(ckpts / SPEC.llava)
    encoder.clip.save_pretrained(ckpts / SPEC.clip)
    encoder.clip_tokenizer.save_pretrained(ckpts / SPEC.clip)
    tiny_whisper().save_pretrained(ckpts / SPEC.whisper)
    WhisperFeatureExtractor().save_pretrained(ckpts / SPEC.whisper)
    assert (ckpts / LLAVA_SHARD).is_file() and (ckpts / LLAVA_SHARD.replace("2-of", "3-of")).is_file()
    return ckpts


@pytest.fixture
def weights(complete_ckpts, tmp_path) -> Path:
    """A private copy of the complete folder: `<weights>/ckpts/...`."""
    shutil.copytree(complete_ckpts, tmp_path / "weights" / "ckpts")
    return tmp_path / "weights"


def problem_lines(report, path: str) -> list[str]:
    return [line for line in report.problems if line.startswith(f"{path}:")]


# ----------------------------------------------------------------------------------------------- complete folders


def test_complete_dense_folder_is_ok(weights):
    report = check_weights(weights)
    assert report.ok, report.summary()
    assert report.problems == () and report.warnings == () and not report.fp8
    paths = [f.path for f in report.files]
    assert set(SPEC.required_files(fp8=False)) <= set(paths)
    assert SPEC.transformer_fp8 not in paths  # the dense check needs no fp8 files
    assert {
        "llava_llama_image/model.safetensors.index.json", LLAVA_SHARD, "llava_llama_image/tokenizer.json",
        "llava_llama_image/tokenizer_config.json", "text_encoder_2/model.safetensors",
        "text_encoder_2/tokenizer.json", "whisper-tiny/model.safetensors",
    } <= set(paths)
    for file in report.files:
        assert file.size == (weights / "ckpts" / file.path).stat().st_size and file.problem is None
    assert report.summary().splitlines()[-1].startswith("OK: all")
    # every tensor of the full 13B layout is described, yet the file is small
    transformer = weights / "ckpts" / SPEC.transformer
    assert transformer.stat().st_size < 1_000_000
    shapes = {k: list(v.shape) for k, v in torch.load(transformer, mmap=True, weights_only=True)["module"].items()}
    assert shapes == json.loads(OFFICIAL_KEYS.read_text())["keys"]


def test_complete_fp8_folder_is_ok(weights):
    (weights / "ckpts" / SPEC.transformer).unlink()  # the fp8 check does not need the dense file
    report = check_weights(weights, fp8=True)
    assert report.ok, report.summary()
    assert report.fp8 and report.warnings == ()
    assert {SPEC.transformer_fp8, SPEC.transformer_fp8_map} <= {f.path for f in report.files}


def test_checked_folders_load_with_from_pretrained(complete_ckpts):
    """What the check accepts is what the pipeline's loaders open (offline)."""
    load = {"local_files_only": True}
    LlavaForConditionalGeneration.from_pretrained(complete_ckpts / SPEC.llava, **load)
    AutoTokenizer.from_pretrained(complete_ckpts / SPEC.llava, padding_side="right", **load)
    CLIPTextModel.from_pretrained(complete_ckpts / SPEC.clip, **load)
    AutoTokenizer.from_pretrained(complete_ckpts / SPEC.clip, **load)
    WhisperModel.from_pretrained(complete_ckpts / SPEC.whisper, **load)
    WhisperFeatureExtractor.from_pretrained(complete_ckpts / SPEC.whisper, **load)


# ----------------------------------------------------------------------------------------------- files


def test_each_missing_file_is_named(weights):
    """Every file but the LLaVA index (which lists the shards) removed at once: each is named, one line each."""
    index = "llava_llama_image/model.safetensors.index.json"
    removed = [f.path for f in check_weights(weights).files if f.path != index]
    for rel in removed:
        (weights / "ckpts" / rel).unlink()
    report = check_weights(weights)
    assert len(report.problems) == len(removed) == 16
    for rel in removed:
        assert problem_lines(report, rel) == [
            f"{rel}: missing; download it from tencent/HunyuanVideo-Avatar (see weights/README.md)"
        ]
        assert next(f for f in report.files if f.path == rel).size is None


def test_missing_fp8_files_are_named(weights):
    for rel in (SPEC.transformer_fp8, SPEC.transformer_fp8_map):
        (weights / "ckpts" / rel).unlink()
    report = check_weights(weights, fp8=True)
    assert len(report.problems) == 2
    assert all(problem_lines(report, rel) for rel in (SPEC.transformer_fp8, SPEC.transformer_fp8_map))


def test_absent_folders_name_the_official_weights_files(tmp_path):
    report = check_weights(tmp_path)
    paths = {f.path for f in report.files}
    assert "llava_llama_image/model.safetensors.index.json" in paths  # the official LLaVA layout is sharded
    assert {"text_encoder_2/model.safetensors", "whisper-tiny/model.safetensors"} <= paths
    assert len(report.problems) == len(report.files) and all(f.size is None for f in report.files)


@pytest.mark.parametrize("change, expected", [(-10, "truncated: its header describes"), (7, "7 bytes past the")])
def test_safetensors_length_must_match_its_header(weights, change, expected):
    shard = weights / "ckpts" / LLAVA_SHARD
    data = shard.read_bytes()
    shard.write_bytes(data[:change] if change < 0 else data + b"\0" * change)
    [line] = check_weights(weights).problems
    assert line.startswith(f"{LLAVA_SHARD}: {expected}") and line.endswith("download it again")


def test_garbage_safetensors_header_is_caught(weights):
    (weights / "ckpts" / "whisper-tiny/model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{\"a\"" + b"\0" * 8)
    [line] = check_weights(weights).problems
    assert line.startswith("whisper-tiny/model.safetensors: unreadable safetensors header")


@pytest.mark.parametrize("rel", [SPEC.transformer, SPEC.vae, SPEC.face_detector])
def test_truncated_torch_archive_is_caught(weights, rel):
    path = weights / "ckpts" / rel
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    [line] = check_weights(weights).problems
    assert line.startswith(f"{rel}: not a readable torch archive, truncated or corrupt")


def test_torch_archive_record_past_the_end_is_caught(weights):
    """A zip directory that lists a record running past the end of the file (a damaged copy)."""
    path = weights / "ckpts" / SPEC.vae
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if "/data/" in r.filename)
    entry = data.rfind(record.filename.encode()) - 46  # its central directory header; the name is at byte 46
    assert data[entry : entry + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, entry + 20, len(data))  # its compressed size: the whole file
    path.write_bytes(bytes(data))
    [line] = check_weights(weights).problems
    assert line.startswith(f"{SPEC.vae}: truncated: record {record.filename} ends at byte")


def test_json_files_must_parse_and_nothing_may_be_empty(weights):
    ckpts = weights / "ckpts"
    (ckpts / "whisper-tiny/preprocessor_config.json").write_text('{"feature_size": 80,')
    (ckpts / "text_encoder_2/config.json").write_text("")
    (ckpts / "llava_llama_image/model.safetensors.index.json").write_text('{"metadata": {}}')
    report = check_weights(weights)
    assert problem_lines(report, "whisper-tiny/preprocessor_config.json")[0].startswith(
        "whisper-tiny/preprocessor_config.json: not valid JSON")
    assert problem_lines(report, "text_encoder_2/config.json") == [
        "text_encoder_2/config.json: empty; download it again"]
    assert "has no 'weight_map'" in problem_lines(report, "llava_llama_image/model.safetensors.index.json")[0]
    assert len(report.problems) == 3


def test_clip_slow_vocabulary_replaces_tokenizer_json(weights):
    clip = weights / "ckpts" / SPEC.clip
    (clip / "tokenizer.json").unlink()
    (clip / "vocab.json").write_text('{"a</w>": 0}')
    report = check_weights(weights)
    assert [line.split(";")[0] for line in report.problems] == ["text_encoder_2/merges.txt: missing"]
    (clip / "merges.txt").write_text("#version: 0.2\n")
    assert check_weights(weights).ok


# ----------------------------------------------------------------------------------------------- transformer keys


def _rewrite(weights: Path, rel: str, edit) -> None:
    path = weights / "ckpts" / rel
    state = dict(torch.load(path, weights_only=True)["module"])  # not memory-mapped: the file is rewritten
    edit(state)
    save_module(path, state)


def test_missing_key_is_named(weights):
    _rewrite(weights, SPEC.transformer, lambda s: s.pop("double_blocks.7.img_attn_qkv.bias"))
    report = check_weights(weights)
    [line] = report.problems
    assert line.startswith(f"{SPEC.transformer}: lacks 1 key the model needs: double_blocks.7.img_attn_qkv.bias; ")
    assert next(f for f in report.files if f.path == SPEC.transformer).problem == "does not fit the model (see below)"


def test_many_missing_keys_are_abbreviated_with_a_count(weights):
    _rewrite(weights, SPEC.transformer, lambda s: [s.pop(k) for k in list(s) if k.startswith("single_blocks.3.")])
    [line] = check_weights(weights).problems
    assert "lacks 8 keys the model needs: single_blocks.3.linear1.weight, " in line and " and 3 more; " in line


def test_unexpected_key_is_a_warning(weights):
    _rewrite(weights, SPEC.transformer, lambda s: s.update({"guidance_in.mlp.0.weight": torch.zeros(3)}))
    report = check_weights(weights)
    assert report.ok
    assert report.warnings == (
        f"{SPEC.transformer}: 1 key the model does not use (ignored): guidance_in.mlp.0.weight",
    )
    assert f"warning: {report.warnings[0]}" in report.summary()


def test_wrong_shape_is_named(weights):
    _rewrite(weights, SPEC.transformer, lambda s: s.update({"before_proj.weight": torch.zeros(3, 3)}))
    [line] = check_weights(weights).problems
    assert "1 tensor with the wrong shape: before_proj.weight is (3, 3), the model's (3072, 3072); " in line


def test_fp8_checkpoint_in_the_dense_place_is_refused(weights):
    shutil.copy(weights / "ckpts" / SPEC.transformer_fp8, weights / "ckpts" / SPEC.transformer)
    [line] = check_weights(weights).problems
    assert f": {len(FP8_LAYERS)} weights stored as float8 where the dense model expects bf16/fp32: " in line


def test_dense_block_weight_in_the_fp8_checkpoint_is_named(weights):
    _rewrite(weights, SPEC.transformer_fp8, lambda s: s.update({
        "single_blocks.0.linear2.weight": zero_stride((3072, 15360), torch.bfloat16)}))
    [line] = check_weights(weights, fp8=True).problems
    assert "1 block linear weight not float8 as the fp8 model expects: single_blocks.0.linear2.weight (bf" in line


def test_unreadable_payload_is_reported(weights):
    torch.save({"ema": {}}, weights / "ckpts" / SPEC.transformer)
    [line] = check_weights(weights).problems
    assert line.startswith(f"{SPEC.transformer}: ") and "no 'module' entry" in line


# ----------------------------------------------------------------------------------------------- fp8 map


def test_fp8_map_missing_scale_is_named(weights):
    _rewrite(weights, SPEC.transformer_fp8_map, lambda m: m.pop("double_blocks.2.img_mod.linear"))
    report = check_weights(weights, fp8=True)
    assert report.problems == (
        f"{SPEC.transformer_fp8_map}: lacks the fp8 scale of 1 layer: double_blocks.2.img_mod.linear; "
        "download it again",
    )


def test_fp8_map_extra_scale_is_a_warning(weights):
    _rewrite(weights, SPEC.transformer_fp8_map, lambda m: m.update({"final_layer.linear": torch.tensor(1.0)}))
    report = check_weights(weights, fp8=True)
    assert report.ok and len(report.warnings) == 1
    assert report.warnings[0] == (
        f"{SPEC.transformer_fp8_map}: 1 scale for layers the model keeps dense or lacks (ignored): final_layer.linear"
    )


def test_fp8_map_scale_must_be_a_scalar(weights):
    _rewrite(weights, SPEC.transformer_fp8_map, lambda m: m.update({"single_blocks.39.linear2": torch.ones(2)}))
    [line] = check_weights(weights, fp8=True).problems
    assert "1 scale not a single number: single_blocks.39.linear2; " in line


# ----------------------------------------------------------------------------------------------- report, presets


def test_summary_names_every_problem(weights):
    ckpts = weights / "ckpts"
    (ckpts / SPEC.face_detector).unlink()
    shard = ckpts / LLAVA_SHARD
    shard.write_bytes(shard.read_bytes()[:-1])
    _rewrite(weights, SPEC.transformer, lambda s: s.pop("final_layer.linear.bias"))
    report = check_weights(weights)
    summary = report.summary()
    assert len(report.problems) == 3
    assert all(f"problem: {line}" in summary.splitlines() for line in report.problems)
    assert all(f.path in summary for f in report.files)
    assert f"absent  {SPEC.face_detector}: missing" in summary
    assert summary.splitlines()[-1].startswith("NOT OK: 3 problem(s)")


def test_random_preset_needs_no_files(tmp_path):
    report = check_weights(tmp_path, preset="tiny-random")
    assert report.ok and report.files == ()
    assert "needs no files" in report.summary()
    with pytest.raises(ValueError, match="random weights"):
        check_weights(tmp_path, fp8=True, preset="tiny-random")


def test_unknown_preset_names_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'; available: tiny-random, hunyuan-avatar"):
        check_weights(tmp_path, preset="huge")
