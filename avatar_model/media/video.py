"""MP4 output: stream frames into one ffmpeg process, mux the speech, probe the result.

Frames are piped chunk by chunk, so a ten-minute clip never sits in memory; ffmpeg encodes in its own
process while Python renders the next chunk.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO

import av
import numpy as np

from common.errors import EncoderError, TransientError

from ..config import VideoConfig
from .audio import ffmpeg_executable, stderr_tail

logger = logging.getLogger(__name__)


def frame_count(duration_s: float, fps: int) -> int:
    """Video frames for ``duration_s`` of audio (at least one, so every accepted clip has a picture)."""
    return max(1, int(round(duration_s * fps)))


class VideoEncoder:
    """Context manager that pipes raw RGB chunks into a single libx264 ffmpeg process.

    On a clean exit it waits for ffmpeg and raises `EncoderError` if it failed; if the ``with`` block
    raised, ffmpeg is killed and the partial file removed.
    """

    def __init__(self, path: str | Path, width: int, height: int, config: VideoConfig):
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.config = config
        self.frames_written = 0
        self._stderr: IO[bytes] | None = None
        self._process: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        cfg = self.config
        command = [ffmpeg_executable(), "-nostdin", "-v", "error", "-y"]
        command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}"]
        command += ["-r", str(cfg.fps), "-i", "pipe:0", "-an"]
        command += ["-c:v", "libx264", "-preset", cfg.preset, "-crf", str(cfg.crf), "-pix_fmt", "yuv420p"]
        command += ["-movflags", "+faststart", "-f", "mp4", str(self.path)]
        return command

    def __enter__(self) -> VideoEncoder:
        # stderr goes to a file, not a pipe: a chatty ffmpeg can then never block on a full pipe.
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            self._command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        return self

    def write(self, frames: np.ndarray) -> None:
        """Encode a chunk of frames, shape (N, H, W, 3) uint8 RGB."""
        if self._process is None:
            raise RuntimeError("VideoEncoder.write called outside its with-block")
        expected = (self.height, self.width, 3)
        if frames.ndim != 4 or frames.shape[1:] != expected or frames.dtype != np.uint8:
            raise ValueError(
                f"expected (N, {self.height}, {self.width}, 3) uint8 frames, got {frames.shape} {frames.dtype}"
            )
        try:
            self._process.stdin.write(np.ascontiguousarray(frames).data)
        except BrokenPipeError as exc:
            self._process.wait()
            raise EncoderError(f"{self.path.name}: ffmpeg stopped reading frames: {self._stderr_tail()}") from exc
        self.frames_written += len(frames)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is not None:
                self._abort()
                return
            self._finish()
        finally:
            self._stderr.close()

    def _finish(self) -> None:
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            returncode = self._process.wait(timeout=self.config.ffmpeg_timeout_s)
        except subprocess.TimeoutExpired as exc:
            self._abort()
            limit = self.config.ffmpeg_timeout_s
            raise TransientError(f"{self.path.name}: ffmpeg did not finish within {limit} s") from exc
        if returncode != 0:
            self.path.unlink(missing_ok=True)
            raise EncoderError(f"{self.path.name}: ffmpeg exited with {returncode}: {self._stderr_tail()}")
        logger.debug("%s: encoded %d frames", self.path.name, self.frames_written)

    def _abort(self) -> None:
        self._process.kill()
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        self._process.wait()
        self.path.unlink(missing_ok=True)

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return stderr_tail(self._stderr.read())


def mux_audio(
    video_path: str | Path, audio_path: str | Path, out_path: str | Path, n_frames: int, config: VideoConfig
) -> None:
    """Copy the H.264 stream and add AAC audio padded or trimmed to exactly ``n_frames / fps`` seconds."""
    duration = n_frames / config.fps
    command = [ffmpeg_executable(), "-nostdin", "-v", "error", "-y", "-i", str(video_path), "-i", str(audio_path)]
    command += ["-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-af", "apad", "-t", f"{duration:.6f}"]
    command += ["-c:a", "aac", "-b:a", config.audio_bitrate, "-ar", str(config.audio_sample_rate)]
    command += ["-movflags", "+faststart", "-f", "mp4", str(out_path)]
    try:
        result = subprocess.run(command, capture_output=True, check=False, timeout=config.ffmpeg_timeout_s)
    except subprocess.TimeoutExpired as exc:
        Path(out_path).unlink(missing_ok=True)
        raise TransientError(f"{Path(out_path).name}: muxing timed out after {config.ffmpeg_timeout_s} s") from exc
    if result.returncode != 0:
        Path(out_path).unlink(missing_ok=True)
        raise EncoderError(f"{Path(out_path).name}: muxing audio failed: {stderr_tail(result.stderr)}")


def decode_errors(path: str | Path, timeout_s: float) -> str:
    """What ffmpeg reports while decoding every frame and sample of ``path``; empty when it decodes cleanly.

    Counting packets proves a file's structure, not its content: a damaged stream still demuxes.
    """
    command = [ffmpeg_executable(), "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"]
    try:
        result = subprocess.run(command, capture_output=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise TransientError(f"{Path(path).name}: decoding check timed out after {timeout_s} s") from exc
    if result.returncode != 0 or result.stderr.strip():
        return stderr_tail(result.stderr) or f"ffmpeg exited with {result.returncode}"
    return ""


@dataclass(frozen=True)
class MediaInfo:
    """What an MP4 holds, as read back by PyAV (used to check outputs, not to trust our own arguments)."""

    video_codec: str | None
    audio_codec: str | None
    video_streams: int
    audio_streams: int
    video_frames: int
    video_duration_s: float
    audio_duration_s: float
    width: int
    height: int
    fps: float


def probe(path: str | Path) -> MediaInfo:
    """Inspect ``path``: codecs and sizes from the header, the frame count by demuxing the video packets."""
    with av.open(str(path)) as container:
        videos = list(container.streams.video)
        audios = list(container.streams.audio)
        video = videos[0] if videos else None
        audio = audios[0] if audios else None
        video_frames = 0
        packet_end = Fraction(0)
        if video is not None:
            for packet in container.demux(video):
                if packet.size == 0:
                    continue
                video_frames += 1
                if packet.pts is not None and packet.duration:
                    packet_end = max(packet_end, (packet.pts + packet.duration) * packet.time_base)
        return MediaInfo(
            video_codec=video.codec_context.name if video else None,
            audio_codec=audio.codec_context.name if audio else None,
            video_streams=len(videos),
            audio_streams=len(audios),
            video_frames=video_frames,
            video_duration_s=_stream_seconds(video) or float(packet_end),
            audio_duration_s=_stream_seconds(audio),
            width=video.codec_context.width if video else 0,
            height=video.codec_context.height if video else 0,
            fps=float(video.average_rate) if video and video.average_rate else 0.0,
        )


def _stream_seconds(stream: av.stream.Stream | None) -> float:
    if stream is None or not stream.duration or stream.time_base is None:
        return 0.0
    return float(stream.duration * stream.time_base)


def middle_frame(path: str | Path) -> np.ndarray:
    """The frame at the middle of a video as RGB uint8 (seek to the keyframe before it, decode on to it)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        target = (stream.duration or 0) // 2
        if target:
            container.seek(target, stream=stream)
        for frame in container.decode(stream):
            if frame.pts is None or frame.pts >= target:
                return frame.to_ndarray(format="rgb24")
    raise EncoderError(f"{path}: the video has no frame to show")
