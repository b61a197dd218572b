"""The CLI against a real Prefect server and a real S3 endpoint (moto on 127.0.0.1)."""

from __future__ import annotations

import io
import json

import boto3
import pandas as pd
import pytest

from avatar_model.media.video import probe

pytestmark = pytest.mark.system


def test_manifest_from_s3_outputs_and_results_to_s3(tmp_path, demo_dir, prefect_server, s3_server, cli):
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="studio")
    for name in ("astronaut.png", "hello_en_us.wav", "pauses_en_gb.wav"):
        client.upload_file(str(demo_dir / name), "studio", f"catalog/demo/{name}")
    manifest = pd.DataFrame({
        "item_id": ["line-1", "line-2"],
        "portrait_uri": ["demo/astronaut.png", "s3://studio/catalog/demo/astronaut.png"],
        "audio_uri": ["demo/hello_en_us.wav", "demo/pauses_en_gb.wav"],
        "language": ["en-US", "en-GB"],
    })
    buffer = io.BytesIO()
    manifest.to_parquet(buffer, index=False)
    client.put_object(Bucket="studio", Key="catalog/manifest.parquet", Body=buffer.getvalue())

    env = {**prefect_server, **s3_server}
    done = cli(["render", "s3://studio/catalog/manifest.parquet", "--output", "s3://studio/renders/night-1"], env)
    assert done.returncode == 0, done.stderr[-3000:]

    keys = {o["Key"] for o in client.list_objects_v2(Bucket="studio", Prefix="renders/night-1/")["Contents"]}
    for expected in ("videos/line-1.mp4", "videos/line-1.json", "videos/line-2.mp4", "videos/line-2.json",
                     "results.parquet", "summary.json"):
        assert f"renders/night-1/{expected}" in keys
    assert any(k.startswith("renders/night-1/.cache/records/") for k in keys)  # cross-run cache records in S3
    results = pd.read_parquet(io.BytesIO(client.get_object(Bucket="studio", Key="renders/night-1/results.parquet")
                                         ["Body"].read()))
    assert list(results["status"]) == ["succeeded", "succeeded"]
    assert list(results["language"]) == ["en-US", "en-GB"]
    assert results["output_uri"].str.startswith("s3://studio/renders/night-1/videos/").all()
    local = tmp_path / "line-2.mp4"
    client.download_file("studio", "renders/night-1/videos/line-2.mp4", str(local))
    info = probe(local)
    assert info.video_frames == results.loc[1, "frame_count"] and info.audio_streams == 1

    # the UI's results table links each video with a presigned HTTPS-style URL that opens without credentials
    import httpx

    latest = httpx.post(f"{prefect_server['PREFECT_API_URL']}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["render-manifest-results"]}}, "sort": "CREATED_DESC", "limit": 1}).json()
    links = {row["item"]: row["video"] for row in json.loads(latest[0]["data"])}
    assert links["line-2"].startswith(s3_server["AWS_ENDPOINT_URL"]) and "Signature" in links["line-2"]
    assert httpx.get(links["line-2"], timeout=30).content == local.read_bytes()

    rerun = cli(["render", "s3://studio/catalog/manifest.parquet", "--output", "s3://studio/renders/night-1"], env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    results = pd.read_parquet(io.BytesIO(client.get_object(Bucket="studio", Key="renders/night-1/results.parquet")
                                         ["Body"].read()))
    assert (results["cache_hits"] == 6).all()
