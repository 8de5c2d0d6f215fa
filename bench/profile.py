"""How fast `profile` counts a trace: routing records per second and peak memory.

Rerun: python bench/profile.py [TRACE.npz] [--repeat N]
(default trace: ../shared/traces/gpt-oss-20b/decode.npz, else the shipped slice).
A routing record is one (token, layer, expert) choice: tokens x layers x k.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

from moetuner.profile import profile_trace
from moetuner.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "traces" / "gpt-oss-20b" / "decode.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path,
                        default=DEFAULT if DEFAULT.exists() else ROOT / "data" / "gpt-oss-20b"
                        / "slice.npz")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    start = time.perf_counter()
    trace = load_trace(args.trace)
    load_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        profile_trace(trace)
        times.append(time.perf_counter() - start)
    records = trace.num_tokens * trace.num_layers * trace.top_k
    median = statistics.median(times)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"trace: {args.trace} ({trace.num_tokens} tokens x {trace.num_layers} layers x "
          f"top-{trace.top_k}, {trace.num_experts} experts)")
    print("| step | median s | min s | max s | records/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print(f"| load .npz | {load_seconds:.2f} | - | - | - | - |")
    print(f"| profile (x{args.repeat}) | {median:.2f} | {min(times):.2f} | {max(times):.2f} | "
          f"{records / median:.3g} | {peak_mib:.0f} |")
    print(f"rerun: python bench/profile.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
