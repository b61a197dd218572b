"""Named pipeline builds: the released model from the official checkpoint layout, and a tiny random one for tests.

Presets are data (`PRESETS`). Each pipeline component loads on its own (`load_component`), so a process can hold
just the ones a stage runs (`resident.ResidentModels`); `load_pipeline` loads them all. Nothing here downloads:
the real weights are read from a local folder in the official layout (see weights/README.md) with
``local_files_only``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from diffusers.hooks import apply_group_offloading
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    LlavaForConditionalGeneration,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from avatar_model.face.detector import FaceBox, detect_face
from avatar_model.face.detface import DetFace, pick_face
from avatar_model.hunyuan.checkpoint import load_transformer
from avatar_model.hunyuan.config import AvatarTransformerConfig
from avatar_model.hunyuan.pipeline import AvatarPipeline, AvatarPipelineConfig, FaceLocator, WhisperEncoder
from avatar_model.hunyuan.text_encoders import AvatarTextEncoder, build_tiny_text_encoder
from avatar_model.hunyuan.transformer import AvatarTransformer3DModel
from avatar_model.hunyuan.vae import TINY_VAE_CONFIG, build_vae, load_vae

COMPONENTS = ("face_locator", "whisper", "text_encoder", "transformer", "vae")  # AvatarPipeline's argument names
# Each tiny component draws its weights from seed + offset, whatever else was loaded before it.
TINY_SEED_OFFSETS = MappingProxyType({"text_encoder": 0, "transformer": 0, "vae": 1, "whisper": 2})
TINY_TEXT_WIDTH = 16  # hidden size of `build_tiny_text_encoder`'s LLaVA and CLIP, which the tiny DiT reads


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

    def required_files(self, fp8: bool, components: Iterable[str] = COMPONENTS) -> list[str]:
        files = {
            "face_locator": [self.face_detector],
            "whisper": [f"{self.whisper}/config.json", f"{self.whisper}/preprocessor_config.json"],
            "text_encoder": [f"{self.llava}/config.json", f"{self.clip}/config.json"],
            "transformer": [self.transformer_fp8, self.transformer_fp8_map] if fp8 else [self.transformer],
            "vae": [self.vae],
        }
        return [name for component in components for name in files[component]]


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
    """Build the pipeline ``preset`` on ``device`` with every component (see `load_component`).

    ``dtype`` is the DiT compute dtype (default: bf16 on accelerators, fp32 on CPU; the latent buffer follows the
    official fp16 whenever the DiT is not fp32); a given ``config`` decides it instead. ``weights_dir`` holds
    ``ckpts/`` (default ``weights``); every missing file is listed before anything loads.
    """
    spec, device = _preset(preset), torch.device(device)
    if config is None:
        overrides = {} if dtype is None else {"dtype": dtype, "latent_dtype": _latent_dtype(dtype)}
        config = AvatarPipelineConfig.for_device(device, **overrides)
    weights_dir = Path(weights_dir or "weights")
    if spec.random_seed is None:
        _check_files(spec, weights_dir / "ckpts", COMPONENTS, fp8)
    components = {
        name: load_component(name, preset, weights_dir, device, config.dtype, fp8=fp8, group_offload=group_offload)
        for name in COMPONENTS
    }
    return AvatarPipeline(**components, config=config, device=device, offload=group_offload)


def load_component(
    component: str,
    preset: str,
    weights_dir: str | Path = "weights",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    fp8: bool = False,
    group_offload: bool = False,
):
    """Load one of `COMPONENTS` of ``preset``: a `FaceLocator` (on the CPU), a `WhisperEncoder` (fp32, as
    officially), an `AvatarTextEncoder`, the DiT or the VAE.

    ``dtype`` is the DiT compute dtype; the text encoders and the VAE follow the official rule (fp16 unless it is
    fp32). ``fp8`` loads the official fp8 DiT checkpoint (weight-only float8 with per-layer scales). With
    ``group_offload`` the DiT stays in CPU memory and is streamed to ``device`` a block at a time, and the encoders
    and the VAE rest in CPU memory; `AvatarPipeline(offload=True)` moves each onto ``device`` while it runs.
    """
    spec, device = _preset(preset), torch.device(device)
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; available: {', '.join(COMPONENTS)}")
    resting = torch.device("cpu") if group_offload else device  # where the encoders and the VAE wait between uses
    if spec.random_seed is not None:
        if fp8 and component == "transformer":
            raise ValueError(f"fp8 selects the official fp8 checkpoint; preset {preset!r} has random weights")
        return _tiny_component(component, spec.random_seed, device, resting, dtype, group_offload)
    root = Path(weights_dir) / "ckpts"
    _check_files(spec, root, [component], fp8)
    return _official_component(component, spec, root, device, resting, dtype, fp8, group_offload)


def _preset(name: str) -> PipelinePreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def _latent_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float32 else torch.float16


def _check_files(spec: PipelinePreset, root: Path, components: Iterable[str], fp8: bool) -> None:
    missing = [name for name in spec.required_files(fp8, components) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"preset {spec.name!r} needs the official checkpoints under {root} (see weights/README.md); missing: "
            + ", ".join(missing)
        )


def _cast_transformer(model: AvatarTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` except the modules the official code keeps in fp32 (as the checkpoint loader does)."""
    model.to(dtype)
    for name in model._keep_in_fp32_modules:
        model.get_submodule(name).float()


def _place_transformer(
    model: AvatarTransformer3DModel, device: torch.device, group_offload: bool
) -> AvatarTransformer3DModel:
    """On ``device``, or in CPU memory streamed to it block by block by diffusers' group-offloading hooks (the
    official "GPU-poor" path)."""
    if not group_offload:
        return model.to(device)
    apply_group_offloading(
        model.to("cpu"), onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
        num_blocks_per_group=1,
    )
    return model


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


def haar_face_box(image: np.ndarray) -> FaceBox:
    """The face from the bundled OpenCV cascade (the tiny preset has no detector checkpoint)."""
    return detect_face(image, name="portrait")


@contextlib.contextmanager
def _seeded(seed: int):
    """Draw from the global CPU RNG seeded with ``seed``, and leave it as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_component(
    component: str, seed: int, device: torch.device, resting: torch.device, dtype: torch.dtype, group_offload: bool
):
    if component == "face_locator":
        return haar_face_box
    seed += TINY_SEED_OFFSETS[component]
    if component == "text_encoder":
        text_encoder = build_tiny_text_encoder(seed)
        text_encoder.llava.to(resting)
        text_encoder.clip.to(resting)
        return text_encoder
    if component == "whisper":
        with _seeded(seed):
            whisper = WhisperModel(tiny_whisper_config())
        return WhisperEncoder(whisper.to(resting).eval(), WhisperFeatureExtractor())
    if component == "vae":
        with _seeded(seed):
            vae = build_vae(TINY_VAE_CONFIG)
        return vae.to(resting).eval().requires_grad_(False)
    config = dataclasses.replace(
        AvatarTransformerConfig.tiny(), text_states_dim=TINY_TEXT_WIDTH, text_states_dim_2=TINY_TEXT_WIDTH
    )
    with _seeded(seed):
        transformer = AvatarTransformer3DModel(config)
    _cast_transformer(transformer, dtype)
    return _place_transformer(transformer.eval().requires_grad_(False), device, group_offload)


# ----------------------------------------------------------------------------------------------- released model


def _official_component(
    component: str,
    spec: PipelinePreset,
    root: Path,
    device: torch.device,
    resting: torch.device,
    dtype: torch.dtype,
    fp8: bool,
    group_offload: bool,
):
    half = torch.float32 if dtype == torch.float32 else torch.float16  # official: encoders and VAE in fp16
    if component == "face_locator":
        return _official_face_locator(DetFace(root / spec.face_detector))
    if component == "whisper":
        whisper = WhisperModel.from_pretrained(root / spec.whisper, local_files_only=True)  # fp32, as officially
        feature_extractor = WhisperFeatureExtractor.from_pretrained(root / spec.whisper, local_files_only=True)
        return WhisperEncoder(whisper.to(resting).eval(), feature_extractor)
    if component == "text_encoder":
        text_encoder = AvatarTextEncoder(
            LlavaForConditionalGeneration.from_pretrained(root / spec.llava, dtype=half, local_files_only=True),
            AutoTokenizer.from_pretrained(root / spec.llava, padding_side="right", local_files_only=True),
            CLIPTextModel.from_pretrained(root / spec.clip, dtype=half, local_files_only=True),
            AutoTokenizer.from_pretrained(root / spec.clip, local_files_only=True),
        )
        text_encoder.llava.to(resting)
        text_encoder.clip.to(resting)
        return text_encoder
    if component == "vae":
        return load_vae(root / spec.vae, dtype=half, device=resting)
    transformer = load_transformer(
        root / (spec.transformer_fp8 if fp8 else spec.transformer),
        AvatarTransformerConfig.released(),
        dtype=dtype,
        fp8_map_path=root / spec.transformer_fp8_map if fp8 else None,
    )
    return _place_transformer(transformer, device, group_offload)


def _official_face_locator(detector: DetFace) -> FaceLocator:
    def locate_face(image: np.ndarray) -> FaceBox:
        return pick_face(detector(image))

    return locate_face
