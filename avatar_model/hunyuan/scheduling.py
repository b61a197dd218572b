"""The HunyuanVideo-Avatar sampling schedule as pure functions of the step count.

Everything the official sampler hard-codes for 50 steps (sigma table, two-phase CFG, face-mask factor, the
"deepcache" step list, the shifted circular windows) is expressed here as a function of ``num_inference_steps``
or of the audio frame count, so the denoise loop in ``pipeline.py`` only asks questions of this module.
"""

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

FLOW_SHIFT = 5.0
TEXT_PHASE_STEPS = 10  # steps < 10 run text+audio CFG, later steps audio-only CFG
AUDIO_CFG_RAMP = (6.5, 3.5)  # guidance of the audio-only phase, from 6.5 at step 0 to 3.5 at step n
EARLY_FACE_MASK_SCALE = 0.6
CACHE_WARMUP_FRACTION = 0.3  # steps ≤ 0.3·n always run the full model (0..15 for n = 50)
CACHE_TAIL_FRACTION = 0.8  # steps ≥ 0.8·n always run the full model (40..49 for n = 50)
CACHE_REFRESH_EVERY = 5  # in between, one full step every 5 refreshes the block cache

WINDOW_LATENTS = 33  # latent frames per DiT call (129 video frames)
WINDOW_SHIFT = 10  # window seams move by this many latent frames after every step
SHORT_AUDIO_FRAMES = 129  # audio up to this many frames is padded to it and runs as a single window
LONG_AUDIO_PAD_FRAMES = 5  # longer audio gets this many zero frames appended
VAE_TIME_RATIO = 4


# ----------------------------------------------------------------------------------------------- sigmas


def flow_sigmas(num_inference_steps: int, shift: float = FLOW_SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """Official flow-matching table: σ = linspace(1, 0, n+1), σ' = shift·σ / (1 + (shift−1)·σ).

    Returns ``(sigmas [n+1], timesteps [n])`` in float32, timesteps = σ'[:-1]·1000 (the DiT's ``t`` input).
    Computed in torch float32 in the official operation order, so values are bit-identical to the original.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")
    sigmas = torch.linspace(1, 0, num_inference_steps + 1)
    sigmas = (shift * sigmas) / (1 + (shift - 1) * sigmas)
    return sigmas, sigmas[:-1] * 1000.0


def flow_match_scheduler(
    num_inference_steps: int, shift: float = FLOW_SHIFT, device: torch.device | str | None = None
) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' ``FlowMatchEulerDiscreteScheduler(shift=5)`` set to the official schedule.

    Its default spacing differs from the official one; passing the unshifted ``linspace(1, 0, n+1)[:-1]`` as explicit
    sigmas makes ``scheduler.sigmas`` / ``scheduler.timesteps`` equal :func:`flow_sigmas` (pinned by a unit test).
    """
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    set_official_timesteps(scheduler, num_inference_steps, device)
    return scheduler


def set_official_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler, num_inference_steps: int, device: torch.device | str | None = None
) -> None:
    """Set ``scheduler`` (built with ``shift=5``) to the official table via explicit unshifted sigmas."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, num_inference_steps + 1)[:-1].numpy(), device=device)


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, i: int) -> torch.Tensor:
    """One flow-matching Euler step in float32: x ← x + v·(σ[i+1] − σ[i])."""
    dt = (sigmas[i + 1] - sigmas[i]).to(device=sample.device, dtype=torch.float32)
    return sample.float() + velocity.float() * dt


# ----------------------------------------------------------------------------------------------- guidance


def uses_text_cfg(i: int, text_phase_steps: int = TEXT_PHASE_STEPS) -> bool:
    """Steps < 10 guide on text+audio (negative prompt in the uncond half); later steps on audio only."""
    return i < text_phase_steps


def guidance_scale(
    i: int,
    n: int,
    cfg: float = 7.5,
    text_phase_steps: int = TEXT_PHASE_STEPS,
    ramp: tuple[float, float] = AUDIO_CFG_RAMP,
) -> float:
    """Time-varying CFG scale: (1−i/n)(cfg−2)+2 in the text phase, then (1−i/n)(ramp₀−ramp₁)+ramp₁ (ignores cfg)."""
    if uses_text_cfg(i, text_phase_steps):
        return (1 - i / n) * (cfg - 2) + 2
    high, low = ramp
    return (1 - i / n) * (high - low) + low


def face_mask_scale(i: int, text_phase_steps: int = TEXT_PHASE_STEPS) -> float:
    """The face mask is scaled by 0.6 in both CFG halves during the text phase, 1.0 afterwards."""
    return EARLY_FACE_MASK_SCALE if uses_text_cfg(i, text_phase_steps) else 1.0


def cached_steps(n: int, text_phase_steps: int = TEXT_PHASE_STEPS) -> frozenset[int]:
    """Steps that reuse the block cache (only the last single block runs) instead of the full DiT.

    Rule: with ``w = round(0.3·n)`` and ``e = round(0.8·n)``, step i is full when ``i ≤ w``, ``i ≥ e``,
    ``(i − w) % 5 == 0`` or ``i == text_phase_steps`` (the conditioning changes there, so the cache must be
    refreshed); every other step is cached. For n = 50 this is the official hard-coded list: full 0–15, 20, 25,
    30, 35, 40–49; cached 16–19, 21–24, 26–29, 31–34, 36–39.
    """
    warmup_end = int(CACHE_WARMUP_FRACTION * n + 0.5)
    tail_start = int(CACHE_TAIL_FRACTION * n + 0.5)
    return frozenset(
        i
        for i in range(n)
        if warmup_end < i < tail_start and (i - warmup_end) % CACHE_REFRESH_EVERY and i != text_phase_steps
    )


# ----------------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """One DiT call: which latent frames and which audio frames it covers (both circular)."""

    latent_index: torch.Tensor  # [33] long, into the infer_length latent buffer
    audio_index: torch.Tensor  # [129] long, into the 4·infer_length audio buffer


@dataclass(frozen=True)
class WindowPlan:
    """Time layout of one clip: padding, denoised length, kept length and the shifted circular windows.

    ``audio_frames`` is the real number of 25 fps frames of the audio (no cap). Official arithmetic:
    A = 129 when F ≤ 129 else F + 5; infer_length = (A//128 + 1)·32 + 1 (forced to 33 when A ≤ 129);
    kept latents = A//4 + 1; output = F frames.
    """

    audio_frames: int
    window: int = WINDOW_LATENTS
    shift_offset: int = WINDOW_SHIFT

    def __post_init__(self) -> None:
        if self.audio_frames < 1:
            raise ValueError(f"audio_frames must be ≥ 1, got {self.audio_frames}")

    @property
    def padded_audio_frames(self) -> int:
        """A: the audio feature length after zero padding."""
        if self.audio_frames <= SHORT_AUDIO_FRAMES:
            return SHORT_AUDIO_FRAMES
        return self.audio_frames + LONG_AUDIO_PAD_FRAMES

    @property
    def is_single_window(self) -> bool:
        return self.padded_audio_frames <= SHORT_AUDIO_FRAMES

    @property
    def noise_length(self) -> int:
        """Latent frames the initial noise is drawn for: the unforced infer length (65 for short audio)."""
        return (self.padded_audio_frames // 128 + 1) * 32 + 1

    @property
    def infer_length(self) -> int:
        """Latent frames actually denoised (circular buffer)."""
        return self.window if self.is_single_window else self.noise_length

    @property
    def audio_buffer_frames(self) -> int:
        """Audio frames in the circular audio buffer (zero padded): 4·infer_length."""
        return VAE_TIME_RATIO * self.infer_length

    @property
    def kept_latents(self) -> int:
        """Latent frames decoded at the end: (A//4·4 + 1 − 1)//4 + 1."""
        return (self.padded_audio_frames // VAE_TIME_RATIO * VAE_TIME_RATIO) // VAE_TIME_RATIO + 1

    @property
    def decoded_frames(self) -> int:
        return (self.kept_latents - 1) * VAE_TIME_RATIO + 1

    @property
    def output_frames(self) -> int:
        """Frames delivered after trimming: exactly the audio frame count."""
        return self.audio_frames

    @property
    def num_windows(self) -> int:
        return -(-self.infer_length // self.window)

    @property
    def window_frames(self) -> int:
        """Video (audio) frames per window: 4·33 − 3 = 129."""
        return VAE_TIME_RATIO * (self.window - 1) + 1

    def shift(self, step: int) -> int:
        """Window shift at ``step``: starts at 0, then ``shift = (shift + 10) mod 33`` after every step."""
        offset = 0 if self.is_single_window else self.shift_offset
        return (step * offset) % self.window

    def windows(self, step: int) -> list[Window]:
        """Windows of ``step``: starts s = k·33 − shift, latents (s … s+32) mod L, audio (4s … 4s+128) mod 4L."""
        return [self._window(k * self.window - self.shift(step)) for k in range(self.num_windows)]

    def _window(self, start: int) -> Window:
        return Window(
            latent_index=(start + torch.arange(self.window)) % self.infer_length,
            audio_index=(VAE_TIME_RATIO * start + torch.arange(self.window_frames)) % self.audio_buffer_frames,
        )
