"""Per-frame motion of the preview renderer: mouth from the speech envelope, seeded blinks and head sway.

The track is the cacheable artifact between ``generate`` and ``render``: small (five floats a frame) and
independent of the portrait, so one audio track can drive any face.
"""

from __future__ import annotations

from collections.abc import Iterable
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


def speech_envelope_db(
    blocks: Iterable[np.ndarray], sample_rate: int, n_frames: int, fps: int, band_hz: tuple[float, float]
) -> np.ndarray:
    """Level in dBFS of the speech band during each video frame (frame i covers [i/fps, (i+1)/fps)).

    ``blocks`` are the mono clip in consecutive pieces: the filter state and the running energy carry across
    them, so the result is the same for any split and memory stays flat in the clip's length.
    """
    low, high = band_hz
    high = min(high, 0.45 * sample_rate)
    sos = signal.butter(4, (low, high), btype="bandpass", fs=sample_rate, output="sos")
    state = np.zeros((sos.shape[0], 2))
    bounds = np.round(np.arange(n_frames + 1) * sample_rate / fps).astype(np.int64)
    energy_at = np.zeros(len(bounds))  # running sum of squares at each frame boundary
    filled, offset, total = 0, 0, 0.0
    for block in blocks:
        # causal: its ~1 ms delay is far below a frame
        band, state = signal.sosfilt(sos, block.astype(np.float64), zi=state)
        energy = np.cumsum(np.concatenate([[total], band**2]))  # the sum over samples [0, offset + j)
        end = offset + len(band)
        upto = int(np.searchsorted(bounds, end, side="right"))
        energy_at[filled:upto] = energy[bounds[filled:upto] - offset]
        filled, offset, total = upto, end, float(energy[-1])
    energy_at[filled:] = total  # frames past the clip's end hear silence
    lengths = np.maximum(bounds[1:] - bounds[:-1], 1)
    rms = np.sqrt(np.maximum(energy_at[1:] - energy_at[:-1], 0.0) / lengths)
    return (20.0 * np.log10(rms + 1e-9)).astype(np.float32)


def mouth_opening(envelope_db: np.ndarray, fps: int, attack_ms: float, release_ms: float) -> np.ndarray:
    """Map the envelope to [0, 1] between a robust floor and loud level, then smooth with attack/release."""
    if len(envelope_db) == 0:
        return np.zeros(0, dtype=np.float32)
    loud = float(np.percentile(envelope_db, 95))
    if loud < SILENCE_DBFS:
        return np.zeros(len(envelope_db), dtype=np.float32)
    floor = max(float(np.percentile(envelope_db, 10)), loud - FLOOR_RANGE_DB)
    span = max(loud - floor, MIN_RANGE_DB)
    target = np.clip((envelope_db - floor) / span, 0.0, 1.0)
    attack = np.exp(-1000.0 / (fps * attack_ms)) if attack_ms > 0 else 0.0
    release = np.exp(-1000.0 / (fps * release_ms)) if release_ms > 0 else 0.0
    smoothed = np.empty(len(target), dtype=np.float32)
    level = 0.0
    for i, value in enumerate(target):
        coefficient = attack if value > level else release
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
