"""The preview renderer's look, before and after a change, and its speed.

    python benchmarks/preview_sheet.py [--before REV] [--output benchmarks/preview_sheet.png]

Renders both demo faces at a range of mouth openings and blinks, with the renderer of this checkout (and, with
``--before``, the one of an earlier commit, from a git worktree), into one labelled contact sheet. It also
measures the real-time factor of motion + render for a 20 s clip at 512 px (target ≥ 10× on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (mouth_open, blink, lip width): rest, opening, rounded ("oo") and spread ("ee"), a blink
POSES = [(0.0, 0.0, 0.0), (0.35, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.0, 0.0), (0.6, 0.0, -1.0), (0.6, 0.0, 1.0),
         (0.0, 0.6, 0.0), (0.0, 1.0, 0.0)]

RENDER = """
import json, sys, time
import numpy as np
sys.path.insert(0, {code!r})
from PIL import Image
from avatar_model.config import PreviewConfig, VideoConfig
from avatar_model.face.detector import detect_face
from avatar_model.media.image import load_image, resize_to_bucket
from avatar_model.preview.warp import PortraitWarp
rows = []
for name in ("astronaut.png", "astronaut_closeup.jpg"):
    img = resize_to_bucket(load_image(open({demo!r} + "/" + name, "rb").read()), 512)
    face = detect_face(img)
    warp = PortraitWarp(img, face, PreviewConfig())
    x0, y0 = max(0, int(face.x - 0.05 * face.w)), max(0, int(face.y + 0.1 * face.h))
    x1, y1 = int(face.x + 1.05 * face.w), int(face.y + 1.15 * face.h)
    def pose(m, b, w):
        try:
            return warp.frame(m, b, 0, 0, 0, w)
        except TypeError:  # a renderer from before lip width
            return warp.frame(m, b, 0, 0, 0)
    tiles = [np.asarray(Image.fromarray(pose(m, b, w)[y0:y1, x0:x1]).resize((160, 160))) for m, b, w in {poses!r}]
    rows.append(np.concatenate(tiles, axis=1))
Image.fromarray(np.concatenate(rows, axis=0)).save({out!r})
"""

SPEED = """
import sys, time
import numpy as np
sys.path.insert(0, {code!r})
from avatar_model.config import PreviewConfig, VideoConfig
from avatar_model.face.detector import detect_face
from avatar_model.media.audio import read_wav
from avatar_model.media.image import load_image, resize_to_bucket
from avatar_model.preview.renderer import PreviewRenderer
img = resize_to_bucket(load_image(open({demo!r} + "/astronaut.png", "rb").read()), 512)
speech, rate = read_wav({demo!r} + "/pauses_en_gb.wav")
speech = np.tile(speech, int(np.ceil(20 * rate / len(speech))))[: 20 * rate]
renderer = PreviewRenderer(PreviewConfig(), VideoConfig(short_side=512))
started = time.perf_counter()
track = renderer.generate([speech], rate, 500, seed=0)
for chunk in renderer.render(img, detect_face(img), track):
    pass
print(20.0 / (time.perf_counter() - started))
"""


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def _sheet(code_dir: Path, out: Path) -> None:
    _run(RENDER.format(code=str(code_dir), demo=str(REPO / "manifests" / "demo"), poses=POSES, out=str(out)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a commit to compare with (rendered from a git worktree)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "preview_sheet.png")
    args = parser.parse_args()
    from PIL import Image, ImageDraw

    with tempfile.TemporaryDirectory(prefix="avatar-sheet-") as tmp_name:
        tmp = Path(tmp_name)
        sheets = []
        if args.before:
            worktree = tmp / "before"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before],
                           check=True, capture_output=True)
            try:
                _sheet(worktree, tmp / "before.png")
                sheets.append((f"before ({args.before})", Image.open(tmp / "before.png").copy()))
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True)
        _sheet(REPO, tmp / "after.png")
        sheets.append(("now" if args.before else "preview", Image.open(tmp / "after.png").copy()))
    width = sheets[0][1].width
    labels = "   ".join(f"mouth {m:g} blink {b:g} width {w:+g}" for m, b, w in POSES)
    out = Image.new("RGB", (width, sum(s.height + 22 for _, s in sheets) + 18), "white")
    draw = ImageDraw.Draw(out)
    draw.text((6, 2), labels, fill="black")
    y = 18
    for title, sheet in sheets:
        draw.text((6, y + 4), title, fill="black")
        out.paste(sheet, (0, y + 20))
        y += sheet.height + 22
    out.save(args.output)
    speed = float(_run(SPEED.format(code=str(REPO), demo=str(REPO / "manifests" / "demo"))))
    print(json.dumps({"sheet": str(args.output), "real_time_factor_512px": round(speed, 1), "target": "≥ 10×",
                      "met": speed >= 10}))


if __name__ == "__main__":
    main()
