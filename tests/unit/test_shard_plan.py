"""Planning shards of a manifest, and what `avatar-batch setup` reads and installs (pure, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.errors import ConfigurationError
from flows.setup import crash_automation, pending_automation, read_deployments
from flows.shards import plan_shards, sharded
from manifests import ManifestRow
from tasks.config import ShardConfig

REPO = Path(__file__).resolve().parents[2]


def rows(groups: list[tuple[str, str | None, int]]) -> list[ManifestRow]:
    """Rows of each (portrait, prompt, count) group, interleaved the way a studio's catalog lists them."""
    out, pending = [], [[(portrait, prompt)] * count for portrait, prompt, count in groups]
    while any(pending):
        for group in pending:
            if group:
                portrait, prompt = group.pop()
                out.append(ManifestRow(row=len(out), item_id=f"i{len(out)}", portrait_uri=portrait,
                                       audio_uri=f"a{len(out)}.wav", prompt=prompt))
    return out


def test_rows_of_one_portrait_and_prompt_share_a_shard_when_they_fit():
    manifest = rows([("alice.png", "calm", 3), ("bob.png", "calm", 3), ("alice.png", "excited", 2),
                     ("carol.png", None, 1)])
    shards = plan_shards(manifest, rows_per_shard=3)
    by_row = {r.row: (r.portrait_uri, r.prompt) for r in manifest}
    assert sorted(i for s in shards for i in s.rows) == list(range(len(manifest)))  # every row exactly once
    assert all(len(s.rows) <= 3 for s in shards) and len(shards) == 3
    for shard in shards:  # a group is never cut when it fits: each group's rows are in one shard
        groups = {by_row[i] for i in shard.rows}
        assert all({i for i in range(len(manifest)) if by_row[i] == g} <= set(shard.rows) for g in groups)
    assert [s.index for s in shards] == [0, 1, 2] and [s.rows[0] for s in shards] == sorted(s.rows[0] for s in shards)
    assert plan_shards(manifest, rows_per_shard=3) == shards  # the same plan every time


def test_a_group_larger_than_a_shard_spreads_over_the_pool():
    manifest = rows([("alice.png", "calm", 10), ("bob.png", "calm", 2)])
    shards = plan_shards(manifest, rows_per_shard=4)
    assert [len(s.rows) for s in shards] == [4, 4, 4]  # alice's ten rows in three pieces, bob's two with the last
    bob = {r.row for r in manifest if r.portrait_uri == "bob.png"}
    assert any(bob <= set(s.rows) for s in shards)
    assert sorted(i for s in shards for i in s.rows) == list(range(12))


def test_small_manifests_and_no_deployment_render_in_one_run():
    assert not sharded(ShardConfig(), 10_000)
    assert not sharded(ShardConfig(deployment="render-shard/shard", min_rows=200), 199)
    assert sharded(ShardConfig(deployment="render-shard/shard", min_rows=200), 200)


def test_setup_reads_the_pools_and_heartbeat_of_prefect_yaml_and_refuses_a_deployment_it_could_not_watch(tmp_path):
    assert read_deployments(REPO / "prefect.yaml") == ({"avatar-render"}, 30)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    spec["deployments"][0]["work_pool"] = {"name": "avatar-render", "job_variables": {}}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigurationError, match="PREFECT_FLOWS_HEARTBEAT_FREQUENCY"):
        read_deployments(tmp_path / "prefect.yaml")


def test_the_crash_automation_watches_only_avatar_batch_runs_for_missed_heartbeats():
    automation = crash_automation(heartbeat=30, missed=3)
    trigger = automation.trigger
    assert trigger.within.total_seconds() == 90 and trigger.posture == "Proactive"
    assert "prefect.flow-run.heartbeat" in trigger.after and "prefect.flow-run.Completed" in trigger.expect
    related = automation.model_dump(mode="json")["trigger"]["match_related"]
    assert related == {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.avatar-batch"}
    assert automation.actions[0].state.value == "CRASHED"


def test_the_pending_automation_crashes_a_run_its_worker_never_started():
    automation = pending_automation(pending_timeout=600)
    trigger = automation.trigger
    assert trigger.within.total_seconds() == 600 and trigger.posture == "Proactive"
    assert trigger.after == {"prefect.flow-run.Pending"}
    assert "prefect.flow-run.Running" in trigger.expect and "prefect.flow-run.Crashed" in trigger.expect
    assert "prefect.flow-run.heartbeat" not in trigger.expect  # no run sends one before it starts
    related = automation.model_dump(mode="json")["trigger"]["match_related"]
    assert related == {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.avatar-batch"}
    assert automation.actions[0].state.value == "CRASHED" and "Pending for 600 s" in automation.actions[0].message
