"""Progress on long work: drawn on a terminal, quiet when piped or with --quiet."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from conftest import SLICE
from moetuner.cli import progress as progress_module
from moetuner.cli import run
from moetuner.cli.progress import progress, set_quiet


def terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=100), buffer


def test_progress_draws_on_a_terminal_only_without_quiet():
    set_quiet(False)
    console, buffer = terminal()
    with progress("counting tokens", 10, "tokens", console=console) as report:
        report(4)
        report(completed=10)
    assert "counting tokens" in buffer.getvalue()
    set_quiet(True)
    console, buffer = terminal()
    with progress("counting tokens", 10, console=console) as report:
        report(4)
    assert buffer.getvalue() == ""
    set_quiet(False)
    piped = io.StringIO()
    with progress("counting tokens", console=Console(file=piped)) as report:
        report(total=5, completed=5)
    assert piped.getvalue() == ""


@pytest.fixture
def captured_terminal(monkeypatch):
    """Every progress display of a command drawn into one terminal buffer."""
    buffer = io.StringIO()
    monkeypatch.setattr(progress_module, "Console",
                        lambda **_: Console(file=buffer, force_terminal=True, width=120))
    return buffer


@pytest.mark.parametrize("quiet", [False, True])
def test_place_shows_progress_unless_quiet(tmp_path, captured_terminal, quiet):
    args = ["place", str(SLICE), "--gpus", "4", "--method", "linear", "-o",
            str(tmp_path / "p.json")]
    assert run(args + (["--quiet"] if quiet else [])) == 0
    drawn = captured_terminal.getvalue()
    if quiet:
        assert drawn == ""
    else:
        assert "profiling" in drawn and "placing with linear (time limit 60 s)" in drawn
    # The next command without --quiet shows progress again (the flag is per command).
    assert run(["synth", "--layers", "2", "--experts", "8", "--topk", "2", "--tokens", "50",
                "-o", str(tmp_path / "s.npz")]) == 0
    assert "synthesizing 50 tokens x 2 layers" in captured_terminal.getvalue()
