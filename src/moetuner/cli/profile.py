"""``moetuner profile``: count a trace's routing statistics into a profile file."""

from __future__ import annotations

import functools
import operator
from pathlib import Path
from typing import Annotated

import typer

from moetuner.cli import command, console
from moetuner.cli.options import (
    Concurrency,
    Drop,
    PhaseFlag,
    Quiet,
    RayAddress,
    ReplayFlag,
    Select,
    StepTokens,
    TokensPerGpu,
    Workers,
    profile_paths_with_progress,
    profile_with_progress,
)
from moetuner.io import check_outputs
from moetuner.steps import StepPlan


@command("profile")
def profile_command(
    traces: Annotated[list[Path], typer.Argument(
        help="routing traces or profiles, or directories / quoted globs of shards in any "
        "mix of formats; all are profiled (streamed) and summed")],
    output: Annotated[Path, typer.Option("-o", "--output", help="profile .npz to write")],
    select: Select = None,
    drop: Drop = None,
    workers: Workers = 1,
    ray: RayAddress = None,
    step_gpus: Annotated[int | None, typer.Option(
        "--step-gpus", help="also keep engine steps formed for G GPUs (by default decode "
        "steps at serving scale, 128 tokens per GPU), for joint's per-step objective (reads "
        "each trace whole)")] = None,
    phase: PhaseFlag = "decode",
    replay: ReplayFlag = "serving",
    tokens_per_gpu: TokensPerGpu = None,
    concurrency: Concurrency = None,
    step_tokens: StepTokens = None,
    hedge: Annotated[float, typer.Option(
        "--hedge", help="serving steps each drawn from its own mix of the request kinds, "
        "Dirichlet concentration per kind (joint's default 0.5; 0: the profiled mix)")] = 0.5,
    quiet: Quiet = False,
) -> None:
    """Profile routing traces: loads, cross-layer transitions, co-activation, stability."""
    check_outputs([output], traces)
    if step_gpus is None:
        profile = profile_paths_with_progress(traces, select, drop, workers, ray)
    else:
        # The steps joint samples when it profiles a trace itself (JointParams.step_plan).
        steps = {"step_gpus": step_gpus,
                 "plan": StepPlan(phase, replay, tokens_per_gpu, concurrency=concurrency,
                                  step_tokens=step_tokens,
                                  hedge=hedge or None if replay == "serving" else None)}
        # Profile.__add__ keeps the sampled steps of every trace.
        profile = functools.reduce(operator.add, [
            profile_with_progress(str(trace), select, drop, **steps) for trace in traces])
    profile.save(output)
    skew = profile.skew()
    mi = profile.mutual_information()
    console.print(
        f"profiled {profile.tokens} tokens, {profile.num_layers} layers x "
        f"{profile.num_experts} experts, top-{profile.top_k} -> {output}\n"
        f"skew (max/mean expert load) mean {float(skew.mean()):.2f}, max {skew.max():.2f}"
        + ("" if mi is None or not mi.size  # one MoE layer: no consecutive pair
           else f"; consecutive-layer MI mean {mi.mean():.3f} bits")
    )
