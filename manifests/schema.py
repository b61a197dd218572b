"""The input manifest: a Parquet table with one row per (portrait, audio) pair.

Required columns: ``item_id`` (string), ``portrait_uri`` (string), ``audio_uri`` (string).
Optional columns: ``prompt`` (string), ``seed`` (integer), ``short_side`` (integer), ``crf`` (integer).
Any other column is carried unchanged into the results table.

Relative URIs are resolved against the manifest's own folder, so a manifest can travel with its inputs.

Two kinds of problems:
- schema-level (not Parquet, a required column missing, a column of the wrong type) raise `ManifestError`
  before any work starts: the run cannot mean anything;
- row-level (bad or duplicate id, empty URI, bad option value) mark only that row as failed.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.errors import AvatarError, DuplicateItemId, InvalidParameter
from common.ids import check_item_id

REQUIRED_COLUMNS = MappingProxyType({"item_id": "string", "portrait_uri": "string", "audio_uri": "string"})
OPTIONAL_COLUMNS = MappingProxyType({"prompt": "string", "seed": "integer", "short_side": "integer", "crf": "integer"})
OPTION_RANGES = MappingProxyType({"seed": (0, 2**63 - 1), "short_side": (64, 2048), "crf": (0, 51)})


class ManifestError(ValueError):
    """The manifest as a whole is unusable; nothing is rendered."""


@dataclass(frozen=True)
class ManifestRow:
    """One validated row. ``error`` is set when the row itself is invalid (the run goes on without it)."""

    row: int
    item_id: str
    portrait_uri: str
    audio_uri: str
    prompt: str | None = None
    seed: int = 0
    short_side: int | None = None
    crf: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: AvatarError | None = None


def _type_ok(arrow_type: pa.DataType, kind: str) -> bool:
    if pa.types.is_null(arrow_type):
        return True  # an all-null optional column
    if kind == "string":
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    # pandas stores an integer column with gaps as float64; integral floats are accepted row by row
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def read_manifest_table(uri: str) -> pa.Table:
    """Read and schema-check the Parquet manifest at ``uri``."""
    try:
        data = storage.read_bytes(uri)
    except AvatarError as exc:
        raise ManifestError(f"manifest {uri}: {exc}") from exc
    try:
        names = pq.read_schema(io.BytesIO(data)).names
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {uri}: not a readable Parquet file ({exc})") from exc
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ManifestError(f"manifest {uri}: column name(s) {repeated} appear more than once; make them unique")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {uri}: not a readable Parquet file ({exc})") from exc
    columns = dict(zip(table.column_names, table.schema.types))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"manifest {uri}: missing required column(s) {missing}; required: {list(REQUIRED_COLUMNS)}"
        )
    for name, kind in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        if name in columns and not _type_ok(columns[name], kind):
            raise ManifestError(f"manifest {uri}: column {name!r} must be {kind}, found {columns[name]}")
    return table


def _resolve(base_dir: str, uri: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    if "://" in base_dir:
        # URL semantics for every scheme: "../" climbs within the bucket, never above it
        scheme, _, path = storage.join(base_dir, uri).partition("://")
        bucket, _, key = path.partition("/")
        parts: list[str] = []
        for part in key.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        return f"{scheme}://{bucket}/{'/'.join(parts)}"
    return os.path.abspath(os.path.join(base_dir, uri))


def _manifest_dir(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _optional_int(value: Any, name: str, item: str) -> int | None:
    """An integer option: exact for int64 columns (seeds use the whole range), integral and finite for floats."""
    if value is None or pd.isna(value):
        return None
    lo, hi = OPTION_RANGES[name]
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidParameter(f"{item}: {name}={value} is not an integer")
        value = int(value)
    if not lo <= value <= hi:
        raise InvalidParameter(f"{item}: {name}={value} is outside [{lo}, {hi}]")
    return value


def _validate_row(index: int, record: dict[str, Any], base_dir: str, seen: dict[str, int]) -> ManifestRow:
    raw_id = record.get("item_id")
    label = f"row {index} ({raw_id!r})"
    extra = {k: v for k, v in record.items() if k not in REQUIRED_COLUMNS and k not in OPTIONAL_COLUMNS}
    fields: dict[str, Any] = {
        "row": index,
        "item_id": raw_id if isinstance(raw_id, str) else str(raw_id),
        "portrait_uri": record.get("portrait_uri") or "",
        "audio_uri": record.get("audio_uri") or "",
        "extra": extra,
    }
    try:
        item_id = check_item_id(raw_id)
        if item_id in seen:
            raise DuplicateItemId(f"item_id {item_id!r} repeats row {seen[item_id]}; ids must be unique")
        seen[item_id] = index
        for column in ("portrait_uri", "audio_uri"):
            value = record.get(column)
            if not isinstance(value, str) or not value.strip():
                raise InvalidParameter(f"{label}: {column} is empty")
            fields[column] = _resolve(base_dir, value.strip())
        prompt = record.get("prompt")
        fields["prompt"] = None if prompt is None or pd.isna(prompt) else str(prompt)
        fields["seed"] = _optional_int(record.get("seed"), "seed", label) or 0
        fields["short_side"] = _optional_int(record.get("short_side"), "short_side", label)
        fields["crf"] = _optional_int(record.get("crf"), "crf", label)
    except AvatarError as exc:
        return ManifestRow(**fields, error=exc)
    return ManifestRow(**fields)


def load_manifest(uri: str) -> list[ManifestRow]:
    """All rows of the manifest at ``uri``, each validated; raises `ManifestError` for schema problems."""
    table = read_manifest_table(uri)
    base_dir = _manifest_dir(uri)
    seen: dict[str, int] = {}
    return [_validate_row(i, record, base_dir, seen) for i, record in enumerate(table.to_pylist())]
