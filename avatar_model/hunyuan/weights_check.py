"""Pre-flight check of a weights folder: every file a render opens, checked before any work starts.

Loading the released model takes minutes and ~60 GB; a missing shard, a truncated download or a checkpoint of another
model should instead stop a render at once, with one report naming every bad file. Nothing here reads weight data:
safetensors files are checked against their own headers, torch archives against their zip directories, and the
transformer's keys and shapes come from its pickled metadata (memory-mapped), compared with the model built on the
meta device.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from avatar_model.hunyuan.checkpoint import (
    CheckpointError,
    build_meta_transformer,
    export_official_state_dict,
    read_official_payload,
)
from avatar_model.hunyuan.config import AvatarTransformerConfig
from avatar_model.hunyuan.fp8 import FP8_DTYPE
from avatar_model.hunyuan.presets import PRESETS, PipelinePreset

# The weights files `from_pretrained` looks for in a folder, in its order of preference.
_PRETRAINED_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit the safetensors format itself enforces
_NAMES_PER_LINE = 5


@dataclass(frozen=True)
class FileCheck:
    """One file of the layout: its size and, when it is unusable, why."""

    path: str  # relative to <weights_dir>/ckpts
    size: int | None  # bytes, None when absent
    problem: str | None  # None when fine


@dataclass(frozen=True)
class WeightsReport:
    """What `check_weights` found. `problems` would make the render fail or be wrong; `warnings` are what the
    loader tolerates (keys it does not use) but a person should know about."""

    root: str
    fp8: bool
    files: tuple[FileCheck, ...]
    problems: tuple[str, ...]  # every problem, one line each, naming the file and what to do
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line per file (size, ok or its problem), every problem and warning, then the verdict."""
        lines = [f"weights under {self.root} ({'fp8' if self.fp8 else 'dense'} transformer):"]
        lines += [f"  {_human_size(f.size):>9}  {f.path}: {f.problem or 'ok'}" for f in self.files]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"warning: {w}" for w in self.warnings]
        if not self.files:
            lines.append("OK: this preset has random weights and needs no files")
        elif self.ok:
            lines.append(f"OK: all {len(self.files)} files are present and usable")
        else:
            lines.append(f"NOT OK: {len(self.problems)} problem(s); fix them before rendering (see weights/README.md)")
        return "\n".join(lines)


def check_weights(weights_dir: str | Path, fp8: bool = False, preset: str = "hunyuan-avatar") -> WeightsReport:
    """Check `<weights_dir>/ckpts` for `preset` without reading weight data: every file the render opens is present,
    non-empty and complete (JSON parses, safetensors and torch archives are as long as their own indexes say), and
    the transformer checkpoint's keys, shapes and fp8 layers (with `fp8`, also its scale map) fit the model."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    root = Path(weights_dir) / "ckpts"
    if spec.random_seed is not None:
        if fp8:
            raise ValueError(f"fp8 selects the official fp8 checkpoint; preset {preset!r} has random weights")
        return WeightsReport(str(root), fp8, (), ())
    checks = {rel: _check_file(root, rel) for rel in sorted(_layout(spec, root, fp8))}
    problems = [f"{c.path}: {c.problem}; {_remedy(c)}" for c in checks.values() if c.problem]
    warnings: list[str] = []
    transformer = spec.transformer_fp8 if fp8 else spec.transformer
    contents = {transformer: _check_transformer_keys} | ({spec.transformer_fp8_map: _check_fp8_map} if fp8 else {})
    contents = {rel: check for rel, check in contents.items() if not checks[rel].problem}
    if contents:
        expected = export_official_state_dict(build_meta_transformer(AvatarTransformerConfig.released(), fp8=fp8))
        for rel, check in contents.items():
            file_problems, file_warnings = check(root, rel, expected)
            problems += file_problems
            warnings += file_warnings
            if file_problems:
                checks[rel] = replace(checks[rel], problem="does not fit the model (see below)")
    return WeightsReport(str(root), fp8, tuple(checks.values()), tuple(problems), tuple(warnings))


# ----------------------------------------------------------------------------------------------- the layout


def _layout(spec: PipelinePreset, root: Path, fp8: bool) -> set[str]:
    """The preset's required files plus what `from_pretrained(local_files_only=True)` opens in each model folder."""
    files = set(spec.required_files(fp8))
    for folder, official_weights, tokenizer in (
        (spec.llava, "model.safetensors.index.json", ()),  # Llama-3 ships only tokenizer.json
        (spec.clip, "model.safetensors", ("vocab.json", "merges.txt")),
        (spec.whisper, "model.safetensors", None),  # only its feature extractor is used, no tokenizer
    ):
        files.update(f"{folder}/{name}" for name in _pretrained_weights(root / folder, official_weights))
        if tokenizer is not None:
            files.update(f"{folder}/{name}" for name in _tokenizer_files(root / folder, tokenizer))
    return files


def _pretrained_weights(folder: Path, official: str) -> list[str]:
    """The weights file `from_pretrained` will pick in `folder` (the `official` one when there is none), plus the
    shards an index lists."""
    name = next((n for n in _PRETRAINED_WEIGHTS if (folder / n).is_file()), official)
    if not name.endswith(".index.json") or not (folder / name).is_file():
        return [name]
    return [name, *sorted(set((_weight_map(folder / name) or {}).values()))]


def _tokenizer_files(folder: Path, slow_vocabulary: tuple[str, ...]) -> list[str]:
    """`tokenizer_config.json` and `tokenizer.json`, or the slow vocabulary files when those are what the folder
    holds instead (CLIP's tokenizer loads from either)."""
    slow = not (folder / "tokenizer.json").is_file() and any((folder / name).is_file() for name in slow_vocabulary)
    return ["tokenizer_config.json", *(slow_vocabulary if slow else ("tokenizer.json",))]


def _weight_map(index: Path) -> dict[str, str] | None:
    """An index's `weight_map` (tensor -> shard file), or None when the index is unusable."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        return None
    return weight_map


# ----------------------------------------------------------------------------------------------- one file


def _check_file(root: Path, rel: str) -> FileCheck:
    path = root / rel
    if not path.is_file():
        return FileCheck(rel, None, "missing")
    size = path.stat().st_size
    if size == 0:
        return FileCheck(rel, 0, "empty")
    try:
        return FileCheck(rel, size, _content_problem(path, size))
    except OSError as exc:
        return FileCheck(rel, size, f"unreadable ({exc})")


def _content_problem(path: Path, size: int) -> str | None:
    if path.name.endswith(".index.json"):
        return _index_problem(path)
    if path.suffix == ".json":
        return _json_problem(path)
    if path.suffix == ".safetensors":
        return _safetensors_problem(path, size)
    if path.suffix in (".pt", ".bin"):
        return _torch_archive_problem(path, size)
    return None  # merges.txt: plain text, non-empty is all a loader needs


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # includes JSONDecodeError and UnicodeDecodeError
        return f"not valid JSON ({exc})"
    return None


def _index_problem(path: Path) -> str | None:
    problem = _json_problem(path)
    if problem is None and _weight_map(path) is None:
        return "has no 'weight_map' of tensor names to shard files"
    return problem


def _safetensors_problem(path: Path, size: int) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then data up to the largest `data_offsets`
    end: the file must be exactly that long (the safetensors loader refuses anything else)."""
    if size < 8:
        return f"truncated: {size} bytes, shorter than a safetensors header"
    with path.open("rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        if header_length > min(size - 8, _SAFETENSORS_MAX_HEADER):
            return f"truncated or not safetensors: header length {header_length} does not fit in {size} bytes"
        try:
            header = json.loads(file.read(header_length))
            ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            return f"unreadable safetensors header ({type(exc).__name__}: {exc})"
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return f"truncated: its header describes {expected} bytes, the file has {size}"
    if size > expected:
        return f"{size - expected} bytes past the {expected} its header describes"
    return None


def _torch_archive_problem(path: Path, size: int) -> str | None:
    """torch.save and TorchScript files are zip archives with a `data.pkl` record; the zip directory sits at the end,
    so a truncated download has none, and each listed record must end inside the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except zipfile.BadZipFile as exc:
        return f"not a readable torch archive, truncated or corrupt ({exc})"
    if not any(r.filename.endswith("/data.pkl") for r in records):
        return "a zip archive without data.pkl, so not a torch checkpoint"
    last = max(records, key=lambda r: r.header_offset + r.compress_size)
    end = last.header_offset + last.compress_size
    if end > size:
        return f"truncated: record {last.filename} ends at byte {end}, the file has {size}"
    return None


def _remedy(check: FileCheck) -> str:
    if check.size is None:
        return "download it from tencent/HunyuanVideo-Avatar (see weights/README.md)"
    return "download it again"


# ----------------------------------------------------------------------------------------------- transformer keys


def _check_transformer_keys(root: Path, rel: str, expected: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """The checkpoint's official keys and shapes against the meta-device model's, and which weights are float8.
    Returns (problems, warnings); keys the model does not use are only warnings, as the loader ignores them."""
    try:
        official = read_official_payload(root / rel, mmap_only=True)
    except CheckpointError as exc:
        return [f"{rel}: {exc}; download it again"], []
    if not isinstance(official, Mapping):
        return [f"{rel}: 'module' holds {type(official).__name__}, not a state dict; download it again"], []
    fix = "it is not the released HunyuanVideo-Avatar transformer or it is damaged; download it again"
    missing = [key for key in expected if key not in official]
    unexpected = sorted(key for key in official if key not in expected)
    shapes, not_fp8, fp8 = [], [], []
    for key, want in expected.items():
        if key not in official:
            continue
        got = official[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            found = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            shapes.append(f"{key} is {found}, the model's {tuple(want.shape)}")
        elif want.dtype == FP8_DTYPE and got.dtype != FP8_DTYPE:
            not_fp8.append(f"{key} ({str(got.dtype).removeprefix('torch.')})")
        elif want.dtype != FP8_DTYPE and got.dtype == FP8_DTYPE:
            fp8.append(key)
    problems, warnings = [], []
    if missing:
        problems.append(f"{rel}: lacks {_count(missing, 'key')} the model needs: {_names(missing)}; {fix}")
    if shapes:
        problems.append(f"{rel}: {_count(shapes, 'tensor')} with the wrong shape: {_names(shapes)}; {fix}")
    if not_fp8:
        problems.append(
            f"{rel}: {_count(not_fp8, 'block linear weight')} not float8 as the fp8 model expects: {_names(not_fp8)}; "
            "this is not the official fp8 checkpoint"
        )
    if fp8:
        problems.append(
            f"{rel}: {_count(fp8, 'weight')} stored as float8 where the dense model expects bf16/fp32: {_names(fp8)}; "
            "an fp8 checkpoint is only usable as the fp8 variant, with its _fp8_map.pt"
        )
    if unexpected:
        warnings.append(f"{rel}: {_count(unexpected, 'key')} the model does not use (ignored): {_names(unexpected)}")
    return problems, warnings


def _check_fp8_map(root: Path, rel: str, expected: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """The map must hold one scalar scale for each linear the model converts to float8 (the checkpoint's float8
    weights are checked against the same set), named like the official modules. Extra scales are only warnings: the
    loader ignores them."""
    fp8_layers = {key.removesuffix(".weight") for key, tensor in expected.items() if tensor.dtype == FP8_DTYPE}
    try:
        scales = read_official_payload(root / rel, mmap_only=True)
    except CheckpointError as exc:
        return [f"{rel}: {exc}; download it again"], []
    if not isinstance(scales, Mapping):
        return [f"{rel}: 'module' holds {type(scales).__name__}, not a map of scales; download it again"], []
    fix = "download it again"
    missing = sorted(fp8_layers - set(scales))
    extra = sorted(set(scales) - fp8_layers)
    not_scalar = sorted(name for name in fp8_layers & set(scales) if not _is_scalar(scales[name]))
    problems, warnings = [], []
    if missing:
        problems.append(f"{rel}: lacks the fp8 scale of {_count(missing, 'layer')}: {_names(missing)}; {fix}")
    if not_scalar:
        problems.append(f"{rel}: {_count(not_scalar, 'scale')} not a single number: {_names(not_scalar)}; {fix}")
    if extra:
        warnings.append(
            f"{rel}: {_count(extra, 'scale')} for layers the model keeps dense or lacks (ignored): {_names(extra)}"
        )
    return problems, warnings


def _is_scalar(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _names(items: list[str]) -> str:
    """The first few names and how many more, so a line stays readable with hundreds of keys."""
    more = f" and {len(items) - _NAMES_PER_LINE} more" if len(items) > _NAMES_PER_LINE else ""
    return ", ".join(items[:_NAMES_PER_LINE]) + more


def _human_size(size: int | None) -> str:
    if size is None:
        return "absent"
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"
