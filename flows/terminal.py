"""What a render shows in the terminal: one progress bar, log lines above it, and a summary at the end.

Prefect's and every library's log lines go through the same rich console as the bar (so the bar is redrawn, not
copied into the scrollback). By default only warnings from outside the runs show: what each flow and task run
logs goes to the Prefect API, where the UI shows it, and failed rows get one line each from the CLI. ``verbose``
shows everything from INFO up; ``quiet`` shows nothing but the summary.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from manifests import ItemResult

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # their lines reach the UI through the API handler


class _OutsideRuns(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(RUN_LOGGERS)


def route_logs(console: Console, verbose: bool, quiet: bool) -> None:
    """Replace the root logger's console handlers (Prefect's among them) with one that writes through ``console``."""
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, (PrefectConsoleHandler, RichHandler)):
            root.removeHandler(handler)
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False,
                          level=logging.INFO if verbose else logging.CRITICAL + 1 if quiet else logging.WARNING)
    if not verbose:
        handler.addFilter(_OutsideRuns())
    root.addHandler(handler)


class RenderProgress:
    """The bar: items done of total, how many failed and how many were already cached, elapsed and ETA."""

    def __init__(self, console: Console, total: int, quiet: bool):
        self.counts: Counter[str] = Counter()
        self.failed: list[ItemResult] = []
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed[/red] · [blue]{task.fields[cached]} cached[/blue]"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=quiet)
        self.bar = self.progress.add_task("rendering", total=total, failed=0, cached=0)

    @contextmanager
    def shown(self) -> Iterator[RenderProgress]:
        with self.progress:
            yield self

    def item_done(self, item: ItemResult) -> None:
        if item.status == "failed":
            self.counts["failed"] += 1
            self.failed.append(item)
            if not self.quiet:
                self.progress.console.print(f"[red]✗ {item.item_id}[/red] {item.failed_stage}: {item.error_class}: "
                                            f"{item.error_message}", markup=True, highlight=False)
        elif item.stage_cached and all(item.stage_cached.values()):
            self.counts["cached"] += 1
        self.progress.update(self.bar, advance=1, failed=self.counts["failed"], cached=self.counts["cached"])


def failed_rows_table(failed: list[ItemResult], limit: int = 50) -> Table:
    """The run's failed rows: id, stage, error class and message (the first ``limit``)."""
    table = Table("item", "stage", "error", "message", title=f"{len(failed)} failed row(s)", title_justify="left")
    for item in failed[:limit]:
        table.add_row(item.item_id, item.failed_stage or "", item.error_class or "", item.error_message or "")
    if len(failed) > limit:
        table.caption = f"… and {len(failed) - limit} more in results.parquet"
    return table
