import os
import subprocess

import numpy as np
import pytest

from avatar_model.config import AudioConfig
from avatar_model.media.audio import (
    SpeechStats,
    check_speech,
    decode_to_wav,
    ffmpeg_executable,
    probe_seconds,
    read_wav,
    read_wav_blocks,
    write_wav,
)
from common.errors import EmptyAudio, InvalidParameter, SilentAudio, TransientError, UndecodableAudio

SR = 16000


def tone(seconds: float, freq: float = 440.0, amplitude: float = 0.5, sample_rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode_audio(path, sample_rate: int, name: str = "audio", **options) -> np.ndarray:
    """Decode through the streamed path and read the result back whole (small clips only)."""
    dest = path.with_name(path.name + ".decoded.wav")
    stats = decode_to_wav(path, dest, sample_rate, name=name, **options)
    samples, rate = read_wav(dest)
    assert rate == sample_rate and stats.n_samples == len(samples)
    assert stats.peak == pytest.approx(float(np.abs(samples).max()) if len(samples) else 0.0, abs=1e-4)
    return samples


def stats(samples: np.ndarray) -> SpeechStats:
    return SpeechStats(len(samples), float(np.abs(samples).max()) if len(samples) else 0.0)


def dominant_frequency(samples: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / sample_rate)[np.argmax(spectrum)])


def test_ffmpeg_executable_runs():
    path = ffmpeg_executable()
    assert os.access(path, os.X_OK)
    assert subprocess.run([path, "-version"], capture_output=True, check=False).returncode == 0


def test_wav_round_trip(tmp_path):
    samples = tone(0.5)
    write_wav(tmp_path / "a.wav", samples, SR)
    back, sample_rate = read_wav(tmp_path / "a.wav")
    assert sample_rate == SR and back.dtype == np.float32
    np.testing.assert_allclose(back, samples, atol=1 / 16000)


def test_write_wav_clips_out_of_range(tmp_path):
    write_wav(tmp_path / "loud.wav", np.array([2.0, -3.0, 0.5], dtype=np.float32), SR)
    back, _ = read_wav(tmp_path / "loud.wav")
    assert back.max() <= 1.0 and back.min() >= -1.0


def test_decode_wav_at_native_rate(tmp_path):
    samples = tone(0.5)
    write_wav(tmp_path / "a.wav", samples, SR)
    decoded = decode_audio(tmp_path / "a.wav", SR)
    assert decoded.dtype == np.float32 and len(decoded) == len(samples)
    np.testing.assert_allclose(decoded, samples, atol=2e-4)


def test_decode_resamples_and_downmixes(tmp_path):
    left = tone(1.0, 440, sample_rate=22050)
    stereo = np.stack([left, 0.5 * left], axis=1)
    write_wav(tmp_path / "stereo.wav", stereo, 22050)
    decoded = decode_audio(tmp_path / "stereo.wav", 8000)
    assert decoded.ndim == 1
    assert abs(len(decoded) - 8000) <= 2
    assert abs(dominant_frequency(decoded, 8000) - 440) < 2


@pytest.mark.parametrize(("suffix", "codec"), [(".mp3", "libmp3lame"), (".m4a", "aac"), (".flac", "flac")])
def test_decode_compressed_formats(tmp_path, suffix, codec):
    write_wav(tmp_path / "src.wav", tone(1.0, 500), SR)
    encoded = tmp_path / f"speech{suffix}"
    command = [ffmpeg_executable(), "-nostdin", "-v", "error", "-i", str(tmp_path / "src.wav"), "-c:a", codec]
    subprocess.run([*command, str(encoded)], check=True)
    decoded = decode_audio(encoded, SR)
    assert abs(len(decoded) / SR - 1.0) < 0.1
    assert abs(dominant_frequency(decoded, SR) - 500) < 3
    assert 0.3 < np.abs(decoded).max() <= 1.0


def test_corrupt_audio_raises_with_name(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 3)
    with pytest.raises(UndecodableAudio, match=r"^item-3/audio: cannot decode audio: "):
        decode_audio(bad, SR, name="item-3/audio")


def test_file_without_audio_stream_is_undecodable(tmp_path):
    video = tmp_path / "silent.mp4"
    command = [ffmpeg_executable(), "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=32x32:d=0.2"]
    subprocess.run([*command, "-c:v", "libx264", str(video)], check=True)
    with pytest.raises(UndecodableAudio):
        decode_audio(video, SR)


def test_missing_file_is_undecodable(tmp_path):
    with pytest.raises(UndecodableAudio, match="nope.wav"):
        decode_audio(tmp_path / "nope.wav", SR, name="nope.wav")


def test_check_speech_returns_duration():
    assert check_speech(stats(tone(1.5)), SR, AudioConfig()) == pytest.approx(1.5)


@pytest.mark.parametrize("samples", [np.zeros(0, np.float32), tone(0.02)])
def test_empty_or_too_short_audio(samples):
    with pytest.raises(EmptyAudio, match="^clip: "):
        check_speech(stats(samples), SR, AudioConfig(), name="clip")


@pytest.mark.parametrize("amplitude", [0.0, 10 ** (-60 / 20)])
def test_silent_audio(amplitude):
    with pytest.raises(SilentAudio):
        check_speech(stats(tone(1.0, amplitude=amplitude)), SR, AudioConfig(silence_dbfs=-50.0))


def test_too_long_audio_is_rejected_not_truncated():
    samples = tone(2.0)
    with pytest.raises(InvalidParameter, match="limit"):
        check_speech(stats(samples), SR, AudioConfig(max_seconds=1.0))
    assert len(samples) == 2 * SR


def test_a_decode_stops_at_the_length_limit_whatever_the_file_holds(tmp_path):
    write_wav(tmp_path / "long.wav", tone(5.0), SR)
    decoded = decode_audio(tmp_path / "long.wav", SR, max_seconds=1.0)
    assert SR <= len(decoded) <= 1.0 * SR + 2**16, "decoded far past the limit"


def test_probe_reads_the_length_from_the_header(tmp_path):
    write_wav(tmp_path / "a.wav", tone(2.5), SR)
    assert probe_seconds(tmp_path / "a.wav") == pytest.approx(2.5)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 10)
    with pytest.raises(UndecodableAudio, match="bad.wav: cannot decode audio"):
        probe_seconds(bad, name="bad.wav")


def test_wav_blocks_are_the_whole_clip_in_order(tmp_path):
    stereo = np.stack([tone(1.0), 0.5 * tone(1.0)], axis=1)
    write_wav(tmp_path / "s.wav", stereo, SR)
    whole, _ = read_wav(tmp_path / "s.wav")
    blocks = list(read_wav_blocks(tmp_path / "s.wav", block_frames=1000))
    assert len(blocks) == 16 and all(b.dtype == np.float32 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), whole)


def test_decode_that_overruns_its_timeout_is_transient(tmp_path):
    write_wav(tmp_path / "a.wav", tone(2.0), SR)
    with pytest.raises(TransientError, match="clip-7: decoding audio timed out"):
        decode_audio(tmp_path / "a.wav", SR, name="clip-7", timeout_s=1e-4)


def test_a_playlist_is_refused_by_the_probe_too(tmp_path):
    target = tmp_path / "someone_elses.wav"
    write_wav(target, tone(1.0), SR)
    fake = tmp_path / "line.wav"
    fake.write_text(f"ffconcat version 1.0\nfile '{target}'\n")
    before = target.stat().st_atime_ns
    with pytest.raises(UndecodableAudio):
        probe_seconds(fake, name="line.wav")
    assert target.stat().st_atime_ns == before


@pytest.mark.parametrize("playlist", [
    "ffconcat version 1.0\nfile '{target}'\n",
    "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{target}\n#EXT-X-ENDLIST\n",
])
def test_a_playlist_posing_as_audio_is_refused_without_reading_what_it_names(tmp_path, playlist):
    target = tmp_path / "someone_elses.wav"
    write_wav(target, (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    fake = tmp_path / "line.wav"
    fake.write_text(playlist.format(target=target))
    before = target.stat().st_atime_ns
    with pytest.raises(UndecodableAudio, match="cannot decode audio"):
        decode_audio(fake, 16000, name="line.wav")
    assert target.stat().st_atime_ns == before
