"""The `preview` backend's own stages: speech → motion track → warped frames streamed into H.264."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from avatar_model.media.audio import read_wav_blocks
from avatar_model.media.video import VideoEncoder
from avatar_model.preview.motion import MotionTrack
from avatar_model.preview.renderer import PreviewRenderer
from common.errors import EncoderError

from ..refs import AudioRef, MotionRef, PortraitRef, SilentVideoRef
from . import artifacts
from .inputs import load_portrait

if TYPE_CHECKING:
    from ..graph import StageCall

RENDERER_VERSION = PreviewRenderer.version


def motion(call: StageCall) -> MotionRef:
    """Mouth from the speech envelope, seeded blinks and head sway, for exactly the audio's frame count."""
    audio = call.input(AudioRef)
    renderer = PreviewRenderer(call.cfg.preview, call.cfg.video)
    track = artifacts.load(audio, call.cache_uri, ".wav", lambda wav: renderer.generate(
        read_wav_blocks(wav), audio.sample_rate, audio.n_frames, call.item.seed))
    with tempfile.TemporaryDirectory(prefix="avatar-motion-") as tmp:
        local = Path(tmp) / "motion.npz"
        track.save(local)
        uri, sha256 = artifacts.store(local, call.cache_uri, call.stage, call.key)
    return MotionRef(key=call.key, uri=uri, sha256=sha256, n_frames=audio.n_frames)


def render(call: StageCall) -> SilentVideoRef:
    """Warp the portrait frame by frame straight into one H.264 encoder (the video is never held in memory)."""
    portrait, track = call.input(PortraitRef), call.input(MotionRef)
    image = load_portrait(call, portrait)
    renderer = PreviewRenderer(call.cfg.preview, call.cfg.video)
    motion_track = artifacts.load(track, call.cache_uri, ".npz", MotionTrack.load)
    with tempfile.TemporaryDirectory(prefix="avatar-render-") as tmp:
        frames = renderer.render(image, portrait.face_box, motion_track)
        return encode_silent(call, frames, track.n_frames, Path(tmp) / "silent.mp4", portrait.width, portrait.height)


def encode_silent(call: StageCall, chunks, n_frames: int, local: Path, width: int, height: int,
                  memory_mode: str | None = None) -> SilentVideoRef:
    """Stream frame chunks into one H.264 encoder, check the count, cache the silent MP4."""
    with VideoEncoder(local, width, height, call.cfg.video) as encoder:
        for chunk in chunks:
            encoder.write(chunk)
    if encoder.frames_written != n_frames:
        raise EncoderError(f"rendered {encoder.frames_written} frames, expected {n_frames}")
    uri, sha256 = artifacts.store(local, call.cache_uri, call.stage, call.key)
    return SilentVideoRef(key=call.key, uri=uri, sha256=sha256, n_frames=n_frames, width=width, height=height,
                          memory_mode=memory_mode)
