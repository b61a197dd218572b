"""The job API over a real Prefect server, a process worker and uvicorn on 127.0.0.1: manifest and upload jobs to
playable MP4s, a failing row's error class, tokens, upload limits read as they stream, confined URIs; then
schemathesis against its OpenAPI schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import pandas as pd
import pytest
from conftest import API_TOKENS as TOKENS

pytestmark = pytest.mark.system
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _vmhwm(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def _auth(client: str = "studio-a") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[client]}"}


def _finished(url: str, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/v1/jobs/{job_id}", headers=_auth(), timeout=10).json()
        if status["final"]:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(1)


def _playable(data: bytes, path: Path, frames: int) -> None:
    path.write_bytes(data)
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, audio.codec_context.name) == ("h264", "aac")
        assert sum(1 for _ in container.decode(video=0)) == frames


def test_a_manifest_job_and_an_upload_job_render_to_playable_videos(job_api, demo_dir, tmp_path):
    url, root, _ = job_api
    studio = root / "studio"
    studio.mkdir(exist_ok=True)
    (studio / "broken.wav").write_bytes(b"not audio")
    for name in ("astronaut.png", "hello_en_us.wav"):  # a job's inputs lie under the allowed prefixes
        shutil.copy(demo_dir / name, studio / name)
    pd.DataFrame({"item_id": ["hello", "broken"], "portrait_uri": [str(studio / "astronaut.png")] * 2,
                  "audio_uri": [str(studio / "hello_en_us.wav"), str(studio / "broken.wav")]}
                 ).to_parquet(studio / "lines.parquet", index=False)

    made = httpx.post(f"{url}/v1/jobs", headers=_auth(), timeout=30,
                      json={"manifest_uri": str(studio / "lines.parquet"), "output_uri": str(studio / "out")})
    assert made.status_code == 201, made.text
    with (demo_dir / "astronaut_closeup.jpg").open("rb") as portrait, (demo_dir / "fox_en_f.wav").open("rb") as audio:
        upload = httpx.post(f"{url}/v1/jobs", headers=_auth(), timeout=30, data={"prompt": "a fox"},
                            files={"portrait": ("photo.bin", portrait), "audio": ("clip.txt", audio)})
    assert upload.status_code == 201, upload.text

    manifest_job = _finished(url, made.json()["job_id"])
    assert manifest_job["state"] == "RowsFailed" and (manifest_job["total"], manifest_job["failed"]) == (2, 1)
    by_id = {i["item_id"]: i for i in manifest_job["items"]}
    assert by_id["broken"]["error_class"] == "UndecodableAudio" and by_id["broken"]["video_url"] is None
    video = httpx.get(url + by_id["hello"]["video_url"], headers=_auth(), timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    _playable(video.content, tmp_path / "hello.mp4", by_id["hello"]["frame_count"])

    upload_job = _finished(url, upload.json()["job_id"])
    assert upload_job["state"] == "Completed" and upload_job["succeeded"] == 1, upload_job
    line = upload_job["items"][0]
    _playable(httpx.get(url + line["video_url"], headers=_auth(), timeout=30).content, tmp_path / "line.mp4",
              line["frame_count"])
    listed = httpx.get(f"{url}/v1/jobs", headers=_auth(), timeout=10).json()
    assert {made.json()["job_id"], upload.json()["job_id"]} <= {j["job_id"] for j in listed}


def test_tokens_limits_and_confinement(job_api, demo_dir):
    url, root, server = job_api
    body = {"manifest_uri": str(demo_dir.parent / "demo.parquet"), "output_uri": str(root / "studio" / "x")}
    assert httpx.post(f"{url}/v1/jobs", json=body, timeout=10).status_code == 401
    assert httpx.post(f"{url}/v1/jobs", json=body, headers={"Authorization": "Bearer nope"},
                      timeout=10).status_code == 401
    outside = httpx.post(f"{url}/v1/jobs", json=body, headers=_auth(), timeout=10)
    assert outside.status_code == 422 and "outside the locations" in outside.json()["detail"]
    assert "Traceback" not in outside.text
    # a manifest inside the prefixes whose rows name files outside them is refused too
    pd.DataFrame({"item_id": ["x"], "portrait_uri": [str(demo_dir / "astronaut.png")],
                  "audio_uri": [str(demo_dir / "hello_en_us.wav")]}).to_parquet(root / "studio" / "leak.parquet")
    leak = httpx.post(f"{url}/v1/jobs", headers=_auth(), timeout=10,
                      json={"manifest_uri": str(root / "studio" / "leak.parquet"), "output_uri": str(root / "studio")})
    assert leak.status_code == 422 and "row 0 (x)" in leak.json()["detail"]

    ok = {"manifest_uri": str(root / "studio" / "lines.parquet"), "output_uri": str(root / "studio" / "out2")}
    job = httpx.post(f"{url}/v1/jobs", json=ok, headers=_auth(), timeout=30).json()["job_id"]
    assert httpx.get(f"{url}/v1/jobs/{job}", headers=_auth("studio-b"), timeout=10).status_code == 403

    before = _vmhwm(server.pid)

    def oversized():  # a 96 MiB portrait, chunked: no Content-Length to refuse it by
        yield b"--b\r\nContent-Disposition: form-data; name=\"portrait\"; filename=\"p.png\"\r\n\r\n"
        for _ in range(96):
            yield b"\0" * 2**20
        yield b"\r\n--b--\r\n"

    try:
        refused = httpx.post(f"{url}/v1/jobs", headers={**_auth(), "Content-Type": "multipart/form-data; boundary=b"},
                             content=oversized(), timeout=30)
        assert refused.status_code == 413 and "upload limit" in refused.json()["detail"]
    except httpx.WriteError:
        pass  # the server answered 413 and closed the connection while the client was still sending
    assert _vmhwm(server.pid) - before < 16 * 2**20  # never held whole

    with (demo_dir / "hello_en_us.wav").open("rb") as audio:
        not_image = httpx.post(f"{url}/v1/jobs", headers=_auth(), timeout=30,
                               files={"portrait": ("face.png", b"GIF89a fake"), "audio": ("a.wav", audio)})
    assert not_image.status_code == 422 and "not an image" in not_image.json()["detail"]


def test_schemathesis_finds_no_server_errors_or_schema_violations(job_api, tmp_path):
    url, _, _ = job_api
    done = subprocess.run([str(BIN / "schemathesis"), "run", f"{url}/openapi.json", "--max-examples", "25",
                           "--header", f"Authorization: Bearer {TOKENS['studio-a']}",
                           "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
                           "--no-color"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-6000:]
    print(said[-1500:])
