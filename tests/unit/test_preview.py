import logging

import numpy as np
import pytest

from avatar_model.config import PreviewConfig, VideoConfig
from avatar_model.face.detector import detect_face
from avatar_model.media.video import frame_count
from avatar_model.preview.motion import MotionTrack
from avatar_model.preview.renderer import PreviewRenderer

logger = logging.getLogger(__name__)

SR = 16000
VIDEO = VideoConfig(fps=25, chunk_frames=16)


@pytest.fixture(scope="module")
def renderer() -> PreviewRenderer:
    return PreviewRenderer(PreviewConfig(), VIDEO)


@pytest.fixture(scope="module")
def small_portrait(astronaut):
    """A 256x256 crop around the astronaut's face, to keep rendering tests quick."""
    portrait = np.ascontiguousarray(astronaut[0:256, 96:352])
    return portrait, detect_face(portrait)


def tone_burst(rng: np.random.Generator) -> np.ndarray:
    """1 s near-silence, 1 s of a 1 kHz tone, 1 s near-silence."""
    t = np.arange(SR) / SR
    hiss = 1e-4 * rng.standard_normal(3 * SR)
    hiss[SR : 2 * SR] += 0.5 * np.sin(2 * np.pi * 1000 * t)
    return hiss.astype(np.float32)


def frame_rms(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """The test's own envelope: plain RMS of the raw samples over each video frame."""
    bounds = np.round(np.arange(n_frames + 1) * SR / VIDEO.fps).astype(int)
    return np.array([np.sqrt(np.mean(audio[a:b] ** 2)) if b > a else 0.0 for a, b in zip(bounds, bounds[1:])])


def test_track_is_deterministic_for_a_seed(renderer, speech_with_pauses):
    audio, sr = speech_with_pauses
    n = frame_count(len(audio) / sr, VIDEO.fps)
    first, again = renderer.generate([audio], sr, n, seed=7), renderer.generate([audio], sr, n, seed=7)
    other = renderer.generate([audio], sr, n, seed=8)
    for name in ("mouth_open", "blink", "head_rotate_deg", "head_dx", "head_dy"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
        assert getattr(first, name).dtype == np.float32 and len(getattr(first, name)) == n
    np.testing.assert_array_equal(first.mouth_open, other.mouth_open)  # the mouth follows the audio only
    assert not np.array_equal(first.head_rotate_deg, other.head_rotate_deg)


def test_track_ranges(renderer):
    rng = np.random.default_rng(0)
    track = renderer.generate([rng.uniform(-0.5, 0.5, 20 * SR).astype(np.float32)], SR, 500, seed=1)
    assert track.n_frames == 500
    assert 0.0 <= track.mouth_open.min() and track.mouth_open.max() <= 1.0
    assert 0.0 <= track.blink.min() and track.blink.max() <= 1.0
    assert 2 <= np.count_nonzero(np.diff((track.blink > 0.5).astype(int)) == 1) <= 15  # ~17 blinks a minute
    assert np.abs(track.head_rotate_deg).max() <= PreviewConfig().head_rotate_deg + 1e-6
    assert np.abs(np.diff(track.head_rotate_deg)).max() < 0.2  # smooth sway, no jumps


def test_mouth_closed_on_silence_and_open_on_sound(renderer):
    audio = tone_burst(np.random.default_rng(0))
    track = renderer.generate([audio], SR, 75, seed=0)
    assert track.mouth_open[:24].max() < 0.05
    assert track.mouth_open[30:48].min() > 0.8
    assert track.mouth_open[60:].max() < 0.05
    silent = renderer.generate([np.zeros(2 * SR, np.float32)], SR, 50, seed=0)
    assert not silent.mouth_open.any()


def test_motion_track_save_load_round_trip(renderer, speech_with_pauses, tmp_path):
    audio, sr = speech_with_pauses
    track = renderer.generate([audio], sr, 40, seed=3)
    track.save(tmp_path / "track.npz")
    loaded = MotionTrack.load(tmp_path / "track.npz")
    assert loaded.n_frames == 40
    np.testing.assert_array_equal(loaded.mouth_open, track.mouth_open)
    np.testing.assert_array_equal(loaded.head_dy, track.head_dy)


def test_motion_track_rejects_ragged_curves():
    with pytest.raises(ValueError, match="length"):
        MotionTrack(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(2))


def test_render_chunks_and_still_track_reproduces_the_portrait(renderer, small_portrait):
    portrait, face = small_portrait
    still = MotionTrack(*(np.zeros(37) for _ in range(6)))
    chunks = list(renderer.render(portrait, face, still))
    assert [len(c) for c in chunks] == [16, 16, 5]
    for chunk in chunks:
        assert chunk.dtype == np.uint8 and chunk.shape[1:] == portrait.shape
        assert (chunk == portrait).all()


def test_render_is_deterministic_and_moves_mouth_and_eyes(renderer, small_portrait):
    portrait, face = small_portrait
    zeros = np.zeros(2)
    track = MotionTrack(mouth_open=[0.0, 1.0], blink=[1.0, 0.0], head_rotate_deg=zeros, head_dx=zeros, head_dy=zeros,
                        mouth_width=zeros)
    first = np.concatenate(list(renderer.render(portrait, face, track)))
    np.testing.assert_array_equal(first, np.concatenate(list(renderer.render(portrait, face, track))))
    change = np.abs(first.astype(np.int16) - portrait).max(axis=3)
    mouth_rows = slice(int(face.y + 0.75 * face.h), int(face.y + 1.1 * face.h))
    eye_rows = slice(int(face.y + 0.25 * face.h), int(face.y + 0.5 * face.h))
    assert change[1, mouth_rows].mean() > 5 * change[0, mouth_rows].mean() + 1  # open mouth, frame 1
    assert change[0, eye_rows].mean() > 5 * change[1, eye_rows].mean() + 1  # closed eyes, frame 0
    assert not change[:, : face.y].any()  # without head sway, nothing above the eyebrows moves


def test_acceptance_mouth_motion_follows_speech(renderer, astronaut, speech_with_pauses):
    """Full default renderer on the demo clip with pauses: the mouth region tracks the raw speech level."""
    audio, sr = speech_with_pauses
    assert sr == SR
    n = frame_count(len(audio) / sr, VIDEO.fps)
    face = detect_face(astronaut)
    track = renderer.generate([audio], sr, n, seed=0)
    frames = np.concatenate(list(renderer.render(astronaut, face, track)))
    assert frames.shape == (n, *astronaut.shape)

    rows = slice(int(face.y + 0.7 * face.h), int(face.y + 1.1 * face.h))
    cols = slice(int(face.x + 0.2 * face.w), int(face.x + 0.8 * face.w))
    neutral = astronaut[rows, cols].astype(np.float32)
    mouth_change = np.abs(frames[:, rows, cols].astype(np.float32) - neutral).mean(axis=(1, 2, 3))
    envelope = frame_rms(audio, n)

    r = float(np.corrcoef(mouth_change, envelope)[0, 1])
    logger.info("mouth motion vs speech envelope: Pearson r = %.3f", r)
    assert r >= 0.5, f"mouth motion vs speech envelope: Pearson r = {r:.3f}"
    lags = range(-3, 4)
    best_lag = max(lags, key=lambda lag: np.corrcoef(np.roll(mouth_change, -lag), envelope)[0, 1])
    assert abs(best_lag) <= 1, f"mouth motion is {best_lag} frames off the audio"
    speaking = envelope > 0.25 * envelope.max()
    assert mouth_change[speaking].mean() > 1.5 * mouth_change[envelope < 0.02 * envelope.max()].mean()


def test_the_band_levels_are_the_same_for_any_split_of_the_clip(speech_with_pauses):
    """Streamed in blocks (flat memory for long clips), the levels equal the ones of the whole clip exactly."""
    from avatar_model.preview.motion import band_levels_db

    audio, sr = speech_with_pauses
    n = frame_count(len(audio) / sr, VIDEO.fps) + 3  # frames past the end hear silence
    bands = ((300.0, 3400.0), (250.0, 900.0), (1800.0, 4000.0))
    whole = band_levels_db([audio], sr, n, VIDEO.fps, bands)
    assert whole.shape == (3, n)
    for block in (1, 997, 4096, len(audio) - 1):
        pieces = [audio[i:i + block] for i in range(0, len(audio), block)]
        np.testing.assert_array_equal(band_levels_db(pieces, sr, n, VIDEO.fps, bands), whole)
    assert (whole[:, -1] < -100).all() and whole[0].max() > -40


def test_lips_spread_on_bright_sounds_and_round_on_dark_ones(renderer):
    """An "ee"-like sound (energy high in the spectrum) spreads the lips; an "oo"-like one (low) rounds them."""
    t = np.arange(SR) / SR
    dark, bright = 0.4 * np.sin(2 * np.pi * 400 * t), 0.4 * np.sin(2 * np.pi * 2600 * t)
    audio = np.concatenate([dark, np.zeros(SR // 2), bright, np.zeros(SR // 2)]).astype(np.float32)
    track = renderer.generate([audio], SR, 75, seed=0)
    assert track.mouth_open[10:22].min() > 0.5 and track.mouth_open[48:60].min() > 0.5
    assert track.mouth_width[10:22].mean() < -0.3 and track.mouth_width[48:60].mean() > 0.3
    assert np.abs(track.mouth_width).max() <= 1.0


def test_lips_close_before_a_burst_out_of_quiet():
    """The frame before a sudden onset (a /p/ or /b/ release) aims for shut lips, even after a murmur."""
    from avatar_model.preview.motion import bilabial_closures, mouth_opening

    level = np.full(40, -50.0, np.float32)  # quiet, then speech, a brief closure murmur, and the burst after it
    level[10:21], level[21], level[22:32] = -15.0, -35.0, -12.0
    closed = bilabial_closures(level)
    assert closed[21] and closed[9] and closed.sum() == 2  # before the first word, and before the burst
    with_closure = mouth_opening(level, VIDEO.fps, 15.0, 90.0, closed=closed)
    without = mouth_opening(level, VIDEO.fps, 15.0, 90.0)
    assert with_closure[21] < 0.8 * without[21]


def _luma(pixels: np.ndarray) -> float:
    return float((pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).mean())


def test_the_open_mouth_is_darker_than_the_lips_and_the_closed_mouth_is_the_portrait(astronaut):
    from avatar_model.preview.warp import PortraitWarp

    warp = PortraitWarp(astronaut, detect_face(astronaut), PreviewConfig())
    assert (warp.frame(0.0, 0.0, 0.0, 0.0, 0.0) == astronaut).all(), "closed: the portrait itself"
    opened = warp.frame(1.0, 0.0, 0.0, 0.0, 0.0)
    top, bottom, left, right = warp.mouth_box
    inside = warp.mouth_shape > 0.9
    interior = opened[top:bottom, left:right][inside]
    lips = astronaut[top - 3:top, left + (right - left) // 4:right - (right - left) // 4]  # the upper lip
    assert _luma(interior) < 0.5 * _luma(lips), (_luma(interior), _luma(lips))
    assert _luma(interior) < _luma(astronaut[top:bottom, left:right][inside]) - 40, "darker than what was there"


def test_a_blink_covers_the_eye_with_a_lid_instead_of_squashing_it(astronaut):
    """Closed, the eye's dark iris and pupil are covered by skin-coloured lid, and the brow above is untouched."""
    from avatar_model.preview.warp import PortraitWarp

    face = detect_face(astronaut)
    warp = PortraitWarp(astronaut, face, PreviewConfig())
    closed = warp.frame(0.0, 1.0, 0.0, 0.0, 0.0)
    for lid in warp.lids:
        eye = (slice(lid.top, int(lid.closed_y)), slice(lid.left, lid.right))
        covered = lid.almond[: int(lid.closed_y) - lid.top] > 0.9
        assert _luma(closed[eye][covered]) > _luma(astronaut[eye][covered]) + 15, "the dark eye still shows"
        assert np.abs(closed[eye][covered].astype(float) - lid.skin.mean(axis=0)).mean() < 25, "not skin-coloured"
    brow = slice(max(0, warp.lids[0].top - int(face.h * 0.08)), warp.lids[0].top - 2)
    assert np.abs(closed[brow].astype(int) - astronaut[brow]).max() < 40
