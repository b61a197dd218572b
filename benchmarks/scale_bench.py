"""Manifests of any length and clips of any length, preview backend, against a real `prefect server`.

    python benchmarks/scale_bench.py [--rows 100000] [--small 1000] [--minutes 2]

1. a manifest of ``--rows`` rows (one portrait, three demo clips, a seed per row) against one of ``--small`` rows:
   seconds until the first item is published (target ≤ 30 s for both) and peak RSS of the render process over
   its first ``--minutes`` minutes (target: large / small ≤ 1.5×)
2. peak RSS of one item with a 10-minute clip against a 1-minute clip (target ≤ 1.3×)

Each render runs through the `avatar-batch render` command in its own process, as an operator runs it; peak RSS
is that process's VmHWM, read just before it is stopped or as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "system"))
sys.path.insert(0, str(REPO / "benchmarks"))

from pipeline_bench import _speech, _start_server, print_table  # noqa: E402 - shared with the preview bench


def _peak_rss(pid: int) -> int:
    """VmHWM of ``pid`` in bytes (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def _render(manifest: Path, output: Path, limit_s: float) -> dict:
    """`avatar-batch render` for at most ``limit_s``: seconds to the first published item, peak RSS, items done."""
    videos = output / "videos"
    started = time.monotonic()
    process = subprocess.Popen([str(Path(sys.executable).parent / "avatar-batch"), "render", str(manifest),
                                "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    first, peak = None, 0
    while process.poll() is None and time.monotonic() - started < limit_s:
        peak = max(peak, _peak_rss(process.pid))
        if first is None and videos.is_dir() and any(videos.glob("*.json")):
            first = time.monotonic() - started
        time.sleep(0.25)
    peak = max(peak, _peak_rss(process.pid))
    finished = process.poll() is not None
    if not finished:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if first is None and videos.is_dir() and any(videos.glob("*.json")):
        first = time.monotonic() - started
    done = sum(1 for _ in videos.glob("*.json")) if videos.is_dir() else 0
    return {"first_s": first, "peak": peak, "done": done, "seconds": time.monotonic() - started,
            "finished": finished, "rc": process.returncode}


def _manifest(path: Path, rows: int, clips: list[Path]) -> Path:
    pd.DataFrame({
        "item_id": [f"line-{i:06d}" for i in range(rows)],
        "portrait_uri": [str(DEMO / "astronaut.png")] * rows,
        "audio_uri": [str(clips[i % len(clips)]) for i in range(rows)],
        "seed": list(range(rows)),
    }).to_parquet(path, index=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--minutes", type=float, default=2.0)
    args = parser.parse_args()
    from conftest import free_port  # the system tests' helper

    clips = [DEMO / "hello_en_us.wav", DEMO / "pauses_en_gb.wav", DEMO / "fox_en_f.wav"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="avatar-scale-") as tmp_name:
        tmp = Path(tmp_name)
        server = _start_server(tmp, free_port())
        try:
            limit = 60 * args.minutes
            small = _render(_manifest(tmp / "small.parquet", args.small, clips), tmp / "small", limit)
            large = _render(_manifest(tmp / "large.parquet", args.rows, clips), tmp / "large", limit)
            one_minute = _manifest(tmp / "minute.parquet", 1, [_speech(60.0, tmp / "minute.wav")])
            ten_minutes = _manifest(tmp / "ten.parquet", 1, [_speech(600.0, tmp / "ten.wav")])
            short = _render(one_minute, tmp / "minute", 900)
            long = _render(ten_minutes, tmp / "ten", 900)
        finally:
            server.terminate()
            server.wait(timeout=30)

    def first(run: dict) -> str:
        return "none published" if run["first_s"] is None else f"{run['first_s']:.1f} s"

    rss_ratio = large["peak"] / small["peak"]
    clip_ratio = long["peak"] / short["peak"]
    rows += [
        (f"first published item, {args.rows:,} rows", first(large), "", "≤ 30 s",
         large["first_s"] is not None and large["first_s"] <= 30),
        (f"first published item, {args.small:,} rows", first(small), "", "≤ 30 s",
         small["first_s"] is not None and small["first_s"] <= 30),
        (f"peak RSS over the first {args.minutes:g} min, {args.rows:,} / {args.small:,} rows",
         f"{large['peak'] / 2**20:.0f} MiB vs {small['peak'] / 2**20:.0f} MiB", f"{rss_ratio:.2f}×", "≤ 1.5×",
         rss_ratio <= 1.5),
        (f"(info) items published in {args.minutes:g} min, {args.rows:,} / {args.small:,} rows",
         f"{large['done']} / {small['done']}", "", "-", None),
        ("peak RSS of one item, 10-minute clip / 1-minute clip",
         f"{long['peak'] / 2**20:.0f} MiB vs {short['peak'] / 2**20:.0f} MiB", f"{clip_ratio:.2f}×", "≤ 1.3×",
         clip_ratio <= 1.3),
        ("(info) wall time of one item, 10-minute / 1-minute clip",
         f"{long['seconds']:.1f} s vs {short['seconds']:.1f} s (exit {long['rc']}, {short['rc']})", "", "-", None),
    ]
    print(f"\nmachine: {os.cpu_count()} cores, python {sys.version.split()[0]}\n")
    print_table(rows)
    print(json.dumps({"large": large, "small": small, "one_minute": short, "ten_minutes": long}))


if __name__ == "__main__":
    main()
