"""``moetuner evaluate``: replay a held-out trace through placements and compare them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moetuner.cli import command, console
from moetuner.cli.options import (
    Calibration,
    Drop,
    EvalTrace,
    ExecModel,
    GpuName,
    InterBw,
    IntraBw,
    JsonFlag,
    ModelName,
    Nodes,
    PlacementGpus,
    Placements,
    ReplicaPolicy,
    Select,
    cluster_from_flags,
)
from moetuner.cluster import Cluster
from moetuner.costmodel import MODEL_NOTE, CostCoefficients, load_coefficients
from moetuner.errors import InputError
from moetuner.evaluate import EXEC_MODELS, Replay, check_compatible, compare, model_for_trace
from moetuner.inputs import read_trace
from moetuner.io import MAX_PAIR_CELLS
from moetuner.models import ModelSpec, get_model
from moetuner.placement import Placement, load_placement
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

    def compare(self) -> tuple[list[dict], dict[tuple[str, str], Replay]]:
        return compare(self.placements, self.trace, self.cluster, self.model, self.exec_models,
                       self.replica_policy, self.coefficients)

    def header(self) -> dict:
        return {"note": MODEL_NOTE, "trace": self.trace.source,
                "selection": self.trace.selection, "tokens": self.trace.num_tokens,
                "model": self.model.name, "cluster": self.cluster.to_dict(),
                "coefficients": self.coefficients.to_dict()}


def read_inputs(placements: list[Path], trace: Path, select: list[str] | None,
                drop: list[str] | None, model: str | None, gpus: int | None, nodes: int,
                gpu: str, intra_bw: float | None, inter_bw: float | None, exec_model: str,
                replica_policy: str, calibration: Path | None) -> EvaluationInputs:
    """Read and check the flags shared by ``evaluate`` and ``report``."""
    exec_models = EXEC_MODELS if exec_model == "both" else (exec_model,)
    if not set(exec_models) <= set(EXEC_MODELS):
        raise InputError("--exec", "exec", "return, follow or both", repr(exec_model))
    loaded = {}
    for path in placements:
        name = path.stem if path.stem not in loaded else str(path)
        loaded[name] = load_placement(path)
    if not loaded:
        raise InputError("PLACEMENT", "placements", "at least one placement file")
    events = read_trace(trace, select or (), drop or ())
    if not events.num_tokens:
        raise InputError(trace, "topk_ids", "tokens to replay (the file or selection holds "
                         "none)", 0)
    cluster = cluster_from_flags(next(iter(loaded.values())).num_gpus if gpus is None else gpus,
                                 nodes, gpu, intra_bw, inter_bw)
    if events.num_layers * cluster.num_gpus ** 2 > MAX_PAIR_CELLS:
        # The replay holds a [layers, G, G] traffic matrix per placement.
        raise InputError("--gpus", "num_gpus", f"layers x G x G at most {MAX_PAIR_CELLS}",
                         cluster.num_gpus)
    for placement in loaded.values():
        check_compatible(placement, events, cluster)
    return EvaluationInputs(
        placements=loaded, trace=events, cluster=cluster,
        model=model_for_trace(events) if model is None else get_model(model),
        exec_models=exec_models, replica_policy=replica_policy,
        coefficients=CostCoefficients() if calibration is None else load_coefficients(calibration),
    )


def comparison_table(rows: list[dict]) -> Table:
    """The comparison as a rich table (one row per placement and execution model)."""
    table = Table(title="MoE layers on the held-out trace")
    table.add_column("placement", no_wrap=True)
    table.add_column("exec")
    for column in ("slots", "imbalance", "balanced", "x-GPU", "x-node", "ms/batch", "speedup"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["placement"], row["exec_model"], str(row["slots_per_gpu"]),
                      f"{row['imbalance']:.3f}", f"{row['balancedness']:.3f}",
                      f"{row['share_cross_gpu']:.1%}", f"{row['share_cross_node']:.1%}",
                      f"{row['moe_time_per_batch_s'] * 1e3:.3f}",
                      f"{row['speedup_vs_linear']:.3f}x")
    table.caption = ("imbalance: max/mean GPU load; x-GPU, x-node: share of token moves "
                     "leaving the GPU, the node; ms/batch: predicted MoE layers; speedup: over "
                     "linear")
    return table


@command("evaluate")
def evaluate_command(
    placements: Placements,
    trace: EvalTrace,
    select: Select = None,
    drop: Drop = None,
    model: ModelName = None,
    gpus: PlacementGpus = None,
    nodes: Nodes = 1,
    gpu: GpuName = "h100",
    intra_bw: IntraBw = None,
    inter_bw: InterBw = None,
    exec_model: ExecModel = "both",
    replica_policy: ReplicaPolicy = "even",
    calibration: Calibration = None,
    as_json: JsonFlag = False,
) -> None:
    """Compare placements on a held-out trace: balance, traffic, predicted MoE time."""
    inputs = read_inputs(placements, trace, select, drop, model, gpus, nodes, gpu, intra_bw,
                         inter_bw, exec_model, replica_policy, calibration)
    rows, _ = inputs.compare()
    if as_json:
        print(json.dumps({**inputs.header(), "rows": rows}, indent=2))
        return
    # Wide enough for the table when the output is not a terminal (rich assumes 80 columns).
    Console(width=max(console.width, 120)).print(comparison_table(rows))
    console.print(f"{inputs.trace.num_tokens} tokens of {inputs.trace.source} "
                  f"({inputs.trace.selection}); {inputs.model.name} on "
                  f"{inputs.cluster.num_gpus} x {inputs.cluster.gpu.name} in "
                  f"{inputs.cluster.num_nodes} node(s); replicas: {inputs.replica_policy}; "
                  f"batch = {inputs.coefficients.tokens_per_gpu_batch:g} tokens per GPU.\n"
                  f"MoE times are {MODEL_NOTE}.")
