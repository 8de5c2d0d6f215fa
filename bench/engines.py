"""Engine fidelity: moetuner's ``eplb`` against vLLM 0.33's own EPLB port, and the cost of
the export-time engine checks.

Rerun: ``python .ci/fetch_engines.py && PYTHONPATH=src python bench/engines.py`` (vLLM's
``default.py`` from ``.engines/src``; the first table is skipped without it).
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

from moetuner.eplb import rebalance_experts
from moetuner.export import LayerAxis, check_engine
from moetuner.models import get_model
from moetuner.placement import Placement

SOURCES = Path(__file__).resolve().parents[1] / ".engines" / "src"
# (E, P, groups, nodes, GPUs): DeepSeek's example, small hierarchical and global cases,
# OLMoE-like and DeepSeek-V3-like shapes.
SHAPES = [(12, 16, 4, 2, 8), (16, 24, 8, 4, 8), (8, 12, 3, 2, 4), (64, 80, 8, 2, 16),
          (256, 288, 8, 2, 16)]


def vllm_default_policy():
    """vLLM 0.33's ``DefaultEplbPolicy`` imported from its own file, or None."""
    path = SOURCES / "vllm/distributed/eplb/policy/default.py"
    if not path.exists():
        return None
    for name in ("vllm", "vllm.distributed", "vllm.distributed.eplb",
                 "vllm.distributed.eplb.policy"):
        package = types.ModuleType(name)
        package.__path__ = [str(SOURCES.joinpath(*name.split(".")))]
        sys.modules[name] = package
    spec = importlib.util.spec_from_file_location("vllm.distributed.eplb.policy.default", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.DefaultEplbPolicy


def agreement(runs: int = 40) -> None:
    default = vllm_default_policy()
    if default is None:
        print("vLLM sources missing: run python .ci/fetch_engines.py")
        return
    import torch

    rng = np.random.default_rng(0)
    print("| E | P | groups | nodes | GPUs | phy2log equal to vLLM's | runs |")
    print("|---|---|---|---|---|---|---|")
    for E, P, groups, nodes, gpus in SHAPES:
        equal = 0
        for _ in range(runs):
            weight = rng.pareto(1.5, (4, E)) * 100 + 1                # tie-free loads
            ours = rebalance_experts(weight, P, groups, nodes, gpus)[0]
            theirs = default.rebalance_experts(torch.from_numpy(weight), P, groups, nodes, gpus)
            equal += np.array_equal(ours, theirs.numpy())
        print(f"| {E} | {P} | {groups} | {nodes} | {gpus} | {equal} | {runs} |")


def check_cost() -> None:
    spec = get_model("deepseek-v3")
    weight = np.random.default_rng(1).pareto(1.5, (spec.num_moe_layers, spec.num_experts)) + 1
    phy2log = rebalance_experts(weight, 288, 8, 4, 32, method="eplb_fixed")[0]
    placement = Placement(phy2log=phy2log, num_gpus=32, num_experts=spec.num_experts)
    axis = LayerAxis.resolve(placement.num_layers, spec)
    print("\n| check | ms (median of 20) |\n|---|---|")
    for fmt in ("sglang", "vllm-ascend"):
        times = []
        for _ in range(20):
            start = time.perf_counter()
            check_engine(placement, fmt, None, axis)
            times.append(time.perf_counter() - start)
        print(f"| {fmt}, DeepSeek-V3 shape (58 x 288 slots, 32 GPUs) | "
              f"{1e3 * statistics.median(times):.2f} |")


if __name__ == "__main__":
    print(f"rerun: python .ci/fetch_engines.py && PYTHONPATH=src python {' '.join(sys.argv)}")
    agreement()
    check_cost()
