"""prefect.yaml deploys against a real server, and `avatar-batch backfill` queues one run per day, once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

pytestmark = pytest.mark.system
REPO = Path(__file__).resolve().parents[2]


def _prefect(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args], cwd=REPO,
                          env={**os.environ, **env, "AVATAR_BATCH_HOME": str(REPO)}, capture_output=True,
                          text=True, timeout=300)


async def _runs(api_url: str) -> list:
    async with PrefectClient(api_url) as client:
        deployment = await client.read_deployment_by_name("nightly-render/nightly")
        only_it = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        return await client.read_flow_runs(deployment_filter=only_it)


def test_deploy_all_then_backfill_is_idempotent(prefect_server, cli):
    pool = _prefect(["work-pool", "create", "avatar-render", "--type", "process"], prefect_server)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = _prefect(["deploy", "--all"], prefect_server)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    for _ in range(2):
        done = cli(["backfill", "--start", "2026-11-01", "--end", "2026-11-03"], prefect_server)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = [r for r in asyncio.run(_runs(prefect_server["PREFECT_API_URL"])) if "backfill" in r.tags]
    assert sorted(str(r.parameters["day"]) for r in runs) == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert all("nightly" in r.tags for r in runs)  # deployment tags are inherited
