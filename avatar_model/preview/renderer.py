"""The ``preview`` backend: a talking portrait on CPU with no weights.

``generate`` turns speech into a `MotionTrack` (mouth from the speech-band envelope, seeded blinks and
head sway); ``render`` warps the portrait by that track and yields frames in chunks for the encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np

from ..config import PreviewConfig, VideoConfig
from ..face.detector import FaceBox
from .motion import MotionTrack, band_levels_db, bilabial_closures, blink_curve, lip_width, mouth_opening, smooth_noise
from .warp import PortraitWarp

logger = logging.getLogger(__name__)


# speech energy low in the band (rounded vowels: "oo", "oh") against high (spread vowels and fricatives: "ee", "s")
LIP_BANDS_HZ = ((250.0, 900.0), (1800.0, 4000.0))


class PreviewRenderer:
    """Envelope-driven portrait animation; deterministic for a given audio, portrait and seed."""

    name = "preview"
    version = "2"  # 2: painted mouth interior and eyelids, lip width from the spectrum, bilabial closures

    def __init__(self, config: PreviewConfig, video: VideoConfig):
        self.config = config
        self.video = video

    def generate(self, audio: Iterable[np.ndarray], sample_rate: int, n_frames: int, seed: int) -> MotionTrack:
        """Motion for ``n_frames`` frames of ``audio`` (mono float blocks, in order) at the configured fps."""
        cfg, fps = self.config, self.video.fps
        speech, low, high = band_levels_db(audio, sample_rate, n_frames, fps, (cfg.band_hz, *LIP_BANDS_HZ))
        mouth = mouth_opening(speech, fps, cfg.attack_ms, cfg.release_ms, closed=bilabial_closures(speech))
        width = lip_width(low, high, mouth)
        rng = np.random.default_rng(seed)
        blink = blink_curve(rng, n_frames, fps, cfg.blink_per_minute, cfg.blink_frames)
        rotate = cfg.head_rotate_deg * smooth_noise(rng, n_frames, fps, cfg.head_period_s)
        dx = cfg.head_shift_px * smooth_noise(rng, n_frames, fps, cfg.head_period_s)
        dy = 0.5 * cfg.head_shift_px * smooth_noise(rng, n_frames, fps, cfg.head_period_s)
        return MotionTrack(mouth_open=mouth, blink=blink, head_rotate_deg=rotate, head_dx=dx, head_dy=dy,
                           mouth_width=width)

    def render(self, portrait: np.ndarray, face: FaceBox, track: MotionTrack) -> Iterator[np.ndarray]:
        """Yield (n, H, W, 3) uint8 chunks of at most ``video.chunk_frames`` frames."""
        if portrait.ndim != 3 or portrait.shape[2] != 3 or portrait.dtype != np.uint8:
            raise ValueError(f"portrait must be (H, W, 3) uint8 RGB, got {portrait.shape} {portrait.dtype}")
        warp = PortraitWarp(portrait, face, self.config)
        logger.debug("preview warp region %s of %s", warp.roi, portrait.shape[:2])
        chunk = self.video.chunk_frames
        for start in range(0, track.n_frames, chunk):
            stop = min(start + chunk, track.n_frames)
            frames = np.empty((stop - start, *portrait.shape[:2], 3), dtype=np.uint8)
            for i in range(start, stop):
                frames[i - start] = warp.frame(
                    float(track.mouth_open[i]),
                    float(track.blink[i]),
                    float(track.head_rotate_deg[i]),
                    float(track.head_dx[i]),
                    float(track.head_dy[i]),
                    float(track.mouth_width[i]),
                )
            yield frames
