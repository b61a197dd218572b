from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """One temporary Prefect API (SQLite + server subprocess) for the whole integration session."""
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture()
def inputs(tmp_path: Path, demo_dir: Path) -> Path:
    """A folder of good and bad inputs, outside any output location."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(demo_dir / "astronaut.png", folder / "face.png")
    shutil.copy(demo_dir / "astronaut.png", folder / "same_face_other_name.png")
    shutil.copy(demo_dir / "hello_en_us.wav", folder / "hello.wav")
    shutil.copy(demo_dir / "fox_en_f.wav", folder / "fox.wav")
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    Image.fromarray(np.stack([gradient, gradient[::-1], gradient], axis=-1)).save(folder / "no_face.png")
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" + bytes(range(256)) * 4)
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    return folder


def _write_manifest(path: Path, rows: list[tuple[str, str, str]], **columns) -> str:
    frame = pd.DataFrame(rows, columns=["item_id", "portrait_uri", "audio_uri"])
    for name, values in columns.items():
        frame[name] = values
    frame.to_parquet(path, index=False)
    return str(path)


@pytest.fixture()
def write_manifest():
    """Write (item_id, portrait_uri, audio_uri) rows plus optional columns as a Parquet manifest."""
    return _write_manifest
