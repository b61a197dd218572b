"""HunyuanVideo-Avatar sampler: portrait + speech + prompt → streamed video frames.

Recipe (diffusers style), in two halves so a batch pipeline can cache the first and run each step with only the
component it needs. ``condition`` (seed-free, compact): ``check_inputs`` → ``locate_face`` → ``encode_prompt``
(prompt and negative prompt, both with the portrait) → ``encode_whisper`` → ``encode_reference_posterior``.
``sample`` (DiT only): ``audio_windows`` → ``prepare_face_mask`` → ``sample_reference_latents`` →
``prepare_latents`` (seeded noise) → ``set_timesteps`` → ``denoise`` (shifted circular 33-latent windows, two-phase
CFG, last-block step cache). Then ``decode`` (a lazy iterator of uint8 frame chunks). The schedule lives in
``scheduling.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import WhisperFeatureExtractor, WhisperModel

from avatar_model.face.detector import FaceBox
from avatar_model.face.mask import face_mask, latent_face_mask
from avatar_model.hunyuan import audio_features, prompts
from avatar_model.hunyuan.audio_features import audio_frame_count, samples_per_frame, whisper_input_features
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
from avatar_model.hunyuan.vae import (
    SPATIAL_COMPRESSION,
    ReferencePosterior,
    decode_latents_in_chunks,
    enable_official_tiling,
    encode_reference_posterior,
)
from common.errors import InvalidParameter

FaceLocator = Callable[[np.ndarray], FaceBox]  # RGB uint8 [H, W, 3] -> the face; raises FaceNotFound
StepCallback = Callable[["AvatarPipeline", int, torch.Tensor, torch.Tensor], object]  # (pipeline, i, t, latents)

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
    vae_tiling: bool = True  # spatial VAE tiles of `vae_tile_px` with 25 % overlap; temporal tiles: official 64 frames
    vae_tile_px: int = 256  # spatial tile (official 256, stride 3/4 of it); smaller tiles lower the VAE's peak memory
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


@dataclass(frozen=True)
class WhisperEncoder:
    """Whisper-tiny and its log-mel front end, loaded and released together as the "whisper" component."""

    model: WhisperModel
    feature_extractor: WhisperFeatureExtractor


@dataclass(frozen=True)
class PrecomputedConditioning:
    """Everything `sample` reads besides the seed and the schedule, in its compact seed-free form (Whisper states, not
    per-frame windows; the VAE posterior, not a sample), so a batch pipeline can cache it per input."""

    positive: TextConditioning  # prompt (with prefix) + portrait
    negative: TextConditioning  # negative prompt + portrait
    whisper_hidden: torch.Tensor  # [1, 1500·k, 5, 384] fp32
    reference: ReferencePosterior  # of the portrait held for 129 frames
    face: FaceBox
    height: int  # portrait pixels
    width: int
    audio_frames: int  # video frames the audio covers


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
    """Audio-driven portrait animation with the HunyuanVideo-Avatar DiT.

    Every component may be None, so a stage builds a pipeline with only what its steps need; a step that needs a
    missing one raises a RuntimeError naming it. Components may be shared by several pipelines
    (`resident.ResidentModels`), so each step sets this pipeline's per-call settings (attention backend, VAE tiles)
    on the component it runs. ``offload``: the encoders and the VAE rest in CPU memory and are on ``device`` only
    while they run (with a group-offloaded DiT, the official "GPU-poor" path).
    """

    def __init__(
        self,
        *,
        transformer: AvatarTransformer3DModel | None = None,
        vae: AutoencoderKLHunyuanVideo | None = None,
        text_encoder: AvatarTextEncoder | None = None,
        whisper: WhisperEncoder | None = None,
        face_locator: FaceLocator | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        config: AvatarPipelineConfig | None = None,
        device: torch.device | str = "cpu",
        offload: bool = False,
    ):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.whisper, self.face_locator = whisper, face_locator
        self.scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=5.0)
        self.config = config or AvatarPipelineConfig()
        self.device = torch.device(device)
        self.offload = offload
        if self.config.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {sorted(ATTENTION_BACKENDS)}")
        if vae is not None and vae.spatial_compression_ratio != SPATIAL_COMPRESSION:
            raise ValueError(f"the DiT reads latents at 1/{SPATIAL_COMPRESSION} of the pixels, this VAE gives "
                             f"1/{vae.spatial_compression_ratio}")

    # ------------------------------------------------------------------------------------------- components

    def _require(self, component: str, step: str):
        value = getattr(self, component)
        if value is None:
            raise RuntimeError(f"{step} needs the {component!r} component, which this pipeline was built without")
        return value

    def _tiled(self, vae: AutoencoderKLHunyuanVideo) -> AutoencoderKLHunyuanVideo:
        """The VAE with this pipeline's tiles: the official temporal tiles always, spatial ones when tiling is on."""
        enable_official_tiling(vae, self.config.vae_tile_px)
        if not self.config.vae_tiling:
            vae.disable_tiling()  # spatial only: diffusers keeps the temporal tiles
        return vae

    @contextlib.contextmanager
    def _onloaded(self, *modules: nn.Module):
        """Hold ``modules`` on the execution device for the block (a no-op where they already are: a shared module
        may rest elsewhere) and, with offloading on, put them back in CPU memory afterwards."""
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                for module in modules:
                    module.to("cpu")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.config.dtype, enabled=self.config.dtype != torch.float32)

    # ------------------------------------------------------------------------------------------- conditioning

    def check_inputs(self, portrait: np.ndarray, audio_16k: np.ndarray, prompt: str) -> None:
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

    @staticmethod
    def _check_steps(num_inference_steps: int) -> None:
        if num_inference_steps < 1:
            raise InvalidParameter(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")

    def locate_face(self, portrait: np.ndarray) -> FaceBox:
        """The face the audio mask is centred on; raises `FaceNotFound` when there is none."""
        return self._require("face_locator", "locate_face")(portrait)

    def encode_prompt(
        self, prompt: str, negative_prompt: str, portrait: np.ndarray
    ) -> tuple[TextConditioning, TextConditioning]:
        """Positive (prefixed) and negative prompt, each encoded by LLaVA together with the portrait, and by CLIP."""
        text_encoder = self._require("text_encoder", "encode_prompt")
        pixels = llava_pixels(portrait)  # [1, 3, 336, 336]
        with self._onloaded(text_encoder.llava, text_encoder.clip):
            positive = text_encoder.encode(prompts.user_prompt(prompt), pixels)
            negative = text_encoder.encode(negative_prompt, pixels)
        return positive, negative

    def encode_whisper(self, audio_16k: np.ndarray) -> torch.Tensor:
        """Whisper hidden states of every 30 s chunk: [1, 1500·k, 5, 384] fp32 (the compact form worth caching)."""
        whisper = self._require("whisper", "encode_whisper")
        features = whisper_input_features(audio_16k, whisper.feature_extractor)  # [1, 80, 3000·k]
        with self._onloaded(whisper.model):
            return audio_features.encode_whisper(whisper.model, features)

    def audio_windows(self, hidden: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """Whisper windows of every audio frame, zero-padded to the circular buffer: [1, 4·L, 10, 5, 384]."""
        # windowing is a gather, so casting first gives the official values at a fraction of the memory
        frames = audio_features.audio_windows(hidden.to(self.config.latent_dtype), plan.audio_frames, self.config.fps)
        padding = frames.new_zeros((1, plan.audio_buffer_frames - plan.audio_frames, *frames.shape[2:]))
        return torch.cat([frames, padding], dim=1).to(self.device)

    def encode_audio(self, audio_16k: np.ndarray, plan: WindowPlan) -> torch.Tensor:
        """`encode_whisper` then `audio_windows`: [1, 4·L, 10, 5, 384]."""
        return self.audio_windows(self.encode_whisper(audio_16k), plan)

    def prepare_face_mask(self, face: FaceBox, height: int, width: int) -> torch.Tensor:
        """The 3x face box of an H x W portrait as a soft mask on the latent grid: [1, 1, 1, H/8, W/8]."""
        mask = face_mask(face, height, width, area=FACE_BOX_SCALE)  # [1, 1, 1, H, W]
        latent_hw = (height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)
        return latent_face_mask(mask, latent_hw).to(self.device, self.config.latent_dtype)

    def encode_reference_posterior(self, portrait: np.ndarray) -> ReferencePosterior:
        """The VAE posterior of the portrait held for 129 frames (seed-free, so it can be cached per portrait)."""
        vae = self._tiled(self._require("vae", "encode_reference_posterior"))
        with self._onloaded(vae):
            return encode_reference_posterior(vae, portrait, REFERENCE_FRAMES)

    def sample_reference_latents(self, posterior: ReferencePosterior, seed: int) -> torch.Tensor:
        """The posterior sampled, scaled: [1, C, 33, H/8, W/8].

        The sample uses its own generator on the execution device seeded with ``seed`` (the official code uses the
        global RNG), so the noise generator's first draw stays the initial noise, as officially.
        """
        posterior = ReferencePosterior(posterior.parameters.to(self.device), posterior.scaling_factor)
        latents = posterior.sample(torch.Generator(self.device).manual_seed(seed))
        return latents.to(self.config.latent_dtype)

    def prepare_reference_latents(self, portrait: np.ndarray, seed: int) -> torch.Tensor:
        """`encode_reference_posterior` then `sample_reference_latents`: [1, C, 33, H/8, W/8]."""
        return self.sample_reference_latents(self.encode_reference_posterior(portrait), seed)

    @torch.no_grad()
    def condition(
        self, portrait: np.ndarray, audio_16k: np.ndarray, prompt: str, negative_prompt: str = prompts.NEGATIVE_PROMPT
    ) -> PrecomputedConditioning:
        """Everything `sample` needs from the raw inputs; needs the face locator, both encoders and the VAE."""
        self.check_inputs(portrait, audio_16k, prompt)
        face = self.locate_face(portrait)  # first: the cheapest step that can reject the input
        positive, negative = self.encode_prompt(prompt, negative_prompt, portrait)
        height, width = portrait.shape[:2]
        return PrecomputedConditioning(
            positive=positive,
            negative=negative,
            whisper_hidden=self.encode_whisper(audio_16k),
            reference=self.encode_reference_posterior(portrait),
            face=face,
            height=height,
            width=width,
            audio_frames=audio_frame_count(len(audio_16k), self.config.fps),
        )

    # ------------------------------------------------------------------------------------------- sampling

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

        transformer_config = self._require("transformer", "build_conditioning").config
        audio_shape = (1, plan.window_frames, *transformer_config.audio_feature_shape)
        motion_values = transformer_config.motion_values
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
        callback_on_step_end: StepCallback | None = None,
    ) -> torch.Tensor:
        """Flow-matching Euler over shifted circular windows; each step averages the windows' Euler results.

        ``callback_on_step_end(pipeline, i, t, latents)`` runs after each step, as in diffusers (for progress, or to
        stop by raising), but its return value is ignored: it cannot replace the latents.
        """
        transformer = self._require("transformer", "denoise")
        transformer.set_attention_backend(ATTENTION_BACKENDS[self.config.attention_backend])
        sigmas, timesteps = self.scheduler.sigmas, self.scheduler.timesteps
        n = len(timesteps)
        cached = cached_steps(n) if self.config.step_cache else frozenset()
        grid = transformer.token_grid(plan.window, *latents.shape[-2:])
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
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, latents)
        return latents

    @torch.no_grad()
    def sample(
        self,
        precomputed: PrecomputedConditioning,
        seed: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        latents: torch.Tensor | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Denoise from precomputed conditioning (needs only the transformer): the latents that cover the audio
        [1, C, A//4 + 1, H/8, W/8] and the video frame count.

        ``latents`` optionally replaces the seeded initial noise ([1, 16, L, H/8, W/8], L = the plan's infer length).
        """
        self._check_steps(num_inference_steps)
        self._require("transformer", "sample")
        plan = WindowPlan(precomputed.audio_frames)
        audio = self.audio_windows(precomputed.whisper_hidden, plan)  # [1, 4·L, 10, 5, 384]
        face = self.prepare_face_mask(precomputed.face, precomputed.height, precomputed.width)  # [1, 1, 1, h, w]
        ref_latents = self.sample_reference_latents(precomputed.reference, seed)  # [1, C, 33, h, w]
        latents = self.prepare_latents(plan, ref_latents, seed, latents)  # [1, C, L, h, w]
        self.set_timesteps(num_inference_steps)
        cond = self.build_conditioning(precomputed.positive, precomputed.negative, face, ref_latents, plan)
        latents = self.denoise(latents, audio, cond, plan, guidance_scale, callback_on_step_end)
        return latents[:, :, : plan.kept_latents].clone(), plan.output_frames

    def decode(self, latents: torch.Tensor, num_frames: int) -> Iterator[np.ndarray]:
        """Stream uint8 frame chunks (n, H, W, 3) from the VAE, trimmed to ``num_frames``; decoding starts with the
        first chunk asked for."""
        return self._decode_chunks(self._require("vae", "decode"), latents, num_frames)

    def _decode_chunks(self, vae: AutoencoderKLHunyuanVideo, latents: torch.Tensor, num_frames: int):
        with self._onloaded(self._tiled(vae)):
            yield from decode_latents_in_chunks(vae, latents.float(), num_frames)

    # ------------------------------------------------------------------------------------------- call

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
        callback_on_step_end: StepCallback | None = None,
    ) -> tuple[torch.Tensor, int]:
        """`condition` then `sample`: the latents that cover the audio [1, C, A//4 + 1, H/8, W/8] and the frame count.

        Split from decoding so a batch pipeline can cache the expensive half and decode (or retry decoding) apart.
        """
        self._check_steps(num_inference_steps)  # before the encoders run
        precomputed = self.condition(portrait, audio_16k, prompt, negative_prompt)
        return self.sample(precomputed, seed, num_inference_steps, guidance_scale, latents, callback_on_step_end)

    def __call__(self, portrait: np.ndarray, audio_16k: np.ndarray, prompt: str, seed: int, **options) -> AvatarOutput:
        """Animate ``portrait`` (RGB uint8 [H, W, 3], H and W multiples of 16) to ``audio_16k`` (mono float, 16 kHz).

        Denoising runs now (``options`` as in `generate_latents`); the returned ``frames`` iterator decodes lazily,
        one VAE tile at a time.
        """
        latents, num_frames = self.generate_latents(portrait, audio_16k, prompt, seed, **options)
        height, width = portrait.shape[:2]
        return AvatarOutput(self.decode(latents, num_frames), num_frames, height, width, self.config.fps)
