"""Measured targets of the preview pipeline, each a ratio taken within one run on this machine.

    python benchmarks/pipeline_bench.py [--items 20]

1. orchestration overhead: the render_manifest flow (one worker) against the same stage functions called in a
   plain loop, 20 items, both from cold caches; target ≤ 3 % of wall time
2. rerun of a finished manifest against the first run; target ≤ 10 %
3. peak RSS of one item with 60 s of audio against 5 s; target ≤ 1.2×
4. preview real-time factor at 512 px (audio seconds per second of motion + render); target ≥ 10×

The flow runs against a real `prefect server` started here (as in production), not the ephemeral one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "system"))
sys.path.insert(0, str(REPO / "benchmarks"))


def print_table(rows: list[tuple]) -> None:
    """(metric, measured, ratio, target, met) rows as the Markdown table benchmarks/README.md quotes."""
    print("| metric | measured | ratio | target | met |")
    print("|---|---|---|---|---|")
    for name, measured, ratio, target, met in rows:
        print(f"| {name} | {measured} | {ratio} | {target} | {'-' if met is None else 'yes' if met else 'NO'} |")


def _speech(seconds: float, path: Path) -> Path:
    """Demo speech clips with pauses, tiled to ``seconds``."""
    from avatar_model.media.audio import read_wav, write_wav

    clips = [read_wav(DEMO / n)[0] for n in ("hello_en_us.wav", "pauses_en_gb.wav", "fox_en_f.wav")]
    rate = read_wav(DEMO / "hello_en_us.wav")[1]
    gap = np.zeros(int(0.4 * rate), dtype=np.float32)
    parts, total, i = [], 0, 0
    while total < seconds * rate:
        parts += [clips[i % 3], gap]
        total += len(clips[i % 3]) + len(gap)
        i += 1
    write_wav(path, np.concatenate(parts)[: int(seconds * rate)], rate)
    return path


def _plain_loop(manifest: str, output: str) -> float:
    """The same stage functions, no Prefect: the floor the flow is compared with."""
    from plain_loop import run_plain
    from tasks.config import PipelineConfig

    return run_plain(manifest, output, PipelineConfig())[0]


def _tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and all its descendants (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_tree_cpu_seconds(c) for c in children)


def _drain_to_api() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def _flow(manifest: str, output: str, workers: int) -> float:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.render_manifest import render_manifest
    from tasks.config import PipelineConfig

    flow = render_manifest.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
    started = time.perf_counter()
    flow(manifest_uri=manifest, output_uri=output, config=PipelineConfig(max_workers=workers))
    return time.perf_counter() - started


_ONE_ITEM = """
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {bench!r})
import pandas as pd
from avatar_model.media.audio import read_wav
from plain_loop import run_plain
from tasks.config import PipelineConfig
pd.DataFrame({{"item_id": ["bench"], "portrait_uri": [{portrait!r}], "audio_uri": [{audio!r}]}}).to_parquet({manifest!r})
_, seconds = run_plain({manifest!r}, {output!r}, PipelineConfig())
samples, rate = read_wav({audio!r})
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(peak * 1024, seconds["motion"] + seconds["render"], len(samples) / rate)
"""


def _one_item(audio: Path, tmp: Path) -> tuple[int, float, float]:
    """Peak RSS (bytes), motion+render seconds and audio seconds of one item, in a fresh process."""
    code = _ONE_ITEM.format(repo=str(REPO), bench=str(REPO / "benchmarks"), output=str(tmp / f"out-{audio.stem}"),
                            manifest=str(tmp / f"{audio.stem}.parquet"), portrait=str(DEMO / "astronaut.png"),
                            audio=str(audio))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss, seconds, duration = out.stdout.split()[-3:]
    return int(rss), float(seconds), float(duration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20)
    args = parser.parse_args()
    from conftest import free_port  # the system tests' helper: same server start-up as there

    rows = []
    with tempfile.TemporaryDirectory(prefix="avatar-bench-") as tmp_name:
        tmp = Path(tmp_name)
        clips = [DEMO / "hello_en_us.wav", DEMO / "pauses_en_gb.wav", DEMO / "fox_en_f.wav"]
        manifest = tmp / "m.parquet"
        pd.DataFrame({
            "item_id": [f"item-{i:02d}" for i in range(args.items)],
            "portrait_uri": [str(DEMO / "astronaut.png")] * args.items,
            "audio_uri": [str(clips[i % 3]) for i in range(args.items)],
            "seed": list(range(args.items)),
        }).to_parquet(manifest, index=False)

        server = _start_server(tmp, free_port())
        try:
            loop_s = _plain_loop(str(manifest), str(tmp / "loop"))
            server_cpu = _tree_cpu_seconds(server.pid)
            flow_s = _flow(str(manifest), str(tmp / "flow"), workers=1)
            server_cpu = _tree_cpu_seconds(server.pid) - server_cpu
            rerun_s = _flow(str(manifest), str(tmp / "flow"), workers=1)
            parallel_s = _flow(str(manifest), str(tmp / "flow4"), workers=4)
        finally:
            _drain_to_api()  # the flows' last logs and events reach the server before it stops
            server.terminate()
            server.wait(timeout=30)
        overhead = (flow_s - loop_s) / flow_s
        rows += [
            ("orchestration overhead, 20 items, 1 worker", f"flow {flow_s:.2f} s vs loop {loop_s:.2f} s",
             f"{overhead:.1%}", "≤ 3 %", overhead <= 0.03),
            ("rerun of finished manifest / first run", f"{rerun_s:.2f} s vs {flow_s:.2f} s",
             f"{rerun_s / flow_s:.1%}", "≤ 10 %", rerun_s / flow_s <= 0.10),
            ("(info) flow with 4 workers / 1 worker", f"{parallel_s:.2f} s vs {flow_s:.2f} s",
             f"{parallel_s / flow_s:.2f}×", "-", None),
            ("(info) Prefect server CPU during the 1-worker flow, same 2 cores", f"{server_cpu:.2f} CPU-s",
             f"{server_cpu / flow_s:.1%} of wall", "-", None),
        ]
        short_rss, short_s, short_d = _one_item(_speech(5.0, tmp / "speech5.wav"), tmp)
        long_rss, long_s, long_d = _one_item(_speech(60.0, tmp / "speech60.wav"), tmp)
        rows += [
            ("peak RSS 60 s audio / 5 s audio", f"{long_rss / 2**20:.0f} MiB vs {short_rss / 2**20:.0f} MiB",
             f"{long_rss / short_rss:.2f}×", "≤ 1.2×", long_rss / short_rss <= 1.2),
            ("preview real-time factor, 512 px, 60 s clip", f"{long_d:.1f} s audio in {long_s:.2f} s",
             f"{long_d / long_s:.1f}×", "≥ 10×", long_d / long_s >= 10),
        ]

    print(f"\nmachine: {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB\n")
    print_table(rows)
    print(json.dumps({name: ratio for name, _, ratio, _, _ in rows}))


def _start_server(tmp: Path, port: int, database_url: str | None = None) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1 (SQLite under ``tmp``, or the PostgreSQL at ``database_url``)."""
    import urllib.request

    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port), "--no-ui"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = api
    return server


if __name__ == "__main__":
    main()
