"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo"

# Keep Prefect quiet and private in every test process (and the subprocesses they start).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores for its thread pools,
# set before torch or OpenCV start them: two workers each spinning up threads for every core oversubscribe the
# machine and a torch-bound test runs several times slower.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO
