"""The ``moetuner`` command line: a thin layer over the package's functions.

Each command lives in its own module of this package and registers itself on ``app``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated

import typer
from rich.console import Console

from moetuner.cli.progress import set_quiet
from moetuner.errors import InputError

app = typer.Typer(
    name="moetuner",
    help="Place Mixture-of-Experts experts on GPUs: trace -> profile -> place -> evaluate -> "
    "export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def make_console(stderr: bool = False) -> Console:
    """A console for the command's output. On a terminal, rich's own; otherwise (piped,
    redirected) soft-wrapped and wide, so a message stays one line and a table keeps its rows
    whole instead of wrapping mid-phrase at rich's default 80 columns (``COLUMNS`` still
    rules when set)."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, soft_wrap=True,
                   width=None if "COLUMNS" in os.environ else max(console.width, 200))


console = make_console()
err_console = make_console(stderr=True)


def number(value: object, spec: str = ".6g") -> str:
    """A solver figure as every command prints it (6 digits); '-' for None and anything that
    is not a finite number (a placement's metadata may hold anything)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{value:{spec}}"


def percent(share: float) -> str:
    """A share (a solver's relative gap, say) as every command prints it: ``82.75%``."""
    return f"{100 * share:.2f}%"


def version() -> str:
    """The installed moetuner's version ("unknown" when run from sources not installed)."""
    import importlib.metadata  # 25 ms: only for --version

    try:
        return importlib.metadata.version("moetuner")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        console.print(f"moetuner {version()}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print moetuner's version and exit")] = False,
) -> None:
    """Place Mixture-of-Experts experts on GPUs: trace -> profile -> place -> evaluate ->
    export."""


def command(name: str) -> Callable[[Callable], Callable]:
    """Register a command on ``app`` that turns ``InputError`` into a message and exit code 2."""

    def wrap(function: Callable) -> Callable:
        @functools.wraps(function)
        def checked(*args, **kwargs):
            set_quiet(kwargs.get("quiet", False))
            try:
                return function(*args, **kwargs)
            except InputError as exc:
                err_console.print(f"error: {exc}", style="bold red", markup=False, highlight=False,
                                  soft_wrap=True)
                raise typer.Exit(2) from None

        app.command(name)(checked)
        return function

    return wrap


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv``); return its exit code."""
    try:
        app(args=None if argv is None else list(argv), prog_name="moetuner")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


def main() -> None:
    sys.exit(run())


# Command modules register themselves on ``app`` when imported.
from moetuner.cli import (  # noqa: E402,F401
    calibrate,
    collect,
    evaluate,
    export,
    info,
    place,
    profile,
    report,
    sweep,
    synth,
)
