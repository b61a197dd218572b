"""The `avatar-batch` command's contract: exit codes and the folder → manifest command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.system
BIN = Path(sys.executable).parent


@pytest.fixture()
def inputs_with_a_bad_row(tmp_path, demo_dir) -> Path:
    """Two good lines and one whose audio is not audio, as a manifest of absolute paths."""
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    audio = [demo_dir / "hello_en_us.wav", demo_dir / "fox_en_f.wav", broken]
    manifest = tmp_path / "lines.parquet"
    pd.DataFrame({"item_id": ["hello", "fox", "broken"], "portrait_uri": [str(demo_dir / "astronaut.png")] * 3,
                  "audio_uri": [str(a) for a in audio]}).to_parquet(manifest, index=False)
    return manifest


def test_make_manifest_then_validate_then_render_with_a_bad_row(tmp_path, demo_dir, prefect_server, cli):
    folder = tmp_path / "catalog"
    folder.mkdir()
    shutil.copy(demo_dir / "astronaut.png", folder / "astro.png")
    shutil.copy(demo_dir / "hello_en_us.wav", folder / "astro_hello.wav")
    (folder / "astro_broken.wav").write_bytes(b"not audio at all")
    manifest = tmp_path / "catalog.parquet"

    made = cli(["make-manifest", str(folder), "--output", str(manifest)], {})
    assert made.returncode == 0, made.stderr
    frame = pd.read_parquet(manifest)
    assert sorted(frame["item_id"]) == ["astro_broken", "astro_hello"]

    assert cli(["validate", str(manifest)], {}).returncode == 0

    rendered = cli(["render", str(manifest), "--output", str(tmp_path / "out")], prefect_server)
    assert rendered.returncode == 1
    assert "astro_broken" in rendered.stderr and "UndecodableAudio" in rendered.stderr
    results = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("item_id")
    assert results.loc["astro_hello", "status"] == "succeeded"
    assert results.loc["astro_broken", "status"] == "failed"


def test_unusable_manifest_exits_2_with_one_clear_message(tmp_path, cli):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"item_id": ["a"], "audio_uri": ["x.wav"]}).to_parquet(bad)
    for command in (["validate", str(bad)], ["render", str(bad), "--output", str(tmp_path / "out")]):
        done = cli(command, {})
        assert done.returncode == 2
        assert "missing required column(s) ['portrait_uri']" in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_configuration_exits_2_naming_the_problem(tmp_path, demo_dir, cli):
    config = tmp_path / "cfg.json"
    config.write_text('{"backend": "tiny-random", "video": {"crf": 99}}')
    done = cli(["render", str(demo_dir.parent / "demo.parquet"), "--output", str(tmp_path / "out"),
                "--config", str(config)], {})
    assert done.returncode == 2 and "crf" in done.stderr
    done = cli(["render", str(demo_dir.parent / "demo.parquet"), "--output", str(tmp_path / "out"),
                "--backend", "sora"], {})
    assert done.returncode == 2 and "unknown backend 'sora'" in done.stderr
    assert not (tmp_path / "out").exists()


def _run_count(api_url: str, runs: str = "task_runs") -> int:
    import httpx

    response = httpx.post(f"{api_url}/{runs}/count", json={}, timeout=30)
    response.raise_for_status()
    return int(response.json())


def test_hunyuan_avatar_run_level_checks_exit_2_before_any_task(tmp_path, demo_dir, prefect_server, cli):
    weights = tmp_path / "weights"
    checked = cli(["weights", "check", "--weights-dir", str(weights)], {})
    assert checked.returncode == 2
    assert "mp_rank_00_model_states.pt" in checked.stdout and "detface.pt" in checked.stdout

    before = _run_count(prefect_server["PREFECT_API_URL"])
    cases = {"weights": {"backend": "hunyuan-avatar", "diffusion": {"weights_dir": str(weights)}},
             "25 fps": {"backend": "hunyuan-avatar", "video": {"fps": 30}}}
    for expected, settings in cases.items():
        config = tmp_path / "cfg.json"
        config.write_text(json.dumps(settings))
        done = cli(["render", str(demo_dir.parent / "demo.parquet"), "--output", str(tmp_path / "out"),
                    "--config", str(config)], prefect_server)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "run refused" in done.stderr and expected in done.stderr
        assert "Traceback" not in done.stderr.split("run refused")[1]
    assert not (tmp_path / "out").exists()
    assert _run_count(prefect_server["PREFECT_API_URL"]) == before, "no task ran"


def test_a_render_in_a_terminal_shows_one_progress_bar_and_no_error_lines(tmp_path, inputs_with_a_bad_row):
    """Captured in a pseudo-terminal and replayed through a terminal emulator (pyte): the failed row's line sits
    above the bar, the bar is redrawn in place, and the scrollback holds no copies of it."""
    import pty
    import select

    import pyte

    manifest = inputs_with_a_bad_row
    leader, follower = pty.openpty()
    os.set_inheritable(follower, True)
    env = {**os.environ, "AVATAR_BATCH_STATE": str(tmp_path / "state"), "TERM": "xterm-256color",
           "COLUMNS": "120", "LINES": "30"}
    process = subprocess.Popen([str(BIN / "avatar-batch"), "render", str(manifest), "--output", str(tmp_path / "out")],
                               stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    captured = bytearray()
    while True:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            captured += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=60)
    os.close(leader)
    screen = pyte.HistoryScreen(120, 30, history=10000)
    pyte.ByteStream(screen).feed(bytes(captured))
    lines = ["".join(char.data for char in row.values()) for row in screen.history.top] + screen.display
    text = "\n".join(lines)
    assert process.returncode == 1, text[-3000:]
    assert sum("rendering" in line and "━" in line for line in lines) == 1, text[-3000:]
    assert "✗ broken" in text and "1 failed row(s)" in text
    assert "Traceback" not in text and "ERROR" not in text and "Error logging to API" not in text


def _clean(done: subprocess.CompletedProcess) -> str:
    said = done.stdout + done.stderr
    for bad in ("ERROR", "Traceback", "Error logging to API", "database is locked"):
        assert bad not in said, said[-3000:]
    return said


def test_make_demo_and_two_renders_at_once_print_no_error_line(tmp_path, port, monkeypatch):
    """`make demo` starts this machine's server and renders through it (its run linked); two renders at once,
    through that server and then each with a temporary server of its own, both succeed cleanly; the server's
    database is its own file under the state folder, so a restarted server still shows the earlier runs."""
    repo = Path(__file__).resolve().parents[2]
    from flows import local_server

    env = {**os.environ, "AVATAR_BATCH_STATE": str(tmp_path / "state")}
    env.pop("PREFECT_API_URL", None)
    monkeypatch.setenv("AVATAR_BATCH_STATE", env["AVATAR_BATCH_STATE"])  # local_server.running() finds it
    try:
        demo = subprocess.run(["make", "-C", str(repo), "demo", f"OUT={tmp_path / 'demo'}", f"PORT={port}"],
                              env=env, capture_output=True, text=True, timeout=600, check=False)
        said = _clean(demo)
        assert demo.returncode == 0, said[-3000:]
        assert f"http://127.0.0.1:{port}/runs/flow-run/" in said and "3 of 3 succeeded" in said

        for server in ("shared", "temporary"):
            if server == "temporary":
                subprocess.run([str(BIN / "avatar-batch"), "server", "stop"], env=env, check=True, timeout=120)
            renders = [subprocess.Popen([str(BIN / "avatar-batch"), "render", str(repo / "manifests" / "demo.parquet"),
                                         "--output", str(tmp_path / f"{server}-{n}")], env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in range(2)]
            for process in renders:
                stdout, stderr = process.communicate(timeout=600)
                _clean(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
                assert process.returncode == 0, stderr[-3000:]
            if server == "shared":
                assert (tmp_path / "state" / "prefect" / "prefect.db").is_file()
                shared_runs = _run_count(local_server.running().api_url, "flow_runs")
                assert shared_runs >= 3, "the demo's run and the two renders'"

        subprocess.run([str(BIN / "avatar-batch"), "server", "start", "--port", str(port)], env=env, check=True,
                       timeout=300)
        restarted_runs = _run_count(local_server.running().api_url, "flow_runs")
        assert restarted_runs == shared_runs, "a restarted server keeps its history, and only its own"
    finally:
        subprocess.run([str(BIN / "avatar-batch"), "server", "stop"], env=env, check=False, timeout=120)


def test_validate_deep_reports_missing_undecodable_and_faceless_rows_without_rendering(tmp_path, demo_dir, cli):
    import numpy as np
    from PIL import Image

    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(tmp_path / "no_face.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "garbage.wav").write_bytes(b"not audio")
    portrait, audio = str(demo_dir / "astronaut.png"), str(demo_dir / "hello_en_us.wav")
    rows = {"good": (portrait, audio), "missing": (str(tmp_path / "nope.png"), audio),
            "bad-image": (str(tmp_path / "garbage.png"), audio), "bad-audio": (portrait, str(tmp_path / "garbage.wav")),
            "no-face": (str(tmp_path / "no_face.png"), audio)}
    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"item_id": list(rows), "portrait_uri": [p for p, _ in rows.values()],
                  "audio_uri": [a for _, a in rows.values()]}).to_parquet(manifest, index=False)

    shallow = cli(["validate", str(manifest)], {})
    assert shallow.returncode == 0, "the schema and ids are fine"
    done = cli(["validate", str(manifest), "--deep"], {})
    said = done.stdout + done.stderr
    assert done.returncode == 1 and "5 rows, 4 invalid" in said, said
    for item, error, name in (("missing", "ObjectNotFound", "nope.png"), ("bad-image", "UndecodableImage",
                              "garbage.png"), ("bad-audio", "UndecodableAudio", "garbage.wav"),
                              ("no-face", "FaceNotFound", "no_face.png")):
        (line,) = [line for line in said.splitlines() if f"({item})" in line]
        assert error in line and name in line, line
    assert "BytesIO" not in said and "object at 0x" not in said, "no Python object reprs"
    assert not list(tmp_path.glob("**/*.mp4")), "nothing was rendered"


def test_make_manifest_refuses_folders_it_cannot_pair_in_one_line(tmp_path, cli):
    (tmp_path / "only_audio").mkdir()
    (tmp_path / "only_audio" / "line.wav").write_bytes(b"x")
    (tmp_path / "only_images").mkdir()
    (tmp_path / "only_images" / "alice.png").write_bytes(b"x")
    for folder, message in (("only_audio", "no portrait images"), ("only_images", "no audio files")):
        done = cli(["make-manifest", str(tmp_path / folder), "--output", str(tmp_path / f"{folder}.parquet")], {})
        said = done.stdout + done.stderr
        assert done.returncode == 2 and message in said and "Traceback" not in said, said
        assert not (tmp_path / f"{folder}.parquet").exists()
