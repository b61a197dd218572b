"""Time one full-size HunyuanVideo-Avatar DiT step and the VAE decode of one window on a CUDA GPU.

    python benchmarks/gpu_dit_step.py [--height 704 --width 768 --backend sdpa|flash --fp8 --repeats 3]

Random weights (bf16 DiT with the official fp32 modules, fp16 VAE), official shapes: one 33-latent window
(129 frames) at 704×768 with the CFG batch of 2 (34·44·48 = 71,808 image tokens + 831 text tokens per sample).
Rows: a full step (all 60 blocks), a cached step (last single block only, the official "deepcache") and the streamed
VAE decode of 33 latents → 129 frames with the official tiling. Needs about 45 GB of GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatar_model.hunyuan.config import AvatarTransformerConfig  # noqa: E402
from avatar_model.hunyuan.fp8 import FP8Linear  # noqa: E402
from avatar_model.hunyuan.scheduling import WINDOW_LATENTS, WindowPlan, cached_steps  # noqa: E402
from avatar_model.hunyuan.transformer import AvatarTransformer3DModel  # noqa: E402
from avatar_model.hunyuan.vae import build_vae, decode_latents_in_chunks, enable_official_tiling  # noqa: E402

TEXT_TOKENS = 831
VALID_TEXT_TOKENS = 640  # a typical prompt: ~65 user tokens + 575 image positions


def build_transformer(device: torch.device, fp8: bool, backend: str) -> AvatarTransformer3DModel:
    """Released config, random bf16 weights built directly on the GPU; official fp32 modules kept fp32."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = AvatarTransformer3DModel(AvatarTransformerConfig.released())
    finally:
        torch.set_default_dtype(default)
    for name in model._keep_in_fp32_modules:
        model.get_submodule(name).float()
    if fp8:
        for name, child in list(model.named_modules()):
            if isinstance(child, torch.nn.Linear) and name.startswith(model._fp8_module_prefixes):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, FP8Linear.from_linear(child))
        torch.cuda.empty_cache()
    model.set_attention_backend("native" if backend == "sdpa" else "flash")
    return model.eval().requires_grad_(False)


def window_inputs(config: AvatarTransformerConfig, height: int, width: int, device: torch.device) -> dict:
    """One CFG batch [uncond, cond] with the official shapes and dtypes."""
    h, w, frames = height // 8, width // 8, WINDOW_LATENTS
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape, dtype=torch.float16):
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    text_mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.int64, device=device)
    text_mask[:, :VALID_TEXT_TOKENS] = 1
    return dict(
        hidden_states=randn(2, config.in_channels, frames, h, w),
        timestep=torch.full((2,), 1000.0, device=device),
        text_states=randn(2, TEXT_TOKENS, config.text_states_dim),
        text_mask=text_mask,
        text_states_2=randn(2, config.text_states_dim_2),
        ref_latents=randn(2, config.in_channels, frames, h, w),
        audio_prompts=randn(2, 4 * frames - 3, *config.audio_feature_shape),
        face_mask=torch.ones(2, 1, 1, h, w, dtype=torch.float16, device=device),
        motion_exp=torch.full((2, config.motion_values), 30.0, device=device),
        motion_pose=torch.full((2, config.motion_values), 25.0, device=device),
        fps=torch.full((2,), 25.0, device=device),
    )


def cuda_time(fn, repeats: int) -> tuple[float, float]:
    """(median seconds over ``repeats`` after one warm-up, peak GiB allocated during the timed calls)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--backend", choices=("sdpa", "flash"), default="sdpa")
    parser.add_argument("--fp8", action="store_true", help="weight-only fp8 block linears, as the official _fp8.pt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_dit_step.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed.")
    if args.height % 16 or args.width % 16:
        raise SystemExit("--height and --width must be multiples of 16")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True

    started = time.perf_counter()
    model = build_transformer(device, args.fp8, args.backend)
    build_s = time.perf_counter() - started
    weights_gib = torch.cuda.memory_allocated() / 2**30
    inputs = window_inputs(model.config, args.height, args.width, device)
    rows = []

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full_s, full_gib = cuda_time(lambda: model(**inputs), args.repeats)
        rows.append(("DiT full step (60 blocks, CFG batch 2)", full_s, full_gib))
        _, cache = model(**inputs, return_block_cache=True)
        cached_s, cached_gib = cuda_time(lambda: model(**inputs, block_cache=cache), args.repeats)
        rows.append(("DiT cached step (last single block)", cached_s, cached_gib))
        del cache

    del model, inputs
    torch.cuda.empty_cache()
    vae = enable_official_tiling(build_vae().to(device=device, dtype=torch.float16).eval().requires_grad_(False))
    latents = torch.randn(1, 16, WINDOW_LATENTS, args.height // 8, args.width // 8, device=device)
    frames = WindowPlan(129).output_frames

    def decode() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            for _ in decode_latents_in_chunks(vae, latents, frames):
                pass

    decode_s, decode_gib = cuda_time(decode, max(1, args.repeats - 1))
    rows.append((f"VAE decode {WINDOW_LATENTS} latents -> {frames} frames (streamed)", decode_s, decode_gib))

    n, cached = 50, len(cached_steps(50))
    per_window = (n - cached) * full_s + cached * cached_s
    print(f"device: {torch.cuda.get_device_name()}  |  {args.height}x{args.width}, backend {args.backend}, "
          f"fp8 {args.fp8}  |  DiT weights {weights_gib:.1f} GiB, built in {build_s:.0f} s")
    print(f"{'stage':<52}{'seconds':>10}{'peak GiB':>10}")
    for name, seconds, gib in rows:
        print(f"{name:<52}{seconds:>10.3f}{gib:>10.1f}")
    print(f"{f'50 steps of one window ({n - cached} full + {cached} cached)':<52}{per_window:>10.1f}")


if __name__ == "__main__":
    main()
