"""``evaluate``'s verdict: memory per GPU, the recommended placements and their export."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from moetuner.cluster import Cluster
from moetuner.errors import InputError
from moetuner.export import LayerAxis, check_engine, engine_outputs, write_engine_files
from moetuner.models import ModelSpec, expert_memory_per_gpu, memory_warning
from moetuner.placement import Placement
from moetuner.verdict import ENGINE_EXEC_MODEL, describe, recommend, to_export

EXPORT_FORMATS = ("sglang", "vllm", "vllm-ascend")
ExportBest = Annotated[Path | None, typer.Option(
    "--export-best", help="write the recommended placement (per phase, under the engines' "
    "return model) to this file for --export-format and print the launch command; nothing "
    "is written when no placement beats the engine's default")]
ExportFormat = Annotated[str, typer.Option(
    "--export-format", help=f"engine of --export-best and of the verdict: "
    f"{', '.join(EXPORT_FORMATS)}")]


def check_export(path: Path | None, fmt: str) -> list[Path]:
    """The files ``--export-best`` may write (checked before any work)."""
    if fmt not in EXPORT_FORMATS:
        raise InputError("--export-format", "format", f"one of {', '.join(EXPORT_FORMATS)}",
                         repr(fmt))
    return [] if path is None else engine_outputs(fmt, path)


def add_memory(rows: list[dict], model: ModelSpec, num_moe_layers: int, cluster: Cluster
               ) -> dict[str, str]:
    """Add ``expert_memory_per_gpu_bytes`` to every row; return the warnings per placement
    whose expert and other weights exceed the GPU's memory."""
    warnings = {}
    for row in rows:
        row["expert_memory_per_gpu_bytes"] = expert_memory_per_gpu(model, row["slots_per_gpu"],
                                                                   num_moe_layers)
        warning = memory_warning(model, row["expert_memory_per_gpu_bytes"],
                                 cluster.gpu.name, cluster.gpu.memory_bytes)
        if warning:
            warnings[row["placement"]] = warning
    return warnings


@dataclass
class Verdict:
    """The verdict's lines and, as data, the recommendations and the files written."""

    lines: list[str] = field(default_factory=list)
    recommendations: list[dict] = field(default_factory=list)
    exported: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"recommendations": self.recommendations, "exported": self.exported}


def verdict(rows: list[dict], placements: dict[str, Placement], memory: dict[str, str],
            model: ModelSpec, cluster: Cluster, phase: str, fmt: str = "sglang",
            export_path: Path | None = None) -> Verdict:
    """Recommend per phase and execution model (``moetuner.verdict``), leaving out the
    placements the engine of ``fmt`` would load wrongly or whose weights do not fit; write
    the recommendation for the engines' model to ``export_path`` when given."""
    excluded = {}
    for name, placement in placements.items():
        try:
            check_engine(placement, fmt)
        except InputError as exc:
            excluded[name] = f"{fmt} would load it wrongly ({exc.got or exc.expected})"
    excluded.update({name: "its weights exceed the GPU's memory" for name in memory
                     if name in placements})
    eplb = next((name for name, p in placements.items()
                 if isinstance(p.metadata, dict)
                 and p.metadata.get("method") in ("eplb", "eplb_fixed")),
                "eplb" if "eplb" in placements else None)
    verdicts = recommend(rows, eplb, excluded)
    out = Verdict(recommendations=[v.to_dict() for v in verdicts])
    out.lines = ["Verdict (predicted by the cost model, not measured):"]
    out.lines += ["  " + describe(v, phase).replace("\n", "\n  ") for v in verdicts]
    chosen = to_export(verdicts)
    for key, choice in chosen.items():
        label = key or phase
        if choice.keeps_default:
            out.lines.append(f"{label}: keep the engine's default placement (start it without "
                             "a placement file)" + (f"; {export_path} not written"
                                                    if export_path else ""))
            continue
        placement = placements[choice.placement]
        if export_path is None:
            out.lines.append(f"{label}: to deploy {choice.placement}, run moetuner evaluate "
                             "again with --export-best FILE (or moetuner export)")
            continue
        path = export_path if len(chosen) == 1 else export_path.with_name(
            f"{export_path.stem}.{label}{export_path.suffix}")
        written, flags = write_engine_files(
            placement, fmt, path, LayerAxis.resolve(placement.num_layers, model),
            model_path=model.hf_id, num_nodes=cluster.num_nodes)
        out.exported[label] = [str(p) for p in written]
        model_note = ("as the engines run" if choice.exec_model == ENGINE_EXEC_MODEL else
                      f"engines run {ENGINE_EXEC_MODEL}: evaluate with --exec both to check it")
        out.lines.append(f"{label}: exported {choice.placement} ({choice.exec_model} model, "
                         f"{model_note}) to {', '.join(map(str, written))}; launch with")
        out.lines.append(flags)
    return out
