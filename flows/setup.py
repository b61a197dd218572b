"""`avatar-batch setup`: make a Prefect server ready to run avatar-batch; safe to repeat (the compose stack's job).

It waits for the API, creates the work pool, registers the deployments of ``prefect.yaml`` and installs two
automations that mark a lost flow run Crashed, so that its parent dispatches the shard again:
- a silent run: the runs of those deployments send a heartbeat every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds
  (their job variables), so a run whose worker vanished stops sending them and ends Crashed after ``missed`` beats;
- a run stuck Pending: a worker that took a run and vanished before its process started leaves it Pending with no
  heartbeat ever sent; after ``pending_timeout`` seconds it ends Crashed (a run that starts later is refused, since
  Crashed is final, so a shard never renders twice at once).
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import yaml
from prefect.automations import AutomationCore, ChangeFlowRunState, EventTrigger, Posture
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from common.errors import ConfigurationError

CRASH_AUTOMATION = "avatar-batch: crash runs whose heartbeats stopped"
PENDING_AUTOMATION = "avatar-batch: crash runs stuck Pending"
HEARTBEAT_SETTING = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
TAG = "avatar-batch"  # every deployment of prefect.yaml carries it; the automation watches only their runs


def wait_for_api(client: SyncPrefectClient, api_url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (failure := client.api_healthcheck()) is not None:
        if time.monotonic() > deadline:
            raise ConfigurationError(f"the Prefect API at {api_url} did not answer within {seconds:.0f} s "
                                     f"({type(failure).__name__}); is the server running?")
        time.sleep(1)


def ensure_work_pool(client: SyncPrefectClient, name: str, pool_type: str = "process") -> bool:
    """Create the pool unless it exists; True when created."""
    try:
        client.read_work_pool(name)
        return False
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
        return True


def read_deployments(prefect_file: Path) -> tuple[set[str], int]:
    """The work pools of the deployments in ``prefect_file`` and the heartbeat interval of their runs (the
    slowest); every deployment must carry `TAG` and set the interval, or the automation could not watch it."""
    spec = yaml.safe_load(prefect_file.read_text())
    pools, beats = set(), []
    for deployment in spec.get("deployments") or []:
        pool = deployment.get("work_pool") or {}
        env = (pool.get("job_variables") or {}).get("env") or {}
        if not pool.get("name") or HEARTBEAT_SETTING not in env or TAG not in (deployment.get("tags") or []):
            raise ConfigurationError(f"deployment {deployment.get('name')!r} in {prefect_file} needs a work pool, "
                                     f"the tag {TAG!r} and {HEARTBEAT_SETTING} in its job variables' env (the crash "
                                     "automation relies on them)")
        pools.add(pool["name"])
        beats.append(int(env[HEARTBEAT_SETTING]))
    if not beats:
        raise ConfigurationError(f"{prefect_file} has no deployments")
    return pools, max(beats)


FINAL_EVENTS = frozenset({"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                          "prefect.flow-run.Crashed"})


def _crash_when_silent(name: str, description: str, after: set[str], expect: set[str], within: timedelta,
                       message: str) -> AutomationCore:
    """Prefect's zombie-run pattern, limited to avatar-batch's runs: after one of ``after``, expect one of
    ``expect`` within ``within``; else the run is Crashed."""
    return AutomationCore(
        name=name,
        description=description,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"},
            after=after,
            expect=expect,
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=within,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, force=True, message=message)],
    )


def crash_automation(heartbeat: int, missed: int) -> AutomationCore:
    """After a heartbeat (or the start), expect the next one, or a final state, within ``missed`` intervals."""
    return _crash_when_silent(
        CRASH_AUTOMATION,
        f"a flow run tagged {TAG} that sent no heartbeat for {missed} x {heartbeat} s lost its worker",
        after={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"},
        expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS}, within=timedelta(seconds=missed * heartbeat),
        message=f"no heartbeat for {missed * heartbeat} s: its worker is gone")


def pending_automation(pending_timeout: int) -> AutomationCore:
    """After Pending (a worker took the run), expect Running, or a final state, within ``pending_timeout`` seconds:
    long enough for a slow start (an image pull, a GPU node scaling up), or runs would be crashed that were
    about to start."""
    return _crash_when_silent(
        PENDING_AUTOMATION, f"a flow run tagged {TAG} still Pending after {pending_timeout} s lost its worker before "
        "it started", after={"prefect.flow-run.Pending"}, expect={"prefect.flow-run.Running", *FINAL_EVENTS},
        within=timedelta(seconds=pending_timeout),
        message=f"Pending for {pending_timeout} s: its worker is gone before the run started")


def ensure_automation(client: SyncPrefectClient, automation: AutomationCore) -> bool:
    """Create or replace the automation (one of that name); True when created."""
    existing = client.read_automations_by_name(automation.name)
    for old in existing:
        client.delete_automation(old.id)
    client.create_automation(automation)
    return not existing


def register_deployments(prefect_file: Path, home: Path) -> None:
    """`prefect deploy --all` from ``home`` (the workers' working directory): creates or updates each one."""
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                           str(prefect_file)], cwd=home, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise ConfigurationError(f"`prefect deploy --all` of {prefect_file} failed: {said[-1] if said else done}")
