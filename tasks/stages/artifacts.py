"""Stage artifacts in the cache prefix: content-addressed by stage key, verified by sha256 whenever read back."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from common import storage
from common.errors import ObjectNotFound, StaleArtifact

from ..refs import Ref

T = TypeVar("T")

RECORDS = "records"  # Prefect's cache records of the stage tasks, beside the artifacts


def artifact_uri(cache_uri: str, stage: str, key: str, suffix: str) -> str:
    return storage.join(cache_uri, stage, key[:2], key + suffix)


def record_uri(cache_uri: str, key: str) -> str:
    return storage.join(cache_uri, RECORDS, key)


def store(local: Path, cache_uri: str, stage: str, key: str) -> tuple[str, str]:
    """Publish a finished local artifact under its key; return its URI and sha256."""
    uri = artifact_uri(cache_uri, stage, key, local.suffix)
    sha256 = storage.sha256_file(local)
    storage.publish_file(local, uri)
    return uri, sha256


def intact(ref: Ref) -> bool:
    """The artifact behind ``ref`` exists and has the checksum the reference recorded."""
    try:
        with storage.local_copy(ref.uri) as path:
            return storage.sha256_file(path) == ref.sha256
    except Exception:  # noqa: BLE001 - any failure to read it back means it cannot be trusted
        return False


def forget(cache_uri: str, ref: Ref) -> None:
    """Drop a damaged artifact and its cache record, so the stage that made it runs again."""
    for uri in (record_uri(cache_uri, ref.key), ref.uri):
        storage.remove(uri)


@contextlib.contextmanager
def fetch(ref: Ref, cache_uri: str, suffix: str = "") -> Iterator[Path]:
    """A local, checksum-verified copy of the artifact behind ``ref``.

    A missing or damaged artifact is never used: it is forgotten (artifact and record) and `StaleArtifact` is
    raised, so the stage that made it is computed again instead of failing the item for good.
    """
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(storage.local_copy(ref.uri, suffix))
        except ObjectNotFound as exc:
            forget(cache_uri, ref)
            raise StaleArtifact(f"{ref.uri}: cached artifact is gone; it will be recomputed") from exc
        if storage.sha256_file(path) != ref.sha256:
            forget(cache_uri, ref)
            raise StaleArtifact(f"{ref.uri}: cached artifact fails its checksum; it will be recomputed")
        yield path


def load(ref: Ref, cache_uri: str, suffix: str, reader: Callable[[Path], T]) -> T:
    """``reader`` applied to the verified artifact behind ``ref``.

    An artifact that passes its checksum but cannot be read back (a record that lies about a damaged file) is
    stale too: forgotten, and `StaleArtifact` raised, never a raw decoder error.
    """
    with fetch(ref, cache_uri, suffix) as path:
        try:
            return reader(path)
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the artifact is unusable
            forget(cache_uri, ref)
            raise StaleArtifact(f"{ref.uri}: cached artifact cannot be read back ({type(exc).__name__}: {exc}); "
                                "it will be recomputed") from exc
