"""Checkpoint I/O for the Avatar DiT and the causal 3D VAE.

The official transformer checkpoint `mp_rank_00_model_states.pt` is `{'module': state_dict}` in the official key
names (`double_blocks.3.img_attn_qkv.weight`, ...). Our model uses diffusers' layout, so loading goes through one
explicit table of rules (`official_key_rules`): plain renames, fused projections split into q/k/v (and the MLP input
of single blocks), and the final layer's (shift, scale) halves swapped into diffusers' (scale, shift). The exporter
applies the same table backwards, so official -> ours -> official is the identity.

Loading never holds two copies of the weights: the file is memory-mapped, splits are views, and the tensors are
assigned into a model built on the meta device.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from avatar_model.hunyuan.config import AvatarTransformerConfig
from avatar_model.hunyuan.fp8 import FP8_DTYPE, FP8Linear, convert_linears_to_fp8
from avatar_model.hunyuan.transformer import AvatarTransformer3DModel
from common.errors import AvatarError

logger = logging.getLogger(__name__)

FP8_SCALE = "scale"  # buffer name of FP8Linear's per-layer scale
_MAX_KEYS_IN_MESSAGE = 20


class CheckpointError(AvatarError):
    """The checkpoint is unreadable, incomplete or does not fit the model: retrying cannot help."""


@dataclass(frozen=True)
class KeyRule:
    """One official module and the module(s) it becomes in our layout.

    Several `ours` names mean the official rows are split, in order, into chunks of `split` rows (q, k, v[, mlp]);
    `swap_halves` exchanges the two row halves (official final layer (shift, scale) -> diffusers (scale, shift)).
    """

    official: str
    ours: tuple[str, ...]
    params: tuple[str, ...] = ("weight", "bias")
    split: tuple[int, ...] = ()
    swap_halves: bool = False
    fp8: bool = False  # a Linear the official fp8 checkpoint stores as float8 with one scale


@dataclass(frozen=True)
class LoadReport:
    """What a load found: official keys the model needs but the file lacks, and file keys nobody uses."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


def official_key_rules(config: AvatarTransformerConfig) -> list[KeyRule]:
    """The official <-> ours module table for `config`, in official registration order."""
    hidden = config.hidden_size
    mlp = int(hidden * config.mlp_ratio)
    qkv = (hidden, hidden, hidden)
    rules = [
        KeyRule("img_in.proj", ("x_embedder.proj",)),
        KeyRule("ref_in.proj", ("ref_embedder.proj",)),
        KeyRule("txt_in.input_embedder", ("context_embedder.proj_in",)),
        KeyRule("txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
        KeyRule("txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
        KeyRule("txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
        KeyRule("txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
    ]
    for j in range(config.refiner_num_layers):
        off, our = f"txt_in.individual_token_refiner.blocks.{j}.", f"context_embedder.token_refiner.refiner_blocks.{j}."
        rules += [
            KeyRule(off + "norm1", (our + "norm1",)),
            KeyRule(off + "self_attn_qkv", (our + "attn.to_q", our + "attn.to_k", our + "attn.to_v"), split=qkv),
            KeyRule(off + "self_attn_proj", (our + "attn.to_out.0",)),
            KeyRule(off + "norm2", (our + "norm2",)),
            KeyRule(off + "mlp.fc1", (our + "ff.net.0.proj",)),
            KeyRule(off + "mlp.fc2", (our + "ff.net.2",)),
            KeyRule(off + "adaLN_modulation.1", (our + "norm_out.linear",)),
        ]
    rules += [
        KeyRule("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        KeyRule("time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        KeyRule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        KeyRule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ]
    for i in range(config.num_double_blocks):
        off, our = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for stream, norm1, add_q, add_k, add_v, out, ff, norm_q, norm_k in (
            ("img", "norm1", "to_q", "to_k", "to_v", "to_out.0", "ff", "norm_q", "norm_k"),
            ("txt", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context",
             "norm_added_q", "norm_added_k"),
        ):
            rules += [
                KeyRule(f"{off}{stream}_mod.linear", (f"{our}{norm1}.linear",), fp8=True),
                KeyRule(f"{off}{stream}_attn_qkv", tuple(f"{our}attn.{n}" for n in (add_q, add_k, add_v)),
                        split=qkv, fp8=True),
                KeyRule(f"{off}{stream}_attn_q_norm", (f"{our}attn.{norm_q}",), params=("weight",)),
                KeyRule(f"{off}{stream}_attn_k_norm", (f"{our}attn.{norm_k}",), params=("weight",)),
                KeyRule(f"{off}{stream}_attn_proj", (f"{our}attn.{out}",), fp8=True),
                KeyRule(f"{off}{stream}_mlp.fc1", (f"{our}{ff}.net.0.proj",), fp8=True),
                KeyRule(f"{off}{stream}_mlp.fc2", (f"{our}{ff}.net.2",), fp8=True),
            ]
    for i in range(config.num_single_blocks):
        off, our = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rules += [
            KeyRule(off + "linear1", (our + "attn.to_q", our + "attn.to_k", our + "attn.to_v", our + "proj_mlp"),
                    split=(*qkv, mlp), fp8=True),
            KeyRule(off + "linear2", (our + "proj_out",), fp8=True),
            KeyRule(off + "q_norm", (our + "attn.norm_q",), params=("weight",)),
            KeyRule(off + "k_norm", (our + "attn.norm_k",), params=("weight",)),
            KeyRule(off + "modulation.linear", (our + "norm.linear",), fp8=True),
        ]
    rules += [
        KeyRule("final_layer.linear", ("proj_out",)),
        KeyRule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
        KeyRule("audio_proj.proj1", ("audio_proj.linear_1",)),
        KeyRule("audio_proj.proj2", ("audio_proj.linear_2",)),
        KeyRule("audio_proj.proj3", ("audio_proj.linear_3",)),
        KeyRule("audio_proj.norm", ("audio_proj.norm",)),
    ]
    for name, ours in (("motion_exp", "motion_exp_embedder"), ("motion_pose", "motion_pose_embedder"),
                       ("fps_proj", "fps_embedder")):
        rules += [
            KeyRule(f"{name}.mlp.0", (f"time_text_embed.{ours}.linear_1",)),
            KeyRule(f"{name}.mlp.2", (f"time_text_embed.{ours}.linear_2",)),
        ]
    rules.append(KeyRule("before_proj", ("ref_proj",)))
    for k in range(len(config.audio_adapter_blocks)):
        off, our = f"audio_adapter_blocks.{k}.", f"audio_adapters.{k}."
        rules += [
            KeyRule(off + "norm1", (our + "norm_audio",)),
            KeyRule(off + "norm2", (our + "norm_video",)),
            KeyRule(off + "to_q", (our + "to_q",), params=("weight",)),
            KeyRule(off + "to_kv", (our + "to_kv",), params=("weight",)),
            KeyRule(off + "to_out", (our + "to_out",), params=("weight",)),
        ]
    return rules


def official_to_ours(
    official: Mapping[str, torch.Tensor],
    config: AvatarTransformerConfig,
    fp8_scales: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Official state dict (+ optional fp8 scale map) -> our state dict. Splits are views: no data is copied."""
    rules = official_key_rules(config)
    ours: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for rule in rules:
        for param in rule.params:
            key = f"{rule.official}.{param}"
            if key not in official:
                missing.append(key)
                continue
            tensor = official[key]
            if rule.split and sum(rule.split) != tensor.shape[0]:
                raise CheckpointError(f"{key} has {tensor.shape[0]} rows, expected {sum(rule.split)} to split")
            if rule.swap_halves:
                shift, scale = tensor.chunk(2, dim=0)
                tensor = torch.cat([scale, shift], dim=0)
            parts = tensor.split(list(rule.split), dim=0) if rule.split else (tensor,)
            ours.update({f"{name}.{param}": part for name, part in zip(rule.ours, parts)})
        if fp8_scales is not None and rule.fp8:
            if rule.official not in fp8_scales:
                missing.append(f"{rule.official} (fp8 scale)")
                continue
            scale = torch.as_tensor(fp8_scales[rule.official], dtype=torch.float32)
            if scale.numel() != 1:
                raise CheckpointError(f"fp8 scale of {rule.official} has shape {tuple(scale.shape)}, expected a scalar")
            ours.update({f"{name}.{FP8_SCALE}": scale.reshape(()) for name in rule.ours})
    used = {f"{rule.official}.{param}" for rule in rules for param in rule.params}
    return ours, LoadReport(tuple(missing), tuple(sorted(set(official) - used)))


def ours_to_official(ours: Mapping[str, torch.Tensor], config: AvatarTransformerConfig) -> dict[str, torch.Tensor]:
    """Exact inverse of `official_to_ours` for the weights (fp8 scales go to `export_official_fp8_map`)."""
    official: dict[str, torch.Tensor] = {}
    for rule in official_key_rules(config):
        for param in rule.params:
            parts = [ours[f"{name}.{param}"] for name in rule.ours]
            tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            if rule.swap_halves:
                scale, shift = tensor.chunk(2, dim=0)
                tensor = torch.cat([shift, scale], dim=0)
            official[f"{rule.official}.{param}"] = tensor
    return official


def export_official_state_dict(model: AvatarTransformer3DModel) -> dict[str, torch.Tensor]:
    """Our model -> a state dict in the official key names and layout (what `mp_rank_00_model_states.pt` holds
    under 'module'). fp8 weights stay float8; their scales come from `export_official_fp8_map`."""
    state = model.state_dict()
    official = ours_to_official(state, model.config)
    covered = {f"{n}.{p}" for rule in official_key_rules(model.config) for n in rule.ours for p in rule.params}
    uncovered = sorted(k for k in state if k not in covered and not k.endswith(f".{FP8_SCALE}"))
    if uncovered:
        raise CheckpointError(f"model parameters without an official name: {uncovered[:_MAX_KEYS_IN_MESSAGE]}")
    return official


def export_official_fp8_map(model: AvatarTransformer3DModel) -> dict[str, torch.Tensor]:
    """The `{official module name: scale}` dict the official `_fp8_map.pt` holds under 'module'."""
    scales = {}
    for rule in official_key_rules(model.config):
        if not rule.fp8:
            continue
        modules = [model.get_submodule(name) for name in rule.ours]
        if not all(isinstance(m, FP8Linear) for m in modules):
            raise CheckpointError(f"{rule.official} is not stored in fp8 in this model")
        scale = modules[0].scale
        if any(not torch.equal(m.scale, scale) for m in modules[1:]):
            raise CheckpointError(f"the split parts of {rule.official} have different fp8 scales")
        scales[rule.official] = scale.clone()
    return scales


def load_official_state_dict(
    model: AvatarTransformer3DModel,
    official: Mapping[str, torch.Tensor],
    *,
    fp8_scales: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    allow_missing: bool = False,
) -> LoadReport:
    """Assign an official state dict into `model` (typically built on the meta device; fp8 layers already converted
    when `fp8_scales` is given). `dtype` casts floating weights, except fp8 storage, fp8 scales (fp32) and the
    modules the official code keeps in fp32. Raises `CheckpointError` naming missing keys unless `allow_missing`,
    in which case missing parameters are zero-filled."""
    ours, report = official_to_ours(official, model.config, fp8_scales)
    expected = model.state_dict(keep_vars=True)
    for key, tensor in ours.items():
        if key not in expected:
            continue
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{key} has shape {tuple(tensor.shape)} in the checkpoint, the model expects "
                f"{tuple(expected[key].shape)}"
            )
        if tensor.dtype == FP8_DTYPE and expected[key].dtype != FP8_DTYPE:
            raise CheckpointError(f"{key} is fp8 in the checkpoint; convert the model with convert_linears_to_fp8")
    ours = {key: _cast(key, tensor, dtype, model) for key, tensor in ours.items() if key in expected}
    not_loaded = sorted(set(expected) - set(ours))
    missing = tuple(dict.fromkeys([*report.missing, *_official_names(not_loaded, model.config)]))
    report = LoadReport(missing, report.unexpected)
    if report.unexpected:
        logger.warning("checkpoint keys not used by the model: %s", _abbreviate(report.unexpected))
    if missing and not allow_missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} keys the model needs: {_abbreviate(missing)}")
    model.load_state_dict(ours, strict=False, assign=True)
    if missing:
        logger.warning("zero-filling %d missing checkpoint keys: %s", len(missing), _abbreviate(missing))
        _zero_fill(model, not_loaded, dtype)
    return report


def build_meta_transformer(config: AvatarTransformerConfig, *, fp8: bool = False) -> AvatarTransformer3DModel:
    """The model on the meta device (no memory), its block linears converted to `FP8Linear` when `fp8`: what a
    checkpoint is assigned into, and what a pre-flight check compares a checkpoint's keys against."""
    with torch.device("meta"):
        model = AvatarTransformer3DModel(config)
    if fp8:
        convert_linears_to_fp8(model, model._fp8_module_prefixes)
    return model


def read_official_payload(
    path: Path, load_key: str = "module", *, mmap_only: bool = False
) -> Mapping[str, torch.Tensor]:
    """The `load_key` entry of an official checkpoint, memory-mapped (only the pickled metadata is read).
    `mmap_only` refuses the full in-RAM load of legacy (non-zip) files, so a check never reads tens of GB."""
    payload = _torch_load(path, mmap_only)
    if not isinstance(payload, Mapping) or load_key not in payload:
        keys = list(payload)[:10] if isinstance(payload, Mapping) else type(payload).__name__
        raise CheckpointError(f"{path} has no {load_key!r} entry (top level: {keys})")
    return payload[load_key]


def load_transformer(
    path: str | Path,
    config: AvatarTransformerConfig | None = None,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    fp8_map_path: str | Path | None = None,
    allow_missing: bool = False,
    load_key: str = "module",
) -> AvatarTransformer3DModel:
    """Build the model on the meta device and assign the memory-mapped official checkpoint into it (CPU, eval mode,
    no grads). A directory means its first `*_model_states.pt`. A checkpoint holding float8 weights is the fp8
    variant and needs its scale map (default: `<name>_map.pt` next to it, e.g. `..._fp8.pt` -> `..._fp8_map.pt`)."""
    config = config or AvatarTransformerConfig.released()
    path = _resolve_checkpoint(Path(path))
    official = read_official_payload(path, load_key)
    fp8_scales = None
    if any(t.dtype == FP8_DTYPE for t in official.values()):
        map_path = Path(fp8_map_path) if fp8_map_path else path.with_name(path.stem + "_map.pt")
        if not map_path.is_file():
            raise CheckpointError(f"{path} holds fp8 weights but its scale map {map_path} does not exist")
        fp8_scales = read_official_payload(map_path, load_key)
    model = build_meta_transformer(config, fp8=fp8_scales is not None)
    report = load_official_state_dict(model, official, fp8_scales=fp8_scales, dtype=dtype, allow_missing=allow_missing)
    logger.info(
        "loaded %s (%s, %d missing, %d unused keys)",
        path, "fp8" if fp8_scales is not None else "dense", len(report.missing), len(report.unexpected),
    )
    return model.eval().requires_grad_(False)


def load_vae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Official `vae/pytorch_model.pt` -> a state dict that loads strictly into diffusers'
    `AutoencoderKLHunyuanVideo` (unwraps an optional 'state_dict' entry and strips a 'vae.' prefix)."""
    payload = _torch_load(Path(path))
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {key.removeprefix("vae."): tensor for key, tensor in payload.items()}


def _resolve_checkpoint(path: Path) -> Path:
    if path.is_dir():
        candidates = sorted(path.glob("*_model_states.pt"))
        if not candidates:
            raise CheckpointError(f"no *_model_states.pt in {path}")
        return candidates[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _torch_load(path: Path, mmap_only: bool = False):
    """Memory-mapped, weights-only load; falls back to a plain load for legacy (non-zip) files unless `mmap_only`."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds objects other than tensors and cannot be loaded safely: {exc}") from exc
    except RuntimeError as exc:
        if "mmap" not in str(exc) or mmap_only:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        logger.warning("%s is not in zip format and cannot be memory-mapped; loading it fully into RAM", path)
        return torch.load(path, map_location="cpu", weights_only=True)


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype | None, model: nn.Module) -> torch.Tensor:
    if tensor.dtype == FP8_DTYPE:
        return tensor
    if key.endswith(f".{FP8_SCALE}") or key.startswith(tuple(m + "." for m in model._keep_in_fp32_modules)):
        return tensor.to(torch.float32)
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def _zero_fill(model: nn.Module, keys: list[str], dtype: torch.dtype | None) -> None:
    for key in keys:
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, name)
        target = current.dtype if current.dtype == FP8_DTYPE else dtype or torch.float32
        zeros = _cast(key, torch.zeros(current.shape, dtype=target), dtype, model)
        if isinstance(current, nn.Parameter):
            setattr(module, name, nn.Parameter(zeros, requires_grad=False))
        else:
            setattr(module, name, zeros)


def _official_names(our_keys: list[str], config: AvatarTransformerConfig) -> list[str]:
    index = {f"{n}.{p}": f"{r.official}.{p}" for r in official_key_rules(config) for n in r.ours for p in r.params}
    index.update({f"{n}.{FP8_SCALE}": f"{r.official} (fp8 scale)" for r in official_key_rules(config) for n in r.ours})
    return [index.get(key, key) for key in our_keys]


def _abbreviate(keys) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - _MAX_KEYS_IN_MESSAGE} more" if len(keys) > _MAX_KEYS_IN_MESSAGE else ""
    return ", ".join(keys[:_MAX_KEYS_IN_MESSAGE]) + more
