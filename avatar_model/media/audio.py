"""Speech audio: decoding through ffmpeg, acceptance checks, WAV I/O.

ffmpeg (not librosa/soundfile) decodes inputs so that every container and codec ffmpeg knows is accepted
and resampling/downmixing is done the same way everywhere.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from pathlib import Path

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


# ffmpeg demuxers of real audio and video containers (mov covers mp4/m4a, matroska covers webm, asf covers wma)
AUDIO_CONTAINERS = ("wav", "w64", "mp3", "flac", "ogg", "mov", "matroska", "aac", "aiff", "caf", "asf", "au", "wv",
                    "ac3", "eac3", "amr", "dts")


def decode_audio(path: str | Path, sample_rate: int, name: str = "audio", timeout_s: float | None = None) -> np.ndarray:
    """Decode the first audio stream of ``path`` to mono float32 in [-1, 1] at ``sample_rate``.

    A decode still running after ``timeout_s`` is killed and raises `TransientError` (worth a retry).
    """
    # exactly the one local file, through a real audio/video container: a playlist or concat "audio" file would
    # make ffmpeg read other files no manifest names
    command = [ffmpeg_executable(), "-nostdin", "-v", "error", "-protocol_whitelist", "file",
               "-format_whitelist", ",".join(AUDIO_CONTAINERS), "-i", str(path), "-map", "0:a:0"]
    command += ["-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "pipe:1"]
    try:
        result = subprocess.run(command, capture_output=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise TransientError(f"{name}: decoding audio timed out after {timeout_s} s") from exc
    if result.returncode != 0:
        raise UndecodableAudio(f"{name}: cannot decode audio: {stderr_tail(result.stderr)}")
    samples = np.frombuffer(result.stdout, dtype="<f4")
    samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    logger.debug("%s: decoded %d samples at %d Hz", name, len(samples), sample_rate)
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


def check_speech(samples: np.ndarray, sample_rate: int, config: AudioConfig, name: str = "audio") -> float:
    """Duration of ``samples`` in seconds, after rejecting empty, too long and silent audio."""
    duration = len(samples) / sample_rate
    if len(samples) == 0 or duration < MIN_SECONDS:
        raise EmptyAudio(f"{name}: audio is empty or shorter than {MIN_SECONDS * 1000:.0f} ms ({duration:.3f} s)")
    if duration > config.max_seconds:
        raise InvalidParameter(
            f"{name}: audio is {duration:.1f} s long, the limit is {config.max_seconds:.1f} s (not truncated)"
        )
    peak = float(np.max(np.abs(samples)))
    peak_dbfs = 20.0 * np.log10(peak) if peak > 0 else -np.inf
    if peak_dbfs < config.silence_dbfs:
        raise SilentAudio(f"{name}: audio is silent (peak {peak_dbfs:.1f} dBFS < {config.silence_dbfs:.1f} dBFS)")
    return duration


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono (or (n, channels)) float samples as 16-bit PCM WAV."""
    soundfile.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a WAV as mono float32 (channels averaged) and its sample rate."""
    samples, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return samples.mean(axis=1, dtype=np.float32), int(sample_rate)
