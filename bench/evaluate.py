"""Placements judged at serving scale on held-out GPT-OSS-20B routing, and the replay's speed
and memory.

Rerun: python bench/evaluate.py [TRACE.npz] [--time-limit S] [--only methods|speed|memory]
(default trace: ../shared/traces/gpt-oss-20b/decode.npz; sequences flagged seq_repetition
are dropped). Profile on MMLU, evaluate the GPQA part. Clusters: 8 H100 on 2 nodes and 16 on
4, R = 0 and R = G redundant slots, execution model return (how engines run EP). Steps are
synthesised at serving scale from the held-out requests (``moetuner.steps.serving_steps``,
drawn once, seed 0): decode at 128 and 256 tokens per GPU on DeepEP low-latency kernels,
prefill at 4,096 tokens per GPU on DeepEP normal kernels. Methods: linear (the engines'
default), round_robin, static eplb, online eplb starting from linear (interval 16 steps,
window 16: vLLM's 1000 / 3000 would never rebalance in 64 steps; its move time amortised per
step is added), moetuner and joint (joint optimised per phase: ``--param phase=...``,
``--time-limit`` seconds). Per row: mean and p99 ms per step, the dispatch / compute /
combine split (ms per step), per-step imbalance (sum of busiest over sum of mean GPU load)
and remote nodes a token reaches per layer. MoE times come from moetuner's cost model: a
model, not a measurement.

Replay speed: CPU seconds of serving-scale decode replays (128 tokens per GPU) of the
GPT-OSS trace, in token-layers per CPU second (one core: the replay kernel is compiled and
single-threaded). Memory: peak RSS of a fresh process replaying 256 serving-scale decode
steps (128 tokens per GPU on 64 GPUs / 8 nodes) of a SYNTHETIC DeepSeek-V3-shaped trace
made here with numpy (100,000 tokens in 500 requests, 58 layers, top-8 of 256 experts).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moetuner.cluster import make_cluster
from moetuner.engine import EngineSettings, kernel_for
from moetuner.evaluate import evaluate, evaluate_online, replay_steps
from moetuner.methods import PlaceOptions, methods, parse_params, place
from moetuner.models import ModelSpec, get_model
from moetuner.online import online_policy
from moetuner.profile import Profile, profile_trace
from moetuner.steps import StepPlan, Steps
from moetuner.trace import Trace, load_trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "traces" / "gpt-oss-20b" / "decode.npz"
# (label, phase, tokens per GPU) of every serving regime compared.
REGIMES = (("decode 128", "decode", 128), ("decode 256", "decode", 256),
           ("prefill 4096", "prefill", 4096))
ONLINE = "online eplb (16/16)"
STATIC = ("linear", "round_robin", "eplb", "moetuner", "joint")


def placements_for(train_trace: Trace, cluster, redundant: int, phase: str,
                   time_limit: float) -> dict[str, object]:
    """The static placements of one configuration; joint optimises ``phase``'s steps."""
    train = profile_trace(train_trace)
    out = {}
    for method in STATIC:
        if method not in methods():
            continue
        profile = train
        params = None
        if method == "joint":
            params = parse_params("joint", {"phase": phase})
            profile = profile_trace(train_trace, step_gpus=cluster.num_gpus,
                                    plan=params.step_plan())
        options = PlaceOptions(redundant=redundant, time_limit=time_limit, exec_model="return",
                               params=params or PlaceOptions().params)
        out[method] = place(profile, cluster, method, options)[0]
    return out


def row_of(times, result) -> dict[str, float]:
    steps = max(times.num_steps, 1)
    return {"mean": times.mean_step_time, "p99": times.step_time_percentile(99),
            "dispatch": float(times.dispatch.sum()) / steps,
            "compute": float(times.compute.sum()) / steps,
            "combine": float(times.combine.sum()) / steps,
            "imbalance": times.step_imbalance, "remote": result.remote_nodes_per_token,
            "moves": 0.0}


def regime_table(test: Trace, cluster, model: ModelSpec, placements: dict, steps: Steps,
                 settings: EngineSettings) -> dict[str, dict[str, float]]:
    """method -> figures of one regime (every placement on the same steps)."""
    table = {}
    for name, placement in placements.items():
        result, times = evaluate(placement, test, cluster, model, settings, steps=steps)
        table[name] = row_of(times, result)
    online = online_policy("eplb", cluster, window=16, interval=16)
    result, times, moves = evaluate_online(placements["linear"], test, cluster, model, online,
                                           steps, settings)
    table[ONLINE] = row_of(times, result) | {
        "moves": moves.summary()["move_time_per_step_s"]}
    return table


def print_table(table: dict, reference: str = "eplb") -> None:
    base = table[reference]["mean"]
    print("| method | ms/step (mean / p99) | vs eplb | dispatch / compute / combine ms | "
          "step imb. | remote nodes |")
    print("|---|---|---|---|---|---|")
    for name, r in table.items():
        moves = f" +{r['moves'] * 1e3:.3f} moves" if r["moves"] else ""
        print(f"| {name} | {r['mean'] * 1e3:.3f} / {r['p99'] * 1e3:.3f}{moves} | "
              f"{(r['mean'] + r['moves']) / base:.3f} | {r['dispatch'] * 1e3:.3f} / "
              f"{r['compute'] * 1e3:.3f} / {r['combine'] * 1e3:.3f} | {r['imbalance']:.3f} | "
              f"{r['remote']:.2f} |")
    print()


def splits_of(trace: Trace, names: tuple[str, ...]) -> dict[str, tuple[Trace, Trace]]:
    """name -> (profiled part, held-out part): ``MMLU -> GPQA`` (another task family) and
    ``MMLU half -> half`` (the same family; the halves hold different subjects)."""
    mmlu = trace.select(["seq_dataset=mmlu*"])
    every = {"MMLU -> GPQA": (mmlu, trace.select(["seq_dataset=gpqa*"])),
             "MMLU half -> half": mmlu.split(0.5)}
    return {name: every[name] for name in names}


def compare_methods(trace: Trace, time_limit: float, split_names: tuple[str, ...]
                    ) -> list[str]:
    """Print one table per split, cluster, R and regime; return a line per row naming the
    fastest method and joint's ratio to static EPLB."""
    model = get_model("gpt-oss-20b")
    summary = []
    for split, (train, test) in splits_of(trace, split_names).items():
        for gpus, nodes in ((8, 2), (16, 4)):
            cluster = make_cluster(gpus, nodes, "h100")
            for redundant in (0, gpus):
                by_phase = {}
                for label, phase, per_gpu in REGIMES:
                    start = time.perf_counter()
                    if phase not in by_phase:
                        by_phase[phase] = placements_for(train, cluster, redundant, phase,
                                                         time_limit)
                    plan = StepPlan(phase=phase, tokens_per_gpu=per_gpu)
                    steps = plan.steps(test.seq_lens, test.num_tokens, gpus)
                    settings = EngineSettings(kernel=kernel_for(phase))
                    table = regime_table(test, cluster, model, by_phase[phase], steps,
                                         settings)
                    print(f"### {split}: {gpus} x H100 on {nodes} nodes, R = {redundant}, "
                          f"{label} ({settings.kernel}; {steps.description}; "
                          f"{time.perf_counter() - start:.0f} s)\n")
                    print_table(table)
                    served = {n: r["mean"] + r["moves"] for n, r in table.items()}
                    best = min(served, key=served.get)
                    summary.append(
                        f"{split}, {gpus}/{nodes}, R = {redundant}, {label}: fastest {best}; "
                        f"joint {served['joint'] / served['eplb']:.3f}x eplb, imbalance "
                        f"{table['joint']['imbalance']:.2f} vs {table['eplb']['imbalance']:.2f}"
                        f", remote nodes {table['joint']['remote']:.2f} vs "
                        f"{table['eplb']['remote']:.2f}")
    print("### per row: the fastest method (moves included) and joint against static eplb\n")
    print("\n".join(f"- {line}" for line in summary))
    print()
    return summary


def time_replay(path: Path) -> None:
    """CPU seconds of serving-scale decode replays of the GPT-OSS trace."""
    trace = load_trace(path, drop=["seq_repetition"])
    model = get_model("gpt-oss-20b")
    print("### replay speed: GPT-OSS-20B, serving-scale decode, 128 tokens per GPU, 64 "
          "steps, eplb R = G\n")
    print("| GPUs / nodes | exec | replicas | kernel | token-layers | CPU s | "
          "M token-layers / CPU s |")
    print("|---|---|---|---|---|---|---|")
    for gpus, nodes in ((8, 2), (16, 4), (32, 4)):
        cluster = make_cluster(gpus, nodes, "h100")
        placement = place(profile_trace(trace), cluster, "eplb",
                          PlaceOptions(redundant=gpus))[0]
        steps = StepPlan().steps(trace.seq_lens, trace.num_tokens, gpus)
        token_layers = steps.num_tokens * trace.num_layers
        for exec_model in ("return", "follow"):
            for policy in ("even", "nearest"):
                settings = EngineSettings(exec_model, policy, "deepep-ll")
                replay_steps(placement, trace, cluster, model, steps.take([0]), settings)
                cpu = time.process_time()
                replay_steps(placement, trace, cluster, model, steps, settings)
                cpu = time.process_time() - cpu
                print(f"| {gpus} / {nodes} | {exec_model} | {policy} | deepep-ll | "
                      f"{token_layers:,} | {cpu:.2f} | {token_layers / cpu / 1e6:.2f} |")
    print()


def synthetic_trace(tokens: int, layers: int, experts: int, k: int, requests: int,
                    seed: int = 0) -> Trace:
    """SYNTHETIC: per layer a Zipf-skewed first expert a and an odd stride b; the k experts
    a + j b (mod E), j < k, are distinct because b is odd and E a power of two; ``requests``
    sequences of equal length."""
    rng = np.random.default_rng(seed)
    ids = np.empty((tokens, layers, k), dtype=np.uint8)
    popularity = 1.0 / np.arange(1, experts + 1) ** 0.8
    offsets = np.arange(k, dtype=np.int64)
    for layer in range(layers):
        first = rng.choice(experts, size=tokens, p=popularity / popularity.sum())
        stride = 2 * rng.integers(0, experts // 2, size=tokens) + 1
        ids[:, layer, :] = (first[:, None] + stride[:, None] * offsets) % experts
    seq_lens = np.full(requests, tokens // requests, dtype=np.int64)
    seq_lens[-1] += tokens - int(seq_lens.sum())
    return Trace(topk_ids=ids, num_experts=experts, seq_lens=seq_lens, source="SYNTHETIC")


def memory_child() -> None:
    """In a fresh process: 256 serving-scale decode steps of a SYNTHETIC DeepSeek-V3-shaped
    trace on 64 GPUs; print peak RSS."""
    trace = synthetic_trace(100_000, 58, 256, 8, 500)
    model = get_model("deepseek-v3")
    cluster = make_cluster(64, 8, "h100")
    load = np.stack([np.bincount(trace.topk_ids[::10, layer].ravel(), minlength=256)
                     for layer in range(58)]).astype(np.float64)
    placement = place(Profile.from_load(load), cluster, "eplb", PlaceOptions(redundant=64))[0]
    # Building the trace and the placement peaks on its own: reset the peak.
    Path("/proc/self/clear_refs").write_text("5")
    built = _status_gib("VmRSS")
    plan = StepPlan(phase="decode", num_steps=256)
    cpu, wall = time.process_time(), time.perf_counter()
    _, times = evaluate(placement, trace, cluster, model, EngineSettings(), plan=plan)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = _status_gib("VmHWM")
    print(f"| SYNTHETIC 100,000 x 58 x 8 | 64 / 8 | {times.num_steps} x "
          f"{int(times.tokens[0]):,} | {cpu:.1f} | {wall:.1f} | {built:.2f} | {peak:.2f} |")


def _status_gib(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def measure_memory() -> None:
    print("### memory: SYNTHETIC DeepSeek-V3-shaped trace, eplb R = 64, serving-scale decode "
          "(128 tokens per GPU), return, even, deepep-ll, fresh process\n")
    print("| trace | GPUs / nodes | steps x tokens | CPU s | wall s | "
          "RSS with the trace built GiB | peak RSS during the replay GiB |")
    print("|---|---|---|---|---|---|---|")
    sys.stdout.flush()
    subprocess.run([sys.executable, __file__, "--memory-child"], check=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--time-limit", type=float, default=20.0,
                        help="seconds per solve for moetuner and joint")
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
              f"moetuner/joint time limit {args.time_limit:g} s\nMoE ms per step: "
              "predicted by moetuner's cost model (a model, not a measurement)\n")
        compare_methods(trace, args.time_limit, ("MMLU -> GPQA",))
    if args.only in (None, "speed"):
        time_replay(args.trace)
    if args.only in (None, "memory"):
        measure_memory()
    print(f"rerun: python bench/evaluate.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
