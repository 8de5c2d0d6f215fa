"""Quality of ``joint`` at serving scale on the real GPT-OSS-20B trace, against static EPLB.

Profile on MMLU and evaluate the GPQA part (another task family: the served workload differs
from the profiled one), and profile on the first half of MMLU and evaluate the second (the
same family; the halves hold different subjects). 8 H100 on 2 nodes and 16 on 4, R = 0 and
R = G, execution model return; decode at 128 and 256 tokens per GPU (DeepEP low-latency)
and prefill at 4,096 (DeepEP normal), steps synthesised at serving scale from the held-out
requests (the same steps for every method). ``joint`` is placed per phase with its
defaults (hedged steps, ``--param phase=...``) within ``--time-limit`` seconds. Each table
gives every method's mean step time relative to static EPLB, its per-step imbalance and the
remote nodes a token reaches per layer (the tables and their columns are
``bench/evaluate.py``'s). MoE times come from moetuner's cost model, not measurements.

Rerun: python bench/quality.py [TRACE.npz] [--time-limit S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluate import DEFAULT, compare_methods

from moetuner.trace import load_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--time-limit", type=float, default=20.0,
                        help="seconds per solve for moetuner and joint")
    args = parser.parse_args()
    trace = load_trace(args.trace, drop=["seq_repetition"])
    print(f"trace: {args.trace} ({trace.num_tokens} tokens after dropping repetitions); "
          f"moetuner/joint time limit {args.time_limit:g} s\n")
    compare_methods(trace, args.time_limit, ("MMLU -> GPQA", "MMLU half -> half"))
    print(f"rerun: python bench/quality.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
