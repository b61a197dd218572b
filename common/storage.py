"""fsspec URIs everywhere: plain paths and ``file://`` locally, ``s3://`` through s3fs.

Credentials and endpoints are never passed through here: s3fs/botocore read them from the standard
``AWS_*`` environment variables (``AWS_ENDPOINT_URL`` for a non-AWS endpoint), so nothing secret is logged.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import (
    AccessDenied,
    AvatarError,
    ConfigurationError,
    InputNotAllowed,
    InputTooLarge,
    NotARegularFile,
    ObjectNotFound,
    TransientError,
    UnsafeOutputPath,
)

_CHUNK = 1 << 20


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for local paths and object stores alike)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def _reraise_storage(uri: str, exc: BaseException, operation: str = "read") -> None:
    """Map a storage exception to our classes: absent → `ObjectNotFound`, refused → `AccessDenied` (both
    permanent), anything else an OS or network fault → `TransientError`. Messages name the URI and the operation."""
    if isinstance(exc, FileNotFoundError):
        raise ObjectNotFound(f"{uri}: object not found") from exc
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        raise ObjectNotFound(f"{uri}: not a file") from exc
    if isinstance(exc, PermissionError):
        raise AccessDenied(f"{uri}: {operation} refused: permission denied ({exc}); check the credentials and "
                           "the permissions of this location") from exc
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        raise AccessDenied(f"{uri}: {operation} refused: read-only file system") from exc
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        raise TransientError(f"{uri}: storage error during {operation}: {exc}") from exc


def read_bytes(uri: str) -> bytes:
    """Whole object as bytes; a missing object raises `ObjectNotFound`, a storage fault `TransientError`."""
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - mapped to our error classes, others re-raised
        _reraise_storage(uri, exc)
        raise


def check_input(uri: str, max_bytes: int, http_hosts: Collection[str] = ()) -> tuple[object, ...]:
    """Refuse an input before reading it: an http(s) host not in ``http_hosts`` (none by default), anything but a
    regular file, more than ``max_bytes``. Returns the object's identity (size and version stamp)."""
    if uri.partition("://")[0].lower() in ("http", "https"):
        host = urllib.parse.urlsplit(uri).hostname or ""
        if host.lower() not in {h.lower() for h in http_hosts}:
            raise InputNotAllowed(f"{uri}: http(s) inputs are read only from allowed hosts (limits.http_hosts); "
                                  f"{host or 'this URI'} is not one")
    fs, path = filesystem(uri)
    try:
        if is_local(uri):
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise NotARegularFile(f"{uri}: not a regular file (a device, FIFO, socket or folder); name a file")
            size, stamp = info.st_size, (info.st_mtime_ns, info.st_ino)
        else:
            details = fs.info(path)
            if details.get("type") == "directory":
                raise NotARegularFile(f"{uri}: a folder, not an object; name a file")
            size = details.get("size")
            stamp = details.get("ETag") or details.get("LastModified") or details.get("mtime")
    except AvatarError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to our error classes, others re-raised
        _reraise_storage(uri, exc)
        raise
    if size is not None and size > max_bytes:
        raise InputTooLarge(f"{uri}: {size} bytes is over this run's limit of {max_bytes} bytes for this input")
    return size, str(stamp)


def read_input(uri: str, max_bytes: int, http_hosts: Collection[str] = ()) -> bytes:
    """An input's bytes, after `check_input`; never more than ``max_bytes`` even if the object grows meanwhile."""
    check_input(uri, max_bytes, http_hosts)
    data = read_bytes(uri)
    if len(data) > max_bytes:
        raise InputTooLarge(f"{uri}: grew past this run's limit of {max_bytes} bytes while it was read")
    return data


def copy_input(uri: str, dest: str | os.PathLike | None, max_bytes: int) -> str:
    """Stream an input in blocks into ``dest`` (or nowhere: only hash it) and return its sha256; memory stays
    flat in its size, and reading stops past ``max_bytes`` even if the object grew after it was checked."""
    fs, path = filesystem(uri)
    h, seen = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as f, (open(dest, "wb") if dest is not None else contextlib.nullcontext()) as out:
            for block in iter(lambda: f.read(_CHUNK), b""):
                seen += len(block)
                if seen > max_bytes:
                    raise InputTooLarge(f"{uri}: grew past this run's limit of {max_bytes} bytes while it was read")
                h.update(block)
                if out is not None:
                    out.write(block)
    except AvatarError:
        raise
    except Exception as exc:  # noqa: BLE001
        _reraise_storage(uri, exc)
        raise
    return h.hexdigest()


class InputDigests:
    """The sha256 of every input of one run, each read once however many rows name it.

    Keyed on the URI and the object's size and version stamp, so an input replaced during the run is hashed
    again. Rows asking for an input being hashed wait for that one read; a failed read is not remembered.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digests: dict[tuple[object, ...], concurrent.futures.Future[str]] = {}

    def __reduce__(self):
        """Sent to another process (a dask worker), it arrives empty: digests are per process."""
        return (InputDigests, ())

    def sha256(self, uri: str, max_bytes: int, http_hosts: Collection[str] = ()) -> str:
        identity = (uri, *check_input(uri, max_bytes, http_hosts))
        with self._lock:
            pending = self._digests.get(identity)
            if pending is None:
                pending = self._digests[identity] = concurrent.futures.Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            digest = copy_input(uri, None, max_bytes)
        except BaseException as exc:
            with self._lock:
                del self._digests[identity]
            pending.set_exception(exc)
            raise
        pending.set_result(digest)
        return digest


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def local_copy(uri: str, suffix: str = "") -> Iterator[Path]:
    """A local file holding the object at ``uri`` (the file itself when it is already local)."""
    fs, path = filesystem(uri)
    if is_local(uri):
        if not fs.exists(path):
            raise ObjectNotFound(f"{uri}: object not found")
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="avatar-dl-") as tmp:
        dest = Path(tmp) / f"object{suffix}"
        try:
            fs.get_file(path, str(dest))
        except Exception as exc:  # noqa: BLE001
            _reraise_storage(uri, exc)
            raise
        yield dest


PARTIAL_DIR = ".partial"
# staging files are named <final name>.<host>-<pid>.<random>: a leftover of a writer that died can be told apart
# from one that is still copying
_WRITER = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


def publish_file(local_path: str | os.PathLike, uri: str) -> None:
    """Place a finished local file at ``uri`` so that readers see it whole or not at all.

    Local: copy into a hidden ``.partial/`` folder beside the destination, fsync, then ``os.replace`` (atomic
    on one filesystem); a crash leaves at most a file in ``.partial/``, never one under the final name.
    Object stores: a single PUT / completed multipart upload is invisible until complete, so a crashed
    writer never leaves a partial object under the final key.
    """
    fs, path = filesystem(uri)
    try:
        if is_local(uri):
            dest = Path(path)
            staging = dest.parent / PARTIAL_DIR
            for folder in (dest.parent, staging):
                if folder.is_symlink():  # it could lead anywhere outside the output prefix
                    raise UnsafeOutputPath(f"{uri}: {folder} is a symbolic link; outputs are never written through one")
            tmp = _staging_file(staging, dest.name)
            try:
                with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                staging.rmdir()  # only when empty: another writer may be mid-copy
        else:
            fs.put_file(str(local_path), path)
    except Exception as exc:  # noqa: BLE001
        _reraise_storage(uri, exc, "write")
        raise


def _staging_file(staging: Path, name: str) -> Path:
    """Create an empty private file in the staging folder, re-creating the folder if another writer just
    removed it (writers remove it when they leave it empty)."""
    for _ in range(10):
        tmp = staging / f"{name}.{_WRITER}-{os.getpid()}.{uuid.uuid4().hex}"
        try:
            staging.mkdir(parents=True, exist_ok=True)
            tmp.touch(exist_ok=False)
            return tmp
        except (FileNotFoundError, FileExistsError):  # the folder vanished between the two steps: again
            continue
    raise TransientError(f"{staging}: could not create a staging file")


def sweep_staging(folder_uri: str) -> int:
    """Remove the staging files that writers on this host left behind when they died (local folders only);
    return how many. Files of writers still alive, and of other hosts, are left alone."""
    if not is_local(folder_uri):
        return 0  # object stores have no staging files: a PUT is invisible until complete
    staging = Path(filesystem(folder_uri)[1]) / PARTIAL_DIR
    removed = 0
    for leftover in staging.glob(f"*.{_WRITER}-*.*") if staging.is_dir() else ():
        pid = leftover.name.rsplit(".", 2)[-2].rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)
            removed += 1
    with contextlib.suppress(OSError):
        staging.rmdir()
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_bytes(data: bytes, uri: str) -> None:
    """`publish_file` for small in-memory payloads (sidecars, results)."""
    with tempfile.NamedTemporaryFile(prefix="avatar-pub-", delete=False) as tmp:
        tmp.write(data)
    try:
        publish_file(tmp.name, uri)
    finally:
        os.unlink(tmp.name)


def check_output_location(uri: str) -> None:
    """Refuse, before any work, a location that cannot take outputs: a bucket that does not exist (buckets are
    never created), credentials the store rejects, or a place these credentials may not write to."""
    fs, path = filesystem(uri)
    if not is_local(uri):
        bucket = path.split("/", 1)[0]
        try:
            fs.info(bucket)
        except FileNotFoundError as exc:
            raise ConfigurationError(f"{uri}: bucket {bucket!r} does not exist; create it first "
                                     "(avatar-batch never creates buckets)") from exc
        except PermissionError as exc:
            raise ConfigurationError(f"{uri}: the store refused access to bucket {bucket!r} ({exc}); check the "
                                     "credentials (AWS_* variables) and the bucket's policy") from exc
        except (OSError, TimeoutError, ConnectionError) as exc:
            raise ConfigurationError(f"{uri}: the store cannot be reached ({exc}); check AWS_ENDPOINT_URL and "
                                     "the network") from exc
    probe = join(uri, f".write-check-{uuid.uuid4().hex}")
    try:
        publish_bytes(b"", probe)
        remove(probe)
    except (AccessDenied, UnsafeOutputPath) as exc:
        raise ConfigurationError(f"outputs cannot be written to {uri}: {exc}") from exc


def remove(uri: str) -> None:
    """Delete the object at ``uri`` if it exists (idempotent)."""
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001
        _reraise_storage(uri, exc, "delete")
        raise


def remove_folder(uri: str) -> None:
    """Delete everything under ``uri`` if anything is there (idempotent)."""
    fs, path = filesystem(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as exc:  # noqa: BLE001
        _reraise_storage(uri, exc, "delete")
        raise
