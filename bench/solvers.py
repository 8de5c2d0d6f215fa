"""Placement methods and solver libraries: objective, bound, gap and solve time.

Rerun: python bench/solvers.py [--quick] [--time-limit S] [--trace PATH]
(default trace: ../shared/traces/gpt-oss-20b/decode.npz profiled on MMLU without repetition
loops; --quick: 2 s per solve and fewer rows).

Objectives, for every method's placement:
- traffic: ILP 2's objective, sum over layers of the largest link-cost-weighted GPU-pair
  token traffic between consecutive layers (top-1 transitions, the follow model);
- imbalance: ILP 1's objective summed over layers, sum_g |GPU load - mean|, as % of tokens;
- max/mean: the busiest GPU's load over the mean, averaged over layers.
Synthetic rows use ``moetuner.synth.synthesize_trace`` fitted to the GPT-OSS profile and are
marked as synthetic; they are skipped when that module is not there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from moetuner import PlaceOptions, Profile, make_cluster, place, profile_trace
from moetuner.cli.place import gpu_load_ratio
from moetuner.methods.eplb import balanced_packing
from moetuner.methods.moetuner import (
    _initial_assignment,
    cluster_traffic,
    improve_by_swaps,
    placement_traffic,
    solve_balance,
    solve_traffic_cpsat,
    solve_traffic_dp,
    traffic_objective,
)
from moetuner.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "traces" / "gpt-oss-20b" / "decode.npz"
# (name, layers, experts, top-k, GPUs, nodes)
SHAPES = [("Mixtral 32x8", 32, 8, 2, 4, 1), ("OLMoE 16x64", 16, 64, 8, 8, 1),
          ("Qwen3-30B 48x128", 48, 128, 8, 8, 1), ("Qwen3-235B 94x128", 94, 128, 8, 8, 2),
          ("DeepSeek-V3 58x256", 58, 256, 8, 32, 4)]


def imbalance(placement, profile: Profile) -> float:
    """ILP 1's objective summed over layers, as % of the token-expert assignments."""
    per_copy = profile.load / np.maximum(placement.logcnt, 1)
    gpu_load = np.einsum("le,leg->lg", per_copy, placement.replicas_on_gpu)
    deviation = np.abs(gpu_load - gpu_load.mean(axis=1, keepdims=True)).sum()
    return 100 * deviation / profile.load.sum()


def method_rows(label: str, profile: Profile, gpus: int, nodes: int, time_limit: float,
                variants: list[tuple[str, dict]]) -> None:
    cluster = make_cluster(gpus, nodes)
    cost = cluster.link_cost()
    transitions = profile.transitions_top1
    base = None
    for method, params in variants:
        options = PlaceOptions(time_limit=time_limit, params=params)
        start = time.perf_counter()
        placement, record = place(profile, cluster, method, options)
        seconds = time.perf_counter() - start
        traffic = placement_traffic(placement, transitions, cost)
        base = traffic if base is None else base
        name = method + "".join(f" {k}={v}" for k, v in params.items())
        algorithm = record.log.split(";")[0].removeprefix("ILP 2 algorithm: ") \
            if method == "moetuner" else "-"
        bound = "-" if record.bound is None else f"{record.bound:.4g}"
        gap = "-" if record.gap is None else f"{100 * record.gap:.1f}%"
        ratio = gpu_load_ratio(placement, profile).mean()
        print(f"| {label} | {gpus}x{nodes} | {name} | {algorithm} | {record.status} | "
              f"{traffic:.4g} | {traffic / base:.3f} | {bound} | {gap} | "
              f"{imbalance(placement, profile):.3f} | {ratio:.3f} | {seconds:.2f} |", flush=True)


def header() -> None:
    print("| instance | G x nodes | method | ILP 2 by | status | traffic | vs linear | bound | "
          "gap | imbalance % | max/mean | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")


VARIANTS = [("linear", {}), ("round_robin", {}), ("eplb_fixed", {}), ("moetuner", {}),
            ("moetuner", {"ilp2": "polish"})]


# ----------------------------------------------------------------- solver-library comparison

def milp_traffic(traffic: np.ndarray, cost: np.ndarray, time_limit: float
                 ) -> tuple[float, float, float]:
    """ILP 2 (equal sizes) on scipy.milp / HiGHS, same linearisation as the CP-SAT model,
    no warm start (scipy.milp takes none): (objective, bound, seconds)."""
    steps, gpus = traffic.shape[0], traffic.shape[1]
    layers = steps + 1

    def y(layer, c, g):
        return (layer * gpus + c) * gpus + g

    num_y = layers * gpus * gpus
    pairs = list(zip(*np.nonzero(cost), strict=True))
    z_index = {}
    by_link = {}                               # (t, g, h) -> [(z column, c, d)]
    for t in range(steps):
        for c, d in zip(*np.nonzero(traffic[t]), strict=True):
            for g, h in pairs:
                z_index[t, c, d, g, h] = num_y + len(z_index)
                by_link.setdefault((t, g, h), []).append((z_index[t, c, d, g, h], c, d))
    num_vars = num_y + len(z_index) + steps
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(entries, low, high):
        row = len(lo)
        for col, val in entries:
            rows.append(row)
            cols.append(col)
            vals.append(val)
        lo.append(low)
        hi.append(high)

    for layer in range(layers):
        for c in range(gpus):
            add([(y(layer, c, g), 1) for g in range(gpus)], 1, 1)
            add([(y(layer, g, c), 1) for g in range(gpus)], 1, 1)
    for (t, c, d, g, h), k in z_index.items():
        add([(k, 1), (y(t, c, g), -1), (y(t + 1, d, h), -1)], -1, np.inf)
    for t in range(steps):
        peak = num_y + len(z_index) + t
        for g, h in pairs:
            add([(peak, 1)] + [(k, -cost[g, h] * traffic[t, c, d])
                               for k, c, d in by_link.get((t, g, h), [])], 0, np.inf)
    add([(y(0, 0, 0), 1)], 1, 1)                    # symmetry: cluster 0 of layer 0 on GPU 0
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lo), num_vars))
    objective = np.r_[np.zeros(num_vars - steps), np.ones(steps)]
    start = time.perf_counter()
    result = milp(objective, constraints=LinearConstraint(matrix, lo, hi),
                  integrality=np.r_[np.ones(num_vars - steps), np.zeros(steps)],
                  bounds=Bounds(0, np.r_[np.ones(num_vars - steps), np.full(steps, np.inf)]),
                  options={"time_limit": time_limit, "mip_rel_gap": 0.025})
    seconds = time.perf_counter() - start
    value = np.nan if result.x is None else float(result.fun)
    return value, float(getattr(result, "mip_dual_bound", np.nan) or np.nan), seconds


def library_rows(profile: Profile, label: str, gpus: int, nodes: int, layers: list[int],
                 time_limit: float) -> None:
    """ILP 1 on some layers and ILP 2 on the whole profile with CP-SAT and with HiGHS."""
    slots = profile.num_experts // gpus
    for layer in layers:
        weight = profile.load[layer].astype(float)
        warm = solve_balance(weight, gpus, slots, None, 0.0)[1]
        cells = []
        for solver in ("cpsat", "highs"):
            start = time.perf_counter()
            _, value, bound, _, _ = solve_balance(weight, gpus, slots, None, time_limit,
                                                  solver=solver)
            cells.append(f"{value:.4g} / {bound:.4g} / {time.perf_counter() - start:.1f} s")
        print(f"| ILP 1 | {label} layer {layer}, G={gpus} | greedy + swaps {warm:.4g} | "
              f"{cells[0]} | {cells[1]} |", flush=True)
    cluster = make_cluster(gpus, nodes)
    cost = cluster.link_cost()
    clusters, _ = balanced_packing(profile.load.astype(float), gpus)
    share = np.zeros((profile.num_layers, profile.num_experts, gpus))
    np.put_along_axis(share, clusters[:, :, None], 1.0, axis=2)
    traffic = cluster_traffic(profile.transitions_top1.astype(float), share)
    start = time.perf_counter()
    heuristic = improve_by_swaps(traffic, cost, _initial_assignment(traffic, None), None,
                                 start + time_limit)
    heuristic_value = traffic_objective(traffic, cost, np.argsort(heuristic, axis=1))
    reference = f"heuristic {heuristic_value:.4g} ({time.perf_counter() - start:.1f} s)"
    if gpus <= 5:
        start = time.perf_counter()
        _, exact = solve_traffic_dp(traffic, cost)
        reference += f", exact DP {exact:.4g} ({time.perf_counter() - start:.2f} s)"
    start = time.perf_counter()
    found, bound, _, _ = solve_traffic_cpsat(traffic, cost, heuristic, gpus // nodes, None,
                                             None, start + time_limit, 0, 0.025)
    cp_seconds = time.perf_counter() - start
    cp_value = (np.nan if found is None
                else traffic_objective(traffic, cost, np.argsort(found, axis=1)))
    hi_value, hi_bound, hi_seconds = milp_traffic(traffic, cost, time_limit)
    print(f"| ILP 2 | {label}, G={gpus}x{nodes} | {reference} | "
          f"{cp_value:.4g} / {bound if bound is not None else np.nan:.4g} / {cp_seconds:.1f} s | "
          f"{hi_value:.4g} / {hi_bound:.4g} / {hi_seconds:.1f} s |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path,
                        default=DEFAULT if DEFAULT.exists() else ROOT / "data" / "gpt-oss-20b"
                        / "slice.npz")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--time-limit", type=float, default=None)
    args = parser.parse_args()
    time_limit = args.time_limit or (2.0 if args.quick else 10.0)
    trace = load_trace(args.trace, select=["seq_dataset=mmlu*"], drop=["seq_repetition"])
    profile = profile_trace(trace)
    print(f"GPT-OSS-20B: {args.trace}, MMLU without repetition loops: {profile.tokens} tokens, "
          f"{profile.num_layers} layers x {profile.num_experts} experts, top-{profile.top_k}; "
          f"time limit {time_limit:g} s per solve")
    print()
    header()
    for gpus in (4, 8, 16):
        for nodes in (1, 2):
            method_rows("GPT-OSS 24x32", profile, gpus, nodes, time_limit,
                        VARIANTS + [("moetuner", {"ilp1": "highs"}),
                                    ("moetuner", {"sizes": "free"})])
    try:
        from moetuner.synth import synthesize_trace
    except ImportError:
        print("\n(synthetic shapes skipped: moetuner.synth is not available)")
    else:
        shapes = SHAPES[:3] if args.quick else SHAPES
        for name, layers, experts, k, gpus, nodes in shapes:
            synthetic = synthesize_trace(layers, experts, k, 4000 if args.quick else 20000,
                                         like=profile, seed=0)
            method_rows(f"{name} (synthetic)", profile_trace(synthetic), gpus, nodes,
                        time_limit, VARIANTS)
    print("\nSolver libraries (objective / bound / seconds at the same limit; HiGHS through "
          "scipy.milp takes no warm start (the ILP 1 rows keep the warm start when better); "
          "CP-SAT is hinted with greedy + swaps / the ILP 2 heuristic)\n")
    print("| model | instance | reference | CP-SAT | HiGHS |")
    print("|---|---|---|---|---|")
    library_rows(profile, "GPT-OSS", 4, 1, [0, 12] if args.quick else [0, 6, 12, 18],
                 time_limit)
    library_rows(profile, "GPT-OSS", 4, 2, [], time_limit)
    if not args.quick:
        library_rows(profile, "GPT-OSS", 8, 1, [0, 12], time_limit)
    print(f"\nrerun: python bench/solvers.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
