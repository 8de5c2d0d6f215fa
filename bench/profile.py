"""How fast `profile` counts routing: records per second and peak memory, before and after.

Rerun: python bench/profile.py [--trace TRACE.npz] [--repeat N] [--tokens T] [--shards S]
(default trace: ../shared/traces/gpt-oss-20b/decode.npz, else the shipped slice; add
--no-synthetic to skip the SYNTHETIC DeepSeek-V3-shaped shards).

A routing record is one (token, layer, expert) choice: tokens x layers x k.

1. Counting an in-memory trace, the candidates side by side (interleaved repeats): the
   ``np.bincount`` counting of moetuner 0.1 (before), the same with uint32 keys and the
   coactivation upper triangle only (a numpy reformulation), and the compiled counter
   ``profile_trace`` uses now (after).
2. From file to profile, each in a fresh process for its peak RSS (imports alone: about
   150 MiB): before = read the whole trace (``load_trace``) and bincount-count it; after =
   ``profile_shards``, streamed (its time includes loading the cached compiled counter).
3. The same on a SYNTHETIC trace shaped like DeepSeek-V3 (58 MoE layers, 256 experts,
   top-8; skewed random ids, sequences of 1-2000 tokens), written to a temp dir as S
   uncompressed canonical ``.npz`` shards. "before" reads and counts one shard (it holds
   the whole file in memory; its records/s carries over to the others).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moetuner.inputs import profile_shards
from moetuner.profile import profile_trace
from moetuner.trace import Trace, load_trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "traces" / "gpt-oss-20b" / "decode.npz"
OLD_CHUNK_ELEMENTS = 1 << 22


def count_bincount(trace: Trace, keys: type = np.int64, upper_only: bool = False
                   ) -> dict[str, np.ndarray]:
    """The counting of moetuner 0.1 (``keys=np.int64``): per chunk, one ``np.bincount`` per
    statistic over materialised pair indices; ``keys=np.uint32, upper_only=True`` is the
    numpy reformulation (smaller keys, coactivation pairs a < b only)."""
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    chunk = max(1, max(OLD_CHUNK_ELEMENTS, L * E * E) // (L * k * k))
    load = np.zeros(L * E, np.int64)
    transitions = np.zeros((L - 1) * E * E, np.int64)
    top1 = np.zeros((L - 1) * E * E, np.int64)
    coactivation = np.zeros(L * E * E, np.int64)
    a, b = np.triu_indices(k, 1) if upper_only else np.indices((k, k)).reshape(2, -1)
    offsets = (np.arange(L) * E).astype(keys)[None, :, None]
    for start in range(0, trace.num_tokens, chunk):
        ids = trace.topk_ids[start:start + chunk].astype(keys)
        flat = ids + offsets                                        # [t, L, k] in L*E space
        load += np.bincount(flat.ravel(), minlength=L * E)
        coactivation += np.bincount((flat[:, :, a] * E + ids[:, :, b]).ravel(),
                                    minlength=L * E * E)
        transitions += np.bincount((flat[:, :-1, :, None] * E + ids[:, 1:, None, :]).ravel(),
                                   minlength=(L - 1) * E * E)
        top1 += np.bincount((flat[:, :-1, 0] * E + ids[:, 1:, 0]).ravel(),
                            minlength=(L - 1) * E * E)
    return {"load": load, "transitions": transitions, "transitions_top1": top1,
            "coactivation": coactivation}


def records(trace: Trace) -> int:
    return trace.num_tokens * trace.num_layers * trace.top_k


def side_by_side(trace: Trace, repeat: int) -> None:
    candidates = {
        "before: np.bincount, int64 keys (0.1)": lambda: count_bincount(trace),
        "numpy: uint32 keys, coactivation a < b": lambda: count_bincount(trace, np.uint32,
                                                                         True),
        "after: compiled counter (numba)": lambda: profile_trace(trace),
    }
    profile_trace(trace)  # compile (or load the cached machine code) outside the timing
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    before = statistics.median(times[next(iter(candidates))])
    print(f"| counting (x{repeat}, in memory) | median s | min s | max s | M records/s | "
          "speedup |")
    print("|---|---|---|---|---|---|")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median:.3f} | {min(seconds):.3f} | {max(seconds):.3f} | "
              f"{records(trace) / median / 1e6:.1f} | {before / median:.2f}x |")


def child(mode: str, paths: list[str]) -> None:
    """One measured run in this fresh process; prints seconds, records and peak RSS."""
    start = time.perf_counter()
    if mode == "before":
        counted = 0
        for path in paths:
            trace = load_trace(path)
            count_bincount(trace)
            counted += records(trace)
    else:
        profile = profile_shards(paths, workers=int(mode.removeprefix("after-w")))
        counted = profile.tokens * profile.num_layers * profile.top_k
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "records": counted, "peak_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """Peak RSS of this process or of any of its worker processes, in MiB. VmHWM, because
    ru_maxrss of a process keeps the peak of the process that forked it across exec."""
    status = Path("/proc/self/status").read_text()
    own_kib = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    return max(own_kib, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def measure(mode: str, paths: list[Path]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, *map(str, paths)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def file_table(title: str, runs: dict[str, tuple[str, list[Path]]]) -> None:
    print(f"| {title} | s | M records | M records/s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for name, (mode, paths) in runs.items():
        result = measure(mode, paths)
        print(f"| {name} | {result['seconds']:.2f} | {result['records'] / 1e6:.0f} | "
              f"{result['records'] / result['seconds'] / 1e6:.1f} | "
              f"{result['peak_mib']:.0f} |")


def write_synthetic_shards(folder: Path, tokens: int, shards: int, seed: int = 0
                           ) -> list[Path]:
    """SYNTHETIC DeepSeek-V3-shaped shards (58 layers, 256 experts, top-8) as uncompressed
    canonical .npz: each token's first expert is skewed (per-layer popularity order), the
    others follow at distinct random gaps (uint8 arithmetic wraps mod 256)."""
    rng = np.random.default_rng(seed)
    layers, experts, k = 58, 256, 8
    popularity = np.stack([rng.permutation(experts) for _ in range(layers)]).astype(np.uint8)
    paths = []
    for index in range(shards):
        n = tokens // shards + (index < tokens % shards)
        gaps = rng.integers(1, 32, size=(n, layers, k), dtype=np.uint8)  # 7 gaps < 256
        ranks = (experts * rng.random((n, layers), dtype=np.float32) ** 3).astype(np.intp)
        gaps[:, :, 0] = popularity[np.arange(layers), ranks]
        ids = np.cumsum(gaps, axis=2, dtype=np.uint8)
        lengths = rng.integers(1, 2000, size=n // 500 + 2)
        lengths = lengths[np.cumsum(lengths) < n]
        seq_lens = np.append(lengths, n - lengths.sum())
        path = folder / f"shard{index:02d}.npz"
        np.savez(path, topk_ids=ids, seq_lens=seq_lens, num_experts=np.array(experts))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path,
                        default=DEFAULT if DEFAULT.exists() else ROOT / "data" / "gpt-oss-20b"
                        / "slice.npz")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(args.child, rest)
        return
    trace = load_trace(args.trace)
    print(f"trace: {args.trace} ({trace.num_tokens} tokens x {trace.num_layers} layers x "
          f"top-{trace.top_k}, {trace.num_experts} experts: {records(trace) / 1e6:.1f} M "
          "records)\n")
    side_by_side(trace, args.repeat)
    print()
    file_table("GPT-OSS file -> profile", {
        "before: load_trace + np.bincount": ("before", [args.trace]),
        "after: streamed": ("after-w1", [args.trace]),
    })
    if not args.no_synthetic:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            paths = write_synthetic_shards(Path(folder), args.tokens, args.shards)
            print(f"\nSYNTHETIC DeepSeek-V3-shaped: {args.tokens} tokens x 58 layers x top-8, "
                  f"256 experts, {args.shards} shards (written in "
                  f"{time.perf_counter() - start:.1f} s)\n")
            file_table("SYNTHETIC shards -> profile", {
                "before: load_trace + np.bincount, 1 shard": ("before", paths[:1]),
                "after: streamed, 1 shard": ("after-w1", paths[:1]),
                f"after: streamed, {args.shards} shards": ("after-w1", paths),
                f"after: streamed, {args.shards} shards, --workers 2": ("after-w2", paths),
            })
    print(f"\nrerun: python bench/profile.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
