"""Online rebalancing at serving scale: the online joint policy against online EPLB, moves
included.

Profile on MMLU, evaluate the GPQA requests (another task family), 8 H100 on 2 nodes and 16
on 4, R = G, return; decode at 128 tokens per GPU (DeepEP low-latency, 64 steps, re-placed
every 16 steps from the last 16) and prefill at 4,096 (DeepEP normal, 16 steps, every 4 from
the last 4), steps synthesised at serving scale from the held-out requests (the same for
every row). Rows: static EPLB and static joint (placed per phase within ``--time-limit``);
online EPLB from ``linear`` (as engines start) and from joint's placement; the online joint
policy (``moetuner.integrations.joint_online``: the window's busiest GPU, and on DeepEP
normal the MMLU profile's co-activation across nodes; at most 8 slots moved per layer per
rebalance) from joint's placement. Per row: mean ms per step, move ms per step amortised,
their sum relative to static EPLB, experts moved. MoE times come from moetuner's cost model,
not measurements.

Rerun: python bench/online.py [TRACE.npz] [--time-limit S]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from evaluate import DEFAULT, placements_for

from moetuner.cluster import make_cluster
from moetuner.engine import EngineSettings, kernel_for
from moetuner.evaluate import evaluate, evaluate_online
from moetuner.integrations.joint_online import JointOnline, JointOnlineConfig
from moetuner.models import get_model
from moetuner.online import OnlinePolicy, online_policy
from moetuner.profile import profile_trace
from moetuner.steps import StepPlan
from moetuner.trace import load_trace

# phase -> (tokens per GPU, steps, rebalance interval = window)
REGIMES = {"decode": (128, 64, 16), "prefill": (4096, 16, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--time-limit", type=float, default=20.0)
    args = parser.parse_args()
    trace = load_trace(args.trace, drop=["seq_repetition"])
    train, test = trace.select(["seq_dataset=mmlu*"]), trace.select(["seq_dataset=gpqa*"])
    model = get_model("gpt-oss-20b")
    with tempfile.TemporaryDirectory() as scratch:
        profile_path = str(Path(scratch) / "mmlu.npz")
        profile_trace(train).save(profile_path)
        for gpus, nodes in ((8, 2), (16, 4)):
            cluster = make_cluster(gpus, nodes, "h100")
            for phase, (per_gpu, count, interval) in REGIMES.items():
                placements = placements_for(train, cluster, gpus, phase, args.time_limit)
                steps = StepPlan(phase=phase, tokens_per_gpu=per_gpu, num_steps=count).steps(
                    test.seq_lens, test.num_tokens, gpus)
                settings = EngineSettings(kernel=kernel_for(phase))
                joint_policy = JointOnline(JointOnlineConfig(
                    profile=profile_path, max_moves=8, num_gpus=gpus, num_nodes=nodes,
                    kernel=settings.kernel))
                online_joint = OnlinePolicy(joint_policy.rebalance, interval, interval,
                                            "online joint")
                online_eplb = online_policy("eplb", cluster, window=interval,
                                            interval=interval)
                rows = {}
                for name in ("eplb", "joint"):
                    _, times = evaluate(placements[name], test, cluster, model, settings,
                                        steps=steps)
                    rows[f"static {name}"] = (times.mean_step_time, 0.0, 0)
                for name, start, policy in (("online eplb from linear", "linear", online_eplb),
                                            ("online eplb from joint", "joint", online_eplb),
                                            ("online joint from joint", "joint", online_joint)):
                    _, times, moves = evaluate_online(placements[start], test, cluster, model,
                                                      policy, steps, settings)
                    summary = moves.summary()
                    rows[name] = (times.mean_step_time, summary["move_time_per_step_s"],
                                  summary["experts_moved"])
                base = rows["static eplb"][0]
                print(f"### {gpus} x H100 on {nodes} nodes, R = {gpus}, {phase} {per_gpu} "
                      f"({settings.kernel}; {count} steps, re-placed every {interval})\n")
                print("| row | ms/step | move ms/step | vs static eplb | experts moved |")
                print("|---|---|---|---|---|")
                for name, (mean, move, moved) in rows.items():
                    print(f"| {name} | {mean * 1e3:.3f} | {move * 1e3:.3f} | "
                          f"{(mean + move) / base:.3f} | {moved} |")
                print()
    print(f"rerun: python bench/online.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
