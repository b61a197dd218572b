"""The Avatar DiT at tiny dims on CPU (facts §2.6–§2.9, §2.12 and the parity section).

`reference_forward` is a second, deliberately plain statement of the official forward, written from the equations
of hymm_sp/modules/models_audio.py and friends: it reads the *official* state dict (fused K-major qkv, (shift,
scale) final layer, varlen joint attention with [image + first N text] and [padding] as separate sequences) and
shares no code with the model. Agreement to 1e-5 in fp32 checks the equations and the key mapping together.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.utils.import_utils import is_flash_attn_available

from avatar_model.hunyuan.checkpoint import export_official_state_dict
from avatar_model.hunyuan.config import AvatarTransformerConfig
from avatar_model.hunyuan.transformer import AvatarTransformer3DModel, TokenGrid

CONFIG = AvatarTransformerConfig.tiny()
FRAMES, HEIGHT, WIDTH, TEXT_LEN = 33, 4, 6, 9


@pytest.fixture(scope="module")
def model() -> AvatarTransformer3DModel:
    torch.manual_seed(0)
    model = AvatarTransformer3DModel(CONFIG).eval().requires_grad_(False)
    for name, param in model.named_parameters():  # nothing zero-initialised, so every path shows in the output
        if name.endswith("bias"):
            param.normal_(0.0, 0.05)
        elif param.ndim == 1:
            param.normal_(1.0, 0.1)
        else:
            param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
    return model


def make_inputs(batch: int = 2, seed: int = 1, frames: int = FRAMES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    face = torch.zeros(batch, 1, 1, HEIGHT, WIDTH)
    face[..., 1:3, 2:5] = 1.0
    face[..., 0, 0] = 0.4  # a soft edge, as after the official bilinear resize
    # the mask quirk: count of ones 6 (joint attention) but holes in the positions (refiner)
    text_mask = torch.tensor([[1, 1, 0, 1, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0]])[:batch]
    return {
        "hidden_states": torch.randn(batch, 16, frames, HEIGHT, WIDTH, generator=g),
        "timestep": torch.tensor([937.5, 412.0])[:batch],
        "text_states": torch.randn(batch, TEXT_LEN, CONFIG.text_states_dim, generator=g),
        "text_mask": text_mask,
        "text_states_2": torch.randn(batch, CONFIG.text_states_dim_2, generator=g),
        "ref_latents": torch.randn(batch, 16, frames, HEIGHT, WIDTH, generator=g),
        "audio_prompts": torch.randn(batch, 4 * frames - 3, 10, 5, 384, generator=g),
        "face_mask": face,
        "motion_exp": torch.full((batch, 4), 30.0),
        "motion_pose": torch.full((batch, 4), 25.0),
        "fps": torch.full((batch,), 25.0),
    }


# ----------------------------------------------------------------------------------------------- reference


def reference_forward(sd: dict[str, torch.Tensor], c: AvatarTransformerConfig, x, t, text_states, text_mask,
                      text_states_2, ref_latents, audio_prompts, face_mask, motion_exp, motion_pose, fps):
    """Official equations on official keys; returns (output, state entering the last single block)."""
    hidden, heads = c.hidden_size, c.num_heads
    batch, _, frames, height, width = x.shape
    pt, ph, pw = c.patch_size
    th, tw = height // ph, width // pw

    def lin(v, name):
        return F.linear(v, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def sinusoid(v):  # [cos, sin], max period 1e4
        half = c.timestep_freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = v.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def t_embed(name, v):
        return lin(F.silu(lin(sinusoid(v), f"{name}.mlp.0")), f"{name}.mlp.2")

    def ln(v, name=None, eps=1e-6):
        w = sd[f"{name}.weight"] if name else None
        b = sd[f"{name}.bias"] if name else None
        return F.layer_norm(v, (v.shape[-1],), w, b, eps)

    def rms(v, name):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"{name}.weight"]

    def modulate(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    def split_heads(qkv, n_heads):  # "B L (K H D) -> K B L H D"
        return qkv.unflatten(-1, (3, n_heads, -1)).unbind(2)

    # RoPE table: grid t in [-1, 0..T-1], h, w; per axis freqs 1/theta^(2i/d), cos/sin repeated pairwise
    tt = torch.arange(-1, frames // pt, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(tt, torch.arange(th, dtype=torch.float32),
                                      torch.arange(tw, dtype=torch.float32), indexing="ij")).reshape(3, -1)
    cos, sin = [], []
    for axis, dim in enumerate(c.rope_axes_dim):
        freqs = 1.0 / c.rope_theta ** (torch.arange(0, dim, 2).float() / dim)
        angles = torch.outer(grid[axis], freqs)
        cos.append(angles.cos().repeat_interleave(2, 1))
        sin.append(angles.sin().repeat_interleave(2, 1))
    cos, sin = torch.cat(cos, 1)[None, :, None], torch.cat(sin, 1)[None, :, None]

    def rope(v):  # adjacent pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)
        rotated = torch.stack([-v[..., 1::2], v[..., 0::2]], dim=-1).flatten(-2)
        return v * cos + rotated * sin

    def varlen_attention(q, k, v, n_valid):  # each sample: [0, n) and [n, S) attend within themselves
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            for lo, hi in ((0, int(n_valid[b])), (int(n_valid[b]), q.shape[1])):
                if hi > lo:
                    seg = [z[b : b + 1, lo:hi].transpose(1, 2) for z in (q, k, v)]
                    out[b : b + 1, lo:hi] = F.scaled_dot_product_attention(*seg).transpose(1, 2)
        return out.flatten(2)

    # vec
    vec = t_embed("time_in", t)
    vec = vec + t_embed("motion_exp", motion_exp.reshape(-1)).view(batch, -1)
    vec = vec + t_embed("motion_pose", motion_pose.reshape(-1)).view(batch, -1)
    vec = vec + t_embed("fps_proj", fps)
    vec = vec + lin(F.silu(lin(text_states_2, "vector_in.in_layer")), "vector_in.out_layer")

    # audio projection
    a = audio_prompts.reshape(batch * audio_prompts.shape[1], -1)
    a = torch.relu(lin(torch.relu(lin(a, "audio_proj.proj1")), "audio_proj.proj2"))
    a = ln(lin(a, "audio_proj.proj3").view(a.shape[0], c.audio_context_tokens, hidden), "audio_proj.norm", 1e-5)
    a = a.view(batch, -1, c.audio_context_tokens, hidden)
    audio = torch.cat([a[:, :1].repeat(1, 3, 1, 1), a], dim=1).view(batch, frames, -1, hidden)

    # embeddings
    def patch(v, name):
        v = F.conv3d(v, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"], stride=c.patch_size)
        return v.flatten(2).transpose(1, 2)

    img = lin(patch(ref_latents, "ref_in"), "before_proj") + patch(x, "img_in")
    img = torch.cat([patch(ref_latents[:, :, :1], "img_in"), img], dim=1)
    n_ref = th * tw

    # token refiner (mask positions)
    mask = text_mask.float()[..., None]
    pooled = (text_states * mask).sum(1) / mask.sum(1)
    cond = t_embed("txt_in.t_embedder", t) + lin(F.silu(lin(pooled, "txt_in.c_embedder.linear_1")),
                                                 "txt_in.c_embedder.linear_2")
    txt = lin(text_states, "txt_in.input_embedder")
    m = text_mask.bool()
    pair = (m[:, None, None, :] & m[:, None, :, None]).clone()
    pair[..., 0] = True
    for j in range(c.refiner_num_layers):
        p = f"txt_in.individual_token_refiner.blocks.{j}"
        gate_msa, gate_mlp = lin(F.silu(cond), f"{p}.adaLN_modulation.1").chunk(2, dim=-1)
        q, k, v = split_heads(lin(ln(txt, f"{p}.norm1"), f"{p}.self_attn_qkv"), c.refiner_num_heads)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=pair)
        txt = txt + lin(att.transpose(1, 2).flatten(2), f"{p}.self_attn_proj") * gate_msa[:, None]
        txt = txt + lin(F.silu(lin(ln(txt, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2") * gate_mlp[:, None]

    # face mask on the token grid
    face = F.interpolate(face_mask.repeat(1, 1, frames, 1, 1), size=[frames, th, tw], mode="nearest")
    face = face.view(batch, -1, 1)

    n_valid = img.shape[1] + text_mask.sum(1)
    adapters = {blk: k for k, blk in enumerate(c.audio_adapter_blocks)}
    for i in range(c.num_double_blocks):
        p = f"double_blocks.{i}"
        im = lin(F.silu(vec), f"{p}.img_mod.linear").chunk(6, dim=-1)
        tm = lin(F.silu(vec), f"{p}.txt_mod.linear").chunk(6, dim=-1)
        iq, ik, iv = split_heads(lin(modulate(ln(img), im[0], im[1]), f"{p}.img_attn_qkv"), heads)
        iq, ik = rope(rms(iq, f"{p}.img_attn_q_norm")), rope(rms(ik, f"{p}.img_attn_k_norm"))
        tq, tk, tv = split_heads(lin(modulate(ln(txt), tm[0], tm[1]), f"{p}.txt_attn_qkv"), heads)
        tq, tk = rms(tq, f"{p}.txt_attn_q_norm"), rms(tk, f"{p}.txt_attn_k_norm")
        att = varlen_attention(torch.cat([iq, tq], 1), torch.cat([ik, tk], 1), torch.cat([iv, tv], 1), n_valid)
        i_att, t_att = att[:, : img.shape[1]], att[:, img.shape[1] :]
        img = img + lin(i_att, f"{p}.img_attn_proj") * im[2][:, None]
        img = img + lin(F.gelu(lin(modulate(ln(img), im[3], im[4]), f"{p}.img_mlp.fc1"), approximate="tanh"),
                        f"{p}.img_mlp.fc2") * im[5][:, None]
        txt = txt + lin(t_att, f"{p}.txt_attn_proj") * tm[2][:, None]
        txt = txt + lin(F.gelu(lin(modulate(ln(txt), tm[3], tm[4]), f"{p}.txt_mlp.fc1"), approximate="tanh"),
                        f"{p}.txt_mlp.fc2") * tm[5][:, None]
        if i in adapters:
            q_ = f"audio_adapter_blocks.{adapters[i]}"
            real = img[:, n_ref:].view(batch, frames, -1, hidden)
            aud, vid = ln(audio, f"{q_}.norm1", 1e-5), ln(real, f"{q_}.norm2", 1e-5)
            q = lin(vid, f"{q_}.to_q")
            k, v = lin(aud, f"{q_}.to_kv").chunk(2, dim=-1)
            s = 1 / math.sqrt(math.sqrt(c.audio_adapter_dim))
            w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1)
            out = lin(w @ v, f"{q_}.to_out").view(batch, -1, hidden)
            img = img + torch.cat([torch.zeros_like(img[:, :n_ref]), out * face], dim=1)

    xs = torch.cat([img, txt], dim=1)
    text_len = txt.shape[1]
    cache = None
    for i in range(c.num_single_blocks):
        if i == c.num_single_blocks - 1:
            cache = xs
        p = f"single_blocks.{i}"
        shift, scale, gate = lin(F.silu(vec), f"{p}.modulation.linear").chunk(3, dim=-1)
        qkv, mlp = lin(modulate(ln(xs), shift, scale), f"{p}.linear1").split([3 * hidden, xs.shape[-1] * 4], -1)
        q, k, v = split_heads(qkv, heads)
        q, k = rms(q, f"{p}.q_norm"), rms(k, f"{p}.k_norm")
        q = torch.cat([rope(q[:, :-text_len]), q[:, -text_len:]], 1)
        k = torch.cat([rope(k[:, :-text_len]), k[:, -text_len:]], 1)
        att = varlen_attention(q, k, v, n_valid)
        xs = xs + lin(torch.cat([att, F.gelu(mlp, approximate="tanh")], -1), f"{p}.linear2") * gate[:, None]

    img = xs[:, :-text_len][:, n_ref:]
    shift, scale = lin(F.silu(vec), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    img = lin(modulate(ln(img), shift, scale), "final_layer.linear")
    img = img.reshape(batch, frames // pt, th, tw, -1, pt, ph, pw)
    out = torch.einsum("nthwcopq->nctohpwq", img).reshape(batch, -1, frames, height, width)
    return out, cache


# ----------------------------------------------------------------------------------------------- tests


def test_parity_with_reference_equations(model):
    inputs = make_inputs()
    with torch.no_grad():
        out, cache = model(**inputs, return_block_cache=True)
        ref_out, ref_cache = reference_forward(export_official_state_dict(model), CONFIG, *inputs.values())
    assert out.shape == inputs["hidden_states"].shape  # the reference frame is dropped
    assert out.abs().mean() > 0.1
    assert (out - ref_out).abs().max() <= 1e-5
    # the cache matches the official one on every token whose value can reach the output
    valid = ref_cache.shape[1] - TEXT_LEN + inputs["text_mask"].sum(1)
    for b in range(out.shape[0]):
        assert (cache[b, : valid[b]] - ref_cache[b, : valid[b]]).abs().max() <= 1e-5


def test_forward_is_deterministic_and_batch_independent(model):
    inputs = make_inputs()
    with torch.no_grad():
        first, second = model(**inputs), model(**inputs)
        single = model(**{k: v[1:] for k, v in inputs.items()})
    assert torch.equal(first, second)
    torch.testing.assert_close(single, first[1:], atol=1e-5, rtol=0)


def test_cached_step_reproduces_full_step(model):
    inputs = make_inputs()
    grid = model.token_grid(FRAMES, HEIGHT, WIDTH)
    with torch.no_grad():
        full, cache = model(**inputs, return_block_cache=True)
        assert cache.shape == (2, grid.image_tokens + TEXT_LEN, CONFIG.hidden_size)
        cached, same_cache = model(**inputs, block_cache=cache, return_block_cache=True)
        # a cached step only needs vec's inputs: other conditioning is ignored
        other = make_inputs(seed=7) | {k: inputs[k] for k in ("timestep", "text_mask", "text_states_2")}
        cached_other = model(**(other | {"motion_exp": inputs["motion_exp"]}), block_cache=cache)
        later = model(**(inputs | {"timestep": torch.tensor([300.0, 300.0])}), block_cache=cache)
    assert torch.equal(cached, full) and same_cache is cache
    assert torch.equal(cached_other, full)
    assert not torch.allclose(later, full)


def test_zero_face_mask_removes_audio(model):
    inputs = make_inputs() | {"face_mask": torch.zeros(2, 1, 1, HEIGHT, WIDTH)}
    louder = inputs | {"audio_prompts": inputs["audio_prompts"] * 3 + 1}
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**louder))
        face = make_inputs()
        assert not torch.allclose(model(**face), model(**(face | {"audio_prompts": louder["audio_prompts"]})))


def test_joint_attention_uses_text_count_and_refiner_uses_positions(model):
    inputs = make_inputs()
    # values of text tokens beyond the count of ones AND masked out in the refiner cannot matter ...
    tail = inputs["text_states"].clone()
    tail[0, 8] += 5.0  # position 8: mask 0, and 8 >= count 6
    # ... but a token the refiner masks that the joint attention still counts (position 2 < 6) does matter
    hole = inputs["text_states"].clone()
    hole[0, 2] += 5.0
    with torch.no_grad():
        base = model(**inputs)
        assert torch.equal(model(**(inputs | {"text_states": tail}))[0], base[0])
        assert not torch.allclose(model(**(inputs | {"text_states": hole}))[0], base[0])


def test_reference_frame_sits_at_rope_time_minus_one(model):
    grid = model.token_grid(FRAMES, HEIGHT, WIDTH)
    index = torch.arange(-1, FRAMES)
    cos, _ = model.rope(index, HEIGHT, WIDTH, torch.device("cpu"))
    assert cos.shape == (grid.image_tokens, CONFIG.head_dim)
    t_dim = CONFIG.rope_axes_dim[0]
    expected = torch.cos(torch.tensor(-1.0) / CONFIG.rope_theta ** (torch.arange(0, t_dim, 2).float() / t_dim))
    torch.testing.assert_close(cos[0, :t_dim:2], expected)
    assert torch.equal(cos[grid.ref_tokens, :t_dim], torch.ones(t_dim))  # first video frame: t = 0


def test_token_grid_and_cache_split(model):
    assert model.token_grid(33, 88, 88).image_tokens == 65824  # facts §8: 704x704 window, ref frame included
    grid = TokenGrid(33, 2, 3)
    assert (grid.tokens_per_frame, grid.ref_tokens, grid.video_tokens, grid.image_tokens) == (6, 6, 198, 204)
    cache = torch.randn(2, grid.image_tokens + 5, 4)
    ref, video, text = grid.split_cache(cache)
    assert ref.shape == (2, 6, 4) and video.shape == (2, 33, 6, 4) and text.shape == (2, 5, 4)
    assert torch.equal(grid.join_cache(ref, video, text), cache)


def test_input_validation(model):
    inputs = make_inputs()
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(**(inputs | {"hidden_states": inputs["hidden_states"][..., :3]}))
    with pytest.raises(ValueError, match="audio_prompts"):
        model(**(inputs | {"audio_prompts": inputs["audio_prompts"][:, :-1]}))
    with pytest.raises(ValueError, match="block_cache"):
        model(**inputs, block_cache=torch.zeros(2, 5, CONFIG.hidden_size))


def test_short_window_runs(model):
    inputs = make_inputs(batch=1, frames=5)
    with torch.no_grad():
        out, cache = model(**inputs, return_block_cache=True)
        ref_out, _ = reference_forward(export_official_state_dict(model), CONFIG, *inputs.values())
    assert out.shape == (1, 16, 5, HEIGHT, WIDTH)
    assert (out - ref_out).abs().max() <= 1e-5


def test_attention_backends(model):
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.set_attention_backend("xformers")
    if not is_flash_attn_available():
        with pytest.raises(RuntimeError, match="flash-attn"):
            model.set_attention_backend("flash")


# ----------------------------------------------------------------------------------------------- config


def test_config_presets_and_dict_round_trip():
    released, tiny = AvatarTransformerConfig.released(), AvatarTransformerConfig.tiny()
    assert (released.hidden_size, released.num_heads, released.num_double_blocks, released.num_single_blocks) == (
        3072, 24, 20, 40)
    assert released.audio_in_dim == 19200 and released.audio_tokens_per_latent == 16
    assert (tiny.hidden_size, tiny.head_dim, tiny.rope_axes_dim, tiny.num_single_blocks) == (32, 16, (4, 6, 6), 2)
    assert (tiny.audio_intermediate_dim, tiny.audio_out_dim, tiny.audio_adapter_dim) == (16, 32, 16)
    for config in (released, tiny):
        assert AvatarTransformerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_heads": 5}, "num_heads\\*head_dim"),
        ({"rope_axes_dim": (16, 56, 54)}, "sum\\(rope_axes_dim\\)"),
        ({"motion_embed_dim": 700}, "motion_values"),
        ({"audio_adapter_blocks": (1, 25)}, "audio_adapter_blocks"),
        ({"num_single_blocks": 0}, "single block"),
        ({"patch_size": (1, 2, 4)}, "patch_size"),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        AvatarTransformerConfig(**change)
    with pytest.raises(ValueError, match="unknown"):
        AvatarTransformerConfig.from_dict({"hidden": 1})
