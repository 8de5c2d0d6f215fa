"""``moetuner info``: summarise a trace, profile or placement file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from moetuner.cli import command, console
from moetuner.cli.options import profile_with_progress
from moetuner.errors import InputError
from moetuner.inputs import is_trace, read_trace
from moetuner.placement import is_placement_file, load_placement
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


@command("info")
def info_command(
    file: Annotated[Path, typer.Argument(help="trace (.npz), profile (.npz) or placement (.json)")],
) -> None:
    """Summarise a trace, profile or placement in a readable table."""
    if not file.exists():
        raise InputError(file, "file", "an existing trace, profile or placement file")
    if is_placement_file(file):
        placement = load_placement(file)
        meta = placement.metadata
        record = meta.get("record", {})
        console.print(
            f"placement {file}: {placement.num_layers} layers, E = {placement.num_experts}, "
            f"G = {placement.num_gpus}, {placement.slots_per_gpu} slots per GPU "
            f"({placement.num_redundant} redundant)\nmethod {meta.get('method', '?')}, status "
            f"{record.get('status', '?')}, objective {record.get('objective')}, bound "
            f"{record.get('bound')}, gap {record.get('gap')}, solve time "
            f"{_fmt(record.get('solve_time'))} s"
        )
        table = Table(title="experts per GPU (first layers)")
        table.add_column("layer", justify="right")
        for gpu in range(placement.num_gpus):
            table.add_column(f"GPU {gpu}")
        rows = placement.phy2log.reshape(placement.num_layers, placement.num_gpus, -1)
        for layer in range(min(placement.num_layers, 8)):
            table.add_row(str(layer), *(" ".join(map(str, r)) for r in rows[layer]))
        console.print(table)
        return
    if is_trace(file):
        trace = read_trace(file)
        console.print(
            f"trace {file}: {trace.num_tokens} tokens, {trace.num_layers} MoE layers, "
            f"{trace.num_experts} experts, top-{trace.top_k}, "
            f"{trace.num_sequences if trace.num_sequences is not None else 'no'} sequences, "
            f"weights {'yes' if trace.topk_weights is not None else 'no'}, top-k "
            + ("ordered (column 0 is the primary expert)" if trace.ordered else
               "unordered (no weights: each token's experts are treated as a set)")
        )
        for name, labels in sorted(trace.seq_labels.items()):
            counts = Counter(labels.tolist())
            shown = ", ".join(f"{k}: {v}" for k, v in counts.most_common(8))
            more = f" (+{len(counts) - 8} more)" if len(counts) > 8 else ""
            console.print(f"  {name}: {shown}{more}", markup=False, highlight=False)
    profile = profile_with_progress(str(file), None, None)
    for entry in profile.provenance:
        console.print(f"  source {entry.get('source')} ({entry.get('selection')}), "
                      f"{entry.get('tokens')} tokens", markup=False, highlight=False)
    if profile.step_loads is not None:
        console.print(f"  {profile.step_loads.shape[0]} recorded engine steps (per-step loads)",
                      markup=False, highlight=False)
    console.print(profile_table(profile))
