"""Shared fixtures for the media, face and preview unit tests: the committed demo assets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatar_model.media.audio import read_wav
from avatar_model.media.image import load_image

DEMO_DIR = Path(__file__).resolve().parents[2] / "manifests" / "demo"


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO_DIR


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """The 512x512 demo portrait (skimage's astronaut), RGB uint8."""
    return load_image((DEMO_DIR / "astronaut.png").read_bytes(), "astronaut.png")


@pytest.fixture(scope="session")
def speech_with_pauses() -> tuple[np.ndarray, int]:
    """espeak-ng speech with ~0.6 s pauses between three phrases (mono float32, sample rate)."""
    return read_wav(DEMO_DIR / "pauses_en_gb.wav")
