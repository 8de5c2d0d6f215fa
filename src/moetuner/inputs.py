"""Reading what users give moetuner: traces and profiles, whatever file they come in.

``read_trace`` and ``read_profile`` dispatch on the file's content; a reader for a new format
(an engine's dump, say) is one more entry in ``TRACE_READERS`` or ``PROFILE_READERS``, keyed
by its name in ``formats.KINDS`` (``formats.identify`` tells formats apart by content).

Every trace argument may also name shards: a directory (its entries, sorted by name) or a
glob (``'dumps/*.npz'``), in any mix of readable formats. ``read_profile`` profiles them one
shard at a time (``profile_shard``, the map) and adds the profiles (``sum_profiles``, the
reduce), streaming canonical ``.npz`` and ExFlow ``.npy`` shards chunk by chunk; ``read_trace``
concatenates them, since evaluation replays a whole trace in memory.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from moetuner import readers
from moetuner.errors import InputError
from moetuner.formats import PROFILE, TRACE, identify, refuse_unless
from moetuner.io import failure_reason, load_npy
from moetuner.parallel import map_tasks
from moetuner.profile import Profile, load_profile, profile_trace
from moetuner.shards import (
    npz_ids_shape,
    stream_canonical_profile,
    stream_exflow_profile,
    stream_vllm_profile,
    sum_profiles,
    vllm_requests,
)
from moetuner.trace import Trace, load_trace

# Readers by format name (``formats.KINDS``; ``formats.identify`` tells the format).
TRACE_READERS: dict[str, Callable[[Path, Sequence[str], Sequence[str]], Trace]] = {
    "trace": load_trace,
    "sglang-per-token": readers.read_sglang_per_token,
    "vllm-requests": readers.read_vllm_requests,
    "vllm-jsonl": readers.read_vllm_jsonl,
    "exflow": readers.read_exflow,
}
PROFILE_READERS: dict[str, Callable[[Path], Profile]] = {
    "profile": load_profile,
    "sglang-stat": readers.read_sglang_stat,
    "sglang-count": readers.read_sglang_count,
    "loads": readers.read_loads,
}
# Trace formats profiled chunk by chunk, without holding the trace in memory.
STREAMED = {"trace": stream_canonical_profile, "exflow": stream_exflow_profile,
            "vllm-requests": stream_vllm_profile}
TRACE_EXPECTED = ("a per-token routing trace (an .npz with topk_ids [tokens, layers, k], or "
                  "an engine dump moetuner reads)")
PROFILE_EXPECTED = "a routing trace or profile (.npz with load [layers, experts])"


def expand_shards(path: str | os.PathLike) -> list[Path]:
    """The shards a trace argument names, in order.

    A path that does not exist but holds ``*``, ``?`` or ``[`` is a glob (its sorted
    matches); a directory other than a vLLM request directory (``*.npy`` per request) stands
    for its sorted entries, hidden ones skipped; matches and entries that are such
    directories expand in turn. Anything else is one shard.
    """
    text, path = str(path), Path(path)
    if not path.exists() and any(char in text for char in "*?["):
        matches = sorted(glob.glob(text))
        if not matches:
            raise InputError(text, "file", "a glob matching trace shards", "no match")
    elif path.is_dir() and not readers.is_vllm_dir(path):
        matches = sorted(str(entry) for entry in path.iterdir()
                         if not entry.name.startswith("."))
        if not matches:
            raise InputError(path, "file", "a directory of trace shards", "an empty directory")
    else:
        return [path]
    return [shard for match in matches for shard in expand_shards(match)]


def _is_shard_list(path: str | os.PathLike, shards: list[Path]) -> bool:
    return shards != [Path(path)]


def read_trace(path: str | os.PathLike, select: Sequence[str] = (), drop: Sequence[str] = ()
               ) -> Trace:
    """Read a per-token routing trace from any supported file, or concatenate the shards of
    a directory or glob (in memory: use ``read_profile`` to stream)."""
    shards = expand_shards(path)
    if _is_shard_list(path, shards):
        return concat_traces([_read_trace_file(shard, select, drop) for shard in shards],
                             str(path))
    return _read_trace_file(Path(path), select, drop)


def _read_trace_file(path: Path, select: Sequence[str], drop: Sequence[str]) -> Trace:
    kind = refuse_unless(path, (TRACE,), TRACE_EXPECTED)
    return TRACE_READERS[kind.name](path, select, drop)


def concat_traces(traces: Sequence[Trace], source: str) -> Trace:
    """One trace of the shards' tokens in order. E is the largest shard's; weights and
    sequences are kept when every shard has them, labels when every shard has that label."""
    first = traces[0]
    for trace in traces[1:]:
        if trace.topk_ids.shape[1:] != first.topk_ids.shape[1:]:
            raise InputError(trace.source, "topk_ids",
                             f"[tokens, {first.num_layers}, {first.top_k}] as {first.source}",
                             list(trace.topk_ids.shape))

    def together(name: str) -> np.ndarray | None:
        parts = [getattr(trace, name) for trace in traces]
        return None if any(part is None for part in parts) else np.concatenate(parts)

    seq_lens = together("seq_lens")
    shared = set.intersection(*(set(trace.seq_labels) for trace in traces))
    labels = {} if seq_lens is None else {
        name: np.concatenate([trace.seq_labels[name] for trace in traces])
        for name in sorted(shared)}
    return Trace(topk_ids=np.concatenate([trace.topk_ids for trace in traces]),
                 num_experts=max(trace.num_experts for trace in traces),
                 topk_weights=together("topk_weights"), seq_lens=seq_lens, seq_labels=labels,
                 source=source, selection=first.selection)


def is_trace(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a per-token trace (rather than a profile); for shards, whether
    every shard does. False for a file of no known format (its reader says what is wrong)."""
    try:
        return all(identify(shard).role == TRACE for shard in expand_shards(path))
    except InputError:
        return False


def read_profile(
    path: str | os.PathLike,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
) -> Profile:
    """Read a profile, or profile a trace on the fly (selection applies to traces only);
    the shards of a directory or glob are profiled one by one and added."""
    return profile_shards(expand_shards(path), select, drop)


def profile_shard(
    path: str | os.PathLike,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    chunk_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Profile:
    """The profile of ONE shard (a trace, streamed when its format allows, or a profile).

    A top-level function of picklable arguments: the map step that a process pool or Ray
    runs per shard; ``sum_profiles`` is the reduce. ``progress`` receives tokens read.
    """
    path = Path(path)
    kind = refuse_unless(path, (TRACE, PROFILE), PROFILE_EXPECTED)
    stream = STREAMED.get(kind.name)
    if stream is not None:
        try:
            return stream(path, select, drop, chunk_tokens, progress)
        except InputError:
            raise
        except Exception as exc:  # numpy, zipfile and zlib raise many types on damaged bytes
            raise InputError(path, "file", "a readable trace shard", failure_reason(exc)
                             ) from None
    if kind.role == TRACE:
        return profile_trace(_read_trace_file(path, select, drop), chunk_tokens, progress)
    if select or drop:
        raise InputError(path, "--select/--drop", "a per-token trace (a profile has no sequences)")
    return PROFILE_READERS[kind.name](path)


def shard_tokens(path: Path) -> int | None:
    """Tokens in a shard when its headers say so (canonical ``.npz``, ExFlow ``.npy``, vLLM
    requests), else None; sizes a progress bar without reading the data."""
    shape = npz_ids_shape(path)
    if shape is None and readers.is_exflow(path):
        shape = load_npy(path, "an ExFlow .npy [tokens, layers]", header_only=True).shape
    if shape is None and (readers.is_vllm_dir(path) or readers.is_vllm_npz(path)):
        _, shapes, _, _, close = vllm_requests(path)
        close()
        if all(shapes):
            return sum(int(request_shape[0]) for request_shape in shapes)
        return None
    # A malformed header (no token axis) is left for the reader to name.
    return None if not shape else int(shape[0])


def profile_shards(
    shards: Sequence[str | os.PathLike],
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    ray_address: str | None = None,
) -> Profile:
    """Profile shards (map: ``profile_shard``) and add the profiles (reduce: ``sum_profiles``).

    Args:
        shards: trace or profile files, e.g. ``expand_shards(directory)``.
        select, drop: the sequence selection, applied to every trace shard.
        workers: processes profiling shards at once (1: in this process, chunk by chunk).
        ray_address: profile the shards as Ray tasks instead (``moetuner.parallel``).
        progress: called with tokens read; per chunk with one worker, per shard otherwise.

    Shard profiles are added as they arrive (in shard order), so memory holds a few
    profiles, not one per shard.
    """
    if ray_address is None and (workers <= 1 or len(shards) <= 1):
        return sum_profiles(profile_shard(shard, select, drop, progress=progress)
                            for shard in shards)
    profiles = map_tasks(functools.partial(profile_shard, select=tuple(select),
                                           drop=tuple(drop)),
                         list(shards), workers=workers, ray_address=ray_address)
    return sum_profiles(_advancing(profiles, shards, progress))


def _advancing(profiles: Iterator[Profile], shards: Sequence[str | os.PathLike],
               progress: Callable[[int], None] | None) -> Iterator[Profile]:
    """``profiles`` (one per shard, in order), advancing ``progress`` by each shard's tokens."""
    for shard, profile in zip(shards, profiles, strict=True):
        if progress is not None:
            progress(shard_tokens(Path(shard)) or profile.tokens)
        yield profile
