"""``moetuner sweep``: place and evaluate a grid of clusters, methods and settings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moetuner.cli import command, console
from moetuner.cli.options import Calibration, Drop, ModelName, Quiet, RayAddress, Select
from moetuner.cli.progress import progress
from moetuner.errors import InputError
from moetuner.sweep import (
    TIME_COLUMN,
    TIME_LABEL,
    EvalOptions,
    SweepGrid,
    SweepInputs,
    load_grid_file,
    recommend,
    run_sweep,
)


def split_list(text: str | None, integers: bool = False) -> list | None:
    """``"4,8,16"`` to ``[4, 8, 16]`` (or strings); None stays None."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not integers:
        return parts
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise InputError("flag", "list", "comma-separated integers", repr(text)) from None


def redundant_values(text: str | None) -> list | None:
    """R values: integers stay integers, multiples of G stay text."""
    parts = split_list(text)
    return None if parts is None else [int(p) if p.isdigit() else p for p in parts]


@command("sweep")
def sweep_command(
    output: Annotated[Path, typer.Option("-o", "--output", help="output directory")],
    grid_file: Annotated[Path | None, typer.Argument(
        help="sweep TOML file with tables inputs, grid and options; flags override it")] = None,
    profile: Annotated[Path | None, typer.Option(
        "--profile", help="trace or profile to place from")] = None,
    trace: Annotated[Path | None, typer.Option(
        "--trace", help="held-out trace to evaluate on")] = None,
    profile_select: Annotated[list[str] | None, typer.Option(
        "--profile-select", help="NAME=GLOB selection of the profile's trace; repeatable")
                              ] = None,
    profile_drop: Annotated[list[str] | None, typer.Option(
        "--profile-drop", help="bool label dropping sequences of the profile's trace")] = None,
    select: Select = None,
    drop: Drop = None,
    model: ModelName = None,
    calibration: Calibration = None,
    gpus: Annotated[str | None, typer.Option("--gpus", help="GPU counts, e.g. 4,8,16")] = None,
    nodes: Annotated[str | None, typer.Option("--nodes", help="node counts, e.g. 1,2")] = None,
    redundant: Annotated[str | None, typer.Option(
        "--redundant", help="redundant slots: integers or multiples of G, e.g. 0,G/2,G")] = None,
    methods: Annotated[str | None, typer.Option(
        "--methods", help="methods, e.g. linear,eplb,moetuner")] = None,
    exec_models: Annotated[str | None, typer.Option(
        "--exec", help="execution models: return,follow")] = None,
    batching: Annotated[str | None, typer.Option("--batching", help="batching settings")
                        ] = None,
    concurrency: Annotated[str | None, typer.Option(
        "--concurrency", help="running sequences for decode batching")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU presets, e.g. h100,h200")
                   ] = None,
    time_limit: Annotated[float | None, typer.Option(
        "--time-limit", help="solver seconds per point (default 10)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="random seed")] = None,
    replica_policy: Annotated[str | None, typer.Option(
        "--replica-policy", help="even (vLLM) or nearest (SGLang)")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="local processes, or CPUs of a local Ray (default: all CPUs)")] = None,
    ray: RayAddress = None,
    quiet: Quiet = False,
) -> None:
    """Place and evaluate every point of a grid; write a table and a Pareto page."""
    inputs, grid, options = load_grid_file(grid_file) if grid_file else ({}, {}, {})
    flags = {"profile": profile and str(profile), "trace": trace and str(trace),
             "profile_select": profile_select, "profile_drop": profile_drop,
             "select": select, "drop": drop, "model": model,
             "calibration": calibration and str(calibration)}
    inputs.update({key: value for key, value in flags.items() if value is not None})
    for key in ("profile", "trace"):
        if not inputs.get(key):
            raise InputError(f"--{key}", key, f"a {key} path (flag or [inputs] {key})")
    grid_flags = {"gpus": split_list(gpus, True), "nodes": split_list(nodes, True),
                  "redundant": redundant_values(redundant), "methods": split_list(methods),
                  "exec_models": split_list(exec_models), "batching": split_list(batching),
                  "concurrency": split_list(concurrency, True), "gpu": split_list(gpu)}
    grid.update({key: value for key, value in grid_flags.items() if value is not None})
    option_flags = {"time_limit": time_limit, "seed": seed, "replica_policy": replica_policy,
                    "workers": workers, "ray": ray}
    options.update({key: value for key, value in option_flags.items() if value is not None})
    sweep_inputs = SweepInputs(**{key: tuple(value) if isinstance(value, list) else value
                                  for key, value in inputs.items()})
    sweep_grid = SweepGrid(
        **{key: tuple(value) if isinstance(value, list) else value
           for key, value in grid.items()},
        **{key: options[key] for key in ("time_limit", "seed") if key in options},
        evaluation=EvalOptions(**{key: options[key] for key in ("replica_policy",)
                                  if key in options}))
    start = time.perf_counter()
    with progress("sweep: points placed and evaluated") as report:
        result = run_sweep(sweep_inputs, sweep_grid, output, options.get("workers"),
                           options.get("ray"),
                           lambda done, total: report(completed=done, total=total))
    table = Table("G", "GPU", "exec", "batching", "N", "R", "method", TIME_LABEL,
                  "vs linear", title="Recommended configuration per GPU count")
    for row in recommend(result.rows):
        speedup = row["speedup_vs_linear"]
        table.add_row(str(row["gpus"]), row["gpu"], row["exec_model"], row["batching"],
                      str(row["nodes"]), str(row["redundant"]), row["method"],
                      f"{row[TIME_COLUMN] * 1e3:.3f}",
                      "-" if speedup is None else f"{speedup:.3f}x")
    console.print(table)
    console.print(f"{len(result.rows)} points ({result.computed} computed, {result.reused} "
                  f"from an earlier run, {len(result.skipped)} skipped) in "
                  f"{time.perf_counter() - start:.1f} s -> {result.page}; each point's "
                  f"placement in {output / 'points'}", markup=False, highlight=False)
    for entry in result.exported:
        files = ", ".join(entry["files"])
        console.print(f"recommended {entry['method']} ({entry['key']}): "
                      + (f"exported to {files}" if files else entry["note"]), markup=False,
                      highlight=False, soft_wrap=True)
