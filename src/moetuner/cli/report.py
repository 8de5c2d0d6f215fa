"""``moetuner report``: the evaluation as an HTML page with plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetuner.cli import command, console
from moetuner.cli.evaluate import read_inputs
from moetuner.cli.options import (
    Calibration,
    Concurrency,
    Drop,
    EvalTrace,
    ExecModel,
    GpuName,
    InterBw,
    Interval,
    IntraBw,
    KernelFlag,
    ModelName,
    NumSteps,
    Online,
    OnlinePreset,
    PhaseFlag,
    PlacementGpus,
    PlacementNodes,
    Placements,
    Quiet,
    ReplayFlag,
    ReplicaPolicy,
    Select,
    StepSeed,
    StepTokens,
    TokensPerGpu,
    Window,
)
from moetuner.cli.progress import progress
from moetuner.errors import InputError
from moetuner.io import check_outputs
from moetuner.profile import profile_trace
from moetuner.steps import StepPlan


@command("report")
def report_command(
    placements: Placements,
    trace: EvalTrace,
    output: Annotated[str, typer.Option("-o", "--output", help="directory to write into")],
    layer: Annotated[int, typer.Option(
        "--layer", help="MoE layer whose transitions to the next layer are plotted")] = 0,
    select: Select = None,
    drop: Drop = None,
    model: ModelName = None,
    gpus: PlacementGpus = None,
    nodes: PlacementNodes = None,
    gpu: GpuName = "h100",
    intra_bw: IntraBw = None,
    inter_bw: InterBw = None,
    exec_model: ExecModel = "both",
    replica_policy: ReplicaPolicy = "even",
    calibration: Calibration = None,
    phase: PhaseFlag = "decode",
    kernel: KernelFlag = None,
    replay: ReplayFlag = "serving",
    tokens_per_gpu: TokensPerGpu = None,
    num_steps: NumSteps = None,
    seed: StepSeed = 0,
    concurrency: Concurrency = None,
    step_tokens: StepTokens = None,
    online: Online = None,
    online_preset: OnlinePreset = "vllm",
    window: Window = None,
    interval: Interval = None,
    quiet: Quiet = False,
) -> None:
    """Write an HTML report (table, load and traffic heatmaps, transitions) into a directory."""
    from moetuner.report import FILES, write_report  # matplotlib: imported only to plot

    if not output or (Path(output).exists() and not Path(output).is_dir()):
        raise InputError("-o", "path", "a directory (new or existing)", repr(output))
    check_outputs([Path(output) / name for name in FILES],
                  [*placements, trace, *([calibration] if calibration else [])])
    inputs = read_inputs(placements, trace, select, drop, model, gpus, nodes, gpu, intra_bw,
                         inter_bw, exec_model, replica_policy, calibration,
                         StepPlan(phase, replay, tokens_per_gpu, num_steps, seed, concurrency,
                                  step_tokens), kernel, online, online_preset, window, interval)
    if not 0 <= layer < inputs.trace.num_layers - 1:
        raise InputError("--layer", "layer",
                         f"a layer in [0, {inputs.trace.num_layers - 1}) (it has a next one)",
                         layer)
    transitions = profile_trace(inputs.trace).transitions[layer]
    with progress(f"replaying {inputs.trace.num_tokens} tokens"):
        rows, replays = inputs.compare()
    page = write_report(output, rows, replays, transitions, layer, inputs.header())
    console.print(f"wrote {page} (MoE times are predicted by a cost model, not measured)")
