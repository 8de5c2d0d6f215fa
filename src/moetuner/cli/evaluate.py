"""``moetuner evaluate``: replay a held-out trace through placements and compare them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moetuner.cli import command, console
from moetuner.cli.options import (
    Batching,
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
    ModelName,
    Online,
    OnlinePreset,
    PlacementGpus,
    PlacementNodes,
    Placements,
    Quiet,
    ReplicaPolicy,
    Select,
    StepTokens,
    Window,
    cluster_from_flags,
)
from moetuner.cli.progress import progress
from moetuner.cli.verdict import ExportBest, ExportFormat, add_memory, check_export, verdict
from moetuner.cluster import Cluster
from moetuner.costmodel import MODEL_NOTE, CostCoefficients, load_coefficients
from moetuner.errors import InputError
from moetuner.evaluate import EXEC_MODELS, Replay, check_compatible, compare, model_for_trace
from moetuner.export import read_megatron, read_sglang, read_vllm, read_vllm_ascend, sidecar_path
from moetuner.inputs import read_trace
from moetuner.io import MAX_PAIR_CELLS, check_outputs, read_json
from moetuner.models import ModelSpec, get_model
from moetuner.online import OnlinePolicy, online_policy
from moetuner.placement import Placement, is_placement_file, load_placement, recorded_nodes
from moetuner.steps import BATCHINGS, Steps, make_steps
from moetuner.trace import Trace


@dataclass(frozen=True)
class EvaluationInputs:
    """What the evaluate and report commands read from their flags."""

    placements: dict[str, Placement]
    trace: Trace
    cluster: Cluster
    model: ModelSpec
    exec_models: tuple[str, ...]
    replica_policy: str
    coefficients: CostCoefficients
    batching: str
    steps: Steps | None
    online: OnlinePolicy | None

    def compare(self) -> tuple[list[dict], dict[tuple[str, str], Replay]]:
        return compare(self.placements, self.trace, self.cluster, self.model, self.exec_models,
                       self.replica_policy, self.coefficients, self.steps, self.batching,
                       online=self.online)

    def describe_steps(self) -> str:
        if self.steps is None:
            return (f"whole-trace average, batch = "
                    f"{self.coefficients.tokens_per_gpu_batch:g} tokens per GPU")
        return f"{self.steps.description} ({self.steps.num_steps} steps)"

    def header(self) -> dict:
        online = None if self.online is None else {"name": self.online.name,
                                                   "window": self.online.window,
                                                   "interval": self.online.interval}
        return {"note": MODEL_NOTE, "trace": self.trace.source,
                "selection": self.trace.selection, "tokens": self.trace.num_tokens,
                "topk_order": "ordered" if self.trace.ordered else "unordered",
                "model": self.model.name, "cluster": self.cluster.to_dict(),
                "batching": self.describe_steps(), "online": online,
                "coefficients": self.coefficients.to_dict()}


def read_placement_file(path: Path, num_gpus: int | None) -> Placement:
    """A placement from a moetuner JSON or any engine file ``moetuner export`` writes."""
    if is_placement_file(path):
        return load_placement(path)
    if path.suffix == ".npy":
        return read_megatron(path, num_gpus)
    data = read_json(path, "a placement (moetuner, SGLang, vLLM or vLLM-Ascend JSON)")
    if isinstance(data, dict) and "physical_to_logical_map" in data:
        if not sidecar_path(path).exists():
            raise InputError(path, "sidecar", f"the sidecar {sidecar_path(path).name} that "
                             "moetuner export writes beside an SGLang file (it names the "
                             "layers and GPUs)")
        return read_sglang(path)
    if isinstance(data, dict) and "layer_list" in data:
        return read_vllm_ascend(path)
    if isinstance(data, list):
        if num_gpus is None:
            raise InputError("--gpus", "num_gpus", f"the GPU count for the vLLM map {path}")
        return read_vllm(path, num_gpus)
    raise InputError(path, "file", "a moetuner placement JSON, an SGLang, vLLM or "
                     "vLLM-Ascend placement JSON, or a Megatron expert_gpu .npy")


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
                replica_policy: str, calibration: Path | None, batching: str = "decode",
                concurrency: int | None = None, step_tokens: int | None = None,
                online: str | None = None, online_preset: str = "vllm",
                window: int | None = None, interval: int | None = None) -> EvaluationInputs:
    """Read and check the flags shared by ``evaluate`` and ``report``."""
    exec_models = EXEC_MODELS if exec_model == "both" else (exec_model,)
    if not set(exec_models) <= set(EXEC_MODELS):
        raise InputError("--exec", "exec", "return, follow or both", repr(exec_model))
    if batching not in BATCHINGS:
        raise InputError("--batching", "batching", f"one of {', '.join(BATCHINGS)}",
                         repr(batching))
    loaded = {}
    for path in placements:
        name = path.stem if path.stem not in loaded else str(path)
        loaded[name] = read_placement_file(path, gpus)
    if not loaded:
        raise InputError("PLACEMENT", "placements", "at least one placement file")
    events = read_trace(trace, select or (), drop or ())
    if not events.num_tokens:
        raise InputError(trace, "topk_ids", "tokens to replay (the file or selection holds "
                         "none)", 0)
    num_gpus = next(iter(loaded.values())).num_gpus if gpus is None else gpus
    cluster = cluster_from_flags(num_gpus, default_nodes(loaded, num_gpus) if nodes is None
                                 else nodes, gpu, intra_bw, inter_bw)
    if events.num_layers * cluster.num_gpus ** 2 > MAX_PAIR_CELLS:
        # The replay holds a [layers, G, G] traffic matrix per placement.
        raise InputError("--gpus", "num_gpus", f"layers x G x G at most {MAX_PAIR_CELLS}",
                         cluster.num_gpus)
    for placement in loaded.values():
        check_compatible(placement, events, cluster)
    steps = None if batching == "none" else make_steps(
        events.seq_lens, events.num_tokens, cluster.num_gpus, batching, concurrency,
        step_tokens)
    return EvaluationInputs(
        placements=loaded, trace=events, cluster=cluster,
        model=model_for_trace(events) if model is None else get_model(model),
        exec_models=exec_models, replica_policy=replica_policy,
        coefficients=CostCoefficients() if calibration is None else load_coefficients(calibration),
        batching=batching, steps=steps,
        online=None if online is None else online_policy(online, cluster, online_preset,
                                                          window, interval),
    )


def comparison_table(rows: list[dict]) -> Table:
    """The comparison as a rich table (one row per placement and execution model)."""
    table = Table(title="MoE layers on the held-out trace")
    table.add_column("placement", no_wrap=True)
    table.add_column("exec")
    online = any("experts_moved" in row for row in rows)
    for column in ("slots", "expert GB/GPU", "imbalance", "step imb.", "x-GPU", "x-node",
                   "ms/step", "p99 ms", "tokens/s", "speedup") + (
                       ("moved", "move ms/step") if online else ()):
        table.add_column(column, justify="right")
    for row in rows:
        moves = ([str(row["experts_moved"]), f"{row['move_time_per_step_s'] * 1e3:.4f}"]
                 if "experts_moved" in row else ["", ""])
        memory = row.get("expert_memory_per_gpu_bytes")
        table.add_row(row["placement"], row["exec_model"], str(row["slots_per_gpu"]),
                      "-" if memory is None else f"{memory / 1e9:.2f}",
                      f"{row['imbalance']:.3f}", f"{row['step_imbalance']:.3f}",
                      f"{row['share_cross_gpu']:.1%}", f"{row['share_cross_node']:.1%}",
                      f"{row['mean_step_time_s'] * 1e3:.3f}",
                      f"{row['p99_step_time_s'] * 1e3:.3f}", f"{row['tokens_per_s']:.4g}",
                      f"{row['speedup_vs_linear']:.3f}x", *(moves if online else []))
    table.caption = ("expert GB/GPU: expert weights each GPU holds; "
                     "imbalance: max/mean GPU load of the whole trace; step imb.: per step "
                     "(sum of busiest / sum of mean GPU load); x-GPU, x-node: share of token "
                     "moves leaving the GPU, the node; ms/step: predicted MoE layers per step, "
                     "mean and p99; speedup: mean step time over linear's; moved, move "
                     "ms/step: online rebalancing's expert moves and their time amortised "
                     "per step")
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
    batching: Batching = "decode",
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
    """Compare placements on a held-out trace, engine step by engine step: balance, traffic,
    predicted MoE time per step (and online rebalancing with --online); then the verdict: the
    placement to deploy per phase and execution model, exported with --export-best."""
    check_outputs(check_export(export_best, export_format), [*placements, trace])
    inputs = read_inputs(placements, trace, select, drop, model, gpus, nodes, gpu, intra_bw,
                         inter_bw, exec_model, replica_policy, calibration, batching,
                         concurrency, step_tokens, online, online_preset, window, interval)
    with progress(f"replaying {inputs.trace.num_tokens} tokens"):
        rows, _ = inputs.compare()
    memory = add_memory(rows, inputs.model, inputs.trace.num_layers, inputs.cluster)
    result = verdict(rows, inputs.placements, memory, inputs.model, inputs.cluster,
                     "whole trace" if inputs.batching == "none" else inputs.batching,
                     export_format, export_best)
    if as_json:
        print(json.dumps({**inputs.header(), "rows": rows, "memory_warnings": memory,
                          "verdict": result.to_dict()}, indent=2))
        return
    # Wide enough for the table when the output is not a terminal (rich assumes 80 columns).
    Console(width=max(console.width, 160)).print(comparison_table(rows))
    console.print(f"{inputs.trace.num_tokens} tokens of {inputs.trace.source} "
                  f"({inputs.trace.selection}); {inputs.model.name} on "
                  f"{inputs.cluster.num_gpus} x {inputs.cluster.gpu.name} in "
                  f"{inputs.cluster.num_nodes} node(s); replicas: {inputs.replica_policy}; "
                  f"top-k {'ordered' if inputs.trace.ordered else 'unordered (no weights)'}; "
                  f"steps: {inputs.describe_steps()}"
                  + ("" if inputs.online is None else
                     f"; {inputs.online.name} every {inputs.online.interval} steps from the "
                     f"last {inputs.online.window}") + ".\n"
                  f"MoE times are {MODEL_NOTE}.")
    for name, warning in memory.items():
        console.print(f"warning: {name}: {warning}", style="yellow", markup=False,
                      highlight=False, soft_wrap=True)
    console.print("\n".join(result.lines), markup=False, highlight=False, soft_wrap=True)
