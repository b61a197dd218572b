"""What a render shows in the Prefect UI, live and at the end: how far, what failed, what it looks like.

Artifacts, keyed ``<deployment or "render">-<manifest stem>`` (the nightly manifests are named by day, so the nightly
keys carry the deployment and the day):
- ``…-progress``: items done of total, with failed and cached counts, updated as each item ends;
- ``…-results``: one row per item (status, failed stage, error, inputs, seconds, a link to the video), new
  versions while the run goes (at most every few seconds) and a final one at the end;
- ``…-summary``: counts by error class, wall time, the slowest items;
- ``…-contact-sheet``: a frame of every video (up to 24) in a grid, written beside the results and shown inline
  (a data URL, so it renders for local outputs too; object stores get a presigned link beside it).
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from uuid import UUID

import pandas as pd
from prefect import get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import deployment

from common import storage
from manifests import ItemResult

TABLE_EVERY_S = 5.0
TABLE_ROWS = 1000
SHEET_ITEMS = 24
SHEET_TILE = (160, 160)


def shown(create, *args, **kwargs):
    """An artifact call that never fails the run: a second try (two runs writing one key can race), then a
    warning in the run's log."""
    for attempt in (1, 2):
        try:
            return create(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the UI is informative; the deliverables are what count
            if attempt == 2:
                get_run_logger().warning("the UI artifact %s was not updated: %s: %s", kwargs.get("key", ""),
                                         type(exc).__name__, exc)
    return None


def manifest_stem(manifest_uri: str) -> str:
    """What runs and artifacts are named after: the manifest's file name without ``.parquet``."""
    return manifest_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")


def artifact_prefix(manifest_uri: str) -> str:
    """``<deployment or render>-<manifest stem>`` in the alphabet artifact keys allow."""
    raw = f"{deployment.name or 'render'}-{manifest_stem(manifest_uri)}".lower()
    return re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:80] or "render"


def video_link(uri: str | None) -> str:
    """Where a person can open the video: the local path, or a presigned HTTPS URL (7 days) for object stores."""
    if not uri:
        return ""
    if storage.is_local(uri):
        return uri
    fs, path = storage.filesystem(uri)
    try:
        return fs.sign(path, expiration=7 * 24 * 3600)
    except (NotImplementedError, OSError, ValueError):
        return uri


def _row(item: ItemResult, portrait: str, audio: str) -> dict:
    seconds = sum(v for v in item.stage_seconds.values() if v)
    return {"item": item.item_id, "status": item.status, "failed stage": item.failed_stage or "",
            "error": f"{item.error_class}: {item.error_message}" if item.error_class else "",
            "portrait": portrait, "audio": audio, "seconds": round(seconds, 2), "video": video_link(item.output_uri)}


@dataclass
class RunReport:
    """The artifacts of one run; ``item`` is called as each item ends, ``final`` once at the end (in the run's own
    context: artifacts belong to the run that creates them, while a progress artifact is updated by its id, so a
    parent run's report can follow its subflow's items live with ``live_table=False``)."""

    prefix: str
    total: int
    inputs: dict[str, tuple[str, str]]  # item id -> (portrait, audio)
    live_table: bool = True
    counts: Counter = field(default_factory=Counter)
    failed: list[dict] = field(default_factory=list)
    recent: deque = field(default_factory=lambda: deque(maxlen=TABLE_ROWS))
    progress_id: UUID | None = None
    table_at: float = 0.0

    def start(self) -> None:
        self.progress_id = shown(create_progress_artifact, 0.0, key=f"{self.prefix}-progress",
                                  description=self.description())

    def description(self) -> str:
        done = self.counts["succeeded"] + self.counts["failed"]
        return (f"{done} of {self.total} items: {self.counts['succeeded']} succeeded ({self.counts['cached']} "
                f"already done), {self.counts['failed']} failed")

    def item(self, item: ItemResult) -> None:
        self.counts[item.status] += 1
        if item.status == "succeeded" and item.stage_cached and all(item.stage_cached.values()):
            self.counts["cached"] += 1
        row = _row(item, *self.inputs.get(item.item_id, ("", "")))
        (self.failed if item.status == "failed" and len(self.failed) < TABLE_ROWS else self.recent).append(row)
        done = self.counts["succeeded"] + self.counts["failed"]
        if self.progress_id is not None:
            shown(update_progress_artifact, self.progress_id, 100.0 * done / max(self.total, 1), self.description())
        if self.live_table and time.monotonic() - self.table_at >= TABLE_EVERY_S:
            self.table_at = time.monotonic()
            self.table(f"{self.description()} (in progress)")

    def table(self, description: str) -> None:
        """Failed rows first, then the latest others: at most `TABLE_ROWS` (all rows are in results.parquet)."""
        rows = (self.failed + list(self.recent))[:TABLE_ROWS]
        shown(create_table_artifact, key=f"{self.prefix}-results", table=rows, description=description)

    def final(self, frame: pd.DataFrame, summary: dict, output_uri: str) -> None:
        self.table(f"{self.description()}: {summary['results_uri']}")
        publish_summary(self.prefix, frame, summary)
        publish_contact_sheet(self.prefix, frame, output_uri)


def publish_summary(prefix: str, frame: pd.DataFrame, summary: dict) -> None:
    """Counts by error class, wall time and the slowest items, as markdown."""
    seconds = frame.filter(like="seconds_").apply(pd.to_numeric, errors="coerce").fillna(0.0).sum(axis=1)
    slowest = frame.assign(seconds=seconds).nlargest(5, "seconds")
    errors = frame.loc[frame["status"] == "failed", "error_class"].value_counts()
    lines = [f"## {summary['succeeded']} of {summary['items']} items succeeded, {summary['failed']} failed",
             f"Backend `{summary['backend']}`, wall time {summary['wall_seconds']:.1f} s, "
             f"{summary['cache_hits']} stage cache hits. Results: `{summary['results_uri']}`", ""]
    if len(errors):
        lines += ["| error class | rows |", "|---|---|", *[f"| {name} | {n} |" for name, n in errors.items()], ""]
    lines += ["| slowest items | seconds | status |", "|---|---|---|",
              *[f"| {r.item_id} | {r.seconds:.2f} | {r.status} |" for r in slowest.itertuples()]]
    shown(create_markdown_artifact, key=f"{prefix}-summary", markdown="\n".join(lines),
           description=f"{summary['failed']} failed of {summary['items']}")


def contact_sheet(frame: pd.DataFrame) -> bytes | None:
    """A JPEG grid of the middle frame of each published video (the first `SHEET_ITEMS`), each labelled."""
    from PIL import Image, ImageDraw

    from avatar_model.media.video import middle_frame

    done = frame[(frame["status"] == "succeeded") & frame["output_uri"].notna()].head(SHEET_ITEMS)
    if done.empty:
        return None
    width, height = SHEET_TILE
    columns = min(6, len(done))
    sheet = Image.new("RGB", (columns * width, -(-len(done) // columns) * (height + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(done.itertuples()):
        with storage.local_copy(row.output_uri, ".mp4") as path:
            tile = Image.fromarray(middle_frame(path))
        tile.thumbnail(SHEET_TILE)
        x, y = (n % columns) * width, (n // columns) * (height + 16)
        sheet.paste(tile, (x + (width - tile.width) // 2, y))
        draw.text((x + 4, y + height + 2), str(row.item_id)[:24], fill="black")
    out = io.BytesIO()
    sheet.save(out, "JPEG", quality=80)
    return out.getvalue()


def publish_contact_sheet(prefix: str, frame: pd.DataFrame, output_uri: str) -> None:
    data = contact_sheet(frame)
    if data is None:
        return
    uri = storage.join(output_uri, "contact_sheet.jpg")
    storage.publish_bytes(data, uri)
    inline = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    shown(create_image_artifact, image_url=inline, key=f"{prefix}-contact-sheet",
           description=f"a frame of each video; the file: {video_link(uri)}")
