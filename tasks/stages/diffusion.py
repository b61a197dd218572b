"""The HunyuanVideo-Avatar stages: encoders cached on what they read, then denoise and a streamed decode.

A catalog has a handful of portraits and thousands of lines, so each encoder is keyed on only its own inputs:
`encode_prompt` (LLaVA + CLIP) on the portrait bucket and the prompt, `encode_reference` (the VAE posterior of
the portrait; the seed-dependent sample is drawn in `denoise`) on the portrait bucket, `encode_audio` (Whisper)
on the audio. Tensors are cached as safetensors. Models come from the process's resident pool; every GPU stage
runs under the out-of-memory ladder of `tasks.memory`. torch is imported here only, so the preview path stays light.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avatar_model.hunyuan.prompts import NEGATIVE_PROMPT
from avatar_model.media.audio import read_wav
from common.errors import FaceNotFound

from ..memory import with_memory_ladder
from ..models import pipeline_inputs
from ..refs import (
    AudioFeaturesRef,
    AudioRef,
    LatentsRef,
    PortraitRef,
    SilentVideoRef,
    TensorsRef,
)
from . import artifacts
from .inputs import bucketed_portrait, load_portrait
from .preview import encode_silent

if TYPE_CHECKING:
    from ..config import PipelineConfig
    from ..graph import StageCall

WHISPER_RATE = 16000  # 640 samples per 25 fps frame
TEXT_FIELDS = ("text_states", "text_mask", "pooled")


def _pipeline(call: StageCall, cfg: PipelineConfig, components: tuple[str, ...]):
    inputs = pipeline_inputs(cfg)
    return call.models.pipeline(inputs.load, inputs.config, components)


def _save(call: StageCall, tensors: dict[str, Any], kind: type, **fields: Any):
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix=f"avatar-{call.stage}-") as tmp:
        local = Path(tmp) / "tensors.safetensors"
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(local))
        uri, sha256 = artifacts.store(local, call.cache_uri, call.stage, call.key)
    return kind(key=call.key, uri=uri, sha256=sha256, **fields)


def _load(call: StageCall, ref: TensorsRef) -> dict[str, Any]:
    from safetensors.torch import load_file

    return artifacts.load(ref, call.cache_uri, ".safetensors", lambda path: load_file(str(path)))


def prepare_portrait(call: StageCall) -> PortraitRef:
    """The bucketed portrait; for this backend the preset's own face locator alone decides `FaceNotFound`."""
    locate = _pipeline(call, call.cfg, ("face_locator",)).locate_face

    def locate_named(image):
        try:
            return locate(image)
        except FaceNotFound as exc:
            raise FaceNotFound(f"{call.item.portrait_uri}: {exc}") from exc

    return bucketed_portrait(call, locate_named)


def speech_16k(samples, rate: int, n_frames: int):
    """Exactly ``n_frames`` × 640 samples at 16 kHz, so the model's frame count (samples // 640) is ours."""
    import librosa
    import numpy as np

    speech = librosa.resample(samples, orig_sr=rate, target_sr=WHISPER_RATE).astype(np.float32)
    target = n_frames * WHISPER_RATE // 25
    return np.pad(speech, (0, max(0, target - len(speech))))[:target]


def encode_audio(call: StageCall) -> AudioFeaturesRef:
    """Whisper hidden states of the speech (the compact form; the per-frame windows are a gather in denoise)."""
    audio = call.input(AudioRef)
    samples, rate = artifacts.load(audio, call.cache_uri, ".wav", read_wav)
    speech = speech_16k(samples, rate, audio.n_frames)

    def attempt(cfg: PipelineConfig, mode: str) -> AudioFeaturesRef:
        hidden = _pipeline(call, cfg, ("whisper",)).encode_whisper(speech)
        return _save(call, {"hidden": hidden}, AudioFeaturesRef, n_frames=audio.n_frames, memory_mode=mode)

    return with_memory_ladder(call, ("whisper",), attempt)


def encode_prompt(call: StageCall) -> TensorsRef:
    """LLaVA (prompt + portrait) and CLIP conditioning of the prompt and of the negative prompt."""
    image = load_portrait(call, call.input(PortraitRef))

    def attempt(cfg: PipelineConfig, mode: str) -> TensorsRef:
        pipeline = _pipeline(call, cfg, ("text_encoder",))
        positive, negative = pipeline.encode_prompt(call.item.prompt or "", NEGATIVE_PROMPT, image)
        tensors = {f"{branch}.{name}": getattr(text, name)
                   for branch, text in (("positive", positive), ("negative", negative)) for name in TEXT_FIELDS}
        return _save(call, tensors, TensorsRef, memory_mode=mode)

    return with_memory_ladder(call, ("text_encoder",), attempt)


def encode_reference(call: StageCall) -> TensorsRef:
    """The VAE posterior of the portrait held still for one window (seed-free, so one entry per portrait)."""
    image = load_portrait(call, call.input(PortraitRef))

    def attempt(cfg: PipelineConfig, mode: str) -> TensorsRef:
        posterior = _pipeline(call, cfg, ("vae",)).encode_reference_posterior(image)
        return _save(call, reference_tensors(posterior), TensorsRef, memory_mode=mode)

    return with_memory_ladder(call, ("vae",), attempt)


def reference_tensors(posterior) -> dict[str, Any]:
    import torch

    return {"parameters": posterior.parameters, "scaling_factor": torch.tensor(posterior.scaling_factor)}


def denoise(call: StageCall) -> LatentsRef:
    """Seeded noise → latents over shifted circular windows, from the cached conditioning alone (DiT only)."""
    from avatar_model.hunyuan.pipeline import PrecomputedConditioning
    from avatar_model.hunyuan.text_encoders import TextConditioning
    from avatar_model.hunyuan.vae import ReferencePosterior

    portrait, features = call.input(PortraitRef), call.input(AudioFeaturesRef)
    text = _load(call, call.inputs["encode_prompt"])
    reference = _load(call, call.inputs["encode_reference"])
    precomputed = PrecomputedConditioning(
        positive=TextConditioning(*(text[f"positive.{name}"] for name in TEXT_FIELDS)),
        negative=TextConditioning(*(text[f"negative.{name}"] for name in TEXT_FIELDS)),
        whisper_hidden=_load(call, features)["hidden"],
        reference=ReferencePosterior(reference["parameters"], float(reference["scaling_factor"])),
        face=portrait.face_box,
        height=portrait.height,
        width=portrait.width,
        audio_frames=features.n_frames,
    )

    def attempt(cfg: PipelineConfig, mode: str) -> LatentsRef:
        inputs = pipeline_inputs(cfg)
        pipeline = call.models.pipeline(inputs.load, inputs.config, ("transformer",))
        latents, n_frames = pipeline.sample(precomputed, call.item.seed, inputs.steps, inputs.guidance_scale)
        return _save(call, {"latents": latents}, LatentsRef, n_frames=n_frames, width=portrait.width,
                     height=portrait.height, memory_mode=mode)

    return with_memory_ladder(call, ("transformer",), attempt)


def decode(call: StageCall) -> SilentVideoRef:
    """Tiled VAE decode streamed chunk by chunk into the H.264 encoder."""
    ref = call.input(LatentsRef)
    latents = _load(call, ref)["latents"]

    def attempt(cfg: PipelineConfig, mode: str) -> SilentVideoRef:
        frames = _pipeline(call, cfg, ("vae",)).decode(latents, ref.n_frames)
        with tempfile.TemporaryDirectory(prefix="avatar-decode-") as tmp:
            return encode_silent(call, frames, ref.n_frames, Path(tmp) / "silent.mp4", ref.width, ref.height, mode)

    return with_memory_ladder(call, ("vae",), attempt)
