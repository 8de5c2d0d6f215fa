"""``moetuner info``: summarise any file moetuner reads or writes, identified by content."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from moetuner.cli import command, console, number, percent
from moetuner.cli.options import profile_with_progress
from moetuner.formats import PLACEMENT, PROFILE, TRACE, identify, read_placement
from moetuner.inputs import expand_shards, read_trace
from moetuner.io import read_json
from moetuner.placement import Placement
from moetuner.profile import Profile


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def profile_table(profile: Profile) -> Table:
    """Per-layer skew, mutual information to the next layer and half-to-half stability."""
    table = Table(title=f"{profile.num_layers} layers x {profile.num_experts} experts, "
                  f"top-{profile.top_k}, {profile.tokens} tokens")
    for column in ("layer", "skew max/mean", "MI to next (bits)", "load stability",
                   "transition stability"):
        table.add_column(column, justify="right")
    skew = profile.skew()
    mi = profile.mutual_information()
    for layer in range(profile.num_layers):
        last = layer == profile.num_layers - 1
        table.add_row(
            str(layer),
            _fmt(skew[layer], 2),
            "-" if mi is None or last else _fmt(mi[layer]),
            "-" if profile.stability_load is None else _fmt(profile.stability_load[layer]),
            "-" if profile.stability_transitions is None or last
            else _fmt(profile.stability_transitions[layer]),
        )
    return table


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def show_placement(placement: Placement) -> None:
    """The placement's shape, solve record and the first layers' experts per GPU."""
    meta = placement.metadata if isinstance(placement.metadata, dict) else {}
    record = meta.get("record")
    record = record if isinstance(record, dict) else {}
    gap = record.get("gap")
    _say(f"{placement.num_layers} MoE layers, E = {placement.num_experts}, "
         f"G = {placement.num_gpus}, {placement.slots_per_gpu} slots per GPU "
         f"({placement.num_redundant} redundant)\nmethod {meta.get('method', '?')}, status "
         f"{record.get('status', '?')}, objective {number(record.get('objective'))}, bound "
         f"{number(record.get('bound'))}, gap "
         f"{percent(gap) if isinstance(gap, int | float) else '-'}, solve time "
         f"{number(record.get('solve_time'), '.2f')} s")
    table = Table(title="experts per GPU (first layers)")
    table.add_column("layer", justify="right")
    for gpu in range(placement.num_gpus):
        table.add_column(f"GPU {gpu}")
    rows = placement.phy2log.reshape(placement.num_layers, placement.num_gpus, -1)
    for layer in range(min(placement.num_layers, 8)):
        table.add_row(str(layer), *(" ".join(map(str, r)) for r in rows[layer]))
    console.print(table)


def show_trace(path: Path) -> None:
    trace = read_trace(path)
    _say(f"trace {path}: {trace.num_tokens} tokens, {trace.num_layers} MoE layers, "
         f"{trace.num_experts} experts, top-{trace.top_k}, "
         f"{trace.num_sequences if trace.num_sequences is not None else 'no'} sequences, "
         f"weights {'yes' if trace.topk_weights is not None else 'no'}, top-k "
         + ("ordered (column 0 is the primary expert)" if trace.ordered else
            "unordered (no weights: each token's experts are treated as a set)"))
    for name, labels in sorted(trace.seq_labels.items()):
        counts = Counter(labels.tolist())
        shown = ", ".join(f"{k}: {v}" for k, v in counts.most_common(8))
        more = f" (+{len(counts) - 8} more)" if len(counts) > 8 else ""
        _say(f"  {name}: {shown}{more}")


def show_profile(path: Path) -> None:
    profile = profile_with_progress(str(path), None, None)
    for entry in profile.provenance:
        entry = entry if isinstance(entry, dict) else {}
        _say(f"  source {entry.get('source')} ({entry.get('selection')}), "
             f"{entry.get('tokens')} tokens")
    if profile.step_loads is not None:
        _say(f"  {profile.step_loads.shape[0]} recorded engine steps (per-step loads)")
    console.print(profile_table(profile))


def show_other(path: Path, name: str) -> None:
    """A calibration, a sweep point or table, or an SGLang sidecar: the fields that
    matter."""
    if name == "sweep-table":
        with path.open(newline="", errors="replace") as handle:
            rows = list(csv.DictReader(handle))
        _say(f"  {len(rows)} points: methods "
             f"{', '.join(sorted({row.get('method') or '?' for row in rows}))}; GPUs "
             f"{', '.join(sorted({row.get('gpus') or '?' for row in rows}, key=str))}")
        return
    data = read_json(path, "a JSON object")
    if name == "calibration":
        provenance = data.get("provenance")
        provenance = provenance if isinstance(provenance, dict) else {}
        _say("  " + ", ".join(f"{key} {number(value, '.4g')}" for key, value in data.items()
                              if key != "provenance" and value is not None))
        if provenance:
            _say(f"  measured on {provenance.get('device', '?')} "
                 f"({provenance.get('device_name', '?')}) on {provenance.get('date', '?')}; "
                 f"{provenance.get('note', '')}")
    elif name == "sweep-point":
        point, row = data["point"], data["row"]
        _say("  point: " + (", ".join(f"{k} {v}" for k, v in point.items())
                           if isinstance(point, dict) else str(point)))
        if isinstance(row, dict):
            _say("  row: " + ", ".join(f"{k} {number(v) if isinstance(v, float) else v}"
                                      for k, v in row.items()))
    else:
        moe = data.get("moe_layers")
        _say(f"  {data.get('num_hidden_layers')} hidden layers, "
             f"{len(moe) if isinstance(moe, list) else '?'} MoE layers, "
             f"E = {data.get('num_experts')}, "
             f"G = {data.get('num_gpus')}, {data.get('ep_num_redundant_experts')} redundant")


@command("info")
def info_command(
    file: Annotated[Path, typer.Argument(
        help="any file moetuner reads or writes: trace, profile, placement (moetuner, SGLang, "
        "vLLM, vLLM-Ascend, Megatron), SGLang logical_count, calibration, sweep point; or the "
        "shards of a directory or glob")],
) -> None:
    """Say what a file is (by its content) and summarise it in a readable table."""
    shards = expand_shards(file)
    if shards != [file]:  # a directory or glob of trace shards: their summed profile
        _say(f"{file}: {len(shards)} shards")
        show_profile(file)
        return
    kind = identify(file)
    _say(f"{file}: {kind.description}")
    if kind.role == PLACEMENT:
        if kind.name == "vllm-placement":  # no GPU count: shown as the moetuner layout of G=1
            placement = read_placement(file, num_gpus=1)
            _say(f"{placement.num_layers} MoE layers, E = {placement.num_experts}, "
                 f"{placement.num_slots} slots per layer; the GPU count is not in the file "
                 "(evaluate takes it from --gpus)")
            return
        show_placement(read_placement(file))
    elif kind.role == TRACE:
        show_trace(file)
        show_profile(file)
    elif kind.role == PROFILE:
        show_profile(file)
    else:
        show_other(file, kind.name)
