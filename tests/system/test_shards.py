"""A manifest spread over a process work pool with two workers, on a Prefect server backed by PostgreSQL: 12 rows in
4 shards, one worker SIGKILLed mid-shard. The lost shard is marked Crashed by `avatar-batch setup`'s heartbeat
automation and dispatched again; the merged results hold every row once, the items published before the kill are
not rendered again, and nothing half-written is visible."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pandas as pd
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactCollectionFilter,
    ArtifactCollectionFilterKey,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterName,
)
from prefect.exceptions import ObjectNotFound

from flows.local_server import stop_process
from tasks.graph import GRAPHS

pytestmark = pytest.mark.system
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _worker(env: dict[str, str], name: str, log: Path) -> subprocess.Popen:
    """One worker per GPU: the queue of shards, at most one shard at a time (`--limit 1`)."""
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "avatar-render", "--type", "process",
                             "--work-queue", "shards", "--name", name, "--limit", "1"], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _shard_runs(client: SyncPrefectClient, stem: str) -> list:
    like = FlowRunFilter(name=FlowRunFilterName(like_=f"render-{stem}-"))
    return client.read_flow_runs(flow_run_filter=like)


def _runs_of(client: SyncPrefectClient, manifest: Path) -> list:
    """The shard runs of one manifest, named or not (a run is named when it starts)."""
    shard = client.read_deployment_by_name("render-shard/shard")
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(
        any_=[shard.id])))
    return [run for run in runs if run.parameters.get("manifest_uri") == str(manifest)]


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_sharded_manifest_survives_a_killed_worker(tmp_path, catalog12, prefect_server_pg, postgres_url, cli):
    env = {**os.environ, **prefect_server_pg, "AVATAR_BATCH_HOME": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    with SyncPrefectClient(prefect_server_pg["PREFECT_API_URL"]) as client:  # another test may have made it
        try:
            client.delete_work_pool("avatar-render")
        except ObjectNotFound:
            pass
    setup = cli(["setup", "--missed-heartbeats", "2"], {**prefect_server_pg, "AVATAR_BATCH_HOME": str(REPO)})
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "work pool avatar-render: created" in setup.stderr and "silent for 2 x 30 s" in setup.stderr
    again = cli(["setup", "--missed-heartbeats", "2"], {**prefect_server_pg, "AVATAR_BATCH_HOME": str(REPO)})
    assert again.returncode == 0 and "avatar-render: exists" in again.stderr and ": updated" in again.stderr

    (manifest, item_ids), out = catalog12, tmp_path / "out"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"shards": {"min_rows": 4, "poll_seconds": 1}}))
    workers = {name: _worker(env, name, tmp_path / f"{name}.log") for name in ("worker-a", "worker-b")}
    render = subprocess.Popen([str(BIN / "avatar-batch"), "render", str(manifest), "--output", str(out),
                               "--config", str(config), "--shard-deployment", "render-shard/shard",
                               "--rows-per-shard", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    videos = out / "videos"
    killed, before = None, {}
    try:
        with SyncPrefectClient(prefect_server_pg["PREFECT_API_URL"]) as client:
            deadline = time.monotonic() + 240
            while killed is None:
                assert render.poll() is None and time.monotonic() < deadline, "no shard was caught mid-way"
                for run in _shard_runs(client, "catalog12"):
                    ids = [item_ids[r] for r in run.parameters["rows"]]
                    done = [i for i in ids if (videos / f"{i}.json").exists()]
                    if run.state.is_running() and run.infrastructure_pid and 0 < len(done) < len(ids):
                        pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
                        owner = next(n for n, w in workers.items() if w.pid == _parent_pid(pid))
                        before = {i: (videos / f"{i}.mp4").stat() for i in done}
                        os.kill(pid, signal.SIGKILL)  # the machine is gone: its flow run and its worker
                        os.killpg(workers[owner].pid, signal.SIGKILL)
                        killed = (run, owner)
                        break
                time.sleep(0.2)
        stdout, stderr = render.communicate(timeout=420)
    finally:
        render.kill()
        for worker in workers.values():
            stop_process(worker.pid)
            worker.wait(timeout=30)
    assert render.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "ERROR" not in stderr and "Traceback" not in stderr, stderr[-3000:]

    # every row once, all rendered; the shard tables were merged and removed
    results = pd.read_parquet(out / "results.parquet")
    assert list(results["row"]) == list(range(12)) and (results["status"] == "succeeded").all()
    assert json.loads((out / "summary.json").read_text())["items"] == 12
    assert not (out / ".cache" / "shards").exists() or not any((out / ".cache" / "shards").rglob("*.parquet"))

    # four shards, each one portrait and prompt; the killed one Crashed by the automation, then ran again
    lost, _ = killed
    with SyncPrefectClient(prefect_server_pg["PREFECT_API_URL"]) as client:
        runs = _shard_runs(client, "catalog12")
        latest = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
            key=ArtifactCollectionFilterKey(any_=["render-catalog12-shards", "render-catalog12-progress"])))
    shown = {a.key: a for a in latest}
    table = json.loads(shown["render-catalog12-shards"].data)
    assert [r["rows"] for r in table] == [3, 3, 3, 3] and sorted(r["dispatches"] for r in table) == [1, 1, 1, 2]
    assert shown["render-catalog12-progress"].data == 100.0
    by_rows: dict[tuple, list] = {}
    for run in runs:
        by_rows.setdefault(tuple(run.parameters["rows"]), []).append(run)
    assert sorted(by_rows) == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]
    retried = by_rows[tuple(lost.parameters["rows"])]
    assert sorted(r.state.name for r in retried) == ["Completed", "Crashed"], [r.state for r in retried]
    crashed = next(r for r in retried if r.state.name == "Crashed")
    assert "no heartbeat" in (crashed.state.message or "")
    assert all(len(v) == 1 and v[0].state.name == "Completed" for k, v in by_rows.items() if v is not retried)

    # what the killed shard had published stays as it was: found by its render key, never rendered again
    stages = len(GRAPHS["preview"].names)
    for item, stat in before.items():
        now = (videos / f"{item}.mp4").stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), item
        assert int(results.loc[results["item_id"] == item, "cache_hits"].iloc[0]) == stages, item

    # nothing half-written: exactly a video and a sidecar per item, each video whole
    assert sorted(p.name for p in videos.iterdir()) == sorted(f"{i}{ext}" for i in results["item_id"]
                                                              for ext in (".json", ".mp4"))
    for row in results.itertuples():
        with av.open(row.output_uri) as container:
            assert sum(1 for _ in container.decode(video=0)) == row.frame_count

    # the production database holds the runs
    pg = subprocess.run(["psql", postgres_url.replace("+asyncpg", ""), "-tAc",
                         "select count(*) from flow_run where name like 'render-catalog12-%'"],
                        capture_output=True, text=True, check=True)
    assert int(pg.stdout.strip()) == len(runs) == 5


def test_a_shard_left_pending_by_a_vanished_worker_is_crashed_and_dispatched_again(tmp_path, catalog12,
                                                                                    prefect_server_pg, cli):
    """A worker that took a shard (Pending) and vanished before starting its process leaves no heartbeat to miss:
    the Pending automation crashes the run, and the parent dispatches the shard to a worker that is alive."""
    from prefect.states import Pending

    from flows.setup import ensure_automation, pending_automation

    api = prefect_server_pg["PREFECT_API_URL"]
    env = {**os.environ, **prefect_server_pg, "AVATAR_BATCH_HOME": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    setup = cli(["setup", "--missed-heartbeats", "2", "--pending-timeout", "10"],
                {**prefect_server_pg, "AVATAR_BATCH_HOME": str(REPO)})
    assert setup.returncode == 0 and "Pending for 10 s is marked Crashed" in setup.stderr, setup.stderr
    manifest, out = tmp_path / "three.parquet", tmp_path / "out"
    pd.read_parquet(catalog12[0]).head(3).to_parquet(manifest, index=False)  # one portrait and prompt: one shard
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"shards": {"min_rows": 1, "poll_seconds": 1}}))
    with SyncPrefectClient(api) as client:  # the workers an earlier test stopped may still count as online
        for gone in client.read_workers_for_work_pool("avatar-render"):
            client.request("DELETE", "/work_pools/{work_pool_name}/workers/{name}",
                           path_params={"work_pool_name": "avatar-render", "name": gone.name})
    render = subprocess.Popen([str(BIN / "avatar-batch"), "render", str(manifest), "--output", str(out),
                               "--config", str(config), "--shard-deployment", "render-shard/shard",
                               "--rows-per-shard", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    worker = None
    try:
        with SyncPrefectClient(api) as client:
            deadline = time.monotonic() + 120
            while not (runs := _runs_of(client, manifest)):
                if render.poll() is not None or time.monotonic() > deadline:
                    render.kill()
                    pytest.fail(f"the shard was never dispatched: {render.communicate()[1][-3000:]}")
                time.sleep(0.2)
            (taken,) = runs
            # what a worker does when it takes a run, and then nothing: it is gone
            assert client.set_flow_run_state(taken.id, Pending()).status.value == "ACCEPT"
        worker = _worker(env, "worker-alive", tmp_path / "worker.log")
        stdout, stderr = render.communicate(timeout=300)
    finally:
        render.kill()
        if worker is not None:
            stop_process(worker.pid)
            worker.wait(timeout=30)
        with SyncPrefectClient(api) as client:
            ensure_automation(client, pending_automation(600))  # the default again, for other runs on this server
    assert render.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "ERROR" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "no worker of pool avatar-render is online: the shards wait until one starts" in stderr  # one line
    results = pd.read_parquet(out / "results.parquet")
    assert list(results["row"]) == [0, 1, 2] and (results["status"] == "succeeded").all()
    with SyncPrefectClient(api) as client:
        runs = {run.id: run for run in _runs_of(client, manifest)}
    assert runs[taken.id].state.name == "Crashed", runs[taken.id].state
    assert "Pending for 10 s" in (runs[taken.id].state.message or "")
    (again,) = [run for run in runs.values() if run.id != taken.id]
    assert again.state.name == "Completed" and again.parameters["rows"] == [0, 1, 2]
