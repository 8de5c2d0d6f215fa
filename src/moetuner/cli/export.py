"""``moetuner export``: write a placement (or, for ``sglang-count``, a profile) for an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetuner.cli import command, console
from moetuner.cli.options import PlacementNodes, Quiet, profile_with_progress
from moetuner.errors import InputError
from moetuner.export import (
    DEFAULT_SGLANG_BACKEND,
    FORMATS,
    SGLANG_A2A_BACKENDS,
    LayerAxis,
    engine_outputs,
    write_engine_files,
)
from moetuner.formats import read_placement
from moetuner.io import check_outputs
from moetuner.models import get_model
from moetuner.placement import recorded_nodes


def parse_layer_list(text: str | None) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; empty or None -> ``()``."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError("--dense-layers", "dense_layers", "comma-separated layer indices",
                         repr(text)) from None


@command("export")
def export_command(
    source: Annotated[Path, typer.Argument(
        help="placement: moetuner JSON, or an SGLang, vLLM-Ascend or Megatron file export "
        "wrote (a profile or trace for --format sglang-count)")],
    fmt: Annotated[str, typer.Option("--format", help=f"one of {', '.join(FORMATS)}")],
    output: Annotated[Path, typer.Option("-o", "--output", help="file to write")],
    model: Annotated[str | None, typer.Option("--model", help="model preset: gives the hidden "
                                              "and dense layers (SGLang's layer axis)")] = None,
    num_hidden_layers: Annotated[int | None, typer.Option(
        "--num-hidden-layers", help="all transformer layers, dense included")] = None,
    dense_layers: Annotated[str | None, typer.Option(
        "--dense-layers", help="comma-separated hidden-layer indices without experts")] = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="--format sglang: SGLang's --moe-a2a-backend, one of "
        f"{', '.join(SGLANG_A2A_BACKENDS)} (default {DEFAULT_SGLANG_BACKEND}); every one but "
        "none needs each expert's replicas on distinct GPUs")] = None,
    nodes: PlacementNodes = None,
    quiet: Quiet = False,
) -> None:
    """Write a placement in the file a serving engine loads and print the flags to use it.

    A placement the engine would load wrongly (two replicas of one expert on one GPU for
    SGLang with an a2a backend or vLLM-Ascend) is refused, naming the layer, GPU and expert.
    """
    check_outputs([output], [source])  # first: '' or a folder has no sidecar name
    check_outputs(engine_outputs(fmt, output), [source])
    spec = get_model(model) if model else None
    if fmt == "sglang-count":
        data = profile_with_progress(str(source), None, None)
    else:
        data = read_placement(source, gpus_flag=None)
    if spec is not None and data.num_experts != spec.num_experts:
        raise InputError(str(source), "num_experts", f"{spec.num_experts} experts per layer, "
                         f"as {spec.name} has", data.num_experts)
    note = ""
    if spec is None and num_hidden_layers is None and not dense_layers \
            and fmt.startswith("sglang"):
        axis, spec, note = LayerAxis.guess(data.num_layers, data.num_experts)
    else:
        axis = LayerAxis.resolve(data.num_layers, spec, num_hidden_layers,
                                 parse_layer_list(dense_layers))
    if nodes is None:
        nodes = (recorded_nodes(data) if fmt != "sglang-count" else None) or 1
    written, flags = write_engine_files(
        data, fmt, output, axis, backend,
        **({} if spec is None else {"model_path": spec.hf_id}), num_nodes=nodes)
    # soft_wrap: the flags stay on one line, ready to copy.
    console.print(f"wrote {', '.join(map(str, written))}", highlight=False, soft_wrap=True)
    if note:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    console.print(flags, markup=False, highlight=False, soft_wrap=True)
