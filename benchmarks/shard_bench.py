"""Throughput of a sharded manifest: one worker pinned to one core against two workers pinned to a core each.

    python benchmarks/shard_bench.py [--shards 4] [--rows-per-shard 8] [--clip-seconds 6] [--database-url URL]

A real `prefect server` on 127.0.0.1 (SQLite, or the PostgreSQL at ``--database-url``), `avatar-batch setup`, then
the same manifest of preview items (a distinct clip per row, one portrait, a prompt per shard, so every shard
costs the same) rendered through `avatar-batch render --shard-deployment render-shard/shard` from a fresh output,
first with one process worker (`taskset -c 0`, `--limit 1`), then with two (cores 0 and 1).
Target: 2 workers / 1 worker throughput ≥ 1.7×.

The orchestration share is the part of the workers' core time not spent in the stage functions: the same rows in
a plain loop on one core (`plain_loop.py`, no Prefect) take ``loop`` seconds, so share = 1 - loop / (wall x workers).
The server and the parent run share the same two cores with the workers.

The machine's own ceiling, measured in the same run: two plain loops at once, one per core, each over half the
rows, against the one loop over all of them. Two vCPUs are not always two cores' worth of work (a neighbour on the
host, a shared physical core), and no orchestration can scale past what the cores do without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "system"))
sys.path.insert(0, str(REPO / "benchmarks"))

from conftest import free_port  # noqa: E402 - the tests' helper
from pipeline_bench import _speech, _start_server, _tree_cpu_seconds, print_table  # noqa: E402 - shared with the preview bench

from flows.local_server import stop_process  # noqa: E402

_LOOP = """
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {bench!r})
from plain_loop import run_plain
from tasks.config import PipelineConfig
print(run_plain({manifest!r}, {output!r}, PipelineConfig())[0])
"""


def _manifest(tmp: Path, shards: int, rows_per_shard: int, clip_seconds: float) -> Path:
    rows = []
    for shard in range(shards):
        for line in range(rows_per_shard):
            audio = _speech(clip_seconds + 0.04 * len(rows), tmp / f"line{len(rows)}.wav")
            rows.append({"item_id": f"s{shard}-line{line}", "portrait_uri": str(DEMO / "astronaut.png"),
                         "audio_uri": str(audio), "prompt": f"take {shard}", "seed": len(rows)})
    path = tmp / "catalog.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _plain_loops(manifest: Path, tmp: Path, cores: list[int]) -> float:
    """Wall seconds of one plain loop per core in ``cores``, at once, each over its share of the manifest's rows."""
    frame = pd.read_parquet(manifest)
    loops = []
    for n, core in enumerate(cores):
        part = tmp / f"part{len(cores)}-{n}.parquet"
        frame.iloc[n::len(cores)].to_parquet(part, index=False)
        script = _LOOP.format(repo=str(REPO), bench=str(REPO / "benchmarks"), manifest=str(part),
                              output=str(tmp / f"loop{len(cores)}-{n}"))
        loops.append(subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", script],
                                      stdout=subprocess.DEVNULL))
    started = time.perf_counter()
    if any(loop.wait() != 0 for loop in loops):
        raise RuntimeError("a plain loop failed")
    return time.perf_counter() - started


def _online_workers(n: int, timeout: float = 60) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while sum(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool("avatar-render")) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} worker(s) did not come online")
            time.sleep(0.5)


def _sharded_render(manifest: Path, output: Path, cores: list[int], rows_per_shard: int, tmp: Path,
                    server_pid: int) -> tuple[float, float]:
    """Wall seconds of `avatar-batch render` over a pool of one pinned worker per core in ``cores``, and the
    server's CPU seconds meanwhile."""
    env = {**os.environ, "AVATAR_BATCH_HOME": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    workers = [subprocess.Popen(["taskset", "-c", str(core), str(BIN / "prefect"), "worker", "start", "--pool",
                                 "avatar-render", "--work-queue", "shards", "--type", "process", "--limit", "1",
                                 "--name", f"bench-{len(cores)}-{core}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True) for core in cores]
    try:
        _online_workers(len(cores))
        config = tmp / "shards.json"
        config.write_text(json.dumps({"shards": {"min_rows": 1, "poll_seconds": 1}}))
        started, server_cpu = time.perf_counter(), _tree_cpu_seconds(server_pid)
        done = subprocess.run([str(BIN / "avatar-batch"), "render", str(manifest), "--output", str(output),
                               "--config", str(config), "--shard-deployment", "render-shard/shard",
                               "--rows-per-shard", str(rows_per_shard), "--quiet"], env=env, capture_output=True,
                              text=True, check=False)
        wall, server_cpu = time.perf_counter() - started, _tree_cpu_seconds(server_pid) - server_cpu
        if done.returncode != 0:
            raise RuntimeError(f"the sharded render failed: {done.stderr[-2000:]}")
        return wall, server_cpu
    finally:
        for worker in workers:
            stop_process(worker.pid)  # SIGKILL after 15 s: a worker slow to shut down must not end the benchmark
            worker.wait(timeout=30)
        time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows-per-shard", type=int, default=8)
    parser.add_argument("--clip-seconds", type=float, default=6.0)
    parser.add_argument("--database-url", default=None, help="postgresql+asyncpg://… for the server (else SQLite)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shard-bench-"))
    server = _start_server(tmp, free_port(), args.database_url)
    try:
        setup = subprocess.run([str(BIN / "avatar-batch"), "setup"], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "AVATAR_BATCH_HOME": str(REPO)}, check=False)
        if setup.returncode != 0:
            raise RuntimeError(setup.stderr)
        manifest = _manifest(tmp, args.shards, args.rows_per_shard, args.clip_seconds)
        loop = float(subprocess.run(["taskset", "-c", "0", sys.executable, "-c", _LOOP.format(
            repo=str(REPO), bench=str(REPO / "benchmarks"), manifest=str(manifest), output=str(tmp / "loop"))],
            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        one_loop, two_loops = _plain_loops(manifest, tmp, [0]), _plain_loops(manifest, tmp, [0, 1])
        one, one_cpu = _sharded_render(manifest, tmp / "one", [0], args.rows_per_shard, tmp, server.pid)
        two, two_cpu = _sharded_render(manifest, tmp / "two", [0, 1], args.rows_per_shard, tmp, server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = args.shards * args.rows_per_shard
    print(f"{rows} preview rows ({args.clip_seconds:.0f} s clips) in {args.shards} shards; server on "
          f"{'PostgreSQL' if args.database_url else 'SQLite'}")
    print_table([
        ("throughput, 2 pinned workers / 1 pinned worker", f"{one:.1f} s vs {two:.1f} s", f"{one / two:.2f}×",
         "≥ 1.7×", one / two >= 1.7),
        ("(info) plain loop on one core, no Prefect", f"{loop:.1f} s", "–", "–", None),
        ("(info) the machine's ceiling: 2 plain loops, one per core, half the rows each / 1 loop",
         f"{one_loop:.1f} s vs {two_loops:.1f} s", f"{one_loop / two_loops:.2f}×", "–", None),
        ("(info) scaling efficiency: the throughput ratio / the machine's ceiling", "–",
         f"{one / two / (one_loop / two_loops):.0%}", "–", None),
        ("(info) orchestration share, 1 worker", f"1 - {loop:.1f} / {one:.1f}", f"{1 - loop / one:.1%}", "–", None),
        ("(info) orchestration share, 2 workers", f"1 - {loop:.1f} / (2 x {two:.1f})",
         f"{1 - loop / (2 * two):.1%}", "–", None),
        ("(info) Prefect server CPU during the render, 1 / 2 workers", f"{one_cpu:.1f} / {two_cpu:.1f} CPU-s",
         f"{one_cpu / one:.0%} / {two_cpu / two:.0%} of wall", "–", None),
    ])
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
