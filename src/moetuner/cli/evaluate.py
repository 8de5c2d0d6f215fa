"""``moetuner evaluate``: replay a trace through placements and compare them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moetuner.cli import command, console
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
    JsonFlag,
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
    cluster_from_flags,
    no_tokens,
)
from moetuner.cli.progress import progress
from moetuner.cli.verdict import ExportBest, ExportFormat, add_memory, check_export, verdict
from moetuner.cluster import Cluster
from moetuner.costmodel import MODEL_NOTE, CostCoefficients, load_coefficients
from moetuner.engine import EXEC_MODELS, EngineSettings, kernel_for
from moetuner.errors import InputError
from moetuner.evaluate import (
    STEP_LOADS_NOTE,
    Replay,
    check_compatible,
    compare,
    compare_step_loads,
    model_for_trace,
)
from moetuner.formats import PROFILE, identify, read_placement
from moetuner.inputs import is_trace, read_profile, read_trace
from moetuner.io import MAX_PAIR_CELLS, check_outputs
from moetuner.models import ModelSpec, get_model, model_with_shape
from moetuner.online import OnlinePolicy, online_policy
from moetuner.placement import Placement, recorded_nodes
from moetuner.profile import Profile
from moetuner.steps import StepPlan, Steps
from moetuner.trace import Trace


@dataclass(frozen=True)
class EvaluationInputs:
    """What the evaluate and report commands read from their flags."""

    placements: dict[str, Placement]
    trace: Trace
    cluster: Cluster
    model: ModelSpec
    exec_models: tuple[str, ...]
    settings: EngineSettings
    coefficients: CostCoefficients
    plan: StepPlan
    steps: Steps | None
    online: OnlinePolicy | None

    @property
    def replica_policy(self) -> str:
        return self.settings.replica_policy

    def compare(self) -> tuple[list[dict], dict[tuple[str, str], Replay]]:
        return compare(self.placements, self.trace, self.cluster, self.model, self.exec_models,
                       self.settings, self.coefficients, self.steps, self.plan,
                       online=self.online)

    def describe_steps(self) -> str:
        if self.steps is None:
            return (f"whole-trace average, batch = "
                    f"{self.coefficients.tokens_per_gpu_batch:g} tokens per GPU")
        if self.plan.source == "serving":
            return self.steps.description
        return f"recorded order: {self.steps.description} ({self.steps.num_steps} steps)"

    def warnings(self) -> list[str]:
        """What the user should know about this evaluation's regime."""
        notes = []
        if self.online is not None and self.steps is not None and (
                self.online.interval >= self.steps.num_steps):
            notes.append(f"the online interval ({self.online.interval} steps) is not shorter "
                         f"than the {self.steps.num_steps} replayed steps: no rebalance "
                         "happens (pass --interval, or more --steps)")
        if self.steps is not None and self.plan.source == "recorded":
            per_gpu = self.steps.sizes.mean() / self.cluster.num_gpus
            if per_gpu < 64:
                notes.append(f"recorded steps hold {per_gpu:.1f} tokens per GPU on average; "
                             "serving clusters run 128-480 (decode) or 4,096+ (prefill): "
                             "use --replay serving to predict at serving scale")
        return notes

    def sample(self) -> dict[str, str]:
        """Per placement, whether the trace is ``in-sample`` (its profile's provenance names
        this trace file with the same selection, or with none), ``held-out`` (profiled on
        other files or selections) or ``unknown`` (no provenance: an engine file)."""
        here = Path(self.trace.source).resolve()
        sample = {}
        for name, placement in self.placements.items():
            profile = placement.metadata.get("profile") if isinstance(
                placement.metadata, dict) else None
            sources = [entry for entry in profile if isinstance(entry, dict)] \
                if isinstance(profile, list) else []
            if not sources:
                sample[name] = "unknown"
            elif any(Path(str(entry.get("source"))).resolve() == here
                     and entry.get("selection") in ("all", self.trace.selection)
                     for entry in sources):
                sample[name] = "in-sample"
            else:
                sample[name] = "held-out"
        return sample

    def title(self) -> str:
        """'held-out' only when every placement was profiled elsewhere; in-sample names the
        placements whose profile holds this trace."""
        sample = self.sample()
        inside = [name for name, kind in sample.items() if kind == "in-sample"]
        if inside:
            return (f"MoE layers on the profiled trace (in-sample for {', '.join(inside)}: "
                    "figures flatter them)")
        if all(kind == "held-out" for kind in sample.values()):
            return "MoE layers on the held-out trace"
        return "MoE layers on the evaluation trace"

    def header(self) -> dict:
        online = None if self.online is None else {"name": self.online.name,
                                                   "window": self.online.window,
                                                   "interval": self.online.interval}
        return {"note": MODEL_NOTE, "trace": self.trace.source,
                "selection": self.trace.selection, "tokens": self.trace.num_tokens,
                "topk_order": "ordered" if self.trace.ordered else "unordered",
                "model": self.model.name, "cluster": self.cluster.to_dict(),
                "phase": self.plan.phase, "kernel": self.settings.kernel,
                "batching": self.describe_steps(), "online": online,
                "warnings": self.warnings(),
                "coefficients": self.coefficients.to_dict(), "title": self.title(),
                "sample": self.sample()}


def default_nodes(placements: dict[str, Placement], num_gpus: int) -> int:
    """The node count the placements of ``num_gpus`` GPUs were made for (1 when none records
    one); an ``InputError`` asking for ``--nodes`` when they record different counts."""
    recorded = {name: recorded_nodes(p) for name, p in placements.items()
                if p.num_gpus == num_gpus}
    counts = sorted({n for n in recorded.values() if n is not None})
    if len(counts) > 1:
        raise InputError("--nodes", "num_nodes", "a node count: the placements were made for "
                         "different clusters (" + ", ".join(
                             f"{name}: {n}" for name, n in recorded.items() if n) + " nodes)")
    return counts[0] if counts else 1


def read_inputs(placements: list[Path], trace: Path, select: list[str] | None,
                drop: list[str] | None, model: str | None, gpus: int | None, nodes: int | None,
                gpu: str, intra_bw: float | None, inter_bw: float | None, exec_model: str,
                replica_policy: str, calibration: Path | None, plan: StepPlan = StepPlan(),
                kernel: str | None = None, online: str | None = None,
                online_preset: str = "vllm", window: int | None = None,
                interval: int | None = None) -> EvaluationInputs:
    """Read and check the flags shared by ``evaluate`` and ``report``."""
    exec_models = EXEC_MODELS if exec_model == "both" else (exec_model,)
    if not set(exec_models) <= set(EXEC_MODELS):
        raise InputError("--exec", "exec", "return, follow or both", repr(exec_model))
    settings = EngineSettings(exec_models[0], replica_policy, kernel_for(plan.phase, kernel))
    loaded = {}
    for path in placements:
        name = path.stem if path.stem not in loaded else str(path)
        loaded[name] = read_placement(path, gpus)
    if not loaded:
        raise InputError("PLACEMENT", "placements", "at least one placement file")
    events = read_trace(trace, select or (), drop or ())
    if not events.num_tokens:
        raise no_tokens(str(trace), select, drop, "topk_ids")
    num_gpus = next(iter(loaded.values())).num_gpus if gpus is None else gpus
    cluster = cluster_from_flags(num_gpus, default_nodes(loaded, num_gpus) if nodes is None
                                 else nodes, gpu, intra_bw, inter_bw)
    if events.num_layers * cluster.num_gpus ** 2 > MAX_PAIR_CELLS:
        # The replay holds a [layers, G, G] traffic matrix per placement.
        raise InputError("--gpus", "num_gpus", f"layers x G x G at most {MAX_PAIR_CELLS}",
                         cluster.num_gpus)
    for placement in loaded.values():
        check_compatible(placement, events, cluster)
    # Drawn once: every placement is scored on the same steps.
    steps = plan.steps(events.seq_lens, events.num_tokens, cluster.num_gpus)
    return EvaluationInputs(
        placements=loaded, trace=events, cluster=cluster,
        model=model_for_trace(events) if model is None else get_model(model),
        exec_models=exec_models, settings=settings,
        coefficients=CostCoefficients() if calibration is None else load_coefficients(calibration),
        plan=plan, steps=steps,
        online=None if online is None else online_policy(online, cluster, online_preset,
                                                          window, interval),
    )


def evaluate_step_loads(placements: list[Path], path: Path, profile: Profile,
                        model_name: str | None,
                        gpus: int | None, nodes: int | None, gpu: str, intra_bw: float | None,
                        inter_bw: float | None, calibration: Path | None, kernel: str,
                        as_json: bool) -> None:
    """``moetuner evaluate`` on the steps ``profile`` (read from ``path``) recorded as loads
    (``step_loads``): ``compare_step_loads``, printed with what loads alone cannot tell."""
    loaded = {}
    for file in placements:
        loaded[file.stem if file.stem not in loaded else str(file)] = read_placement(file, gpus)
    first = next(iter(loaded.values()), None)
    if first is None:
        raise InputError("PLACEMENT", "placements", "at least one placement file")
    L, E = profile.num_layers, profile.num_experts
    for placement in loaded.values():
        if (placement.num_layers, placement.num_experts) != (L, E):
            raise InputError(placement.source, "phy2log", f"{L} layers x {E} experts (those "
                             f"of {path})", f"{placement.num_layers} x {placement.num_experts}")
    model = model_with_shape(L, E, None) if model_name is None else get_model(model_name)
    if model is None or (model.num_moe_layers, model.num_experts) != (L, E):
        raise InputError("--model", "model", f"a preset with {L} MoE layers and {E} experts "
                         "(pass --model)", None if model is None else model.name)
    num_gpus = first.num_gpus if gpus is None else gpus
    cluster = cluster_from_flags(num_gpus, default_nodes(loaded, num_gpus) if nodes is None
                                 else nodes, gpu, intra_bw, inter_bw)
    coefficients = CostCoefficients() if calibration is None else load_coefficients(calibration)
    rows = compare_step_loads(loaded, profile.step_loads, cluster, model,
                              EngineSettings(kernel=kernel), coefficients)
    if as_json:
        print(json.dumps({"note": MODEL_NOTE, "profile": str(path), "model": model.name,
                          "cluster": cluster.to_dict(), "kernel": kernel,
                          "warnings": [STEP_LOADS_NOTE], "rows": rows}, indent=2))
        return
    table = Table(title="MoE layers per recorded engine step (per-step loads)")
    for column in ("placement", "slots", "step imb.", "ms/step", "p99 ms",
                   "disp / comp / comb ms", "tokens/s", "speedup"):
        table.add_column(column, justify="left" if column == "placement" else "right")
    for row in rows:
        split = " / ".join(f"{row[name] / max(row['steps'], 1) * 1e3:.3f}"
                           for name in ("dispatch_s", "compute_s", "combine_s"))
        table.add_row(row["placement"], str(row["slots_per_gpu"]),
                      f"{row['step_imbalance']:.3f}", f"{row['mean_step_time_s'] * 1e3:.3f}",
                      f"{row['p99_step_time_s'] * 1e3:.3f}", split,
                      f"{row['tokens_per_s']:.4g}", f"{row['speedup_vs_linear']:.3f}x")
    Console(width=max(console.width, 160)).print(table)
    console.print(f"{rows[0]['batching']} of {path}; {model.name} on {cluster.num_gpus} x "
                  f"{cluster.gpu.name} in {cluster.num_nodes} node(s); {kernel} kernels.\n"
                  f"MoE times are {MODEL_NOTE}.")
    console.print(f"note: {STEP_LOADS_NOTE}.", style="yellow", markup=False, highlight=False)


def comparison_table(rows: list[dict], title: str = "MoE layers on the evaluation trace"
                     ) -> Table:
    """The comparison as a rich table (one row per placement and execution model)."""
    table = Table(title=f"{title}, per engine step")
    table.add_column("placement", no_wrap=True)
    table.add_column("exec")
    online = any("experts_moved" in row for row in rows)
    for column in ("slots", "expert GB/GPU", "step imb.", "remote nodes", "x-node", "ms/step",
                   "p99 ms", "disp / comp / comb ms", "tokens/s", "speedup") + (
                       ("moved", "move ms/step") if online else ()):
        table.add_column(column, justify="right")
    for row in rows:
        moves = ([str(row["experts_moved"]), f"{row['move_time_per_step_s'] * 1e3:.4f}"]
                 if "experts_moved" in row else ["", ""])
        split = " / ".join(f"{row[name] / max(row['steps'], 1) * 1e3:.3f}"
                           for name in ("dispatch_s", "compute_s", "combine_s"))
        memory = row.get("expert_memory_per_gpu_bytes")
        table.add_row(row["placement"], row["exec_model"], str(row["slots_per_gpu"]),
                      "-" if memory is None else f"{memory / 1e9:.2f}",
                      f"{row['step_imbalance']:.3f}", f"{row['remote_nodes_per_token']:.2f}",
                      f"{row['share_cross_node']:.1%}",
                      f"{row['mean_step_time_s'] * 1e3:.3f}",
                      f"{row['p99_step_time_s'] * 1e3:.3f}", split,
                      f"{row['tokens_per_s']:.4g}",
                      f"{row['speedup_vs_linear']:.3f}x", *(moves if online else []))
    table.caption = ("expert GB/GPU: expert weights each GPU holds; step imb.: per step, sum "
                     "of busiest / sum of mean GPU load; remote nodes: distinct remote nodes a "
                     "token reaches per layer; x-node: share of token moves leaving the node; "
                     "ms/step: predicted MoE layers per step, mean and p99, split into "
                     "dispatch, slowest GPU's compute and combine; speedup: linear's mean step "
                     "time over this row's (online rows: plus their move time per step); "
                     "moved, move ms/step: online rebalancing's expert moves and their time "
                     "amortised per step")
    return table


@command("evaluate")
def evaluate_command(
    placements: Placements,
    trace: EvalTrace,
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
    as_json: JsonFlag = False,
    export_best: ExportBest = None,
    export_format: ExportFormat = "sglang",
    quiet: Quiet = False,
) -> None:
    """Compare placements on a held-out trace, engine step by engine step at serving scale:
    balance, traffic, predicted MoE time per step (and online rebalancing with --online);
    then the verdict: the placement to deploy per phase and execution model, exported with
    --export-best. A profile with per-step loads (an SGLang stat dump) is evaluated on its
    recorded steps."""
    check_outputs(check_export(export_best, export_format), [*placements, trace])
    recorded = None if is_trace(trace) or identify(trace).role != PROFILE \
        else read_profile(trace)
    if recorded is not None and recorded.step_loads is not None:
        for flag, value in (("--online", online), ("--select", select), ("--drop", drop)):
            if value:
                raise InputError(flag, flag.lstrip("-"), f"a per-token trace ({trace} holds "
                                 "loads: no sequences to select, no online replay)")
        evaluate_step_loads(placements, trace, recorded, model, gpus, nodes, gpu, intra_bw,
                            inter_bw, calibration, kernel_for(phase, kernel), as_json)
        return
    plan = StepPlan(phase, replay, tokens_per_gpu, num_steps, seed, concurrency, step_tokens)
    inputs = read_inputs(placements, trace, select, drop, model, gpus, nodes, gpu, intra_bw,
                         inter_bw, exec_model, replica_policy, calibration, plan, kernel,
                         online, online_preset, window, interval)
    with progress(f"replaying {inputs.trace.num_tokens} tokens"):
        rows, _ = inputs.compare()
    memory = add_memory(rows, inputs.model, inputs.trace.num_layers, inputs.cluster)
    result = verdict(rows, inputs.placements, memory, inputs.model, inputs.cluster,
                     "whole trace" if plan.source == "average" else plan.phase,
                     export_format, export_best)
    if as_json:
        print(json.dumps({**inputs.header(), "rows": rows, "memory_warnings": memory,
                          "verdict": result.to_dict()}, indent=2))
        return
    # Wide enough for the table when the output is not a terminal (rich assumes 80 columns).
    Console(width=max(console.width, 160)).print(comparison_table(rows, inputs.title()))
    console.print(f"{inputs.trace.num_tokens} tokens of {inputs.trace.source} "
                  f"({inputs.trace.selection}); {inputs.model.name} on "
                  f"{inputs.cluster.num_gpus} x {inputs.cluster.gpu.name} in "
                  f"{inputs.cluster.num_nodes} node(s); {inputs.plan.phase} on "
                  f"{inputs.settings.kernel} kernels; replicas: {inputs.replica_policy}; "
                  f"top-k {'ordered' if inputs.trace.ordered else 'unordered (no weights)'}; "
                  f"steps: {inputs.describe_steps()}"
                  + ("" if inputs.online is None else
                     f"; {inputs.online.name} every {inputs.online.interval} steps from the "
                     f"last {inputs.online.window}") + ".\n"
                  f"MoE times are {MODEL_NOTE}.")
    for note in inputs.warnings():
        console.print(f"warning: {note}", style="yellow", markup=False, highlight=False)
    for name, warning in memory.items():
        console.print(f"warning: {name}: {warning}", style="yellow", markup=False,
                      highlight=False, soft_wrap=True)
    console.print("\n".join(result.lines), markup=False, highlight=False, soft_wrap=True)
