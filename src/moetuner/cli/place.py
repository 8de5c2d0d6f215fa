"""``moetuner place``: place a profile's experts on a cluster with one method."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from moetuner.cli import command, console, number, percent
from moetuner.cli.options import (
    Drop,
    GpuName,
    Gpus,
    InterBw,
    IntraBw,
    Nodes,
    Quiet,
    Select,
    cluster_from_flags,
    no_tokens,
    profile_with_progress,
)
from moetuner.cli.progress import progress
from moetuner.engine import EXEC_MODELS
from moetuner.errors import InputError
from moetuner.inputs import read_trace
from moetuner.io import check_outputs
from moetuner.methods import (
    PlaceOptions,
    SolveRecord,
    Workload,
    methods,
    parse_params,
    place,
    uses_steps,
)
from moetuner.placement import Placement
from moetuner.profile import Profile, profiles_by_label


def gpu_load_ratio(placement: Placement, profile: Profile) -> np.ndarray:
    """``[L]`` busiest GPU's load / mean GPU load per layer (1.0 = perfect balance); a
    replicated expert's load splits evenly over its copies."""
    per_copy = profile.load / np.maximum(placement.logcnt, 1)               # [L, E]
    gpu_load = np.einsum("le,leg->lg", per_copy, placement.replicas_on_gpu)
    mean = gpu_load.mean(axis=1)
    return np.divide(gpu_load.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)


def summary_table(record: SolveRecord, ratio: np.ndarray) -> Table:
    """The short table ``place`` prints."""
    table = Table("method", "status", "objective", "bound", "gap", "solve s",
                  "max/mean GPU load (mean, worst layer)")
    table.add_row(record.method, record.status, number(record.objective), number(record.bound),
                  "-" if record.gap is None else percent(record.gap),
                  number(record.solve_time, ".2f"), f"{ratio.mean():.3f}, {ratio.max():.3f}")
    return table


def workload_profiles(sources: list[Path], split_by: str | None, select: list[str] | None,
                      drop: list[str] | None, **steps) -> list[Profile]:
    """One profile per input, or per value of the label ``split_by`` in each input trace;
    traces keep engine steps sampled as ``steps`` says (``profile_trace``)."""
    if split_by is None:
        return [profile_with_progress(str(source), select, drop, **steps) for source in sources]
    return [part for source in sources
            for part in profiles_by_label(read_trace(source, select or (), drop or ()),
                                          split_by, **steps)]


@command("place")
def place_command(
    sources: Annotated[list[Path], typer.Argument(
        help="routing trace(s) or profile(s) (.npz); several are workloads that joint "
        "weighs (--weight, --robust), the others place their sum")],
    gpus: Gpus,
    output: Annotated[Path, typer.Option("-o", "--output", help="placement JSON to write")],
    method: Annotated[str, typer.Option(
        "--method", help=f"placement method: {', '.join(methods())}")] = "moetuner",
    nodes: Nodes = 1,
    gpu: GpuName = "h100",
    intra_bw: IntraBw = None,
    inter_bw: InterBw = None,
    redundant: Annotated[int, typer.Option("--redundant", help="redundant slots per layer (R)")
                         ] = 0,
    time_limit: Annotated[float, typer.Option("--time-limit", help="solver seconds")] = 60.0,
    seed: Annotated[int, typer.Option("--seed", help="random seed")] = 0,
    gap: Annotated[float, typer.Option("--gap", help="relative gap to stop at")] = 0.025,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="method setting KEY=VALUE (e.g. sizes=free, ilp2=heuristic); "
        "repeatable")] = None,
    exec_model: Annotated[str | None, typer.Option(
        "--exec", help="execution model joint optimises: return (default: how engines run "
        "EP) or follow")] = None,
    robust: Annotated[str | None, typer.Option(
        "--robust", help="joint over several workloads: mean (weighted) or max")] = None,
    weight: Annotated[list[float] | None, typer.Option(
        "--weight", help="weight of each workload, in order; repeatable (default: equal, "
        "or tokens with --split-by)")] = None,
    split_by: Annotated[str | None, typer.Option(
        "--split-by", help="one workload per value of this per-sequence label of the "
        "trace(s), e.g. seq_category (drift-aware joint)")] = None,
    select: Select = None,
    drop: Drop = None,
    quiet: Quiet = False,
) -> None:
    """Place the experts of traces (profiled on the fly) or profiles on GPUs."""
    check_outputs([output], sources)
    if not 0 < time_limit < np.inf:
        raise InputError("--time-limit", "time_limit", "a positive finite number of seconds",
                         time_limit)
    if not 0 <= gap < 1:
        raise InputError("--gap", "gap", "a relative gap in [0, 1)", gap)
    if exec_model not in (None, *EXEC_MODELS):
        raise InputError("--exec", "exec_model", f"one of {', '.join(EXEC_MODELS)}", exec_model)
    if method not in methods():
        raise InputError("--method", "method", f"one of {', '.join(methods())}", repr(method))
    params = parse_params(method, param)
    cluster = cluster_from_flags(gpus, nodes, gpu, intra_bw, inter_bw)
    # Per-step objectives need engine steps sampled for this cluster (which reads each
    # trace whole); the other methods profile streamed traces.
    steps = {"step_gpus": gpus, "plan": params.step_plan()} if uses_steps(method) else {}
    profiles = workload_profiles(sources, split_by, select, drop, **steps)
    if not profiles or not all(p.load.any() for p in profiles):
        raise no_tokens(", ".join(map(str, sources)), select, drop, "tokens")
    if weight is None and split_by is not None:
        weight = [p.tokens for p in profiles]
    workload = Workload(tuple(profiles), None if weight is None else tuple(weight),
                        robust or "mean")
    options = PlaceOptions(redundant=redundant, time_limit=time_limit, seed=seed, gap=gap,
                           exec_model=exec_model or PlaceOptions.exec_model, params=params)
    with progress(f"placing with {method} (time limit {time_limit:g} s)"):
        placement, record = place(workload, cluster, method, options)
    profile = workload.total
    placement.save(output)
    console.print(summary_table(record, gpu_load_ratio(placement, profile)))
    console.print(f"{record.log}\n-> {output}", markup=False, highlight=False)
