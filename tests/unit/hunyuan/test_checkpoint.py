"""Checkpoint I/O of the Avatar DiT and the VAE (facts §3.2–§3.4).

`official_layout` below is an independent enumeration of the official parameter names and shapes, written from the
module definitions in hymm_sp/modules (models_audio.py, token_refiner.py, embed_layers.py, mlp_layers.py,
modulate_layers.py, norm_layers.py, audio_adapters.py) in their registration order. It generated the committed
fixture (`python tests/unit/hunyuan/test_checkpoint.py` rewrites both fixtures) and is checked against our exporter,
so a mapping mistake shows up as a disagreement between two separately written descriptions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLHunyuanVideo

from avatar_model.hunyuan.checkpoint import (
    CheckpointError,
    build_meta_transformer,
    export_official_fp8_map,
    export_official_state_dict,
    load_official_state_dict,
    load_transformer,
    load_vae_state_dict,
    official_key_rules,
    read_official_payload,
)
from avatar_model.hunyuan.config import AvatarTransformerConfig
from avatar_model.hunyuan.fp8 import FP8_DTYPE, FP8_MAX, FP8Linear
from avatar_model.hunyuan.transformer import AvatarTransformer3DModel

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
TRANSFORMER_FIXTURE = FIXTURES / "hunyuan_official_transformer_keys.json"
VAE_FIXTURE = FIXTURES / "hunyuan_vae_keys.json"


def official_layout(c: AvatarTransformerConfig) -> dict[str, list[int]]:
    """Official `HYVideoDiffusionTransformer` state-dict names -> shapes, module by module."""
    keys: dict[str, list[int]] = {}
    hidden, mlp = c.hidden_size, int(c.hidden_size * c.mlp_ratio)

    def linear(name: str, d_in: int, d_out: int, bias: bool = True) -> None:
        keys[f"{name}.weight"] = [d_out, d_in]
        if bias:
            keys[f"{name}.bias"] = [d_out]

    def layer_norm(name: str, dim: int) -> None:  # affine LayerNorm
        keys[f"{name}.weight"] = [dim]
        keys[f"{name}.bias"] = [dim]

    def timestep_embedder(name: str, dim: int) -> None:  # TimestepEmbedder: mlp = Linear(256, d), SiLU, Linear(d, d)
        linear(f"{name}.mlp.0", c.timestep_freq_dim, dim)
        linear(f"{name}.mlp.2", dim, dim)

    # img_in, ref_in: PatchEmbed = Conv3d(in_channels, hidden, kernel = stride = patch)
    for name in ("img_in", "ref_in"):
        keys[f"{name}.proj.weight"] = [hidden, c.in_channels, *c.patch_size]
        keys[f"{name}.proj.bias"] = [hidden]
    # txt_in: SingleTokenRefiner(text_states_dim, hidden, heads, depth)
    linear("txt_in.input_embedder", c.text_states_dim, hidden)
    timestep_embedder("txt_in.t_embedder", hidden)
    linear("txt_in.c_embedder.linear_1", c.text_states_dim, hidden)  # TextProjection
    linear("txt_in.c_embedder.linear_2", hidden, hidden)
    for j in range(c.refiner_num_layers):  # IndividualTokenRefinerBlock; q/k norms are Identity (qk_norm=False)
        p = f"txt_in.individual_token_refiner.blocks.{j}"
        layer_norm(f"{p}.norm1", hidden)
        linear(f"{p}.self_attn_qkv", hidden, 3 * hidden)
        linear(f"{p}.self_attn_proj", hidden, hidden)
        layer_norm(f"{p}.norm2", hidden)
        linear(f"{p}.mlp.fc1", hidden, int(hidden * c.refiner_mlp_ratio))
        linear(f"{p}.mlp.fc2", int(hidden * c.refiner_mlp_ratio), hidden)
        linear(f"{p}.adaLN_modulation.1", hidden, 2 * hidden)
    timestep_embedder("time_in", hidden)
    linear("vector_in.in_layer", c.text_states_dim_2, hidden)  # MLPEmbedder
    linear("vector_in.out_layer", hidden, hidden)
    # guidance_in is None (guidance_embed=False): no keys
    for i in range(c.num_double_blocks):  # DoubleStreamBlock; norm1/norm2 have no affine parameters
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            linear(f"{p}_mod.linear", hidden, 6 * hidden)  # ModulateDiT(factor=6)
            linear(f"{p}_attn_qkv", hidden, 3 * hidden)
            keys[f"{p}_attn_q_norm.weight"] = [c.head_dim]  # RMSNorm over head_dim
            keys[f"{p}_attn_k_norm.weight"] = [c.head_dim]
            linear(f"{p}_attn_proj", hidden, hidden)
            linear(f"{p}_mlp.fc1", hidden, mlp)
            linear(f"{p}_mlp.fc2", mlp, hidden)
    for i in range(c.num_single_blocks):  # SingleStreamBlock
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", hidden, 3 * hidden + mlp)
        linear(f"{p}.linear2", hidden + mlp, hidden)
        keys[f"{p}.q_norm.weight"] = [c.head_dim]
        keys[f"{p}.k_norm.weight"] = [c.head_dim]
        linear(f"{p}.modulation.linear", hidden, 3 * hidden)  # ModulateDiT(factor=3)
    # FinalLayer: norm_final (no affine), linear, adaLN_modulation = SiLU, Linear(hidden, 2*hidden)
    linear("final_layer.linear", hidden, c.patch_size[0] * c.patch_size[1] * c.patch_size[2] * c.out_channels)
    linear("final_layer.adaLN_modulation.1", hidden, 2 * hidden)
    # AudioProjNet2(seq_len=10, blocks=5, channels=384, intermediate_dim, output_dim, context_tokens)
    linear("audio_proj.proj1", c.audio_in_dim, c.audio_intermediate_dim)
    linear("audio_proj.proj2", c.audio_intermediate_dim, c.audio_intermediate_dim)
    linear("audio_proj.proj3", c.audio_intermediate_dim, c.audio_context_tokens * c.audio_out_dim)
    layer_norm("audio_proj.norm", c.audio_out_dim)
    timestep_embedder("motion_exp", hidden // c.motion_values)
    timestep_embedder("motion_pose", hidden // c.motion_values)
    timestep_embedder("fps_proj", hidden)
    linear("before_proj", hidden, hidden)
    for k in range(len(c.audio_adapter_blocks)):  # PerceiverAttentionCA(dim=hidden, dim_head=adapter width)
        p = f"audio_adapter_blocks.{k}"
        layer_norm(f"{p}.norm1", hidden)
        layer_norm(f"{p}.norm2", hidden)
        linear(f"{p}.to_q", hidden, c.audio_adapter_dim, bias=False)
        linear(f"{p}.to_kv", hidden, 2 * c.audio_adapter_dim, bias=False)
        linear(f"{p}.to_out", c.audio_adapter_dim, hidden, bias=False)
    return keys


def vae_layout() -> dict[str, list[int]]:
    with torch.device("meta"):
        vae = AutoencoderKLHunyuanVideo()
    return {k: list(v.shape) for k, v in vae.state_dict().items()}


def random_official(config: AvatarTransformerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) for k, shape in official_layout(config).items()}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def _save_official(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"module": state}, path)
    return path


def _dump(payload: dict) -> str:
    """JSON with one `"key": [shape]` per line, so fixture diffs read like a key list."""
    head = json.dumps({k: v for k, v in payload.items() if k != "keys"}, indent=1)[:-2]
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in payload["keys"].items())
    return f'{head},\n "keys": {{\n{rows}\n }}\n}}\n'


def _write_fixtures() -> None:
    released = AvatarTransformerConfig.released()
    TRANSFORMER_FIXTURE.write_text(_dump({
        "note": (
            "Official HunyuanVideo-Avatar transformer checkpoint keys (mp_rank_00_model_states.pt['module']) and "
            "shapes for the released HYVideo-T/2 config, derived by hand from the official module definitions "
            "(hymm_sp/modules/models_audio.py, token_refiner.py, embed_layers.py, mlp_layers.py, "
            "modulate_layers.py, norm_layers.py, audio_adapters.py at fd59436) as in facts section 3.2, in module "
            "registration order; written by official_layout() in tests/unit/hunyuan/test_checkpoint.py. The "
            "official code was neither run nor vendored. Not yet checked against the real checkpoint file."
        ),
        "config": released.to_dict(),
        "keys": official_layout(released),
    }))
    VAE_FIXTURE.write_text(_dump({
        "note": (
            "State-dict keys and shapes of diffusers 0.42.1 AutoencoderKLHunyuanVideo() with its default config, "
            "built on the meta device (vae_layout() in tests/unit/hunyuan/test_checkpoint.py). Facts section 3.4: "
            "the official vae/pytorch_model.pt keys equal these after stripping a 'vae.' prefix."
        ),
        "keys": vae_layout(),
    }))


# ----------------------------------------------------------------------------------------------- key layout


def test_released_exporter_keys_equal_fixture():
    with torch.device("meta"):
        model = AvatarTransformer3DModel(AvatarTransformerConfig.released())
    exported = export_official_state_dict(model)
    fixture = json.loads(TRANSFORMER_FIXTURE.read_text())["keys"]
    assert list(_shapes(exported).items()) == list(fixture.items())


def test_fixture_is_the_official_module_enumeration():
    fixture = json.loads(TRANSFORMER_FIXTURE.read_text())
    assert fixture["keys"] == official_layout(AvatarTransformerConfig.released())
    assert AvatarTransformerConfig.from_dict(fixture["config"]) == AvatarTransformerConfig.released()
    assert len(fixture["keys"]) == 946 and "guidance_in.mlp.0.weight" not in fixture["keys"]


def test_released_parameter_count_matches_facts():
    total = sum(torch.Size(s).numel() for s in official_layout(AvatarTransformerConfig.released()).values())
    assert abs(total - 12.99e9) < 0.01e9  # facts §8


def test_tiny_exporter_keys_equal_official_enumeration():
    config = AvatarTransformerConfig.tiny()
    with torch.device("meta"):
        model = AvatarTransformer3DModel(config)
    assert _shapes(export_official_state_dict(model)) == official_layout(config)


def test_vae_keys_equal_fixture():
    assert vae_layout() == json.loads(VAE_FIXTURE.read_text())["keys"]


# ----------------------------------------------------------------------------------------------- dense loading


def test_round_trip_is_identity(tmp_path):
    config = AvatarTransformerConfig.tiny()
    official = random_official(config)
    model = load_transformer(_save_official(tmp_path / "mp_rank_00_model_states.pt", official), config, dtype=None)
    exported = export_official_state_dict(model)
    assert list(exported) == list(official)
    for key, tensor in official.items():
        assert torch.equal(exported[key], tensor), key
    assert not any(p.is_meta for p in model.parameters()) and not model.training
    # split projections are views of the memory-mapped fused tensor, not copies
    attn = model.single_transformer_blocks[0].attn
    assert attn.to_q.weight.untyped_storage().data_ptr() == attn.to_v.weight.untyped_storage().data_ptr()


def test_directory_resolves_to_model_states_file(tmp_path):
    config = AvatarTransformerConfig.tiny()
    _save_official(tmp_path / "mp_rank_00_model_states.pt", random_official(config))
    assert isinstance(load_transformer(tmp_path, config), AvatarTransformer3DModel)


def test_final_layer_halves_are_swapped_and_qkv_is_k_major():
    config = AvatarTransformerConfig.tiny()
    official = random_official(config)
    with torch.device("meta"):
        model = AvatarTransformer3DModel(config)
    load_official_state_dict(model, official)
    hidden = config.hidden_size
    ada = official["final_layer.adaLN_modulation.1.weight"]  # rows: shift then scale
    assert torch.equal(model.norm_out.linear.weight[:hidden], ada[hidden:])
    linear1 = official["single_blocks.1.linear1.weight"]  # rows: q, k, v, mlp
    block = model.single_transformer_blocks[1]
    assert torch.equal(block.attn.to_k.weight, linear1[hidden : 2 * hidden])
    assert torch.equal(block.proj_mlp.weight, linear1[3 * hidden :])
    qkv = official["double_blocks.4.txt_attn_qkv.bias"]
    assert torch.equal(model.transformer_blocks[4].attn.add_v_proj.bias, qkv[2 * hidden :])


def test_missing_key_is_named(tmp_path):
    config = AvatarTransformerConfig.tiny()
    official = random_official(config)
    del official["double_blocks.7.img_attn_qkv.bias"]
    path = _save_official(tmp_path / "ckpt.pt", official)
    with pytest.raises(CheckpointError, match=r"double_blocks\.7\.img_attn_qkv\.bias"):
        load_transformer(path, config)
    model = load_transformer(path, config, dtype=None, allow_missing=True)
    assert torch.count_nonzero(model.transformer_blocks[7].attn.to_q.bias) == 0


def test_unexpected_keys_are_reported_not_fatal():
    config = AvatarTransformerConfig.tiny()
    official = random_official(config) | {"guidance_in.mlp.0.weight": torch.zeros(3)}
    with torch.device("meta"):
        model = AvatarTransformer3DModel(config)
    report = load_official_state_dict(model, official)
    assert report.missing == () and report.unexpected == ("guidance_in.mlp.0.weight",)


def test_wrong_shape_is_rejected():
    config = AvatarTransformerConfig.tiny()
    official = random_official(config) | {"before_proj.weight": torch.zeros(3, 3)}
    with torch.device("meta"):
        model = AvatarTransformer3DModel(config)
    with pytest.raises(CheckpointError, match="ref_proj.weight"):
        load_official_state_dict(model, official)


def test_dtype_cast_keeps_official_fp32_modules(tmp_path):
    config = AvatarTransformerConfig.tiny()
    model = load_transformer(_save_official(tmp_path / "c.pt", random_official(config)), config)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    for module in (model.audio_proj, model.audio_adapters, model.ref_proj, model.proj_out):
        assert all(p.dtype == torch.float32 for p in module.parameters())


def test_missing_payload_key_is_explained(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"ema": {}}, path)
    with pytest.raises(CheckpointError, match="'module'"):
        load_transformer(path, AvatarTransformerConfig.tiny())


def test_legacy_file_is_refused_when_only_mmap_is_allowed(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"module": {"a": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_official_payload(path, mmap_only=True)
    assert torch.equal(read_official_payload(path)["a"], torch.ones(2))  # loaders fall back to a full load


# ----------------------------------------------------------------------------------------------- fp8


def _fp8_checkpoint(tmp_path: Path, config: AvatarTransformerConfig):
    official = random_official(config)
    scales = {}
    for rule in official_key_rules(config):
        if rule.fp8:
            weight = official[f"{rule.official}.weight"]
            scales[rule.official] = weight.abs().max() / FP8_MAX
            official[f"{rule.official}.weight"] = (weight / scales[rule.official]).to(FP8_DTYPE)
    official = {k: v if v.dtype == FP8_DTYPE else v.to(torch.bfloat16) for k, v in official.items()}
    path = _save_official(tmp_path / "mp_rank_00_model_states_fp8.pt", official)
    torch.save({"module": scales}, tmp_path / "mp_rank_00_model_states_fp8_map.pt")
    return path, official, scales


def test_fp8_model_converts_exactly_the_fp8_rules():
    """The linears `convert_linears_to_fp8` replaces are the ones the key table marks fp8 (what the map must cover)."""
    config = AvatarTransformerConfig.released()
    exported = export_official_state_dict(build_meta_transformer(config, fp8=True))
    fp8_weights = {key for key, tensor in exported.items() if tensor.dtype == FP8_DTYPE}
    assert fp8_weights == {f"{rule.official}.weight" for rule in official_key_rules(config) if rule.fp8}
    assert len(fp8_weights) == 20 * 2 * 5 + 40 * 3  # every linear of the 20 double and 40 single blocks


def test_fp8_checkpoint_dequantises_to_weight_times_scale(tmp_path):
    config = AvatarTransformerConfig.tiny()
    path, official, scales = _fp8_checkpoint(tmp_path, config)
    model = load_transformer(path, config, dtype=torch.float32)
    hidden = config.hidden_size

    to_k = model.single_transformer_blocks[0].attn.to_k
    assert isinstance(to_k, FP8Linear) and to_k.weight.dtype == FP8_DTYPE
    rows = slice(hidden, 2 * hidden)  # k rows of the fused [q; k; v; mlp]
    expected = official["single_blocks.0.linear1.weight"][rows].float() * scales["single_blocks.0.linear1"]
    assert torch.equal(to_k.dequantized_weight(torch.float32), expected)
    x = torch.randn(3, hidden)
    assert torch.equal(to_k(x), F.linear(x, expected, official["single_blocks.0.linear1.bias"][rows].float()))

    fc2 = model.transformer_blocks[3].ff_context.net[2]
    fc2_expected = official["double_blocks.3.txt_mlp.fc2.weight"].float() * scales["double_blocks.3.txt_mlp.fc2"]
    assert torch.equal(fc2.dequantized_weight(torch.float32), fc2_expected)
    assert not isinstance(model.audio_adapters[0].to_q, FP8Linear)  # only block linears are fp8

    exported = export_official_state_dict(model)
    assert torch.equal(exported["double_blocks.3.txt_mlp.fc2.weight"].view(torch.uint8),
                       official["double_blocks.3.txt_mlp.fc2.weight"].view(torch.uint8))
    fp8_map = export_official_fp8_map(model)
    assert fp8_map.keys() == scales.keys()
    assert all(torch.equal(fp8_map[k], v.float()) for k, v in scales.items())


def test_fp8_without_map_fails(tmp_path):
    config = AvatarTransformerConfig.tiny()
    path, _, _ = _fp8_checkpoint(tmp_path, config)
    (tmp_path / "mp_rank_00_model_states_fp8_map.pt").unlink()
    with pytest.raises(CheckpointError, match="scale map"):
        load_transformer(path, config)


def test_fp8_missing_scale_is_named(tmp_path):
    config = AvatarTransformerConfig.tiny()
    path, _, scales = _fp8_checkpoint(tmp_path, config)
    del scales["double_blocks.2.img_mod.linear"]
    torch.save({"module": scales}, tmp_path / "mp_rank_00_model_states_fp8_map.pt")
    with pytest.raises(CheckpointError, match=r"double_blocks\.2\.img_mod\.linear \(fp8 scale\)"):
        load_transformer(path, config)


def test_fp8_linear_survives_dtype_cast():
    linear = torch.nn.Linear(8, 4)
    fp8 = FP8Linear.from_linear(linear).to(torch.bfloat16)
    assert fp8.weight.dtype == FP8_DTYPE
    x = torch.randn(2, 8)
    torch.testing.assert_close(fp8.float()(x), linear(x), atol=0.1, rtol=0.1)


# ----------------------------------------------------------------------------------------------- VAE


def _tiny_vae() -> AutoencoderKLHunyuanVideo:
    return AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)


@pytest.mark.parametrize("wrapped", [True, False])
def test_vae_state_dict_loads_strictly(tmp_path, wrapped):
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in _tiny_vae().state_dict().items()}
    payload = {"state_dict": {f"vae.{k}": v for k, v in state.items()}} if wrapped else state
    torch.save(payload, tmp_path / "pytorch_model.pt")
    loaded = load_vae_state_dict(tmp_path / "pytorch_model.pt")
    vae = _tiny_vae()
    vae.load_state_dict(loaded, strict=True)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items())


if __name__ == "__main__":
    _write_fixtures()
