"""Named pipeline builds: the released model from the official checkpoint layout, and a tiny random one for tests.

Presets are data (`PRESETS`); `load_pipeline` turns one into an `AvatarPipeline`. Nothing here downloads: the real
weights are read from a local folder in the official layout (see weights/README.md) with ``local_files_only``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    LlavaForConditionalGeneration,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from avatar_model.face.detector import detect_face
from avatar_model.hunyuan.checkpoint import load_transformer
from avatar_model.hunyuan.config import AvatarTransformerConfig
from avatar_model.hunyuan.face_detector import DetFace, pick_face
from avatar_model.hunyuan.pipeline import AvatarPipeline, AvatarPipelineConfig
from avatar_model.hunyuan.text_encoders import AvatarTextEncoder, build_tiny_text_encoder
from avatar_model.hunyuan.transformer import AvatarTransformer3DModel
from avatar_model.hunyuan.vae import TINY_VAE_CONFIG, build_vae, load_vae



@dataclass(frozen=True)
class PipelinePreset:
    """How to build one pipeline. Paths are relative to ``<weights_dir>/ckpts`` (the official MODEL_BASE layout)."""

    name: str
    description: str
    random_seed: int | None = None  # random weights from this seed instead of checkpoint files
    transformer: str = "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt"
    transformer_fp8: str = "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states_fp8.pt"
    transformer_fp8_map: str = "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states_fp8_map.pt"
    vae: str = "hunyuan-video-t2v-720p/vae/pytorch_model.pt"  # config.json beside it equals diffusers' defaults
    llava: str = "llava_llama_image"
    clip: str = "text_encoder_2"
    whisper: str = "whisper-tiny"
    face_detector: str = "det_align/detface.pt"

    def required_files(self, fp8: bool) -> list[str]:
        transformer = [self.transformer_fp8, self.transformer_fp8_map] if fp8 else [self.transformer]
        folders = [f"{name}/config.json" for name in (self.llava, self.clip, self.whisper)]
        return [*transformer, self.vae, *folders, f"{self.whisper}/preprocessor_config.json", self.face_detector]


PRESETS: Mapping[str, PipelinePreset] = MappingProxyType(
    {
        "tiny-random": PipelinePreset(
            name="tiny-random",
            description="tiny DiT/VAE/LLaVA/CLIP/Whisper with seeded random weights; CPU in seconds, for tests",
            random_seed=0,
        ),
        "hunyuan-avatar": PipelinePreset(
            name="hunyuan-avatar",
            description="the released 13B HunyuanVideo-Avatar from weights/ckpts (official layout)",
        ),
    }
)


def load_pipeline(
    preset: str,
    weights_dir: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    fp8: bool = False,
    group_offload: bool = False,
    config: AvatarPipelineConfig | None = None,
) -> AvatarPipeline:
    """Build the pipeline ``preset`` on ``device``.

    ``dtype`` is the DiT compute dtype (default: bf16 on accelerators, fp32 on CPU; the latent buffer follows the
    official fp16 whenever the DiT is not fp32). ``fp8`` loads the official fp8 transformer checkpoint (weight-only
    float8 with per-layer scales). ``group_offload`` builds every model in CPU memory and streams it to ``device``
    only while it runs (see `AvatarPipeline.enable_group_offload`). ``weights_dir`` holds ``ckpts/`` (default
    ``weights``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    spec, device = PRESETS[preset], torch.device(device)
    if config is None:
        overrides = {} if dtype is None else {"dtype": dtype, "latent_dtype": _latent_dtype(dtype)}
        config = AvatarPipelineConfig.for_device(device, **overrides)
    build_device = torch.device("cpu") if group_offload else device
    if spec.random_seed is not None:
        if fp8:
            raise ValueError(f"fp8 selects the official fp8 checkpoint; preset {preset!r} has random weights")
        pipeline = _tiny_random_pipeline(spec.random_seed, build_device, config)
    else:
        pipeline = _official_pipeline(spec, Path(weights_dir or "weights") / "ckpts", build_device, config, fp8)
    if group_offload:
        pipeline.enable_group_offload(onload_device=device)
    return pipeline


def _latent_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float32 else torch.float16


# ----------------------------------------------------------------------------------------------- tiny random


def tiny_whisper_config() -> WhisperConfig:
    """A whisper-tiny-shaped encoder (4 layers of 384, so 5 hidden states of 384 like the real one) with narrow
    MLPs and a one-layer decoder nobody runs."""
    return WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=6,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


def haar_face_box(image: np.ndarray) -> tuple[float, float, float, float]:
    """Face box (x, y, w, h) from the bundled OpenCV cascade (the tiny preset has no detector checkpoint)."""
    face = detect_face(image, name="portrait")
    return face.x, face.y, face.w, face.h


def _tiny_random_pipeline(seed: int, device: torch.device, config: AvatarPipelineConfig) -> AvatarPipeline:
    text_encoder = build_tiny_text_encoder(seed)
    llava_text, clip_text = text_encoder.llava.config.text_config, text_encoder.clip.config
    transformer_config = dataclasses.replace(
        AvatarTransformerConfig.tiny(),
        text_states_dim=llava_text.hidden_size,
        text_states_dim_2=clip_text.hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = AvatarTransformer3DModel(transformer_config)
        vae = build_vae(TINY_VAE_CONFIG)
        whisper = WhisperModel(tiny_whisper_config())
    _cast_transformer(transformer, config.dtype)
    text_encoder.llava.to(device)
    text_encoder.clip.to(device)
    return AvatarPipeline(
        transformer=transformer.to(device).eval().requires_grad_(False),
        vae=vae.to(device).eval().requires_grad_(False),
        text_encoder=text_encoder,
        whisper=whisper.to(device).eval(),
        feature_extractor=WhisperFeatureExtractor(),
        face_locator=haar_face_box,
        config=config,
        device=device,
    )


def _cast_transformer(model: AvatarTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` except the modules the official code keeps in fp32 (as the checkpoint loader does)."""
    model.to(dtype)
    for name in model._keep_in_fp32_modules:
        model.get_submodule(name).float()


# ----------------------------------------------------------------------------------------------- released model


def _official_pipeline(
    spec: PipelinePreset, root: Path, device: torch.device, config: AvatarPipelineConfig, fp8: bool
) -> AvatarPipeline:
    missing = [name for name in spec.required_files(fp8) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"preset {spec.name!r} needs the official checkpoints under {root} (see weights/README.md); missing: "
            + ", ".join(missing)
        )
    half = torch.float32 if config.dtype == torch.float32 else torch.float16  # official: encoders and VAE in fp16
    transformer = load_transformer(
        root / (spec.transformer_fp8 if fp8 else spec.transformer),
        AvatarTransformerConfig.released(),
        dtype=config.dtype,
        fp8_map_path=root / spec.transformer_fp8_map if fp8 else None,
    )
    text_encoder = AvatarTextEncoder(
        LlavaForConditionalGeneration.from_pretrained(root / spec.llava, dtype=half, local_files_only=True),
        AutoTokenizer.from_pretrained(root / spec.llava, padding_side="right", local_files_only=True),
        CLIPTextModel.from_pretrained(root / spec.clip, dtype=half, local_files_only=True),
        AutoTokenizer.from_pretrained(root / spec.clip, local_files_only=True),
    )
    text_encoder.llava.to(device)
    text_encoder.clip.to(device)
    whisper = WhisperModel.from_pretrained(root / spec.whisper, local_files_only=True)  # fp32, as officially
    detector = DetFace(root / spec.face_detector, device=device)

    def locate_face(image: np.ndarray) -> np.ndarray:
        return pick_face(detector(image))

    return AvatarPipeline(
        transformer=transformer.to(device),
        vae=load_vae(root / spec.vae, dtype=half, device=device),
        text_encoder=text_encoder,
        whisper=whisper.to(device).eval(),
        feature_extractor=WhisperFeatureExtractor.from_pretrained(root / spec.whisper, local_files_only=True),
        face_locator=locate_face,
        config=config,
        device=device,
    )
