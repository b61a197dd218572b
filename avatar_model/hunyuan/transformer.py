"""HunyuanVideo-Avatar diffusion transformer (clean room), built on diffusers' HunyuanVideo blocks.

The backbone (patch embed, token refiner, 20 double-stream and 40 single-stream blocks, final AdaLN) is diffusers'
`HunyuanVideoTransformer3DModel` machinery, whose equations equal the official ones (interleaved RoPE, GELU-tanh,
K-major qkv, positional mask in the token refiner). What is Avatar-specific lives here:

- the reference image: `ref_embedder` + `ref_proj` add all 33 reference latent frames token-for-token, and the first
  reference frame, embedded by `x_embedder`, is prepended as an extra frame at RoPE time -1 (dropped before output);
- audio: whisper windows -> `AudioProjection` -> 16 tokens per latent frame -> `AudioCrossAttention` after double
  blocks 1, 3, ..., 19, gated by the face mask on the token grid;
- motion_exp / motion_pose / fps embeddings added to the modulation vector;
- the last-block step cache (official "deepcache").

Sequence layout everywhere: [ref frame tokens | video tokens (T-major, then h, then w) | text tokens].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoAttnProcessor2_0,
    HunyuanVideoPatchEmbed,
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTokenRefiner,
    HunyuanVideoTransformerBlock,
)
from diffusers.models.transformers.transformer_hunyuan_video_framepack import HunyuanVideoFramepackRotaryPosEmbed
from diffusers.utils.import_utils import is_flash_attn_available, is_flash_attn_version
from torch import nn

from avatar_model.hunyuan.config import AvatarTransformerConfig

logger = logging.getLogger(__name__)

# "flash" is flash-attn's varlen kernel: the official joint attention is varlen over [image + valid text].
ATTENTION_BACKENDS = {"native": AttentionBackendName.NATIVE, "flash": AttentionBackendName.FLASH_VARLEN}
MIN_FLASH_ATTN_VERSION = "2.6.3"


@dataclass(frozen=True)
class TokenGrid:
    """Token layout of one window: `ref_frames` reference frames then `frames` video frames of `height*width`
    tokens each. The step cache is [B, ref_tokens + video_tokens + text_len, hidden]."""

    frames: int
    height: int
    width: int
    ref_frames: int = 1

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def ref_tokens(self) -> int:
        return self.ref_frames * self.tokens_per_frame

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def image_tokens(self) -> int:
        return self.ref_tokens + self.video_tokens

    def split_cache(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, N, D] cache -> ref [B, ref_tokens, D], video [B, frames, tokens_per_frame, D], text [B, L, D]."""
        ref, video, text = cache.split([self.ref_tokens, self.video_tokens, cache.shape[1] - self.image_tokens], 1)
        return ref, video.unflatten(1, (self.frames, self.tokens_per_frame)), text

    def join_cache(self, ref: torch.Tensor, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Inverse of `split_cache` (e.g. after re-assembling per-frame entries for a shifted window)."""
        return torch.cat([ref, video.flatten(1, 2), text], dim=1)


class AvatarConditionEmbedding(nn.Module):
    """The modulation vector `vec` = time + motion_exp + motion_pose + fps + pooled CLIP text, summed in the
    official order. Every scalar uses the same 256-d [cos, sin] sinusoid (max period 1e4) and its own MLP.
    Not diffusers' HunyuanVideoConditionEmbedding: that one has no motion/fps inputs and sums time + text first."""

    def __init__(self, config: AvatarTransformerConfig) -> None:
        super().__init__()
        freq, hidden = config.timestep_freq_dim, config.hidden_size
        self.time_proj = Timesteps(freq, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(freq, hidden)
        self.motion_exp_embedder = TimestepEmbedding(freq, config.motion_embed_dim)
        self.motion_pose_embedder = TimestepEmbedding(freq, config.motion_embed_dim)
        self.fps_embedder = TimestepEmbedding(freq, hidden)
        self.text_embedder = PixArtAlphaTextProjection(config.text_states_dim_2, hidden, act_fn="silu")

    def _embed(self, embedder: TimestepEmbedding, values: torch.Tensor) -> torch.Tensor:
        return embedder(self.time_proj(values).to(embedder.linear_1.weight.dtype))

    def forward(
        self,
        timestep: torch.Tensor,  # [B] sigma*1000
        motion_exp: torch.Tensor,  # [B, motion_values]
        motion_pose: torch.Tensor,  # [B, motion_values]
        fps: torch.Tensor,  # [B]
        pooled_text: torch.Tensor,  # [B, text_states_dim_2]
    ) -> torch.Tensor:
        batch = timestep.shape[0]
        vec = self._embed(self.timestep_embedder, timestep)  # [B, D]
        vec = vec + self._embed(self.motion_exp_embedder, motion_exp.reshape(-1)).view(batch, -1)
        vec = vec + self._embed(self.motion_pose_embedder, motion_pose.reshape(-1)).view(batch, -1)
        vec = vec + self._embed(self.fps_embedder, fps)
        return vec + self.text_embedder(pooled_text.to(self.text_embedder.linear_1.weight.dtype))


class AudioProjection(nn.Module):
    """Whisper window per video frame [B, F, 10, 5, 384] -> `context_tokens` audio tokens [B, F, 4, D]
    (official AudioProjNet2: 3 linears with ReLU, then an affine LayerNorm)."""

    def __init__(self, config: AvatarTransformerConfig) -> None:
        super().__init__()
        self.context_tokens = config.audio_context_tokens
        self.linear_1 = nn.Linear(config.audio_in_dim, config.audio_intermediate_dim)
        self.linear_2 = nn.Linear(config.audio_intermediate_dim, config.audio_intermediate_dim)
        self.linear_3 = nn.Linear(config.audio_intermediate_dim, config.audio_context_tokens * config.audio_out_dim)
        self.norm = nn.LayerNorm(config.audio_out_dim, eps=config.audio_norm_eps)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        batch, frames = audio.shape[:2]
        x = audio.reshape(batch * frames, -1).to(self.linear_1.weight.dtype)  # [B*F, 19200]
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = self.linear_3(x).unflatten(1, (self.context_tokens, -1))  # [B*F, 4, D]
        return self.norm(x).unflatten(0, (batch, frames))  # [B, F, 4, D]


class AudioCrossAttention(nn.Module):
    """Video tokens of each latent frame attend to that frame's audio tokens (official PerceiverAttentionCA).

    One head of width `inner_dim` (the official `heads` argument is unused), no biases, both inputs LayerNorm-ed,
    q and k each scaled by inner_dim^(-1/4) before the product and softmax in fp32. Explicit matmuls rather than
    SDPA: there are only 16 keys, and this keeps the official rounding order.
    """

    def __init__(self, dim: int, inner_dim: int, eps: float) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(math.sqrt(inner_dim))
        self.norm_audio = nn.LayerNorm(dim, eps=eps)
        self.norm_video = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)  # rows: k then v
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        # audio [B, T, A, D] (A audio tokens per latent frame), video [B, T, N, D] -> [B, T, N, D]
        dtype = self.to_q.weight.dtype
        audio = self.norm_audio(audio.to(dtype))
        video = self.norm_video(video.to(dtype))
        query = self.to_q(video)  # [B, T, N, inner]
        key, value = self.to_kv(audio).chunk(2, dim=-1)  # [B, T, A, inner] each
        weights = (query * self.scale) @ (key * self.scale).transpose(-1, -2)  # [B, T, N, A]
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        return self.to_out(weights @ value)


class AvatarTransformer3DModel(nn.Module):
    """The Avatar DiT. Parameter layout follows diffusers; `checkpoint.py` maps the official key names onto it."""

    # The official model builds these without the bf16 factory dtype and never casts the model as a whole, so they
    # stay fp32 (and run under bf16 autocast); the loader keeps them fp32 for the same numerics.
    _keep_in_fp32_modules = ("audio_proj", "audio_adapters", "ref_proj", "proj_out")
    # Linear layers the official fp8 checkpoint stores as float8 (everything inside the double/single blocks).
    _fp8_module_prefixes = ("transformer_blocks.", "single_transformer_blocks.")

    def __init__(self, config: AvatarTransformerConfig) -> None:
        super().__init__()
        self.config = config
        hidden, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        patch_t, patch, _ = config.patch_size

        # 1. Latent, reference and condition embedders
        self.x_embedder = HunyuanVideoPatchEmbed(config.patch_size, config.in_channels, hidden)
        self.ref_embedder = HunyuanVideoPatchEmbed(config.patch_size, config.in_channels, hidden)
        self.ref_proj = nn.Linear(hidden, hidden)
        self.context_embedder = HunyuanVideoTokenRefiner(
            config.text_states_dim,
            config.refiner_num_heads,
            hidden // config.refiner_num_heads,
            num_layers=config.refiner_num_layers,
            mlp_ratio=config.refiner_mlp_ratio,
        )
        self.time_text_embed = AvatarConditionEmbedding(config)
        self.audio_proj = AudioProjection(config)

        # 2. RoPE with explicit frame indices, so the reference frame can sit at t = -1
        self.rope = HunyuanVideoFramepackRotaryPosEmbed(patch, patch_t, list(config.rope_axes_dim), config.rope_theta)

        # 3. Dual-stream blocks, with an audio adapter after each block listed in `audio_adapter_blocks`
        self.transformer_blocks = nn.ModuleList(
            HunyuanVideoTransformerBlock(heads, head_dim, mlp_ratio=config.mlp_ratio, qk_norm="rms_norm")
            for _ in range(config.num_double_blocks)
        )
        self.audio_adapters = nn.ModuleList(
            AudioCrossAttention(hidden, config.audio_adapter_dim, config.audio_norm_eps)
            for _ in config.audio_adapter_blocks
        )
        self._adapter_after = {block: k for k, block in enumerate(config.audio_adapter_blocks)}

        # 4. Single-stream blocks
        self.single_transformer_blocks = nn.ModuleList(
            HunyuanVideoSingleTransformerBlock(heads, head_dim, mlp_ratio=config.mlp_ratio, qk_norm="rms_norm")
            for _ in range(config.num_single_blocks)
        )

        # 5. Output projection (diffusers' AdaLayerNormContinuous chunks (scale, shift); the loader swaps halves)
        self.norm_out = AdaLayerNormContinuous(hidden, hidden, elementwise_affine=False, eps=config.norm_eps)
        self.proj_out = nn.Linear(hidden, patch_t * patch * patch * config.out_channels)

        # pin the backend so diffusers' DIFFUSERS_ATTN_BACKEND environment default cannot change results
        self.set_attention_backend("native")

    def set_attention_backend(self, backend: str) -> None:
        """'native' = torch SDPA with a key-padding mask (default); 'flash' = flash-attn varlen, the official
        kernel (needs flash-attn >= 2.6.3 and bf16/fp16 activations). The token refiner always uses SDPA because it
        needs a full pairwise mask."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
        if backend == "flash" and not (
            is_flash_attn_available() and is_flash_attn_version(">=", MIN_FLASH_ATTN_VERSION)
        ):
            raise RuntimeError(
                f"attention backend 'flash' needs flash-attn>={MIN_FLASH_ATTN_VERSION}, which is not installed; "
                "install it on a CUDA machine or use the default 'native' (SDPA) backend"
            )
        for module in self.modules():
            processor = getattr(module, "processor", None)
            if isinstance(processor, HunyuanVideoAttnProcessor2_0):
                processor._attention_backend = ATTENTION_BACKENDS[backend]

    def token_grid(self, num_frames: int, height: int, width: int) -> TokenGrid:
        """Post-patch token grid of a latent window [*, *, num_frames, height, width], plus one reference frame."""
        patch_t, patch_h, patch_w = self.config.patch_size
        if num_frames % patch_t or height % patch_h or width % patch_w:
            raise ValueError(
                f"latent size (T={num_frames}, H={height}, W={width}) must be divisible by the patch size "
                f"{self.config.patch_size}"
            )
        return TokenGrid(num_frames // patch_t, height // patch_h, width // patch_w)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        text_states_2: torch.Tensor,
        ref_latents: torch.Tensor,
        audio_prompts: torch.Tensor,
        face_mask: torch.Tensor,
        motion_exp: torch.Tensor,
        motion_pose: torch.Tensor,
        fps: torch.Tensor,
        *,
        block_cache: torch.Tensor | None = None,
        return_block_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the flow velocity for one window.

        Shapes: hidden_states / ref_latents [B, C, T, H, W] (latents), timestep [B] (sigma*1000), text_states
        [B, L, Dt], text_mask [B, L] (joint attention uses only its count of ones, the token refiner its positions),
        text_states_2 [B, D2], audio_prompts [B, 4T-3, 10, 5, 384], face_mask [B, 1, 1, H, W] (latent resolution),
        motion_exp / motion_pose [B, 4], fps [B].

        `block_cache` (the tensor a previous full step returned with `return_block_cache=True`) turns this into the
        official cached step: only `vec`, the last single-stream block and the output layer run.
        """
        batch, _, num_frames, height, width = hidden_states.shape
        grid = self.token_grid(num_frames, height, width)
        text_len = text_states.shape[1]
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)

        # 1. Modulation vector (also on cached steps: it carries the new timestep)
        vec = self.time_text_embed(timestep, motion_exp, motion_pose, fps, text_states_2)  # [B, D]

        # 2. RoPE over [ref frame at t=-1 | video frames 0..T-1], and the joint-attention key mask
        frame_index = torch.arange(grid.frames + grid.ref_frames, device=hidden_states.device)
        frame_index = frame_index + self.config.ref_frame_index
        rope = self.rope(frame_index, height, width, hidden_states.device)  # 2 x [ref+video tokens, head_dim]
        attention_mask = self._joint_attention_mask(text_mask, grid.image_tokens, text_len)  # [B, 1, 1, N] | None

        if block_cache is None:
            # 3. Embed the noisy latents, add the projected reference latents, prepend the reference frame
            dtype = self.x_embedder.proj.weight.dtype
            img = self.x_embedder(hidden_states.to(dtype))  # [B, T*h*w, D]
            ref = self.ref_embedder(ref_latents.to(dtype))  # [B, T*h*w, D]
            img = self.ref_proj(ref.to(self.ref_proj.weight.dtype)).to(dtype) + img
            ref_frame = self.x_embedder(ref_latents[:, :, : grid.ref_frames].to(dtype))  # [B, h*w, D]
            img = torch.cat([ref_frame, img], dim=1)  # [B, (1+T)*h*w, D]
            txt = self.context_embedder(text_states.to(dtype), timestep, text_mask)  # [B, L, D]
            audio = self._audio_tokens(audio_prompts, grid)  # [B, T, 16, D]
            face = self._face_mask_tokens(face_mask, grid).to(dtype)  # [B, T*h*w, 1]

            # 4. Double-stream blocks; audio enters the video tokens (not the ref frame) inside the face region
            for index, block in enumerate(self.transformer_blocks):
                img, txt = block(img, txt, vec, attention_mask=attention_mask, freqs_cis=rope)
                if index in self._adapter_after:
                    adapter = self.audio_adapters[self._adapter_after[index]]
                    video = img[:, grid.ref_tokens :].unflatten(1, (grid.frames, grid.tokens_per_frame))
                    delta = adapter(audio, video).flatten(1, 2).to(dtype)  # [B, T*h*w, D]
                    img = torch.cat([img[:, : grid.ref_tokens], img[:, grid.ref_tokens :] + delta * face], dim=1)

            # 5. Single-stream blocks up to the last one, whose input is the step cache
            for block in self.single_transformer_blocks[:-1]:
                img, txt = block(img, txt, vec, attention_mask=attention_mask, image_rotary_emb=rope)
            cache = torch.cat([img, txt], dim=1) if return_block_cache else None
        else:
            expected = (batch, grid.image_tokens + text_len, self.config.hidden_size)
            if tuple(block_cache.shape) != expected:
                raise ValueError(f"block_cache has shape {tuple(block_cache.shape)}, expected {expected}")
            cache = block_cache
            img, txt = block_cache[:, : grid.image_tokens], block_cache[:, grid.image_tokens :]

        # 6. Last single-stream block
        img, _ = self.single_transformer_blocks[-1](img, txt, vec, attention_mask=attention_mask, image_rotary_emb=rope)

        # 7. Output: drop the reference frame, final AdaLN + projection, unpatchify
        img = self.norm_out(img[:, grid.ref_tokens :], vec)
        img = self.proj_out(img.to(self.proj_out.weight.dtype))  # [B, T*h*w, pt*ph*pw*C]
        patch_t, patch_h, patch_w = self.config.patch_size
        img = img.reshape(batch, grid.frames, grid.height, grid.width, -1, patch_t, patch_h, patch_w)
        out = img.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, T, H, W]
        return (out, cache) if return_block_cache else out

    def _joint_attention_mask(self, text_mask: torch.Tensor, image_tokens: int, text_len: int) -> torch.Tensor | None:
        """Key mask for [image | text]: the first `count(text_mask)` text tokens are valid, like the official
        varlen `cu_seqlens`. Valid tokens then see exactly what they see officially; padded text tokens never act
        as keys (officially they only attend among themselves), so the image output is unaffected either way."""
        valid_text = text_mask.sum(dim=1)  # [B]
        if bool((valid_text == text_len).all()):
            return None
        positions = torch.arange(image_tokens + text_len, device=text_mask.device)
        mask = positions[None, :] < (image_tokens + valid_text)[:, None]  # [B, N]
        return mask[:, None, None, :]

    def _audio_tokens(self, audio_prompts: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """[B, 4T-3, 10, 5, 384] whisper windows -> [B, T, 16, D] audio tokens per latent frame. Latent 0 covers a
        single video frame (causal VAE), so the first frame's tokens are repeated to fill its 4 slots."""
        per_latent = self.config.audio_frames_per_latent
        expected = per_latent * grid.frames - (per_latent - 1)
        feature_shape = self.config.audio_feature_shape
        if audio_prompts.shape[1] != expected or tuple(audio_prompts.shape[2:]) != feature_shape:
            raise ValueError(
                f"audio_prompts has shape {tuple(audio_prompts.shape)}, expected [B, {expected}, "
                f"{', '.join(map(str, feature_shape))}] for {grid.frames} latent frames"
            )
        tokens = self.audio_proj(audio_prompts)  # [B, 4T-3, 4, D]
        tokens = torch.cat([tokens[:, :1].expand(-1, per_latent - 1, -1, -1), tokens], dim=1)  # [B, 4T, 4, D]
        return tokens.reshape(tokens.shape[0], grid.frames, -1, tokens.shape[-1])  # [B, T, 16, D]

    @staticmethod
    def _face_mask_tokens(face_mask: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """[B, 1, 1 or T, H, W] latent-resolution mask -> [B, T*h*w, 1]: repeated over the latent frames, then
        nearest-resized to the token grid (as official)."""
        if face_mask.shape[2] == 1:
            face_mask = face_mask.expand(-1, -1, grid.frames, -1, -1)
        size = (grid.frames, grid.height, grid.width)
        face_mask = F.interpolate(face_mask.float(), size=size, mode="nearest")  # [B, 1, T, h, w]
        return face_mask.reshape(face_mask.shape[0], -1, 1)
