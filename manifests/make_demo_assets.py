"""Regenerate the demo portraits and speech clips in ``manifests/demo/`` and the manifest ``manifests/demo.parquet``.

The outputs are committed, so nothing here runs in CI or tests. Regenerating needs ``espeak-ng`` on PATH
(speech synthesis) in addition to the project's requirements (numpy, scipy, soundfile, Pillow, scikit-image).

    python manifests/make_demo_assets.py [--out manifests/demo]

Sources: ``skimage.data.astronaut()`` (Eileen Collins, NASA, public domain) and espeak-ng voices.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
from PIL import Image
from scipy import signal
from skimage import data

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
PAUSE_S = 0.6

# (file name, espeak-ng voice, words-per-minute, phrases); phrases are joined by PAUSE_S of silence.
CLIPS = [
    ("hello_en_us.wav", "en-us", 160, ["Hello, and welcome to the avatar batch demo."]),
    ("pauses_en_gb.wav", "en-gb", 150, ["One moment, please.", "Let me think.", "Yes, that works."]),
    ("fox_en_f.wav", "en-us+f3", 170, ["The quick brown fox jumps over the lazy dog."]),
]


def synthesize(text: str, voice: str, speed: int, workdir: Path) -> np.ndarray:
    """One phrase from espeak-ng, resampled to mono SAMPLE_RATE float32 and trimmed of edge silence."""
    raw = workdir / "phrase.wav"
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is needed to regenerate the demo speech (apt-get install espeak-ng)")
    subprocess.run([espeak, "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
    speech, rate = soundfile.read(str(raw), dtype="float32", always_2d=True)
    samples = signal.resample_poly(speech.mean(axis=1), SAMPLE_RATE, rate).astype(np.float32)
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[loud[0] : loud[-1] + 1] if len(loud) else samples


def make_clip(voice: str, speed: int, phrases: list[str], workdir: Path) -> np.ndarray:
    """Phrases separated by pauses, with a short lead-in and tail of silence, peak-normalised to -3 dBFS."""
    pause = np.zeros(int(PAUSE_S * SAMPLE_RATE), dtype=np.float32)
    edge = np.zeros(int(0.2 * SAMPLE_RATE), dtype=np.float32)
    parts = [edge]
    for index, phrase in enumerate(phrases):
        if index:
            parts.append(pause)
        parts.append(synthesize(phrase, voice, speed, workdir))
    parts.append(edge)
    clip = np.concatenate(parts)
    return clip * (10 ** (-3 / 20) / np.max(np.abs(clip)))


def make_portraits(out: Path) -> None:
    """The astronaut as PNG, and a tighter, mirrored, non-square JPEG crop of it for variety."""
    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(out / "astronaut.png", optimize=True)
    closeup = Image.fromarray(astronaut[10:330, 80:336][:, ::-1]).resize((384, 480), Image.Resampling.LANCZOS)
    closeup.save(out / "astronaut_closeup.jpg", quality=90)


# (item_id, portrait, audio, prompt, seed); URIs are relative to the manifest's folder
DEMO_ROWS = (
    ("hello-astronaut", "demo/astronaut.png", "demo/hello_en_us.wav", "A friendly astronaut greets the audience.", 1),
    ("fox-closeup", "demo/astronaut_closeup.jpg", "demo/fox_en_f.wav", "A calm narrator reads a pangram.", 2),
    ("pauses-astronaut", "demo/astronaut.png", "demo/pauses_en_gb.wav", "A speaker pauses between phrases.", 3),
)


def make_manifest(path: Path) -> None:
    """The demo manifest, with the schema's column types (strings, int64 seed)."""
    columns = list(zip(*DEMO_ROWS))
    table = pa.table({
        "item_id": pa.array(columns[0], pa.string()), "portrait_uri": pa.array(columns[1], pa.string()),
        "audio_uri": pa.array(columns[2], pa.string()), "prompt": pa.array(columns[3], pa.string()),
        "seed": pa.array(columns[4], pa.int64()),
    })
    pq.write_table(table, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    make_portraits(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        for file_name, voice, speed, phrases in CLIPS:
            clip = make_clip(voice, speed, phrases, Path(tmp))
            soundfile.write(str(args.out / file_name), clip, SAMPLE_RATE, subtype="PCM_16")
            logger.info("%s: %.2f s", file_name, len(clip) / SAMPLE_RATE)
    make_manifest(args.out.parent / "demo.parquet")


if __name__ == "__main__":
    main()
