"""VAE wrapper: official tiling, reference latents, and the streaming decode against diffusers' own tiled decode."""

import numpy as np
import pytest
import torch

from avatar_model.hunyuan.vae import (
    TINY_VAE_CONFIG,
    build_vae,
    decode_latents_in_chunks,
    enable_official_tiling,
    encode_reference,
    load_vae,
)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return enable_official_tiling(build_vae(TINY_VAE_CONFIG)).eval().requires_grad_(False)


def _reference_frames(vae, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        video = vae.decode(latents / vae.config.scaling_factor).sample  # [1, 3, F, H, W]
    return ((video / 2 + 0.5).clamp(0, 1) * 255)[0].permute(1, 2, 3, 0).numpy().astype(np.uint8)


def test_official_tiling(vae):
    assert vae.use_tiling
    assert (vae.tile_sample_min_height, vae.tile_sample_stride_height) == (256, 192)
    assert (vae.tile_sample_min_width, vae.tile_sample_stride_width) == (256, 192)
    assert (vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames) == (64, 48)


def test_chunks_equal_full_tiled_decode(vae):
    latents = torch.randn(1, 16, 20, 4, 4, generator=torch.Generator().manual_seed(1))  # 77 frames, 2 tiles
    chunks = list(decode_latents_in_chunks(vae, latents, n_frames_out=77))
    assert [c.shape for c in chunks] == [(49, 32, 32, 3), (28, 32, 32, 3)]
    assert all(c.dtype == np.uint8 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), _reference_frames(vae, latents))


def test_chunks_with_spatial_tiles_and_trim():
    torch.manual_seed(0)
    vae = build_vae(TINY_VAE_CONFIG).eval().requires_grad_(False)
    # Small tiles so that spatial tiling runs inside every temporal tile at test size.
    vae.enable_tiling(
        tile_sample_min_height=32,
        tile_sample_min_width=32,
        tile_sample_stride_height=24,
        tile_sample_stride_width=24,
        tile_sample_min_num_frames=16,
        tile_sample_stride_num_frames=12,
    )
    latents = torch.randn(1, 16, 9, 5, 5, generator=torch.Generator().manual_seed(2))  # 33 frames, 40 x 40
    reference = _reference_frames(vae, latents)
    chunks = list(decode_latents_in_chunks(vae, latents, n_frames_out=30))
    assert [len(c) for c in chunks] == [13, 12, 5]
    np.testing.assert_array_equal(np.concatenate(chunks), reference[:30])


def test_short_latents_decode_in_one_chunk(vae):
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    chunks = list(decode_latents_in_chunks(vae, latents, n_frames_out=9))
    assert len(chunks) == 1
    np.testing.assert_array_equal(chunks[0], _reference_frames(vae, latents))
    with pytest.raises(ValueError):
        decode_latents_in_chunks(vae, latents, n_frames_out=10)


def test_encode_reference(vae):
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    latents = encode_reference(vae, image, generator=torch.Generator().manual_seed(5))
    assert latents.shape == (1, 16, 33, 4, 6)

    clip = torch.from_numpy(image).permute(2, 0, 1)[None, :, None].float().repeat(1, 1, 129, 1, 1) / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(clip).latent_dist
    expected = posterior.sample(generator=torch.Generator().manual_seed(5)) * 0.476986
    torch.testing.assert_close(latents, expected)
    assert not torch.allclose(latents, posterior.mode() * 0.476986)  # sampled, not the mode

    with pytest.raises(ValueError):
        encode_reference(vae, image, n_frames=128)


def test_load_vae_strips_prefix_and_is_strict(vae, tmp_path):
    path = tmp_path / "pytorch_model.pt"
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, path)
    loaded = load_vae(path, config=TINY_VAE_CONFIG, dtype=torch.float32)
    assert loaded.tile_sample_min_num_frames == 64
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)

    torch.save({"encoder.conv_in.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError):
        load_vae(path, config=TINY_VAE_CONFIG)
