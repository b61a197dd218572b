"""Real servers for system tests: `prefect server` (SQLite or PostgreSQL), a moto S3 endpoint, all on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx
import pandas as pd
import pytest

from flows.local_server import stop_process

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def port() -> int:
    """A free port on 127.0.0.1."""
    return free_port()


def _prefect_server(home: Path, extra_env: dict[str, str]):
    """`prefect server start` on a free port with its own PREFECT_HOME; yields the env clients need."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_UI_ENABLED": "false", **extra_env}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"prefect server did not start; log: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"PREFECT_API_URL": api, "PREFECT_HOME": str(home)}
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A Prefect server on SQLite (the local default)."""
    yield from _prefect_server(tmp_path_factory.mktemp("prefect-home"), {})


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does)")
    return found[-1].parent


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL cluster (Debian's binaries) on 127.0.0.1: the database URL of its `prefect` db.

    The server refuses to run as root, so as root the cluster belongs to the `postgres` user."""
    pg_bin, port = _postgres_bin(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="avatar-pg-"))
    data = folder / "data"
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_owner, str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    log = open(folder / "postgres.log", "wb")
    server = subprocess.Popen([*as_owner, str(pg_bin / "postgres"), "-D", str(data), "-p", str(port),
                               "-k", str(folder), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                               "-c", "max_connections=200"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while subprocess.run([str(pg_bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True, check=False).returncode != 0:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"postgres did not start: {(folder / 'postgres.log').read_text()[-2000:]}")
        time.sleep(0.3)
    subprocess.run([str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect"],
                   check=True, capture_output=True, timeout=60)
    yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    os.killpg(server.pid, signal.SIGINT)  # a fast shutdown
    server.wait(timeout=30)
    log.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server_pg(tmp_path_factory, postgres_url):
    """A Prefect server on PostgreSQL (asyncpg), as production runs it."""
    yield from _prefect_server(tmp_path_factory.mktemp("prefect-pg-home"),
                               {"PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres_url})


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; yields the AWS_* environment that points s3fs at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    server.stop()


WRITER = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
    {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::studio/private/*"},
]}
READER = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:ListAllMyBuckets", "s3:HeadBucket"],
     "Resource": "*"},
]}


@pytest.fixture(scope="session")
def s3_auth_server():
    """A moto S3 server that checks credentials and IAM policies after its first six (set-up) requests; yields
    the AWS_* environment of two users (``writer``: all of S3 but ``studio/private/``; ``reader``: read-only) and a
    boto3 client of the writer."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "6"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)  # not an action: does not use up the count
            break
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.2)
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    keys = {}
    for user, policy in (("writer", WRITER), ("reader", READER)):
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
        keys[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    writer = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=keys["writer"]["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=keys["writer"]["AWS_SECRET_ACCESS_KEY"])
    base = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    yield {user: {**base, **key} for user, key in keys.items()}, writer
    server.kill()
    server.wait()


def write_catalog(path: Path, demo_dir: Path) -> list[str]:
    """A 12-row manifest: 2 portraits x 2 prompts x 3 lines, 4 groups of rows that belong together; its item ids."""
    rows = []
    for p, portrait in enumerate(["astronaut.png", "astronaut_closeup.jpg"]):
        for q, prompt in enumerate(["a calm narrator", "an excited host"]):
            for n, audio in enumerate(["hello_en_us.wav", "fox_en_f.wav", "pauses_en_gb.wav"]):
                rows.append({"item_id": f"p{p}-q{q}-line{n}", "portrait_uri": str(demo_dir / portrait),
                             "audio_uri": str(demo_dir / audio), "prompt": prompt, "seed": len(rows)})
    pd.DataFrame(rows).to_parquet(path, index=False)
    return [r["item_id"] for r in rows]


@pytest.fixture()
def catalog12(tmp_path, demo_dir) -> tuple[Path, list[str]]:
    path = tmp_path / "catalog12.parquet"
    return path, write_catalog(path, demo_dir)


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    """Run the installed `avatar-batch` command (argument list, no shell) and capture its output. Its state home
    is the session's own, so a background server of the machine's user is never picked up."""
    state = tmp_path_factory.mktemp("avatar-batch-state")

    def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "avatar-batch"), *args],
                              env={**os.environ, "AVATAR_BATCH_STATE": str(state), **env}, capture_output=True,
                              text=True, timeout=600, check=False)

    return run


API_TOKENS = {"studio-a": "a-token-for-studio-a-0123456789", "studio-b": "b-token-for-studio-b-0123456789"}


@pytest.fixture(scope="session")
def job_api(tmp_path_factory, prefect_server):
    """`avatar-batch setup`, a process worker, and `avatar-batch api` on a free port; yields (url, jobs folder)."""
    root = tmp_path_factory.mktemp("api")
    env = {**os.environ, **prefect_server, "AVATAR_BATCH_HOME": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "AVATAR_BATCH_STATE": str(root / "state")}
    setup = subprocess.run([str(BIN / "avatar-batch"), "setup"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert setup.returncode == 0, setup.stderr
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "avatar-render", "--type",
                               "process"], cwd=REPO, env=env, stdout=(root / "worker.log").open("wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    port = free_port()
    api_env = {**env, "AVATAR_BATCH_API_TOKENS": ",".join(f"{k}={v}" for k, v in API_TOKENS.items()),
               "AVATAR_BATCH_JOBS_PREFIX": str(root / "jobs"), "AVATAR_BATCH_API_ALLOWED": str(root / "studio")}
    server = subprocess.Popen([str(BIN / "avatar-batch"), "api", "--port", str(port), "--requests-per-minute",
                               "100000"], env=api_env,
                              stdout=(root / "api.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (root / "api.log").read_text()
            time.sleep(0.3)
        yield url, root, server
    finally:
        for process in (server, worker):
            stop_process(process.pid)
            process.wait(timeout=30)
