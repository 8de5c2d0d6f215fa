"""Scale of ``joint`` on SYNTHETIC traces of models no public per-token trace covers.

Shapes: Qwen3-235B (94 MoE layers x 128 experts, top-8) on 16 H200 in 2 nodes, DeepSeek-V3
(58 x 256, top-8) on 64 H200 in 8 nodes, R = G. The traces come from ``moetuner.synth``
fitted to the shipped GPT-OSS-20B slice (per-layer skew and consecutive-layer MI); every
number here is on synthetic data. ``joint`` with its defaults (decode at 128 tokens per
GPU on DeepEP low-latency kernels, hedged steps, return; and ``--param phase=prefill`` on
DeepEP normal kernels), 60 s limit. Each solve runs in a fresh process: objective, lower
bound, gap, whether the search converged (a full pass of the balance search found no
improving move), moves evaluated per second, wall time and peak memory.

Rerun: python bench/scale.py [--quick] [--tokens T]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

from moetuner import (
    PlaceOptions,
    load_profile,
    make_cluster,
    place,
    profile_trace,
    synthesis_fit,
    synthesize_trace,
)
from moetuner.methods import parse_params
from moetuner.synth import default_like

SHAPES = (("Qwen3-235B", 94, 128, 8, 16, 2), ("DeepSeek-V3", 58, 256, 8, 64, 8))


def solve_once(profile_path: str, gpus: int, nodes: int, phase: str, limit: float,
               queue) -> None:
    """Place in this (fresh) process and report the record and peak memory."""
    profile = load_profile(profile_path)
    cluster = make_cluster(gpus, nodes, "h200")
    start = time.perf_counter()
    _, record = place(profile, cluster, "joint", PlaceOptions(
        redundant=gpus, exec_model="return", time_limit=limit,
        params=parse_params("joint", {"phase": phase})))
    wall = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    queue.put((record.objective, record.bound, record.gap, record.status, wall, own, workers,
               record.log))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s limits only")
    parser.add_argument("--tokens", type=int, default=50_000, help="synthetic tokens per shape")
    args = parser.parse_args()
    limit = 10 if args.quick else 60
    like = default_like()
    context = multiprocessing.get_context("spawn")
    print("# joint scale on SYNTHETIC traces (fitted to the GPT-OSS-20B slice), 2-core VM")
    print("| shape (synthetic) | G | N | phase | limit s | wall s | objective s/step | bound | "
          "gap | status | balance search | peak GiB (solver / worker) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, layers, experts, k, gpus, nodes in SHAPES:
            start = time.perf_counter()
            trace = synthesize_trace(layers, experts, k, args.tokens, like=like, seed=0)
            made = time.perf_counter() - start
            fit = synthesis_fit(like, trace)
            print(f"<!-- {name}: synthetic {args.tokens} tokens in {made:.1f} s; "
                  + fit.summary().replace("\n", "; ") + " -->", flush=True)
            for phase in ("decode", "prefill"):
                # The steps joint samples for this shape's GPUs and phase.
                plan = parse_params("joint", {"phase": phase}).step_plan()
                path = str(Path(scratch) / f"{name}-{phase}.npz")
                profile_trace(trace, step_gpus=gpus, plan=plan).save(path)
                queue = context.Queue()
                child = context.Process(target=solve_once, args=(
                    path, gpus, nodes, phase, limit, queue))
                child.start()
                objective, bound, gap, status, wall, own, workers, log = queue.get()
                child.join()
                search = next((part.strip() for part in log.split(";")
                               if part.strip().startswith("balance search")), "-")
                print(f"| {name} (synthetic) | {gpus} | {nodes} | {phase} | {limit} | "
                      f"{wall:.1f} | {objective:.5g} | {bound:.5g} | {gap:.3f} | {status} | "
                      f"{search} | {own:.2f} / {workers:.2f} |", flush=True)
                print(f"<!-- {log} -->", flush=True)
    print("\nrerun: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
