"""Input manifests and the results table: schemas, validation, writers."""

from .results import RESULT_COLUMNS, ItemResult, results_frame, write_results
from .schema import ManifestError, ManifestRow, load_manifest, read_manifest_table

__all__ = [
    "RESULT_COLUMNS",
    "ItemResult",
    "ManifestError",
    "ManifestRow",
    "load_manifest",
    "read_manifest_table",
    "results_frame",
    "write_results",
]
