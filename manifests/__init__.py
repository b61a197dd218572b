"""Input manifests and the results table: schemas, validation, writers."""

from .results import (
    ItemResult,
    StageOutcome,
    already_published,
    failed,
    fold_item,
    read_results,
    results_frame,
    write_results,
)
from .schema import ManifestError, ManifestRow, load_manifest, read_manifest_table

__all__ = [
    "ItemResult",
    "ManifestError",
    "ManifestRow",
    "StageOutcome",
    "already_published",
    "failed",
    "fold_item",
    "load_manifest",
    "read_manifest_table",
    "read_results",
    "results_frame",
    "write_results",
]
