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


def bucketed_portrait(call: StageCall, locate: Callable[[np.ndarray], FaceBox]) -> PortraitRef:
    """Decode and bucket the portrait, find its face with ``locate``, and cache the bucketed PNG."""
    item = call.item
    data = read_hashed_input(call, item.portrait_uri, call.resolved.portrait_sha256, call.cfg.limits.portrait_bytes)
    image = load_image(data, name=item.portrait_uri, max_pixels=call.cfg.limits.portrait_pixels)
    image = resize_to_bucket(image, call.cfg.video.short_side)
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
        probed = probe_seconds(source, name=item.audio_uri)
        if probed is not None:
            check_length(probed, cfg.audio, name=item.audio_uri, source="by its header, before decoding")
        local = Path(tmp) / "audio.wav"
        stats = decode_to_wav(source, local, rate, name=item.audio_uri, timeout_s=cfg.audio.decode_timeout_s,
                              max_seconds=cfg.audio.max_seconds)
        duration = check_speech(stats, rate, cfg.audio, name=item.audio_uri)
        uri, sha256 = artifacts.store(local, call.cache_uri, call.stage, call.key)
    return AudioRef(key=call.key, uri=uri, sha256=sha256, duration_s=duration, sample_rate=rate,
                    n_frames=frame_count(duration, cfg.video.fps))


def load_portrait(call: StageCall, ref: PortraitRef) -> np.ndarray:
    """The cached bucketed portrait as a writable RGB array (torch refuses read-only buffers)."""
    return artifacts.load(ref, call.cache_uri, ".png", lambda path: np.array(Image.open(path).convert("RGB")))
