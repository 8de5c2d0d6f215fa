"""Flags shared by several commands."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from moetuner.cli.progress import progress
from moetuner.cluster import Cluster, make_cluster
from moetuner.errors import InputError
from moetuner.inputs import expand_shards, is_trace, profile_shards, read_trace, shard_tokens
from moetuner.profile import Profile, profile_trace

Select = Annotated[
    list[str] | None,
    typer.Option("--select", help="keep sequences whose label matches NAME=GLOB (e.g. "
                 "seq_dataset=mmlu*; '|' separates alternatives); repeatable"),
]
Drop = Annotated[
    list[str] | None,
    typer.Option("--drop", help="drop sequences flagged by a bool label (e.g. seq_repetition)"),
]
Gpus = Annotated[int, typer.Option("--gpus", help="expert-parallel GPUs (G)")]
Nodes = Annotated[int, typer.Option("--nodes", help="nodes; G must be a multiple")]
PlacementNodes = Annotated[int | None, typer.Option(
    "--nodes", help="nodes; G must be a multiple (default: the placements' cluster, else 1)")]
GpuName = Annotated[str, typer.Option("--gpu", help="GPU preset: h100, h200, a100, b200")]
IntraBw = Annotated[float | None, typer.Option("--intra-bw",
                                                help="GB/s per GPU inside a node (NVLink)")]
InterBw = Annotated[float | None, typer.Option("--inter-bw",
                                                help="GB/s per GPU across nodes (network)")]


def cluster_from_flags(gpus: int, nodes: int, gpu: str, intra_bw: float | None,
                       inter_bw: float | None) -> Cluster:
    """The cluster the flags describe (bandwidths given in GB/s)."""
    return make_cluster(gpus, nodes, gpu,
                        None if intra_bw is None else intra_bw * 1e9,
                        None if inter_bw is None else inter_bw * 1e9)


Workers = Annotated[int, typer.Option(
    "--workers", help="processes profiling shards of a directory or glob at once")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="no progress display (it shows only on a terminal anyway)")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray", help="run on Ray: 'local' (a local instance), 'auto' or ray://HOST:PORT "
    "(pip install 'moetuner\\[ray]')")]


def no_tokens(sources: str, select: Sequence[str] | None, drop: Sequence[str] | None,
              field: str = "load") -> InputError:
    """The error for inputs left without a routed token: it names ``--select`` / ``--drop``
    when a selection was given (the usual cause), else the files."""
    flags = [flag for flag, values in (("--select", select), ("--drop", drop)) if values]
    if flags:
        given = " ".join(f"{flag} {value}" for flag, values in (("--select", select),
                                                                 ("--drop", drop))
                         for value in values or ())
        return InputError("/".join(flags), "selection", f"a selection that keeps tokens of "
                          f"{sources}", f"none kept by {given}")
    return InputError(sources, field, "routed tokens (the files hold none)", 0)


def profile_with_progress(path: str, select: list[str] | None, drop: list[str] | None,
                          workers: int = 1, **steps) -> Profile:
    """Profile a trace, profile and add the shards of a directory or glob, or read a profile
    file as it is; a progress bar shows traces being counted. ``steps`` (sampled engine
    steps, as ``profile_trace`` takes them) need the whole trace in memory: the shards of a
    trace are then concatenated, not streamed."""
    if not steps or not is_trace(path):
        return profile_paths_with_progress([path], select, drop, workers)
    trace = read_trace(path, select or (), drop or ())
    if not trace.num_tokens:
        raise no_tokens(path, select, drop)
    with progress(f"profiling {trace.num_tokens} tokens", trace.num_tokens, "tokens") as advance:
        return profile_trace(trace, progress=advance, **steps)


def profile_paths_with_progress(paths: Sequence[str | Path], select: list[str] | None,
                                drop: list[str] | None, workers: int = 1,
                                ray_address: str | None = None) -> Profile:
    """The sum of the profiles of every shard of ``paths``, streamed, with a progress bar
    (tokens/s; ETA when every shard's header gives its length)."""
    shards = [shard for path in paths for shard in expand_shards(path)]
    if not any(is_trace(shard) for shard in shards):
        profile = profile_shards(shards, select or (), drop or ())
    else:
        sizes = [shard_tokens(shard) for shard in shards]
        total = None if None in sizes else sum(sizes)
        with progress(f"profiling {len(shards)} shard(s)", total, "tokens") as advance:
            profile = profile_shards(shards, select or (), drop or (), workers, advance,
                                     ray_address)
    if not profile.load.any():
        raise no_tokens(", ".join(map(str, paths)), select, drop)
    return profile


ModelName = Annotated[str | None, typer.Option(
    "--model", help="model preset for the cost model (default: the preset matching the trace)")]
ExecModel = Annotated[str, typer.Option(
    "--exec", help="execution model: return, follow or both")]
ReplicaPolicy = Annotated[str, typer.Option(
    "--replica-policy", help="replica choice: even (vLLM) or nearest (SGLang)")]
Calibration = Annotated[Path | None, typer.Option(
    "--calibration", help="cost-model coefficients JSON (default: built-in assumptions)")]
EvalTrace = Annotated[Path, typer.Option("--trace", help="held-out routing trace to replay")]
Placements = Annotated[list[Path], typer.Argument(
    help="placements to compare: moetuner JSON, or any file moetuner export writes (SGLang "
    "JSON with its sidecar, vLLM JSON list (needs --gpus), vLLM-Ascend JSON, Megatron .npy)")]
PlacementGpus = Annotated[int | None, typer.Option(
    "--gpus", help="expert-parallel GPUs (default: the placements')")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print the numbers as JSON")]
PhaseFlag = Annotated[str, typer.Option(
    "--phase", help="serving phase: decode (continuous batching; DeepEP low-latency kernels) "
    "or prefill (chunks; DeepEP normal kernels)")]
KernelFlag = Annotated[str | None, typer.Option(
    "--kernel", help="all-to-all kernel: deepep-ll, deepep-normal or nccl (default: the "
    "phase's)")]
ReplayFlag = Annotated[str, typer.Option(
    "--replay", help="engine steps: serving (synthesised at serving scale from the recorded "
    "requests), recorded (the trace's own order) or average (the whole-trace average)")]
TokensPerGpu = Annotated[int | None, typer.Option(
    "--tokens-per-gpu", help="serving: tokens per GPU per step (default 128 decode, 4096 "
    "prefill)")]
NumSteps = Annotated[int | None, typer.Option(
    "--steps", help="serving: steps drawn (default 64 decode, 16 prefill)")]
StepSeed = Annotated[int, typer.Option("--seed", help="serving: seed of the steps' draw")]
Concurrency = Annotated[int | None, typer.Option(
    "--concurrency", help="recorded decode: running sequences in the cluster (default "
    "128 x G)")]
StepTokens = Annotated[int | None, typer.Option(
    "--step-tokens", help="recorded prefill: tokens per step (default 8192)")]
Online = Annotated[str | None, typer.Option(
    "--online", help="also replay each placement with online rebalancing by METHOD (e.g. "
    "eplb), as vLLM/SGLang --enable-eplb do")]
OnlinePreset = Annotated[str, typer.Option(
    "--online-preset", help="engine defaults for --window/--interval: vllm (1000/3000 "
    "steps) or sglang (1000/1000)")]
Window = Annotated[int | None, typer.Option(
    "--window", help="online: steps of loads a rebalance sees (default: the preset's)")]
Interval = Annotated[int | None, typer.Option(
    "--interval", help="online: steps between rebalances (default: the preset's)")]
