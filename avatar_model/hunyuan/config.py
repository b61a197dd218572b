"""Typed configuration of the HunyuanVideo-Avatar diffusion transformer.

Every width that the official `hymm_sp/modules/models_audio.py` hard-codes (3072, 1024, 16 audio tokens per latent
frame, adapter positions ...) is a field here, so the same code builds the released 13B model and the tiny model the
parity check runs on CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AvatarTransformerConfig:
    """Shape of the Avatar DiT. Defaults are the released `HYVideo-T/2` checkpoint (see `released()`)."""

    # backbone
    hidden_size: int = 3072
    num_heads: int = 24
    head_dim: int = 128
    num_double_blocks: int = 20
    num_single_blocks: int = 40
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6  # block pre-norms, QK RMSNorms and the final norm
    # latents and patching (t, h, w)
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # 3-axis RoPE (t, h, w); the reference frame sits at time index `ref_frame_index`
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 256.0
    ref_frame_index: int = -1
    # sinusoidal embedding width shared by time, motion and fps embedders (max period 10000, [cos, sin])
    timestep_freq_dim: int = 256
    # text: LLaVA hidden states through the token refiner, CLIP pooled output into `vec`
    text_states_dim: int = 4096
    text_states_dim_2: int = 768
    refiner_num_layers: int = 2
    refiner_num_heads: int = 24
    refiner_mlp_ratio: float = 4.0
    # motion_exp / motion_pose: `motion_values` scalars, each embedded to `motion_embed_dim`, concatenated
    motion_values: int = 4
    motion_embed_dim: int = 768
    # audio projection (official AudioProjNet2): whisper window [10, 5, 384] per video frame -> context tokens
    audio_feature_shape: tuple[int, int, int] = (10, 5, 384)
    audio_intermediate_dim: int = 1024
    audio_context_tokens: int = 4
    audio_out_dim: int = 3072
    audio_norm_eps: float = 1e-5  # torch LayerNorm default, used by the projection and the adapters
    # video frames per latent frame (causal VAE: latent 0 covers one frame, so the first audio frame is repeated)
    audio_frames_per_latent: int = 4
    # audio cross-attention adapters (official PerceiverAttentionCA): single head of this width
    audio_adapter_dim: int = 1024
    audio_adapter_blocks: tuple[int, ...] = (1, 3, 5, 7, 9, 11, 13, 15, 17, 19)

    def __post_init__(self) -> None:
        for name in ("patch_size", "rope_axes_dim", "audio_feature_shape", "audio_adapter_blocks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if self.num_heads * self.head_dim != self.hidden_size:
            problems.append(f"num_heads*head_dim = {self.num_heads * self.head_dim} != hidden_size {self.hidden_size}")
        if sum(self.rope_axes_dim) != self.head_dim:
            problems.append(f"sum(rope_axes_dim) = {sum(self.rope_axes_dim)} != head_dim {self.head_dim}")
        if len(self.rope_axes_dim) != 3 or any(d % 2 for d in self.rope_axes_dim):
            problems.append(f"rope_axes_dim must be three even widths, got {self.rope_axes_dim}")
        if len(self.patch_size) != 3 or self.patch_size[1] != self.patch_size[2]:
            problems.append(f"patch_size must be (t, p, p) with square spatial patches, got {self.patch_size}")
        if self.hidden_size % self.refiner_num_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by refiner_num_heads "
                            f"{self.refiner_num_heads}")
        if self.motion_values * self.motion_embed_dim != self.hidden_size:
            problems.append(
                f"motion_values*motion_embed_dim = {self.motion_values * self.motion_embed_dim} "
                f"!= hidden_size {self.hidden_size}"
            )
        if self.audio_out_dim != self.hidden_size:
            problems.append(f"audio_out_dim {self.audio_out_dim} must equal hidden_size {self.hidden_size}")
        if self.num_double_blocks < 1 or self.num_single_blocks < 1:
            problems.append("need at least one double and one single block (the step cache enters the last single)")
        blocks = self.audio_adapter_blocks
        if list(blocks) != sorted(set(blocks)) or any(not 0 <= i < self.num_double_blocks for i in blocks):
            problems.append(f"audio_adapter_blocks must be increasing double-block indices, got {blocks}")
        if self.timestep_freq_dim % 2:
            problems.append(f"timestep_freq_dim must be even, got {self.timestep_freq_dim}")
        # diffusers' HunyuanVideo blocks fix these two; the released model uses exactly these values
        if not self.qkv_bias:
            problems.append("qkv_bias=False is not supported: the diffusers blocks always carry biases")
        if self.norm_eps != 1e-6:
            problems.append(f"norm_eps must be 1e-6 (fixed inside the diffusers blocks), got {self.norm_eps}")
        if problems:
            raise ValueError("invalid AvatarTransformerConfig: " + "; ".join(problems))

    @property
    def audio_in_dim(self) -> int:
        """Flattened whisper window per video frame (10*5*384 = 19200 when released)."""
        window, layers, channels = self.audio_feature_shape
        return window * layers * channels

    @property
    def audio_tokens_per_latent(self) -> int:
        """Audio tokens each latent frame attends to: 4 video frames x 4 context tokens = 16 when released."""
        return self.audio_frames_per_latent * self.audio_context_tokens

    @classmethod
    def released(cls) -> AvatarTransformerConfig:
        """The released 13B checkpoint (`HYVideo-T/2`, 20 double + 40 single blocks)."""
        return cls()

    @classmethod
    def tiny(cls) -> AvatarTransformerConfig:
        """The parity-check shape: every official width shrunk, block counts and adapter positions kept."""
        return cls(
            hidden_size=32,
            num_heads=2,
            head_dim=16,
            num_double_blocks=20,
            num_single_blocks=2,
            rope_axes_dim=(4, 6, 6),
            text_states_dim=32,
            text_states_dim_2=16,
            refiner_num_heads=2,
            motion_embed_dim=8,
            audio_intermediate_dim=16,
            audio_context_tokens=4,
            audio_out_dim=32,
            audio_adapter_dim=16,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AvatarTransformerConfig:
        """Inverse of `to_dict`; unknown keys are an error rather than silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AvatarTransformerConfig fields: {unknown}")
        return cls(**data)
