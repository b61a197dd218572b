"""Storage: atomic, race-free local publish and sweeping of dead writers' leftovers; inputs hashed once per run;
storage faults classified."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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


def test_each_input_is_read_once_per_run_however_many_rows_name_it(tmp_path, monkeypatch):
    import hashlib

    from common.errors import InputTooLarge

    portrait = tmp_path / "face.png"
    portrait.write_bytes(b"portrait bytes" * 1000)
    opened = []
    real_open = storage.filesystem(str(portrait))[0].__class__._open

    def counting_open(self, path, mode="rb", **kwargs):
        opened.append(path)
        return real_open(self, path, mode=mode, **kwargs)

    monkeypatch.setattr(storage.filesystem(str(portrait))[0].__class__, "_open", counting_open)
    digests = storage.InputDigests()
    with ThreadPoolExecutor(8) as pool:
        hashes = set(pool.map(lambda _: digests.sha256(str(portrait), 2**20), range(200)))
    assert hashes == {hashlib.sha256(portrait.read_bytes()).hexdigest()} and len(opened) == 1

    portrait.write_bytes(b"another take")  # replaced during the run: a new size and stamp, hashed again
    assert digests.sha256(str(portrait), 2**20) == hashlib.sha256(b"another take").hexdigest()
    assert len(opened) == 2
    with pytest.raises(InputTooLarge):
        digests.sha256(str(portrait), 4)


def test_refused_storage_operations_are_permanent_and_name_the_uri_and_the_operation():
    import errno

    from common.errors import AccessDenied, TransientError, is_permanent

    for exc, words in ((PermissionError(errno.EACCES, "Permission denied"), "write refused: permission denied"),
                       (OSError(errno.EROFS, "Read-only file system"), "write refused: read-only file system")):
        with pytest.raises(AccessDenied, match=f"^s3://b/videos/a.mp4: {words}") as caught:
            storage._reraise_storage("s3://b/videos/a.mp4", exc, "write")
        assert is_permanent(caught.value)
    with pytest.raises(TransientError, match="during read"):
        storage._reraise_storage("s3://b/x", ConnectionResetError("reset by peer"), "read")
