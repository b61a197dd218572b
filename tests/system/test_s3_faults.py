"""Storage faults classified against a real S3 endpoint (moto on 127.0.0.1): a missing bucket and rejected
credentials stop the run up front, refused operations fail their item at once naming the URI and the operation,
and a proxy that fails a fifth of all requests loses nothing."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import json
import random
import socket
import subprocess
import threading

import boto3
import pandas as pd
import pytest

from avatar_model.media.audio import ffmpeg_executable

pytestmark = pytest.mark.system

def _client(endpoint: str, key: str = "testing", secret: str = "testing"):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret)


def _upload_catalog(client, demo_dir, bucket: str, prefix: str, rows: int = 2) -> None:
    """The demo portrait and two clips, and a manifest of ``rows`` lines over them (relative URIs)."""
    for name in ("astronaut.png", "hello_en_us.wav", "pauses_en_gb.wav"):
        client.upload_file(str(demo_dir / name), bucket, f"{prefix}/{name}")
    clips = ["hello_en_us.wav", "pauses_en_gb.wav"]
    manifest = pd.DataFrame({"item_id": [f"line-{i}" for i in range(rows)],
                             "portrait_uri": ["astronaut.png"] * rows,
                             "audio_uri": [clips[i % 2] for i in range(rows)], "seed": list(range(rows))})
    buffer = io.BytesIO()
    manifest.to_parquet(buffer, index=False)
    client.put_object(Bucket=bucket, Key=f"{prefix}/manifest.parquet", Body=buffer.getvalue())


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr


def test_a_missing_output_bucket_stops_the_run_with_exit_2_and_is_never_created(demo_dir, prefect_server,
                                                                                 s3_server, cli):
    client = _client(s3_server["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="studio")
    _upload_catalog(client, demo_dir, "studio", "missing-bucket")
    done = cli(["render", "s3://studio/missing-bucket/manifest.parquet", "--output", "s3://no-such-bucket/night"],
               {**prefect_server, **s3_server})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "bucket 'no-such-bucket' does not exist" in done.stdout + done.stderr
    _no_traceback(done)
    assert "no-such-bucket" not in {b["Name"] for b in client.list_buckets()["Buckets"]}


@pytest.fixture(scope="module")
def s3_with_auth(s3_auth_server, demo_dir):
    """The writer's bucket: the demo catalog, and a clip under ``private/`` that the writer may not read."""
    users, writer = s3_auth_server
    writer.create_bucket(Bucket="studio")
    _upload_catalog(writer, demo_dir, "studio", "catalog")
    writer.upload_file(str(demo_dir / "fox_en_f.wav"), "studio", "private/fox.wav")
    return users, writer


def test_rejected_credentials_stop_the_run_with_exit_2_and_a_clear_line(prefect_server, s3_with_auth, cli):
    users, _ = s3_with_auth
    wrong = {**users["writer"], "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    done = cli(["render", "s3://studio/catalog/manifest.parquet", "--output", "s3://studio/renders/wrong-key"],
               {**prefect_server, **wrong})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    said = done.stdout + done.stderr
    assert "s3://studio/catalog/manifest.parquet: read refused: permission denied" in said
    assert "check the credentials" in said
    assert "not-the-secret" not in done.stdout + done.stderr + done.stderr, "a secret reached the terminal"
    _no_traceback(done)


def test_a_read_only_output_stops_the_run_before_any_work(prefect_server, s3_with_auth, cli):
    users, writer = s3_with_auth
    done = cli(["render", "s3://studio/catalog/manifest.parquet", "--output", "s3://studio/renders/read-only"],
               {**prefect_server, **users["reader"]})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "outputs cannot be written to s3://studio/renders/read-only" in done.stdout + done.stderr
    assert "write refused" in done.stdout + done.stderr
    _no_traceback(done)
    assert writer.list_objects_v2(Bucket="studio", Prefix="renders/read-only/").get("KeyCount") == 0


def test_an_input_the_credentials_may_not_read_fails_its_item_at_once_naming_uri_and_operation(
        tmp_path, prefect_server, s3_with_auth, cli):
    users, writer = s3_with_auth
    manifest = pd.DataFrame({"item_id": ["open", "private"],
                             "portrait_uri": ["s3://studio/catalog/astronaut.png"] * 2,
                             "audio_uri": ["s3://studio/catalog/hello_en_us.wav", "s3://studio/private/fox.wav"]})
    buffer = io.BytesIO()
    manifest.to_parquet(buffer, index=False)
    writer.put_object(Bucket="studio", Key="denied/manifest.parquet", Body=buffer.getvalue())
    done = cli(["render", "s3://studio/denied/manifest.parquet", "--output", "s3://studio/renders/denied"],
               {**prefect_server, **users["writer"]})
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    body = writer.get_object(Bucket="studio", Key="renders/denied/results.parquet")["Body"].read()
    results = pd.read_parquet(io.BytesIO(body)).set_index("item_id")
    assert results.loc["open", "status"] == "succeeded"
    denied = results.loc["private"]
    assert (denied["error_class"], denied["attempts"]) == ("AccessDenied", 1)
    assert "s3://studio/private/fox.wav: read refused: permission denied" in denied["error_message"]


class FaultyProxy(http.server.ThreadingHTTPServer):
    """Forwards S3 requests to moto, failing a seeded fraction of them: half answer 503 SlowDown, half drop the
    connection after reading the request. Counts what it did."""

    daemon_threads = True

    def __init__(self, upstream_port: int, fault_rate: float, seed: int):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port, self.fault_rate, self.random = upstream_port, fault_rate, random.Random(seed)
        self.lock = threading.Lock()
        self.requests = self.errors_503 = self.dropped = 0

    def draw(self) -> str:
        with self.lock:
            self.requests += 1
            roll = self.random.random()
            if roll < self.fault_rate / 2:
                self.errors_503 += 1
                return "503"
            if roll < self.fault_rate:
                self.dropped += 1
                return "drop"
            return "pass"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultyProxy

    def log_message(self, format, *args):
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.server.draw()
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "503":
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                self.send_header(key, value)
        # a HEAD answer has no body but states the object's length
        self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def test_a_fifth_of_all_requests_failing_loses_nothing(tmp_path, demo_dir, prefect_server, s3_server, cli):
    client = _client(s3_server["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="faulty")
    rows = 6
    _upload_catalog(client, demo_dir, "faulty", "catalog", rows)

    proxy = FaultyProxy(int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]), fault_rate=0.2, seed=20)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {**prefect_server, **s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}",
           "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "8"}  # the retry settings the README gives for S3
    try:
        done = cli(["render", "s3://faulty/catalog/manifest.parquet", "--output", "s3://faulty/renders/night"], env)
    finally:
        proxy.shutdown()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    faults = proxy.errors_503 + proxy.dropped
    assert proxy.requests > 100 and faults >= 0.1 * proxy.requests, (proxy.requests, faults)

    body = client.get_object(Bucket="faulty", Key="renders/night/results.parquet")["Body"].read()
    results = pd.read_parquet(io.BytesIO(body))
    assert len(results) == rows and (results["status"] == "succeeded").all()
    for row in results.itertuples():
        key = f"renders/night/videos/{row.item_id}"
        video = client.get_object(Bucket="faulty", Key=f"{key}.mp4")["Body"].read()
        sidecar = json.loads(client.get_object(Bucket="faulty", Key=f"{key}.json")["Body"].read())
        assert hashlib.sha256(video).hexdigest() == sidecar["sha256"] == row.sha256
        local = tmp_path / f"{row.item_id}.mp4"
        local.write_bytes(video)
        decode = subprocess.run([ffmpeg_executable(), "-v", "error", "-i", str(local), "-f", "null", "-"],
                                capture_output=True, text=True, check=True)
        assert decode.stderr == ""
    listed = client.list_objects_v2(Bucket="faulty", Prefix="renders/night/videos/")["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed) == sorted(
        f"line-{i}.{ext}" for i in range(rows) for ext in ("mp4", "json")), "a stray or missing object"
    task_retries = int((results["attempts"] - 1).sum())
    print(f"\nfault proxy: {proxy.requests} requests, {proxy.errors_503} answered 503, {proxy.dropped} dropped "
          f"({faults / proxy.requests:.1%}), all absorbed by botocore retries; "
          f"{task_retries} task-level retries")
