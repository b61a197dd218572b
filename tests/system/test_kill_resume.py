"""SIGKILL mid-run, then rerun: no partial MP4 is ever visible and only unfinished items render again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from avatar_model.media.video import probe

pytestmark = pytest.mark.system
ITEMS = 8


def test_sigkill_mid_run_then_rerun_finishes_only_the_rest(tmp_path, demo_dir, prefect_server, cli):
    manifest = tmp_path / "m.parquet"
    pd.DataFrame({
        "item_id": [f"line-{i}" for i in range(ITEMS)],
        "portrait_uri": [str(demo_dir / "astronaut.png")] * ITEMS,
        "audio_uri": [str(demo_dir / "pauses_en_gb.wav")] * ITEMS,
        "seed": list(range(ITEMS)),  # distinct renders of the same inputs
    }).to_parquet(manifest, index=False)
    out = tmp_path / "out"
    videos = out / "videos"

    env = {**os.environ, **prefect_server}
    run = subprocess.Popen(
        [str(Path(sys.executable).parent / "avatar-batch"), "render", str(manifest), "--output", str(out),
         "--max-workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(videos.glob("*.json")):
        assert run.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no item finished in time"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # the CLI and its ffmpeg children, no chance to clean up
    run.wait()

    finished = {p.stem for p in videos.glob("*.json")}
    assert 0 < len(finished) < ITEMS
    for mp4 in videos.glob("*.mp4"):  # whatever is visible under a final name is whole
        info = probe(mp4)
        assert info.video_frames > 0 and info.audio_streams == 1
    assert not [p for p in videos.iterdir() if p.is_file() and p.suffix not in (".mp4", ".json")]
    before = {p.name: p.read_bytes() for p in videos.glob("*.mp4") if p.stem in finished}

    rerun = cli(["render", str(manifest), "--output", str(out)], prefect_server)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    results = pd.read_parquet(out / "results.parquet").set_index("item_id")
    assert (results["status"] == "succeeded").all()
    for item in finished:
        assert results.loc[item, "cache_hits"] == 6, f"{item} was finished but rendered again"
        assert (videos / f"{item}.mp4").read_bytes() == before[f"{item}.mp4"]
    rendered_again = results[results["seconds_render"] > 0].index
    assert set(rendered_again).isdisjoint(finished) and len(rendered_again) >= 1
    assert sorted(p.name for p in videos.glob("*.mp4")) == sorted(f"line-{i}.mp4" for i in range(ITEMS))
    assert not (videos / ".partial").exists(), "the rerun swept what the killed run left half-copied"
