"""The second engine: a run's stage tasks on an existing dask cluster (scheduler and two workers on 127.0.0.1,
each with one `GPU` resource), reporting to a real Prefect server. Every good row is rendered, by both workers;
a bad row fails alone with its error class in the results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import pandas as pd
import pytest
from conftest import free_port

pytestmark = pytest.mark.system
BIN = Path(sys.executable).parent


def _ask(address: str, statement: str) -> str:
    """Run ``statement`` with a dask ``client`` in a process of its own (no client threads stay in this one)."""
    code = (f"import json\nfrom distributed import Client\nwith Client({address!r}, timeout=60) as client:\n"
            f"    {statement}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          check=True).stdout


@pytest.fixture()
def dask_cluster(tmp_path, prefect_server):
    """`dask scheduler` and two `dask worker`s on loopback; the workers report task runs to the Prefect server."""
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, **prefect_server}
    logs = [open(tmp_path / f"dask-{n}.log", "wb") for n in ("scheduler", "a", "b")]  # noqa: SIM115 - closed below
    processes = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                   address.rsplit(":", 1)[1], "--no-dashboard"], env=env, stdout=logs[0],
                                  stderr=subprocess.STDOUT, start_new_session=True)]
    processes += [subprocess.Popen([str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--name", name,
                                    "--nthreads", "2", "--resources", "GPU=1", "--no-dashboard"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                  for name, log in zip(("a", "b"), logs[1:], strict=True)]
    _ask(address, "client.wait_for_workers(2, timeout=120)")
    yield address
    for process in processes[::-1]:
        process.terminate()
        process.wait(timeout=30)
    for log in logs:
        log.close()


def test_a_manifest_renders_on_a_dask_cluster(tmp_path, catalog12, dask_cluster, prefect_server, cli):
    manifest, item_ids = catalog12
    rows = pd.read_parquet(manifest)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    bad = {**rows.iloc[0].to_dict(), "item_id": "broken", "audio_uri": str(broken)}
    pd.concat([rows, pd.DataFrame([bad])]).to_parquet(manifest, index=False)
    out = tmp_path / "out"
    started = time.monotonic()
    done = cli(["render", str(manifest), "--output", str(out), "--dask-address", dask_cluster], prefect_server)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # the broken row, and only it
    assert "Traceback" not in done.stderr, done.stderr[-6000:]

    results = pd.read_parquet(out / "results.parquet").set_index("item_id")
    assert (results.loc[item_ids, "status"] == "succeeded").all() and len(results) == 13
    assert (results.loc["broken", "status"], results.loc["broken", "error_class"]) == ("failed", "UndecodableAudio")
    for item in item_ids:
        with av.open(results.loc[item, "output_uri"]) as container:
            assert sum(1 for _ in container.decode(video=0)) == results.loc[item, "frame_count"]

    executed = json.loads(_ask(dask_cluster, "print(json.dumps(client.run("
                                              "lambda dask_worker: dask_worker.state.executed_count)))"))
    assert len(executed) == 2 and all(n > 0 for n in executed.values()), executed  # both workers rendered
    print(f"13 rows on dask in {time.monotonic() - started:.1f} s; tasks per worker: {sorted(executed.values())}")
