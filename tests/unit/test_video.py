import numpy as np
import pytest

from avatar_model.config import VideoConfig
from common.errors import EncoderError, TransientError
from avatar_model.media.audio import write_wav
from avatar_model.media.video import VideoEncoder, decode_errors, frame_count, mux_audio, probe

WIDTH, HEIGHT, N_FRAMES = 64, 48, 30
CONFIG = VideoConfig(fps=25, chunk_frames=8)


def moving_frames(n: int) -> np.ndarray:
    frames = np.zeros((n, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, :, (2 * i) % WIDTH] = (255, 128, 0)
    return frames


@pytest.fixture(scope="module")
def silent_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "frames.mp4"
    frames = moving_frames(N_FRAMES)
    with VideoEncoder(path, WIDTH, HEIGHT, CONFIG) as encoder:
        for start in range(0, N_FRAMES, CONFIG.chunk_frames):
            encoder.write(frames[start : start + CONFIG.chunk_frames])
    assert encoder.frames_written == N_FRAMES
    return path


def test_encoder_writes_h264_with_every_frame(silent_video):
    info = probe(silent_video)
    assert info.video_codec == "h264" and info.video_streams == 1 and info.audio_streams == 0
    assert info.video_frames == N_FRAMES
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.fps == pytest.approx(25)
    assert info.video_duration_s == pytest.approx(N_FRAMES / 25, abs=1e-3)


@pytest.mark.parametrize("audio_seconds", [0.5, N_FRAMES / 25, 2.7])
def test_mux_pads_or_trims_audio_to_the_video(tmp_path, silent_video, audio_seconds):
    t = np.arange(int(audio_seconds * 16000)) / 16000
    write_wav(tmp_path / "speech.wav", 0.3 * np.sin(2 * np.pi * 300 * t), 16000)
    out = tmp_path / "final.mp4"

    mux_audio(silent_video, tmp_path / "speech.wav", out, N_FRAMES, CONFIG)

    info = probe(out)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert (info.video_streams, info.audio_streams) == (1, 1)
    assert info.video_frames == N_FRAMES
    assert abs(info.audio_duration_s - info.video_duration_s) <= 0.040


def test_mux_failure_raises_encoder_error_and_leaves_nothing(tmp_path, silent_video):
    out = tmp_path / "final.mp4"
    with pytest.raises(EncoderError, match="final.mp4"):
        mux_audio(silent_video, tmp_path / "missing.wav", out, N_FRAMES, CONFIG)
    assert not out.exists()


def test_failure_inside_with_block_removes_partial_file(tmp_path):
    path = tmp_path / "partial.mp4"
    with pytest.raises(RuntimeError, match="renderer broke"):
        with VideoEncoder(path, WIDTH, HEIGHT, CONFIG) as encoder:
            encoder.write(moving_frames(4))
            raise RuntimeError("renderer broke")
    assert not path.exists()


def test_wrong_frame_shape_is_rejected_and_file_removed(tmp_path):
    path = tmp_path / "wrong.mp4"
    with pytest.raises(ValueError, match="uint8 frames"):
        with VideoEncoder(path, WIDTH, HEIGHT, CONFIG) as encoder:
            encoder.write(np.zeros((2, HEIGHT, WIDTH + 2, 3), dtype=np.uint8))
    assert not path.exists()


def test_ffmpeg_failure_raises_encoder_error(tmp_path):
    path = tmp_path / "bad.mp4"
    with pytest.raises(EncoderError, match="bad.mp4"):
        with VideoEncoder(path, WIDTH, HEIGHT, VideoConfig(preset="no-such-preset")) as encoder:
            encoder.write(moving_frames(4))
    assert not path.exists()


def test_odd_frame_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        VideoEncoder(tmp_path / "odd.mp4", 63, 48, CONFIG)


@pytest.mark.parametrize(("seconds", "fps", "expected"), [(1.0, 25, 25), (2.03, 25, 51), (0.041, 25, 1), (0.01, 25, 1)])
def test_frame_count(seconds, fps, expected):
    assert frame_count(seconds, fps) == expected


def test_mux_that_overruns_its_timeout_is_killed_and_transient(tmp_path, silent_video):
    write_wav(tmp_path / "speech.wav", np.zeros(16000, dtype=np.float32), 16000)
    out = tmp_path / "final.mp4"
    impatient = CONFIG.model_copy(update={"ffmpeg_timeout_s": 1e-4})
    with pytest.raises(TransientError, match="timed out"):
        mux_audio(silent_video, tmp_path / "speech.wav", out, N_FRAMES, impatient)
    assert not out.exists()


def test_decode_errors_finds_damage_that_demuxing_does_not(tmp_path, silent_video):
    wav = tmp_path / "a.wav"
    write_wav(wav, (0.3 * np.sin(np.linspace(0, 900, 48000))).astype(np.float32), 48000)
    good = tmp_path / "good.mp4"
    mux_audio(silent_video, wav, good, 25, VideoConfig())
    assert decode_errors(good, 60) == ""
    data = bytearray(good.read_bytes())
    for offset in range(len(data) // 4, len(data) - 256, len(data) // 8):
        data[offset : offset + 128] = bytes(128)  # zeroed runs through the media data
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    assert probe(bad).video_frames == probe(good).video_frames, "the damage is invisible to a packet count"
    assert decode_errors(bad, 60)
