"""Progress bars and log lines, through rich, that library code can use without caring about the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Wide enough for the bench table's columns when output goes to a pipe or a log file: rich would
# otherwise assume 80 columns there, cut table cells to "…" and wrap every epoch line in two.
PIPE_WIDTH = 240


def make_console(stderr: bool = False, fit: RenderableType | None = None) -> Console:
    """A rich console that uses the terminal's width, and a wide one (no wrapping) off a terminal: at least
    PIPE_WIDTH, and as wide as `fit` needs (a table of file paths: a log or a pipe keeps every path whole)."""
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    width = PIPE_WIDTH
    if fit is not None:
        wide = Console(stderr=stderr, width=10_000)
        width = max(width, Measurement.get(wide, wide.options, fit).maximum)
    return Console(stderr=stderr, width=width, soft_wrap=True)


console = make_console(stderr=True)


class Reporter:
    """Where training and export say what they are doing. `quiet=True` for tests and library use."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def log(self, message: str | Text) -> None:
        """One line as written: never read as rich markup, since lines carry paths and file names (a folder
        `a[` holding `b]` makes the path `a[/b]`, which rich would take for a closing tag and raise on)."""
        if not self.quiet:
            console.print(message, markup=False, highlight=False)

    def warn(self, message: str, label: str = "warning") -> None:
        """`label:` in yellow, then `message` as written."""
        self.log(Text.assemble((f"{label}:", "yellow"), " ", message))

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        # Off a terminal (a log file, a pipe, CI) or on a dumb one (TERM=dumb: no cursor movement) a bar cannot be
        # redrawn, and rich's Live would end each one with an empty line: a training log had a blank line after
        # every fine-tune epoch.
        if self.quiet or not console.is_terminal or console.is_dumb_terminal:
            yield lambda n=1: None
            return
        columns = (
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(),
        )  # fmt: skip
        with Progress(*columns, console=console, transient=True) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(tid, n)
