"""Per-frame motion of the preview renderer: mouth from the speech envelope, seeded blinks and head sway.

The track is the cacheable artifact between ``generate`` and ``render``: small (five floats a frame) and
independent of the portrait, so one audio track can drive any face.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from scipy import signal

SILENCE_DBFS = -70.0  # clips whose loud frames stay below this keep the mouth shut
FLOOR_RANGE_DB = 40.0  # the "closed" level is at most this far below the loud level
MIN_RANGE_DB = 6.0


@dataclass
class MotionTrack:
    """Per-frame float32 curves; ``head_dx``/``head_dy`` are fractions of the portrait's short side."""

    mouth_open: np.ndarray  # 0 closed .. 1 fully open
    blink: np.ndarray  # 0 open eyes .. 1 closed
    head_rotate_deg: np.ndarray
    head_dx: np.ndarray
    head_dy: np.ndarray
    mouth_width: np.ndarray  # -1 rounded .. 0 at rest .. +1 spread

    def __post_init__(self) -> None:
        for field in fields(self):
            setattr(self, field.name, np.asarray(getattr(self, field.name), dtype=np.float32).reshape(-1))
        lengths = {len(getattr(self, field.name)) for field in fields(self)}
        if len(lengths) != 1:
            raise ValueError(f"MotionTrack curves differ in length: {sorted(lengths)}")

    @property
    def n_frames(self) -> int:
        return len(self.mouth_open)

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as file:
            np.savez(file, **{field.name: getattr(self, field.name) for field in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> MotionTrack:
        with np.load(path) as data:
            return cls(**{field.name: data[field.name] for field in fields(cls)})


def band_levels_db(
    blocks: Iterable[np.ndarray], sample_rate: int, n_frames: int, fps: int, bands: Sequence[tuple[float, float]]
) -> np.ndarray:
    """Level in dBFS of each frequency band during each video frame (frame i covers [i/fps, (i+1)/fps)), as an
    array (len(bands), n_frames).

    ``blocks`` are the mono clip in consecutive pieces: each band's filter state and running energy carry across
    them, so the result is the same for any split and memory stays flat in the clip's length.
    """
    filters = [signal.butter(4, (low, min(high, 0.45 * sample_rate)), btype="bandpass", fs=sample_rate,
                             output="sos") for low, high in bands]
    states = [np.zeros((sos.shape[0], 2)) for sos in filters]
    bounds = np.round(np.arange(n_frames + 1) * sample_rate / fps).astype(np.int64)
    energy_at = np.zeros((len(bands), len(bounds)))  # each band's running sum of squares at each frame boundary
    totals = np.zeros(len(bands))
    filled, offset = 0, 0
    for block in blocks:
        samples = block.astype(np.float64)
        end = offset + len(samples)
        upto = int(np.searchsorted(bounds, end, side="right"))
        for b, sos in enumerate(filters):
            # causal: its ~1 ms delay is far below a frame
            band, states[b] = signal.sosfilt(sos, samples, zi=states[b])
            energy = np.cumsum(np.concatenate([[totals[b]], band**2]))  # the sum over samples [0, offset + j)
            energy_at[b, filled:upto] = energy[bounds[filled:upto] - offset]
            totals[b] = energy[-1]
        filled, offset = upto, end
    energy_at[:, filled:] = totals[:, None]  # frames past the clip's end hear silence
    lengths = np.maximum(bounds[1:] - bounds[:-1], 1)
    rms = np.sqrt(np.maximum(energy_at[:, 1:] - energy_at[:, :-1], 0.0) / lengths)
    return (20.0 * np.log10(rms + 1e-9)).astype(np.float32)


def lip_width(low_db: np.ndarray, high_db: np.ndarray, mouth: np.ndarray, spread_db: float = 6.0) -> np.ndarray:
    """-1 (rounded, "oo") .. +1 (spread, "ee") from the balance of high over low speech energy, relative to the
    clip's own voiced median, and only as far as the mouth is open."""
    balance = high_db - low_db
    voiced = mouth > 0.2
    centre = float(np.median(balance[voiced])) if voiced.any() else 0.0
    width = np.tanh((balance - centre) / spread_db) * np.clip(2.0 * mouth, 0.0, 1.0)
    smoothed = np.empty_like(width)
    level = 0.0
    for i, value in enumerate(width):  # lips reshape over ~3 frames, not frame by frame
        level = 0.6 * level + 0.4 * value
        smoothed[i] = level
    return smoothed.astype(np.float32)


def bilabial_closures(speech_db: np.ndarray, jump_db: float = 12.0) -> np.ndarray:
    """Frames just before a burst of speech out of quiet (a /p/, /b/, /m/ release is a sudden onset): where the
    lips should be shut."""
    rise = np.diff(speech_db, prepend=speech_db[:1])
    onset = (rise > jump_db) & (np.roll(speech_db, 1) < speech_db.max() - 20.0)
    closing = np.zeros(len(speech_db), dtype=bool)
    closing[:-1] |= onset[1:]  # the frame before the release
    return closing


def mouth_opening(envelope_db: np.ndarray, fps: int, attack_ms: float, release_ms: float,
                  closed: np.ndarray | None = None) -> np.ndarray:
    """Map the envelope to [0, 1] between a robust floor and loud level, then smooth with attack/release; frames
    in ``closed`` (bilabial closures) aim for shut lips."""
    if len(envelope_db) == 0:
        return np.zeros(0, dtype=np.float32)
    loud = float(np.percentile(envelope_db, 95))
    if loud < SILENCE_DBFS:
        return np.zeros(len(envelope_db), dtype=np.float32)
    floor = max(float(np.percentile(envelope_db, 10)), loud - FLOOR_RANGE_DB)
    span = max(loud - floor, MIN_RANGE_DB)
    target = np.clip((envelope_db - floor) / span, 0.0, 1.0)
    if closed is not None:
        target = np.where(closed, 0.0, target)
    attack = np.exp(-1000.0 / (fps * attack_ms)) if attack_ms > 0 else 0.0
    release = np.exp(-1000.0 / (fps * release_ms)) if release_ms > 0 else 0.0
    smoothed = np.empty(len(target), dtype=np.float32)
    level = 0.0
    shut = np.zeros(len(target), dtype=bool) if closed is None else closed
    for i, value in enumerate(target):
        coefficient = attack if value > level or shut[i] else release  # lips press shut as fast as they open
        level = coefficient * level + (1.0 - coefficient) * value
        smoothed[i] = level
    return smoothed


def blink_curve(
    rng: np.random.Generator, n_frames: int, fps: int, per_minute: float, blink_frames: int
) -> np.ndarray:
    """Eyelid closure per frame: blinks at Poisson-random times, each a quick close and slower open."""
    curve = np.zeros(n_frames, dtype=np.float32)
    if per_minute <= 0 or blink_frames <= 0:
        return curve
    phase = (np.arange(blink_frames) + 0.5) / blink_frames
    shape = np.where(phase < 0.4, np.sin(0.5 * np.pi * phase / 0.4), np.cos(0.5 * np.pi * (phase - 0.4) / 0.6))
    mean_gap = 60.0 * fps / per_minute
    start = rng.uniform(0.2, 1.0) * mean_gap
    while start < n_frames:
        first = int(start)
        last = min(n_frames, first + blink_frames)
        curve[first:last] = np.maximum(curve[first:last], shape[: last - first])
        start += max(2 * blink_frames, rng.exponential(mean_gap))
    return curve


def smooth_noise(rng: np.random.Generator, n_frames: int, fps: int, period_s: float) -> np.ndarray:
    """Seeded sway in [-1, 1]: three sinusoids near ``period_s`` with random frequencies and phases."""
    t = np.arange(n_frames) / fps
    amplitudes = np.array([1.0, 0.5, 0.25])
    frequencies = rng.uniform(0.7, 1.3, size=3) * np.array([1.0, 1.9, 3.7]) / period_s
    phases = rng.uniform(0, 2 * np.pi, size=3)
    waves = amplitudes[:, None] * np.sin(2 * np.pi * frequencies[:, None] * t[None, :] + phases[:, None])
    return (waves.sum(axis=0) / amplitudes.sum()).astype(np.float32)
