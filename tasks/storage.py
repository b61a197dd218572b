"""Where Prefect keeps the cache records of the stage tasks (next to the artifacts, under the cache prefix)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect.filesystems import RemoteFileSystem

from common import storage


def result_storage_for(uri: str) -> Path | RemoteFileSystem:
    """A result-storage value Prefect accepts for ``uri``.

    Local folders need no server round trip. Object stores need a *saved* block; it holds only the base path
    (credentials and endpoint come from the environment through s3fs), so nothing secret is stored.
    """
    if storage.is_local(uri):
        fs, path = storage.filesystem(uri)
        return Path(path)
    block = RemoteFileSystem(basepath=uri)
    block.save(f"avatar-cache-{hashlib.sha256(uri.encode()).hexdigest()[:16]}", overwrite=True)
    return block
