"""The causal 3D VAE: diffusers `AutoencoderKLHunyuanVideo` with the official tiling, reference encoding, and a
decode that streams frames out tile by tile.

diffusers' defaults equal the official 884-16c VAE (blocks 128/256/512/512, 16 latent channels, t x4, s x8,
scaling 0.476986) and the official `vae/pytorch_model.pt` keys load into it unchanged.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

SPATIAL_COMPRESSION = 8  # pixels per latent cell along H and W, for both presets' VAEs
OFFICIAL_TILE_PX = 256  # official spatial tile; the stride is 3/4 of the tile (192)

# Small enough for CPU tests, but with the released latent width (16) so it plugs into the DiT.
TINY_VAE_CONFIG = {
    "latent_channels": 16,
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def build_vae(config: dict | None = None) -> AutoencoderKLHunyuanVideo:
    """Randomly initialised VAE: the released architecture, or that with `config` overrides (e.g. TINY_VAE_CONFIG)."""
    return AutoencoderKLHunyuanVideo(**(config or {}))


def enable_official_tiling(
    vae: AutoencoderKLHunyuanVideo, tile_px: int = OFFICIAL_TILE_PX
) -> AutoencoderKLHunyuanVideo:
    """Official tiles: ``tile_px`` (256) with stride 3/4 of it (192) spatially, 64 frames with stride 48 temporally
    (25 % overlap). Smaller spatial tiles lower the decoder's peak memory.

    diffusers' temporal default (16/12 frames) differs, and its temporal tiling is on even without `enable_tiling`.
    """
    if tile_px <= 0 or tile_px % (4 * SPATIAL_COMPRESSION):
        raise ValueError(f"tile_px must be a positive multiple of 32 (its 3/4 stride in whole latents), got {tile_px}")
    vae.enable_tiling(
        tile_sample_min_height=tile_px,
        tile_sample_min_width=tile_px,
        tile_sample_min_num_frames=64,
        tile_sample_stride_height=tile_px * 3 // 4,
        tile_sample_stride_width=tile_px * 3 // 4,
        tile_sample_stride_num_frames=48,
    )
    return vae


def load_vae(
    weights: str | Path,
    config: dict | None = None,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> AutoencoderKLHunyuanVideo:
    """The VAE from the official `vae/pytorch_model.pt`, strictly loaded, in eval mode with official tiling on.

    As in the official loader: a top-level `state_dict` entry is unwrapped and a `vae.` key prefix removed. The
    official `config.json` targets the official class, not diffusers'; diffusers' defaults already match it.
    """
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {key.removeprefix("vae."): value for key, value in state.items()}
    vae = build_vae(config)
    vae.load_state_dict(state, strict=True)
    return enable_official_tiling(vae.to(device=device, dtype=dtype).eval().requires_grad_(False))


@dataclass(frozen=True)
class ReferencePosterior:
    """The VAE posterior of the still reference clip, with the scaling factor, so that it can be cached per portrait
    and sampled for any seed without the VAE."""

    parameters: torch.Tensor  # [1, 2C, T, h, w] mean and log-variance, as `DiagonalGaussianDistribution` takes them
    scaling_factor: float

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents [1, C, T, h, w] drawn on the parameters' device and dtype (global RNG without a generator)."""
        return DiagonalGaussianDistribution(self.parameters).sample(generator=generator) * self.scaling_factor


@torch.no_grad()
def encode_reference_posterior(
    vae: AutoencoderKLHunyuanVideo, image: np.ndarray, n_frames: int = 129
) -> ReferencePosterior:
    """The posterior of an RGB uint8 image [H, W, 3] held still for `n_frames` frames (a clip, not one frame, is what
    the DiT was trained to read), mapped to [-1, 1] in the VAE dtype: T = (n_frames - 1) // 4 + 1, h, w = H/8, W/8."""
    height, width = image.shape[:2]
    if height % SPATIAL_COMPRESSION or width % SPATIAL_COMPRESSION or (n_frames - 1) % vae.temporal_compression_ratio:
        raise ValueError(f"need H and W multiples of 8 and n_frames = 4k + 1, got {height}x{width}, {n_frames}")
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device=vae.device, dtype=vae.dtype)
    pixels = pixels.permute(2, 0, 1) / 127.5 - 1  # [3, H, W] in [-1, 1]
    clip = pixels[None, :, None].repeat(1, 1, n_frames, 1, 1)  # [1, 3, F, H, W]
    return ReferencePosterior(vae.encode(clip).latent_dist.parameters, vae.config.scaling_factor)


def encode_reference(
    vae: AutoencoderKLHunyuanVideo,
    image: np.ndarray,
    n_frames: int = 129,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference latents [1, C, (n_frames - 1) // 4 + 1, H / 8, W / 8]: the posterior *sampled* (not its mode), as in
    the official code. With `generator=None` the sample uses the global RNG, like the official code."""
    return encode_reference_posterior(vae, image, n_frames).sample(generator)


def _decode_tile(vae: AutoencoderKLHunyuanVideo, z: torch.Tensor) -> torch.Tensor:
    """One temporal tile [1, C, t, h, w] -> frames [1, 3, 4(t - 1) + 1, 8h, 8w], spatially tiled like diffusers."""
    min_h = vae.tile_sample_min_height // vae.spatial_compression_ratio
    min_w = vae.tile_sample_min_width // vae.spatial_compression_ratio
    if vae.use_tiling and (z.shape[-2] > min_h or z.shape[-1] > min_w):
        return vae.tiled_decode(z).sample
    return vae.decoder(vae.post_quant_conv(z))


def _blend(previous_tail: torch.Tensor, frames: torch.Tensor, extent: int) -> torch.Tensor:
    """Cross-fade the first frames of a tile with the last frames of the previous one (linear ramp)."""
    extent = min(previous_tail.shape[2], frames.shape[2], extent)
    if extent == 0:
        return frames
    ramp = (torch.arange(extent, dtype=torch.float64) / extent).view(1, 1, -1, 1, 1)
    old, new = (w.to(device=frames.device, dtype=frames.dtype) for w in (1 - ramp, ramp))
    head = previous_tail[:, :, -extent:] * old + frames[:, :, :extent] * new
    return torch.cat([head, frames[:, :, extent:]], dim=2)


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[1, 3, n, H, W] in [-1, 1] -> (n, H, W, 3) uint8, truncating like the official writer."""
    frames = (frames / 2 + 0.5).clamp(0, 1).float()
    return (frames[0] * 255).permute(1, 2, 3, 0).cpu().numpy().astype(np.uint8)


def decode_latents_in_chunks(
    vae: AutoencoderKLHunyuanVideo, latents: torch.Tensor, n_frames_out: int
) -> Iterator[np.ndarray]:
    """Decode scaled latents [1, C, T, h, w] and yield uint8 frame chunks (n, H, W, 3) as each becomes final.

    Same result as `vae.decode` (same temporal tiles, causal first-frame drop and linear blend), but a tile's
    frames are handed out as soon as the next tile no longer changes them, so the caller can stream them to an
    encoder instead of holding the whole video. Stops after `n_frames_out` frames. Arguments are checked here,
    before the first chunk is asked for.
    """
    if latents.shape[0] != 1:
        raise ValueError(f"decode one video at a time, got batch {latents.shape[0]}")
    n_latent = latents.shape[2]
    n_total = (n_latent - 1) * vae.temporal_compression_ratio + 1
    if not 0 < n_frames_out <= n_total:
        raise ValueError(f"n_frames_out must be in [1, {n_total}] for {n_latent} latent frames, got {n_frames_out}")
    return _decode_chunks(vae, latents, n_frames_out)


@torch.no_grad()
def _decode_chunks(vae: AutoencoderKLHunyuanVideo, latents: torch.Tensor, n_frames_out: int) -> Iterator[np.ndarray]:
    # The official decode divides in fp32, then runs the VAE in its own dtype.
    z = (latents.float() / vae.config.scaling_factor).to(device=vae.device, dtype=vae.dtype)
    n_latent = z.shape[2]
    tile = vae.tile_sample_min_num_frames // vae.temporal_compression_ratio  # latent frames per tile (+1 overlap)
    if not (vae.use_framewise_decoding and n_latent > tile):
        yield _to_uint8(vae.decode(z).sample[:, :, :n_frames_out])
        return

    stride = vae.tile_sample_stride_num_frames  # output frames each tile contributes
    blend = vae.tile_sample_min_num_frames - stride
    emitted, tail = 0, None
    for k, start in enumerate(range(0, n_latent, stride // vae.temporal_compression_ratio)):
        frames = _decode_tile(vae, z[:, :, start : start + tile + 1])
        if k > 0:
            # Causal VAE: a later tile's first frame belongs to the previous tile's last latent.
            frames = _blend(tail, frames[:, :, 1:], blend)
        tail = frames[:, :, -blend:]  # only this part of the tile is still needed, by the next tile's blend
        final = frames[:, :, : stride + 1 if k == 0 else stride][:, :, : n_frames_out - emitted]
        if final.shape[2]:
            yield _to_uint8(final)
            emitted += final.shape[2]
        if emitted == n_frames_out:
            return
