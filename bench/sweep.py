"""A what-if sweep of GPT-OSS-20B placements, run locally and on a local Ray instance.

Rerun: python bench/sweep.py [TRACE.npz] [--time-limit S] [--workers N] [--out DIR]
(default trace: ../shared/traces/gpt-oss-20b/decode.npz; sequences flagged seq_repetition
are dropped). Placed from MMLU, evaluated on GPQA; G in {4, 8, 16} H100s on N in {1, 2}
nodes, R in {0, G/2, G} (G/2 never divides E + R for 32 experts: those points are skipped),
linear, eplb and moetuner (``--time-limit`` seconds per solve), return and follow. The same
grid runs in a local process pool and as Ray tasks on a local Ray instance (skipped when ray
is not installed); each run starts from an empty directory. Prints the wall time of each
run, whether their rows are identical (solve times aside), and the recommendation per GPU
count. MoE times come from moetuner's cost model: a model, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

from moetuner.sweep import TIME_COLUMN, SweepGrid, SweepInputs, recommend, run_sweep

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "traces" / "gpt-oss-20b" / "decode.npz"
VOLATILE = ("solve_time_s",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--time-limit", type=float, default=2.0,
                        help="seconds per solve for moetuner")
    parser.add_argument("--workers", type=int, default=2, help="processes / Ray CPUs")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the runs' outputs here (default: a temporary directory)")
    args = parser.parse_args()
    inputs = SweepInputs(profile=str(args.trace), trace=str(args.trace),
                         profile_select=("seq_dataset=mmlu*",), profile_drop=("seq_repetition",),
                         select=("seq_dataset=gpqa*",), drop=("seq_repetition",))
    grid = SweepGrid(gpus=(4, 8, 16), nodes=(1, 2), redundant=(0, "G/2", "G"),
                     methods=("linear", "eplb", "moetuner"), time_limit=args.time_limit)
    out = args.out or Path(tempfile.mkdtemp(prefix="moetuner-sweep-"))
    runs = {"local pool": None}
    if importlib.util.find_spec("ray"):
        runs["local Ray"] = "local"
    results, walls = {}, {}
    for name, address in runs.items():
        target = out / name.replace(" ", "-")
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        results[name] = run_sweep(inputs, grid, target, workers=args.workers,
                                  ray_address=address)
        walls[name] = time.perf_counter() - start
    first = results["local pool"]
    print(f"trace: {args.trace}; {len(first.rows)} points, {len(first.skipped)} skipped; "
          f"moetuner time limit {args.time_limit:g} s; {args.workers} workers")
    for name, result in results.items():
        solve = sum(row["solve_time_s"] for row in result.rows)
        print(f"{name:>10}: {walls[name]:6.1f} s wall ({solve:.1f} s inside the methods); "
              f"page {result.page}")
    if "local Ray" in results:
        differing = [(a["gpus"], a["nodes"], a["redundant"], a["method"], a["exec_model"])
                     for a, b in zip(first.rows, results["local Ray"].rows, strict=True)
                     if {k: v for k, v in a.items() if k not in VOLATILE}
                     != {k: v for k, v in b.items() if k not in VOLATILE}]
        print(f"rows identical between the local and the Ray run: "
              f"{len(first.rows) - len(differing)} of {len(first.rows)}"
              + (f"; differing: {differing}" if differing else ""))
    print("\nMoE ms/batch (predicted; speedup over linear R=0 of the same cluster):")
    print(f"{'G':>3} {'N':>2} {'R':>3} {'exec':<7}" + "".join(
        f"{method:>22}" for method in grid.methods))
    keys = dict.fromkeys((r["gpus"], r["nodes"], r["redundant"], r["exec_model"])
                         for r in first.rows)
    for key in keys:
        cells = {r["method"]: r for r in first.rows
                 if (r["gpus"], r["nodes"], r["redundant"], r["exec_model"]) == key}
        print(f"{key[0]:>3} {key[1]:>2} {key[2]:>3} {key[3]:<7}" + "".join(
            f"{cells[m][TIME_COLUMN] * 1e3:>13.3f} ({cells[m]['speedup_vs_linear']:.3f}x)"
            if m in cells else f"{'-':>22}" for m in grid.methods))
    print("\nrecommended per GPU count (fastest; within 1%: least expert memory, fewest nodes):")
    for row in recommend(first.rows):
        print(f"  G={row['gpus']:<3} {row['exec_model']:<7} N={row['nodes']} "
              f"R={row['redundant']:<3} {row['method']:<9} {row[TIME_COLUMN] * 1e3:.3f} ms "
              f"({row['speedup_vs_linear']:.3f}x), {row['slots_per_gpu']} slots/GPU")


if __name__ == "__main__":
    main()
