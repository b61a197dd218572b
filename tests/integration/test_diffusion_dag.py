"""The diffusion backend as a fan-out of cached stages (`tiny-random`: the real code with tiny random weights).

Counts come from two independent places: the Prefect API's task runs and the results table's per-stage hits.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from avatar_model.config import DiffusionConfig, VideoConfig
from avatar_model.hunyuan.pipeline import AvatarPipeline
from avatar_model.media.audio import read_wav
from avatar_model.media.video import probe
from flows.render_manifest import ItemsFailed, render_manifest
from tasks.config import PipelineConfig, RetryConfig
from tasks.models import process_models

ENCODERS = ("encode-audio", "encode-prompt", "encode-reference")


def tiny(**diffusion) -> PipelineConfig:
    return PipelineConfig(backend="tiny-random", video=VideoConfig(short_side=64),
                          diffusion=DiffusionConfig(**{"steps": 2, "device": "cpu", **diffusion}),
                          retry=RetryConfig(retries=1, base_delay_seconds=0.05))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, demo_dir: Path) -> dict[str, list[Path]]:
    """3 portraits (3 characters) and 12 distinct speech clips of 0.5-0.9 s."""
    folder = tmp_path_factory.mktemp("catalog")
    mirrored = np.asarray(Image.open(demo_dir / "astronaut.png").convert("RGB"))[:, ::-1]
    Image.fromarray(np.ascontiguousarray(mirrored)).save(folder / "mirrored.png")
    portraits = [demo_dir / "astronaut.png", demo_dir / "astronaut_closeup.jpg", folder / "mirrored.png"]
    speech, rate = read_wav(demo_dir / "hello_en_us.wav")
    clips = []
    for i in range(12):
        start, length = int((0.2 + 0.05 * i) * rate), int((0.5 + 0.035 * i) * rate)
        clips.append(folder / f"line{i:02d}.wav")
        sf.write(clips[-1], speech[start : start + length], rate, subtype="PCM_16")
    return {"portraits": portraits, "clips": clips}


def manifest(path: Path, catalog, rows: int = 12, seed_offset: int = 0) -> str:
    prompts = ["A man speaks to the camera.", "An astronaut reads a line.", "A woman explains calmly."]
    pd.DataFrame({
        "item_id": [f"line{i:02d}" for i in range(rows)],
        "portrait_uri": [str(catalog["portraits"][i % 3]) for i in range(rows)],
        "audio_uri": [str(catalog["clips"][i]) for i in range(rows)],
        "prompt": [prompts[i % 3] for i in range(rows)],
        "seed": [seed_offset + i for i in range(rows)],
    }).to_parquet(path, index=False)
    return str(path)


def task_runs(flow_run_id: str, expected: int) -> list:
    """The flow run's task runs once the API has recorded all ``expected`` in a final state."""
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         limit=200)
            if sum(run.state is not None and run.state.is_final() for run in runs) >= expected:
                return runs
            if time.monotonic() > deadline:
                raise AssertionError(f"API recorded {len(runs)} task runs, expected {expected}")
            time.sleep(0.5)


def counts(runs, state: str) -> Counter:
    """Task runs per stage name (runs are named <stage>-<item>) that ended in ``state``."""
    return Counter(run.name.rsplit("-line", 1)[0] for run in runs if run.state.name == state)


def test_encoders_run_once_per_portrait_or_clip_and_a_new_seed_reruns_only_the_sampler(tmp_path, catalog):
    out = tmp_path / "out"
    first = render_manifest(manifest(tmp_path / "m1.parquet", catalog), str(out), config=tiny())
    results = pd.read_parquet(out / "results.parquet")
    assert first["succeeded"] == 12
    # 12 resolves + prepare_portrait 3 + prepare_audio 12 + encode_audio 12 + encode_prompt 3 + encode_reference 3
    # + denoise, decode, mux and publish 12 each
    ran = counts(task_runs(first["flow_run_id"], 12 + 3 + 12 + 12 + 3 + 3 + 4 * 12), "Completed")
    assert (ran["encode-prompt"], ran["encode-reference"], ran["encode-audio"]) == (3, 3, 12)
    assert (ran["prepare-portrait"], ran["denoise"], ran["decode"]) == (3, 12, 12)
    assert [int((~results[f"cached_{stage}"]).sum()) for stage in ("encode_prompt", "encode_reference",
                                                                    "encode_audio")] == [3, 3, 12]
    for row in results.itertuples():
        info = probe(row.output_uri)
        assert (info.video_codec, info.audio_codec, info.width, info.height) == ("h264", "aac", 64, 64)
        assert info.video_frames == row.frame_count == round(row.audio_seconds * 25)
    assert list((out / ".cache" / "encode_prompt").rglob("*.safetensors")), "tensors are cached as safetensors"

    again = render_manifest(manifest(tmp_path / "m2.parquet", catalog, seed_offset=100), str(out), config=tiny())
    rerun = pd.read_parquet(out / "results.parquet")
    runs = task_runs(again["flow_run_id"], 12 + 3 + 12 + 12 + 3 + 3 + 4 * 12)
    ran, cached = counts(runs, "Completed"), counts(runs, "Cached")
    assert set(ran) == {"resolve", "denoise", "decode", "mux", "publish"}
    assert all(ran[stage] == 12 for stage in ("denoise", "decode", "mux", "publish"))
    assert (cached["encode-prompt"], cached["encode-reference"], cached["encode-audio"]) == (3, 3, 12)
    for stage in ("prepare_portrait", "prepare_audio", "encode_audio", "encode_prompt", "encode_reference"):
        assert rerun[f"cached_{stage}"].all(), stage
    assert not rerun["cached_denoise"].any()
    assert (rerun["sha256"] != results["sha256"]).all(), "a new seed is a new video"


def test_stage_major_runs_every_encode_before_any_denoise_and_frees_the_encoders(tmp_path, catalog):
    out = tmp_path / "out"
    summary = render_manifest(manifest(tmp_path / "m.parquet", catalog, rows=4, seed_offset=200), str(out),
                              config=tiny(memory="stage-major"))
    assert summary["succeeded"] == 4
    runs = [run for run in task_runs(summary["flow_run_id"], 4 + 3 + 4 + 4 + 3 + 3 + 4 * 4) if run.start_time]
    last_encode = max(run.end_time for run in runs if run.name.startswith(ENCODERS))
    first_denoise = min(run.start_time for run in runs if run.name.startswith("denoise"))
    assert last_encode <= first_denoise
    assert not {"text_encoder", "whisper", "transformer"} & process_models().loaded()
    sidecar = json.loads(Path(pd.read_parquet(out / "results.parquet").iloc[0].sidecar_uri).read_text())
    assert sidecar["parameters"]["diffusion"]["memory"] == "stage-major"


def test_out_of_memory_retries_in_the_next_mode_and_the_sidecar_says_which(tmp_path, catalog, monkeypatch):
    real_sample, calls = AvatarPipeline.sample, Counter()

    def sample_oom_once(self, *args, **kwargs):
        calls["sample"] += 1
        if calls["sample"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(AvatarPipeline, "sample", sample_oom_once)
    out = tmp_path / "out"
    render_manifest(manifest(tmp_path / "m.parquet", catalog, rows=1, seed_offset=300), str(out), config=tiny())
    row = pd.read_parquet(out / "results.parquet").iloc[0]
    sidecar = json.loads(Path(row.sidecar_uri).read_text())
    assert row.status == "succeeded" and calls["sample"] == 2
    assert sidecar["stages"]["denoise"]["memory_mode"] == "release-others"
    assert sidecar["stages"]["decode"]["memory_mode"] == "default"


def test_out_of_memory_in_every_mode_is_permanent_and_names_the_modes(tmp_path, catalog, monkeypatch):
    def always_oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(AvatarPipeline, "sample", always_oom)
    out = tmp_path / "out"
    with pytest.raises(ItemsFailed):
        render_manifest(manifest(tmp_path / "m.parquet", catalog, rows=1, seed_offset=400), str(out),
                        config=tiny())
    row = pd.read_parquet(out / "results.parquet").iloc[0]
    assert (row.failed_stage, row.error_class, row.attempts) == ("denoise", "ResourceExhausted", 1)
    assert "default, release-others, no-step-cache" in row.error_message


def test_an_evicted_encoder_artifact_is_encoded_again_and_a_steps_change_reuses_the_resident_model(tmp_path,
                                                                                                  catalog):
    out = tmp_path / "out"
    render_manifest(manifest(tmp_path / "m1.parquet", catalog, rows=2, seed_offset=500), str(out), config=tiny())
    loads = process_models().loads["transformer"]
    evicted = list((out / ".cache" / "encode_prompt").rglob("*.safetensors"))
    assert evicted and list((out / ".cache" / "records").iterdir())
    for path in evicted:
        path.unlink()  # the Prefect records stay behind

    summary = render_manifest(manifest(tmp_path / "m2.parquet", catalog, rows=2, seed_offset=600), str(out),
                              config=tiny(steps=3))
    results = pd.read_parquet(out / "results.parquet")
    assert summary["succeeded"] == 2 and not results["cached_encode_prompt"].all()
    assert all(path.exists() for path in evicted), "re-encoded under the same key"
    ran = counts(task_runs(summary["flow_run_id"], 2 + 2 + 2 + 2 + 2 + 2 + 4 * 2), "Completed")
    assert ran["encode-prompt"] == 2
    assert process_models().loads["transformer"] == loads, "a steps change does not load the DiT again"


def test_a_bad_row_fails_alone_and_the_gpu_queue_goes_on(tmp_path, catalog):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 8)
    rows = pd.read_parquet(manifest(tmp_path / "m.parquet", catalog, rows=3, seed_offset=700))
    rows.loc[0, "audio_uri"] = str(broken)  # the first item's gpu stages never run; the others queue behind them
    rows.to_parquet(tmp_path / "mixed.parquet", index=False)
    with pytest.raises(ItemsFailed, match="1 of 3"):
        render_manifest(str(tmp_path / "mixed.parquet"), str(tmp_path / "out"), config=tiny())
    results = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("item_id")
    assert (results.loc["line00", "failed_stage"], results.loc["line00", "error_class"]) == ("prepare_audio",
                                                                                            "UndecodableAudio")
    assert results.loc["line00", "attempts"] == 1
    assert (results.loc[["line01", "line02"], "status"] == "succeeded").all()


def test_evicted_damaged_and_vouched_for_tensors_are_computed_again_and_the_video_is_the_same(tmp_path, catalog):
    """One rerun with every kind of fault in the tensor cache: an evicted and a damaged encoder output (caught
    before reuse by their checksums) and damaged latents whose record vouches for them (caught only when decode
    reads them, then repaired in the same run by submitting the item again)."""
    from cache_faults import artifact_of, assert_deliverable, damage, vouch_for

    cfg = tiny().model_copy(update={"cache_uri": str(tmp_path / "cache")})
    rows = manifest(tmp_path / "m.parquet", catalog, rows=1, seed_offset=300)
    render_manifest(rows, str(tmp_path / "first"), config=cfg)
    first = pd.read_parquet(tmp_path / "first" / "results.parquet").iloc[0]
    cache = tmp_path / "cache"
    good = {stage: (artifact_of(cache, stage), artifact_of(cache, stage).read_bytes())
            for stage in ("encode_audio", "encode_prompt", "encode_reference")}
    artifact_of(cache, "encode_audio").unlink()
    damage(artifact_of(cache, "encode_prompt"))
    damage(artifact_of(cache, "encode_reference"))
    latents = artifact_of(cache, "denoise")
    damage(latents)
    vouch_for(cache, latents)
    for reader in ("decode", "mux"):
        artifact_of(cache, reader).unlink()

    render_manifest(rows, str(tmp_path / "again"), config=cfg)
    row = assert_deliverable(tmp_path / "again", first["sha256"])
    for stage, (path, data) in good.items():  # the encoders ran again in the first pass, so the repair reused them
        assert path.read_bytes() == data, f"{stage} was not computed again"
    assert not row["cached_denoise"] and not row["cached_decode"], "the latents were not computed again"
    assert row["cached_prepare_portrait"] and row["cached_prepare_audio"]
