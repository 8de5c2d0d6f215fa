"""Quality of ``joint`` per engine step on the real GPT-OSS-20B trace.

Rows: 8 / 16 GPUs on 2 / 4 nodes (H200), R = 0 and R = G, ``return`` and ``follow``, for two
drifts: profile on MMLU, evaluate on GPQA; profile on the first half of MMLU, evaluate on the
second. Sequences flagged ``seq_repetition`` are dropped. Every method places from the same
profile (with decode steps sampled at C = 128 x G); each placement is scored per step on
the held-out part (decode continuous batching at C = 128 x G, replicas split evenly) by
``held_out_mean_step`` -- until the evaluator's per-step replay lands this is joint's own
per-step objective evaluated on ALL held-out steps (exact counts per step, not sampled).
Columns: mean step time (us) of each method; ratios of joint to static EPLB and to the
best baseline.

Rerun: python bench/quality.py [--quick] [--trace PATH] [--time-limit S]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np

from moetuner import PlaceOptions, Trace, load_trace, make_cluster, place, profile_trace
from moetuner.methods._joint_objective import build_problem, model_for, objective
from moetuner.profile import sample_steps

TRACE = "../shared/traces/gpt-oss-20b/decode.npz"
CLUSTERS = ((8, 2), (16, 4))
BASELINES = ("linear", "eplb_fixed", "moetuner")


def drifts(trace: Trace) -> dict[str, tuple[Trace, Trace]]:
    """name -> (profiled part, held-out part)."""
    mmlu = trace.select(["seq_dataset=mmlu*"])
    first, second = mmlu.split(0.5)
    return {"MMLU->GPQA": (mmlu, trace.select(["seq_dataset=gpqa*"])),
            "MMLU half->half": (first, second)}


def held_out_mean_step(phy2log: np.ndarray, held_out: Trace, cluster, exec_model: str,
                       redundant: int) -> float:
    """Mean step seconds of ``phy2log`` on every decode step of ``held_out`` (C = 128 x G,
    replicas even). The one place to switch to the evaluator's per-step replay."""
    steps = sample_steps(held_out, cluster.num_gpus, count=1 << 40)
    profile = replace(profile_trace(held_out), steps=steps)
    slots = (held_out.num_experts + redundant) // cluster.num_gpus
    problem = build_problem([profile], np.ones(1), cluster, slots, exec_model, "mean",
                            model_for(profile))
    return objective(problem, phy2log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=TRACE)
    parser.add_argument("--quick", action="store_true", help="R = 0 only")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per solve")
    args = parser.parse_args()
    trace = load_trace(args.trace, drop=["seq_repetition"])
    columns = [*BASELINES, "joint"]
    print(f"# joint per step: {trace.source}, {trace.num_tokens} tokens, mean step time (us) "
          f"on all held-out decode steps at C = 128 x G, H200, replicas even; joint limit "
          f"{args.time_limit:g} s")
    print("| drift | G | N | R | exec | " + " | ".join(columns)
          + " | joint/eplb | joint/best baseline | joint s |")
    print("|" + "---|" * (len(columns) + 8))
    ratios = []
    for drift, (fit, held_out) in drifts(trace).items():
        for gpus, nodes in CLUSTERS:
            cluster = make_cluster(gpus, nodes, "h200")
            profile = profile_trace(fit, step_gpus=gpus)
            for redundant in (0,) if args.quick else (0, gpus):
                for exec_model in ("return", "follow"):
                    options = PlaceOptions(redundant=redundant, exec_model=exec_model,
                                           time_limit=args.time_limit)
                    times = {}
                    for name in BASELINES:
                        placement, _ = place(profile, cluster, name, options)
                        times[name] = held_out_mean_step(placement.phy2log, held_out, cluster,
                                                         exec_model, redundant)
                    start = time.perf_counter()
                    placement, _ = place(profile, cluster, "joint", options)
                    solve = time.perf_counter() - start
                    times["joint"] = held_out_mean_step(placement.phy2log, held_out, cluster,
                                                        exec_model, redundant)
                    best = min(times[name] for name in BASELINES)
                    ratios.append((times["joint"] / times["eplb_fixed"], times["joint"] / best))
                    print(f"| {drift} | {gpus} | {nodes} | {redundant} | {exec_model} | "
                          + " | ".join(f"{1e6 * times[name]:.1f}" for name in columns)
                          + f" | {ratios[-1][0]:.3f} | {ratios[-1][1]:.3f} | {solve:.1f} |",
                          flush=True)
    eplb, best = np.array(ratios).T
    print(f"\njoint/eplb: median {np.median(eplb):.3f}, worst {eplb.max():.3f}; "
          f"joint/best baseline: median {np.median(best):.3f}, worst {best.max():.3f}")
    print("\nrerun: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
