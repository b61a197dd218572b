"""The pipeline stages as plain functions (no Prefect): storage in, storage out, small references back.

Each stage writes its heavy artifact under ``<cache>/<stage>/<key[:2]>/<key><ext>`` and returns a small dict
(a *reference*). Its cache key is a content key: the sha256 of the stage name, the stage's code version, the
content hashes / keys of its inputs and its parameters — never URIs or item ids, so the same portrait under
two names is one entry, and a changed file under the same name is a new one. The Prefect tasks in
`tasks.render` use the same key functions, so a stage whose entry exists is not run again across runs.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from avatar_model import storage
from avatar_model.backends import Renderer, make_renderer
from avatar_model.config import AudioConfig, VideoConfig
from avatar_model.errors import EncoderError, TransientError
from avatar_model.face.detector import FaceBox, detect_face
from avatar_model.media.audio import check_speech, decode_audio, read_wav, write_wav
from avatar_model.media.image import load_image, resize_to_bucket
from avatar_model.media.video import VideoEncoder, frame_count, mux_audio, probe

from .config import PipelineConfig

# Bump a stage's version whenever its output for the same inputs changes.
STAGE_VERSIONS = MappingProxyType({"prepare_portrait": 1, "prepare_audio": 1, "generate": 1, "decode": 1, "mux": 1})

Ref = dict[str, Any]


def stage_key(stage: str, **parts: Any) -> str:
    """Content key of one stage run: stage, code version and content-defining inputs."""
    payload = json.dumps(
        {"stage": stage, "version": STAGE_VERSIONS[stage], **parts}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def artifact_uri(cache_uri: str, stage: str, key: str, suffix: str) -> str:
    return storage.join(cache_uri, stage, key[:2], key + suffix)


def _publish_artifact(local: Path, cache_uri: str, stage: str, key: str) -> str:
    uri = artifact_uri(cache_uri, stage, key, local.suffix)
    storage.publish_file(local, uri)
    return uri


# --- keys -----------------------------------------------------------------------------------------------
# Each stage's key is a function of its inputs' keys, so every key of an item is known right after its inputs
# are hashed — before anything renders. The last one (the mux key) is the item's render key.


def portrait_key(portrait_sha256: str, short_side: int) -> str:
    return stage_key("prepare_portrait", portrait=portrait_sha256, short_side=short_side)


def audio_key(audio_sha256: str, audio: AudioConfig, sample_rate: int) -> str:
    rules = audio.model_dump(exclude={"decode_timeout_s"})  # how long we wait does not change the result
    return stage_key("prepare_audio", audio=audio_sha256, rules=rules, sample_rate=sample_rate)


def generate_key(portrait: str, audio: str, seed: int, fps: int, renderer: dict[str, Any]) -> str:
    return stage_key("generate", portrait=portrait, audio=audio, seed=seed, fps=fps, renderer=renderer)


def decode_key(portrait: str, motion: str, renderer: dict[str, Any], video: VideoConfig) -> str:
    # frames depend on fps, size and x264 settings; not on chunking, timeouts or audio options
    picture = video.model_dump(exclude={"audio_sample_rate", "audio_bitrate", "chunk_frames", "ffmpeg_timeout_s"})
    return stage_key("decode", portrait=portrait, motion=motion, renderer=renderer, video=picture)


def mux_key(silent_video: str, audio: str, video: VideoConfig) -> str:
    return stage_key("mux", video=silent_video, audio=audio, rate=video.audio_sample_rate,
                     bitrate=video.audio_bitrate, fps=video.fps)


def renderer_for(cfg: PipelineConfig) -> Renderer:
    return make_renderer(cfg.backend, cfg.preview, cfg.video, cfg.diffusion)


def item_keys(portrait_sha256: str, audio_sha256: str, seed: int, prompt: str | None,
              cfg: PipelineConfig) -> dict[str, str]:
    """Every stage key of one item, in pipeline order."""
    video, params = cfg.video, renderer_for(cfg).output_params(prompt)
    keys = {"prepare_portrait": portrait_key(portrait_sha256, video.short_side),
            "prepare_audio": audio_key(audio_sha256, cfg.audio, video.audio_sample_rate)}
    keys["generate"] = generate_key(keys["prepare_portrait"], keys["prepare_audio"], seed, video.fps, params)
    keys["decode"] = decode_key(keys["prepare_portrait"], keys["generate"], params, video)
    keys["mux"] = mux_key(keys["decode"], keys["prepare_audio"], video)
    return keys


# --- stages ---------------------------------------------------------------------------------------------


def fingerprint(uri: str) -> str:
    """sha256 of the object's bytes; a missing object fails the item with `ObjectNotFound`."""
    return storage.sha256_bytes(storage.read_bytes(uri))


def output_uris(output_uri: str, item_id: str) -> tuple[str, str]:
    safe = storage.check_item_id(item_id)
    return storage.join(output_uri, "videos", f"{safe}.mp4"), storage.join(output_uri, "videos", f"{safe}.json")


def published_sidecar(output_uri: str, item_id: str, render_key: str) -> dict[str, Any] | None:
    """The sidecar of an item already published with this render key (its MP4 present), else None."""
    video_uri, sidecar_uri = output_uris(output_uri, item_id)
    if not storage.exists(sidecar_uri):
        return None
    sidecar = json.loads(storage.read_bytes(sidecar_uri))
    return sidecar if sidecar.get("render_key") == render_key and storage.exists(video_uri) else None


def resolve(item_id: str, portrait_uri: str, audio_uri: str, seed: int, prompt: str | None, cfg: PipelineConfig,
            output_uri: str) -> Ref:
    """Hash both inputs, derive the item's render key, and look for a finished output with that key."""
    portrait_sha256, audio_sha256 = fingerprint(portrait_uri), fingerprint(audio_uri)
    render_key = item_keys(portrait_sha256, audio_sha256, seed, prompt, cfg)["mux"]
    return {"portrait_sha256": portrait_sha256, "audio_sha256": audio_sha256, "render_key": render_key,
            "published": published_sidecar(output_uri, item_id, render_key)}


def _read_verified(uri: str, sha256: str) -> bytes:
    data = storage.read_bytes(uri)
    if storage.sha256_bytes(data) != sha256:
        raise TransientError(f"{uri} changed while the run was reading it")
    return data


def prepare_portrait(portrait_uri: str, portrait_sha256: str, short_side: int, cache_uri: str, name: str) -> Ref:
    """Decode, bucket and face-detect the portrait; cache the bucketed PNG."""
    key = portrait_key(portrait_sha256, short_side)
    image = resize_to_bucket(load_image(_read_verified(portrait_uri, portrait_sha256), name=name), short_side)
    face = detect_face(image, name=name)
    with tempfile.TemporaryDirectory(prefix="avatar-portrait-") as tmp:
        local = Path(tmp) / "portrait.png"
        Image.fromarray(image).save(local)
        uri = _publish_artifact(local, cache_uri, "prepare_portrait", key)
    height, width = image.shape[:2]
    return {"key": key, "uri": uri, "width": width, "height": height, "face": face.to_dict()}


def prepare_audio(
    audio_uri: str, audio_sha256: str, audio: AudioConfig, sample_rate: int, cache_uri: str, name: str
) -> Ref:
    """Decode any format ffmpeg reads to mono PCM at the delivery rate; reject empty/silent/over-long audio."""
    key = audio_key(audio_sha256, audio, sample_rate)
    suffix = Path(audio_uri).suffix
    with tempfile.TemporaryDirectory(prefix="avatar-audio-") as tmp:
        source = Path(tmp) / f"source{suffix}"
        source.write_bytes(_read_verified(audio_uri, audio_sha256))
        samples = decode_audio(source, sample_rate, name=name, timeout_s=audio.decode_timeout_s)
        duration = check_speech(samples, sample_rate, audio, name=name)
        local = Path(tmp) / "audio.wav"
        write_wav(local, samples, sample_rate)
        uri = _publish_artifact(local, cache_uri, "prepare_audio", key)
    return {"key": key, "uri": uri, "duration_s": duration, "sample_rate": sample_rate}


def _load_portrait(portrait: Ref) -> tuple[np.ndarray, FaceBox]:
    with storage.local_copy(portrait["uri"], ".png") as path:
        image = np.array(Image.open(path).convert("RGB"))  # writable: torch refuses read-only buffers
    return image, FaceBox.from_dict(portrait["face"])


def generate(portrait: Ref, audio: Ref, seed: int, prompt: str | None, cfg: PipelineConfig, cache_uri: str) -> Ref:
    """Backend-specific motion (preview) or latents (diffusion) for the whole clip."""
    renderer = renderer_for(cfg)
    key = generate_key(portrait["key"], audio["key"], seed, cfg.video.fps, renderer.output_params(prompt))
    image, face = _load_portrait(portrait)
    n_frames = frame_count(audio["duration_s"], cfg.video.fps)
    with storage.local_copy(audio["uri"], ".wav") as wav, tempfile.TemporaryDirectory(prefix="avatar-gen-") as tmp:
        samples, rate = read_wav(wav)
        local = Path(tmp) / f"generated{renderer.artifact_suffix}"
        renderer.generate(image, face, samples, rate, n_frames, seed, prompt, local)
        uri = _publish_artifact(local, cache_uri, "generate", key)
    return {"key": key, "uri": uri, "n_frames": n_frames}


def decode(portrait: Ref, motion: Ref, prompt: str | None, cfg: PipelineConfig, cache_uri: str) -> Ref:
    """Render frames chunk by chunk straight into one H.264 encoder (the video is never held in memory)."""
    renderer = renderer_for(cfg)
    key = decode_key(portrait["key"], motion["key"], renderer.output_params(prompt), cfg.video)
    image, face = _load_portrait(portrait)
    height, width = image.shape[:2]
    with storage.local_copy(motion["uri"], renderer.artifact_suffix) as artifact, \
            tempfile.TemporaryDirectory(prefix="avatar-decode-") as tmp:
        local = Path(tmp) / "silent.mp4"
        with VideoEncoder(local, width, height, cfg.video) as encoder:
            for chunk in renderer.render(image, face, artifact):
                encoder.write(chunk)
        if encoder.frames_written != motion["n_frames"]:
            raise EncoderError(f"rendered {encoder.frames_written} frames, expected {motion['n_frames']}")
        uri = _publish_artifact(local, cache_uri, "decode", key)
    return {"key": key, "uri": uri, "n_frames": encoder.frames_written}


def mux(video_ref: Ref, audio: Ref, video: VideoConfig, cache_uri: str) -> Ref:
    """Add AAC audio trimmed/padded to the frame count, then verify streams, frame count and sync."""
    key = mux_key(video_ref["key"], audio["key"], video)
    n_frames = video_ref["n_frames"]
    with storage.local_copy(video_ref["uri"], ".mp4") as silent, storage.local_copy(audio["uri"], ".wav") as wav, \
            tempfile.TemporaryDirectory(prefix="avatar-mux-") as tmp:
        local = Path(tmp) / "muxed.mp4"
        mux_audio(silent, wav, local, n_frames, video)
        info = probe(local)
        video_s = n_frames / video.fps
        if info.video_frames != n_frames or abs(info.audio_duration_s - video_s) > 1.0 / video.fps:
            raise EncoderError(
                f"muxed file out of spec: {info.video_frames} frames (want {n_frames}), "
                f"audio {info.audio_duration_s:.3f}s vs video {video_s:.3f}s"
            )
        sha256 = storage.sha256_file(local)
        uri = _publish_artifact(local, cache_uri, "mux", key)
    return {"key": key, "uri": uri, "sha256": sha256, "n_frames": n_frames,
            "video_seconds": video_s, "audio_seconds": info.audio_duration_s}


def publish(item_id: str, muxed: Ref, provenance: dict[str, Any], output_uri: str) -> Ref:
    """Place the MP4 at its final name (whole or not at all), then its sidecar, which marks the item done.

    A reader treats an item as done only when its sidecar exists; the sidecar names the render key and the
    MP4's sha256. An item already published with the same render key is left alone.
    """
    video_uri, sidecar_uri = output_uris(output_uri, item_id)
    if published_sidecar(output_uri, item_id, muxed["key"]) is not None:
        return {"output_uri": video_uri, "sidecar_uri": sidecar_uri, "sha256": muxed["sha256"], "skipped": True}
    with storage.local_copy(muxed["uri"], ".mp4") as local:
        if storage.sha256_file(local) != muxed["sha256"]:
            raise TransientError(f"{item_id}: cached video does not match its checksum; will re-fetch")
        storage.publish_file(local, video_uri)
    document = {
        **provenance, "item_id": item_id, "render_key": muxed["key"], "video_uri": video_uri,
        "sha256": muxed["sha256"], "frame_count": muxed["n_frames"], "video_seconds": muxed["video_seconds"],
        "audio_seconds": muxed["audio_seconds"],
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.publish_bytes(json.dumps(document, indent=2, sort_keys=True, default=str).encode(), sidecar_uri)
    return {"output_uri": video_uri, "sidecar_uri": sidecar_uri, "sha256": muxed["sha256"], "skipped": False}
