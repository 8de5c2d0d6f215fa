"""Progress on long work, one helper for every command: a rich bar (or a spinner while the
total is unknown) on stderr, shown only when stderr is a terminal and the command was not
given ``--quiet`` (the ``command`` wrapper sets that before each command runs)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """Hide (True) or allow (False) progress for the command about to run."""
    _state["quiet"] = bool(quiet)


def shown(console: Console) -> bool:
    """Whether progress is drawn on ``console``: a terminal, and no ``--quiet``."""
    return console.is_terminal and not _state["quiet"]


class _Rate(ProgressColumn):
    """Items per second, e.g. ``2,350,000 tokens/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:,.0f} {self.unit}/s")


@contextlib.contextmanager
def progress(description: str, total: float | None = None, unit: str | None = None,
             console: Console | None = None) -> Iterator[Callable[..., None]]:
    """Show progress while the ``with`` block runs; yield ``report(advance=0, *,
    completed=None, total=None)`` to move it (or set its total once known).

    With a total: a bar, done / total, the rate (``unit`` per second, when given), the time
    elapsed and left; without: a spinner and the time elapsed. Removed when done. Drawn on
    ``console`` (default: stderr).
    """
    console = console or Console(stderr=True)
    columns: list[ProgressColumn] = [SpinnerColumn(), TextColumn("{task.description}"),
                                     BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(_Rate(unit))
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    bar = Progress(*columns, console=console, transient=True, disable=not shown(console))
    task = bar.add_task(description, total=total)

    def report(advance: float = 0, *, completed: float | None = None,
               total: float | None = None) -> None:
        bar.update(task, advance=advance or None, completed=completed, total=total)

    with bar:
        yield report
