"""Speech audio: decoding through ffmpeg, acceptance checks, WAV I/O.

ffmpeg (not librosa/soundfile) decodes inputs so that every container and codec ffmpeg knows is accepted
and resampling/downmixing is done the same way everywhere.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import soundfile

from common.errors import EmptyAudio, InvalidParameter, SilentAudio, TransientError, UndecodableAudio

from ..config import AudioConfig

logger = logging.getLogger(__name__)

MIN_SECONDS = 0.040
STDERR_TAIL_CHARS = 800


@functools.lru_cache(maxsize=1)
def ffmpeg_executable() -> str:
    """The system ``ffmpeg`` when one is on PATH, else the static binary bundled with imageio-ffmpeg."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    return imageio_ffmpeg.get_ffmpeg_exe()


def stderr_tail(stderr: bytes | str) -> str:
    """Last lines of ffmpeg's stderr, short enough for an error message."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    text = text.strip()
    return text[-STDERR_TAIL_CHARS:] if text else "(no output from ffmpeg)"


# ffmpeg demuxers of real audio and video containers (mov covers mp4/m4a, matroska covers webm, asf covers wma):
# a playlist or concat "audio" file would make ffmpeg read other files no manifest names
AUDIO_CONTAINERS = ("wav", "w64", "mp3", "flac", "ogg", "mov", "matroska", "aac", "aiff", "caf", "asf", "au", "wv",
                    "ac3", "eac3", "amr", "dts")
# exactly the one local file, through one of those containers
_WHITELISTS = {"protocol_whitelist": "file", "format_whitelist": ",".join(AUDIO_CONTAINERS)}
_BLOCK_SAMPLES = 1 << 16


def _ffmpeg_whitelists() -> list[str]:
    return [arg for option, value in _WHITELISTS.items() for arg in (f"-{option}", value)]


@dataclass(frozen=True)
class SpeechStats:
    """What the acceptance checks need of a decoded clip, gathered while it streams past."""

    n_samples: int
    peak: float


def container_format(path: str | Path, name: str = "audio") -> str:
    """The container FFmpeg finds in the file's bytes (``wav``, ``mp3``, …), under the decode's whitelists."""
    try:
        with av.open(str(path), options=_WHITELISTS) as container:
            return container.format.name
    except av.FFmpegError as exc:
        raise UndecodableAudio(f"{name}: cannot decode audio: {str(exc).replace(repr(str(path)), 'the file')}") from exc


def probe_seconds(path: str | Path, name: str = "audio") -> float | None:
    """The clip's duration as its container header states it, read before anything is decoded (None when the
    header does not say). Opened under the same protocol and container whitelists as the decode."""
    try:
        with av.open(str(path), options=_WHITELISTS) as container:
            streams = container.streams.audio
            if not streams:
                raise UndecodableAudio(f"{name}: cannot decode audio: the file has no audio stream")
            stream = streams[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration is not None else None
    except av.FFmpegError as exc:  # named by the input, not by the local copy it was read from
        raise UndecodableAudio(f"{name}: cannot decode audio: {str(exc).replace(repr(str(path)), 'the file')}") from exc


def decode_to_wav(path: str | Path, dest: str | Path, sample_rate: int, name: str = "audio",
                  timeout_s: float | None = None, max_seconds: float | None = None) -> SpeechStats:
    """Decode the first audio stream of ``path`` to a mono 16-bit WAV at ``sample_rate``, streamed in blocks
    (memory stays flat in the clip's length), and return its length and peak.

    At most ``max_seconds`` (plus one block) is decoded, whatever the header claimed. A decode still running after
    ``timeout_s`` is killed and raises `TransientError` (worth a retry).
    """
    command = [ffmpeg_executable(), "-nostdin", "-v", "error", *_ffmpeg_whitelists(), "-i", str(path),
               "-map", "0:a:0", "-ac", "1", "-ar", str(sample_rate)]
    if max_seconds is not None:
        command += ["-t", f"{max_seconds + _BLOCK_SAMPLES / sample_rate:.6f}"]
    command += ["-f", "f32le", "pipe:1"]
    n_samples, peak = 0, 0.0
    with tempfile.TemporaryFile() as stderr, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr) as process, \
            soundfile.SoundFile(str(dest), "w", sample_rate, 1, "PCM_16", format="WAV") as wav:
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout_s, kill) if timeout_s is not None else None
        if timer:
            timer.start()
        try:
            while block := process.stdout.read(_BLOCK_SAMPLES * 4):
                samples = np.frombuffer(block[: len(block) // 4 * 4], dtype="<f4")
                samples = np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
                wav.write(samples)
                n_samples += len(samples)
                peak = max(peak, float(np.max(np.abs(samples)))) if len(samples) else peak
            process.wait()
        finally:
            if timer:
                timer.cancel()
        if timed_out.is_set():
            raise TransientError(f"{name}: decoding audio timed out after {timeout_s} s")
        if process.returncode != 0:
            stderr.seek(0)
            raise UndecodableAudio(f"{name}: cannot decode audio: "
                                   f"{stderr_tail(stderr.read()).replace(str(path), 'the input')}")
    logger.debug("%s: decoded %d samples at %d Hz", name, n_samples, sample_rate)
    return SpeechStats(n_samples, peak)


def check_speech(stats: SpeechStats, sample_rate: int, config: AudioConfig, name: str = "audio") -> float:
    """Duration of the decoded clip in seconds, after rejecting empty, too long and silent audio."""
    duration = stats.n_samples / sample_rate
    if stats.n_samples == 0 or duration < MIN_SECONDS:
        raise EmptyAudio(f"{name}: audio is empty or shorter than {MIN_SECONDS * 1000:.0f} ms ({duration:.3f} s)")
    check_length(duration, config, name)
    peak_dbfs = 20.0 * np.log10(stats.peak) if stats.peak > 0 else -np.inf
    if peak_dbfs < config.silence_dbfs:
        raise SilentAudio(f"{name}: audio is silent (peak {peak_dbfs:.1f} dBFS < {config.silence_dbfs:.1f} dBFS)")
    return duration


def check_length(seconds: float, config: AudioConfig, name: str = "audio", source: str = "decoded") -> None:
    """Audio longer than the limit is refused, never truncated (first on the length its header states, before
    decoding; then on what was decoded)."""
    if seconds > config.max_seconds:
        raise InvalidParameter(f"{name}: audio is {seconds:.1f} s long ({source}), the limit is "
                               f"{config.max_seconds:.1f} s (not truncated)")


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono (or (n, channels)) float samples as 16-bit PCM WAV."""
    soundfile.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def read_wav_blocks(path: str | Path, block_frames: int = _BLOCK_SAMPLES) -> Iterator[np.ndarray]:
    """A WAV as consecutive mono float32 blocks (channels averaged): the whole clip is never held."""
    for block in soundfile.blocks(str(path), blocksize=block_frames, dtype="float32", always_2d=True):
        yield block.mean(axis=1, dtype=np.float32)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a WAV as mono float32 (channels averaged) and its sample rate."""
    samples, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return samples.mean(axis=1, dtype=np.float32), int(sample_rate)
