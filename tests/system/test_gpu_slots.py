"""GPU slots are shared by every run on a machine: two flow runs started together never overlap a gpu stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

pytestmark = pytest.mark.system
GPU_STAGES = ("encode-audio", "encode-prompt", "encode-reference", "denoise", "decode")


def test_two_runs_started_together_take_turns_on_the_one_gpu(tmp_path, demo_dir, prefect_server):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"backend": "tiny-random", "gpu_slot": "gpu-test-host-0",
                                  "video": {"short_side": 64}, "diffusion": {"steps": 2, "device": "cpu"}}))
    commands = []
    for run in ("a", "b"):
        manifest = tmp_path / f"{run}.parquet"
        pd.DataFrame({"item_id": [f"{run}1", f"{run}2"],
                      "portrait_uri": [str(demo_dir / "astronaut.png"), str(demo_dir / "astronaut_closeup.jpg")],
                      "audio_uri": [str(demo_dir / "hello_en_us.wav"), str(demo_dir / "fox_en_f.wav")],
                      "prompt": ["A man speaks.", "An astronaut talks."]}).to_parquet(manifest)
        commands.append([str(Path(sys.executable).parent / "avatar-batch"), "render", str(manifest), "--output",
                         str(tmp_path / f"out-{run}"), "--config", str(config)])
    env = {**os.environ, **prefect_server}
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command in commands]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    flow_runs = [json.loads(stdout)["flow_run_id"] for stdout, _ in outputs]

    with SyncPrefectClient(prefect_server["PREFECT_API_URL"]) as client:
        limit = client.read_global_concurrency_limit_by_name("tag:gpu-test-host-0")
        deadline = time.monotonic() + 60
        while True:  # task-run states reach the API as events: wait until all gpu runs are recorded as ended
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_runs)),
                                         limit=200)
            gpu = sorted((run.start_time, run.end_time, run.flow_run_id) for run in runs
                         if run.name.startswith(GPU_STAGES) and run.start_time is not None and run.end_time)
            if len(gpu) >= 2 * 2 * len(GPU_STAGES) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert limit.limit == 1
    assert len(gpu) == 2 * 2 * len(GPU_STAGES), [run.name for run in runs]
    assert {flow_run for _, _, flow_run in gpu} == {run.flow_run_id for run in runs}, "both runs used the GPU"
    for (_, end, _), (start, _, _) in zip(gpu, gpu[1:]):
        assert start >= end, "two gpu stages overlapped"
