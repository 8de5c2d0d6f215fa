"""Quality of ``joint`` on the real GPT-OSS-20B trace: the evaluator's predicted MoE time.

Rows: 4 / 8 / 16 GPUs on 1 / 2 / 4 nodes (H200), R = 0 and R = G, ``return`` and ``follow``,
for two drifts: profile on MMLU, evaluate on GPQA; profile on the first half of MMLU,
evaluate on the second. Sequences flagged ``seq_repetition`` are dropped. Every method is
placed from the same profile and replayed on the held-out part (replicas: vLLM's even
split). ``joint`` is drift-aware: it minimises the token-weighted mean objective over one
profile per MMLU subject (``seq_category``) of the profiled part, so a placement that is
balanced only for the mix it saw pays for it; ``joint 1p`` is the same method given the
single aggregate profile. Then the surrogate's tracking: the Spearman
rank correlation, over baselines, ``joint`` and random perturbations of them, between the
objective ``joint`` minimises and the evaluator's prediction on the profiled data.

Rerun: python bench/quality.py [--quick] [--trace PATH] [--time-limit S]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np
from scipy.stats import spearmanr

from moetuner import Placement, PlaceOptions, Trace, load_trace, make_cluster, place, profile_trace
from moetuner.evaluate import evaluate
from moetuner.methods import methods
from moetuner.methods._joint_objective import build_problem, model_for, objective
from moetuner.models import get_model
from moetuner.profile import profiles_by_label

TRACE = "/work/shared/traces/gpt-oss-20b/decode.npz"
CLUSTERS = ((4, 1), (8, 2), (16, 4))
BASELINES = ("linear", "round_robin", "eplb", "eplb_fixed", "moetuner")


def drifts(trace: Trace) -> dict[str, tuple[Trace, Trace]]:
    """name -> (profiled part, held-out part)."""
    mmlu = trace.select(["seq_dataset=mmlu*"])
    first, second = mmlu.split(0.5)
    return {"MMLU->GPQA": (mmlu, trace.select(["seq_dataset=gpqa*"])),
            "MMLU half->half": (first, second)}


def predicted(phy2log: np.ndarray, trace: Trace, cluster, model, exec_model: str,
              shared: bool) -> float:
    placement = Placement(phy2log=phy2log, num_gpus=cluster.num_gpus,
                          num_experts=trace.num_experts, allow_shared_gpu=shared)
    return evaluate(placement, trace, cluster, model, exec_model, "even")[1].total


def perturbed(phy2log: np.ndarray, slots_per_gpu: int, rng: np.random.Generator) -> np.ndarray:
    """A copy with a few random slot swaps per layer that keep replicas on distinct GPUs."""
    out = phy2log.copy()
    L, P = out.shape
    for layer in range(L):
        for _ in range(int(rng.integers(0, 6))):
            a, b = rng.integers(0, P, 2)
            row = out[layer].copy()
            row[[a, b]] = row[[b, a]]
            per_gpu = np.sort(row.reshape(-1, slots_per_gpu), axis=1)
            if (per_gpu[:, 1:] != per_gpu[:, :-1]).all():
                out[layer] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=TRACE)
    parser.add_argument("--quick", action="store_true", help="R = 0 only, short time limits")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds per solve (default 6, quick 3)")
    args = parser.parse_args()
    limit = args.time_limit or (3.0 if args.quick else 6.0)
    model = get_model("gpt-oss-20b")
    trace = load_trace(args.trace, drop=["seq_repetition"])
    available = methods()
    baselines = [name for name in BASELINES if name in available]
    columns = baselines + ["joint 1p", "joint"]
    print(f"# joint quality: {trace.source}, {trace.num_tokens} tokens, predicted MoE time per "
          f"batch (us), H200, replicas split evenly; joint time limit {limit:g} s")
    print("| drift | G | N | R | exec | " + " | ".join(columns)
          + " | joint/eplb | joint/linear | joint/best baseline | joint solve s | gap |")
    print("|" + "---|" * (len(columns) + 10))
    ratios = {"eplb": [], "linear": [], "best": []}
    tracking = []
    rng = np.random.default_rng(0)
    for drift, (fit, held_out) in drifts(trace).items():
        profile = profile_trace(fit)
        subjects = profiles_by_label(fit, "seq_category")
        for gpus, nodes in CLUSTERS:
            cluster = make_cluster(gpus, nodes, "h200")
            for redundant in (0,) if args.quick else (0, gpus):
                for exec_model in ("return", "follow"):
                    options = PlaceOptions(redundant=redundant, exec_model=exec_model,
                                           time_limit=limit)
                    placements, times = {}, {}
                    for name in baselines:
                        placement, _ = place(profile, cluster, name, options)
                        placements[name] = placement
                    placements["joint 1p"], _ = place(profile, cluster, "joint", options)
                    drift_aware = replace(options, params={
                        "profiles": subjects, "weights": [p.tokens for p in subjects]})
                    start = time.perf_counter()
                    placements["joint"], record = place(profile, cluster, "joint", drift_aware)
                    solve_time = time.perf_counter() - start
                    for name, placement in placements.items():
                        times[name] = predicted(placement.phy2log, held_out, cluster, model,
                                                exec_model, placement.allow_shared_gpu)
                    best = min(times[name] for name in baselines)
                    ratios["eplb"].append(times["joint"] / times["eplb"])
                    ratios["linear"].append(times["joint"] / times["linear"])
                    ratios["best"].append(times["joint"] / best)
                    print(f"| {drift} | {gpus} | {nodes} | {redundant} | {exec_model} | "
                          + " | ".join(f"{1e6 * times[name]:.1f}" for name in columns)
                          + f" | {ratios['eplb'][-1]:.3f} | {ratios['linear'][-1]:.3f} | "
                          f"{ratios['best'][-1]:.3f} | {solve_time:.1f} | {record.gap:.2f} |",
                          flush=True)
                    if drift == "MMLU->GPQA":
                        tracking.append(track(placements, profile, fit, cluster, model,
                                              exec_model, redundant, gpus, rng,
                                              10 if args.quick else 30))
    summary(ratios)
    print("\n## surrogate tracking (Spearman rank correlation, objective vs evaluator on the "
          "profiled data)")
    print("| G | N | R | exec | placements | Spearman |")
    print("|---|---|---|---|---|---|")
    for row in tracking:
        print("| " + " | ".join(str(v) for v in row) + " |")
    values = [row[-1] for row in tracking]
    print(f"median Spearman {np.median(values):.3f}, min {min(values):.3f}")
    print("\nrerun: python " + " ".join(sys.argv))


def track(placements: dict[str, Placement], profile, fit: Trace, cluster, model,
          exec_model: str, redundant: int, gpus: int, rng: np.random.Generator,
          count: int) -> tuple:
    """Rank correlation of ``joint``'s objective with the evaluator over many placements."""
    slots = (profile.num_experts + redundant) // gpus
    problem = build_problem([profile], np.ones(1), cluster, slots, exec_model, "mean",
                            model_for(profile))
    starts = [p.phy2log for p in placements.values() if not p.allow_shared_gpu]
    candidates = starts + [perturbed(starts[int(rng.integers(len(starts)))], slots, rng)
                           for _ in range(count)]
    surrogate = [objective(problem, phy2log) for phy2log in candidates]
    truth = [predicted(phy2log, fit, cluster, model, exec_model, False)
             for phy2log in candidates]
    rho = float(spearmanr(surrogate, truth)[0])
    return gpus, cluster.num_nodes, redundant, exec_model, len(candidates), round(rho, 3)


def summary(ratios: dict[str, list[float]]) -> None:
    eplb = 1 - np.mean(ratios["eplb"])
    linear = 1 - np.mean(ratios["linear"])
    worse = [r for r in ratios["best"] if r > 1]
    print(f"\njoint vs eplb: {100 * eplb:.1f}% lower on average (target >= 10%: "
          f"{'met' if eplb >= 0.10 else f'missed by {100 * (0.10 - eplb):.1f} points'}); "
          f"median ratio {np.median(ratios['eplb']):.3f}")
    print(f"joint vs linear: {100 * linear:.1f}% lower on average (target >= 25%: "
          f"{'met' if linear >= 0.25 else f'missed by {100 * (0.25 - linear):.1f} points'}); "
          f"median ratio {np.median(ratios['linear']):.3f}")
    print(f"joint worse than the best baseline on {len(worse)} of {len(ratios['best'])} rows"
          + (f" (worst by {100 * (max(worse) - 1):.1f}%)" if worse else ""))


if __name__ == "__main__":
    main()
