"""The ends of every item: `resolve` (hash the inputs, derive every key, find a finished output) and the
delivery stages `mux` and `publish`."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avatar_model.media.video import decode_errors, mux_audio, probe
from common import storage
from common.errors import EncoderError
from common.ids import check_item_id

from ..refs import AudioRef, MuxedRef, PublishedRef, Resolved, SilentVideoRef
from . import artifacts

if TYPE_CHECKING:
    from ..config import PipelineConfig
    from ..graph import Graph, Item, StageCall


def output_uris(output_uri: str, item_id: str) -> tuple[str, str]:
    safe = check_item_id(item_id)
    return storage.join(output_uri, "videos", f"{safe}.mp4"), storage.join(output_uri, "videos", f"{safe}.json")


def published_sidecar(output_uri: str, item_id: str, render_key: str) -> dict[str, Any] | None:
    """The sidecar of an item already published with this render key, else None.

    The deliverable is read back and must match the sidecar's sha256: a damaged, truncated or replaced MP4 makes
    the item unpublished, so the run publishes it again (from the verified cache) instead of calling it done.
    """
    video_uri, sidecar_uri = output_uris(output_uri, item_id)
    if not storage.exists(sidecar_uri):
        return None
    try:
        sidecar = json.loads(storage.read_bytes(sidecar_uri))
    except ValueError:
        return None  # a damaged sidecar is no proof of anything
    if not isinstance(sidecar, dict) or sidecar.get("render_key") != render_key or not storage.exists(video_uri):
        return None
    with storage.local_copy(video_uri, ".mp4") as path:
        return sidecar if storage.sha256_file(path) == sidecar.get("sha256") else None


def resolve(item: Item, cfg: PipelineConfig, graph: Graph, output_uri: str, digests: storage.InputDigests) -> Resolved:
    """Hash both inputs (bytes, not URIs; each input once per run), derive every stage key, and look for an
    output made with them."""
    from ..graph import item_keys

    limits = cfg.limits
    portrait_sha256 = digests.sha256(item.portrait_uri, limits.portrait_bytes, limits.http_hosts)
    audio_sha256 = digests.sha256(item.audio_uri, limits.audio_bytes, limits.http_hosts)
    keys = item_keys(graph, cfg, item, portrait_sha256, audio_sha256)
    render_key = keys[graph.names[-1]]
    return Resolved(portrait_sha256=portrait_sha256, audio_sha256=audio_sha256, stage_keys=keys, render_key=render_key,
                    published=published_sidecar(output_uri, item.item_id, render_key))


def mux(call: StageCall) -> MuxedRef:
    """Add AAC audio trimmed/padded to the frame count, then verify streams, frame count, sync and a clean decode."""
    silent, audio, video = call.input(SilentVideoRef), call.input(AudioRef), call.cfg.video
    n_frames = silent.n_frames
    with artifacts.fetch(silent, call.cache_uri, ".mp4") as silent_path, \
            artifacts.fetch(audio, call.cache_uri, ".wav") as wav, \
            tempfile.TemporaryDirectory(prefix="avatar-mux-") as tmp:
        local = Path(tmp) / "muxed.mp4"
        mux_audio(silent_path, wav, local, n_frames, video)
        info = probe(local)
        video_s = n_frames / video.fps
        problem = None
        if info.video_frames != n_frames or abs(info.audio_duration_s - video_s) > 1.0 / video.fps:
            problem = (f"muxed file out of spec: {info.video_frames} frames (want {n_frames}), "
                       f"audio {info.audio_duration_s:.3f}s vs video {video_s:.3f}s")
        elif errors := decode_errors(local, video.ffmpeg_timeout_s):
            problem = f"muxed file does not decode cleanly: {errors}"
        if problem:
            # the video stream is copied, so the fault is in the cached silent video: render it again
            artifacts.forget(call.cache_uri, silent)
            raise EncoderError(f"{problem}; its silent video {silent.uri} is dropped and will be rendered again")
        uri, sha256 = artifacts.store(local, call.cache_uri, call.stage, call.key)
    return MuxedRef(key=call.key, uri=uri, sha256=sha256, n_frames=n_frames, video_seconds=video_s,
                    audio_seconds=info.audio_duration_s)


def sidecar(call: StageCall, muxed: MuxedRef, video_uri: str) -> dict[str, Any]:
    """How the video was made: inputs and their hashes, each stage's key, parameters and memory mode."""
    from ..graph import GRAPHS, stage_parameters

    item, cfg = call.item, call.cfg
    stages = stage_parameters(GRAPHS[cfg.backend], cfg, item)
    for name, ref in call.inputs.items():
        stages[name]["key"] = ref.key
        if getattr(ref, "memory_mode", None) is not None:
            stages[name]["memory_mode"] = ref.memory_mode
    return {
        "item_id": item.item_id, "row": item.row, "render_key": call.key, "backend": cfg.backend,
        "inputs": {"portrait_uri": item.portrait_uri, "portrait_sha256": call.resolved.portrait_sha256,
                   "audio_uri": item.audio_uri, "audio_sha256": call.resolved.audio_sha256},
        "parameters": {"seed": item.seed, "prompt": item.prompt, "video": cfg.video.model_dump(),
                       "diffusion": cfg.diffusion.model_dump() if cfg.backend != "preview" else None},
        "stages": stages,
        "video_uri": video_uri, "sha256": muxed.sha256, "frame_count": muxed.n_frames,
        "video_seconds": muxed.video_seconds, "audio_seconds": muxed.audio_seconds,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def publish(call: StageCall) -> PublishedRef:
    """Place the MP4 at its final name (whole or not at all), then its sidecar, which marks the item done.

    A reader treats an item as done only when its sidecar exists and names the render key. An item already
    published with the same render key is left alone.
    """
    muxed = call.input(MuxedRef)
    video_uri, sidecar_uri = output_uris(call.output_uri, call.item.item_id)
    if published_sidecar(call.output_uri, call.item.item_id, call.key) is not None:
        return PublishedRef(output_uri=video_uri, sidecar_uri=sidecar_uri, sha256=muxed.sha256, skipped=True)
    with artifacts.fetch(muxed, call.cache_uri, ".mp4") as local:
        storage.publish_file(local, video_uri)
    document = sidecar(call, muxed, video_uri)
    storage.publish_bytes(json.dumps(document, indent=2, sort_keys=True, default=str).encode(), sidecar_uri)
    return PublishedRef(output_uri=video_uri, sidecar_uri=sidecar_uri, sha256=muxed.sha256, skipped=False)
