"""Build a manifest from a folder of portraits and audio files."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus", ".wma", ".aif", ".aiff"})


def _item_id(stem: str) -> str:
    """A safe id from a file name: anything outside ``[A-Za-z0-9._-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip(".")[:128] or "item"


def manifest_for_folder(folder: Path, portrait: Path | None = None, prompt: str | None = None) -> pd.DataFrame:
    """One row per audio file under ``folder`` (recursively), paired with a portrait.

    Raises ValueError when an audio file has no portrait to pair with, naming it.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    audio = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
    portraits = [portrait] if portrait else [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not portraits:
        raise ValueError(f"{folder}: no portrait images found")
    rows, used = [], set()
    for clip in audio:
        matches = [p for p in portraits if clip.stem.startswith(p.stem)]
        chosen = max(matches, key=lambda p: len(p.stem)) if matches else (portraits[0] if len(portraits) == 1 else None)
        if chosen is None:
            raise ValueError(f"{clip}: no portrait whose name prefixes it; pass --portrait to use one for all")
        item_id, n = _item_id(clip.stem), 1
        while item_id in used:  # two names that sanitise alike ("a b.wav", "a_b.wav") still get two ids
            n += 1
            item_id = f"{_item_id(clip.stem)[:120]}-{n}"
        used.add(item_id)
        rows.append({"item_id": item_id, "portrait_uri": str(chosen.resolve()),
                     "audio_uri": str(clip.resolve()), "prompt": prompt, "seed": 0})
    frame = pd.DataFrame(rows, columns=["item_id", "portrait_uri", "audio_uri", "prompt", "seed"])
    frame["prompt"] = frame["prompt"].astype("string")
    frame["seed"] = frame["seed"].astype("int64")
    return frame
