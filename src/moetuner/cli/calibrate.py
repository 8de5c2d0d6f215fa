"""``moetuner calibrate``: fit the cost model's compute and memory efficiencies by timing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetuner.calibrate import DEFAULT_TOKENS, calibrate
from moetuner.cli import command, console
from moetuner.cli.options import GpuName
from moetuner.errors import InputError
from moetuner.io import check_outputs
from moetuner.models import get_model


def parse_ints(text: str, flag: str) -> list[int]:
    """``"1,2,4"`` to ``[1, 2, 4]``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(flag, flag.lstrip("-"), "comma-separated integers", repr(text)) from None


@command("calibrate")
def calibrate_command(
    model: Annotated[str, typer.Option("--model", help="model preset whose expert FFN is timed")],
    output: Annotated[Path, typer.Option("-o", "--output", help="coefficients JSON to write")],
    gpu: GpuName = "h100",
    device: Annotated[str | None, typer.Option(
        "--device", help="torch device (default: cuda if available, else cpu)")] = None,
    tokens: Annotated[str, typer.Option(
        "--tokens", help="tokens per expert to time, comma-separated")] = ",".join(
        map(str, DEFAULT_TOKENS)),
    experts: Annotated[int | None, typer.Option(
        "--experts", help="experts per grouped GEMM (default: 4 on CPU, 256 MB of weights on "
        "GPU)")] = None,
    scale: Annotated[float, typer.Option(
        "--scale", help="factor on the preset's hidden and intermediate sizes (quick runs)")
                     ] = 1.0,
    repeats: Annotated[int, typer.Option("--repeats", help="timed runs per point (median)")] = 5,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="torch dtype (default: bfloat16 on GPU, float32 on CPU)")] = None,
) -> None:
    """Time the expert FFN and a weight read; write fitted cost-model coefficients."""
    check_outputs([output], [])
    coefficients = calibrate(get_model(model), gpu, device, parse_ints(tokens, "--tokens"),
                             experts, scale, repeats, dtype)
    coefficients.save(output)
    source = coefficients.provenance
    console.print(f"compute_efficiency {coefficients.compute_efficiency:.4g} "
                  f"(achieved {source['fit']['achieved_flops'] / 1e12:.3g} TFLOP/s), "
                  f"memory_efficiency {coefficients.memory_efficiency:.4g} "
                  f"(achieved {source['fit']['achieved_bandwidth'] / 1e9:.3g} GB/s) vs the "
                  f"{source['gpu_preset']} preset; {source['note']}\n-> {output}",
                  markup=False, highlight=False)
