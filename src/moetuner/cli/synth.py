"""``moetuner synth``: a synthetic routing trace fitted to a real one, for larger shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetuner.cli import command, console
from moetuner.cli.options import Drop, Quiet, Select, profile_with_progress
from moetuner.cli.progress import progress
from moetuner.io import check_outputs
from moetuner.synth import default_like, synthesis_fit, synthesize_trace


@command("synth")
def synth_command(
    output: Annotated[Path, typer.Option("-o", "--output", help="synthetic trace .npz to write")],
    layers: Annotated[int, typer.Option("--layers", help="MoE layers (L)")],
    experts: Annotated[int, typer.Option("--experts", help="experts per layer (E)")],
    topk: Annotated[int, typer.Option("--topk", help="experts per token (k)")],
    tokens: Annotated[int, typer.Option("--tokens", help="tokens to generate")],
    like: Annotated[Path | None, typer.Option(
        "--like", help="real trace or profile to fit (default: the shipped GPT-OSS slice)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="random seed")] = 0,
    select: Select = None,
    drop: Drop = None,
    quiet: Quiet = False,
) -> None:
    """Generate a synthetic trace whose skew and cross-layer structure follow a real one."""
    check_outputs([output], [] if like is None else [like])
    real = default_like() if like is None else profile_with_progress(str(like), select, drop)
    with progress(f"synthesizing {tokens} tokens x {layers} layers"):
        trace = synthesize_trace(layers, experts, topk, tokens, like=real, seed=seed)
        trace.save(output)
    console.print(f"SYNTHETIC trace: {tokens} tokens, {layers} layers x {experts} experts, "
                  f"top-{topk} -> {output}\n{trace.source}\n"
                  + synthesis_fit(real, trace).summary(), markup=False, highlight=False)
