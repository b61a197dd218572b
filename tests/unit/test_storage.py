"""Local publish: atomic, race-free under threads and processes, and what dead writers leave is swept."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import storage

WRITER = """
import sys
sys.path.insert(0, {repo!r})
from common import storage
for i in range({n}):
    storage.publish_bytes(b"p" * 4096 + str(i).encode(), {dest!r} + f"/proc-{{i % 7}}.bin")
"""


def test_many_threads_and_two_processes_publish_into_one_folder_without_an_error(tmp_path):
    dest = tmp_path / "videos"
    repo = str(Path(__file__).resolve().parents[2])
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(repo=repo, n=150, dest=str(dest))])
             for _ in range(2)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: storage.publish_bytes(b"t" * 4096 + str(i).encode(), str(dest / f"t-{i % 13}.bin")),
                      range(400)))
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    assert sorted(p.name for p in dest.iterdir()) == sorted({f"t-{i}.bin" for i in range(13)}
                                                           | {f"proc-{i}.bin" for i in range(7)})


def test_sweep_removes_only_what_dead_writers_left(tmp_path):
    staging = tmp_path / "videos" / storage.PARTIAL_DIR
    staging.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = storage._WRITER
    (staging / f"a.mp4.{host}-{dead.stdout.strip()}.0123").write_bytes(b"half")
    alive = staging / f"b.mp4.{host}-{os.getpid()}.4567"
    alive.write_bytes(b"copying")
    other_host = staging / "c.mp4.elsewhere-1.89ab"
    other_host.write_bytes(b"not ours to judge")
    assert storage.sweep_staging(str(tmp_path / "videos")) == 1
    assert sorted(p.name for p in staging.iterdir()) == sorted([alive.name, other_host.name])
