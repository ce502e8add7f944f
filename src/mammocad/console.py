"""Terminal output shared by the batch commands: the progress bar and the table of failed items."""

from __future__ import annotations

from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def progress_bar(console: Console, enabled: bool = True, remaining: bool = True,
                 extra: Sequence[ProgressColumn] = ()) -> Progress:
    """The one progress bar of prepare/predict/evaluate/train; off when not writing to a terminal."""
    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, *extra, console=console, disable=not (enabled and console.is_terminal))


def print_failures(console: Console, title: str, item_column: str, rows: Sequence[tuple[str, str]],
                   max_rows: int = 20) -> None:
    """Table of (item, reason) rows, cut after ``max_rows`` with a count of the rest."""
    if not rows:
        return
    table = Table(title=title)
    table.add_column(item_column, overflow="fold")
    table.add_column("reason", overflow="fold")
    for item, reason in rows[:max_rows]:
        table.add_row(item, reason)
    if len(rows) > max_rows:
        table.add_row("...", f"and {len(rows) - max_rows} more")
    console.print(table)
