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

``--online W I``: instead, the online comparison on MMLU -> GPQA (return, R = G): the held-out
decode steps replayed in order, re-placed every I steps from the loads of the last W steps
by online EPLB (``eplb_fixed`` on the window's loads, every expert free to move) and by the
online ``joint`` policy (``moetuner.integrations.joint_online``, the MMLU profile's affinity,
``max_moves`` per layer); the first interval uses each method's static placement. Reports
mean step time and slots moved.

Rerun: python bench/quality.py [--quick] [--trace PATH] [--time-limit S] [--online W I]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

from moetuner import PlaceOptions, Trace, load_trace, make_cluster, place, profile_trace
from moetuner.integrations.joint_online import JointOnline, JointOnlineConfig
from moetuner.methods._joint_objective import (
    build_problem,
    counts_cost,
    layer_counts,
    model_for,
    objective,
)
from moetuner.methods.eplb import rebalance_experts
from moetuner.methods.joint import peak_loads
from moetuner.profile import StepSample, sample_steps

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
                       redundant: int) -> tuple[float, float]:
    """Mean step seconds of ``phy2log`` on every decode step of ``held_out`` (C = 128 x G,
    replicas even) and the sum over steps and layers of the busiest GPU's load (the per-step
    imbalance's numerator; its denominator is the same for every placement). The one place
    to switch to the evaluator's per-step replay (equal to 6 digits, BENCHMARKS.md)."""
    steps = sample_steps(held_out, cluster.num_gpus, count=1 << 40)
    profile = replace(profile_trace(held_out), steps=steps)
    slots = (held_out.num_experts + redundant) // cluster.num_gpus
    problem = build_problem([profile], np.ones(1), cluster, slots, exec_model, "mean",
                            model_for(profile))
    return objective(problem, phy2log), float(peak_loads(problem, phy2log).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=TRACE)
    parser.add_argument("--quick", action="store_true", help="R = 0 only")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per solve")
    parser.add_argument("--online", type=int, nargs=2, metavar=("WINDOW", "INTERVAL"),
                        help="online comparison with this window and interval (steps)")
    parser.add_argument("--max-moves", type=int, default=4, help="online joint's moves")
    parser.add_argument("--affinity", type=float, default=0.25, help="online joint's affinity")
    args = parser.parse_args()
    trace = load_trace(args.trace, drop=["seq_repetition"])
    if args.online:
        online(trace, *args.online, args.max_moves, args.affinity, args.time_limit)
        return
    columns = [*BASELINES, "joint"]
    print(f"# joint per step: {trace.source}, {trace.num_tokens} tokens, mean step time (us) "
          f"on all held-out decode steps at C = 128 x G, H200, replicas even; joint limit "
          f"{args.time_limit:g} s")
    print("| drift | G | N | R | exec | " + " | ".join(columns)
          + " | joint/eplb | joint/best baseline | imbalance joint/eplb | joint s |")
    print("|" + "---|" * (len(columns) + 9))
    ratios = []
    for drift, (fit, held_out) in drifts(trace).items():
        for gpus, nodes in CLUSTERS:
            cluster = make_cluster(gpus, nodes, "h200")
            profile = profile_trace(fit, step_gpus=gpus)
            for redundant in (0,) if args.quick else (0, gpus):
                for exec_model in ("return", "follow"):
                    options = PlaceOptions(redundant=redundant, exec_model=exec_model,
                                           time_limit=args.time_limit)
                    times, peaks = {}, {}
                    for name in BASELINES:
                        placement, _ = place(profile, cluster, name, options)
                        times[name], peaks[name] = held_out_mean_step(
                            placement.phy2log, held_out, cluster, exec_model, redundant)
                    start = time.perf_counter()
                    placement, _ = place(profile, cluster, "joint", options)
                    solve = time.perf_counter() - start
                    times["joint"], peaks["joint"] = held_out_mean_step(
                        placement.phy2log, held_out, cluster, exec_model, redundant)
                    best = min(times[name] for name in BASELINES)
                    ratios.append((times["joint"] / times["eplb_fixed"], times["joint"] / best))
                    print(f"| {drift} | {gpus} | {nodes} | {redundant} | {exec_model} | "
                          + " | ".join(f"{1e6 * times[name]:.1f}" for name in columns)
                          + f" | {ratios[-1][0]:.3f} | {ratios[-1][1]:.3f} | "
                          f"{peaks['joint'] / peaks['eplb_fixed']:.3f} | {solve:.1f} |",
                          flush=True)
    eplb, best = np.array(ratios).T
    print(f"\njoint/eplb: median {np.median(eplb):.3f}, worst {eplb.max():.3f}; "
          f"joint/best baseline: median {np.median(best):.3f}, worst {best.max():.3f}")
    print("\nrerun: python " + " ".join(sys.argv))


def online(trace: Trace, window: int, interval: int, max_moves: int, affinity: float,
           limit: float) -> None:
    """Online EPLB against the online joint policy on MMLU -> GPQA (module docstring)."""
    fit, held_out = drifts(trace)["MMLU->GPQA"]
    print(f"# online, MMLU -> GPQA, return, window {window} / interval {interval} steps, "
          f"joint max_moves {max_moves} per layer, affinity {affinity:g}; mean step time "
          "(us), slots moved")
    print("| G | N | R | static eplb | online eplb | moved | static joint | online joint | moved |"
          " online joint / online eplb |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for gpus, nodes in CLUSTERS:
            cluster = make_cluster(gpus, nodes, "h200")
            profile = profile_trace(fit, step_gpus=gpus)
            path = f"{scratch}/fit.npz"
            profile.save(path)
            policy = JointOnline(JointOnlineConfig(profile=path, max_moves=max_moves,
                                                   affinity=affinity))
            options = PlaceOptions(redundant=gpus, exec_model="return", time_limit=limit)
            steps = sample_steps(held_out, gpus, count=1 << 40)
            row = [gpus, nodes, gpus]
            for name, rebalance in (
                    ("eplb_fixed", lambda load, old, g=gpus, n=nodes: rebalance_experts(
                        load, old.shape[1], 1, n, g, fixed=True)[0]),
                    ("joint", lambda load, old, g=gpus, n=nodes, p=policy: p.rebalance(
                        load, old, g, n))):
                start = place(profile, cluster, name, options)[0].phy2log
                static, _ = replay(start, steps, held_out, cluster, window, 1 << 40, rebalance)
                mean, moved = replay(start, steps, held_out, cluster, window, interval,
                                     rebalance)
                row += [f"{1e6 * static:.1f}", f"{1e6 * mean:.1f}", moved]
            ratio = float(row[7]) / float(row[4])
            print("| " + " | ".join(str(v) for v in row) + f" | {ratio:.3f} |", flush=True)


def replay(phy2log: np.ndarray, steps: StepSample, held_out: Trace, cluster, window: int,
           interval: int, rebalance) -> tuple[float, int]:
    """Mean step seconds replaying ``steps`` in order, re-placing every ``interval`` steps
    with ``rebalance(load [L, E], old [L, P])`` from the last ``window`` steps' loads, and
    the slots whose expert changed in all."""
    L, E = held_out.num_layers, held_out.num_experts
    profile = replace(profile_trace(held_out), steps=steps)
    problem = build_problem([profile], np.ones(1), cluster, phy2log.shape[1] // cluster.num_gpus,
                            "return", "mean", model_for(profile))
    step_load = np.zeros((steps.num_steps, L, E))
    index = (steps.step_of[:, None, None] * L + np.arange(L)[None, :, None]) * E + steps.ids
    step_load.reshape(-1)[:] = np.bincount(index.ravel().astype(np.int64),
                                           minlength=steps.num_steps * L * E)
    costs, moved = np.zeros(steps.num_steps), 0
    current = phy2log
    for first in range(0, steps.num_steps, interval):
        if first:
            new = np.asarray(rebalance(step_load[max(0, first - window):first].sum(axis=0),
                                       current), dtype=np.int64)
            moved += int((new != current).sum())
            current = new
        chunk = np.arange(first, min(first + interval, steps.num_steps))
        tokens = np.arange(steps.bounds[chunk[0]], steps.bounds[chunk[-1] + 1])
        homes = problem.homes[0][tokens]
        for layer in range(L):
            counts, _ = layer_counts(problem, 0, layer, current[layer], homes, tokens)
            costs[chunk] += counts_cost(problem, counts)[chunk]
    return float(costs.mean()), moved


if __name__ == "__main__":
    main()
