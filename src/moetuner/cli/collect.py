"""``moetuner collect``: record a routing trace from a local Hugging Face MoE model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moetuner.cli import command, console
from moetuner.cli.progress import progress
from moetuner.collect import collect_trace, load_model, read_texts
from moetuner.errors import InputError
from moetuner.io import check_outputs


@command("collect")
def collect_command(
    model: Annotated[str, typer.Option("--model", help="local model folder or cached Hugging "
                                       "Face name (never downloaded)")],
    data: Annotated[Path, typer.Option("--data", help="prompts: .txt (one per line) or .jsonl "
                                       "(text or prompt, optional dataset)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="trace .npz to write")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="prompts per pass")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="prompt tokens kept")] = 512,
    decode_tokens: Annotated[int, typer.Option(
        "--decode-tokens", help="tokens to generate greedily per prompt (0: prefill only)")] = 0,
    device: Annotated[str | None, typer.Option("--device", help="cuda or cpu (default: cuda "
                                               "when present)")] = None,
) -> None:
    """Run an MoE model over text and record every MoE layer's top-k experts and weights."""
    check_outputs([output], [data])
    for flag, value, lowest in (("--batch-size", batch_size, 1), ("--max-length", max_length, 1),
                                ("--decode-tokens", decode_tokens, 0)):
        if value < lowest:
            raise InputError(flag, flag[2:].replace("-", "_"), f"an integer >= {lowest}", value)
    texts, datasets = read_texts(data)
    loaded, tokenizer = load_model(model, device)
    with progress(f"routing {len(texts)} prompts", len(texts), "prompts") as advance:
        trace = collect_trace(loaded, tokenizer, texts, output, datasets, batch_size, max_length,
                        decode_tokens, advance)
    console.print(f"recorded {trace.num_tokens} tokens x {trace.num_layers} MoE layers, "
                  f"top-{trace.top_k} of {trace.num_experts} experts -> {output}",
                  highlight=False)
