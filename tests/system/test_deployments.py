"""prefect.yaml deploys against a real server and a process worker runs it; `avatar-batch backfill` queues one run
per day, once, lists each day's run, re-runs only the failed days with the deployment's current parameters, and
refuses what cannot work in one line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

from flows.local_server import stop_process

pytestmark = pytest.mark.system
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _prefect(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO,
                          env={**os.environ, **env, "AVATAR_BATCH_HOME": str(REPO)}, capture_output=True,
                          text=True, timeout=300, check=False)


async def _runs(api_url: str) -> list:
    async with PrefectClient(api_url) as client:
        deployment = await client.read_deployment_by_name("nightly-render/nightly")
        only_it = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        return await client.read_flow_runs(deployment_filter=only_it)


def _day_manifest(path: Path, demo_dir: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": [f"line-{i}" for i in range(rows)],
                  "portrait_uri": [str(demo_dir / "astronaut.png")] * rows,
                  "audio_uri": [str(demo_dir / "hello_en_us.wav")] * rows,
                  "seed": list(range(rows))}).to_parquet(path, index=False)


@pytest.fixture()
def worker(prefect_server):
    """A process worker on the avatar-render pool (created first, as the README does), polling every second, in
    the repository as its home."""
    pool = _prefect(["work-pool", "create", "avatar-render", "--type", "process", "--overwrite"], prefect_server)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    env = {**os.environ, **prefect_server, "AVATAR_BATCH_HOME": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    log = open(Path(prefect_server["PREFECT_HOME"]) / "worker.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "avatar-render", "--type",
                                "process"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    yield process
    stop_process(process.pid)
    process.wait(timeout=30)
    log.close()


def test_backfill_two_days_then_rerun_only_the_failed_one(tmp_path, demo_dir, prefect_server, worker, cli):
    catalog, renders = tmp_path / "catalog", tmp_path / "renders"
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    # the production override the README shows: where the day's manifests are and where its renders go
    nightly["parameters"] = {"manifest_template": f"{catalog}/{{date}}.parquet",
                             "output_template": f"{renders}/{{date}}"}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    deployed = _prefect(["deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml")], prefect_server)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    _day_manifest(catalog / "2026-11-01.parquet", demo_dir, rows=2)
    (catalog / "2026-11-02.parquet").write_bytes(b"not a parquet file")  # a broken day
    days = ["--start", "2026-11-01", "--end", "2026-11-02"]
    first = cli(["backfill", *days, "--wait"], prefect_server)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "nightly-2026-11-01" in first.stderr and "Completed" in first.stderr and "Failed" in first.stderr

    again = cli(["backfill", *days], prefect_server)  # nothing queued twice
    assert again.returncode == 0 and "queued" not in again.stderr and again.stderr.count("existing") == 2

    _day_manifest(catalog / "2026-11-02.parquet", demo_dir, rows=1)  # fixed
    rerun = cli(["backfill", *days, "--rerun-failed", "--wait"], prefect_server)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    runs = [r for r in asyncio.run(_runs(prefect_server["PREFECT_API_URL"])) if "backfill" in r.tags]
    by_day: dict[str, list] = {}
    for run in runs:
        by_day.setdefault(str(run.parameters["day"]), []).append(run)
    assert len(by_day["2026-11-01"]) == 1, "the completed day ran again"
    assert sorted(r.state.name for r in by_day["2026-11-02"]) == ["Completed", "Failed"]
    assert {r.name for r in runs} == {"nightly-2026-11-01", "nightly-2026-11-02"}
    assert all("nightly" in r.tags for r in runs)  # the deployment's tags are inherited
    for day, rows in (("2026-11-01", 2), ("2026-11-02", 1)):
        results = pd.read_parquet(renders / day / "results.parquet")
        assert len(results) == rows and (results["status"] == "succeeded").all()
        assert all(Path(uri).is_file() and Path(uri).parent == renders / day / "videos"
                   for uri in results["output_uri"])


def test_backfill_refuses_what_cannot_work_in_one_line(prefect_server, cli):
    cases = [
        (["--start", "2026-11-3", "--end", "2026-11-04"], prefect_server, "dates must be YYYY-MM-DD"),
        (["--start", "2026-11-04", "--end", "2026-11-01"], prefect_server, "is before --start"),
        (["--start", "2026-11-01", "--end", "2026-11-01", "--deployment", "nope/nothing"], prefect_server,
         "deployment 'nope/nothing' not found"),
        (["--start", "2026-11-01", "--end", "2026-11-01"], {"PREFECT_API_URL": "http://127.0.0.1:9/api"},
         "does not answer"),
        (["--start", "2026-11-01", "--end", "2026-11-01"], {"PREFECT_API_URL": ""}, "set PREFECT_API_URL"),
    ]
    for args, env, message in cases:
        done = cli(["backfill", *args], env)
        said = done.stdout + done.stderr
        assert done.returncode == 2 and message in said, said[-2000:]
        assert "Traceback" not in said and len(said.strip().splitlines()) <= 3, said
