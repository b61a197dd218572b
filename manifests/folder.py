"""Build a manifest from a folder of portraits and audio files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from .schema import ManifestError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus", ".wma", ".aif", ".aiff"})


def _item_id(stem: str) -> str:
    """A safe id from a file name: anything outside ``[A-Za-z0-9._-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip(".")[:128] or "item"


def manifest_for_folder(folder: Path, manifest: Path, portrait: Path | None = None,
                        prompt: str | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """One row per audio file under ``folder`` (recursively), paired with a portrait, and the files skipped
    (neither image nor audio). URIs are relative to ``manifest``'s folder, so the manifest travels with its inputs.

    Raises `ManifestError` (one line naming the folder or file) when there are no portraits or no audio files, or
    an audio file has no portrait to pair with.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    audio = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [p for p in files if p not in audio and p not in images]
    portraits = [portrait] if portrait else images
    if not portraits:
        raise ManifestError(f"{folder}: no portrait images ({', '.join(sorted(IMAGE_SUFFIXES))}); add one or pass "
                            "--portrait")
    if not audio:
        raise ManifestError(f"{folder}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}); nothing to render")
    base = manifest.resolve().parent
    rows, used = [], set()
    for clip in audio:
        matches = [p for p in portraits if clip.stem.startswith(p.stem)]
        chosen = max(matches, key=lambda p: len(p.stem)) if matches else (portraits[0] if len(portraits) == 1 else None)
        if chosen is None:
            raise ManifestError(f"{clip}: no portrait whose name prefixes it among {len(portraits)}; name it "
                                "<portrait>_<line> or pass --portrait to use one for all")
        item_id, n = _item_id(clip.stem), 1
        while item_id in used:  # two names that sanitise alike ("a b.wav", "a_b.wav") still get two ids
            n += 1
            item_id = f"{_item_id(clip.stem)[:120]}-{n}"
        used.add(item_id)
        rows.append({"item_id": item_id, "portrait_uri": os.path.relpath(chosen.resolve(), base),
                     "audio_uri": os.path.relpath(clip.resolve(), base), "prompt": prompt, "seed": 0})
    frame = pd.DataFrame(rows, columns=["item_id", "portrait_uri", "audio_uri", "prompt", "seed"])
    frame["prompt"] = frame["prompt"].astype("string")
    frame["seed"] = frame["seed"].astype("int64")
    return frame, skipped
