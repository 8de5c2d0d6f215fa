"""Flags shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moetuner.cluster import Cluster, make_cluster
from moetuner.inputs import is_trace, read_profile, read_trace
from moetuner.profile import Profile, profile_trace

Select = Annotated[
    list[str] | None,
    typer.Option("--select", help="keep sequences whose label matches NAME=GLOB (e.g. "
                 "seq_dataset=mmlu*; '|' separates alternatives); repeatable"),
]
Drop = Annotated[
    list[str] | None,
    typer.Option("--drop", help="drop sequences flagged by a bool label (e.g. seq_repetition)"),
]
Gpus = Annotated[int, typer.Option("--gpus", help="expert-parallel GPUs (G)")]
Nodes = Annotated[int, typer.Option("--nodes", help="nodes; G must be a multiple")]
GpuName = Annotated[str, typer.Option("--gpu", help="GPU preset: h100, h200, a100, b200")]
IntraBw = Annotated[float | None, typer.Option("--intra-bw",
                                                help="GB/s per GPU inside a node (NVLink)")]
InterBw = Annotated[float | None, typer.Option("--inter-bw",
                                                help="GB/s per GPU across nodes (network)")]


def cluster_from_flags(gpus: int, nodes: int, gpu: str, intra_bw: float | None,
                       inter_bw: float | None) -> Cluster:
    """The cluster the flags describe (bandwidths given in GB/s)."""
    return make_cluster(gpus, nodes, gpu,
                        None if intra_bw is None else intra_bw * 1e9,
                        None if inter_bw is None else inter_bw * 1e9)


def token_progress(total: int, description: str) -> tuple[Progress, Callable[[int], None]]:
    """A rich progress bar over ``total`` tokens and the callback that advances it."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), transient=True)
    task = progress.add_task(description, total=total)
    return progress, lambda n: progress.advance(task, n)


def profile_with_progress(path: str, select: list[str] | None, drop: list[str] | None,
                          **steps) -> Profile:
    """Profile a trace with a progress bar (``steps``: sampled engine steps, as
    ``profile_trace`` takes them), or read a profile file as it is."""
    if not is_trace(path):
        return read_profile(path, select or (), drop or ())
    trace = read_trace(path, select or (), drop or ())
    progress, advance = token_progress(trace.num_tokens, f"profiling {trace.num_tokens} tokens")
    with progress:
        return profile_trace(trace, progress=advance, **steps)

ModelName = Annotated[str | None, typer.Option(
    "--model", help="model preset for the cost model (default: the preset matching the trace)")]
ExecModel = Annotated[str, typer.Option(
    "--exec", help="execution model: return, follow or both")]
ReplicaPolicy = Annotated[str, typer.Option(
    "--replica-policy", help="replica choice: even (vLLM) or nearest (SGLang)")]
Calibration = Annotated[Path | None, typer.Option(
    "--calibration", help="cost-model coefficients JSON (default: built-in assumptions)")]
EvalTrace = Annotated[Path, typer.Option("--trace", help="held-out routing trace to replay")]
Placements = Annotated[list[Path], typer.Argument(help="placement JSON files to compare")]
PlacementGpus = Annotated[int | None, typer.Option(
    "--gpus", help="expert-parallel GPUs (default: the placements')")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print the numbers as JSON")]
