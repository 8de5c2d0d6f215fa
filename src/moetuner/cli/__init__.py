"""The ``moetuner`` command line: a thin layer over the package's functions.

Each command lives in its own module of this package and registers itself on ``app``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

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
console = Console()
err_console = Console(stderr=True)


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
