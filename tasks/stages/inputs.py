"""The input stages every backend shares: the bucketed portrait and the delivery-rate speech."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from avatar_model.face.detector import FaceBox, detect_face
from avatar_model.media.audio import check_length, check_speech, decode_to_wav, probe_seconds
from avatar_model.media.image import load_image, resize_to_bucket
from avatar_model.media.video import frame_count
from common import storage
from common.errors import TransientError

from ..refs import AudioRef, PortraitRef
from . import artifacts

if TYPE_CHECKING:
    from ..config import PipelineConfig
    from ..graph import StageCall


def read_hashed_input(call: StageCall, uri: str, sha256: str, max_bytes: int) -> bytes:
    """The input's bytes, which must still be the bytes `resolve` hashed into the item's keys."""
    data = storage.read_input(uri, max_bytes, call.cfg.limits.http_hosts)
    if storage.sha256_bytes(data) != sha256:
        raise TransientError(f"{uri} changed while the run was reading it")
    return data


def copy_hashed_input(call: StageCall, uri: str, sha256: str, max_bytes: int, dest: Path) -> None:
    """`read_hashed_input` into a local file, streamed (a long clip is never held in memory)."""
    storage.check_input(uri, max_bytes, call.cfg.limits.http_hosts)
    if storage.copy_input(uri, dest, max_bytes) != sha256:
        raise TransientError(f"{uri} changed while the run was reading it")


def bucketed_image(data: bytes, name: str, cfg: PipelineConfig) -> np.ndarray:
    """The portrait decoded (pixels bounded from its header) and resized to its resolution bucket."""
    image = load_image(data, name=name, max_pixels=cfg.limits.portrait_pixels)
    return resize_to_bucket(image, cfg.video.short_side)


def decoded_speech(source: Path, dest: Path, name: str, cfg: PipelineConfig) -> float:
    """``source`` decoded into a delivery-rate WAV at ``dest`` after its header's length is checked; the
    acceptance checks (empty, over-long, silent) give its duration in seconds."""
    probed = probe_seconds(source, name=name)
    if probed is not None:
        check_length(probed, cfg.audio, name=name, source="by its header, before decoding")
    rate = cfg.video.audio_sample_rate
    stats = decode_to_wav(source, dest, rate, name=name, timeout_s=cfg.audio.decode_timeout_s,
                          max_seconds=cfg.audio.max_seconds)
    return check_speech(stats, rate, cfg.audio, name=name)


def check_inputs(portrait_uri: str, audio_uri: str, cfg: PipelineConfig) -> None:
    """What `prepare_portrait` (with the Haar face detector) and `prepare_audio` check of one row, without
    caching anything: ``validate --deep``. Raises the error the render would fail the row with."""
    limits = cfg.limits
    image = bucketed_image(storage.read_input(portrait_uri, limits.portrait_bytes, limits.http_hosts), portrait_uri,
                           cfg)
    detect_face(image, name=portrait_uri)
    with tempfile.TemporaryDirectory(prefix="avatar-check-") as tmp:
        source = Path(tmp) / f"source{Path(audio_uri).suffix}"
        storage.check_input(audio_uri, limits.audio_bytes, limits.http_hosts)
        storage.copy_input(audio_uri, source, limits.audio_bytes)
        decoded_speech(source, Path(tmp) / "audio.wav", audio_uri, cfg)


def bucketed_portrait(call: StageCall, locate: Callable[[np.ndarray], FaceBox]) -> PortraitRef:
    """Decode and bucket the portrait, find its face with ``locate``, and cache the bucketed PNG."""
    item = call.item
    data = read_hashed_input(call, item.portrait_uri, call.resolved.portrait_sha256, call.cfg.limits.portrait_bytes)
    image = bucketed_image(data, item.portrait_uri, call.cfg)
    face = locate(image)
    with tempfile.TemporaryDirectory(prefix="avatar-portrait-") as tmp:
        local = Path(tmp) / "portrait.png"
        Image.fromarray(image).save(local)
        uri, sha256 = artifacts.store(local, call.cache_uri, call.stage, call.key)
    height, width = image.shape[:2]
    return PortraitRef(key=call.key, uri=uri, sha256=sha256, width=width, height=height, face=face.to_dict())


def prepare_portrait(call: StageCall) -> PortraitRef:
    """Preview: the bundled Haar detector decides `FaceNotFound`."""
    return bucketed_portrait(call, lambda image: detect_face(image, name=call.item.portrait_uri))


def prepare_audio(call: StageCall) -> AudioRef:
    """Decode any format ffmpeg reads to mono PCM at the delivery rate, streamed; reject empty, silent and
    over-long audio (over-long by its header before decoding, and never decoding past the limit)."""
    item, cfg = call.item, call.cfg
    rate = cfg.video.audio_sample_rate
    with tempfile.TemporaryDirectory(prefix="avatar-audio-") as tmp:
        source = Path(tmp) / f"source{Path(item.audio_uri).suffix}"
        copy_hashed_input(call, item.audio_uri, call.resolved.audio_sha256, cfg.limits.audio_bytes, source)
        local = Path(tmp) / "audio.wav"
        duration = decoded_speech(source, local, item.audio_uri, cfg)
        uri, sha256 = artifacts.store(local, call.cache_uri, call.stage, call.key)
    return AudioRef(key=call.key, uri=uri, sha256=sha256, duration_s=duration, sample_rate=rate,
                    n_frames=frame_count(duration, cfg.video.fps))


def load_portrait(call: StageCall, ref: PortraitRef) -> np.ndarray:
    """The cached bucketed portrait as a writable RGB array (torch refuses read-only buffers)."""
    return artifacts.load(ref, call.cache_uri, ".png", lambda path: np.array(Image.open(path).convert("RGB")))
