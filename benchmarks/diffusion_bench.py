"""Measured targets of the diffusion path (`tiny-random` on CPU), each taken within one run on this machine.

    python benchmarks/diffusion_bench.py [--rows 24] [--portraits 4] [--baseline 4481517]

(a) a catalog of ``rows`` lines over ``portraits`` characters: encoder calls (LLaVA + CLIP, Whisper, VAE encode)
    and wall time of the stage graph against the monolith it replaced (commit ``--baseline``, where one
    `generate` task encoded everything for every line), both from cold caches;
(b) orchestration overhead of the diffusion path: the flow against a plain loop of the same stage functions
    (`benchmarks/plain_loop.py`), same rows, cold caches; target ≤ 5 % of wall time.

Every run is a fresh process against one real `prefect server` started here. The baseline runs from a
`git worktree` of that commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo"
sys.path.insert(0, str(REPO / "tests" / "system"))
sys.path.insert(0, str(REPO / "benchmarks"))

# methods that each run one encoder, in the new pipeline and in the baseline
ENCODERS = {"new": ("encode_prompt", "encode_whisper", "encode_reference_posterior"),
            "baseline": ("encode_prompt", "encode_audio", "prepare_reference_latents")}

_RUN = """
import collections, json, sys, time
sys.path.insert(0, {code!r})
sys.path.insert(0, {bench!r})
from avatar_model.config import DiffusionConfig, VideoConfig
from avatar_model.hunyuan.pipeline import AvatarPipeline
from tasks.config import PipelineConfig
calls = collections.Counter()
def counted(name, method):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return method(*args, **kwargs)
    return wrapper
for name in {encoders!r}:
    setattr(AvatarPipeline, name, counted(name, getattr(AvatarPipeline, name)))
cfg = PipelineConfig(backend="tiny-random", video=VideoConfig(short_side=64),
                     diffusion=DiffusionConfig(steps={steps}, device="cpu"))
if {mode!r} == "loop":
    from plain_loop import run_plain
    wall = run_plain({manifest!r}, {output!r}, cfg)[0]
else:
    from flows.render_manifest import render_manifest
    extra = {{"backend": "tiny-random"}} if {mode!r} == "baseline" else {{}}  # the baseline's backend parameter won
    started = time.perf_counter()
    render_manifest(manifest_uri={manifest!r}, output_uri={output!r}, config=cfg, **extra)
    wall = time.perf_counter() - started
print(json.dumps({{"wall": wall, "calls": calls, "module": AvatarPipeline.__module__,
                   "file": sys.modules[AvatarPipeline.__module__].__file__}}))
"""


def catalog(tmp: Path, rows: int, portraits: int) -> Path:
    """``portraits`` distinct portraits (crops and mirrors of the demo faces) and ``rows`` distinct clips."""
    from avatar_model.media.audio import read_wav, write_wav

    base = [np.asarray(Image.open(DEMO / name).convert("RGB")) for name in ("astronaut.png", "astronaut_closeup.jpg")]
    faces = []
    for i in range(portraits):
        image = base[i % 2][:, ::-1] if (i // 2) % 2 else base[i % 2]
        image = image[8 * (i // 4):, 8 * (i // 4):]  # later ones are also cropped a little
        faces.append(tmp / f"portrait{i}.png")
        Image.fromarray(np.ascontiguousarray(image)).save(faces[-1])
    speech, rate = read_wav(DEMO / "fox_en_f.wav")
    clips = []
    for i in range(rows):
        start, length = int((0.1 + 0.02 * i) * rate), int((0.6 + 0.02 * (i % 10)) * rate)
        clips.append(tmp / f"line{i:02d}.wav")
        write_wav(clips[-1], speech[start : start + length], rate)
    manifest = tmp / "catalog.parquet"
    pd.DataFrame({
        "item_id": [f"line{i:02d}" for i in range(rows)],
        "portrait_uri": [str(faces[i % portraits]) for i in range(rows)],
        "audio_uri": [str(clip) for clip in clips],
        "prompt": [f"Character {i % portraits} speaks to the camera." for i in range(rows)],
        "seed": list(range(rows)),
    }).to_parquet(manifest, index=False)
    return manifest


def run(mode: str, code: Path, manifest: Path, output: Path, steps: int, env: dict[str, str]) -> dict:
    script = _RUN.format(code=str(code), bench=str(REPO / "benchmarks"), encoders=ENCODERS[
        "baseline" if mode == "baseline" else "new"], steps=steps, mode=mode, manifest=str(manifest),
        output=str(output))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=code,
                          env={**env, "PYTHONPATH": str(code)})
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["file"].startswith(str(code)):
        raise RuntimeError(f"{mode} ran {result['file']}, not the code under {code}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--portraits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--baseline", default="4481517", help="commit of the monolithic generate stage")
    parser.add_argument("--database", default=None,
                        help="the server's database (postgresql+asyncpg://…); default a fresh SQLite file")
    parser.add_argument("--only", choices=("a", "b"), default=None, help="measure only (a) or only (b)")
    args = parser.parse_args()
    from conftest import free_port
    from pipeline_bench import _start_server, print_table

    with tempfile.TemporaryDirectory(prefix="avatar-diffusion-bench-") as tmp_name:
        tmp = Path(tmp_name)
        manifest = catalog(tmp, args.rows, args.portraits)
        baseline = tmp / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
        server = _start_server(tmp, free_port(), args.database)
        env = {**os.environ}
        skipped = {"wall": float("nan"), "calls": {}}
        try:
            graph = run("flow", REPO, manifest, tmp / "graph", args.steps, env) if args.only != "b" else skipped
            old = run("baseline", baseline, manifest, tmp / "old", args.steps, env) if args.only != "b" else skipped
            loop = run("loop", REPO, manifest, tmp / "loop", args.steps, env) if args.only != "a" else skipped
            flow = run("flow", REPO, manifest, tmp / "flow", args.steps, env) if args.only != "a" else skipped
        finally:
            server.terminate()
            server.wait(timeout=30)
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False)

    new_calls = [graph["calls"].get(name, 0) for name in ENCODERS["new"]]
    old_calls = [old["calls"].get(name, 0) for name in ENCODERS["baseline"]]
    overhead = (flow["wall"] - loop["wall"]) / flow["wall"]
    rows = [
        (f"(a) encoder calls, {args.rows} rows / {args.portraits} portraits: prompt, audio, reference",
         f"graph {new_calls} vs monolith {old_calls}", f"{sum(new_calls)} vs {sum(old_calls)}", "-", None),
        ("(a) wall time, stage graph / monolith, cold caches", f"{graph['wall']:.1f} s vs {old['wall']:.1f} s",
         f"{graph['wall'] / old['wall']:.2f}×", "-", None),
        ("(b) orchestration overhead, flow vs plain loop", f"flow {flow['wall']:.1f} s vs loop {loop['wall']:.1f} s",
         f"{overhead:.1%}", "≤ 5 %", overhead <= 0.05),
    ]
    database = "PostgreSQL" if args.database else "SQLite"
    print(f"\nmachine: {os.cpu_count()} cores, python {sys.version.split()[0]}, tiny-random, {args.steps} steps, "
          f"server on {database}\n")
    print_table(rows)
    print(json.dumps({"graph": graph, "baseline": old, "loop": loop, "flow": flow}))


if __name__ == "__main__":
    main()
