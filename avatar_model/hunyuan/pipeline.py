"""HunyuanVideo-Avatar sampler: portrait + speech + prompt → streamed video frames.

Recipe (diffusers style): ``check_inputs`` → ``encode_prompt`` (prompt and negative prompt, both with the portrait)
→ ``encode_audio`` (whisper windows) → ``prepare_face_mask`` → ``prepare_reference_latents`` → ``prepare_latents``
(seeded noise) → ``set_timesteps`` → ``denoise`` (shifted circular 33-latent windows, two-phase CFG, last-block
step cache) → ``decode`` (a lazy iterator of uint8 frame chunks). The schedule itself lives in ``scheduling.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
from diffusers.hooks import apply_group_offloading
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import WhisperFeatureExtractor, WhisperModel

from common.errors import InvalidParameter
from avatar_model.hunyuan import prompts
from avatar_model.hunyuan.audio_features import audio_frame_count, audio_windows, encode_whisper, samples_per_frame
from avatar_model.hunyuan.audio_features import whisper_input_features
from avatar_model.hunyuan.face_detector import face_mask, latent_face_mask
from avatar_model.hunyuan.scheduling import (
    WindowPlan,
    cached_steps,
    euler_step,
    face_mask_scale,
    guidance_scale,
    set_official_timesteps,
    uses_text_cfg,
)
from avatar_model.hunyuan.text_encoders import AvatarTextEncoder, TextConditioning, llava_pixels
from avatar_model.hunyuan.transformer import AvatarTransformer3DModel, TokenGrid
from avatar_model.hunyuan.vae import decode_latents_in_chunks, enable_official_tiling, encode_reference

FaceLocator = Callable[[np.ndarray], Sequence[float]]  # RGB uint8 [H, W, 3] -> face box (x, y, w, h) in pixels

ATTENTION_BACKENDS = {"sdpa": "native", "flash": "flash"}  # pipeline name -> transformer backend name
REFERENCE_FRAMES = 129  # the portrait is held still for one window of video frames before VAE encoding
MOTION_EXP = 30.0  # official hard-coded "motion_bucket_id_exps"
MOTION_POSE = 25.0  # official hard-coded "motion_bucket_id_heads"
FACE_BOX_SCALE = 3.0  # the face box is enlarged 3x around its centre before it becomes the audio mask


@dataclass(frozen=True)
class AvatarPipelineConfig:
    """Numerics and memory knobs. Defaults suit CPU; ``for_device`` gives the official GPU dtypes."""

    dtype: torch.dtype = torch.float32  # DiT compute dtype (weights and autocast); bf16 on GPU
    latent_dtype: torch.dtype = torch.float32  # latent buffer, noise, audio and reference tensors; fp16 on GPU
    parity_rounding: bool = True  # round each window's Euler result to bf16 before accumulating (official)
    step_cache: bool = True  # official last-block cache on `cached_steps(n)`; False runs every step in full
    cache_device: str | None = None  # where the per-frame block cache lives (None: the execution device)
    vae_tiling: bool = True  # official tiles: 256 px / 64 frames with 25 % overlap
    attention_backend: str = "sdpa"  # "sdpa" (torch) or "flash" (flash-attn varlen, the official kernel)
    fps: float = 25.0

    @classmethod
    def for_device(cls, device: torch.device | str, **overrides) -> AvatarPipelineConfig:
        """bf16 DiT with fp16 latents on accelerators (official), fp32 everywhere on CPU. On accelerators the block
        cache (≈26 MB per latent frame at 704×768) is kept in CPU memory: it is touched on 5 + 20 of 50 steps, so
        the copies cost ~1 % while accelerator memory stops growing with the audio length."""
        if torch.device(device).type == "cpu":
            return cls(**overrides)
        return cls(**{"dtype": torch.bfloat16, "latent_dtype": torch.float16, "cache_device": "cpu", **overrides})


@dataclass
class AvatarOutput:
    """A generated clip: ``frames`` yields uint8 chunks (n, H, W, 3) as the VAE decodes them (single use)."""

    frames: Iterator[np.ndarray]
    num_frames: int
    height: int
    width: int
    fps: float


@dataclass(frozen=True)
class CfgInputs:
    """The step-dependent conditioning of a CFG batch [uncond, cond]."""

    text_states: torch.Tensor  # [2, L, Dt]
    text_mask: torch.Tensor  # [2, L]
    pooled: torch.Tensor  # [2, D2]
    face_mask: torch.Tensor  # [2, 1, 1, h, w]


@dataclass(frozen=True)
class Conditioning:
    """Everything the denoise loop feeds the DiT besides the window latents, timestep and window audio."""

    positive: TextConditioning  # prompt (with prefix) + portrait
    negative: TextConditioning  # negative prompt + portrait
    face_mask: torch.Tensor  # [1, 1, 1, h, w]
    ref_latents: torch.Tensor  # [2, C, 33, h, w]
    uncond_audio: torch.Tensor  # [1, 129, 10, 5, 384] zeros
    motion_exp: torch.Tensor  # [2, 4]
    motion_pose: torch.Tensor  # [2, 4]
    fps: torch.Tensor  # [2]

    def cfg_inputs(self, i: int) -> CfgInputs:
        """Step i's [uncond, cond] text and mask: negative vs positive prompt with the face mask x0.6 in the text
        phase (i < 10), positive vs positive (audio-only guidance) with the full mask afterwards."""
        uncond = self.negative if uses_text_cfg(i) else self.positive
        face = self.face_mask * face_mask_scale(i)
        return CfgInputs(
            text_states=torch.cat([uncond.text_states, self.positive.text_states]),
            text_mask=torch.cat([uncond.text_mask, self.positive.text_mask]),
            pooled=torch.cat([uncond.pooled, self.positive.pooled]),
            face_mask=torch.cat([face, face]),
        )


class BlockCache:
    """The official step cache: the hidden state entering the last single block, filed per latent frame.

    On a full step each window stores its video tokens per latent index, and its reference-frame and text tokens
    under every index it covers (later windows overwrite). A cached step re-assembles a shifted window from the
    video tokens of its own indices plus the reference/text tokens filed under its first index.
    """

    def __init__(self, grid: TokenGrid, num_latents: int, device: torch.device):
        self.grid, self.device = grid, device
        self.video: torch.Tensor | None = None  # [B, num_latents, h·w, D]
        self.ref: list[torch.Tensor | None] = [None] * num_latents  # per latent index: [B, h·w, D]
        self.text: list[torch.Tensor | None] = [None] * num_latents  # per latent index: [B, L, D]

    def store(self, index: torch.Tensor, cache: torch.Tensor) -> None:
        ref, video, text = self.grid.split_cache(cache)  # [B, h·w, D], [B, 33, h·w, D], [B, L, D]
        if self.video is None:
            self.video = video.new_zeros((video.shape[0], len(self.ref), *video.shape[2:]), device=self.device)
        self.video[:, index.to(self.device)] = video.to(self.device)
        ref, text = ref.to(self.device, copy=True), text.to(self.device, copy=True)
        for j in index.tolist():
            self.ref[j], self.text[j] = ref, text

    def clear(self) -> None:
        self.video = None
        self.ref = [None] * len(self.ref)
        self.text = [None] * len(self.text)

    def gather(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        first = int(index[0])
        video = self.video[:, index.to(self.device)]
        return self.grid.join_cache(self.ref[first], video, self.text[first]).to(device)  # [B, N, D]


class AvatarPipeline:
    """Audio-driven portrait animation with the HunyuanVideo-Avatar DiT."""

    def __init__(
        self,
        transformer: AvatarTransformer3DModel,
        vae: AutoencoderKLHunyuanVideo,
        text_encoder: AvatarTextEncoder,
        whisper: WhisperModel,
        feature_extractor: WhisperFeatureExtractor,
        face_locator: FaceLocator,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        config: AvatarPipelineConfig | None = None,
        device: torch.device | str = "cpu",
    ):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.whisper, self.feature_extractor, self.face_locator = whisper, feature_extractor, face_locator
        self.scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=5.0)
        self.config = config or AvatarPipelineConfig()
        self.device = torch.device(device)
        self.offload = False
        if self.config.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {sorted(ATTENTION_BACKENDS)}")
        self.transformer.set_attention_backend(ATTENTION_BACKENDS[self.config.attention_backend])
        if self.config.vae_tiling:
            enable_official_tiling(self.vae)
        else:
            self.vae.disable_tiling()

    # ------------------------------------------------------------------------------------------- memory

    def enable_group_offload(
        self, onload_device: torch.device | str | None = None, num_blocks_per_group: int = 1, use_stream: bool = False
    ) -> None:
        """Keep the DiT in CPU memory and stream it to the execution device (``onload_device``, default the current
        one) a block group at a time with diffusers' group-offloading hooks; the text encoders, Whisper and the VAE
        move to the device only while they run. ``use_stream`` overlaps transfers with compute on CUDA."""
        self.device = torch.device(onload_device or self.device)
        self.transformer.to("cpu")
        apply_group_offloading(
            self.transformer,
            onload_device=self.device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=num_blocks_per_group,
            use_stream=use_stream,
        )
        for module in (self.text_encoder.llava, self.text_encoder.clip, self.whisper, self.vae):
            module.to("cpu")
        self.offload = True

    @contextlib.contextmanager
    def _onloaded(self, *modules: nn.Module):
        """With offloading on, hold ``modules`` on the execution device for the duration of the block."""
        if not self.offload:
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.config.dtype, enabled=self.config.dtype != torch.float32)

    # ------------------------------------------------------------------------------------------- steps

    def check_inputs(self, portrait: np.ndarray, audio_16k: np.ndarray, prompt: str, num_inference_steps: int) -> None:
        if not (isinstance(portrait, np.ndarray) and portrait.dtype == np.uint8 and portrait.ndim == 3):
            raise InvalidParameter("portrait must be an RGB uint8 array [H, W, 3]")
        height, width, channels = portrait.shape
        if channels != 3 or height % 16 or width % 16:
            raise InvalidParameter(
                f"portrait must be [H, W, 3] with H and W multiples of 16 (a resolution bucket), got {portrait.shape}"
            )
        if not isinstance(audio_16k, np.ndarray) or audio_16k.ndim != 1:
            raise InvalidParameter("audio_16k must be mono samples [n] at 16 kHz")
        if len(audio_16k) < samples_per_frame(self.config.fps):
            raise InvalidParameter(f"audio is shorter than one video frame ({len(audio_16k)} samples)")
        if not isinstance(prompt, str):
            raise InvalidParameter("prompt must be a string")
        if num_inference_steps < 1:
            raise InvalidParameter(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")

    def encode_prompt(
        self, prompt: str, negative_prompt: str, portrait: np.ndarray
    ) -> tuple[TextConditioning, TextConditioning]:
        """Positive (prefixed) and negative prompt, each encoded by LLaVA together with the portrait, and by CLIP."""
        pixels = llava_pixels(portrait)  # [1, 3, 336, 336]
        with self._onloaded(self.text_encoder.llava, self.text_encoder.clip):
            positive = self.text_encoder.encode(prompts.user_prompt(prompt), pixels)
            negative = self.text_encoder.encode(negative_prompt, pixels)
        return positive, negative

    def encode_audio(self, audio_16k: np.ndarray, plan: WindowPlan) -> torch.Tensor:
        """Whisper windows of every audio frame, zero-padded to the circular buffer: [1, 4·L, 10, 5, 384]."""
        features = whisper_input_features(audio_16k, self.feature_extractor)  # [1, 80, 3000·k]
        with self._onloaded(self.whisper):
            hidden = encode_whisper(self.whisper, features)  # [1, 1500·k, 5, 384] fp32
        # windowing is a gather, so casting first gives the official values at a fraction of the memory
        frames = audio_windows(hidden.to(self.config.latent_dtype), plan.audio_frames, self.config.fps)
        padding = frames.new_zeros((1, plan.audio_buffer_frames - plan.audio_frames, *frames.shape[2:]))
        return torch.cat([frames, padding], dim=1).to(self.device)

    def prepare_face_mask(self, portrait: np.ndarray) -> torch.Tensor:
        """The 3x face box as a soft mask on the latent grid: [1, 1, 1, H/8, W/8]."""
        height, width = portrait.shape[:2]
        mask = face_mask(self.face_locator(portrait), height, width, area=FACE_BOX_SCALE)  # [1, 1, 1, H, W]
        latent_hw = (height // self.vae.spatial_compression_ratio, width // self.vae.spatial_compression_ratio)
        return latent_face_mask(mask, latent_hw).to(self.device, self.config.latent_dtype)

    def prepare_reference_latents(self, portrait: np.ndarray, seed: int) -> torch.Tensor:
        """The portrait held for 129 frames, VAE-encoded, posterior sampled: [1, C, 33, H/8, W/8].

        The posterior sample uses its own generator seeded with ``seed`` (the official code uses the global RNG), so
        the noise generator's first draw stays the initial noise, as officially.
        """
        with self._onloaded(self.vae):
            generator = torch.Generator(self.vae.device).manual_seed(seed)
            latents = encode_reference(self.vae, portrait, REFERENCE_FRAMES, generator)
        return latents.to(self.device, self.config.latent_dtype)

    def prepare_latents(
        self, plan: WindowPlan, ref_latents: torch.Tensor, seed: int, latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Initial noise [1, C, L, h, w]. As officially it is drawn for the unforced length (65 latents for short
        audio) in the latent dtype and then cut to the denoised length."""
        batch, channels, _, height, width = ref_latents.shape
        if latents is not None:
            expected = (batch, channels, plan.infer_length, height, width)
            if tuple(latents.shape) != expected:
                raise InvalidParameter(f"latents must have shape {expected}, got {tuple(latents.shape)}")
            return latents.to(self.device, self.config.latent_dtype)
        generator = torch.Generator(self.device).manual_seed(seed)
        shape = (batch, channels, plan.noise_length, height, width)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.config.latent_dtype)
        return noise[:, :, : plan.infer_length]

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        set_official_timesteps(self.scheduler, num_inference_steps, self.device)
        return self.scheduler.timesteps

    def build_conditioning(
        self,
        positive: TextConditioning,
        negative: TextConditioning,
        face: torch.Tensor,
        ref_latents: torch.Tensor,
        plan: WindowPlan,
    ) -> Conditioning:
        def on_device(text: TextConditioning) -> TextConditioning:
            return TextConditioning(*(x.to(self.device) for x in (text.text_states, text.text_mask, text.pooled)))

        audio_shape = (1, plan.window_frames, *self.transformer.config.audio_feature_shape)
        motion_values = self.transformer.config.motion_values
        return Conditioning(
            positive=on_device(positive),
            negative=on_device(negative),
            face_mask=face,
            ref_latents=torch.cat([ref_latents] * 2),
            uncond_audio=torch.zeros(audio_shape, device=self.device, dtype=self.config.latent_dtype),
            motion_exp=torch.full((2, motion_values), MOTION_EXP, device=self.device),
            motion_pose=torch.full((2, motion_values), MOTION_POSE, device=self.device),
            fps=torch.full((2,), self.config.fps, device=self.device),
        )

    def predict_velocity(
        self,
        latents: torch.Tensor,  # [1, C, 33, h, w]
        timestep: torch.Tensor,  # [] σ·1000
        cfg: CfgInputs,
        cond: Conditioning,
        audio: torch.Tensor,  # [1, 129, 10, 5, 384]
        block_cache: torch.Tensor | None,
        return_block_cache: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The one DiT call site: a CFG batch [uncond, cond] → velocities [2, C, 33, h, w] (+ the block cache)."""
        with self._autocast():
            out = self.transformer(
                hidden_states=torch.cat([latents] * 2),
                timestep=timestep.expand(2),
                text_states=cfg.text_states,
                text_mask=cfg.text_mask,
                text_states_2=cfg.pooled,
                ref_latents=cond.ref_latents,
                audio_prompts=torch.cat([cond.uncond_audio, audio]),
                face_mask=cfg.face_mask,
                motion_exp=cond.motion_exp,
                motion_pose=cond.motion_pose,
                fps=cond.fps,
                block_cache=block_cache,
                return_block_cache=return_block_cache,
            )
        return out if return_block_cache else (out, None)

    def denoise(
        self,
        latents: torch.Tensor,  # [1, C, L, h, w]
        audio: torch.Tensor,  # [1, 4·L, 10, 5, 384]
        cond: Conditioning,
        plan: WindowPlan,
        cfg_scale: float,
    ) -> torch.Tensor:
        """Flow-matching Euler over shifted circular windows; each step averages the windows' Euler results."""
        sigmas, timesteps = self.scheduler.sigmas, self.scheduler.timesteps
        n = len(timesteps)
        cached = cached_steps(n) if self.config.step_cache else frozenset()
        grid = self.transformer.token_grid(plan.window, *latents.shape[-2:])
        cache = BlockCache(grid, plan.infer_length, torch.device(self.config.cache_device or self.device))
        for i, t in enumerate(timesteps):
            cfg, g = cond.cfg_inputs(i), guidance_scale(i, n, cfg_scale)
            store = i not in cached and i + 1 in cached  # full step before a cached run: every window files its cache
            total = torch.zeros_like(latents)
            visits = torch.zeros(plan.infer_length, device=latents.device, dtype=latents.dtype)
            for window in plan.windows(i):
                index = window.latent_index.to(latents.device)
                x = latents[:, :, index]  # [1, C, 33, h, w]
                block_cache = cache.gather(window.latent_index, self.device) if i in cached else None
                v, new_cache = self.predict_velocity(
                    x, t, cfg, cond, audio[:, window.audio_index.to(audio.device)], block_cache, store
                )
                if new_cache is not None:
                    cache.store(window.latent_index, new_cache)
                v_uncond, v_cond = v.chunk(2)
                x = euler_step(x, v_uncond + g * (v_cond - v_uncond), sigmas, i)  # fp32
                if self.config.parity_rounding:
                    x = x.to(torch.bfloat16)
                total[:, :, index] = (total[:, :, index].float() + x.float()).to(total.dtype)
                visits[index] += 1
            latents = total / visits.view(1, 1, -1, 1, 1)
            if i not in cached and not store:
                cache.clear()  # nothing reads it before the next store
        return latents

    def decode(self, latents: torch.Tensor, num_frames: int) -> Iterator[np.ndarray]:
        """Stream uint8 frame chunks (n, H, W, 3) from the VAE, trimmed to ``num_frames``."""
        with self._onloaded(self.vae):
            yield from decode_latents_in_chunks(self.vae, latents.float(), num_frames)

    # ------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    def generate_latents(
        self,
        portrait: np.ndarray,
        audio_16k: np.ndarray,
        prompt: str,
        seed: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str = prompts.NEGATIVE_PROMPT,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Denoise: the latents that cover the audio [1, C, A//4 + 1, H/8, W/8] and the video frame count.

        Split from decoding so a batch pipeline can cache the expensive half and decode (or retry decoding) apart.
        ``latents`` optionally replaces the seeded initial noise ([1, 16, L, H/8, W/8], L = the plan's infer length).
        """
        self.check_inputs(portrait, audio_16k, prompt, num_inference_steps)
        plan = WindowPlan(audio_frame_count(len(audio_16k), self.config.fps))

        # 1. Conditioning: text (+ portrait for LLaVA), audio windows, face mask, reference latents
        positive, negative = self.encode_prompt(prompt, negative_prompt, portrait)
        audio = self.encode_audio(audio_16k, plan)  # [1, 4·L, 10, 5, 384]
        face = self.prepare_face_mask(portrait)  # [1, 1, 1, h, w]
        ref_latents = self.prepare_reference_latents(portrait, seed)  # [1, C, 33, h, w]

        # 2. Noise and schedule
        latents = self.prepare_latents(plan, ref_latents, seed, latents)  # [1, C, L, h, w]
        self.set_timesteps(num_inference_steps)
        cond = self.build_conditioning(positive, negative, face, ref_latents, plan)

        # 3. Denoise; keep the latents that cover the audio
        latents = self.denoise(latents, audio, cond, plan, guidance_scale)
        return latents[:, :, : plan.kept_latents].clone(), plan.output_frames

    def __call__(self, portrait: np.ndarray, audio_16k: np.ndarray, prompt: str, seed: int, **options) -> AvatarOutput:
        """Animate ``portrait`` (RGB uint8 [H, W, 3], H and W multiples of 16) to ``audio_16k`` (mono float, 16 kHz).

        Denoising runs now (``options`` as in `generate_latents`); the returned ``frames`` iterator decodes lazily,
        one VAE tile at a time.
        """
        latents, num_frames = self.generate_latents(portrait, audio_16k, prompt, seed, **options)
        height, width = portrait.shape[:2]
        return AvatarOutput(self.decode(latents, num_frames), num_frames, height, width, self.config.fps)
