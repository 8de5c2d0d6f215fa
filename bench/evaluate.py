"""Placement methods compared on held-out GPT-OSS-20B routing, and the replay's speed.

Rerun: python bench/evaluate.py [TRACE.npz] [--time-limit S] [--replica-policy even|nearest]
(default trace: ../shared/traces/gpt-oss-20b/decode.npz; sequences flagged seq_repetition
are dropped). Two splits: profile on MMLU and evaluate on GPQA; profile on the first half of
MMLU and evaluate on the second. 8 H100 GPUs on 1 and on 2 nodes. Methods: linear,
round_robin, eplb (R = 0 and R = G) and moetuner when registered (R = 0 and R = G, optimised
for each execution model). MoE times come from moetuner's cost model: a model, not a
measurement. The replay is also timed on a SYNTHETIC DeepSeek-V3-shaped trace (58 layers,
256 experts, top-8, 100,000 tokens) from ``moetuner.synth``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from moetuner.cluster import make_cluster
from moetuner.evaluate import EXEC_MODELS, compare, replay
from moetuner.methods import PlaceOptions, methods, place
from moetuner.models import get_model
from moetuner.profile import profile_trace
from moetuner.synth import synthesize_trace
from moetuner.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "traces" / "gpt-oss-20b" / "decode.npz"
GPUS = 8


def method_runs(available: set[str]) -> list[tuple[str, str, int, str]]:
    """(label, method, R, exec model it optimises) for every method of the comparison that
    is registered."""
    runs = [("round_robin", "round_robin", 0, "follow"), ("eplb R=0", "eplb", 0, "follow"),
            (f"eplb R={GPUS}", "eplb", GPUS, "follow")]
    runs += [(f"moetuner[{target}] R={r}", "moetuner", r, target)
             for r in (0, GPUS) for target in EXEC_MODELS]
    return [run for run in runs if run[1] in available]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--time-limit", type=float, default=30.0,
                        help="seconds per solve for methods that take a limit")
    parser.add_argument("--replica-policy", default="even", choices=("even", "nearest"))
    args = parser.parse_args()
    trace = load_trace(args.trace, drop=["seq_repetition"])
    model = get_model("gpt-oss-20b")
    mmlu = trace.select(["seq_dataset=mmlu*"])
    splits = {"MMLU -> GPQA": (mmlu, trace.select(["seq_dataset=gpqa*"])),
              "MMLU half -> other half": mmlu.split(0.5)}
    runs = method_runs(set(methods()))
    print(f"trace: {args.trace} ({trace.num_tokens} tokens after dropping repetitions); "
          f"model {model.name}; replicas: {args.replica_policy}; methods: "
          f"{', '.join(label for label, *_ in runs)}")
    print("MoE ms/batch: predicted by moetuner's cost model (a model, not a measurement), "
          f"batch = 256 tokens per GPU x {GPUS} GPUs\n")
    for split, (train, test) in splits.items():
        profile = profile_trace(train)
        for nodes in (1, 2):
            cluster = make_cluster(GPUS, nodes, "h100")
            placements = {"linear": place(profile, cluster, "linear")[0]}
            solve_time = {"linear": 0.0}
            for label, method, redundant, target in runs:
                options = PlaceOptions(redundant=redundant, time_limit=args.time_limit,
                                       exec_model=target)
                placements[label], record = place(profile, cluster, method, options)
                solve_time[label] = record.solve_time
            rows, _ = compare(placements, test, cluster, model, EXEC_MODELS,
                              args.replica_policy)
            print(f"### {split}: profile {train.num_tokens} tokens, evaluate "
                  f"{test.num_tokens}; {GPUS} x H100 on {nodes} node(s)\n")
            print("| method | exec | slots/GPU | imbalance | balancedness | cross-GPU | "
                  "cross-node | MoE ms/batch | speedup vs linear | solve s |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for row in rows:
                print(f"| {row['placement']} | {row['exec_model']} | {row['slots_per_gpu']} | "
                      f"{row['imbalance']:.3f} | {row['balancedness']:.3f} | "
                      f"{row['share_cross_gpu']:.1%} | {row['share_cross_node']:.1%} | "
                      f"{row['moe_time_per_batch_s'] * 1e3:.3f} | "
                      f"{row['speedup_vs_linear']:.3f}x | {solve_time[row['placement']]:.2f} |")
            print()
    time_replay(trace, args.trace)
    print(f"rerun: python bench/evaluate.py {' '.join(sys.argv[1:])}".rstrip())


def time_replay(trace, path: Path, repeat: int = 3) -> None:
    """Median seconds of one replay per execution model and replica policy: the whole
    GPT-OSS trace, and a SYNTHETIC DeepSeek-V3-shaped trace on 64 GPUs."""
    full = load_trace(path)
    gpt_cluster = make_cluster(GPUS, 2, "h100")
    gpt = place(profile_trace(trace), gpt_cluster, "eplb", PlaceOptions(redundant=GPUS))[0]
    synthetic = synthesize_trace(58, 256, 8, 100_000, seed=0)
    big_cluster = make_cluster(64, 8, "h100")
    big = place(profile_trace(synthetic), big_cluster, "eplb", PlaceOptions(redundant=64))[0]
    cases = [(f"GPT-OSS-20B decode, eplb R={GPUS}, {GPUS} GPUs / 2 nodes", full, gpt,
              gpt_cluster),
             ("SYNTHETIC DeepSeek-V3 shape (fitted to the GPT-OSS slice), eplb R=64, "
              "64 GPUs / 8 nodes", synthetic, big, big_cluster)]
    print(f"### replay time (median of {repeat})\n")
    print("| trace | tokens x layers x k | exec | replicas | median s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for label, events, placement, cluster in cases:
        shape = f"{events.num_tokens} x {events.num_layers} x {events.top_k}"
        for exec_model in EXEC_MODELS:
            for policy in ("even", "nearest"):
                times = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    replay(placement, events, cluster, exec_model, policy)
                    times.append(time.perf_counter() - start)
                median = statistics.median(times)
                print(f"| {label} | {shape} | {exec_model} | {policy} | {median:.2f} | "
                      f"{events.num_tokens / median:.3g} |")
    print()

if __name__ == "__main__":
    main()
