"""Placements judged step by step on held-out GPT-OSS-20B routing, and the replay's speed
and memory.

Rerun: python bench/evaluate.py [TRACE.npz] [--time-limit S] [--replica-policy even|nearest]
(default trace: ../shared/traces/gpt-oss-20b/decode.npz; sequences flagged seq_repetition
are dropped). Two splits: profile on MMLU and evaluate on GPQA; profile on the first half of
MMLU and evaluate on the second. 8 and 16 H100 GPUs on 2 nodes, R = 0 and R = G redundant
slots, execution models return and follow. Methods: linear (the engines' default, R slots
filled by p mod E as vLLM does), static eplb, online eplb starting from linear (vLLM's
window 1000 / interval 3000 steps, and a short schedule scaled to the trace: interval S / 8,
window a third of it), moetuner and joint (each optimised for the execution model it is
evaluated under, ``--time-limit`` seconds). Steps: decode with C = 64 G, 128 G and 256 G
running sequences, prefill chunks of 8192 tokens, and ``none`` (the whole-trace average).
MoE times come from moetuner's cost model: a model, not a measurement.

Replay speed: CPU seconds of one decode replay (C = 128 G) of the whole GPT-OSS trace.
Memory: peak RSS (VmHWM, reset once the trace is built) of a fresh process replaying a
SYNTHETIC trace made here with numpy (1,000,000 tokens, 58 layers, top-8 of 256 experts,
DeepSeek-V3's shape; skewed expert popularity, no cross-layer structure) on 64 GPUs / 8
nodes with eplb R = 64, decode C = 128 G.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moetuner.cluster import make_cluster
from moetuner.evaluate import EXEC_MODELS, evaluate, evaluate_online
from moetuner.methods import PlaceOptions, methods, place
from moetuner.models import ModelSpec, get_model
from moetuner.online import PRESETS, online_policy
from moetuner.profile import Profile, profile_trace
from moetuner.steps import make_steps
from moetuner.trace import Trace, load_trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "traces" / "gpt-oss-20b" / "decode.npz"
CONCURRENCY_PER_GPU = (64, 128, 256)
SHORT_ONLINE = "online eplb (interval S/8)"


def batchings(num_gpus: int) -> list[tuple[str, str, int | None]]:
    """(label, batching, concurrency) of every step formation compared."""
    return ([(f"decode C={c}G", "decode", c * num_gpus) for c in CONCURRENCY_PER_GPU]
            + [("prefill 8192", "prefill", None), ("none", "none", None)])


def static_placements(train: Profile, cluster, redundant: int, exec_model: str,
                      time_limit: float) -> dict[str, object]:
    """The static placements of one configuration (moetuner and joint optimised for
    ``exec_model``); methods that are not registered are left out."""
    runs = {"linear": ("linear", {}), "eplb": ("eplb", {}), "moetuner": ("moetuner", {}),
            "joint": ("joint", {})}
    out = {}
    for label, (method, params) in runs.items():
        if method not in methods():
            continue
        options = PlaceOptions(redundant=redundant, time_limit=time_limit,
                               exec_model=exec_model, params=params)
        out[label] = place(train, cluster, method, options)[0]
    return out


def step_table(test: Trace, cluster, model: ModelSpec, placements: dict, exec_model: str,
               policy: str) -> dict[str, dict[str, tuple[float, float, float]]]:
    """method -> batching -> (mean, p99 step seconds, amortised move seconds per step)."""
    G = cluster.num_gpus
    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    for label, batching, concurrency in batchings(G):
        steps = None if batching == "none" else make_steps(
            test.seq_lens, test.num_tokens, G, batching, concurrency)
        for name, placement in placements.items():
            _, times = evaluate(placement, test, cluster, model, exec_model, policy,
                                steps=steps, batching=batching)
            table.setdefault(name, {})[label] = (times.mean_step_time,
                                                 times.step_time_percentile(99), 0.0)
        if steps is None:
            for name in ("online eplb (vLLM)", SHORT_ONLINE):
                table.setdefault(name, {})[label] = table["linear"][label]
            continue
        window, interval = PRESETS["vllm"]
        short = max(steps.num_steps // 8, 1)
        for name, (w, i) in (("online eplb (vLLM)", (window, interval)),
                             (SHORT_ONLINE, (max(short // 3, 1), short))):
            online = online_policy("eplb", cluster, window=w, interval=i)
            _, times, moves = evaluate_online(placements["linear"], test, cluster, model,
                                              online, steps, exec_model, policy)
            table.setdefault(name, {})[label] = (
                times.mean_step_time, times.step_time_percentile(99),
                moves.summary()["move_time_per_step_s"])
    return table


def print_table(table: dict, labels: list[str]) -> None:
    print("| method | " + " | ".join(f"{label} mean / p99 ms" for label in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name, row in table.items():
        cells = []
        for label in labels:
            mean, p99, move = row[label]
            cells.append(f"{mean * 1e3:.3f} / {p99 * 1e3:.3f}"
                         + (f" (+{move * 1e3:.3f} moves)" if move else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


def ranking(table: dict, label: str) -> list[str]:
    """Methods by mean step time (moves included) under one batching, fastest first."""
    return sorted(table, key=lambda name: table[name][label][0] + table[name][label][2])


def compare_methods(trace: Trace, args: argparse.Namespace) -> None:
    model = get_model("gpt-oss-20b")
    mmlu = trace.select(["seq_dataset=mmlu*"])
    splits = {"MMLU -> GPQA": (mmlu, trace.select(["seq_dataset=gpqa*"])),
              "MMLU half -> other half": mmlu.split(0.5)}
    changes = []
    for split, (train_trace, test) in splits.items():
        train = profile_trace(train_trace)
        for G in (8, 16):
            cluster = make_cluster(G, 2, "h100")
            labels = [label for label, *_ in batchings(G)]
            for redundant in (0, G):
                for exec_model in EXEC_MODELS:
                    start = time.perf_counter()
                    placements = static_placements(train, cluster, redundant, exec_model,
                                                   args.time_limit)
                    table = step_table(test, cluster, model, placements, exec_model,
                                       args.replica_policy)
                    print(f"### {split}: {G} x H100 on 2 nodes, R = {redundant}, "
                          f"{exec_model}; profile {train.tokens} tokens, evaluate "
                          f"{test.num_tokens} ({time.perf_counter() - start:.0f} s)\n")
                    print_table(table, labels)
                    per_step, averaged = ranking(table, labels[1]), ranking(table, "none")
                    print(f"\nranking, none: {' < '.join(averaged)}\nranking, "
                          f"{labels[1]}: {' < '.join(per_step)}\n")
                    if per_step != averaged:
                        changes.append(f"{split}, G={G}, R={redundant}, {exec_model}: none "
                                       f"{averaged[:3]} -> per step {per_step[:3]}")
    print("### where the ranking (fastest first) changes between none and decode C=128G\n")
    print("\n".join(f"- {line}" for line in changes) or "- nowhere")
    print()


def time_replay(path: Path) -> None:
    """CPU seconds of one decode replay (C = 128 G) of the whole GPT-OSS trace."""
    trace = load_trace(path)
    model = get_model("gpt-oss-20b")
    cluster = make_cluster(8, 2, "h100")
    placement = place(profile_trace(trace), cluster, "eplb", PlaceOptions(redundant=8))[0]
    token_layers = trace.num_tokens * trace.num_layers
    print(f"### replay speed: GPT-OSS-20B, all {trace.num_tokens} tokens x "
          f"{trace.num_layers} layers, eplb R=8, 8 GPUs / 2 nodes, decode C=1024\n")
    print("| exec | replicas | CPU s | wall s | M token-layers / CPU s |")
    print("|---|---|---|---|---|")
    for exec_model in EXEC_MODELS:
        for policy in ("even", "nearest"):
            cpu, wall = time.process_time(), time.perf_counter()
            evaluate(placement, trace, cluster, model, exec_model, policy)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"| {exec_model} | {policy} | {cpu:.2f} | {wall:.2f} | "
                  f"{token_layers / cpu / 1e6:.2f} |")
    print()


def synthetic_trace(tokens: int, layers: int, experts: int, k: int, seed: int = 0) -> Trace:
    """SYNTHETIC: per layer a Zipf-skewed first expert a and an odd stride b; the k experts
    a + j b (mod E), j < k, are distinct because b is odd and E a power of two."""
    rng = np.random.default_rng(seed)
    ids = np.empty((tokens, layers, k), dtype=np.uint8)
    popularity = 1.0 / np.arange(1, experts + 1) ** 0.8
    offsets = np.arange(k, dtype=np.int64)
    for layer in range(layers):
        first = rng.choice(experts, size=tokens, p=popularity / popularity.sum())
        stride = 2 * rng.integers(0, experts // 2, size=tokens) + 1
        ids[:, layer, :] = (first[:, None] + stride[:, None] * offsets) % experts
    return Trace(topk_ids=ids, num_experts=experts, source="SYNTHETIC")


def memory_child() -> None:
    """In a fresh process: replay the SYNTHETIC 1M-token trace; print peak RSS."""
    trace = synthetic_trace(1_000_000, 58, 256, 8)
    # Building the trace (and Trace's validation) peaks above the replay: reset the peak.
    Path("/proc/self/clear_refs").write_text("5")
    built = _status_gib("VmRSS")
    model = get_model("deepseek-v3")
    cluster = make_cluster(64, 8, "h100")
    load = np.stack([np.bincount(trace.topk_ids[::10, layer].ravel(), minlength=256)
                     for layer in range(58)]).astype(np.float64)
    placement = place(Profile.from_load(load), cluster, "eplb", PlaceOptions(redundant=64))[0]
    cpu, wall = time.process_time(), time.perf_counter()
    _, times = evaluate(placement, trace, cluster, model, "return")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = _status_gib("VmHWM")
    print(f"| SYNTHETIC 1,000,000 x 58 x 8 (uint8, {trace.topk_ids.nbytes / 2**30:.2f} GiB) "
          f"| 64 / 8 | return, even | {times.num_steps} | {cpu:.1f} | {wall:.1f} | "
          f"{built:.2f} | {peak:.2f} |")


def _status_gib(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def measure_memory() -> None:
    print("### memory: SYNTHETIC DeepSeek-V3-shaped trace, eplb R=64, decode C=8192 "
          "(128 x 64), fresh process\n")
    print("| trace | GPUs / nodes | exec, replicas | steps | CPU s | wall s | "
          "RSS with the trace built GiB | peak RSS during the replay GiB |")
    print("|---|---|---|---|---|---|---|---|")
    sys.stdout.flush()
    subprocess.run([sys.executable, __file__, "--memory-child"], check=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--time-limit", type=float, default=5.0,
                        help="seconds per solve for moetuner and joint")
    parser.add_argument("--replica-policy", default="even", choices=("even", "nearest"))
    parser.add_argument("--only", choices=("methods", "speed", "memory"),
                        help="run one part only")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child()
        return
    if args.only in (None, "methods"):
        trace = load_trace(args.trace, drop=["seq_repetition"])
        print(f"trace: {args.trace} ({trace.num_tokens} tokens after dropping repetitions); "
              f"replicas: {args.replica_policy}; moetuner/joint time limit "
              f"{args.time_limit:g} s\nMoE ms per step: predicted by moetuner's cost model "
              "(a model, not a measurement); none = whole-trace average, one batch of 256 "
              "tokens per GPU\n")
        compare_methods(trace, args)
    if args.only in (None, "speed"):
        time_replay(args.trace)
    if args.only in (None, "memory"):
        measure_memory()
    print(f"rerun: python bench/evaluate.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
