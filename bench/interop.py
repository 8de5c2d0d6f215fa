"""Interop benchmark: the EPLB drop-in across methods on real loads, and engine file I/O.

Part 1: ``moetuner.eplb.rebalance_experts`` with each method on the GPT-OSS-20B decode loads
(24 layers x 32 experts) and the Mixtral-8x7B MMLU loads (32 x 8, all subjects summed).
Imbalance = busiest GPU's load / mean GPU load per layer, a replicated expert's load split
evenly over its replicas (vLLM's dispatch); 1.00 is perfect.

Part 2: write + read back each engine format for a DeepSeek-V3-sized placement (58 MoE layers
of 61, 256 experts + 32 replicas on 32 GPUs): median wall time of 5 runs and file size.

Rerun: python bench/interop.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moetuner.eplb import rebalance_experts
from moetuner.export import (
    LayerAxis,
    read_megatron,
    read_sglang,
    read_vllm,
    read_vllm_ascend,
    write_engine_files,
)
from moetuner.inputs import read_profile
from moetuner.methods import methods
from moetuner.models import get_model
from moetuner.placement import Placement

# ../shared/traces beside the repository.
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


def imbalance(weight: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, gpus: int
              ) -> np.ndarray:
    """``[L]`` max / mean GPU load with each expert's load split evenly over its replicas."""
    L, P = phy2log.shape
    per_slot = np.take_along_axis(weight / logcnt, phy2log, axis=1)     # [L, P]
    gpu_load = per_slot.reshape(L, gpus, P // gpus).sum(axis=2)
    return gpu_load.max(axis=1) / gpu_load.mean(axis=1)


def part1() -> None:
    mixtral = np.load(TRACES / "mixtral-8x7b/expert_load_mmlu.npz")
    loads = {
        "gpt-oss-20b": read_profile(TRACES / "gpt-oss-20b/decode.npz").load,
        "mixtral-8x7b": sum(mixtral[k] for k in mixtral.files if not k.endswith("__tokens")),
    }
    cases = [("gpt-oss-20b", 8, 0), ("gpt-oss-20b", 8, 8), ("mixtral-8x7b", 4, 0),
             ("mixtral-8x7b", 4, 4)]
    print("| loads | G | R | method | imbalance median | imbalance max | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, gpus, redundant in cases:
        weight = np.asarray(loads[name], dtype=np.float64)
        for method in sorted(methods()):
            start = time.perf_counter()
            phy2log, _, logcnt = rebalance_experts(weight, weight.shape[1] + redundant, 1, 1,
                                                   gpus, method=method, time_limit=20)
            seconds = time.perf_counter() - start
            ratio = imbalance(weight, phy2log, logcnt, gpus)
            print(f"| {name} | {gpus} | {redundant} | {method} | {np.median(ratio):.3f} | "
                  f"{ratio.max():.3f} | {seconds:.2f} |")


def part2() -> None:
    spec = get_model("deepseek-v3")
    rng = np.random.default_rng(0)
    E, R, G = spec.num_experts, 32, 32
    # Replicas on distinct GPUs: what every engine format loads (export refuses the rest).
    weight = rng.pareto(1.5, (spec.num_moe_layers, E)) * 100 + 1
    phy2log, _, _ = rebalance_experts(weight, E + R, spec.num_expert_groups, 4, G,
                                      method="eplb_fixed")
    placement = Placement(phy2log=phy2log, num_gpus=G, num_experts=E)
    single = Placement.from_expert_gpu(rng.permuted(np.tile(np.repeat(np.arange(G), E // G),
                                                            (spec.num_moe_layers, 1)), axis=1), G)
    axis = LayerAxis.resolve(spec.num_moe_layers, spec)
    readers = {"sglang": read_sglang, "vllm": lambda p: read_vllm(p, G, E),
               "vllm-ascend": lambda p: read_vllm_ascend(p, E),
               "megatron": lambda p: read_megatron(p, G)}
    print("\n| format | write + read ms (median of 5) | bytes |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, read in readers.items():
            source = single if fmt == "megatron" else placement
            out = Path(tmp) / f"p.{'npy' if fmt == 'megatron' else 'json'}"
            times = []
            for _ in range(5):
                start = time.perf_counter()
                write_engine_files(source, fmt, out, axis)
                back = read(out)
                times.append(time.perf_counter() - start)
            assert np.array_equal(back.replicas_on_gpu, source.replicas_on_gpu)
            print(f"| {fmt} | {1e3 * statistics.median(times):.1f} | {out.stat().st_size} |")


if __name__ == "__main__":
    print(f"rerun: python {' '.join(sys.argv)}")
    part1()
    part2()
